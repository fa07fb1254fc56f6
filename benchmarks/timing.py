"""GPU timing shared by the benchmarks: CUDA events around back-to-back calls, median of repeats."""

from __future__ import annotations

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
