"""Measure the links a run really uses: world all-to-all and machine-to-machine.

    torchrun --nproc-per-node 4 benchmarks/link_probe.py --nodes 2 --out probe.json

Reports the world all-to-all bus bandwidth and, with several (emulated)
machines, the per-GPU bandwidth of a bidirectional exchange between ranks on
different machines (each rank swaps 64 MiB with its counterpart on the next
machine), the figure the communication floor divides by.
"""

from __future__ import annotations

import argparse
import json
import os

import torch
import torch.distributed as dist

import paced_link
from timing import median_ms
from swiftfusion_xdit.topology import emulate_machines


def timed(fn, repeats=10):
    """Seconds per call: the median of ``repeats`` calls, each timed alone after a barrier
    (one slow call on a shared network link then does not set the figure)."""
    return median_ms(fn, repeats=repeats, warmup=1, before=dist.barrier) / 1e3


def measure_links(nodes: int, mib: int = 64) -> dict:
    """The world all-to-all's bus bandwidth and, across machines, a bidirectional swap
    and a collective all-gather between counterpart ranks, per GPU (collective: every
    rank calls it). ``flux_device_check.py`` runs it inside each check too, so the
    planner can read the link as it was during that run."""
    rank, world = dist.get_rank(), dist.get_world_size()
    per_node = world // nodes
    n = mib * 2**20 // 2
    x, y = (torch.randn(n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    seconds = timed(lambda: dist.all_to_all_single(y, x))
    result = {"message_MiB": mib, "world_all_to_all_busbw_GBps": mib * 2**20 * (world - 1) / world / seconds / 1e9}
    if nodes > 1:
        peer_next = (rank + per_node) % world
        peer_prev = (rank - per_node) % world

        def swap():
            ops = [dist.P2POp(dist.isend, x, peer_next), dist.P2POp(dist.irecv, y, peer_prev)]
            for req in dist.batch_isend_irecv(ops):
                req.wait()
        seconds = timed(swap)
        result["inter_machine_GBps_per_gpu_per_direction"] = mib * 2**20 / seconds / 1e9
        # the same machines joined by a collective (what diffusers' ring uses)
        rails = [dist.new_group(list(range(r, world, per_node))) for r in range(per_node)]
        rail = rails[rank % per_node]
        parts = torch.empty(nodes * n, device="cuda", dtype=torch.bfloat16)
        seconds = timed(lambda: dist.all_gather_into_tensor(parts, x, group=rail))
        result["inter_machine_all_gather_GBps_per_gpu_in"] = mib * 2**20 * (nodes - 1) / seconds / 1e9
    return result


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--nodes", type=int, default=1)
    ap.add_argument("--mib", type=int, default=64)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    paced_gbps = paced_link.install_from_env()  # the probe then measures the paced link
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    emulate_machines(args.nodes)
    torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl", device_id=torch.device("cuda", torch.cuda.current_device()))
    result = {"device": torch.cuda.get_device_name(), "world": world, "nodes": args.nodes,
              "paced_inter_GBps": paced_gbps, **measure_links(args.nodes, args.mib)}
    result["nccl_env"] = {k: v for k, v in os.environ.items() if k.startswith("NCCL_")}
    if rank == 0:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
        print(json.dumps(result), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
