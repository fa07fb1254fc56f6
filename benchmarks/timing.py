"""Shared by the GPU benchmarks: CUDA-event timing (median of repeats) and the end of a
multi-rank run."""

from __future__ import annotations

import json
import os
import statistics

import torch


def median_ms(fn, repeats: int = 20, inner: int = 1, warmup: int = 3, before=None) -> float:
    """Milliseconds per call: median over ``repeats`` of ``inner`` calls timed together
    (``before()`` runs untimed ahead of each repeat, e.g. a barrier)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        if before is not None:
            before()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(inner):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / inner)
    return statistics.median(times)


def save_and_shut_down(result: dict, folder: str, name: str) -> None:
    """Rank 0 writes ``result`` to ``folder/name`` and prints it; then every rank stops
    NVSHMEM (if started) and torch.distributed."""
    import torch.distributed as dist
    from swiftfusion_xdit.nvshmem_transport import shutdown_nvshmem
    if dist.get_rank() == 0:
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, name), "w") as f:
            json.dump(result, f, indent=2)
        print(json.dumps(result, indent=2))
    dist.barrier()
    shutdown_nvshmem()
    dist.destroy_process_group()
