"""Join ab_builds.sh's two builds into one table: ab.md, ab.json and ab.png in its folder.

    python benchmarks/tools/ab_table.py FOLDER [--plot-only]   (--plot-only: redraw ab.png from ab.json)
"""

import json
import os
import sys

sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # benchmarks/: accuracy


def load(path: str):
    return json.load(open(path)) if os.path.exists(path) else None


def rank_rows(folder: str, build: str) -> dict:
    """The build's rows per (size, grid, exchange); where ab_builds.sh ran it twice (ABBA order:
    old, new, new2, old2, so drift during the call cancels) the two runs' mean."""
    runs = []
    for run in (build, build + "2"):
        result = load(os.path.join(folder, f"rank_compute_{run}", "rank_compute.json")) or {"rows": []}
        runs.append({(r.get("size", 1024), r["grid"], r["exchange"]): r for r in result["rows"] if "ms" in r})
    timed = ("ms", "attention_ms_per_layer", "other_ms_per_layer")
    rows = {}
    for key in runs[0].keys() | runs[1].keys():  # a run that failed leaves the other's rows
        both = [run[key] for run in runs if key in run]
        rows[key] = {**both[0], **{k: sum(r[k] for r in both) / len(both) for k in timed}}
    return rows


def gpu_ms_per_layer(row: dict) -> float:
    return row["attention_ms_per_layer"] + row["other_ms_per_layer"]


def xdit_result(folder: str, label: str):
    """The runner's result.json, else the last JSON line of its log (the device call may
    not bring every file back)."""
    result = load(os.path.join(folder, f"xdit_{label}", "result.json"))
    log = os.path.join(folder, f"xdit_{label}.log")
    if result is None and os.path.exists(log):
        lines = [l for l in open(log) if l.startswith('{"device"')]
        result = json.loads(lines[-1]) if lines else None
    return result


def latents_rel_err(folder: str, label: str):
    """Relative error of a run's final latents against USP's, where both came back."""
    paths = [os.path.join(folder, f"xdit_{name}", "latents.pt") for name in (label, "usp")]
    if not all(os.path.exists(p) for p in paths):
        return None
    import torch
    from accuracy import rel_err
    run, usp = (torch.load(p, map_location="cpu") for p in paths)
    return rel_err(run, usp)


def main(folder: str) -> None:
    old, new = rank_rows(folder, "old"), rank_rows(folder, "new")
    xdit = {label: xdit_result(folder, label) for label in ("torus_old", "torus_new", "usp")}
    device = next((r["device"] for r in xdit.values() if r), None) or \
        (load(os.path.join(folder, "rank_compute_new", "rank_compute.json")) or {}).get("device")
    lines = [f"# Two builds side by side, {device}", "",
             "Same GPU, same device call, each build in its own processes (run old, new, new, old "
             "where the folder holds the repeats: their means). One rank's eager "
             "FLUX.1-dev forward (`rank_compute.py`): GPU time per layer from the "
             "profiler (attention + other kernels; attention alone beside it), and the wall time "
             "per forward, which small "
             "shards leave bound by the host's launches (so it jitters between processes). "
             "new / old < 1 is faster.", "",
             "| size | grid (MxG) | exchange | old GPU ms/layer | new GPU ms/layer | new / old | "
             "old attention ms/layer | new attention ms/layer | old wall ms | new wall ms |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for key in sorted(set(old) & set(new)):
        a, b = gpu_ms_per_layer(old[key]), gpu_ms_per_layer(new[key])
        lines.append(f"| {key[0]}² | {key[1]} | {key[2]} | {a:.3f} | {b:.3f} | {b / a:.3f} | "
                     f"{old[key]['attention_ms_per_layer']:.3f} | "
                     f"{new[key]['attention_ms_per_layer']:.3f} | "
                     f"{old[key]['ms']:.1f} | {new[key]['ms']:.1f} |")
    errs = {label: latents_rel_err(folder, label) for label in xdit}
    lines += ["", "xDiT's runner at one rank, 1024², median step ms (`xdit_random_flux.py`), and "
              "each run's final latents against USP's (relative error; - where absent):", "",
              "| run | ms per step | latents vs usp |", "|---|---|---|"]
    for label, r in xdit.items():
        err = "-" if errs[label] is None else f"{errs[label]:.1e}"
        lines.append(f"| {label} | {r['median_step_ms']:.1f} | {err} |" if r else f"| {label} | failed | - |")
    with open(os.path.join(folder, "ab.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    rows = [dict(size=k[0], grid=k[1], exchange=k[2], old_ms=old[k]["ms"], new_ms=new[k]["ms"],
                 old_gpu_ms_per_layer=gpu_ms_per_layer(old[k]),
                 new_gpu_ms_per_layer=gpu_ms_per_layer(new[k]),
                 old_attention_ms_per_layer=old[k]["attention_ms_per_layer"],
                 new_attention_ms_per_layer=new[k]["attention_ms_per_layer"])
            for k in sorted(set(old) & set(new))]
    with open(os.path.join(folder, "ab.json"), "w") as f:
        json.dump(dict(device=device, rank_compute=rows,
                       xdit={k: v and v["median_step_ms"] for k, v in xdit.items()},
                       xdit_latents_rel_err_vs_usp=errs), f, indent=2)
    print("\n".join(lines))
    plot(folder)


def plot(folder: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ab = json.load(open(os.path.join(folder, "ab.json")))
    rows = ab["rank_compute"]
    labels = [f"{r.get('size', 1024)} {r['grid']} {r['exchange']}" for r in rows]
    ratios = [r["new_gpu_ms_per_layer"] / r["old_gpu_ms_per_layer"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 3))
    ax.bar(labels, ratios, color="tab:red")
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_ylim(min(ratios + [1.0]) - 0.03, max(ratios + [1.0]) + 0.02)
    ax.set_ylabel("new / old GPU ms per layer")
    ax.set_title(f"one rank's FLUX.1-dev forward, {ab['device']}", fontsize=9)
    ax.tick_params(axis="x", labelsize=7, rotation=45)
    fig.tight_layout()
    fig.savefig(os.path.join(folder, "ab.png"), dpi=110)


if __name__ == "__main__":
    plot(sys.argv[1]) if "--plot-only" in sys.argv else main(sys.argv[1])
