"""Markdown table and plot from ``host_overhead.py``'s JSON files (numbers read, never typed).

    python benchmarks/host_overhead_report.py benchmarks/results/host_overhead_h200 old,new,new2,old2

Each ``host_overhead_LABEL.json`` is one build's run; labels old/new (and old2/new2,
the same builds again in the other order) compare two builds within one device call.
"""

from __future__ import annotations

import glob
import json
import os
import sys

PATHS = ("nccl all_to_all_single", "nvshmem all_to_all (eager)", "torch add_ (one small op)")


def _runs(folder: str, prefix: str, order: str) -> list[dict]:
    runs = [json.load(open(p)) for p in sorted(glob.glob(os.path.join(folder, f"{prefix}_*.json")))]
    if order:  # the order the runs were made in, one device call
        runs.sort(key=lambda r: order.split(",").index(r["label"]))
    return runs


def peer_lines(runs: list[dict], order: str) -> list[str]:
    """``--shared-gpu`` runs: the eager all-to-all with real peers (processes sharing the GPU)."""
    if not runs:
        return []
    sizes = [row["per_rank_bytes"] // 1024 for row in runs[0]["sizes"]]
    return ["", f"With real peers: {runs[0]['ranks']} processes sharing the GPU under CUDA MPS (NCCL refuses "
            "that, so NVSHMEM only); microseconds per eager all-to-all, slowest rank, median of 7 x 200 calls"
            + (f"; runs in the order made: {order}" if order else "") + ":", "",
            "| build (run) | " + " | ".join(f"{k} KiB" for k in sizes) + " |", "|---|" + "---|" * len(sizes)] + [
        f"| {run['label']} | " + " | ".join(f"{row['nvshmem_eager_us_slowest_rank']:.1f}" for row in run["sizes"]) + " |"
        for run in runs]


def main(folder: str, order: str = ""):
    runs = _runs(folder, "host_overhead", order)
    device = runs[0]["device"]
    lines = [f"# Host time per all-to-all call, one rank ({device})", "",
             f"{runs[0]['bytes'] / 2**20:g} MiB per call; host microseconds per call, median of 7 x 300 "
             "back-to-back calls (the GPU waited for the host in every row: its time per call matched)"
             + (f"; runs in the order made: {order}" if order else "") + ".", "",
             "| build (run) | " + " | ".join(PATHS) + " | NCCL / NVSHMEM |",
             "|---|" + "---|" * (len(PATHS) + 1)]
    for run in runs:
        t = {p: run["paths"][p]["host_us"] for p in PATHS}
        lines.append(f"| {run['label']} | " + " | ".join(f"{t[p]:.1f}" for p in PATHS) +
                     f" | {t[PATHS[0]] / t[PATHS[1]]:.2f}x |")
    pieces = [p for p in runs[-1]["paths"] if p not in PATHS and "counted" not in p]
    lines += ["", "Pieces of the eager path (host us per call):", "",
              "| piece | " + " | ".join(r["label"] for r in runs) + " |", "|---|" + "---|" * len(runs)]
    lines += [f"| {p} | " + " | ".join(f"{r['paths'][p]['host_us']:.2f}" if p in r["paths"] else "-"
                                       for r in runs) + " |" for p in pieces]
    lines += peer_lines(_runs(folder, "peers", order), order)
    with open(os.path.join(folder, "host_overhead.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5.5, 3.2))
    width = 0.8 / len(PATHS)
    for i, p in enumerate(PATHS):
        ax.bar([j + i * width for j in range(len(runs))], [r["paths"][p]["host_us"] for r in runs], width, label=p)
    ax.set_xticks([j + width for j in range(len(runs))], [r["label"] for r in runs])
    ax.set_ylabel("host us per call")
    ax.set_title(f"{device}, one rank", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(folder, "host_overhead.png"), dpi=110)
    print("\n".join(lines))


if __name__ == "__main__":
    main(*sys.argv[1:3])
