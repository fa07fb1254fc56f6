"""One rank's step time of a diffusion transformer under each SP strategy, on an emulated cluster.

One process plays rank 0 of a P = machines x GPUs job (``swiftfusion_xdit.emulator``): the
transformer runs for real on this device on that rank's shard, and every collective takes its
modeled time on FIFO link streams (inside a machine: NCCL all-to-all measured on H200s; between
machines: a 400G or 100G NIC per GPU). In an SPMD step every rank does the same work, so this
rank's step is the job's. One row per (cluster, link, strategy):

* step ms: median of ``--repeats`` forwards after warm-up, the strategies of a cluster timed in
  turn, one forward each per round, so drift falls on all alike (CUDA events; on CPU this
  rank's clock: wall time plus what it waited on modeled links);
* compute-only ms: the same parallel model with instantaneous links (compute, layout copies,
  host time, the emulator's own 150-240 us per call on an H200); exposed = step - compute-only;
* inter / intra busy ms: modeled time the busier direction of each link class was in use in
  one forward (``Cluster.transfers``);
* floor ms: the fewest cross-machine bytes of the exact schemes we know, over the link's
  bandwidth, times the layers: heads scattered across N machines (``planner.bytes_per_layer``,
  torus a2a at U = GPUs, T = N, head divisibility waived) moves 4X(N-1)/N per GPU per layer and
  direction, X = tokens/P * hidden * dtype bytes; kv and ring move 2X(N-1) >= that. No latency;
* speedup (torus rows): the best USP-like row (usp, ulysses, ring, diffusers*) of the same
  cluster and link over the torus row.

Strategies: ``torus`` (a row for kv, and one for a2a where the heads split over U x T, else
for a2a-kv where they split over the machines), ``torus-kv``, ``torus-a2a``, ``torus-a2a-kv``, ``usp``, ``ulysses``, ``ring`` (``parallelize_transformer``);
``diffusers`` (diffusers' own context parallelism, ``enable_parallelism``, best USP split
inside a machine, cuDNN attention on GPU), ``diffusers-ulysses``, ``diffusers-ring``.
``NAME@uD`` fixes the Ulysses degree at D. The model is built once (parameters on the meta
device, then cheap random init) and each strategy gets a copy sharing its weights.

What it cannot see (the emulator's limits): NVSwitch and NIC contention, congestion,
stragglers and skew (every rank is this one), NCCL algorithm switches beyond the measured
table, the SMs a collective holds (a spin holds one thread block); NVSHMEM bypasses
torch.distributed, so torus runs over NCCL here. An emulated call costs more host time than
NCCL's (150-240 us on an H200), which weighs on call-heavy schedules (ring, a2a-kv) in eager
step ms; ``--modes graph`` captures each strategy's forward in a CUDA graph per link (a GPU
only), which takes every host cost, ours and the emulator's, out of the step.

On one H200, with the package installed (its ``kernels`` ship from ``kernels/``), FLUX.1-dev at
2048^2 in about 3 minutes (24 heads split over no U x T of 16 or 32 GPUs, so torus runs kv
there, on the layout usp runs: the comparison that differs is diffusers' own)::

    python benchmarks/emulated_cluster.py --model flux-dev --size 2048 --clusters 2x8,4x8 \
        --links 400G,100G --strategies torus,usp,ring,diffusers --repeats 5 --deadline 420 \
        --out benchmarks/results/emulated_cluster_flux2048
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import gc
import json
import os
import statistics
import sys
import time
import warnings
from unittest import mock

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol

from swiftfusion_xdit import diffusers_integration as di
from swiftfusion_xdit.emulator import INTER, INTRA, NETWORK_PRESETS, LinkModel, emulate
from swiftfusion_xdit.mesh import valid_ulysses
from swiftfusion_xdit.planner import ModelShape, Plan, bytes_per_layer
from swiftfusion_xdit.tiny import FLUX_DEV_TRANSFORMER, TINY_FLUX_TRANSFORMER, WAN21_14B_TRANSFORMER

MODELS = {  # name -> (diffusers class, config, text tokens)
    "flux-dev": ("FluxTransformer2DModel", FLUX_DEV_TRANSFORMER, 512),
    "wan2.1-14b": ("WanTransformer3DModel", WAN21_14B_TRANSFORMER, 512),
    "tiny": ("FluxTransformer2DModel", TINY_FLUX_TRANSFORMER, 32),
}
USP_LIKE = ("usp", "ulysses", "ring", "diffusers", "diffusers-ulysses", "diffusers-ring")
INSTANT = LinkModel(inter_GBps=1e9, inter_latency_us=0.0, intra_GBps=1e9, intra_latency_us=0.0, intra_table=())


class WallClock:
    """CPU runs: this rank's time is wall time plus what it waited on modeled links."""

    def __init__(self):
        self.t0, self.waited_us = time.perf_counter(), 0.0

    @property
    def now_us(self) -> float:
        return (time.perf_counter() - self.t0) * 1e6 + self.waited_us

    def advance(self, us: float) -> None:
        self.waited_us += us

    def advance_to(self, t_us: float) -> None:
        self.waited_us += max(0.0, t_us - self.now_us)


# --- the model, its inputs and its shape -------------------------------------------------------

@contextlib.contextmanager
def params_on_meta():
    """Parameters are made on the meta device (no init kernels); buffers stay real."""
    register = torch.nn.Module.register_parameter

    def on_meta(module, name, param):
        register(module, name, None if param is None else torch.nn.Parameter(param.to("meta"), False))
    torch.nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = register


def build(name: str, device: torch.device, dtype: torch.dtype, seed: int = 0) -> torch.nn.Module:
    import diffusers
    cls_name, config, _ = MODELS[name]
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device), params_on_meta():
            model = getattr(diffusers, cls_name)(**config)
    finally:
        torch.set_default_dtype(torch.float32)
    g = torch.Generator(device=device).manual_seed(seed)
    for module in model.modules():  # uniform +-1/sqrt(fan_in) as nn.Linear's; biases 0, scales 1
        for pname, p in [(n, p) for n, p in module._parameters.items() if p is not None]:
            w = torch.empty(p.shape, dtype=p.dtype, device=device)
            if p.dim() >= 2:
                w.uniform_(-p[0].numel() ** -0.5, p[0].numel() ** -0.5, generator=g)
            else:
                w.fill_(0.0 if pname == "bias" else 1.0)
            module._parameters[pname] = torch.nn.Parameter(w, requires_grad=False)
    return model.eval()


def shared_copy(base: torch.nn.Module) -> torch.nn.Module:
    """A fresh module tree on the same weights (diffusers' parallel hooks cannot be removed)."""
    return copy.deepcopy(base, memo={id(p): p for p in base.parameters()})


def shape_of(args, dtype: torch.dtype) -> ModelShape:
    _, config, text = MODELS[args.model]
    shape = ModelShape.wan(config, args.frames, args.height, args.width) if args.model == "wan2.1-14b" \
        else ModelShape.flux(config, args.size, args.size, text_tokens=text)
    return dataclasses.replace(shape, dtype_bytes=dtype.itemsize)


def model_inputs(args, device: torch.device, dtype: torch.dtype) -> dict:
    """One rank's full-size inputs, as the pipeline hands them to the transformer."""
    _, config, text = MODELS[args.model]
    g = torch.Generator(device=device).manual_seed(7)
    rand = lambda *s: torch.randn(*s, device=device, dtype=dtype, generator=g)
    if args.model == "wan2.1-14b":
        latents = rand(1, config["in_channels"], (args.frames - 1) // 4 + 1, args.height // 8, args.width // 8)
        return dict(hidden_states=latents, timestep=torch.tensor([500], device=device),
                    encoder_hidden_states=rand(1, text, config["text_dim"]), return_dict=False)
    side = args.size // 16
    ids = torch.zeros(side, side, 3, device=device)
    ids[..., 1] = torch.arange(side, device=device)[:, None]
    ids[..., 2] = torch.arange(side, device=device)[None, :]
    return dict(hidden_states=rand(1, side * side, config["in_channels"]),
                encoder_hidden_states=rand(1, text, config["joint_attention_dim"]),
                pooled_projections=rand(1, config["pooled_projection_dim"]),
                timestep=torch.tensor([0.5], device=device), img_ids=ids.reshape(-1, 3),
                txt_ids=torch.zeros(text, 3, device=device), guidance=torch.tensor([3.5], device=device),
                return_dict=False)


# --- strategies --------------------------------------------------------------------------------

def expand(strategies: list[str], heads: int, machines: int, gpus: int) -> list[str]:
    """``torus[@uD]`` -> ``torus-kv[@uD]`` and, across machines, ``torus-a2a[@uD]`` where the
    heads split over U x T, else ``torus-a2a-kv[@uD]`` where they split over T."""
    out = []
    for spec in strategies:
        name, _, u = spec.partition("@u")
        if name != "torus":
            out.append(spec)
            continue
        P = machines * gpus
        U = int(u) if u else max(valid_ulysses(P, gpus, heads) or [1])
        T, exchanges = P // U, ["kv"]
        if T > 1 and heads % P == 0:
            exchanges.append("a2a")
        elif T > 1 and U > 1 and heads % T == 0:
            exchanges.append("a2a-kv")
        out += [f"torus-{e}" + (f"@u{u}" if u else "") for e in exchanges]
    return out


def parallelize(model, spec: str, machines: int, gpus: int, device: torch.device) -> str:
    """Shard ``model`` for strategy ``spec`` on the emulated job; returns the layout in words."""
    name, _, u = spec.partition("@u")
    P, heads = machines * gpus, model.config.num_attention_heads
    if name.startswith("diffusers"):
        from diffusers import ContextParallelConfig
        U = int(u) if u else {"diffusers-ulysses": P, "diffusers-ring": 1}.get(
            name, max(valid_ulysses(P, gpus, heads) or [1]))
        if device.type == "cuda":
            model.set_attention_backend("_native_cudnn")
        # diffusers takes its device as rank % accelerator count, which is 0 on a CPU-only machine
        patch = mock.patch("torch.accelerator.device_count", return_value=1)
        with patch if device.type == "cpu" else contextlib.nullcontext():
            model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=U, ring_degree=P // U))
        return f"ulysses={U} ring={P // U}"
    base, _, exchange = name.partition("-")
    layout = di.parallelize_transformer(model, base, ulysses=int(u) if u else None, torus_exchange=exchange or "auto",
                                        comm="nccl" if device.type == "cuda" else "gloo")
    d = layout.dims
    return f"U={d.ulysses} T={d.torus}" + (f" ({layout.torus_exchange})" if d.torus > 1 else "")


# --- one strategy: timing and the link record ----------------------------------------------------

def forward(model, kw: dict) -> None:
    """One step; its output used, as the scheduler would: diffusers' plan gathers it with a
    functional collective, whose wait (the caller's stream on the link's) comes at first use."""
    out = model(**kw)[0]
    if isinstance(out, funcol.AsyncCollectiveTensor):
        out.wait()


def _timed(run, cluster, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    t0 = cluster.clock.now_us
    run()
    return (cluster.clock.now_us - t0) / 1e3


@torch.no_grad()
def interleaved_ms(runs: dict, cluster, device, repeats: int, warmup: int):
    """Median ms of each step function, timed in turn (one call of each per round), so drift
    during the run (clocks, caches, the host) falls on every strategy alike; and each one's
    transfers in its last call (none for a graph replay: those were booked at capture)."""
    for _ in range(warmup):
        for run in runs.values():
            run()
    times = {key: [] for key in runs}
    transfers = {}
    for _ in range(repeats):
        for key, run in runs.items():
            n = len(cluster.transfers)
            times[key].append(_timed(run, cluster, device))
            transfers[key] = cluster.transfers[n:]
    return {key: statistics.median(t) for key, t in times.items()}, transfers


@torch.no_grad()
def captured(model, kw: dict, cluster):
    """One forward captured in a CUDA graph (graph mode: no host time per kernel or call),
    and the transfers booked while capturing it, which every replay repeats. The link
    model in force at capture is baked into the graph (the spins' durations)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up on a side stream, as capture wants
        forward(model, kw)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    n = len(cluster.transfers)
    with torch.cuda.graph(graph):
        forward(model, kw)
    return graph, cluster.transfers[n:]


def link_record(transfers, layers: int) -> dict:
    busy, moved = {}, {}
    for t in transfers:
        busy[t.link, t.direction] = busy.get((t.link, t.direction), 0.0) + t.end_us - t.start_us
        moved[t.link, t.direction] = moved.get((t.link, t.direction), 0) + t.nbytes
    most = lambda d, link: max([v for (k, _), v in d.items() if k == link], default=0)
    return {"inter_busy_ms": most(busy, INTER) / 1e3, "intra_busy_ms": most(busy, INTRA) / 1e3,
            "inter_MB_per_layer": most(moved, INTER) / layers / 1e6,
            "intra_MB_per_layer": most(moved, INTRA) / layers / 1e6, "calls": len(transfers)}


def floor_ms(shape: ModelShape, machines: int, gpus: int, inter_GBps: float) -> float:
    cross = bytes_per_layer(Plan("torus", gpus, machines, "a2a"), shape)[1]  # 0 on one machine
    return cross / (inter_GBps * 1e6) * shape.layers


def measure(base, kw, specs, machines, gpus, links, rows, layers, device, args) -> None:
    """Fill ``rows[spec, mode]`` (one row per link) for every strategy of one cluster: one
    emulated job, one copy per strategy parallelised once, all timed in turn; the links are
    swapped on the cluster between timings (the process groups stay)."""
    cluster = emulate(machines * gpus, gpus, 0, INSTANT, clock=None if device.type == "cuda" else WallClock())
    models = {}
    try:
        for spec in specs:
            spec_rows = [row for mode in args.modes for row in rows[spec, mode]]
            try:
                t = time.perf_counter()
                model = shared_copy(base)
                layout = parallelize(model, spec, machines, gpus, device)
                forward(model, kw)  # fails here rather than in the timed rounds
                models[spec] = model
                for row in spec_rows:
                    row.update(layout=layout, setup_s=round(time.perf_counter() - t, 2))
            except Exception as e:  # the strategy did not run: every link's row says why
                for row in spec_rows:
                    row.setdefault("error", first_line(e))
        if not models:
            return
        if "eager" in args.modes:
            measure_eager(models, kw, cluster, links, rows, layers, device, args)
        if "graph" in args.modes:
            measure_graphs(models, kw, cluster, links, rows, layers, device, args)
    finally:
        models.clear()
        dist.destroy_process_group()
        gc.collect()
        if device.type == "cuda":
            with contextlib.suppress(RuntimeError):  # a failed kernel: its row says so already
                torch.cuda.synchronize()
                torch.cuda.empty_cache()


def measure_eager(models, kw, cluster, links, rows, layers, device, args) -> None:
    runs = {spec: (lambda m=model: forward(m, kw)) for spec, model in models.items()}
    cluster.link = INSTANT
    compute, _ = interleaved_ms(runs, cluster, device, args.repeats, warmup=1)
    for i, (_, link) in enumerate(links):
        if any([past_deadline(args, rows[spec, "eager"][i]) for spec in models]):
            continue
        cluster.link = link
        ms, transfers = interleaved_ms(runs, cluster, device, args.repeats, warmup=1)
        for spec in models:
            record_row(rows[spec, "eager"][i], ms[spec], compute[spec], transfers[spec], layers)


def measure_graphs(models, kw, cluster, links, rows, layers, device, args) -> None:
    """Per link (it is baked into a capture), every strategy captured, then replayed in turn."""
    compute = None
    for i, (_, link) in enumerate([("instant", INSTANT), *links]):
        if i and any([past_deadline(args, rows[spec, "graph"][i - 1]) for spec in models]):
            continue
        cluster.link = link
        graphs, transfers = {}, {}
        for spec, model in models.items():
            try:
                graphs[spec], transfers[spec] = captured(model, kw, cluster)
            except Exception as e:  # e.g. a collective that cannot be captured: the rows say so
                for row in rows[spec, "graph"]:
                    row.setdefault("error", f"capture: {first_line(e)}")
        ms, _ = interleaved_ms({spec: g.replay for spec, g in graphs.items()}, cluster, device,
                               args.repeats, warmup=1)
        if compute is None:
            compute = ms
        else:
            for spec in set(graphs) & set(compute):
                record_row(rows[spec, "graph"][i - 1], ms[spec], compute[spec], transfers[spec], layers)
        del graphs
        torch.cuda.synchronize()


def record_row(row: dict, step_ms: float, compute_ms: float, transfers, layers: int) -> None:
    row.update(step_ms=step_ms, compute_ms=compute_ms, exposed_ms=step_ms - compute_ms,
               **link_record(transfers, layers))
    print(json.dumps(row), flush=True)


def past_deadline(args, row: dict) -> bool:
    if args.deadline and time.perf_counter() - args.started > args.deadline:
        row["error"] = f"skipped: --deadline {args.deadline:g} s had passed"
        return True
    return False


def first_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"[:300]


# --- the sweep and its outputs -------------------------------------------------------------------

def run(args) -> dict:
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    shape = shape_of(args, dtype)
    t = time.perf_counter()
    base = build(args.model, device, dtype)
    build_s = round(time.perf_counter() - t, 2)
    kw = model_inputs(args, device, dtype)
    size = f"{args.frames}x{args.height}x{args.width}" if args.model == "wan2.1-14b" else str(args.size)
    result = {"model": args.model, "size": size, "tokens": shape.tokens, "layers": shape.layers,
              "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
              "dtype": str(dtype), "build_s": build_s, "repeats": args.repeats,
              "command": " ".join(["python benchmarks/emulated_cluster.py", *args.argv]), "rows": []}
    print(f"built {args.model} in {build_s} s", flush=True)
    links = [(name, LinkModel.preset(name)) for name in args.links.split(",")]
    for cluster in args.clusters.split(","):
        machines, gpus = map(int, cluster.split("x"))
        specs = expand(args.strategies.split(","), base.config.num_attention_heads, machines, gpus)
        rows = {(spec, mode): [dict(model=args.model, size=size, tokens=shape.tokens, cluster=cluster,
                                    link=name, inter_GBps=link.inter_GBps, strategy=spec, mode=mode, layout="",
                                    floor_ms=floor_ms(shape, machines, gpus, link.inter_GBps))
                               for name, link in links]
                for mode in args.modes for spec in specs}
        if not any([past_deadline(args, row) for spec_rows in rows.values() for row in spec_rows]):
            measure(base, kw, specs, machines, gpus, links, rows, shape.layers, device, args)
        result["rows"] += [row for key in rows for row in rows[key]]
        save(result, args.out)  # after every cluster: a run cut short keeps what it measured
    return result


def add_speedups(rows: list[dict]) -> None:
    for row in rows:
        peers = [r for r in rows if "step_ms" in r and r["strategy"].split("@")[0] in USP_LIKE
                 and (r["cluster"], r["link"], r.get("mode")) == (row["cluster"], row["link"], row.get("mode"))]
        if row["strategy"].startswith("torus") and "step_ms" in row and peers:
            best = min(peers, key=lambda r: r["step_ms"])
            row["speedup"] = best["step_ms"] / row["step_ms"]
            # our usp and torus-kv can be one layout: then the ratio is run-to-run spread
            row["same_layout_as_best_usp"] = best["layout"] == row["layout"]


def fmt(row: dict, key: str) -> str:
    x = row.get(key)
    return "" if x is None else f"{x:.1f}" if abs(x) >= 10 else f"{x:.3g}"


def save(result: dict, out: str) -> None:
    os.makedirs(out, exist_ok=True)
    add_speedups(result["rows"])
    with open(os.path.join(out, "emulated_cluster.json"), "w") as f:
        json.dump(result, f, indent=2)
    lines = [f"# One rank's step on an emulated cluster: {result['model']} {result['size']}, {result['device']}",
             "", f"`{result['command']}`", "",
             f"Eager, median of {result['repeats']}. Compute-only: the same model with instantaneous links; "
             "exposed comm = step - compute-only; inter busy: the busier direction of the inter-machine link in "
             "one forward; floor: 4X(N-1)/N cross-machine bytes per GPU per layer over the link, times layers. "
             f"Model built in {result['build_s']} s.", "",
             "| model | size | tokens | cluster | link GB/s | strategy | mode | layout | step ms | compute-only ms "
             "| exposed comm ms | inter busy ms | floor ms | torus speedup |", "|---" * 14 + "|"]
    for r in result["rows"]:
        lines.append(f"| {r['model']} | {r['size']} | {r['tokens']} | {r['cluster']} | {r['inter_GBps']:g} | "
                     f"{r['strategy']} | {r.get('mode', 'eager')} | {r['layout']} | {fmt(r, 'step_ms') or 'failed: ' + r.get('error', '')} | "
                     f"{fmt(r, 'compute_ms')} | {fmt(r, 'exposed_ms')} | {fmt(r, 'inter_busy_ms')} | "
                     f"{fmt(r, 'floor_ms')} | {fmt(r, 'speedup') and fmt(r, 'speedup') + 'x'}"
                     f"{' (same layout)' if r.get('same_layout_as_best_usp') else ''} |")
    with open(os.path.join(out, "emulated_cluster.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    save_plot(result, os.path.join(out, "emulated_cluster.png"))


def save_plot(result: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = result["rows"]
    groups = list(dict.fromkeys((r["cluster"], r["link"]) for r in rows))
    label = lambda r: r["strategy"] + ("" if r.get("mode", "eager") == "eager" else f" ({r['mode']})")
    names = list(dict.fromkeys(label(r) for r in rows))
    width = 0.8 / len(names)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.5 * len(groups) * len(names) + 2), 4.5))
    for i, name in enumerate(names):
        for g, group in enumerate(groups):
            row = next((r for r in rows if (r["cluster"], r["link"], label(r)) == (*group, name)), {})
            x = g + (i - (len(names) - 1) / 2) * width
            if "step_ms" in row:
                ax.bar(x, row["step_ms"], width, color=f"C{i}", label=name)
                ax.hlines(row["compute_ms"], x - width / 2, x + width / 2, colors="k", linewidth=1)
            else:  # failed or skipped
                ax.text(x, 0, "x", ha="center", va="bottom", color=f"C{i}")
    handles = dict(zip(*reversed(ax.get_legend_handles_labels())))  # one entry per strategy
    if handles:
        ax.legend(handles.values(), handles.keys(), fontsize=8)
    ax.set_xticks(range(len(groups)), [f"{c} machines x GPUs\n{link}" for c, link in groups])
    ax.set_ylabel("step ms, one rank (black: compute-only)")
    ax.set_xlabel("x: failed or skipped (the table says why)", fontsize=8)
    ax.set_title(f"{result['model']} {result['size']} ({result['tokens']} tokens) on emulated clusters, "
                 f"{result['device']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="flux-dev", choices=tuple(MODELS))
    ap.add_argument("--size", type=int, default=None, help="flux, tiny: image side in pixels (2048; tiny: 256)")
    ap.add_argument("--frames", type=int, default=81, help="wan2.1-14b")
    ap.add_argument("--height", type=int, default=720, help="wan2.1-14b")
    ap.add_argument("--width", type=int, default=1280, help="wan2.1-14b")
    ap.add_argument("--clusters", default="2x8,4x8", help="MACHINESxGPUS, comma-separated")
    ap.add_argument("--links", default="400G,100G", help=f"between machines, of {', '.join(NETWORK_PRESETS)}")
    ap.add_argument("--strategies", default="torus,usp,ulysses,ring,diffusers")
    ap.add_argument("--modes", default="eager", help="eager, graph (CUDA graphs: a GPU only), comma-separated")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--deadline", type=float, default=None, help="seconds: start nothing new after them")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    args.size = args.size or (256 if args.model == "tiny" else 2048)
    args.modes = args.modes.split(",")
    if set(args.modes) - {"eager", "graph"} or ("graph" in args.modes and args.device == "cpu"):
        ap.error(f"--modes {','.join(args.modes)}: eager, and graph on a GPU only")
    args.started = time.perf_counter()
    from diffusers.utils import logging as diffusers_logging
    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # enable_parallelism's "experimental" warning, per copy
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning)  # torch 2.13's renamed collectives
            return run(args)
    finally:
        diffusers_logging.set_verbosity(verbosity)


if __name__ == "__main__":
    main()
