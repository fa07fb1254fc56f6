"""Worker of test_gpu_nvshmem.py: the NVSHMEM transport across real processes, one
NVSHMEM PE each, several sharing one GPU (under CUDA MPS) or one GPU each.

    torchrun --nproc-per-node 4 tests/gpu/_worker_shared_gpu.py --machines 2 --out DIR

This runs the one-sided transport as it runs in production -- one process per rank,
symmetric buffers mapped into the other processes, flags raised across processes --
also where every PE is on the same GPU (NVSHMEM's "multiple PEs per GPU", which needs
MPS for kernels of different processes to run at once: the kernels spin on each other's
flags). ``--machines M`` emulates M machines (``SWIFTFUSION_NODE``), so NVSHMEM starts
one job per machine.

NCCL refuses two ranks on one GPU, so torch.distributed runs on gloo here and the
references are built from CPU copies: the Ulysses all-to-all both ways and one torus
step must be bit-exact, and Torus Attention with the NVSHMEM transport must equal
one-process attention within bf16 tolerance (one machine; across machines the torus
needs NCCL). Writes shared_gpu_{ranks}ranks_{machines}machines.json, which the test
asserts on; nothing is timed.
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F

from accuracy import rel_err
from swiftfusion_xdit.nvshmem_transport import _STATE, NvshmemTransport
from swiftfusion_xdit.topology import emulate_machines
from swiftfusion_xdit.torus_attention import Joint, SPGroups, torus_attention
from timing import save_and_shut_down

HEADS, HEAD_DIM, TEXT = 24, 128, 512  # FLUX.1-dev attention


def machine_groups(machines: int):
    """Every rank creates every machine's group (new_group is collective); ours is returned."""
    world, rank = dist.get_world_size(), dist.get_rank()
    per = world // machines
    groups = [dist.new_group(list(range(m * per, (m + 1) * per))) for m in range(machines)]
    return groups[rank // per]


def gather_cpu(x: torch.Tensor, group) -> list[torch.Tensor]:
    parts = [torch.empty_like(x, device="cpu") for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, x.cpu(), group=group)
    return parts


def check_all_to_all(nv, group, tokens, dtype, seed):
    P, me = dist.get_world_size(group), dist.get_rank(group)
    g = torch.Generator(device="cuda").manual_seed(seed + dist.get_rank())
    h = slice(me * HEADS // P, (me + 1) * HEADS // P)
    ok = True
    for _ in range(3):  # three uses: both slots, one reused
        x = torch.randn(3, 1, HEADS, tokens // P, HEAD_DIM, device="cuda", dtype=dtype, generator=g)
        out = nv.all_to_all(x, group, 2, 3).clone()
        back = nv.all_to_all(out, group, 3, 2).clone()
        expected = torch.cat([part[:, :, h] for part in gather_cpu(x, group)], dim=3)
        ok &= torch.equal(out.cpu(), expected) and torch.equal(back, x)
    return ok


def check_exchange(nv, group, seed):
    P, me = dist.get_world_size(group), dist.get_rank(group)
    g = torch.Generator(device="cuda").manual_seed(seed + dist.get_rank())
    ok = True
    for _ in range(3):
        send = torch.randn(2, 1, 6, 1056, HEAD_DIM, device="cuda", dtype=torch.bfloat16, generator=g)
        got = nv.exchange(send, (me + 1) % P, (me - 1) % P, group).wait().clone()
        ok &= torch.equal(got.cpu(), gather_cpu(send, group)[(me - 1) % P])
    return ok


def check_torus_attention(nv, group, image_tokens, seed, padded=False):
    """One machine: Ulysses over NVSHMEM, against attention over the whole sequence;
    ``padded``: with a key-padding mask (text keys and the last rank's image keys)."""
    P, me = dist.get_world_size(group), dist.get_rank(group)
    g = torch.Generator(device="cuda").manual_seed(seed)  # same inputs on every rank
    rand = lambda n: torch.randn(1, HEADS, n, HEAD_DIM, device="cuda", dtype=torch.bfloat16, generator=g)
    q, k, v = rand(image_tokens), rand(image_tokens), rand(image_tokens)
    keep = torch.ones(1, TEXT + image_tokens, dtype=torch.bool, device="cuda")
    if padded:
        keep[:, TEXT // 2:TEXT] = False
        keep[:, TEXT + (P - 1) * image_tokens // P:] = False
    joint = Joint(rand(TEXT), rand(TEXT), rand(TEXT), keep[:, :TEXT] if padded else None)
    sl = slice(me * image_tokens // P, (me + 1) * image_tokens // P)
    out, joint_out = torus_attention(q[:, :, sl], k[:, :, sl], v[:, :, sl], SPGroups(group, None),
                                     joint=joint, transport=nv,
                                     key_mask=keep[:, TEXT:][:, sl] if padded else None)
    full = [torch.cat((j, x), 2).float() for j, x in zip((joint.q, joint.k, joint.v), (q, k, v))]
    ref = F.scaled_dot_product_attention(*full, attn_mask=keep[:, None, None, :])
    return rel_err(out, ref[:, :, TEXT:][:, :, sl]), rel_err(joint_out, ref[:, :, :TEXT])


def check_cuda_graph(nv, group, tokens, seed):
    """Three all-to-alls captured in one CUDA graph (an odd count, so a channel's slots
    alternate across replays) and replayed with new inputs."""
    P, me = dist.get_world_size(group), dist.get_rank(group)
    g = torch.Generator(device="cuda").manual_seed(seed + dist.get_rank())
    x = torch.randn(3, 1, HEADS, tokens // P, HEAD_DIM, device="cuda", dtype=torch.bfloat16, generator=g)

    def sequence(a2a):
        a = a2a(x, group, 2, 3)
        return a, a2a(a, group, 3, 2), a2a(x * 2, group, 2, 3)

    sequence(nv.all_to_all_counted)  # every call site's channel and kernel exist before capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        a, back, doubled = sequence(nv.all_to_all)  # capturing: the transport counts on the device
    h = slice(me * HEADS // P, (me + 1) * HEADS // P)
    ok = True
    for _ in range(4):
        x.copy_(torch.randn(x.shape, device="cuda", dtype=x.dtype, generator=g))
        graph.replay()
        expected = torch.cat([part[:, :, h] for part in gather_cpu(x, group)], dim=3)
        ok &= torch.equal(a.cpu(), expected) and torch.equal(back, x) and torch.equal(doubled.cpu(), expected * 2)
    return ok


def check_compiled(nv, group, image_tokens, seed):
    """Torus Attention under torch.compile(mode="reduce-overhead") (CUDA graphs, as xDiT's
    Flux runner compiles), replayed on new inputs, against attention over the whole sequence."""
    P, me = dist.get_world_size(group), dist.get_rank(group)
    f = torch.compile(lambda q, k, v: torus_attention(q, k, v, SPGroups(group, None), transport=nv),
                      mode="reduce-overhead")
    g = torch.Generator(device="cuda").manual_seed(seed)  # same inputs on every rank
    sl = slice(me * image_tokens // P, (me + 1) * image_tokens // P)
    worst = 0.0
    for _ in range(4):  # warm-up, recording, then replays
        q, k, v = (torch.randn(1, HEADS, image_tokens, HEAD_DIM, device="cuda", dtype=torch.bfloat16,
                               generator=g) for _ in range(3))
        out = f(q[:, :, sl], k[:, :, sl], v[:, :, sl]).clone()
        ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float())[:, :, sl]
        worst = max(worst, rel_err(out, ref))
    return worst


def check_diffusers(seed):
    """The diffusers path end to end: a FLUX.1-dev transformer (its real widths, heads and
    text length; 2 + 4 blocks instead of 19 + 38 so four copies fit on one GPU), random bf16
    weights, sharded by ``parallelize_transformer(comm="nvshmem")`` against the same model
    unparallelised. Eager only: diffusers' own split/gather hooks run over gloo here, which
    a CUDA graph cannot hold."""
    from diffusers import FluxTransformer2DModel
    import flux_device_check
    from swiftfusion_xdit import nvshmem_transport
    from swiftfusion_xdit.diffusers_integration import parallelize_transformer
    from swiftfusion_xdit.tiny import FLUX_DEV_TRANSFORMER

    def build():
        torch.manual_seed(seed)
        with torch.device("cuda"):
            return FluxTransformer2DModel(**{**FLUX_DEV_TRANSFORMER, "num_layers": 2,
                                             "num_single_layers": 4}).to(torch.bfloat16).eval()
    # torch.distributed runs on gloo here (NCCL refuses ranks sharing a GPU), which the
    # availability check would refuse: NVSHMEM itself only needs the group to bootstrap.
    nvshmem_transport.unavailable_reason = lambda: None
    # and gloo crashes (SIGSEGV) gathering CUDA tensors through functional collectives, as
    # diffusers' output gather does: stage that one through the CPU
    import diffusers.hooks.context_parallel as cp_hooks
    gather = cp_hooks.funcol.all_gather_tensor
    cp_hooks.funcol = type("StagedFuncol", (), {"all_gather_tensor": staticmethod(
        lambda x, dim, group: gather(x.cpu(), dim, group=group).to(x.device))})  # using it waits
    kwargs = flux_device_check.flux_inputs("1024", seed)
    with torch.no_grad():
        reference = build()(**kwargs)[0]
        model = build()
        layout = parallelize_transformer(model, "torus", comm="nvshmem")
        out = model(**kwargs)[0]
    return rel_err(out, reference), layout.describe()


def all_ranks(value: float, op=dist.ReduceOp.MIN) -> float:
    t = torch.tensor([float(value)])
    dist.all_reduce(t, op=op)
    return t.item()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--machines", type=int, default=1)
    ap.add_argument("--out", required=True)
    ap.add_argument("--diffusers", action="store_true", help="also the diffusers path end to end")
    args = ap.parse_args()
    faulthandler.enable()  # a crash says where
    faulthandler.dump_traceback_later(240, exit=True)  # and so does a hang (before the test's timeout)
    world = int(os.environ["WORLD_SIZE"])
    emulate_machines(args.machines)  # SWIFTFUSION_NODE per rank (NCCL's variables: unused on gloo)
    dist.init_process_group("gloo")
    # ranks share GPUs when there are fewer GPUs than ranks; code that picks the device
    # from LOCAL_RANK (enable_parallel) must see the shared one
    os.environ["LOCAL_RANK"] = str(int(os.environ["LOCAL_RANK"]) % torch.cuda.device_count())
    torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    group = machine_groups(args.machines)
    nv = NvshmemTransport()  # directly: resolve_transport insists on NCCL, which cannot run here
    result = {"device": torch.cuda.get_device_name(), "world": world, "machines": args.machines,
              "mps_active_thread_percentage": os.environ.get("CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"),
              "checks": []}
    for tokens in (4608, 16896):
        for dtype in (torch.bfloat16, torch.float16):
            ok = all_ranks(check_all_to_all(nv, group, tokens, dtype, 7))
            result["checks"].append({"what": "ulysses all-to-all, both ways, 3 uses", "tokens": tokens,
                                     "dtype": str(dtype), "bit_exact": bool(ok)})
            print(json.dumps(result["checks"][-1]), flush=True)
    if dist.get_world_size(group) > 1:
        result["checks"].append({"what": "torus step (one peer), 3 uses",
                                 "bit_exact": bool(all_ranks(check_exchange(nv, group, 9)))})
    if args.machines == 1:
        for tokens, padded in ((4096, False), (16384, False), (4096, True)):
            err, jerr = check_torus_attention(nv, group, tokens, 11 + tokens, padded)
            err, jerr = all_ranks(err, dist.ReduceOp.MAX), all_ranks(jerr, dist.ReduceOp.MAX)
            result["checks"].append({"what": "torus attention (ulysses over nvshmem) vs one process"
                                     + (", key padding" if padded else ""),
                                     "image_tokens": tokens, "text_tokens": TEXT, "dtype": "torch.bfloat16",
                                     "max_rel_err": err, "max_joint_rel_err": jerr, "pass": err < 2e-2 and jerr < 2e-2})
    if args.machines == 1:
        ok = all_ranks(check_cuda_graph(nv, group, 4608, 13))
        result["checks"].append({"what": "3 all-to-alls in one CUDA graph, 4 replays on new inputs",
                                 "tokens": 4608, "dtype": "torch.bfloat16", "bit_exact": bool(ok)})
        print(json.dumps(result["checks"][-1]), flush=True)
        err = all_ranks(check_compiled(nv, group, 4096, 17), dist.ReduceOp.MAX)
        from torch._dynamo.utils import counters
        skips = all_ranks(counters["inductor"]["cudagraph_skips"], dist.ReduceOp.MAX)  # 0: graphs replayed
        result["checks"].append({"what": "torus attention, torch.compile reduce-overhead, 4 calls",
                                 "image_tokens": 4096, "dtype": "torch.bfloat16", "max_rel_err": err,
                                 "cudagraph_skips": int(skips), "pass": err < 2e-2 and skips == 0})
        print(json.dumps(result["checks"][-1]), flush=True)
    if args.machines == 1 and args.diffusers:
        err, layout = check_diffusers(19)
        err = all_ranks(err, dist.ReduceOp.MAX)
        result["checks"].append({"what": "diffusers FLUX.1-dev (2+4 blocks) transformer, torus comm=nvshmem",
                                 "image_tokens": 4096, "text_tokens": TEXT, "dtype": "torch.bfloat16",
                                 "layout": layout, "max_rel_err": err, "pass": err < 2e-2})
        print(json.dumps(result["checks"][-1]), flush=True)
    pes = [None] * world
    dist.all_gather_object(pes, _STATE["pe_of_rank"])
    result["nvshmem_jobs"] = sorted({tuple(sorted(p.items())) for p in pes})
    result["symmetric_MiB_in_use_rank0"] = _STATE["symmetric_bytes"] / 2**20
    save_and_shut_down(result, args.out, f"shared_gpu_{world}ranks_{args.machines}machines.json")


if __name__ == "__main__":
    main()
