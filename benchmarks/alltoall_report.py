"""Markdown table and plot from ``alltoall_bench.py``'s JSON (numbers read, never typed).

    python benchmarks/alltoall_report.py benchmarks/results/device/alltoall_2gpu.json
"""

from __future__ import annotations

import json
import os
import sys


def _size(row) -> str:
    kib = row["per_rank_bytes"] / 1024
    return f"{kib / 1024:g} MiB" if kib >= 1024 else f"{kib:g} KiB"


def main(path: str):
    d = json.load(open(path))
    base = os.path.splitext(path)[0]
    lines = [f"# All-to-all, NVSHMEM transport vs NCCL ({d['device']} x {d['world']})", "",
             "Ulysses layout bit-exact vs NCCL: " + ", ".join(
                 f"{c['tokens']} tok {c['dtype'].split('.')[-1]} {'yes' if c['bit_exact'] else 'NO'}"
                 for c in d["ulysses_checks"]), "",
             "| per rank | NCCL ms | NVSHMEM ms | NCCL bus GB/s | NVSHMEM bus GB/s | NVSHMEM speedup |",
             "|---|---|---|---|---|---|"]
    for r in d["sizes"]:
        lines.append(f"| {_size(r)} | {r['nccl_ms']:.3f} | {r['nvshmem_ms']:.3f} | {r['nccl_busbw_GBps']:.1f} | "
                     f"{r['nvshmem_busbw_GBps']:.1f} | {r['nccl_ms'] / r['nvshmem_ms']:.2f}x |")
    graphed = [r for r in d["sizes"] if r.get("graphed_nccl_ms") and r.get("graphed_nvshmem_ms")]
    if graphed:  # the same calls replayed from one CUDA graph: no host launch cost
        lines += ["", "Replayed from a CUDA graph (no host launch cost; what compiled models see):", "",
                  "| per rank | NCCL ms | NVSHMEM ms | NVSHMEM speedup |", "|---|---|---|---|"]
        lines += [f"| {_size(r)} | {r['graphed_nccl_ms']:.3f} | {r['graphed_nvshmem_ms']:.3f} | "
                  f"{r['graphed_nccl_ms'] / r['graphed_nvshmem_ms']:.2f}x |" for r in graphed]
    with open(base + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5, 3.5))
    x = [r["per_rank_bytes"] / 2**20 for r in d["sizes"]]
    for key, label in (("nccl_busbw_GBps", "NCCL all_to_all_single"), ("nvshmem_busbw_GBps", "NVSHMEM transport")):
        ax.plot(x, [r[key] for r in d["sizes"]], marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("MiB per rank")
    ax.set_ylabel("bus bandwidth GB/s")
    ax.set_title(f"{d['device']} x {d['world']}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(base + ".png", dpi=110)
    print("\n".join(lines))


if __name__ == "__main__":
    main(sys.argv[1])
