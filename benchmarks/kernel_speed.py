"""How fast the one-sided put and the fused LSE merge run on one GPU (timings only).

    python benchmarks/kernel_speed.py --out benchmarks/results/kernels/ [--parts copy,host,wait,merge]

Their correctness is tested, not measured here: ``pytest tests/gpu`` (test_gpu_peer_copy.py,
test_gpu_lse_kernels.py). Parts:

* ``copy``: the all-to-all of P "virtual ranks" sharing the GPU (each has its own receive
  buffer and flags; the deltas are the address distances between them, as ``nvshmem_ptr``
  gives across GPUs), one put per rank on its own stream, against the packing and
  unpacking copies the two-sided path makes around NCCL, in HBM GB/s. On one GPU this is
  the kernel's copy efficiency plus P launches, not NVLink.
* ``host``: host microseconds to issue one put (the direct launch), the same kernel
  through Triton's own launcher, and a one-element torch op for scale.
* ``wait``: the most a flag wait fused into the attention kernel could save: the separate
  (satisfied) one-CTA wait before a block's cuDNN attention, timed back to back.
* ``merge``: one LSE merge, the Triton kernel against the PyTorch ops it replaces, at the
  block shapes Torus Attention's ``a2a`` exchange merges at Flux 1024² and 2048² on four
  machines (6 heads, slots of S/4 tokens): GPU time (CUDA events over back-to-back calls)
  and host time to issue one call.

Writes kernel_speed.json and kernel_speed.md to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

from swiftfusion_xdit.kernels.peer_copy import PeerBuffers, all_to_all_put, wait_flags
from swiftfusion_xdit.nvshmem_transport import ctas_per_peer
from swiftfusion_xdit.transport import join_chunks, split_chunks
from timing import median_ms


def virtual_ranks(P: int, recv_shape, dtype) -> list[PeerBuffers]:
    """P ranks' receive buffers and flags on this GPU, each seeing the others at their
    address distance (elements), as the transport sees peers through ``nvshmem_ptr``."""
    datas = [torch.zeros(2, *recv_shape, dtype=dtype, device="cuda") for _ in range(P)]
    flags = [torch.zeros(2, P, dtype=torch.int64, device="cuda") for _ in range(P)]
    deltas = lambda ts, r: torch.tensor([(t.data_ptr() - ts[r].data_ptr()) // ts[r].element_size()
                                         for t in ts], dtype=torch.int64, device="cuda")
    return [PeerBuffers(datas[r], flags[r], deltas(datas, r), deltas(flags, r)) for r in range(P)]


def run_all_to_all(xs, bufs, scatter, gather, use, ctas, streams, dests) -> list[torch.Tensor]:
    """Every virtual rank's put (fused wait on) on its own stream, so the waits spin while
    the other ranks' kernels store; the current stream waits for all of them."""
    outs = []
    for r, (x, stream) in enumerate(zip(xs, streams)):
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            outs.append(all_to_all_put(x, scatter, gather, bufs[r], r, dests[r], use, ctas_per_peer=ctas))
    for stream in streams:
        torch.cuda.current_stream().wait_stream(stream)
    return outs


def time_ms(fn) -> float:
    return median_ms(fn, repeats=20, inner=10)


def copy_speed(P: int, tokens: int, heads: int = 24, n: int = 3) -> dict:
    """Kernel all-to-all of P virtual ranks vs the two-sided path's pack + unpack copies."""
    s = tokens // P
    xs = [torch.randn(n, 1, heads, s, 128, device="cuda", dtype=torch.bfloat16) for _ in range(P)]
    ctas = ctas_per_peer(n * (heads // P) * s * 128 * 2, P)  # the transport's choice
    bufs = virtual_ranks(P, (n, 1, heads // P, P * s, 128), torch.bfloat16)
    streams = [torch.cuda.Stream() for _ in range(P)]
    dests = [torch.tensor([(r + i) % P for i in range(P)], device="cuda") for r in range(P)]
    use = [0]

    def kernel():
        use[0] += 1
        run_all_to_all(xs, bufs, 2, 3, use[0], ctas, streams, dests)

    recv = [torch.empty_like(split_chunks(x, P, 2).contiguous()) for x in xs]

    def pack_unpack():  # what TwoSidedTransport copies besides NCCL's own transfer
        for x, r in zip(xs, recv):
            r.copy_(split_chunks(x, P, 2))
            join_chunks(r, 3).contiguous()

    total = sum(x.numel() * x.element_size() for x in xs)
    t_kernel, t_copies = time_ms(kernel), time_ms(pack_unpack)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(50):
        kernel()
    host_us = (time.perf_counter() - start) / 50 / P * 1e6  # Python + launch cost of one rank's call
    # bytes read + written by the kernel; the copies read and write it twice
    return {"P": P, "tokens": tokens, "bytes_all_ranks": total, "ctas_per_peer": ctas,
            "kernel_ms": t_kernel, "kernel_GBps": 2 * total / t_kernel / 1e6,
            "host_us_per_call": host_us, "pack_unpack_ms": t_copies, "pack_unpack_GBps": 4 * total / t_copies / 1e6}


def host_costs(P: int = 4, tokens: int = 4608) -> dict:
    """Host microseconds per call: the put on one virtual rank (no waits), Triton's own
    launcher for the same kernel, and a one-element torch op for scale."""
    import swiftfusion_xdit.kernels.peer_copy as pc
    s = tokens // P
    x = torch.randn(3, 1, 24, s, 128, device="cuda", dtype=torch.bfloat16)
    bufs = virtual_ranks(P, (3, 1, 24 // P, P * s, 128), torch.bfloat16)
    dests = torch.arange(P, device="cuda")
    use = [0]

    def put():
        use[0] += 1
        all_to_all_put(x, 2, 3, bufs[0], 0, dests, use[0], ctas_per_peer=4, wait=False)

    put()
    layout = next(iter(bufs[0].plans.values()))

    def triton_launcher():
        use[0] += 1
        args = (x, layout.dsts[use[0] % 2], bufs[0].flags, bufs[0].data_deltas, bufs[0].flag_deltas,
                dests, bufs[0].flags, bufs[0].data[0].numel(), 0, P, (use[0] + 1) // 2, use[0] % 2,
                *layout.ints)
        pc._put_chunks_kernel[(P * 4,)](*args, CTAS_PER_PEER=4, BLOCK_R=layout.blocks[0],
                                        BLOCK_D=layout.blocks[1], WAIT=False, COUNTED=False)

    one = torch.zeros(1, device="cuda")
    out = {}
    for name, fn in (("put_us", put), ("triton_launcher_us", triton_launcher),
                     ("torch_add_us", lambda: one.add_(1))):
        for _ in range(20):
            fn()
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(500):
            fn()
        out[name] = (time.perf_counter() - start) / 500 * 1e6
        torch.cuda.synchronize()
    out["fast_path_active"] = bool(pc._FAST[0] and layout.compiled)  # else put_us is Triton's path
    return out


def fused_wait_bound(heads: int = 24, head_dim: int = 128) -> list[dict]:
    """The separate one-CTA flag wait (already satisfied) enqueued before each block's
    attention, timed back to back against the attention alone, for Flux 1024² and 2048²
    blocks split over 2 and 4 GPUs."""
    from swiftfusion_xdit.block_attention import pick_kernel
    flags = torch.ones(2, 2, dtype=torch.int64, device="cuda")
    buf = PeerBuffers(torch.zeros(2, 1, device="cuda"), flags, flags[0], flags[0])
    source = torch.tensor([1], device="cuda")
    rows = []
    for tokens in (5120, 16896 + 512):
        for gpus in (2, 4):
            q = torch.randn(1, heads // gpus, tokens, head_dim, device="cuda", dtype=torch.bfloat16)
            kv = torch.randn(1, heads // gpus, tokens // 2, head_dim, device="cuda", dtype=torch.bfloat16)
            attend = pick_kernel(q)
            alone = time_ms(lambda: attend(q, kv, kv, head_dim ** -0.5))
            waited = time_ms(lambda: (wait_flags(buf, source, 1, 1), attend(q, kv, kv, head_dim ** -0.5)))
            rows.append({"tokens": tokens, "gpus": gpus, "attention_ms": alone, "with_wait_ms": waited,
                         "wait_us": 1e3 * (waited - alone), "share": (waited - alone) / alone})
    return rows


def merge_speed(fused: bool, rows: int, heads: int = 6, dim: int = 128) -> dict:
    from swiftfusion_xdit import block_attention
    out, block_out = (torch.randn(1, heads, rows, dim, device="cuda") for _ in range(2))
    lse, block_lse = (torch.randn(1, heads, rows, device="cuda") * 3 for _ in range(2))
    block_out = block_out.to(torch.bfloat16)  # blocks arrive in the model's dtype
    block_attention.fused_merge = fused
    call = lambda: block_attention.merge_into(out, lse, block_out, block_lse)
    gpu_ms = median_ms(call, repeats=20, inner=20)
    torch.cuda.synchronize()
    host = []
    for _ in range(10):
        start = time.perf_counter()
        for _ in range(20):
            call()
        host.append((time.perf_counter() - start) / 20 * 1e6)
        torch.cuda.synchronize()
    return {"form": "fused" if fused else "torch", "rows": rows, "gpu_us": gpu_ms * 1e3,
            "host_us": sorted(host)[len(host) // 2]}


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"] + ["| " + " | ".join(r) + " |" for r in rows]


def markdown(result: dict) -> str:
    lines = [f"# One-sided put and LSE merge speed, one {result['device']}"]
    if "copy_speed" in result:
        lines += ["", "All P virtual ranks' puts share one GPU here: HBM copy speed plus P launches "
                  "per all-to-all, not NVLink.", ""]
        lines += _table(["P", "tokens", "CTAs per peer", "all P puts, ms", "GB/s (read+write)", "pack+unpack copies, ms"],
                        [[f"{c['P']}", f"{c['tokens']}", f"{c['ctas_per_peer']}", f"{c['kernel_ms']:.3f}",
                          f"{c['kernel_GBps']:.0f}", f"{c['pack_unpack_ms']:.3f}"] for c in result["copy_speed"]])
    if "host_costs" in result:
        h = result["host_costs"]
        lines += ["", f"Host time per call: put {h['put_us']:.1f} us "
                  f"({'direct launch' if h['fast_path_active'] else 'Triton launcher: direct launch OFF'}), "
                  f"Triton's launcher {h['triton_launcher_us']:.1f} us, a one-element torch op "
                  f"{h['torch_add_us']:.1f} us."]
    if "fused_wait_bound" in result:
        lines += ["", "What fusing the flag wait into the attention kernel could save at most: the "
                  "separate (satisfied) one-CTA wait before a block's cuDNN attention, back to back.", ""]
        lines += _table(["tokens", "GPUs", "attention of one block, ms", "with the wait, ms", "wait, us", "share"],
                        [[f"{r['tokens']}", f"{r['gpus']}", f"{r['attention_ms']:.3f}", f"{r['with_wait_ms']:.3f}",
                          f"{r['wait_us']:.1f}", f"{100 * r['share']:.1f}%"] for r in result["fused_wait_bound"]])
    if "merge" in result:
        lines += ["", "LSE merge, one Triton launch vs PyTorch ops. GPU us: CUDA-event time per merge "
                  "over 20 back-to-back merges (a launch-bound merge shows the host's issue rate here); "
                  "host us: time to issue one merge.", ""]
        lines += _table(["rows (6 heads, dim 128)", "form", "GPU us", "host us"],
                        [[f"{t['rows']}", t["form"], f"{t['gpu_us']:.1f}", f"{t['host_us']:.1f}"] for t in result["merge"]])
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--parts", default="copy,host,wait,merge")
    ap.add_argument("--report", action="store_true", help="rewrite the table from OUT's kernel_speed.json")
    args = ap.parse_args(argv)
    path = os.path.join(args.out, "kernel_speed.json")
    if args.report:
        with open(path.replace(".json", ".md"), "w") as f:
            f.write(markdown(json.load(open(path))))
        return 0
    parts = args.parts.split(",")
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    if "copy" in parts:
        result["copy_speed"] = [copy_speed(P, tokens) for P in (2, 4, 8) for tokens in (4608, 16896)]
    if "host" in parts:
        result["host_costs"] = host_costs()
    if "wait" in parts:
        result["fused_wait_bound"] = fused_wait_bound()
    if "merge" in parts:
        from swiftfusion_xdit import block_attention
        if block_attention._fused_kernel() is None:  # else "fused" would silently be the PyTorch form
            raise SystemExit("the Triton merge did not import: is triton installed?")
        slot = {1024: 4608 // 4, 2048: 16896 // 4}  # tokens per machine at four machines
        result["merge"] = [merge_speed(f, slot[s] * n) for s in slot for n in (1, 3) for f in (False, True)]
    os.makedirs(args.out, exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    with open(path.replace(".json", ".md"), "w") as f:
        f.write(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
