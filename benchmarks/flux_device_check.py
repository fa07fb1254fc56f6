"""Real transformer configs, random bf16 weights, on GPUs: parallel output
equals the one-GPU output, and one forward's latency.

    torchrun --nproc-per-node 4 benchmarks/flux_device_check.py --nodes 1 --out results/
    torchrun --nproc-per-node 4 benchmarks/flux_device_check.py --model wan2.1-14b \
        --sizes 81x480x832 --out results/

Models: FLUX.1-dev (sizes: image side, 1024 = 4,096 image + 512 text tokens)
and Wan 2.1 14B text-to-video (sizes: frames x height x width; 81x720x1280 =
75,600 video tokens; text enters by cross-attention, so only video tokens
are sharded).

Every rank builds the same model (same seed, built on its GPU), runs it
unparallelised (the reference), then shards it with each strategy in turn
and runs the same inputs. One forward = one denoising step without CFG.
Each run also profiles one forward for its per-layer attention and
communication time (``kernel_breakdown.py``; the rank with the most exposed
communication is reported).

The harness runs this for its ``diffusers`` and ``video`` suites, and
``rank_compute.py`` builds its model and inputs with it; each run's ``pass``
(rel err < 2e-2) is asserted by tests/gpu/test_gpu_multi.py.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist

import paced_link
from accuracy import rel_err
from link_probe import measure_links
from kernel_breakdown import profile_step, slowest_rank
from swiftfusion_xdit.topology import emulate_machines

TEXT = 512


def build(model_name, seed):
    from diffusers import FluxTransformer2DModel, WanTransformer3DModel
    from swiftfusion_xdit.tiny import FLUX_DEV_TRANSFORMER, WAN21_14B_TRANSFORMER
    cls, config = {"flux-dev": (FluxTransformer2DModel, FLUX_DEV_TRANSFORMER),
                   "wan2.1-14b": (WanTransformer3DModel, WAN21_14B_TRANSFORMER)}[model_name]
    torch.manual_seed(seed)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        model = cls(**config)
    torch.set_default_dtype(torch.float32)
    return model.eval()


def inputs(model_name, size: str, seed):
    return (flux_inputs if model_name == "flux-dev" else wan_inputs)(size, seed)


def tokens(model_name, size: str) -> int:
    if model_name == "flux-dev":
        return (int(size) // 16) ** 2 + TEXT
    frames, height, width = map(int, size.split("x"))
    return ((frames - 1) // 4 + 1) * (height // 16) * (width // 16)


def wan_inputs(size: str, seed):
    frames, height, width = map(int, size.split("x"))
    g = torch.Generator(device="cuda").manual_seed(seed)
    latents = torch.randn(1, 16, (frames - 1) // 4 + 1, height // 8, width // 8, device="cuda",
                          dtype=torch.bfloat16, generator=g)
    text = torch.randn(1, TEXT, 4096, device="cuda", dtype=torch.bfloat16, generator=g)
    return dict(hidden_states=latents, timestep=torch.tensor([500], device="cuda"),
                encoder_hidden_states=text, return_dict=False)


def flux_inputs(size: str, seed):
    size = int(size)
    g = torch.Generator(device="cuda").manual_seed(seed)
    n = (size // 16) ** 2
    rand = lambda *s: torch.randn(*s, device="cuda", dtype=torch.bfloat16, generator=g)
    img_ids = torch.zeros(size // 16, size // 16, 3, device="cuda")
    img_ids[..., 1] = torch.arange(size // 16, device="cuda")[:, None]
    img_ids[..., 2] = torch.arange(size // 16, device="cuda")[None, :]
    return dict(hidden_states=rand(1, n, 64), encoder_hidden_states=rand(1, TEXT, 4096),
                pooled_projections=rand(1, 768), timestep=torch.tensor([0.5], device="cuda"),
                img_ids=img_ids.reshape(-1, 3), txt_ids=torch.zeros(TEXT, 3, device="cuda"),
                guidance=torch.tensor([3.5], device="cuda"), return_dict=False)


@torch.no_grad()
def forward_ms(model, kw, repeats=5, warmups=1):
    """Median forward time after ``warmups`` calls (compiled models: 3, so CUDA-graph
    recording under reduce-overhead stays out of the timed calls)."""
    for _ in range(warmups):
        out = model(**kw)[0]
    times = []
    for _ in range(repeats):
        dist.barrier()
        torch.cuda.synchronize()
        t = time.perf_counter()
        out = model(**kw)[0]
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t) * 1e3)
    # under CUDA graphs (reduce-overhead) the output lives in the graph's memory, which
    # the next call overwrites: keep a copy
    return out.clone(), statistics.median(times)


def profile_forward(model, model_name, size) -> dict:
    """Per-layer attention / communication GPU time of one profiled forward (this rank)."""
    layers = sum(getattr(model.config, k, 0) or 0 for k in ("num_layers", "num_single_layers"))
    kw = inputs(model_name, size, 7)
    with torch.no_grad():
        return profile_step(lambda: model(**kw), layers)


def maybe_compile(model, compile_: bool, mode: str = "default"):
    """torch.compile after parallelisation, so the compiled graph includes the CP hooks
    (``mode="reduce-overhead"``: CUDA graphs, collectives captured with the kernels)."""
    return torch.compile(model, mode=mode) if compile_ else model


def native_context_parallel(model, strategy, world):
    """diffusers' own context parallelism (cuDNN attention), the baseline it ships."""
    from diffusers import ContextParallelConfig
    ulysses, ring = {"diffusers-ulysses": (world, 1), "diffusers-ring": (1, world),
                     "diffusers-unified": (2, world // 2)}[strategy]
    model.set_attention_backend("_native_cudnn")
    model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=ulysses, ring_degree=ring))
    return f"diffusers native: ulysses={ulysses} ring={ring} (ulysses inner)"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--nodes", type=int, default=1)
    ap.add_argument("--model", default="flux-dev", choices=("flux-dev", "wan2.1-14b"))
    ap.add_argument("--sizes", default="1024,2048", help="flux: image side; wan: FRAMESxHxW")
    ap.add_argument("--strategies", default="torus,usp,ulysses,ring",
                    help="comma-separated; torus[-COMM][+hcN]: over COMM, the all-to-all in N head chunks")
    ap.add_argument("--comm", default="nccl", help="torus transport: nccl or nvshmem")
    ap.add_argument("--compile", action="store_true", help="torch.compile every model, reference too")
    ap.add_argument("--compile-mode", default="default", help="torch.compile mode, e.g. reduce-overhead")
    ap.add_argument("--repeats", type=int, default=5, help="timed forwards per strategy and size (median)")
    ap.add_argument("--label", default=None, help="topology label for the file name (default NxG)")
    ap.add_argument("--out", default=".")
    args = ap.parse_args()
    paced_gbps = paced_link.install_from_env()
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    emulate_machines(args.nodes)
    label = args.label or f"{args.nodes}x{world // args.nodes}"
    from swiftfusion_xdit.diffusers_integration import ensure_distributed, parallelize_transformer
    ensure_distributed()
    links = measure_links(args.nodes)  # the link as this run finds it (the probe runs apart)
    result = {"device": torch.cuda.get_device_name(), "world": world, "nodes": args.nodes,
              "topology": label, "paced_inter_GBps": paced_gbps, "compiled": args.compile,
              "compile_mode": args.compile_mode if args.compile else None,
              "world_all_to_all_busbw_GBps_64MiB": links["world_all_to_all_busbw_GBps"],
              "links": links, "model": args.model, "runs": []}
    sizes = args.sizes.split(",")
    warmups = 3 if args.compile else 1  # compiled: graph recording stays out of the timed calls
    refs = {}
    model = maybe_compile(build(args.model, 0), args.compile, args.compile_mode)
    for size in sizes:
        refs[size] = forward_ms(model, inputs(args.model, size, 7), args.repeats, warmups)
        result.setdefault("one_gpu_per_layer", {})[size] = profile_forward(model, args.model, size)
    del model
    torch.cuda.empty_cache()
    for strategy in args.strategies.split(","):
        model = build(args.model, 0)
        if strategy.startswith("diffusers-"):
            layout, comm = native_context_parallel(model, strategy, world), "nccl"
        else:  # "torus" uses --comm; "torus-nvshmem" / "torus-nccl" name it; "+hc2": head_chunks=2
            base, _, chunks = strategy.partition("+hc")
            name, _, comm = base.partition("-")
            comm = comm or args.comm
            layout = parallelize_transformer(model, name, comm=comm, head_chunks=int(chunks or 1))
        model = maybe_compile(model, args.compile, args.compile_mode)
        for size in sizes:
            out, ms = forward_ms(model, inputs(args.model, size, 7), args.repeats, warmups)
            ref, ref_ms = refs[size]
            err = rel_err(out, ref)
            result["runs"].append({"strategy": strategy, "comm": comm,
                                   "layout": layout if isinstance(layout, str) else layout.describe(),
                                   "size": int(size) if size.isdigit() else size,
                                   "tokens": tokens(args.model, size), "one_gpu_ms": ref_ms,
                                   "parallel_ms": ms, "speedup": ref_ms / ms, "rel_err": err,
                                   "pass": err < 2e-2,
                                   "per_layer": slowest_rank(profile_forward(model, args.model, size))})
            if rank == 0:
                print(json.dumps(result["runs"][-1]), flush=True)
        del model
        torch.cuda.empty_cache()
    if rank == 0:
        os.makedirs(args.out, exist_ok=True)
        stem = "flux_check" if args.model == "flux-dev" else f"{args.model}_check"
        name = f"{stem}_{label}_{args.comm}{'_compiled' * args.compile}.json"
        with open(os.path.join(args.out, name), "w") as f:
            json.dump(result, f, indent=2)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    try:
        main()
    except SystemExit:  # --help, or argparse refusing a flag: its own message and code
        raise
    except BaseException:  # say why, then leave: teardown after a failed rank can hang the job
        import traceback
        traceback.print_exc()
        sys.stdout.flush(), sys.stderr.flush()
        os._exit(1)
