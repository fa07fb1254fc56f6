"""Run a function on several gloo ranks spawned on this CPU machine.

``SWIFTFUSION_NODE`` is set per rank so that ranks ``[k*G, (k+1)*G)`` look
like machine ``k``: the topology detection sees the same thing it would see
on a real cluster.
"""

from __future__ import annotations

import os
import socket
import sys
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, world, gpus_per_node, port, fn, args):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank % gpus_per_node),
                      SWIFTFUSION_NODE=f"node{rank // gpus_per_node}")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        fn(rank, world, *args)
    except Exception:
        traceback.print_exc()
        raise
    finally:
        dist.destroy_process_group()
    # Passed: leave without the interpreter's teardown. Once, a rank whose checks had
    # passed aborted there ("terminate called without an active exception": a library
    # thread still joinable at exit), failing the test for nothing it checks. Failures
    # never reach this line: they raise above and exit non-zero.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_ranks(fn, nodes: int, gpus_per_node: int, *args) -> None:
    """Spawn ``nodes * gpus_per_node`` gloo ranks running ``fn(rank, world, *args)``."""
    world = nodes * gpus_per_node
    mp.start_processes(_entry, args=(world, gpus_per_node, _free_port(), fn, args),
                       nprocs=world, join=True, start_method="spawn")


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    assert torch.isfinite(out).all(), "non-finite output"
    return ((out - ref).norm() / ref.norm()).item()
