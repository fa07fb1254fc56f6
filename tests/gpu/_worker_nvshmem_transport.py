"""Worker of test_gpu_nvshmem.py: the NVSHMEM transport against NCCL, one rank per GPU.

    torchrun --nproc-per-node N tests/gpu/_worker_nvshmem_transport.py --out DIR

The real transport (NVSHMEM symmetric heap, ``nvshmem_ptr`` deltas) beside NCCL on
every rank: the Ulysses all-to-all must be bit-exact at Flux 2048² and 1024² shapes,
bf16 and fp16, three calls each (one rank is enough to run it: a PE that copies to
itself). Then the heap: what the problem took, whether it grew past its first
reservation, and the message for a channel no GPU could hold. Writes
kernel_nvshmem.json.
"""

from __future__ import annotations

import argparse
import faulthandler
import os

import torch
import torch.distributed as dist

from swiftfusion_xdit.nvshmem_transport import _STATE, parse_size
from swiftfusion_xdit.transport import TwoSidedTransport, resolve_transport
from timing import save_and_shut_down


def all_to_all_checks(nv, nccl, seed: int) -> list[dict]:
    world = dist.get_world_size()
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
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)  # every rank's
            results.append({"world": world, "tokens": tokens, "dtype": str(dtype), "bit_exact": bool(flag.item())})
    return results


def heap_check(nv) -> dict:
    reserved = parse_size(os.environ["NVSHMEM_SYMMETRIC_SIZE"])
    out = {"first_reservation_MiB": reserved / 2**20, "pe_of_rank": _STATE["pe_of_rank"],
           "symmetric_MiB_in_use": _STATE["symmetric_bytes"] / 2**20,
           "grew_past_reservation": _STATE["symmetric_bytes"] > reserved}
    try:  # 1 TiB elements: no GPU holds it
        nv._channel("oversize", (2**40,), torch.bfloat16, dist.group.WORLD, 2**41)
        out["oversize_refused"] = None
    except RuntimeError as err:
        out["oversize_refused"] = str(err)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    faulthandler.dump_traceback_later(150, exit=True)  # a hang says where, not just "timed out"
    torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl", device_id=torch.device("cuda", torch.cuda.current_device()))
    nv = resolve_transport("nvshmem")
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "nvshmem_transport": all_to_all_checks(nv, TwoSidedTransport("nccl"), 5)}
    result["heap"] = heap_check(nv)
    save_and_shut_down(result, args.out, "kernel_nvshmem.json")


if __name__ == "__main__":
    main()
