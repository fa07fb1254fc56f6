"""Per-layer attention and communication time, from the GPU kernels of one profiled step.

Every CUDA kernel of the step is put in one class by its name:

* ``attention``: the attention kernels (cuDNN SDPA, FlashAttention, the
  memory-efficient and math-free fused kernels);
* ``communication``: NCCL's kernels, our one-sided put and flag-wait kernels,
  and the paced link's spin (``benchmarks/paced_link.py``);
* ``compute``: everything else (GEMMs, norms, element-wise).

A communication kernel runs from its launch until its data has arrived, so
its time includes waiting for the peer: it is the time the exchange occupies
the GPU, not only wire time. *Exposed* communication is the part of that
time during which no attention or compute kernel ran -- what overlap did not
hide. Times are divided by the number of transformer layers.
"""

from __future__ import annotations

_ATTENTION = ("sdpa", "flash", "fmha", "attention", "attn")
_COMMUNICATION = ("nccl", "_put_chunks_kernel", "_wait_flags_kernel", "spin_kernel")


def kernel_class(name: str) -> str:
    low = name.lower()
    if any(key in low for key in _COMMUNICATION):
        return "communication"
    if any(key in low for key in _ATTENTION):
        return "attention"
    return "compute"


def union(intervals) -> list[list[float]]:
    """Merge (start, end) intervals into disjoint ones, in order."""
    merged: list[list[float]] = []
    for start, end in sorted(intervals):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return merged


def overlap(a, b) -> float:
    """Length of the intersection of two disjoint, sorted interval lists."""
    total, j = 0.0, 0
    for start, end in a:
        while j < len(b) and b[j][1] <= start:
            j += 1
        k = j
        while k < len(b) and b[k][0] < end:
            total += max(0.0, min(end, b[k][1]) - max(start, b[k][0]))
            k += 1
    return total


def breakdown(kernels, layers: int) -> dict:
    """``kernels``: (name, start_us, duration_us) of one step on one GPU."""
    spans = {"attention": [], "communication": [], "compute": []}
    for name, start, duration in kernels:
        spans[kernel_class(name)].append((start, start + duration))
    merged = {cls: union(s) for cls, s in spans.items()}
    busy = {cls: sum(e - s for s, e in m) for cls, m in merged.items()}
    work = union(merged["attention"] + merged["compute"])
    exposed = busy["communication"] - overlap(merged["communication"], work)
    per_layer = lambda us: us / layers / 1e3
    return {"layers": layers, "attention_ms_per_layer": per_layer(busy["attention"]),
            "communication_ms_per_layer": per_layer(busy["communication"]),
            "exposed_communication_ms_per_layer": per_layer(exposed),
            "compute_ms_per_layer": per_layer(busy["compute"])}


def slowest_rank(per_layer: dict) -> dict:
    """Every rank's breakdown, gathered; the rank with the most exposed communication is kept."""
    import torch.distributed as dist
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, per_layer)
    return max(everyone, key=lambda b: b["exposed_communication_ms_per_layer"])


def profile_step(step, layers: int) -> dict:
    """Run ``step()`` once under the profiler and break its GPU kernels down."""
    import torch
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    kernels = [(e.name, e.time_range.start, e.time_range.elapsed_us()) for e in prof.events()
               if e.device_type == torch.autograd.DeviceType.CUDA]
    return breakdown(kernels, layers)
