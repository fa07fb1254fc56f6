"""Worker of test_gpu_multi.py: Torus Attention on GPUs against one-GPU attention, and
how much of the inter-machine exchange is hidden under compute (from a profiler trace).

    torchrun --nproc-per-node 4 tests/gpu/_worker_torus.py --nodes 2 --out DIR

One grid per launch (NCCL reads NCCL_HOSTID at init, so the emulated machine count is
fixed per process): ``--nodes M`` makes ranks [k*G, (k+1)*G) "machine" k by setting
NCCL_HOSTID (and SWIFTFUSION_NODE) before NCCL starts, so NCCL uses its network
transport between them, as between real machines. Writes
torus_check_{M}x{G}_{transport}.json: the equality checks (asserted by the test), and
the timing and hidden fraction (recorded only).

Hidden fraction: GPU kernels launched inside the ``torus_exchange`` profiler
range (NCCL send/recv of the inter-machine steps) are intervals on NCCL's
streams; compute kernels are every non-NCCL kernel. hidden = |exchange ∩
compute| / |exchange|. An NCCL kernel's interval includes the time it waits
for its peer, so this is the share of the exchange's time on the GPU during
which attention was running, not only of the bytes on the wire.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile

import torch
import torch.distributed as dist
import torch.nn.functional as F

from accuracy import rel_err
from kernel_breakdown import overlap, union
from timing import median_ms, save_and_shut_down
from swiftfusion_xdit.mesh import build_mesh, plan_layout
from swiftfusion_xdit.topology import detect_topology, emulate_machines
from swiftfusion_xdit.torus_attention import Joint, SPGroups, torus_attention
from swiftfusion_xdit.transport import resolve_transport

HEADS, HEAD_DIM, TEXT = 24, 128, 512  # FLUX.1-dev attention; 512 text tokens


def setup(nodes: int) -> None:
    emulate_machines(nodes)
    torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl", device_id=torch.device("cuda", torch.cuda.current_device()))


def reference(q, k, v, joint):
    """One-GPU attention over [text; image] in float32."""
    qf, kf, vf = (torch.cat((j, x), 2).float() for j, x in zip((joint.q, joint.k, joint.v), (q, k, v)))
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.EFFICIENT_ATTENTION):
        out = F.scaled_dot_product_attention(qf, kf, vf)
    return out[:, :, TEXT:], out[:, :, :TEXT]


def check(groups, sp_rank, sp, transport, image_tokens, dtype, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    rand = lambda n: torch.randn(1, HEADS, n, HEAD_DIM, device="cuda", dtype=dtype, generator=g)
    q, k, v = rand(image_tokens), rand(image_tokens), rand(image_tokens)
    joint = Joint(rand(TEXT), rand(TEXT), rand(TEXT))
    shard = image_tokens // sp
    sl = slice(sp_rank * shard, (sp_rank + 1) * shard)
    out, joint_out = torus_attention(q[:, :, sl], k[:, :, sl], v[:, :, sl], groups, joint=joint,
                                     transport=transport)
    ref, joint_ref = reference(q, k, v, joint)
    return rel_err(out, ref[:, :, sl]), rel_err(joint_out, joint_ref)


def time_ms(fn):
    return median_ms(fn, repeats=20, warmup=5, before=dist.barrier)


def hidden_fraction(trace_path: str) -> dict:
    events = json.load(open(trace_path))["traceEvents"]
    ranges = [e for e in events if e.get("cat") == "user_annotation" and e.get("name") == "torus_exchange"]
    launches = [e for e in events if e.get("cat") in ("cuda_runtime", "cuda_driver") and "args" in e]
    exchange_ids = {e["args"].get("correlation") for e in launches
                    if any(r["tid"] == e["tid"] and r["ts"] <= e["ts"] <= r["ts"] + r["dur"] for r in ranges)}
    kernels = [e for e in events if e.get("cat") == "kernel"]
    exch = union([(e["ts"], e["ts"] + e["dur"]) for e in kernels
                   if e["args"].get("correlation") in exchange_ids])
    compute = union([(e["ts"], e["ts"] + e["dur"]) for e in kernels if "nccl" not in e["name"].lower()])
    exch_us = sum(e - s for s, e in exch)
    hidden_us = overlap(exch, compute)
    compute_us = sum(e - s for s, e in compute)
    return {"exchange_gpu_us": exch_us, "compute_gpu_us": compute_us, "hidden_us": hidden_us,
            "hidden_fraction": hidden_us / exch_us if exch_us else None,
            "compute_under_exchange_fraction": hidden_us / compute_us if compute_us else None}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--nodes", type=int, default=1)
    ap.add_argument("--out", required=True)
    ap.add_argument("--comm", default="nccl")
    args = ap.parse_args()
    setup(args.nodes)
    rank, world = dist.get_rank(), dist.get_world_size()
    topo = detect_topology()
    layout = plan_layout(topo, HEADS, ulysses=topo.gpus_per_node, torus=topo.num_nodes)
    mesh = build_mesh(layout, "cuda")
    transport = resolve_transport(args.comm)
    groups = SPGroups(mesh.ulysses_group, mesh.torus_group, layout.torus_exchange)
    result = {"device": torch.cuda.get_device_name(), "world": world, "layout": layout.describe(),
              "transport": transport.name, "checks": [], "timing": {}}

    for tokens in (4096, 16384):  # Flux 1024² and 2048² image tokens (+512 text)
        for dtype in (torch.bfloat16, torch.float16):
            err, jerr = check(groups, mesh.sp_rank, layout.dims.sp, transport, tokens, dtype,
                              seed=1234 + tokens)
            errs = torch.tensor([err, jerr], device="cuda")
            dist.all_reduce(errs, op=dist.ReduceOp.MAX)
            result["checks"].append({"image_tokens": tokens, "text_tokens": TEXT, "dtype": str(dtype),
                                     "max_rel_err": errs[0].item(), "max_joint_rel_err": errs[1].item(),
                                     "pass": bool(errs.max().item() < 2e-2)})

    tokens = 16384
    shard = tokens // layout.dims.sp
    mk = lambda n: torch.randn(1, HEADS, n, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    q, k, v = mk(shard), mk(shard), mk(shard)
    joint = Joint(mk(TEXT), mk(TEXT), mk(TEXT))
    run = lambda: torus_attention(q, k, v, groups, joint=joint, transport=transport)
    result["timing"]["torus_attention_ms"] = time_ms(run)
    full = [mk(tokens + TEXT) for _ in range(3)]
    one_gpu = lambda: F.scaled_dot_product_attention(*full)
    result["timing"]["one_gpu_sdpa_ms"] = time_ms(one_gpu)

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                            torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            run()
        torch.cuda.synchronize()
    path = os.path.join(tempfile.gettempdir(), f"torus_trace_{rank}.json")
    prof.export_chrome_trace(path)
    if rank == world - 1:  # keep one raw trace for inspection
        import gzip, shutil
        os.makedirs(args.out, exist_ok=True)
        with open(path, "rb") as src, gzip.open(os.path.join(args.out, f"trace_{args.nodes}n_rank{rank}.json.gz"), "wb") as dst:
            shutil.copyfileobj(src, dst)
    overlap = hidden_fraction(path)
    gathered = [None] * world
    dist.all_gather_object(gathered, overlap)
    result["overlap_per_rank"] = gathered
    save_and_shut_down(result, args.out, f"torus_check_{args.nodes}x{world // args.nodes}_{transport.name}.json")


if __name__ == "__main__":
    main()
