"""Transport selection and its error messages on a CPU machine."""

import pytest
import torch

from dist_harness import run_ranks
from swiftfusion_xdit import transport as tr


def test_unknown_transport_is_named():
    assert "unknown transport 'mpi'" in tr.unavailable_reason("mpi")


def test_nvshmem_on_cpu_says_it_needs_a_gpu():
    assert "needs an NVIDIA GPU" in tr.unavailable_reason("nvshmem")
    with pytest.raises(RuntimeError, match="transport 'nvshmem' cannot be used: NVSHMEM needs an NVIDIA GPU"):
        tr.resolve_transport("nvshmem")


def test_nvshmem_never_serves_a_group_across_machines_emulated_or_not():
    # the machine count comes from the topology, whichever way machines are emulated
    assert "spans 2 machines" in tr.unavailable_reason("nvshmem", machines=2)
    assert "needs an NVIDIA GPU" in tr.unavailable_reason("nvshmem", machines=1)  # inside one: fine
    with pytest.raises(RuntimeError, match="use comm='nccl' across machines"):
        tr.resolve_transport("nvshmem", machines=2)


def test_transport_pairs_keep_nvshmem_inside_machines():
    pair = tr.resolve_transports("auto", machines=2)
    assert (pair.ulysses.name, pair.torus.name) == ("gloo", "gloo")
    single = tr.resolve_transports("gloo", machines=1)
    assert single.ulysses is single.torus
    # across machines, nvshmem is asked of the Ulysses group only (here: no GPU to give it)
    with pytest.raises(RuntimeError, match="transport 'nvshmem' cannot be used: NVSHMEM needs an NVIDIA GPU"):
        tr.resolve_transports("nvshmem", machines=2)


def test_nccl_on_cpu_says_it_needs_cuda():
    with pytest.raises(RuntimeError, match="NCCL needs a CUDA GPU"):
        tr.resolve_transport("nccl")


def _auto_is_gloo_and_exchange_works(rank, world):
    import torch.distributed as dist
    t = tr.resolve_transport("auto")
    assert t.name == "gloo"
    send = torch.full((3,), float(rank))
    got = t.exchange(send, (rank + 1) % world, (rank - 1) % world, dist.group.WORLD).wait()
    assert torch.equal(got, torch.full((3,), float((rank - 1) % world)))
    chunks = torch.arange(world, dtype=torch.float32) + 10 * rank  # chunk p goes to rank p
    got = t.all_to_all(chunks, dist.group.WORLD)
    assert torch.equal(got, torch.arange(world, dtype=torch.float32) * 10 + rank)


def test_auto_picks_gloo_on_cpu_and_moves_data():
    run_ranks(_auto_is_gloo_and_exchange_works, 1, 3)


def test_auto_falls_back_to_nccl_when_nvshmem_does_not_start(monkeypatch, caplog):
    """``auto``: NVSHMEM installed but failing to initialise is logged, and NCCL serves."""
    def failing_start(name):
        raise RuntimeError("bootstrap failed")

    monkeypatch.setattr(tr.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(tr.dist, "get_backend", lambda group=None: "nccl")
    monkeypatch.setitem(tr._REGISTRY, "nvshmem", (lambda machines: None, failing_start))
    monkeypatch.setattr(tr, "_on_every_rank", lambda ok: ok)  # the other ranks agree
    with caplog.at_level("INFO", logger=tr.__name__):
        assert tr.resolve_transport("auto").name == "nccl"
    assert "did not initialise: bootstrap failed" in caplog.text


def test_auto_leaves_nvshmem_on_every_rank_when_one_rank_could_not_start_it(monkeypatch, caplog):
    """Started here, failed on another rank: this rank must not use it either (its kernels
    would spin on flags the other rank never raises)."""
    started = type("Started", (), {"name": "nvshmem"})()
    monkeypatch.setattr(tr.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(tr.dist, "get_backend", lambda group=None: "nccl")
    monkeypatch.setitem(tr._REGISTRY, "nvshmem", (lambda machines: None, lambda name: started))
    monkeypatch.setattr(tr, "_on_every_rank", lambda ok: False)
    with caplog.at_level("INFO", logger=tr.__name__):
        assert tr.resolve_transport("auto").name == "nccl"
    assert "it did not start on every rank" in caplog.text
    monkeypatch.setattr(tr, "_on_every_rank", lambda ok: ok)
    assert tr.resolve_transport("auto") is started


def test_a_process_group_made_without_a_backend_name_is_read_from_its_config(monkeypatch):
    monkeypatch.setattr(tr.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(tr.dist, "get_backend", lambda group=None: "undefined")
    monkeypatch.setattr(tr.dist, "get_backend_config", lambda group=None: "cpu:gloo,cuda:nccl")
    monkeypatch.setattr(tr.torch.cuda, "is_available", lambda: True)
    assert tr.process_group_backend() == "nccl"
    monkeypatch.setattr(tr.torch.cuda, "is_available", lambda: False)
    assert tr.process_group_backend() == "gloo"


def test_nvshmem_runs_one_job_per_machine():
    from swiftfusion_xdit.topology import Topology
    from swiftfusion_xdit.nvshmem_transport import machine_ranks
    two_by_four = Topology.uniform(2, 4).node_of_rank
    assert machine_ranks(two_by_four, 5) == [4, 5, 6, 7]  # rank 5 is PE 1 of machine 1's job
    assert machine_ranks((0, 1, 0, 1), 2) == [0, 2]  # interleaved hosts: PEs follow global order


def test_symmetric_memory_is_checked_against_the_gpu_before_the_heap_grows():
    from swiftfusion_xdit.nvshmem_transport import check_fits, parse_size
    assert parse_size("1G") == 2**30 and parse_size("512m") == 2**29 and parse_size("1.5k") == 1536
    assert parse_size("1GB") == 2**30 and parse_size(".5m") == 2**19 and parse_size("4096") == 4096
    with pytest.raises(ValueError, match="not an NVSHMEM size: 'lots'"):
        parse_size("lots")
    MiB = 2**20
    check_fits(600 * MiB, 300 * MiB, 1024 * MiB, free=0)  # inside the first reservation
    check_fits(600 * MiB, 800 * MiB, 1024 * MiB, free=400 * MiB)  # grows by 376 MiB: fits
    with pytest.raises(RuntimeError, match=r"needs 600 MiB more .* grow by 376 MiB, but only 300 MiB "
                                           r"of GPU memory is free: use more GPUs per machine"):
        check_fits(600 * MiB, 800 * MiB, 1024 * MiB, free=300 * MiB)
    # the heap already grew past its first reservation: only the new channel must fit
    check_fits(512 * MiB, 2048 * MiB, 1024 * MiB, free=1000 * MiB)


def _compiled_nvshmem_all_to_all_is_one_graph_op(rank, world):
    """Under torch.compile the NVSHMEM all-to-all is one custom op in the graph (so CUDA graphs
    can capture it) that runs the device-counted path. The kernels need a GPU, so the counted
    path is stood in for by gloo here: what is checked is the tracing (fullgraph: no break),
    the op's fake shapes, and the result flowing through it."""
    import torch.distributed as dist
    from swiftfusion_xdit import nvshmem_transport as nt

    class GlooCounted(nt.NvshmemTransport):
        def __init__(self):
            nt._STATE["transport"] = self
            self.calls = 0

        def all_to_all_counted(self, x, group, scatter_dim=0, gather_dim=0):
            self.calls += 1
            return tr.TwoSidedTransport("gloo").all_to_all(x, group, scatter_dim, gather_dim)

    t, traced = GlooCounted(), []

    def backend(graph_module, example_inputs):  # records the graph, runs it as traced
        traced.extend(str(node.target) for node in graph_module.graph.nodes if node.op == "call_function")
        return graph_module.forward

    f = torch.compile(lambda x: t.all_to_all(x * 2, dist.group.WORLD, 2, 3) + 1, fullgraph=True,
                      backend=backend)
    x = torch.randn(3, 1, 2 * world, 5, 4)
    got = f(x)
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x)
    heads = slice(2 * rank, 2 * rank + 2)
    assert torch.equal(got, torch.cat([p[:, :, heads] for p in parts], dim=3) * 2 + 1)
    assert t.calls == 1
    assert any("swiftfusion.nvshmem_all_to_all" in target for target in traced), traced


def test_compiled_nvshmem_all_to_all_is_one_graph_op():
    run_ranks(_compiled_nvshmem_all_to_all_is_one_graph_op, 1, 2)


def test_transport_pairs_on_a_gpu_job(monkeypatch):
    """With NCCL and NVSHMEM available: auto keeps NVSHMEM inside one machine only; nvshmem
    across machines serves the Ulysses group, NCCL the torus."""
    class FakeNvshmem:
        name = "nvshmem"

    monkeypatch.setattr(tr.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(tr.dist, "get_backend", lambda group=None: "nccl")
    monkeypatch.setitem(tr._REGISTRY, "nvshmem", (tr._nvshmem_available, lambda name: FakeNvshmem()))
    monkeypatch.setattr("swiftfusion_xdit.nvshmem_transport.unavailable_reason", lambda: None)
    monkeypatch.setattr(tr, "_on_every_rank", lambda ok: ok)  # one process stands for all ranks
    names = lambda pair: (pair.ulysses.name, pair.torus.name)
    assert names(tr.resolve_transports("auto", machines=1)) == ("nvshmem", "nvshmem")
    assert names(tr.resolve_transports("auto", machines=2)) == ("nccl", "nccl")
    assert names(tr.resolve_transports("nvshmem", machines=2)) == ("nvshmem", "nccl")
