"""Side-by-side benchmark: torus vs xDiT USP, PipeFusion and diffusers CP.

    python benchmarks/harness.py --gpus 4 --topologies 1x4,2x2,4x1 --out benchmarks/results/h200x4

One session, the same GPUs, the same inputs (FLUX.1-dev's real configs,
random bf16 weights). Each configuration is its own torchrun job:

* ``xdit``: xDiT's runner (``benchmarks/xdit_random_flux.py``) for a one-GPU
  reference, every (ulysses, ring) split of USP, PipeFusion, and
  ``--sp-strategy torus``; median denoising-step latency after warm-up and
  the final latents, compared with the one-GPU latents.
* ``diffusers``: one forward of the transformer (= one step without CFG)
  with diffusers' native context parallelism (ulysses, ring, unified) and
  with torus over NCCL and NVSHMEM (``benchmarks/flux_device_check.py``;
  across machines NVSHMEM serves the all-to-all inside each machine only,
  so both emulated networks still carry all inter-machine traffic).
* ``video``: the same for Wan 2.1 14B text-to-video (``--video-sizes``,
  frames x height x width; 81x720x1280 = 75,600 video tokens by default, 12.2 s per
  forward on one H200, `results/video720_h200/`).
* ``probe``: per topology, the link bandwidths measured in the same session
  (``benchmarks/link_probe.py``); multi-machine rows state them.

Machines are emulated on one host in two ways. ``2x2``: ``NCCL_HOSTID`` per
rank, so NCCL's network transport joins the "machines" (a few GB/s per GPU:
a slow network). ``2x2p50``: NVLink, with every inter-machine
torch.distributed call paced to 50 GB/s per GPU (``benchmarks/paced_link.py``:
a fast network; eager only). ``--paced-gbps 50`` adds the paced twin of every
multi-machine topology. Writes one JSON per job and ``harness.json``;
``benchmarks/report.py`` turns that into the Markdown table and the plots.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time

import torch

from accuracy import rel_err

HERE = os.path.dirname(os.path.abspath(__file__))


def torchrun(nproc: int, script: str, args: list[str], log_path: str, timeout: int,
             env: dict | None = None) -> int:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
           "--master-port=29533", os.path.join(HERE, script), *args]
    with open(log_path, "w") as log:
        launcher = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                    env={**os.environ, **(env or {})})
        try:
            return launcher.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            # SIGTERM, not SIGKILL: torchrun's agent then stops its workers, which run in
            # sessions of their own and would otherwise keep the GPUs busy for later jobs
            launcher.terminate()
            try:
                launcher.wait(timeout=60)
            except subprocess.TimeoutExpired:
                launcher.kill()
                launcher.wait()
            return 124


def _xdit_common(nodes: int, size: int, steps: int, compile_: bool) -> list[str]:
    common = ["--model", "FLUX.1-dev-random", "--height", str(size), "--width", str(size),
              "--num_inference_steps", str(steps), "--prompt", "a photo of a cat", "--seed", "42"]
    if nodes > 1:
        common += ["--emulate-nodes", str(nodes)]
    if compile_:
        common += ["--use_torch_compile"]  # xDiT's own compile path, for every strategy
    return common


def pipefusion_jobs(gpus: int, nodes: int, size: int, steps: int, compile_: bool = False):
    """(name, nproc, args): PipeFusion over every GPU with its patch count swept (xfuser's
    default, one patch per stage, runs in the xdit suite), and PipeFusion with a USP split
    inside each stage where fewer stages than GPUs leave one (xfuser composes the two)."""
    if gpus < 2:
        return []
    common = _xdit_common(nodes, size, steps, compile_)
    jobs = [(f"xdit-pipefusion-{gpus}-p{patches}", gpus,
             common + ["--pipefusion_parallel_degree", str(gpus), "--num_pipeline_patch", str(patches)])
            for patches in (2 * gpus, 4 * gpus)]
    for stages in (d for d in range(2, gpus) if gpus % d == 0):
        sp = gpus // stages
        for ulysses in (d for d in range(1, sp + 1) if sp % d == 0):
            jobs.append((f"xdit-pipefusion-{stages}-u{ulysses}r{sp // ulysses}", gpus,
                         common + ["--pipefusion_parallel_degree", str(stages), "--ulysses_degree",
                                   str(ulysses), "--ring_degree", str(sp // ulysses)]))
    return jobs


def xdit_jobs(gpus: int, nodes: int, size: int, steps: int, compile_: bool = False):
    """(name, nproc, args) for every xDiT configuration on this topology."""
    common = _xdit_common(nodes, size, steps, compile_)
    jobs = []
    for ulysses in (d for d in range(1, gpus + 1) if gpus % d == 0):
        ring = gpus // ulysses
        jobs.append((f"xdit-usp-u{ulysses}r{ring}", gpus,
                     common + ["--ulysses_degree", str(ulysses), "--ring_degree", str(ring)]))
    jobs.append((f"xdit-pipefusion-{gpus}", gpus, common + ["--pipefusion_parallel_degree", str(gpus)]))
    for comm in ("nccl", "nvshmem"):  # nvshmem across machines: inside each machine only
        jobs.append((f"xdit-torus-{comm}", gpus, common + ["--sp-strategy", "torus", "--sp-comm", comm]))
    return jobs


def parse_topology(label: str) -> tuple[int, int, float | None]:
    """``2x2`` -> (2 machines, 2 GPUs each, NCCL sockets); ``2x2p50`` -> paced at 50 GB/s."""
    shape, _, paced = label.partition("p")
    try:
        nodes, per = map(int, shape.split("x"))
        return nodes, per, float(paced) if paced else None
    except ValueError:
        raise ValueError(f"topology {label!r}: write MACHINESxGPUS, e.g. 2x2, or 2x2p50 for a "
                         "link paced to 50 GB/s per GPU") from None


def paced_env(nodes: int, gbps: float | None) -> dict:
    return {"SWIFTFUSION_PACED_GBPS": str(gbps), "SWIFTFUSION_PACED_NODES": str(nodes)} if gbps else {}


def timed_per_step(result: dict) -> bool:
    """Whether an xDiT row's times are per denoising step. Runs before the fix timed each
    PipeFusion patch (xfuser calls back once per patch) and carry no "timed" mark."""
    return result.get("timed") == "per denoising step" or result.get("pipefusion_parallel_degree", 1) == 1


class Progress:
    def __init__(self, total: int):
        self.total, self.done, self.start = total, 0, time.time()

    def show(self, name: str, note: str):
        self.done += 1
        print(f"[{self.done}/{self.total} {time.time() - self.start:5.0f}s] {name}: {note}", flush=True)


HEADS = {"flux-dev": 24, "wan2.1-14b": 40}
REFERENCE = "xdit 1 GPU "  # + size: the reference job's name


def head_chunks(heads: int, gpus: int) -> int | None:
    """The fewest head chunks (> 1) that split each of ``gpus`` ranks' heads evenly: the
    one-machine torus variant whose all-to-all overlaps attention (None: one head each)."""
    per_rank = heads // gpus
    return next((c for c in range(2, per_rank + 1) if per_rank % c == 0), None)


def build_plan(args, g: int) -> tuple[list[str], list[tuple]]:
    """Topology labels and the jobs: (kind, name, nproc, script, args, result path, env)."""
    labels = (args.topologies or f"1x{g},2x{g // 2}").split(",")
    if args.paced_gbps:
        labels += [f"{t}p{args.paced_gbps:g}" for t in labels if parse_topology(t)[0] > 1 and "p" not in t]
    labels = list(dict.fromkeys(labels))  # a topology named twice runs once
    if args.compile:  # the paced link wraps Python calls that dynamo traces past
        skipped = [t for t in labels if parse_topology(t)[2]]
        labels = [t for t in labels if not parse_topology(t)[2]]
        if skipped:
            print(f"compiled runs skip the paced topologies {skipped} (eager only)", flush=True)
    topologies = [(t, *parse_topology(t)) for t in labels]
    wrong = [t for t, nodes, per, _ in topologies if nodes * per != g]
    if wrong:
        raise SystemExit(f"topologies {wrong} do not use the {g} GPUs of --gpus {g}; "
                         f"write MACHINESxGPUS with a product of {g}")
    suites = args.suites.split(",")
    sizes = [int(s) for s in args.sizes.split(",")]

    plan = []
    for topo, nodes, per, gbps in topologies:
        if "probe" in suites and nodes > 1:
            out = os.path.join(args.out, f"probe_{topo}.json")
            plan.append(("probe", f"probe {topo}", g, "link_probe.py", ["--nodes", str(nodes), "--out", out],
                         out, paced_env(nodes, gbps)))
    xdit_suites = [jobs for suite, jobs in (("xdit", xdit_jobs), ("pipefusion", pipefusion_jobs)) if suite in suites]
    for size in sizes if xdit_suites else []:
        tag = "_compiled" if args.compile else ""
        ref_dir = os.path.join(args.out, f"xdit_{size}_1gpu{tag}")
        ref_args = xdit_jobs(1, 1, size, args.steps, args.compile)[0][2]
        plan.append(("xdit", f"{REFERENCE}{size}", 1, "xdit_random_flux.py",
                     ref_args + ["--output_directory", ref_dir], ref_dir, {}))
        for topo, nodes, per, gbps in topologies:
            every = [job for jobs in xdit_suites for job in jobs(g, nodes, size, args.steps, args.compile)]
            for name, nproc, job_args in every:
                run_dir = os.path.join(args.out, f"xdit_{size}_{topo}_{name}{tag}")
                plan.append(("xdit", f"{name} {topo} {size}", nproc, "xdit_random_flux.py",
                             job_args + ["--output_directory", run_dir], run_dir, paced_env(nodes, gbps)))
    strategies = ["torus-nccl", "torus-nvshmem"]
    strategies += ["diffusers-ulysses", "diffusers-ring"] if g >= 2 else []  # diffusers refuses degree 1
    strategies += ["diffusers-unified"] if g >= 4 else []
    models = [("diffusers", "flux-dev", args.diffusers_sizes, 5), ("video", "wan2.1-14b", args.video_sizes, 3)]
    for suite, model, model_sizes, repeats in models:
        if suite not in suites:
            continue
        stem = "flux_check" if model == "flux-dev" else f"{model}_check"
        for topo, nodes, per, gbps in topologies:
            run = strategies  # torus-nvshmem across machines: NVSHMEM inside each, NCCL between
            chunks = head_chunks(HEADS[model], per) if nodes == 1 and per > 1 else None
            run = run + [f"torus-nccl+hc{chunks}"] if chunks else run
            plan.append(("diffusers", f"{suite} {topo}", g, "flux_device_check.py",
                         ["--model", model, "--nodes", str(nodes), "--label", topo, "--sizes", model_sizes,
                          "--strategies", ",".join(run), "--repeats", str(repeats), "--out", args.out]
                         + (["--compile", "--compile-mode", args.compile_mode] if args.compile else []),
                         os.path.join(args.out, f"{stem}_{topo}_nccl{'_compiled' * args.compile}.json"),
                         paced_env(nodes, gbps)))

    return labels, plan


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gpus", type=int, default=torch.cuda.device_count())
    ap.add_argument("--topologies", default=None,
                    help="machines x GPUs, e.g. 1x4,2x2,2x2p50 (default: 1xN, 2x(N/2)); pNN: paced link")
    ap.add_argument("--paced-gbps", type=float, default=None,
                    help="also run every multi-machine topology over a link paced to this GB/s per GPU")
    ap.add_argument("--suites", default="probe,xdit,diffusers",
                    help="any of probe, xdit, pipefusion (patch sweep, PipeFusion + USP), diffusers, video")
    ap.add_argument("--sizes", default="1024")
    ap.add_argument("--diffusers-sizes", default="1024,2048")
    ap.add_argument("--video-sizes", default="81x720x1280",
                    help="Wan 2.1 14B: FRAMESxHEIGHTxWIDTH,... (720p x 81: 75,600 tokens, fits one H200)")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--timeout", type=int, default=300)
    ap.add_argument("--compile", action="store_true",
                    help="compiled runs: xfuser's --use_torch_compile, torch.compile on the diffusers path")
    ap.add_argument("--compile-mode", default="default",
                    help="torch.compile mode on the diffusers path (reduce-overhead: CUDA graphs); one per folder")
    ap.add_argument("--append", action="store_true",
                    help="add to the folder's harness.json (device calls are capped at 10 minutes: "
                         "run a few topologies per call; the one-GPU reference is reused)")
    ap.add_argument("--deadline", type=float, default=None,
                    help="seconds: skip jobs that could not end by then (the longest job so far "
                         "as the estimate), still writing harness.json; --append runs them later")
    ap.add_argument("--dry-run", action="store_true", help="list the jobs (to split a session's calls) and exit")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    g = args.gpus
    labels, plan = build_plan(args, g)
    if args.dry_run:
        for kind, name, nproc, script, job_args, _, env in plan:
            print(f"{name}: torchrun -n {nproc} {script} {' '.join(job_args)} {env or ''}")
        return
    os.makedirs(args.out, exist_ok=True)
    _refuse_earlier_results(args.out, args.append)
    summary_path = os.path.join(args.out, f"harness{'_compiled' * args.compile}.json")
    earlier = json.load(open(summary_path)) if args.append and os.path.exists(summary_path) else None
    refs: dict[int, torch.Tensor] = {}
    if earlier:
        plan = [job for job in plan if not _reusable_reference(job, earlier, refs)]
    progress, rows, longest = Progress(len(plan)), [], 0.0
    for kind, name, nproc, script, job_args, result_path, env in plan:
        if args.deadline and time.time() - progress.start + (longest or args.timeout) > args.deadline:
            rows.append({"kind": kind, "name": name, "rc": None, "skipped": "deadline"})
            progress.show(name, "skipped: would end past --deadline (run it with --append)")
            continue
        log_path = (result_path.rstrip("/") if kind != "xdit" else result_path) + ".log"
        began = time.time()
        rc = torchrun(nproc, script, job_args, log_path, args.timeout, env)
        longest = max(longest, time.time() - began)
        row = {"kind": kind, "name": name, "rc": rc, "log": os.path.basename(log_path),
               "host": socket.gethostname()}
        result_file = os.path.join(result_path, "result.json") if kind == "xdit" else result_path
        if rc == 0 and os.path.exists(result_file):
            with open(result_file) as f:
                row["result"] = json.load(f)
            if kind == "xdit":
                latents = torch.load(os.path.join(result_path, "latents.pt"))
                size = row["result"]["height"]
                if is_reference(name):  # not the 1x1 topology's jobs, though they run on one GPU too
                    refs[size] = latents
                row["rel_err_vs_1gpu"] = rel_err(latents, refs[size]) if size in refs else None
                if row["result"]["world"] > 1:  # the error is what we keep; the reference stays for --append
                    os.remove(os.path.join(result_path, "latents.pt"))
        rows.append(row)
        note = "FAILED (see log)" if rc else _summary(row)
        progress.show(name, note)
    if earlier:  # a row run now replaces the earlier one; a skipped one never does
        ran = {row["name"] for row in rows if not row.get("skipped")}
        kept = [row for row in earlier["rows"] if row["name"] not in ran]
        rows = kept + [row for row in rows if not (row.get("skipped") and row["name"] in
                                                    {r["name"] for r in kept})]
        labels = earlier["topologies"] + [t for t in labels if t not in earlier["topologies"]]
    with open(summary_path, "w") as f:
        json.dump({"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                   "gpus": g, "topologies": labels,
                   "steps": args.steps, "compiled": args.compile, "rows": rows}, f, indent=2)


def _refuse_earlier_results(folder: str, append: bool) -> None:
    """The report and the planner check read every result file in the folder: a new run
    into a folder holding another run's files would mix the two under one title."""
    earlier = [n for n in os.listdir(folder)
               if n.startswith(("harness", "flux_check_", "wan2.1-14b_check_", "probe_", "xdit_"))]
    if earlier and not append:
        raise SystemExit(f"{folder} holds results of an earlier run ({', '.join(sorted(earlier)[:3])}, ...): "
                         "pass --append to add to that run, or give a new folder")


def is_reference(job_name: str) -> bool:
    """The unparallelised xDiT run every other xDiT run of its size is compared with."""
    return job_name.startswith(REFERENCE)


def _reusable_reference(job, earlier: dict, refs: dict) -> bool:
    """A one-GPU reference that an earlier call of this folder already ran (latents kept)."""
    kind, name, _, _, _, result_path, _ = job
    done = any(row["name"] == name and row["rc"] == 0 for row in earlier["rows"])
    latents = os.path.join(result_path, "latents.pt")
    if kind != "xdit" or not is_reference(name) or not done or not os.path.exists(latents):
        return False
    with open(os.path.join(result_path, "result.json")) as f:
        refs[json.load(f)["height"]] = torch.load(latents)
    return True


def _summary(row) -> str:
    r = row.get("result", {})
    if row["kind"] == "xdit":
        err = row.get("rel_err_vs_1gpu")
        return (f"{r.get('median_step_ms', float('nan')):.1f} ms/step, rel err "
                + ("— (no one-GPU reference)" if err is None else f"{err:.2e}"))
    if row["kind"] == "probe":
        return ", ".join(f"{k}={v:.1f}" for k, v in r.items() if "GBps" in k)
    return f"{len(r.get('runs', []))} runs"


if __name__ == "__main__":
    main()
