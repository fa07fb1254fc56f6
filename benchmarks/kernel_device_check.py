"""The one-sided kernels on a GPU: correctness with real concurrency, and their copy speed.

    python benchmarks/kernel_device_check.py --out benchmarks/results/kernels/
    torchrun --nproc-per-node N benchmarks/kernel_device_check.py --nvshmem --out ...

Without torchrun, P "virtual ranks" share one GPU: each has its own receive
buffer and flag array, the deltas are the address distances between them,
and each rank's kernel runs on its own stream with the fused wait on, so the
flag waits really spin while the other ranks' kernels store. Checked bit for
bit against the reference layout: the Ulysses all-to-all both ways (Flux
2048²: 16,896 tokens, 24 heads, head dim 128; Flux 1024²; an odd shape),
bf16 and fp16, over three uses (the slots are reused), and one torus step.
Timed: the all-to-all of all P virtual ranks (a copy of every rank's chunk
into the others' buffers, fused transpose), against the packing and
unpacking copies the two-sided path makes around NCCL, in HBM GB/s. On one
GPU this measures the kernel's copy efficiency, not NVLink.

With ``--nvshmem`` under torchrun it also runs the real transport (NVSHMEM
symmetric heap, ``nvshmem_ptr`` deltas) against NCCL on every rank.
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import os
import time

import torch

from swiftfusion_xdit.kernels.peer_copy import PeerBuffers, all_to_all_put, put_one, wait_flags
from swiftfusion_xdit.nvshmem_transport import ctas_per_peer
from swiftfusion_xdit.transport import join_chunks, split_chunks
from timing import median_ms


def virtual_ranks(P, recv_shape, dtype):
    datas = [torch.zeros(2, *recv_shape, dtype=dtype, device="cuda") for _ in range(P)]
    flags = [torch.zeros(2, P, dtype=torch.int64, device="cuda") for _ in range(P)]
    deltas = lambda ts, r: torch.tensor([(t.data_ptr() - ts[r].data_ptr()) // ts[r].element_size()
                                         for t in ts], dtype=torch.int64, device="cuda")
    return [PeerBuffers(datas[r], flags[r], deltas(datas, r), deltas(flags, r)) for r in range(P)]


def run_all_to_all(xs, bufs, scatter, gather, use, ctas, streams, dests):
    outs = []
    for r, (x, stream) in enumerate(zip(xs, streams)):
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            outs.append(all_to_all_put(x, scatter, gather, bufs[r], r, dests[r], use, ctas_per_peer=ctas))
    for stream in streams:
        torch.cuda.current_stream().wait_stream(stream)
    return outs


def check_ulysses(P, n, heads, tokens, dtype, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    s = tokens // P
    ctas = ctas_per_peer(n * (heads // P) * s * 128 * dtype.itemsize, P)  # the transport's choice
    bufs = virtual_ranks(P, (n, 1, heads // P, P * s, 128), dtype)
    back = virtual_ranks(P, (n, 1, heads, s, 128), dtype)
    streams = [torch.cuda.Stream() for _ in range(P)]
    dests = [torch.tensor([(r + i) % P for i in range(P)], device="cuda") for r in range(P)]
    ok = True
    for use in (1, 2, 3):
        xs = [torch.randn(n, 1, heads, s, 128, device="cuda", dtype=dtype, generator=g) for _ in range(P)]
        outs = run_all_to_all(xs, bufs, 2, 3, use, ctas, streams, dests)
        backs = run_all_to_all(outs, back, 3, 2, use, ctas, streams, dests)
        torch.cuda.synchronize()
        for r in range(P):
            h = slice(r * heads // P, (r + 1) * heads // P)
            ok &= torch.equal(outs[r], torch.cat([x[:, :, h] for x in xs], dim=3))
            ok &= torch.equal(backs[r], xs[r])
    return {"P": P, "n": n, "heads": heads, "tokens": tokens, "dtype": str(dtype), "bit_exact": bool(ok)}


def check_exchange(P, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    shape = (2, 1, 6, 4224, 128)
    ctas = ctas_per_peer(torch.Size(shape).numel() * 2, P)
    bufs = virtual_ranks(P, shape, torch.bfloat16)
    streams = [torch.cuda.Stream() for _ in range(P)]
    ok = True
    for use in (1, 2, 3):
        sends = [torch.randn(*shape, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(P)]
        for r in range(P):
            streams[r].wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(streams[r]):
                put_one(sends[r], bufs[r], r, torch.tensor([(r + 1) % P], device="cuda"), use, ctas_per_peer=ctas)
        for r in range(P):  # the receivers wait on the compute stream, as _Pending.wait does
            wait_flags(bufs[r], torch.tensor([(r - 1) % P], device="cuda"), use, ctas)
            ok &= torch.equal(bufs[r].data[use % 2], sends[(r - 1) % P])
    torch.cuda.synchronize()
    return {"P": P, "shape": list(shape), "bit_exact": bool(ok)}


def check_wait_counts(P=5):
    """A wait for 4 CTAs per peer after one for 1 must still wait for all 4 (Triton once
    compiled the count 1 into the kernel, and the launch cache served it for 4). A group
    size no other check uses, so the first wait compiled for it is this one's."""
    buf = virtual_ranks(P, (4,), torch.float32)[0]
    source = torch.tensor([1], device="cuda")
    buf.flags[1, 1] = 1  # use 1 (slot 1, epoch 1): one CTA of the peer's has signalled
    wait_flags(buf, source, 1, 1)  # one CTA per peer: satisfied at once
    torch.cuda.synchronize()
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        wait_flags(buf, source, 1, 4)  # four CTAs per peer: must spin
        done = torch.cuda.Event()
        done.record(stream)
    time.sleep(1.0)
    returned_early = done.query()
    buf.flags[1, 1] = 4  # the other three signal (another stream than the spinning kernel's)
    stream.synchronize()
    return {"P": P, "returned_early": returned_early, "bit_exact": not returned_early}


def time_ms(fn):
    return median_ms(fn, repeats=20, inner=10)


def time_copy_speed(P, tokens, heads=24, n=3):
    """Kernel all-to-all of P virtual ranks vs the two-sided path's pack + unpack copies."""
    s = tokens // P
    xs = [torch.randn(n, 1, heads, s, 128, device="cuda", dtype=torch.bfloat16) for _ in range(P)]
    ctas = ctas_per_peer(n * (heads // P) * s * 128 * 2, P)
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


def host_costs(P=4, tokens=4608):
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
    out["fast_path_active"] = bool(pc._FAST[0] and layout.compiled)
    return out


def nvshmem_transport_check(seed):
    import torch.distributed as dist
    from swiftfusion_xdit.transport import TwoSidedTransport, resolve_transport
    torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl", device_id=torch.device("cuda", torch.cuda.current_device()))
    world = dist.get_world_size()
    nv, nccl = resolve_transport("nvshmem"), TwoSidedTransport("nccl")
    g = torch.Generator(device="cuda").manual_seed(seed + dist.get_rank())
    results = []
    for tokens in (16896, 4608):
        for dtype in (torch.bfloat16, torch.float16):
            ok = True
            for _ in range(3):
                x = torch.randn(3, 1, 24, tokens // world, 128, device="cuda", dtype=dtype, generator=g)
                ok &= torch.equal(nv.all_to_all(x, dist.group.WORLD, 2, 3).clone(),
                                  nccl.all_to_all(x, dist.group.WORLD, 2, 3))
            flag = torch.tensor([int(ok)], device="cuda")
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
            results.append({"world": world, "tokens": tokens, "dtype": str(dtype), "bit_exact": bool(flag.item())})
    results.append(heap_check(nv))
    from swiftfusion_xdit.nvshmem_transport import shutdown_nvshmem
    dist.barrier()
    shutdown_nvshmem()
    dist.destroy_process_group()
    return results


def heap_check(nv):
    """What the problem took from the heap, whether it grew past its first reservation,
    and the message for a channel the GPU cannot hold."""
    import torch.distributed as dist
    from swiftfusion_xdit.nvshmem_transport import _STATE, parse_size
    reserved = parse_size(os.environ["NVSHMEM_SYMMETRIC_SIZE"])
    out = {"first_reservation_MiB": reserved / 2**20, "pe_of_rank": _STATE["pe_of_rank"],
           "symmetric_MiB_in_use": _STATE["symmetric_bytes"] / 2**20,
           "grew_past_reservation": _STATE["symmetric_bytes"] > reserved}
    try:
        nv._channel("oversize", (2**40,), torch.bfloat16, dist.group.WORLD, 2**41)
        out["oversize_refused"] = None
    except RuntimeError as err:
        out["oversize_refused"] = str(err)
    return out


def fused_wait_bound(heads=24, head_dim=128):
    """The most an attention kernel that polls its block's flag itself could save: the
    separate one-CTA flag wait (already satisfied) enqueued before each block's attention,
    timed back to back against the attention alone, for Flux 1024² and 2048² blocks split
    over 2 and 4 GPUs."""
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


def progress(item):
    print(json.dumps(item), flush=True)
    return item


def fused_wait_lines(rows: list[dict]) -> list[str]:
    lines = ["", "What fusing the flag wait into the attention kernel could save at most: the "
             "separate (satisfied) one-CTA wait before a block's cuDNN attention, back to back.", "",
             "| tokens | GPUs | attention of one block, ms | with the wait, ms | wait, us | share |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['tokens']} | {r['gpus']} | {r['attention_ms']:.3f} | {r['with_wait_ms']:.3f} "
                     f"| {r['wait_us']:.1f} | {100 * r['share']:.1f}% |")
    return lines


def markdown(result: dict) -> str:
    if "ulysses_virtual_ranks" not in result:  # --fused-wait-only
        return "\n".join([f"# Flag wait before attention, one {result['device']}"]
                          + fused_wait_lines(result["fused_wait_bound"])) + "\n"
    lines = [f"# One-sided kernels on one {result['device']} (virtual ranks)", ""]
    checks = result["ulysses_virtual_ranks"] + result["exchange_virtual_ranks"]
    lines += [f"Bit-exact against the reference layout: {sum(c['bit_exact'] for c in checks)} of "
              f"{len(checks)} checks (Ulysses both ways, bf16/fp16, 3 uses; torus steps; a wait "
              f"for 4 CTAs per peer after one for 1 still waits).", ""]
    h = result["host_costs"]
    lines += [f"Host time per call: put {h['put_us']:.1f} us (direct launch), Triton's launcher "
              f"{h['triton_launcher_us']:.1f} us, a one-element torch op {h['torch_add_us']:.1f} us.", "",
              "| P | tokens | CTAs per peer | all P puts, ms | GB/s (read+write) | pack+unpack copies, ms |",
              "|---|---|---|---|---|---|"]
    for c in result["copy_speed"]:
        lines.append(f"| {c['P']} | {c['tokens']} | {c['ctas_per_peer']} | {c['kernel_ms']:.3f} | "
                     f"{c['kernel_GBps']:.0f} | {c['pack_unpack_ms']:.3f} |")
    lines += ["", "All P ranks' kernels share one GPU here, so this is HBM copy speed plus host "
              "launch cost (P launches per all-to-all), not NVLink."]
    if "fused_wait_bound" in result:
        lines += fused_wait_lines(result["fused_wait_bound"])
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--report", help="write the Markdown table for a saved virtual-ranks JSON")
    ap.add_argument("--nvshmem", action="store_true", help="under torchrun: the real NVSHMEM transport")
    ap.add_argument("--fused-wait-only", action="store_true", help="only the fused-wait bound")
    args = ap.parse_args()
    if args.report:
        with open(args.report.replace(".json", ".md"), "w") as f:
            f.write(markdown(json.load(open(args.report))))
        return
    faulthandler.dump_traceback_later(150, exit=True)  # a hang says where, not just "timed out"
    rank = int(os.environ.get("RANK", 0))
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    if args.nvshmem:
        result["nvshmem_transport"] = nvshmem_transport_check(5)
    elif args.fused_wait_only:
        result["fused_wait_bound"] = [progress(r) for r in fused_wait_bound()]
    else:
        checks = [(P, 3, 24, tokens, dtype) for P in (2, 4, 8) for tokens in (16896, 4608)
                  for dtype in (torch.bfloat16, torch.float16)] + [(3, 1, 6, 3 * 37, torch.bfloat16)]
        result["ulysses_virtual_ranks"] = [progress(check_ulysses(*c, 100 + i)) for i, c in enumerate(checks)]
        result["exchange_virtual_ranks"] = [progress(check_exchange(P, 9)) for P in (2, 4)]
        result["exchange_virtual_ranks"].append(progress(check_wait_counts()))
        result["host_costs"] = progress(host_costs())
        result["fused_wait_bound"] = [progress(r) for r in fused_wait_bound()]
        result["copy_speed"] = [progress(time_copy_speed(P, tokens)) for P in (2, 4, 8)
                                for tokens in (4608, 16896)]
    if rank == 0:
        os.makedirs(args.out, exist_ok=True)
        name = ("kernel_nvshmem.json" if args.nvshmem else
                "fused_wait_bound.json" if args.fused_wait_only else "kernel_virtual_ranks.json")
        with open(os.path.join(args.out, name), "w") as f:
            json.dump(result, f, indent=2)
        if not args.nvshmem:
            with open(os.path.join(args.out, name.replace(".json", ".md")), "w") as f:
                f.write(markdown(result))
        print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
