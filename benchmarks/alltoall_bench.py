"""NVSHMEM (one-sided) vs NCCL all-to-all: bit-exactness, latency, bus bandwidth.

    torchrun --nproc-per-node 4 benchmarks/alltoall_bench.py --out benchmarks/results/

Checks first: the one-sided Ulysses all-to-all equals NCCL's
``all_to_all_single`` bit for bit (bf16 and fp16, fresh random inputs,
several shapes including Flux 2048²: 16,896 tokens, 24 heads, head dim 128),
and Torus Attention over ``nvshmem`` equals one-GPU attention. Then times
back-to-back all-to-alls (``--batch`` per timed region, median of
``--repeats``) from 256 KiB to 256 MiB per rank.
Bus bandwidth = bytes per rank x (P-1)/P / time, NCCL's convention.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F

from accuracy import rel_err
from swiftfusion_xdit.torus_attention import Joint, SPGroups, _heads_to_seq, _seq_to_heads, torus_attention
from swiftfusion_xdit.transport import TwoSidedTransport, resolve_transport
from timing import median_ms, save_and_shut_down


def bench(fn, batch, repeats):
    """Per-call ms of ``batch`` back-to-back calls, median of repeats, slowest rank."""
    ms = median_ms(fn, repeats, inner=batch, before=lambda: (dist.barrier(), torch.cuda.synchronize()))
    t = torch.tensor([ms], device="cuda")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def graphed(fn, warm_up, calls: int):
    """``calls`` back-to-back ``fn()`` captured in one CUDA graph; returns its replay. A
    replay has no host launch cost, so it times the transfers and their synchronisation
    alone (what the one-sided puts and signals save), as compiled models with CUDA graphs
    run them."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # NCCL and the counted NVSHMEM channel set up outside capture
        warm_up()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    return graph.replay


def bench_graphed(fn, warm_up, batch, repeats):
    """Per-call ms of a replayed graph of ``batch`` calls, median of repeats, slowest rank;
    None (and the reason printed) where capture fails on any rank: the ranks agree before
    replaying, since a replayed collective waits for peers that would never replay theirs."""
    replay = None
    try:
        replay = graphed(fn, warm_up, batch)
    except Exception as err:  # keep the eager numbers; say why this column is empty
        print(f"rank {dist.get_rank()}: CUDA-graph capture failed: {err}", flush=True)
    captured = torch.tensor([replay is not None], dtype=torch.int32, device="cuda")
    dist.all_reduce(captured, op=dist.ReduceOp.MIN)
    if not captured.item():
        return None
    return bench(replay, 1, repeats) / batch


def check_ulysses(nv, nccl, world, seed):
    results = []
    g = torch.Generator(device="cuda").manual_seed(seed)
    for tokens, heads in ((16896, 24), (4608, 24), (1024, 8)):
        for dtype in (torch.bfloat16, torch.float16):
            x = torch.randn(3, 1, heads, tokens // world, 128, device="cuda", dtype=dtype, generator=g)
            a = _seq_to_heads(x, dist.group.WORLD, nv)
            b = _seq_to_heads(x, dist.group.WORLD, nccl)
            back = _heads_to_seq(a[0], dist.group.WORLD, nv)
            ok = torch.tensor([torch.equal(a, b) and torch.equal(back, x[0])], device="cuda")
            dist.all_reduce(ok, op=dist.ReduceOp.MIN)
            results.append({"tokens": tokens, "heads": heads, "dtype": str(dtype), "bit_exact": bool(ok.item())})
    return results


def check_torus(nv, world, rank, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    heads, text, tokens = 24, 512, 16384
    rand = lambda n: torch.randn(1, heads, n, 128, device="cuda", dtype=torch.bfloat16, generator=g)
    q, k, v, jq, jk, jv = rand(tokens), rand(tokens), rand(tokens), rand(text), rand(text), rand(text)
    shard = tokens // world
    sl = slice(rank * shard, (rank + 1) * shard)
    errs = []
    for u, t in ((world, 1), (1, world)) if world > 1 else ((1, 1),):
        groups = SPGroups(dist.group.WORLD if u > 1 else None, dist.group.WORLD if t > 1 else None, "a2a")
        out, jout = torus_attention(q[:, :, sl], k[:, :, sl], v[:, :, sl], groups,
                                    joint=Joint(jq, jk, jv), transport=nv)
        with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.EFFICIENT_ATTENTION):
            ref = F.scaled_dot_product_attention(*(torch.cat(p, 2).float() for p in ((jq, q), (jk, k), (jv, v))))
        e = torch.tensor([rel_err(out, ref[:, :, text:][:, :, sl])], device="cuda")
        dist.all_reduce(e, op=dist.ReduceOp.MAX)
        errs.append({"ulysses": u, "torus": t, "max_rel_err": e.item(), "pass": e.item() < 2e-2})
    return errs


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--batch", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=15)
    args = ap.parse_args()
    torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl", device_id=torch.device("cuda", torch.cuda.current_device()))
    rank, world = dist.get_rank(), dist.get_world_size()
    nccl, nv = TwoSidedTransport("nccl"), resolve_transport("nvshmem")
    result = {"device": torch.cuda.get_device_name(), "world": world,
              "ulysses_checks": check_ulysses(nv, nccl, world, 7),
              "torus_nvshmem_checks": check_torus(nv, world, rank, 11), "sizes": []}
    for kib in (256, 1024, 4096, 16384, 65536, 262144):
        n = kib * 1024 // 2
        x = torch.randn(world, n // world, device="cuda", dtype=torch.bfloat16)
        out = torch.empty_like(x)
        nccl_call = lambda: dist.all_to_all_single(out, x)
        nv_counted = lambda: nv.all_to_all_counted(x, dist.group.WORLD)  # what capture records
        t_nccl = bench(nccl_call, args.batch, args.repeats)
        t_nv = bench(lambda: nv.all_to_all(x, dist.group.WORLD), args.batch, args.repeats)
        g_nccl = bench_graphed(nccl_call, nccl_call, args.batch, args.repeats)
        g_nv = bench_graphed(nv_counted, nv_counted, args.batch, args.repeats)
        bus = lambda ms: kib * 1024 * (world - 1) / world / (ms * 1e-3) / 1e9
        result["sizes"].append({"per_rank_bytes": kib * 1024, "nccl_ms": t_nccl, "nvshmem_ms": t_nv,
                                "nccl_busbw_GBps": bus(t_nccl), "nvshmem_busbw_GBps": bus(t_nv),
                                "nccl_over_nvshmem": t_nccl / t_nv,
                                "graphed_nccl_ms": g_nccl, "graphed_nvshmem_ms": g_nv})
    save_and_shut_down(result, args.out, f"alltoall_{world}gpu.json")


if __name__ == "__main__":
    main()
