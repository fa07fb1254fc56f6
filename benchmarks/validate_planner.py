"""Planner check: predicted vs measured step latency for every harness configuration.

    python benchmarks/validate_planner.py benchmarks/results/h200x2 [--rank-compute FILE]

Hardware numbers come from the same session's measurements only: GEMM and
attention throughput fitted to the one-GPU times at 1024^2 and 2048^2, the
intra-machine all-to-all bandwidth, and the inter-machine bandwidths from the
link probe. Where one rank's compute per grid was measured
(``rank_compute.py``: the folder's own ``rank_compute.json``, or the file
given) a second prediction uses it in place of the fitted GEMM + attention
throughput, and both are reported. Writes ``planner_validation.json`` and
``.md`` beside them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os

from harness import parse_topology, timed_per_step
from swiftfusion_xdit.planner import (H200, Hardware, MeasuredCompute, ModelShape, Plan, as_run_with, predict,
                                      rank_plans)
from swiftfusion_xdit.tiny import FLUX_DEV_TRANSFORMER

# harness names -> the plan they run (topology "MxG": M machines of G GPUs)
DIFFUSERS = {"torus-nccl": "torus", "torus-nvshmem": "torus", "diffusers-ulysses": "ulysses",
             "diffusers-ring": "ring"}


def plan_for(kind: str, name: str, gpus: int, nodes: int, shape: ModelShape) -> Plan | None:
    per = gpus // nodes
    if kind == "torus":
        from swiftfusion_xdit.torus_attention import choose_exchange
        return Plan("torus", per, nodes, choose_exchange(shape.heads, per, nodes))
    if kind == "ulysses":
        return Plan("usp", gpus, 1)
    if kind == "ring":
        return Plan("usp", 1, gpus)
    if name.startswith("xdit-usp-u"):
        u, r = name[len("xdit-usp-u"):].split("r")
        return Plan("usp", int(u), int(r))
    if name.startswith("xdit-pipefusion"):  # -N, -N-pPATCHES, or -N-uUrR (USP inside stages: no plan)
        parts = name.split("-")
        return None if len(parts) > 3 and parts[3].startswith("u") else Plan("pipefusion", 1, gpus)
    return None


def load(folder):
    """The folder's FLUX.1-dev diffusers checks (eager) merged per topology, its link
    probes per topology, and the harness rows."""
    read = lambda n: json.load(open(os.path.join(folder, n)))
    flux = {}
    for name in sorted(os.listdir(folder)):
        if not (name.startswith("flux_check_") and name.endswith(".json")):
            continue
        result = read(name)
        if result.get("compiled"):
            continue  # the model is fitted to eager runs
        topo = result.get("topology") or f"{result['nodes']}x{result['world'] // result['nodes']}"
        flux.setdefault(topo, {**result, "runs": []})["runs"] += result["runs"]
    return flux, load_probes(folder), read("harness.json")


def load_probes(folder) -> dict[str, dict]:
    """Topology label -> that topology's link probe from the same session."""
    return {name[len("probe_"):-len(".json")]: json.load(open(os.path.join(folder, name)))
            for name in sorted(os.listdir(folder)) if name.startswith("probe_") and name.endswith(".json")}


def load_rank_compute(path: str | None) -> dict:
    """(size, ulysses, across, exchange) -> one rank's measured eager compute for that grid,
    leaving out rows timed with the PyTorch merge for comparison (``--merge torch``); files
    from before the fused merge carry no ``merge`` and are taken as they are."""
    if path is None or not os.path.exists(path):
        return {}
    rows = json.load(open(path))["rows"]
    return {(r["size"], r["ulysses"], r["torus"], r["exchange"]):
            MeasuredCompute(r["ms"], r["attention_ms_per_layer"]) for r in rows
            if "ms" in r and not r["compiled"] and r.get("merge") != "torch"}


def measured_for(table: dict, size: int):
    """The planner's ``measured(plan)`` lookup at one size: USP's ring computes what
    torus ``kv`` computes (the same blocks); PipeFusion is not in the table."""
    def lookup(plan: Plan) -> MeasuredCompute | None:
        exchange = "kv" if plan.strategy == "usp" else plan.exchange
        return table.get((size, plan.ulysses, plan.across, exchange)) if plan.strategy != "pipefusion" else None
    return lookup


def grid(topo: str) -> tuple[int, int]:
    """Machines and GPUs per machine of a topology label (``2x2``, paced ``2x2p50``)."""
    return parse_topology(topo)[:2]


def load_onesided(folder, intra_GBps: float) -> dict:
    """The one-sided all-to-all's numbers from the folder's own ``alltoall_bench.py`` run:
    bandwidth as NCCL's intra-machine figure scaled by the two transports' bus-bandwidth ratio
    at the largest size, latency as its time per call at the smallest; {} where not run."""
    runs = sorted(n for n in os.listdir(folder) if n.startswith("alltoall_") and n.endswith("gpu.json"))
    if not runs:
        return {}
    sizes = json.load(open(os.path.join(folder, runs[-1])))["sizes"]
    big, small = sizes[-1], sizes[0]
    return {"onesided_GBps": intra_GBps * big["nvshmem_busbw_GBps"] / big["nccl_busbw_GBps"],
            "onesided_latency_us": small["nvshmem_ms"] * 1e3}


def hardware_per_topology(flux, probes, shape, folder=None) -> dict[str, Hardware]:
    """GEMM and attention throughput from the one-GPU times, the intra-machine all-to-all
    from a one-machine run, and each multi-machine topology's link: as its diffusers check
    measured it in the same process (``links``, newer runs), else its own link probe."""
    single = [r for t, r in flux.items() if t.startswith("1x")]
    one_gpu = {}  # each job measures its own one-GPU reference: a one-machine job's first
    for result in single + [r for t, r in flux.items() if not t.startswith("1x")]:
        for run in result["runs"]:
            one_gpu.setdefault(run["size"], run["one_gpu_ms"])
    intra = single[0]["world_all_to_all_busbw_GBps_64MiB"] if single else H200.intra_GBps
    base = Hardware.from_measurements({shape(s): t for s, t in one_gpu.items()}, intra_GBps=intra,
                                      inter_GBps=H200.inter_GBps)
    base = dataclasses.replace(base, **(load_onesided(folder, intra) if folder else {}))
    hw = {"base": base}  # topologies with neither a check nor a probe (xDiT-only runs)
    for topo in set(flux) | set(probes):
        links = flux.get(topo, {}).get("links", {})
        probe = links if "inter_machine_GBps_per_gpu_per_direction" in links else probes.get(topo)
        hw[topo] = base if probe is None else dataclasses.replace(
            base, inter_GBps=probe["inter_machine_GBps_per_gpu_per_direction"],
            inter_collective_GBps=probe["inter_machine_all_gather_GBps_per_gpu_in"])
    return hw


def main(folder: str, rank_compute: str | None = None):
    flux, probes, harness = load(folder)
    own = os.path.join(folder, "rank_compute.json")
    rank_compute = own if os.path.exists(own) else rank_compute
    table = load_rank_compute(rank_compute)
    shape = lambda size, joint=False: ModelShape.flux(FLUX_DEV_TRANSFORMER, size, size,
                                                       text_in_exchange=not joint)
    hws = hardware_per_topology(flux, probes, shape, folder)
    rows = []
    for topo, result in flux.items():
        nodes, per = grid(topo)
        for run in result["runs"]:
            kind = DIFFUSERS.get(run["strategy"])
            if kind is None:
                continue
            s = shape(run["size"])
            plan = plan_for(kind, run["strategy"], nodes * per, nodes, s)
            hw = as_run_with(hws.get(topo, hws["base"]), _comm(run["strategy"]), nodes)
            rows.append(_row("diffusers", run["strategy"], topo, run["size"], predict(plan, s, hw, per),
                             run["parallel_ms"], _with_measured(plan, s, hw, per, table, run["size"])))
    for row in harness["rows"]:
        if (row["kind"] != "xdit" or "result" not in row or row["result"]["world"] == 1
                or not timed_per_step(row["result"])):
            continue
        r = row["result"]
        name, topo = row["name"].split()[:2]
        nodes, per = grid(topo)
        s = shape(r["height"], joint=True)
        kind = "torus" if name.startswith("xdit-torus") else ""
        plan = plan_for(kind, name, nodes * per, nodes, s)
        if plan is None:  # PipeFusion with USP inside its stages: not modelled
            continue
        hw = as_run_with(hws.get(topo, hws["base"]), _comm(name), nodes)
        rows.append(_row("xdit", name, topo, r["height"], predict(plan, s, hw, per), r["median_step_ms"],
                         _with_measured(plan, s, hw, per, table, r["height"])))
    choices = []
    for (path, topo, size) in sorted({(r["path"], r["topology"], r["size"]) for r in rows}):
        nodes, per = grid(topo)
        auto = as_run_with(hws.get(topo, hws["base"]), "auto", nodes)  # what strategy="auto" runs with
        best = rank_plans(shape(size, joint=path == "xdit"), auto, nodes, per,
                          measured=measured_for(table, size))[0].plan.describe()
        picked_comm = "nvshmem" if auto.onesided_GBps else "nccl"  # the transport the pick would run on
        measured, every = {}, {}  # plan -> the run auto would make; plan -> its best run
        for r in rows:
            if (r["path"], r["topology"], r["size"]) == (path, topo, size) and r["exact"]:
                every[r["plan"]] = min(every.get(r["plan"], float("inf")), r["measured_ms"])
                if not r["plan"].startswith("torus") or _comm(r["run"]) == picked_comm:
                    measured[r["plan"]] = min(measured.get(r["plan"], float("inf")), r["measured_ms"])
        if best in measured:
            choices.append({"path": path, "topology": topo, "size": size, "chosen": best,
                            "chosen_measured_ms": measured[best],
                            "best_measured": min(every, key=every.get),
                            "best_measured_ms": min(every.values()),
                            "within_5pct": measured[best] <= 1.05 * min(every.values())})
    out = {"device": f"{harness['device']} x {harness['gpus']}",
           "hardware": {t: h.__dict__ for t, h in sorted(hws.items()) if t != "base"}, "rows": rows, "choices": choices,
           "within_20pct": sum(r["within_20pct"] for r in rows), "configs": len(rows),
           "rank_compute": rank_compute if table else None, "rank_compute_same_session": rank_compute == own,
           "within_20pct_measured_compute": sum(r.get("within_20pct_measured", False) for r in rows),
           "configs_measured_compute": sum("predicted_measured_ms" in r for r in rows)}
    with open(os.path.join(folder, "planner_validation.json"), "w") as f:
        json.dump(out, f, indent=2)
    with open(os.path.join(folder, "planner_validation.md"), "w") as f:
        f.write(_markdown(out))
    print(_markdown(out))


def _comm(run: str) -> str:
    """The transport a harness run's torus used (other runs: NCCL, or diffusers' own)."""
    return "nvshmem" if run.endswith("nvshmem") else "nccl"


def _with_measured(plan, shape, hw, per, table, size):
    """The prediction with this grid's measured rank compute, or None where not measured."""
    compute = measured_for(table, size)(plan)
    return None if compute is None else predict(plan, shape, hw, per, compute)


def _row(path, name, topo, size, pred, measured, pred_measured=None):
    err = pred.step_ms / measured - 1
    row = {"path": path, "run": name, "topology": topo, "size": size, "plan": pred.plan.describe(),
           "exact": pred.exact, "predicted_ms": round(pred.step_ms, 1),
           "measured_ms": round(measured, 1), "error": round(err, 3),
           "within_20pct": abs(err) <= 0.2}
    if pred_measured is not None:
        err = pred_measured.step_ms / measured - 1
        row.update(predicted_measured_ms=round(pred_measured.step_ms, 1), error_measured=round(err, 3),
                   within_20pct_measured=abs(err) <= 0.2)
    return row


def _markdown(out) -> str:
    lines = [f"# Planner vs measured, {out['device']}", "", "Hardware fitted from this session, "
             "per topology (inter-machine links from that topology's probe):", ""]
    for topo, hw in out["hardware"].items():
        inter = (f", inter {hw['inter_GBps']:.1f} GB/s (send/recv), "
                 f"{hw['inter_collective_GBps']:.1f} GB/s (all-gather)" if not topo.startswith("1x") else "")
        lines.append(f"- {topo}: GEMM {hw['gemm_tflops']:.0f} TFLOP/s, attention "
                     f"{hw['attention_tflops']:.0f} TFLOP/s, intra {hw['intra_GBps']:.0f} GB/s{inter}, "
                     f"{hw['latency_us']:.0f} us per collective")
    lines += ["", f"Within 20%: {out['within_20pct']} of {out['configs']} configurations (fitted compute)."]
    if out.get("rank_compute"):
        apart = "" if out["rank_compute_same_session"] else ", measured in another session on the same GPU model"
        lines += [f"With one rank's measured compute (`{out['rank_compute']}`{apart}): "
                  f"{out['within_20pct_measured_compute']} of {out['configs_measured_compute']}."]
    lines += ["", "| path | run | topology | size | plan | predicted ms | measured ms | error | "
              "predicted ms, measured compute | error |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in out["rows"]:
        with_measured = (f"{r['predicted_measured_ms']} | {r['error_measured']:+.0%}"
                         if "predicted_measured_ms" in r else "- | -")
        lines.append(f"| {r['path']} | {r['run']} | {r['topology']} | {r['size']} | {r['plan']} | "
                     f"{r['predicted_ms']} | {r['measured_ms']} | {r['error']:+.0%} | {with_measured} |")
    lines += ["", "| path | topology | size | planner chose | its measured ms | best measured | "
              "best ms | within 5% |", "|---|---|---|---|---|---|---|---|"]
    for c in out["choices"]:
        lines.append(f"| {c['path']} | {c['topology']} | {c['size']} | {c['chosen']} | "
                     f"{c['chosen_measured_ms']} | {c['best_measured']} | {c['best_measured_ms']} | "
                     f"{'yes' if c['within_5pct'] else 'no'} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("folder")
    ap.add_argument("--rank-compute", help="rank_compute.json from another session (labelled as such)")
    args = ap.parse_args()
    main(args.folder, args.rank_compute)
