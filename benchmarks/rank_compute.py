"""One rank's share of a sequence-parallel FLUX.1-dev step, timed on one GPU.

On P = machines x GPUs ranks each rank runs the transformer on S/P tokens
and, inside attention, whatever Torus Attention computes after each
exchange. This runs exactly that on one GPU: the real FLUX.1-dev transformer
(random bf16 weights) on one shard of the sequence (image and text, as
diffusers' plan splits them), with Torus Attention over a loopback transport
that makes the same local layout copies as the two-sided one and returns
tensors of the right shape, but moves nothing between GPUs (each "received"
chunk is our own). The result is the strategy's compute floor per rank --
kernels, launches and layout copies at the shapes one rank of that grid
sees -- with no communication: what the planner adds its link model to, and
the honest version of "perfect scaling" (one-GPU time / P assumes GEMMs and
attention stay as efficient on 1/P of the work).

    python benchmarks/rank_compute.py --sizes 1024,2048 --grids 1x1,1x2,1x4,1x8,2x1,4x1,2x2 \
        --compile-grids 1x1,1x4 --out DIR

A grid ``MxG`` is M machines (torus degree) of G GPUs (Ulysses degree); every
grid runs with exchange ``kv`` (what USP's ring computes too) and, where the
heads split, ``a2a``. Outputs are meaningless (every chunk is our own); only
the time is kept, with the per-layer attention / other split of one profiled
step (``kernel_breakdown.py``).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time

import torch
import torch.distributed as dist

from flux_device_check import TEXT, build, flux_inputs
from kernel_breakdown import profile_step
from swiftfusion_xdit import block_attention
from swiftfusion_xdit.torus_attention import SPGroups, torus_attention
from swiftfusion_xdit.transport import _Done, join_chunks, split_chunks
from timing import median_ms

# the module, not the function the package exports under the same name
torus_module = importlib.import_module("swiftfusion_xdit.torus_attention")


class VirtualGroup:
    """A process group of ``size`` ranks of which we are rank 0; nobody else exists."""

    def __init__(self, size: int):
        self.size, self.rank = size, 0


class _VirtualDist:
    """torch.distributed as Torus Attention sees it: virtual groups answer for themselves."""

    def __getattr__(self, name):
        return getattr(dist, name)

    @staticmethod
    def get_world_size(group=None):
        return group.size if isinstance(group, VirtualGroup) else dist.get_world_size(group)

    @staticmethod
    def get_rank(group=None):
        return group.rank if isinstance(group, VirtualGroup) else dist.get_rank(group)


class Loopback:
    """The two-sided transport's local work without its wire: the all-to-all packs
    and unpacks (two copies) around a receive that is our own buffer; the peer
    exchange and the all-gather hand back what was sent (the network writes those)."""

    name = "loopback"

    def all_to_all(self, x, group, scatter_dim=0, gather_dim=0):
        packed = split_chunks(x, group.size, scatter_dim).contiguous()  # as TwoSidedTransport packs
        return join_chunks(packed, gather_dim)

    def exchange(self, send, dst, src, group):
        return _Done(send)

    def all_to_all_start(self, x, group, scatter_dim=0, gather_dim=0):  # the overlapped order
        return _Done(self.all_to_all(x, group, scatter_dim, gather_dim))

    def all_gather(self, x, group):
        return _Done(x.unsqueeze(0).expand(group.size, *x.shape))


def use_torus_attention(U: int, T: int, exchange: str, head_chunks: int = 1) -> None:
    """Route FLUX's attention through Torus Attention on a virtual U x T grid."""
    from diffusers.models.transformers import transformer_flux
    groups = SPGroups(VirtualGroup(U), VirtualGroup(T), exchange, head_chunks)
    transport = Loopback()

    def dispatch(query, key, value, attn_mask=None, *args, **kwargs):
        q, k, v = (x.transpose(1, 2) for x in (query, key, value))
        return torus_attention(q, k, v, groups, transport=transport).transpose(1, 2)

    transformer_flux.dispatch_attention_fn = dispatch


def shard(kw: dict, P: int, rank: int = 0) -> dict:
    """One rank's part of the inputs (rank 0's unless told), as diffusers' Flux plan splits them."""
    cut = lambda x, dim: x.narrow(dim, rank * (x.shape[dim] // P), x.shape[dim] // P)
    return dict(kw, hidden_states=cut(kw["hidden_states"], 1),
                encoder_hidden_states=cut(kw["encoder_hidden_states"], 1),
                img_ids=cut(kw["img_ids"], 0), txt_ids=cut(kw["txt_ids"], 0))


def exchanges(heads: int, U: int, T: int) -> list[str]:
    return ["kv", "a2a"] if T > 1 and heads % (U * T) == 0 else ["kv"]


def head_chunk_counts(asked: str, heads: int, U: int, T: int) -> list[int]:
    """1, and each asked count that applies: one machine (T == 1) of U > 1 ranks whose
    heads it divides."""
    asked = [int(c) for c in asked.split(",")]
    return [1] + [c for c in asked if c > 1 and T == 1 and U > 1 and (heads // U) % c == 0]


def compiled_form(model, compiled: bool, mode: str, scope: str):
    """The model to call: itself, torch.compile of it, or itself with every transformer
    block compiled (diffusers' regional compilation: one compile per block class, so
    compile time does not grow with depth or with Torus Attention's block count)."""
    if not compiled:
        return model
    if scope == "model":
        return torch.compile(model, mode=mode)
    model.compile_repeated_blocks(mode=mode)
    return model


def uncompile_blocks(model) -> None:
    """Undo ``compile_repeated_blocks`` (nn.Module.compile keeps the compiled call here)."""
    for block in model.modules():
        block._compiled_call_impl = None


def measure(model, kw, layers: int, compiled: bool, mode: str = "default",
            host_ops: bool = False, scope: str = "model") -> dict:
    run = compiled_form(model, compiled, mode, scope)
    try:
        with torch.no_grad():
            start = time.perf_counter()
            run(**kw)  # compiles, when compiled
            torch.cuda.synchronize()
            first_call_s = time.perf_counter() - start
            ms = median_ms(lambda: run(**kw), repeats=5, warmup=2)
            split = profile_step(lambda: run(**kw), layers)
            top = top_host_ops(lambda: run(**kw)) if host_ops and not compiled else None
    finally:
        uncompile_blocks(model)  # the next row starts from the eager model, also after a failure
    return {"ms": ms, "first_call_s": round(first_call_s, 1), "attention_ms_per_layer": split["attention_ms_per_layer"],
            "other_ms_per_layer": split["compute_ms_per_layer"], **({"host_ops": top} if top else {})}


def top_host_ops(step, count: int = 15) -> list[dict]:
    """Where the host's time goes in one forward: the ops with the most self CPU time
    (profiled, so slower than unprofiled; the shares are what matter)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        step()
        torch.cuda.synchronize()
    ops = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:count]
    return [{"op": e.key, "calls": e.count, "self_cpu_ms": round(e.self_cpu_time_total / 1e3, 2)}
            for e in ops]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="1024,2048")
    ap.add_argument("--grids", default="1x1,1x2,1x4,1x8,2x1,4x1,2x2")
    ap.add_argument("--compile-grids", default="1x1,1x4", help="also compiled, at the first size")
    ap.add_argument("--compile-mode", default="default", help="torch.compile mode, e.g. reduce-overhead (CUDA graphs)")
    ap.add_argument("--merge", default="fused",
                    help="LSE merge forms to time, comma-separated: fused (the package's default "
                         "on CUDA), torch (the PyTorch ops it replaced)")
    ap.add_argument("--compile-scope", choices=("model", "blocks"), default="model",
                    help="torch.compile the whole transformer, or each block (regional compilation)")
    ap.add_argument("--host-ops", action="store_true",
                    help="also record the ops with the most host time in one eager forward")
    ap.add_argument("--head-chunks", default="1",
                    help="comma-separated: also time one-machine grids with the all-to-all in this many "
                         "head chunks (the compute they cost; what they hide needs real ranks)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    if args.compile_scope == "blocks" and args.compile_mode == "reduce-overhead":
        # measured on an H200: each block's graph output is overwritten by the next replay
        ap.error("--compile-scope blocks with reduce-overhead fails (CUDA graphs per block "
                 "overwrite each other's outputs); use --compile-scope model")
    torus_module.dist = _VirtualDist()
    from swiftfusion_xdit.tiny import FLUX_DEV_TRANSFORMER as config
    layers = config["num_layers"] + config["num_single_layers"]
    model = build("flux-dev", 0)
    sizes = [int(s) for s in args.sizes.split(",")]
    result = {"device": torch.cuda.get_device_name(), "model": "FLUX.1-dev transformer config, random bf16 weights",
              "what": "one rank's share of one forward, no communication (loopback transport)", "rows": []}
    for size in sizes:
        full = flux_inputs(str(size), 0)
        for grid in args.grids.split(","):
            T, U = map(int, grid.split("x"))
            heads = config["num_attention_heads"]
            variants = [(e, c) for e in exchanges(heads, U, T) for c in head_chunk_counts(args.head_chunks, heads, U, T)]
            for exchange, chunks in variants:
                use_torus_attention(U, T, exchange, chunks)
                compiled = [False] + ([True] if size == sizes[0] and grid in args.compile_grids.split(",") else [])
                # one block (T == 1) merges nothing; compiled runs trace the PyTorch form
                merges = args.merge.split(",") if T > 1 else ["none"]
                for c, merge in [(c, m) for c in compiled for m in (merges if not c else ["traced"])]:
                    torch._dynamo.reset()
                    block_attention.fused_merge = merge != "torch"
                    row = dict(size=size, grid=grid, ranks=U * T, ulysses=U, torus=T, exchange=exchange,
                               head_chunks=chunks,
                               compiled=c, compile_mode=args.compile_mode if c else None, merge=merge,
                               compile_scope=args.compile_scope if c else None,
                               tokens=(size // 16) ** 2 + TEXT)
                    try:
                        row.update(measure(model, shard(full, U * T), layers, c, args.compile_mode,
                                           args.host_ops, args.compile_scope))
                    except Exception as e:  # keep the other rows; say what failed
                        row["error"] = f"{type(e).__name__}: {e}"[:500]
                    result["rows"].append(row)
                    print(json.dumps(row), flush=True)
                    save(result, args.out)  # after every row: a timeout keeps what ran


def save(result: dict, folder: str) -> None:
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "rank_compute.json"), "w") as f:
        json.dump(result, f, indent=2)
    write_table(result, os.path.join(folder, "rank_compute.md"))


def compiled_label(row: dict) -> str:
    if not row["compiled"]:
        return "no"
    return row["compile_mode"] + (" (blocks)" if row.get("compile_scope") == "blocks" else "")


def write_table(result: dict, path: str) -> None:
    ok = [r for r in result["rows"] if "ms" in r]
    one = {(r["size"], r["compiled"]): r["ms"] for r in ok if r["ranks"] == 1}
    lines = [f"# One rank's compute per forward, {result['device']}", "",
             f"{result['model']}; {result['what']}. Perfect scaling = one-GPU ms / ranks; "
             "efficiency = perfect / measured.", "",
             "| size | grid (MxG) | exchange | head chunks | merge | compiled | ms | perfect ms | efficiency | attention ms/layer | other ms/layer | first call s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in ok:
        perfect = one.get((r["size"], r["compiled"]), float("nan")) / r["ranks"]
        lines.append(f"| {r['size']} | {r['grid']} | {r['exchange']} | {r.get('head_chunks', 1)} | "
                     f"{r.get('merge', 'torch')} | "
                     f"{compiled_label(r)} | "
                     f"{r['ms']:.1f} | {perfect:.1f} | {perfect / r['ms']:.2f} | "
                     f"{r['attention_ms_per_layer']:.3f} | {r['other_ms_per_layer']:.3f} | "
                     f"{r.get('first_call_s', '')} |")
    lines += [f"\nFailed: {r['size']} {r['grid']} {r['exchange']} compiled={r['compiled']}: {r['error']}"
              for r in result["rows"] if "error" in r]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
