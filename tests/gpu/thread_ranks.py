"""Torus Attention with one thread per rank on one device: the machinery of the
threads-as-ranks checks (tests/gpu/test_gpu_thread_ranks.py on a GPU; its CPU run,
reduced, is in tests/test_benchmarks.py).

Each rank of a (machines x GPUs) grid is a thread running the real Torus Attention
code -- the kernels it picks (cuDNN with log-sum-exp, the fused merge) and the real
schedule -- over a transport that hands tensors between threads (a copy per message;
every thread enqueues on the device's one default stream, so a tensor is complete
before any later work reads it). Each rank's output shard is compared with float64
attention over the whole sequence (bf16: 2e-2 relative, fp32: 1e-5): with the text in
the sequence, as joint tokens in front, as joint keys only, and with padded text and
sequence keys (key masks). What it does not check: NCCL/NVSHMEM and overlap (nothing
runs concurrently), which the multi-GPU tests cover.

``flux_rows`` does the same for a whole model: every rank-thread runs the FLUX.1-dev
transformer (real config, random bf16 weights, one copy shared by the threads; on CPU a
tiny random Flux) on its shard of the image and text tokens, as diffusers' plan splits
them, with its attention going through Torus Attention; the image shards joined in rank
order must equal the unsharded forward (bf16 2e-2; fp32, the tiny CPU model: 1e-4).
"""

from __future__ import annotations

import importlib
import json
import threading
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from accuracy import rel_err
from swiftfusion_xdit.block_attention import KERNELS
from swiftfusion_xdit.torus_attention import Joint, SPGroups, torus_attention
from swiftfusion_xdit.transport import join_chunks, split_chunks

torus_module = importlib.import_module("swiftfusion_xdit.torus_attention")
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


@dataclass(frozen=True)
class ThreadGroup:
    name: str
    members: tuple[int, ...]  # global thread-ranks, in group-rank order


class Cluster:
    """Mailboxes between rank threads: message n from src to dst in a group is matched
    with the receiver's n-th receive from src in that group (as send/recv pair up)."""

    def __init__(self, timeout_s: float = 120.0):
        self.cv, self.box, self.timeout_s = threading.Condition(), {}, timeout_s
        self.local = threading.local()
        self.failed = False  # a rank raised: the others stop waiting

    def fail(self) -> None:
        with self.cv:
            self.failed = True
            self.cv.notify_all()

    @property
    def rank(self) -> int:
        return self.local.rank

    def _next(self, kind: str, key) -> int:
        counters = self.local.__dict__.setdefault(kind, {})
        counters[key] = counters.get(key, 0) + 1
        return counters[key]

    def send(self, group: ThreadGroup, dst: int, x: torch.Tensor) -> None:
        src = group.members.index(self.rank)
        n = self._next("sent", (group.name, dst))
        with self.cv:
            self.box[(group.name, src, dst, n)] = x.clone()
            self.cv.notify_all()

    def recv(self, group: ThreadGroup, src: int) -> torch.Tensor:
        return self.take(self.reserve(group, src))

    def reserve(self, group: ThreadGroup, src: int) -> tuple:
        """The key of this rank's next receive from ``src``, to be taken later (a collective
        started now but waited for after later ones were started)."""
        dst = group.members.index(self.rank)
        return (group.name, src, dst, self._next("received", (group.name, src)))

    def take(self, key: tuple) -> torch.Tensor:
        with self.cv:
            if not self.cv.wait_for(lambda: key in self.box or self.failed, timeout=self.timeout_s):
                raise TimeoutError(f"rank {self.rank} waited {self.timeout_s} s for {key}")
            if key not in self.box:
                raise RuntimeError("another rank failed")
            return self.box.pop(key)


class _Later:
    def __init__(self, receive):
        self.receive = receive

    def wait(self) -> torch.Tensor:
        return self.receive()


class ThreadTransport:
    """The transport interface over the cluster's mailboxes (same layouts as the
    two-sided transport: ``split_chunks`` out, ``join_chunks`` in)."""

    name = "threads"

    def __init__(self, cluster: Cluster):
        self.c = cluster

    def all_to_all(self, x, group, scatter_dim=0, gather_dim=0):
        return self.all_to_all_start(x, group, scatter_dim, gather_dim).wait()

    def all_to_all_start(self, x, group, scatter_dim=0, gather_dim=0):
        P = len(group.members)
        chunks = split_chunks(x, P, scatter_dim)
        for p in range(P):
            self.c.send(group, p, chunks[p])
        keys = [self.c.reserve(group, p) for p in range(P)]  # matched in start order
        return _Later(lambda: join_chunks(torch.stack([self.c.take(key) for key in keys]), gather_dim))

    def exchange(self, send, dst, src, group):
        self.c.send(group, dst, send)
        return _Later(lambda: self.c.recv(group, src))

    def all_gather(self, x, group):
        P = len(group.members)
        for p in range(P):
            self.c.send(group, p, x)
        return _Later(lambda: torch.stack([self.c.recv(group, p) for p in range(P)]))


class ThreadDist:
    """torch.distributed as Torus Attention sees it, answered by the cluster for thread groups."""

    def __init__(self, cluster: Cluster):
        self.c = cluster

    def __getattr__(self, name):
        return getattr(dist, name)

    def get_world_size(self, group=None):
        return len(group.members) if isinstance(group, ThreadGroup) else dist.get_world_size(group)

    def get_rank(self, group=None):
        return group.members.index(self.c.rank) if isinstance(group, ThreadGroup) else dist.get_rank(group)

    def all_gather(self, parts, x, group=None):  # the key masks' small gathers
        for p in range(len(group.members)):
            self.c.send(group, p, x)
        for p, part in enumerate(parts):
            part.copy_(self.c.recv(group, p))


def grid_groups(rank: int, machines: int, per: int, exchange: str) -> SPGroups:
    """Rank t * per + u: the Ulysses group is its machine, the torus group its column.
    ``exchange`` may name head chunks too: "kv/hc3"."""
    t, u = divmod(rank, per)
    ulysses = ThreadGroup(f"u{t}", tuple(t * per + i for i in range(per))) if per > 1 else None
    torus = ThreadGroup(f"t{u}", tuple(m * per + u for m in range(machines))) if machines > 1 else None
    exchange, _, chunks = exchange.partition("/hc")
    return SPGroups(ulysses, torus, exchange, int(chunks or 1))


def on_threads(machines: int, per: int, exchange: str, work) -> list:
    """``work(rank, groups, transport)`` on one thread per rank of the grid; their results."""
    world = machines * per
    cluster = Cluster()
    before, torus_module.dist = torus_module.dist, ThreadDist(cluster)
    transport = ThreadTransport(cluster)
    outputs, errors = [None] * world, []

    def rank_main(rank):
        cluster.local.rank = rank
        try:
            outputs[rank] = work(rank, grid_groups(rank, machines, per, exchange), transport)
        except Exception as e:  # reported by the main thread
            errors.append(f"rank {rank}: {type(e).__name__}: {e}")
            cluster.fail()

    threads = [threading.Thread(target=rank_main, args=(r,)) for r in range(world)]
    try:
        for th in threads:
            th.start()
        for th in threads:
            th.join()
    finally:
        torus_module.dist = before
    if errors:
        raise RuntimeError("; ".join(errors))
    return outputs


def run_grid(machines: int, per: int, exchange: str, q, k, v, joint, key_mask) -> list:
    """Every rank's Torus Attention output, each rank a thread over its shard."""
    shard = q.shape[2] // (machines * per)

    def work(rank, groups, transport):
        cut = slice(rank * shard, (rank + 1) * shard)
        return torus_attention(q[:, :, cut], k[:, :, cut], v[:, :, cut], groups, joint=joint,
                               transport=transport,
                               key_mask=None if key_mask is None else key_mask[:, cut])
    return on_threads(machines, per, exchange, work)


def run_flux(model, kw: dict, machines: int, per: int, exchange: str) -> torch.Tensor:
    """The transformer on every rank's shard (image and text split as diffusers' Flux plan
    splits them), attention through Torus Attention; the image shards joined in rank order."""
    from diffusers.models.transformers import transformer_flux
    from rank_compute import shard
    P, original = machines * per, transformer_flux.dispatch_attention_fn
    calls = threading.local()

    def dispatch(query, key, value, attn_mask=None, *args, **kwargs):
        q, k, v = (x.transpose(1, 2) for x in (query, key, value))  # diffusers: (B, S, H, D)
        return torus_attention(q, k, v, calls.groups, transport=calls.transport).transpose(1, 2)

    def work(rank, groups, transport):
        calls.groups, calls.transport = groups, transport
        with torch.no_grad():
            return model(**shard(kw, P, rank))[0]

    transformer_flux.dispatch_attention_fn = dispatch
    try:
        return torch.cat(on_threads(machines, per, exchange, work), dim=1)
    finally:
        transformer_flux.dispatch_attention_fn = original


def check_flux(model, kw, reference_out, machines, per, exchange, dtype_name) -> dict:
    start = time.perf_counter()
    err = rel_err(run_flux(model, kw, machines, per, exchange), reference_out)
    return {"grid": f"{machines}x{per}", "exchange": exchange, "dtype": dtype_name, "joint": "model",
            "tokens": kw["hidden_states"].shape[1] + kw["encoder_hidden_states"].shape[1],
            "text": kw["encoder_hidden_states"].shape[1], "heads": None, "max_rel_err": err,
            "ok": err < (1e-4 if dtype_name == "float32" else 2e-2),
            "seconds": round(time.perf_counter() - start, 2)}


def reference(q, k, v, joint, keep):
    """Float64 attention over [text; sequence]; ``keep`` (B, S_text + S) marks usable keys."""
    if joint is not None:
        k, v = torch.cat((joint.k, k), 2), torch.cat((joint.v, v), 2)
        q = torch.cat((joint.q, q), 2) if joint.q is not None else q
    q, k, v = q.double(), k.double(), v.double()
    if keep is None:
        out = KERNELS["math"][0](q, k, v, q.shape[-1] ** -0.5)[0]
    else:
        scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
        out = torch.softmax(scores.masked_fill(~keep[:, None, None, :], float("-inf")), -1) @ v
    n = 0 if joint is None or joint.q is None else joint.q.shape[2]
    return out[:, :, n:], out[:, :, :n]


def check_case(machines, per, exchange, dtype, joint_kind, tokens, text, heads, dim, device, seed) -> dict:
    g = torch.Generator(device=device).manual_seed(seed)
    rand = lambda n: torch.randn(1, heads, n, dim, generator=g, device=device).to(dtype)
    q, k, v = rand(tokens), rand(tokens), rand(tokens)
    joint, key_mask, keep = None, None, None
    if joint_kind != "none":
        text_mask = None
        if joint_kind == "padded":  # the last quarter of the text, and the last eighth of the sequence
            text_mask = torch.ones(1, text, dtype=torch.bool, device=device)
            text_mask[:, text * 3 // 4:] = False
            key_mask = torch.ones(1, tokens, dtype=torch.bool, device=device)
            key_mask[:, tokens * 7 // 8:] = False
            keep = torch.cat((text_mask, key_mask), 1)
        joint = Joint(None if joint_kind == "keys_only" else rand(text), rand(text), rand(text), text_mask)
    start = time.perf_counter()
    outs = run_grid(machines, per, exchange, q, k, v, joint, key_mask)
    seconds = time.perf_counter() - start
    ref, joint_ref = reference(q, k, v, joint, keep)
    shard = tokens // (machines * per)
    errs, joint_errs = [], []
    for r, out in enumerate(outs):
        out, joint_out = out if isinstance(out, tuple) else (out, None)
        errs.append(rel_err(out, ref[:, :, r * shard:(r + 1) * shard]))
        if joint_out is not None:
            joint_errs.append(rel_err(joint_out, joint_ref))
    worst = max(errs + joint_errs)
    return {"grid": f"{machines}x{per}", "exchange": exchange, "dtype": str(dtype).split(".")[1],
            "joint": joint_kind, "tokens": tokens, "text": text if joint else 0, "heads": heads,
            "max_rel_err": worst, "ok": worst < TOL[dtype], "seconds": round(seconds, 2)}


def grids_and_exchanges(grids: str, heads: int):
    """Each grid with ``kv``, and with ``a2a`` too where the heads split across all ranks,
    ``a2a-kv`` where they split across the machines (and a machine has several ranks);
    one-machine grids also with the all-to-all in head chunks ("kv/hc2": two per rank's heads)."""
    for grid in grids.split(","):
        machines, per = map(int, grid.split("x"))
        yield machines, per, "kv"
        if machines > 1 and heads % (per * machines) == 0:
            yield machines, per, "a2a"
        if machines > 1 and per > 1 and heads % machines == 0:
            yield machines, per, "a2a-kv"
        if machines == 1 and per > 1 and heads % (2 * per) == 0:
            yield machines, per, "kv/hc2"


def tiny_flux(device: str):
    """A small random Flux transformer and inputs (8 heads, 64 image + 16 text tokens)."""
    from diffusers import FluxTransformer2DModel
    from swiftfusion_xdit.tiny import TINY_FLUX_TRANSFORMER
    torch.manual_seed(0)
    model = FluxTransformer2DModel(**TINY_FLUX_TRANSFORMER).to(device).eval()
    g = torch.Generator(device=device).manual_seed(1)
    rand = lambda *shape: torch.randn(*shape, generator=g, device=device)
    side = torch.arange(8.0, device=device)
    img_ids = torch.stack(torch.meshgrid(torch.zeros(1, device=device), side, side, indexing="ij"), -1)
    kw = dict(hidden_states=rand(1, 64, model.config.in_channels),
              encoder_hidden_states=rand(1, 16, model.config.joint_attention_dim),
              pooled_projections=rand(1, model.config.pooled_projection_dim),
              timestep=torch.tensor([0.5], device=device), img_ids=img_ids.reshape(-1, 3),
              txt_ids=torch.zeros(16, 3, device=device), guidance=torch.tensor([3.5], device=device),
              return_dict=False)
    return model, kw


def flux_rows(sizes: str, grids: str, device: str) -> list[dict]:
    """The whole transformer at each size ("tiny": a small random Flux), on every grid whose
    degrees divide its heads and tokens."""
    model, rows = None, []
    for size in sizes.split(","):
        if size == "tiny":
            model, kw = tiny_flux(device)
        else:
            from flux_device_check import build, flux_inputs
            model = model or build("flux-dev", 0)
            kw = flux_inputs(size, 0)
        with torch.no_grad():
            reference_out = model(**kw)[0]
        heads = model.config.num_attention_heads
        image, text = kw["hidden_states"].shape[1], kw["encoder_hidden_states"].shape[1]
        for machines, per, exchange in grids_and_exchanges(grids, heads):
            P = machines * per
            if heads % per or image % P or text % P:
                continue
            rows.append(dict(size=size, **check_flux(model, kw, reference_out, machines, per, exchange,
                                                     str(reference_out.dtype).split(".")[1])))
            print(json.dumps(rows[-1]), flush=True)
    return rows


def attention_rows(grids: str, device: str, small: bool = False, heads: int = 24) -> list[dict]:
    """Every grid and exchange with each joint-text kind, Flux's attention (24 heads, head
    dim 128; Wan 2.1's 40 with ``heads=40``) on Flux 1024²'s 4,096 image + 512 text tokens
    (``small``: 48 + 8, or 4 per rank on larger grids, head dim 16, fp32 too)."""
    dim = 16 if small else 128
    tokens, text = (48, 8) if small else (4096, 512)
    dtypes = (torch.float32, torch.bfloat16) if small else (torch.bfloat16,)
    rows = []
    for machines, per, exchange in grids_and_exchanges(grids, heads):
        for dtype in dtypes:
            for i, joint_kind in enumerate(("none", "front", "keys_only", "padded")):
                n = tokens + (text if joint_kind == "none" else 0)  # text in the sequence, or joint
                n = max(n - n % (machines * per), 4 * machines * per)
                rows.append(check_case(machines, per, exchange, dtype, joint_kind, n, text, heads, dim,
                                       device, seed=1000 * machines + 100 * per + i))
                print(json.dumps(rows[-1]), flush=True)
    return rows


def table(device: str, what: str, rows: list[dict]) -> list[str]:
    """The Markdown table of a run's rows."""
    ok = all(r["ok"] for r in rows)
    lines = [f"# Torus Attention, one thread per rank on one device ({device})", "",
             f"{what}. All within tolerance: {'yes' if ok else 'NO'}.", "",
             "| grid (MxG) | exchange | dtype | joint text | tokens | max rel err | ok |",
             "|---|---|---|---|---|---|---|"]
    return lines + [f"| {r['grid']} | {r['exchange']} | {r['dtype']} | {r['joint']} | {r['tokens']} | "
                    f"{r['max_rel_err']:.2e} | {'yes' if r['ok'] else 'NO'} |" for r in rows]
