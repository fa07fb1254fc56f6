"""The paced-link emulation (benchmarks/paced_link.py): its byte accounting, and that
pacing changes no result while charging exactly the inter-machine bytes.

On CPU the link records what it is charged instead of spinning a GPU stream;
the spin itself (GpuLink) only runs on a GPU.
"""

import os
import sys

import torch

from dist_harness import rel_err, run_ranks

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import paced_link  # noqa: E402

node_of_2x2 = lambda r: r // 2  # ranks 0,1 on machine 0; 2,3 on machine 1


def test_all_to_all_counts_only_the_peers_on_other_machines():
    x = torch.zeros(4, 10)  # 4 rows of 40 bytes: one per rank of the group
    args = {"input": x, "output": torch.zeros(4, 10), "input_split_sizes": None, "output_split_sizes": None}
    assert paced_link.remote_bytes("all_to_all_single", args, 0, [0, 1, 2, 3], node_of_2x2) == 80
    uneven = dict(args, input=torch.zeros(7, 10), input_split_sizes=[1, 1, 2, 3])
    assert paced_link.remote_bytes("all_to_all_single", uneven, 0, [0, 1, 2, 3], node_of_2x2) == 200
    assert paced_link.remote_bytes("all_to_all_single", args, 0, [0, 1], node_of_2x2) == 0


def test_gathers_and_reductions_scale_with_the_remote_members():
    t = torch.zeros(256, dtype=torch.bfloat16)  # 512 bytes
    assert paced_link.remote_bytes("all_gather_into_tensor", {"input_tensor": t}, 1, [1, 3], node_of_2x2) == 512
    assert paced_link.remote_bytes("all_gather", {"tensor": t}, 0, [0, 1, 2, 3], node_of_2x2) == 1024
    assert paced_link.remote_bytes("all_reduce", {"tensor": t}, 0, [0, 1, 2, 3], node_of_2x2) == 512


class RecordingLink:
    def __init__(self):
        self.charged = []

    def occupy(self, nbytes):
        self.charged.append(nbytes)
        return nbytes

    def settle(self, done):
        assert done in self.charged  # every settled transfer was charged first


def _torus_under_pacing(rank, world, nodes, per_node):
    from swiftfusion_xdit.mesh import build_mesh, plan_layout
    from swiftfusion_xdit.topology import detect_topology
    from swiftfusion_xdit.torus_attention import SPGroups, torus_attention
    from test_torus_attention import reference
    link = RecordingLink()
    paced_link.install(50.0, nodes, link=link)
    heads, tokens, D = 4, 8 * world, 16
    layout = plan_layout(detect_topology(), heads, ulysses=per_node, torus=nodes, torus_exchange="kv")
    mesh = build_mesh(layout)
    g = torch.Generator().manual_seed(3)
    full = [torch.randn(1, heads, tokens, D, generator=g) for _ in range(3)]
    shard = tokens // world
    lo = mesh.sp_rank * shard
    from swiftfusion_xdit.transport import default_transport
    default_transport()  # resolved once per process (it gathers the topology)
    link.charged.clear()  # the topology and mesh set-up exchanged a few bytes too
    out = torus_attention(*(x[:, :, lo:lo + shard] for x in full),
                          SPGroups(mesh.ulysses_group, mesh.torus_group, "kv"))
    ref, _ = reference(*full)
    assert rel_err(out, ref[:, :, lo:lo + shard]) < 1e-5
    # K and V of this machine's tokens for our head group, to the one other machine:
    # 2X with X = (S / world) * H * D * 4 bytes, the planner's torus-kv figure at T = 2
    X = shard * heads * D * 4
    assert sum(link.charged) == 2 * X, link.charged


def test_torus_over_a_paced_link_is_exact_and_charged_its_inter_machine_bytes():
    run_ranks(_torus_under_pacing, 2, 1, 2, 1)
    run_ranks(_torus_under_pacing, 2, 2, 2, 2)  # Ulysses all-to-alls stay inside machines: free


def _functional_all_to_all(rank, world):
    import torch.distributed as dist
    import torch.distributed._functional_collectives as funcol
    link = RecordingLink()
    paced_link.install(50.0, 2, link=link)  # ranks 0 and 1 are different machines
    x = torch.arange(4, dtype=torch.float32) + 10 * rank  # rows 0-1 to rank 0, 2-3 to rank 1
    out = funcol.all_to_all_single(x, None, None, dist.group.WORLD)
    assert link.charged == [8] and paced_link._pending_waits  # charged now, settled at the wait
    got = out.wait()
    assert not paced_link._pending_waits
    mine = slice(2 * rank, 2 * rank + 2)
    assert torch.equal(got, torch.cat([torch.arange(4.0)[mine] + 10 * r for r in range(world)]))


def test_functional_collectives_are_paced_until_their_wait():
    run_ranks(_functional_all_to_all, 2, 1)
