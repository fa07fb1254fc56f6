"""Host time per all-to-all call: what the CPU spends issuing one, before any GPU work.

    torchrun --nproc-per-node 1 benchmarks/host_overhead.py --out DIR
    torchrun --nproc-per-node 2 benchmarks/host_overhead.py --shared-gpu --out DIR   (under CUDA MPS)

On two H200s the eager NVSHMEM all-to-all sat at ~40 us per call from 256 KiB to
4 MiB while 16 MiB took 36 us: below 4 MiB the calls are issued slower than the GPU
runs them. One rank on one GPU shows that cost alone (its kernel copies to itself, a
few microseconds of GPU time): each path is called back to back and timed on the
host (median of repeats), beside the GPU time of the same calls, the pieces of the
eager path timed one by one, and a cProfile of it.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import statistics
import time

import torch
import torch.distributed as dist


def host_us(fn, calls: int = 300, repeats: int = 7) -> dict:
    """Host microseconds per call (median of repeats) and GPU microseconds per call."""
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    host, gpu = [], []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        host.append((time.perf_counter() - t0) / calls * 1e6)
        end.record()
        end.synchronize()
        gpu.append(start.elapsed_time(end) / calls * 1e3)
    return {"host_us": statistics.median(host), "gpu_us": statistics.median(gpu)}


def profile(fn, calls: int = 300) -> str:
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(calls):
        fn()
    prof.disable()
    torch.cuda.synchronize()
    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(18)
    return text.getvalue()


def raw_launches(channel) -> dict:
    """The compiled put kernel launched straight (as ``peer_copy._run_compiled`` does), with its
    tensors passed as tensors and as raw pointers: how much of a call is Triton's launcher.
    With one rank the use number can repeat: its flag only grows, so each wait passes."""
    layout = next(iter(channel.buffers.plans.values()))
    key, kernel = min((k, v) for k, v in layout.compiled.items() if not k[-1])  # an eager variant
    slot, b, dests = key[0], channel.buffers, channel.table((0,))
    x = torch.randn(1, 512 * 1024, device="cuda", dtype=torch.bfloat16)
    tensors = (x, layout.dsts[slot], b.flags, b.data_deltas, b.flag_deltas, dests, b.flags,
               b.data[0].numel(), 0, 1, 1, slot, *layout.ints)
    pointers = tuple(a.data_ptr() if isinstance(a, torch.Tensor) else a for a in tensors)
    meta = (key[3], *layout.blocks, True, False)  # CTAS_PER_PEER, BLOCK_R, BLOCK_D, WAIT, COUNTED
    stream = torch.cuda.current_stream().cuda_stream

    def run(args):
        return lambda: kernel.run(1, 1, 1, stream, kernel.function, kernel.packed_metadata,
                                  None, None, None, *args, *meta)
    return {"kernel.run, tensor arguments": run(tensors), "kernel.run, raw pointers": run(pointers)}


def with_peers(args) -> None:
    """Several processes on one GPU (CUDA MPS): the eager NVSHMEM all-to-all with real peers,
    its kernels waiting on flags other processes raise. NCCL refuses two ranks on one GPU, so
    torch.distributed runs on gloo and only NVSHMEM is timed; a shared GPU has no NVLink, so
    only the per-call time of small transfers (host issue + flag round trip) means anything."""
    from swiftfusion_xdit.nvshmem_transport import NvshmemTransport, shutdown_nvshmem
    dist.init_process_group("gloo")
    torch.cuda.set_device(0)
    world, rank = dist.group.WORLD, dist.get_rank()
    nv = NvshmemTransport()
    result = {"label": args.label, "device": torch.cuda.get_device_name(), "ranks": dist.get_world_size(),
              "shared_gpu": True, "sizes": []}
    for kib in (256, 1024, 4096):
        x = torch.randn(dist.get_world_size(), kib * 512 // dist.get_world_size(), device="cuda",
                        dtype=torch.bfloat16)
        dist.barrier()
        t = host_us(lambda: nv.all_to_all(x, world), calls=200, repeats=7)
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, t)
        result["sizes"].append({"per_rank_bytes": kib * 1024, "nvshmem_eager_us_slowest_rank":
                                max(g["gpu_us"] for g in gathered),
                                "host_us_slowest_rank": max(g["host_us"] for g in gathered)})
    if rank == 0:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, f"peers_{args.label}.json"), "w") as f:
            json.dump(result, f, indent=2)
        for row in result["sizes"]:
            print(f"{args.label} {row['per_rank_bytes'] // 1024} KiB: {row['nvshmem_eager_us_slowest_rank']:.1f} us "
                  f"per call (host {row['host_us_slowest_rank']:.1f})")
    dist.barrier()
    shutdown_nvshmem()
    dist.destroy_process_group()


def main():
    from swiftfusion_xdit.nvshmem_transport import shutdown_nvshmem
    from swiftfusion_xdit.transport import resolve_transport

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--label", default="")
    ap.add_argument("--shared-gpu", action="store_true",
                    help="every rank on GPU 0 under CUDA MPS: NVSHMEM with real peers, gloo beside it")
    args = ap.parse_args()
    if args.shared_gpu:
        return with_peers(args)
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl", device_id=torch.device("cuda", torch.cuda.current_device()))
    world = dist.group.WORLD
    nv = resolve_transport("nvshmem")
    x = torch.randn(1, 512 * 1024, device="cuda", dtype=torch.bfloat16)  # 1 MiB
    out, small = torch.empty_like(x), torch.zeros(8, device="cuda")
    nv.all_to_all(x, world)
    nv.all_to_all_counted(x, world)
    channel, _, _ = next(iter(nv._sites.values()))
    data = channel.buffers.data
    paths = {
        "torch add_ (one small op)": lambda: small.add_(1),
        "nccl all_to_all_single": lambda: dist.all_to_all_single(out, x),
        "nvshmem all_to_all (eager)": lambda: nv.all_to_all(x, world),
        "nvshmem all_to_all_counted (graph path, eager)": lambda: nv.all_to_all_counted(x, world),
        # the pieces of the eager path
        "torch.cuda.current_stream().cuda_stream": lambda: torch.cuda.current_stream().cuda_stream,
        "torch._C._cuda_getCurrentRawStream(i)": lambda: torch._C._cuda_getCurrentRawStream(0),
        "torch.cuda.is_current_stream_capturing()": torch.cuda.is_current_stream_capturing,
        "torch.compiler.is_compiling()": torch.compiler.is_compiling,
        "buffers.data[1] (a slot view)": lambda: data[1],
        "(x.shape, x.stride()) key": lambda: ("a2a", 0, 0, x.shape, x.stride()),
    }
    paths.update(raw_launches(channel))
    result = {"label": args.label, "device": torch.cuda.get_device_name(), "bytes": x.numel() * 2,
              "paths": {name: host_us(fn) for name, fn in paths.items()},
              "profile_eager_nvshmem": profile(paths["nvshmem all_to_all (eager)"])}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"host_overhead{args.label and '_' + args.label}.json"), "w") as f:
        json.dump(result, f, indent=2)
    for name, t in result["paths"].items():
        print(f"{name:50s} host {t['host_us']:7.2f} us  gpu {t['gpu_us']:7.2f} us")
    print(result["profile_eager_nvshmem"])
    shutdown_nvshmem()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
