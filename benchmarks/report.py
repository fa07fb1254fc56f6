"""Markdown table and plots from one harness run (every number read from its JSON).

    python benchmarks/report.py benchmarks/results/h200x2

Writes ``report.md``, ``latency.png`` (step latency per strategy and
configuration) and ``speedup.png`` (torus over the best xDiT USP split).
Limit columns: perfect scaling (one-GPU time / GPUs); the compute floor, one
rank's measured compute for that grid with no communication (eager FLUX rows,
where the folder holds ``rank_compute.json`` from ``rank_compute.py``); and,
across machines, the communication floor: the inter-machine bytes the
strategy must move per step (``swiftfusion_xdit.planner.bytes_per_layer``)
over the inter-machine bandwidth measured in the same session.
"""

from __future__ import annotations

import json
import os
import sys

from swiftfusion_xdit.planner import WAN21_14B, ModelShape, bytes_per_layer
from swiftfusion_xdit.tiny import FLUX_DEV_TRANSFORMER
from harness import parse_topology, timed_per_step
from validate_planner import DIFFUSERS, load_probes, load_rank_compute, measured_for, plan_for


def xdit_rows(harness):
    rows, one_gpu = [], {}
    compiled = harness.get("compiled", False)
    for row in harness["rows"]:
        r = row.get("result")
        if row["kind"] != "xdit" or r is None or not timed_per_step(r):
            continue
        if row["name"].startswith("xdit 1 GPU"):  # the reference (a 1x1 topology row is a row)
            one_gpu[("flux-dev", r["height"], compiled)] = r["median_step_ms"]
            continue
        name, topo = row["name"].split()[:2]
        rows.append(dict(path="xdit", model="flux-dev", strategy=name,
                         compiled=compiled, topology=topo, size=r["height"], gpus=r["world"],
                         ms=r["median_step_ms"], rel_err=row.get("rel_err_vs_1gpu"), text_in_exchange=False,
                         per_layer=r.get("per_layer")))
    return rows, one_gpu


def left_out_lines(harnesses) -> list[str]:
    """Jobs that failed, were skipped, or whose times cannot be read as per-step times."""
    lines = []
    for harness in harnesses:
        for row in harness["rows"]:
            r = row.get("result")
            if row.get("skipped") or row.get("rc"):
                why = f"skipped ({row['skipped']})" if row.get("skipped") else f"failed (rc {row['rc']}, {row.get('log')})"
            elif r is not None and row["kind"] == "xdit" and not timed_per_step(r):
                why = ("timed per PipeFusion patch, not per denoising step (a harness fault, fixed "
                       "after this run)")
            else:
                continue
            lines.append(f"- {row['name']}{' compiled' * harness.get('compiled', False)}: {why}")
    return ["## Jobs left out of the tables", ""] + lines + [""] if lines else []


def diffusers_rows(folder):
    rows, one_gpu = [], {}
    for name in sorted(os.listdir(folder)):
        if not (name.startswith(("flux_check_", "wan2.1-14b_check_")) and name.endswith(".json")):
            continue
        result = json.load(open(os.path.join(folder, name)))
        model = result.get("model") if result.get("model") in ("flux-dev", "wan2.1-14b") else "flux-dev"
        topo = result.get("topology") or f"{result['nodes']}x{result['world'] // result['nodes']}"
        compiled = result.get("compiled", name.endswith("_compiled.json"))
        for run in result["runs"]:  # each job measured its own one-GPU reference: ratios use it
            one_gpu[(model, run["size"], compiled, topo)] = run["one_gpu_ms"]
            rows.append(dict(path="diffusers", model=model, strategy=run["strategy"],
                             compiled=compiled, topology=topo, one_gpu_ms=run["one_gpu_ms"],
                             size=run["size"], gpus=result["world"], ms=run["parallel_ms"],
                             rel_err=run["rel_err"], text_in_exchange=True, per_layer=run.get("per_layer")))
    return rows, one_gpu


def model_shape(row) -> ModelShape:
    if row["model"] == "wan2.1-14b":
        return ModelShape.wan(WAN21_14B, *map(int, row["size"].split("x")))
    return ModelShape.flux(FLUX_DEV_TRANSFORMER, row["size"], row["size"],
                           text_in_exchange=row["text_in_exchange"])


def shown(row) -> str:
    return row["strategy"] + " compiled" * row["compiled"]


def size_label(row) -> str:
    return f"{row['size']}²" if row["model"] == "flux-dev" else f"Wan {row['size']}"


def plan_of(row):
    """The plan a harness row ran (None where the planner has no such plan)."""
    name = row["strategy"]  # diffusers' unified split has no planner plan; xDiT's names carry theirs
    kind = DIFFUSERS.get(name) if row["path"] == "diffusers" else ("torus" if "torus" in name else "")
    nodes = parse_topology(row["topology"])[0]
    return None if kind is None else plan_for(kind, name, row["gpus"], nodes, model_shape(row))


def compute_floor_ms(row, rank_compute: dict):
    """One rank's measured compute for the row's grid (eager FLUX.1-dev rows only)."""
    plan = plan_of(row) if row["model"] == "flux-dev" and not row["compiled"] else None
    measured = plan and measured_for(rank_compute, row["size"])(plan)
    return measured.step_ms if measured else None


def comm_floor_ms(row, inter_GBps):
    nodes = parse_topology(row["topology"])[0]
    plan = plan_of(row) if nodes > 1 else None
    if plan is None:
        return None
    shape = model_shape(row)
    intra, cross = bytes_per_layer(plan, shape)
    if plan.strategy == "usp" and plan.ulysses > row["gpus"] // nodes:
        cross, intra = cross + intra, 0  # its all-to-all spans machines
    return cross * shape.layers / (inter_GBps * 1e6)


def inter_GBps(probe: dict) -> float:
    # a floor must not overstate: divide by the best figure the probe saw
    return max(probe["inter_machine_GBps_per_gpu_per_direction"],
               probe["inter_machine_all_gather_GBps_per_gpu_in"])


def link_lines(probes: dict[str, dict]) -> list[str]:
    lines = ["Inter-machine links measured in this session, per topology (GB/s per GPU):", ""]
    for label, p in probes.items():
        how = (f"paced to {p['paced_inter_GBps']:g} GB/s over NVLink (benchmarks/paced_link.py)"
               if p.get("paced_inter_GBps") else "NCCL network transport between ranks with "
               "different NCCL_HOSTID")
        lines.append(f"- {label}: {p['inter_machine_GBps_per_gpu_per_direction']:.1f} send/recv, "
                     f"{p['inter_machine_all_gather_GBps_per_gpu_in']:.1f} all-gather; {how}")
    return lines + ["", "Comm floor = inter-machine bytes per step / the topology's best figure "
                    "above; the NCCL-socket link varies between runs (the probe is one sample of "
                    "it), so a run can beat it.", ""]


def per_layer_lines(rows) -> list[str]:
    """Where each run spent its GPU time per layer (benchmarks/kernel_breakdown.py)."""
    rows = [r for r in rows if r.get("per_layer")]
    if not rows:
        return []
    lines = ["## GPU time per transformer layer (ms), from one profiled run", "",
             "Communication kernels run until their data arrives (waiting included); exposed = "
             "the part with no attention or other compute running beside it. The rank with the "
             "most exposed communication is shown.", "",
             "| path | topology | size | strategy | attention | communication | exposed | other compute |",
             "|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["path"], r["model"], str(r["size"]), r["topology"], r["ms"])):
        b = r["per_layer"]
        lines.append(f"| {r['path']} | {r['topology']} | {size_label(r)} | {shown(r)} | {b['attention_ms_per_layer']:.3f} | "
                     f"{b['communication_ms_per_layer']:.3f} | {b['exposed_communication_ms_per_layer']:.3f} | "
                     f"{b['compute_ms_per_layer']:.3f} |")
    return lines + [""]


def main(folder):
    harness = json.load(open(os.path.join(folder, "harness.json")))
    probes = load_probes(folder)
    x_rows, x_one = xdit_rows(harness)
    harnesses = [harness]
    compiled_path = os.path.join(folder, "harness_compiled.json")
    if os.path.exists(compiled_path):  # --compile runs: compared with compiled runs only
        harnesses.append(json.load(open(compiled_path)))
        c_rows, c_one = xdit_rows(harnesses[-1])
        x_rows, x_one = x_rows + c_rows, {**x_one, **c_one}
    d_rows, d_one = diffusers_rows(folder)
    rank_compute = load_rank_compute(os.path.join(folder, "rank_compute.json"))
    lines = [f"# Harness run on {harness['device']} x {harness['gpus']}", "",
             "Real transformer configs (FLUX.1-dev; Wan 2.1 14B in the video rows), random bf16 "
             "weights.", ""] + link_lines(probes)
    for title, rows, one in (("xDiT runner: median denoising step (ms), after warm-up", x_rows, x_one),
                             ("diffusers: one transformer forward (ms), median of the job's repeats", d_rows, d_one)):
        lines += [f"## {title}", "",
                  "| topology | size | strategy | ms | vs 1 GPU | perfect scaling ms | compute floor ms | "
                  "comm floor ms | rel err vs 1 GPU |", "|---|---|---|---|---|---|---|---|---|"]
        for r in sorted(rows, key=lambda r: (r["model"], str(r["size"]), r["topology"], r["ms"])):
            probe = probes.get(r["topology"])
            floor = comm_floor_ms(r, inter_GBps(probe)) if probe else None
            compute = compute_floor_ms(r, rank_compute)
            base = r.get("one_gpu_ms") or one.get((r["model"], r["size"], r["compiled"]))
            lines.append(f"| {r['topology']} | {size_label(r)} | {shown(r)} | {r['ms']:.1f} | "
                         f"{_fmt(base and base / r['ms'], '.2f')} | {_fmt(base and base / r['gpus'], '.1f')} | "
                         f"{_fmt(compute, '.1f')} | {_fmt(floor, '.0f')} | {_fmt(r['rel_err'], '.1e')} |")
        lines += ["", "One GPU: " + ", ".join(f"{size_label(dict(model=k[0], size=k[1]))}{' compiled' * k[2]}"
                                           f"{f' ({k[3]} job)' if len(k) > 3 else ''} {t:.1f} ms"
                                           for k, t in sorted(one.items(), key=str)), ""]
    lines += per_layer_lines(x_rows + d_rows) + left_out_lines(harnesses)
    lines += ["## torus vs the best xDiT USP split (same run)", "",
              "| topology | size | best torus | torus ms | best USP | USP ms | speedup |",
              "|---|---|---|---|---|---|---|"]
    speedups = []
    for (topo, size, compiled) in sorted({(r["topology"], r["size"], r["compiled"]) for r in x_rows}):
        group = [r for r in x_rows if (r["topology"], r["size"], r["compiled"]) == (topo, size, compiled)]
        usps = [r for r in group if "usp" in r["strategy"]]
        toruses = [r for r in group if "torus" in r["strategy"]]
        if not (usps and toruses):  # a side failed or was skipped: nothing to compare
            continue
        usp, torus = min(usps, key=lambda r: r["ms"]), min(toruses, key=lambda r: r["ms"])
        label = f"{topo} {size}²{' compiled' * compiled}"
        speedups.append((label, usp["ms"] / torus["ms"]))
        lines.append(f"| {topo} | {size}²{' compiled' * compiled} | {torus['strategy']} | {torus['ms']:.1f} | {shown(usp)} | "
                     f"{usp['ms']:.1f} | {usp['ms'] / torus['ms']:.2f}x |")
    with open(os.path.join(folder, "report.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    plot(folder, x_rows + d_rows, speedups, harness["device"])
    print("\n".join(lines))


def _fmt(value, spec: str) -> str:
    """A number, or — where there is none (no reference, no floor); ratios end in x."""
    if value is None:
        return "—"
    return format(value, spec) + ("x" if spec == ".2f" else "")


def plot(folder, rows, speedups, device):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    configs = sorted({(r["path"], r["topology"], r["model"], str(r["size"])) for r in rows})
    if not configs:
        return
    fig, axes = plt.subplots(1, len(configs), figsize=(3.2 * len(configs), 4), squeeze=False)
    for ax, (path, topo, model, size) in zip(axes[0], configs):
        group = sorted((r for r in rows if (r["path"], r["topology"], r["model"], str(r["size"]))
                        == (path, topo, model, size)), key=lambda r: r["ms"])
        ax.barh([shown(r) for r in group], [r["ms"] for r in group],
                color=["tab:red" if "torus" in r["strategy"] else "tab:gray" for r in group])
        ax.set_title(f"{path} {topo} {size_label(group[0])}", fontsize=9)
        ax.set_xlabel("ms per step")
        ax.tick_params(labelsize=7)
    fig.suptitle(f"real configs, random weights, {device}", fontsize=10)
    fig.tight_layout()
    fig.savefig(os.path.join(folder, "latency.png"), dpi=110)
    if not speedups:
        return
    fig, ax = plt.subplots(figsize=(4, 3))
    ax.bar([s[0] for s in speedups], [s[1] for s in speedups], color="tab:red")
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_ylabel("best USP ms / torus ms")
    ax.set_title(f"xDiT runner, {device}", fontsize=9)
    fig.tight_layout()
    fig.savefig(os.path.join(folder, "speedup.png"), dpi=110)


if __name__ == "__main__":
    main(sys.argv[1])
