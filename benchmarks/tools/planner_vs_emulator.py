"""The planner's predicted step against the emulator's measured one, row by row.

For every row of ``emulated_cluster.py`` folders that ran a strategy the planner models
(``usp`` and the torus exchanges; ulysses = U inside a machine, across = T), the planner
predicts the step with the H200 compute numbers it ships with, the emulator's intra-machine
bandwidth and the row's inter-machine bandwidth, no per-call latency beyond its own; error =
predicted / measured - 1. Graph-mode rows are the fair comparison (the planner models no
host time; eager emulated steps carry the emulator's 150-240 us per call).

    python benchmarks/tools/planner_vs_emulator.py --out benchmarks/results/emulated_a2a_kv_h200 \
        benchmarks/results/emulated_a2a_kv_h200/*/
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
from dataclasses import replace
from types import SimpleNamespace

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import emulated_cluster as ec  # noqa: E402
from swiftfusion_xdit.planner import H200, Plan, predict  # noqa: E402

LAYOUT = re.compile(r"U=(\d+) T=(\d+)(?: \(([\w-]+)\))?")


def plan_of(row: dict) -> Plan | None:
    """The planner's plan for a row's strategy and layout, or None where it has no model."""
    found = LAYOUT.fullmatch(row.get("layout", ""))
    name = row["strategy"].split("@")[0]
    if not found or not (name == "usp" or name.startswith("torus")):
        return None
    u, t, exchange = int(found[1]), int(found[2]), found[3] or "kv"
    return Plan("usp", u, t) if name == "usp" else Plan("torus", u, t, exchange)


def shape_for(result: dict, row: dict):
    if result["model"] == "wan2.1-14b":
        frames, height, width = map(int, row["size"].split("x"))
        args = SimpleNamespace(model="wan2.1-14b", frames=frames, height=height, width=width, size=None)
    else:
        args = SimpleNamespace(model=result["model"], size=int(row["size"]))
    return ec.shape_of(args, SimpleNamespace(itemsize=2))


def compare(folders: list[str]) -> list[dict]:
    rows = []
    for folder in folders:
        with open(os.path.join(folder, "emulated_cluster.json")) as f:
            result = json.load(f)
        for row in result["rows"]:
            plan = plan_of(row)
            if plan is None or "step_ms" not in row:
                continue
            machines, gpus = map(int, row["cluster"].split("x"))
            hw = replace(H200, inter_GBps=row["inter_GBps"], inter_collective_GBps=row["inter_GBps"],
                         onesided_GBps=None, onesided_latency_us=None)
            predicted = predict(plan, shape_for(result, row), hw, gpus).step_ms
            rows.append(dict(model=row["model"], size=row["size"], cluster=row["cluster"],
                             inter_GBps=row["inter_GBps"], mode=row.get("mode", "eager"),
                             plan=plan.describe(), measured_ms=row["step_ms"], predicted_ms=predicted,
                             error=predicted / row["step_ms"] - 1))
    return rows


def picks(rows: list[dict]) -> list[dict]:
    """Per (model, size, cluster, link, mode): the planner's pick among the rows run, and the
    measured cost of taking it instead of the measured best."""
    out = {}
    for r in rows:
        out.setdefault((r["model"], r["size"], r["cluster"], r["inter_GBps"], r["mode"]), []).append(r)
    result = []
    for key, group in out.items():
        chosen = min(group, key=lambda r: r["predicted_ms"])
        best = min(group, key=lambda r: r["measured_ms"])
        result.append(dict(zip(("model", "size", "cluster", "inter_GBps", "mode"), key), planner_pick=chosen["plan"],
                           measured_best=best["plan"], pick_over_best=chosen["measured_ms"] / best["measured_ms"]))
    return result


def write(rows: list[dict], pick_rows: list[dict], out: str, command: str) -> None:
    os.makedirs(out, exist_ok=True)
    by_mode = {m: [abs(r["error"]) for r in rows if r["mode"] == m] for m in dict.fromkeys(r["mode"] for r in rows)}
    summary = {m: {"rows": len(e), "median_abs_error": statistics.median(e), "within_20pct": sum(x <= 0.2 for x in e)}
               for m, e in by_mode.items()}
    with open(os.path.join(out, "planner_vs_emulator.json"), "w") as f:
        json.dump({"command": command, "summary": summary, "rows": rows, "picks": pick_rows}, f, indent=2)
    lines = ["# The planner against the emulator", "", f"`{command}`", "",
             "Predicted with the planner's H200 compute numbers and each row's link; error = predicted / "
             "measured - 1. Graph rows are the fair comparison (the planner models no host time).", "",
             "| mode | rows | median abs error | within 20% |", "|---|---|---|---|"]
    lines += [f"| {m} | {v['rows']} | {v['median_abs_error']:.0%} | {v['within_20pct']} |" for m, v in summary.items()]
    lines += ["", "| model | size | cluster | link GB/s | mode | plan | measured ms | predicted ms | error |",
              "|---" * 9 + "|"]
    lines += [f"| {r['model']} | {r['size']} | {r['cluster']} | {r['inter_GBps']:g} | {r['mode']} | {r['plan']} | "
              f"{r['measured_ms']:.1f} | {r['predicted_ms']:.1f} | {r['error']:+.0%} |" for r in rows]
    lines += ["", "Picks (among the plans run): the planner's, the measured best, and what taking the "
              "planner's costs.", "", "| model | size | cluster | link GB/s | mode | planner's pick | measured best "
              "| pick / best |", "|---" * 8 + "|"]
    lines += [f"| {p['model']} | {p['size']} | {p['cluster']} | {p['inter_GBps']:g} | {p['mode']} | {p['planner_pick']} | "
              f"{p['measured_best']} | {p['pick_over_best']:.2f}x |" for p in pick_rows]
    with open(os.path.join(out, "planner_vs_emulator.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    plot(rows, os.path.join(out, "planner_vs_emulator.png"))


def plot(rows: list[dict], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5.5, 5))
    for mode, marker in (("eager", "o"), ("graph", "s")):
        mine = [r for r in rows if r["mode"] == mode]
        ax.scatter([r["measured_ms"] for r in mine], [r["predicted_ms"] for r in mine], marker=marker, label=mode)
    top = max(max(r["measured_ms"], r["predicted_ms"]) for r in rows) * 1.05
    ax.plot([0, top], [0, top], "k-", linewidth=0.8)
    ax.plot([0, top], [0, top * 1.2], "k:", linewidth=0.6)
    ax.plot([0, top], [0, top * 0.8], "k:", linewidth=0.6)
    ax.set_xlabel("emulator, measured ms per step")
    ax.set_ylabel("planner, predicted ms per step")
    ax.set_title("Planner vs emulator (dotted: +-20%)", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("folders", nargs="+")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    rows = compare(args.folders)
    shown = " ".join(os.path.relpath(a) if os.path.exists(a) else a for a in (argv or sys.argv[1:]))
    write(rows, picks(rows), args.out, f"python benchmarks/tools/planner_vs_emulator.py {shown}")
    return rows


if __name__ == "__main__":
    main()
