"""The emulated backend on CPU: shapes, fills, modeled times and completion order.

One process plays one rank of a larger job; a fake clock stands for its timeline,
so every time below is exact arithmetic on the link model, never a measurement.
LINK is chosen so that the formulas are easy to read: inside a machine 2 us + 4 bytes
per ns, between machines 10 us + 1 byte per ns.
"""

import json
import os

import pytest
import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol

from swiftfusion_xdit.emulator import (BACKEND, H200_NCCL_ALLTOALL, IN, INTER, INTRA, OUT,
                                       EmulatedProcessGroup, LinkModel, _interpolate, emulate)
from swiftfusion_xdit.mesh import build_mesh, plan_layout
from swiftfusion_xdit.torus_attention import SPGroups, torus_attention
from swiftfusion_xdit.transport import TwoSidedTransport

LINK = LinkModel(intra_GBps=4.0, intra_latency_us=2.0, intra_table=(), inter_GBps=1.0, inter_latency_us=10.0)
B = 4096  # bytes of the float32 tensors below
# torch 2.13 renamed all_gather_into_tensor / reduce_scatter_tensor; both names reach the group
pytestmark = pytest.mark.filterwarnings("ignore:.*is deprecated:FutureWarning")


def intra_us(nbytes):
    return 2.0 + nbytes / 4000


def inter_us(nbytes):
    return 10.0 + nbytes / 1000


@pytest.fixture
def job():
    """``job(world, per_machine, rank)`` -> the Cluster; the group is torn down after."""
    def start(world=4, per_machine=2, rank=0, link=LINK):
        return emulate(world, per_machine, rank, link)
    yield start
    if dist.is_initialized():
        dist.destroy_process_group()


def legs_of(cluster, since=0):
    return sorted((t.op, t.link, t.direction, t.nbytes) for t in cluster.transfers[since:])


def test_registered_backend_initialises_the_default_group(job):
    cluster = job(8, 4, rank=5)
    assert BACKEND.upper() in dist.Backend._plugins
    assert dist.get_backend() == BACKEND
    assert isinstance(dist.group.WORLD, EmulatedProcessGroup)
    assert (dist.get_rank(), dist.get_world_size()) == (5, 8)
    assert (cluster.topology.num_nodes, cluster.topology.gpus_per_node) == (2, 4)


def test_emulate_refuses_ranks_that_do_not_fill_machines():
    with pytest.raises(ValueError, match="do not fill machines"):
        emulate(6, 4)
    assert not dist.is_initialized()


# --- shapes, dtypes and the fill rule ---------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int64])
def test_each_call_returns_the_right_shapes_dtypes_and_local_fill(job, dtype):
    job(4, 2, rank=1)
    x = torch.arange(8).to(dtype)
    out = torch.empty_like(x)
    dist.all_to_all_single(out, x)
    assert out.dtype == dtype and torch.equal(out, x)  # receives what it sends

    outs = [torch.empty(2, dtype=dtype) for _ in range(4)]
    dist.all_to_all(outs, list(x.chunk(4)))
    assert torch.equal(torch.cat(outs), x)

    gathered = torch.empty(4, 8, dtype=dtype)
    dist.all_gather_into_tensor(gathered, x)
    assert torch.equal(gathered, x.expand(4, 8))  # every slot: the local input
    parts = [torch.empty_like(x) for _ in range(4)]
    dist.all_gather(parts, x)
    assert all(torch.equal(p, x) for p in parts)

    mine = torch.empty(2, dtype=dtype)
    dist.reduce_scatter_tensor(mine, x)
    assert torch.equal(mine, x[2:4])  # rank 1's chunk of its own input

    y = x.clone()
    dist.all_reduce(y)
    dist.broadcast(y, src=3)
    assert torch.equal(y, x)  # left as it is

    got = torch.full((3,), 7, dtype=dtype)
    works = dist.batch_isend_irecv([dist.P2POp(dist.irecv, got, 0), dist.P2POp(dist.isend, x[:3], 2)])
    for work in works:
        work.wait()
    assert got.dtype == dtype and not got.any()  # a receive has no local data: zeros


def test_unequal_splits_copy_the_overlap_and_zero_the_rest(job):
    job(2, 2)
    x = torch.arange(1.0, 7.0)
    out = torch.full((8,), -1.0)
    dist.all_to_all_single(out, x, output_split_sizes=[4, 4], input_split_sizes=[3, 3])
    assert torch.equal(out, torch.tensor([1.0, 2, 3, 4, 5, 6, 0, 0]))


def test_functional_collectives_resolve_the_emulated_group(job):
    cluster = job(4, 2)
    world = dist.group.WORLD
    x = torch.arange(8.0)
    assert world.group_name  # the name a Python ProcessGroup would otherwise not have
    assert torch.equal(funcol.wait_tensor(funcol.all_to_all_single(x, None, None, world)), x)
    gather = getattr(funcol, "all_gather_single", None) or funcol.all_gather_tensor  # torch < 2.13
    scatter = getattr(funcol, "reduce_scatter_single", None) or funcol.reduce_scatter_tensor
    assert funcol.wait_tensor(gather(x, 0, world)).shape == (32,)
    assert torch.equal(funcol.wait_tensor(funcol.permute_tensor(x, [1, 2, 3, 0], world)), x)
    assert torch.equal(funcol.wait_tensor(scatter(x, "sum", 0, world)), x[:2])
    # the permute sends to rank 1 (same machine) and receives from rank 3 (the other one)
    moved = legs_of(cluster)
    assert ("all_to_all", INTRA, OUT, 32) in moved and ("all_to_all", INTER, IN, 32) in moved
    assert cluster.clock.now_us > 0  # each wait_tensor moved the clock to its call's end


# --- modeled time per call kind (rank 0 of 2 machines x 2: k = 2 here, m = 2 there) -----------

def _all_to_all_single():
    dist.all_to_all_single(torch.empty(1024), torch.ones(1024))


def _all_to_all_lists():
    dist.all_to_all([torch.empty(256) for _ in range(4)], list(torch.ones(1024).chunk(4)))


def _all_gather_into_tensor():
    dist.all_gather_into_tensor(torch.empty(4096), torch.ones(1024))


def _all_gather_list():
    dist.all_gather([torch.empty(1024) for _ in range(4)], torch.ones(1024))


def _reduce_scatter():
    dist.reduce_scatter_tensor(torch.empty(256), torch.ones(1024))


def _all_reduce():
    dist.all_reduce(torch.ones(1024))


def _broadcast():
    dist.broadcast(torch.ones(1024), src=0)


def _barrier():
    dist.barrier()


def _send_recv():  # to rank 1 (this machine), from rank 2 (the other one)
    for work in dist.batch_isend_irecv([dist.P2POp(dist.isend, torch.ones(1024), 1),
                                        dist.P2POp(dist.irecv, torch.empty(1024), 2)]):
        work.wait()


CALL_KINDS = {  # call -> legs of (link, direction, bytes): the module docstring's table
    _all_to_all_single: [(INTRA, B // 4), (INTER, B // 2)],  # B(k-1)/n, Bm/n
    _all_to_all_lists: [(INTRA, B // 4), (INTER, B // 2)],
    _all_gather_into_tensor: [(INTRA, B), (INTER, 2 * B)],  # B(k-1), Bm
    _all_gather_list: [(INTRA, B), (INTER, 2 * B)],
    _reduce_scatter: [(INTRA, B // 4), (INTER, B // 2)],  # B/n per peer
    _all_reduce: [(INTRA, B // 2), (INTER, B)],  # 2B/n per peer
    _broadcast: [(INTER, B)],  # B on the slowest link
    _barrier: [(INTER, 0)],
}


@pytest.mark.parametrize("call", list(CALL_KINDS), ids=lambda f: f.__name__.strip("_"))
def test_modeled_time_of_each_collective(job, call):
    cluster = job(4, 2)
    call()
    expected = CALL_KINDS[call]
    assert sorted((t.link, t.direction, t.nbytes) for t in cluster.transfers) == \
        sorted((link, d, b) for link, b in expected for d in (IN, OUT))
    us = {INTRA: intra_us, INTER: inter_us}
    assert cluster.clock.now_us == pytest.approx(max(us[link](b) for link, b in expected))


def test_modeled_time_of_send_and_recv(job):
    cluster = job(4, 2)
    _send_recv()
    assert legs_of(cluster) == [("recv", INTER, IN, B), ("send", INTRA, OUT, B)]
    assert cluster.clock.now_us == pytest.approx(inter_us(B))  # both run at once: different streams


def test_inside_machine_time_follows_the_measured_table():
    link = LinkModel()  # the default: H200 NCCL all-to-all, two GPUs
    sizes = [b for b, _ in H200_NCCL_ALLTOALL]
    assert link.duration_us(INTRA, sizes[-1]) == pytest.approx(H200_NCCL_ALLTOALL[-1][1])
    assert link.duration_us(INTRA, 1) == pytest.approx(45.94)  # the 256 KiB point, slower, is clipped
    times = [link.duration_us(INTRA, 2**p) for p in range(10, 30)]
    assert times == sorted(times)
    big = sizes[-1]  # above the table: the last segment's slope
    slope = (476.19 - 138.36) / (big - sizes[-2])
    assert link.duration_us(INTRA, 2 * big) - link.duration_us(INTRA, big) == pytest.approx(slope * big)
    assert _interpolate(((100, 10.0), (200, 20.0)), 150) == pytest.approx(15.0)


def test_table_is_the_committed_measurement():
    path = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "results", "h200x2_s10",
                        "alltoall_2gpu.json")
    if not os.path.exists(path):
        pytest.skip("benchmarks/results/h200x2_s10/alltoall_2gpu.json is not in this checkout")
    measured = LinkModel.from_alltoall_json(path).intra_table
    assert [b for b, _ in measured] == [b for b, _ in H200_NCCL_ALLTOALL]
    assert [t for _, t in measured] == pytest.approx([t for _, t in H200_NCCL_ALLTOALL], abs=0.01)
    with open(path) as f:
        assert json.load(f)["world"] == 2


def test_network_presets():
    assert LinkModel.preset("400G").inter_GBps == 50.0
    fast, slow = LinkModel.preset("400G", inter_latency_us=0), LinkModel.preset("100G", inter_latency_us=0)
    assert fast.duration_us(INTER, 10**6) == pytest.approx(20.0)  # 1 MB at 50 GB/s
    assert slow.duration_us(INTER, 10**6) == pytest.approx(80.0)
    with pytest.raises(ValueError, match="unknown network preset"):
        LinkModel.preset("200G")


# --- completion order, independence of streams, Work semantics -------------------------------

def _a2a(group, nbytes=B):
    out, x = torch.empty(nbytes // 4), torch.ones(nbytes // 4)
    return dist.all_to_all_single(out, x, group=group, async_op=True)


def test_calls_on_one_link_complete_first_in_first_out(job):
    cluster = job(4, 2)
    here = dist.new_group([0, 1])
    d = intra_us(B // 2)
    first, second = _a2a(here), _a2a(here)  # both issued at t = 0
    assert not first.is_completed()
    cluster.clock.advance(d)
    assert first.is_completed() and not second.is_completed()  # second queued behind first
    second.wait()
    assert cluster.clock.now_us == pytest.approx(2 * d)
    cluster.clock.advance(100.0)  # an idle link: the next call starts when issued
    _a2a(here).wait()
    assert cluster.clock.now_us == pytest.approx(2 * d + 100.0 + d)


def test_link_classes_and_directions_are_independent(job):
    cluster = job(4, 2)
    here, there = dist.new_group([0, 1]), dist.new_group([0, 2])
    inside, across = _a2a(here), _a2a(there)
    across.wait()
    assert cluster.clock.now_us == pytest.approx(inter_us(B // 2))  # not behind the intra call
    assert inside.is_completed()  # the shorter intra call ended first
    t0 = cluster.clock.now_us
    sends = dist.batch_isend_irecv([dist.P2POp(dist.isend, torch.ones(1024), 2),
                                    dist.P2POp(dist.irecv, torch.empty(1024), 2)])
    for work in sends:
        work.wait()
    assert cluster.clock.now_us - t0 == pytest.approx(inter_us(B))  # out and in side by side
    for post in (dist.isend, dist.irecv):  # one direction: queued
        t0 = cluster.clock.now_us
        for work in [post(torch.ones(1024), 2), post(torch.ones(1024), 2)]:
            work.wait()
        assert cluster.clock.now_us - t0 == pytest.approx(2 * inter_us(B))


def test_a_call_starts_when_every_stream_it_uses_is_free(job):
    cluster = job(4, 2)
    dist.isend(torch.ones(1024), 2)  # busies the outgoing inter stream only
    _a2a(dist.group.WORLD).wait()  # needs intra and inter, both directions
    assert cluster.clock.now_us == pytest.approx(inter_us(B) + inter_us(B // 2))


def test_work_wait_semantics(job):
    cluster = job(4, 2)
    x = torch.ones(1024)
    work = dist.all_reduce(x, async_op=True)
    end = inter_us(B)
    assert not work.is_completed() and cluster.clock.now_us == 0.0  # async: the caller went on
    assert work.get_future().wait()[0] is x
    assert work.wait() is True
    assert cluster.clock.now_us == pytest.approx(end) and work.is_completed() and work.is_success()
    cluster.clock.advance(50.0)
    work.wait()  # waiting again for something finished costs nothing
    assert cluster.clock.now_us == pytest.approx(end + 50.0)
    dist.all_reduce(x)  # blocking: waits before returning, as NCCL's wait() does on the stream
    assert cluster.clock.now_us == pytest.approx(end + 50.0 + end)


def test_group_of_one_costs_nothing(job):
    cluster = job(4, 2)
    alone = dist.new_group([0])
    x = torch.arange(4.0)
    out = torch.empty_like(x)
    dist.all_to_all_single(out, x, group=alone)
    assert torch.equal(out, x) and cluster.transfers == [] and cluster.clock.now_us == 0.0


# --- sub-groups ---------------------------------------------------------------------------------

def test_new_group_members_are_classified_by_machine(job):
    cluster = job(8, 4, rank=1)
    inside, pair, mixed = dist.new_group([0, 1, 2, 3]), dist.new_group([1, 5]), dist.new_group([0, 1, 4, 5])
    assert inside.link_to == [INTRA] * 4
    assert pair.link_to == [INTRA, INTER]
    assert mixed.link_to == [INTRA, INTRA, INTER, INTER]
    assert dist.new_group([4, 5]) == dist.GroupMember.NON_GROUP_MEMBER
    _a2a(inside).wait()
    assert {t.link for t in cluster.transfers} == {INTRA}
    n = len(cluster.transfers)
    _a2a(pair).wait()
    assert {t.link for t in cluster.transfers[n:]} == {INTER}
    n = len(cluster.transfers)
    _a2a(mixed).wait()
    assert legs_of(cluster, n) == sorted(("all_to_all", link, d, B // 4 if link == INTRA else B // 2)
                                         for link in (INTRA, INTER) for d in (IN, OUT))


def test_device_mesh_dimensions_follow_machines(job):
    from torch.distributed.device_mesh import DeviceMesh
    job(8, 4, rank=6)
    mesh = DeviceMesh("cpu", torch.arange(8).reshape(2, 4), mesh_dim_names=("machines", "gpus"))
    assert mesh.get_group("gpus").link_to == [INTRA] * 4
    assert mesh.get_group("machines").link_to == [INTER, INTRA]  # ranks 2 and 6


# --- our Torus Attention, unmodified, over the emulated group ---------------------------------

def _torus_2x2(cluster, exchange, compiled=False):
    layout = plan_layout(cluster.topology, 24, ulysses=2, torus=2, torus_exchange=exchange)
    mesh = build_mesh(layout)
    groups = SPGroups(mesh.ulysses_group, mesh.torus_group, layout.torus_exchange)
    transport = TwoSidedTransport("emulated")
    q, k, v = (torch.randn(1, 24, 8, 16, dtype=torch.bfloat16) for _ in range(3))
    attend = lambda q, k, v: torus_attention(q, k, v, groups, transport=transport)
    if compiled:
        attend = torch.compile(attend, fullgraph=True, backend="aot_eager")
    n = len(cluster.transfers)
    out = attend(q, k, v)
    assert out.shape == q.shape and out.dtype == q.dtype
    return [(t.op, t.link, t.direction, t.nbytes) for t in cluster.transfers[n:]]


X = 1 * 24 * 8 * 16 * 2  # one rank's shard of one tensor, bytes


def test_torus_attention_2x2_kv_moves_what_its_schedule_says(job):
    cluster = job(4, 2, rank=3)
    moved = _torus_2x2(cluster, "kv")
    both = lambda op, link, nbytes: [(op, link, OUT, nbytes), (op, link, IN, nbytes)]
    # Ulysses Q/K/V in (3X, half of it to the peer), the other machine's K/V (one all-gather
    # of our head half's K and V: 2X), the output back (X, half of it to the peer)
    assert moved == both("all_to_all", INTRA, 3 * X // 2) + both("all_gather", INTER, 2 * X) + \
        both("all_to_all", INTRA, X // 2)


def test_torus_attention_2x2_a2a_steps_are_peer_transfers_across_machines(job):
    cluster = job(4, 2)
    moved = _torus_2x2(cluster, "a2a")
    across = [m for m in moved if m[1] == INTER]
    assert sorted(op for op, *_ in across) == ["recv", "recv", "send", "send"]  # Q/K/V out, output back
    assert sum(nbytes for op, _, _, nbytes in across if op == "send") == 3 * X // 2 + X // 2


def test_torus_attention_compiles_into_functional_collectives_over_the_emulated_group(job):
    cluster = job(4, 2)
    eager = _torus_2x2(cluster, "kv")
    torch._dynamo.reset()
    compiled = _torus_2x2(cluster, "kv", compiled=True)
    assert compiled == eager  # the same transfers, issued from one graph


def test_our_code_sees_the_emulated_machines(job):
    """detect_topology would gather only this rank's machine name (the fill rule); it asks
    the group instead, so the mesh builder lays the job out as on the real cluster."""
    from swiftfusion_xdit.topology import detect_topology
    from swiftfusion_xdit.transport import process_group_backend
    job(8, 4, rank=5)
    topology = detect_topology()
    assert topology.node_of_rank == (0, 0, 0, 0, 1, 1, 1, 1)
    assert process_group_backend() == ("nccl" if torch.cuda.is_available() else "gloo")
    layout = plan_layout(topology, 8)
    assert (layout.dims.torus, layout.dims.ulysses) == (2, 4)
    crossing = dist.new_group([1, 5])
    assert detect_topology(crossing).node_of_rank == (0, 1)


def test_the_diffusers_path_runs_unmodified_on_an_emulated_cluster(job):
    """The tiny Flux pipeline through pipe.enable_parallel on 2 machines x 2: the plan
    is the real cluster's, and the torus exchange crosses the modeled network."""
    from swiftfusion_xdit.tiny import tiny_flux_pipeline
    cluster = job(4, 2, rank=0)
    pipe = tiny_flux_pipeline(0).enable_parallel("torus", output_on_all_ranks=True)
    assert (pipe.parallel_layout.dims.torus, pipe.parallel_layout.dims.ulysses) == (2, 2)
    out = pipe("a cat", height=64, width=64, num_inference_steps=1, max_sequence_length=16,
               output_type="latent").images
    assert out.shape == (1, 256, 16) and torch.isfinite(out).all()
    links = {t.link for t in cluster.transfers}
    assert links == {INTRA, INTER}
