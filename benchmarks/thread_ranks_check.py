"""Torus Attention on every grid with one thread per rank, on one GPU, against plain attention.

    python benchmarks/thread_ranks_check.py --out benchmarks/results/thread_ranks/

The multi-GPU equality checks need several GPUs; this one needs one. Each
rank of a (machines x GPUs) grid is a thread running the real Torus
Attention code -- the GPU kernels it picks (cuDNN with log-sum-exp, the
fused merge) and the real schedule -- over a transport that hands tensors
between threads (a copy per message; every thread enqueues on the GPU's one
default stream, so a tensor is complete before any later work reads it).
Each rank's output shard is compared with float64 attention over the whole
sequence (bf16: 2e-2 relative, fp32: 1e-5), with joint text tokens in front,
at the rear, as keys only, and with padded text keys. What it does not
check: NCCL/NVSHMEM and overlap (nothing runs concurrently), which the
multi-GPU checks cover. ``--device cpu --small`` runs the same on CPU (a
test uses it).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import threading
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

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
        dst = group.members.index(self.rank)
        key = (group.name, src, dst, self._next("received", (group.name, src)))
        with self.cv:
            if not self.cv.wait_for(lambda: key in self.box, timeout=self.timeout_s):
                raise TimeoutError(f"rank {self.rank} waited {self.timeout_s} s for {key}")
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
        P = len(group.members)
        chunks = split_chunks(x, P, scatter_dim)
        for p in range(P):
            self.c.send(group, p, chunks[p])
        return join_chunks(torch.stack([self.c.recv(group, p) for p in range(P)]), gather_dim)

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
    """Rank t * per + u: the Ulysses group is its machine, the torus group its column."""
    t, u = divmod(rank, per)
    ulysses = ThreadGroup(f"u{t}", tuple(t * per + i for i in range(per))) if per > 1 else None
    torus = ThreadGroup(f"t{u}", tuple(m * per + u for m in range(machines))) if machines > 1 else None
    return SPGroups(ulysses, torus, exchange)


def run_grid(machines: int, per: int, exchange: str, q, k, v, joint, key_mask) -> list:
    """Every rank's output, each rank a thread over its shard."""
    world = machines * per
    cluster = Cluster()
    torus_module.dist = ThreadDist(cluster)
    transport, shard = ThreadTransport(cluster), q.shape[2] // world
    outputs, errors = [None] * world, []

    def rank_main(rank):
        cluster.local.rank = rank
        cut = slice(rank * shard, (rank + 1) * shard)
        try:
            outputs[rank] = torus_attention(
                q[:, :, cut], k[:, :, cut], v[:, :, cut], grid_groups(rank, machines, per, exchange),
                joint=joint, transport=transport,
                key_mask=None if key_mask is None else key_mask[:, cut])
        except Exception as e:  # reported by the main thread
            errors.append(f"rank {rank}: {type(e).__name__}: {e}")

    threads = [threading.Thread(target=rank_main, args=(r,)) for r in range(world)]
    try:
        for th in threads:
            th.start()
        for th in threads:
            th.join()
    finally:
        torus_module.dist = dist
    if errors:
        raise RuntimeError("; ".join(errors))
    return outputs


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


def rel_err(a, b) -> float:
    a, b = a.double(), b.double()
    return float("nan") if not torch.isfinite(a).all() else ((a - b).norm() / b.norm()).item()


def check_case(machines, per, exchange, dtype, joint_kind, tokens, text, heads, dim, device, seed) -> dict:
    g = torch.Generator(device=device).manual_seed(seed)
    rand = lambda n: torch.randn(1, heads, n, dim, generator=g, device=device).to(dtype)
    q, k, v = rand(tokens), rand(tokens), rand(tokens)
    joint, key_mask, keep = None, None, None
    if joint_kind != "none":
        text_mask = None
        if joint_kind == "padded":  # the last quarter of the text is padding
            text_mask = torch.ones(1, text, dtype=torch.bool, device=device)
            text_mask[:, text * 3 // 4:] = False
            keep = torch.cat((text_mask, torch.ones(1, tokens, dtype=torch.bool, device=device)), 1)
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
    """Each grid with ``kv``, and with ``a2a`` too where the heads split across all ranks."""
    for grid in grids.split(","):
        machines, per = map(int, grid.split("x"))
        yield machines, per, "kv"
        if machines > 1 and heads % (per * machines) == 0:
            yield machines, per, "a2a"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--grids", default="1x2,2x1,2x2,1x4,4x1,3x1,2x4,4x2,8x1")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--small", action="store_true", help="a reduced sequence (CPU)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    heads, dim = 24, 128  # Flux's attention
    # Flux 1024²: 4,096 image tokens + 512 text; reduced: 48 + 8
    tokens, text = (48, 8) if args.small else (4096, 512)
    dtypes = (torch.float32, torch.bfloat16) if args.small else (torch.bfloat16,)
    rows = []
    for machines, per, exchange in grids_and_exchanges(args.grids, heads):
        for dtype in dtypes:
            for i, joint_kind in enumerate(("none", "front", "keys_only", "padded")):
                n = tokens + (text if joint_kind == "none" else 0)  # text in the sequence, or joint
                n -= n % (machines * per)
                row = check_case(machines, per, exchange, dtype, joint_kind, n, text, heads, dim,
                                 args.device, seed=1000 * machines + 100 * per + i)
                rows.append(row)
                print(json.dumps(row), flush=True)
    device = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    result = {"device": device, "what": __doc__.split("\n\n")[1].split(".")[0], "rows": rows,
              "ok": all(r["ok"] for r in rows)}
    save(result, args.out)
    return 0 if result["ok"] else 1


def save(result: dict, folder: str) -> None:
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "thread_ranks_check.json"), "w") as f:
        json.dump(result, f, indent=2)
    lines = [f"# Torus Attention, one thread per rank on one device ({result['device']})", "",
             "Every rank's output shard against float64 attention over the whole sequence "
             f"(bf16 within 2e-2, fp32 within 1e-5). All within tolerance: {'yes' if result['ok'] else 'NO'}.", "",
             "| grid (MxG) | exchange | dtype | joint text | tokens | max rel err | ok |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['grid']} | {r['exchange']} | {r['dtype']} | {r['joint']} | {r['tokens']} | "
              f"{r['max_rel_err']:.2e} | {'yes' if r['ok'] else 'NO'} |" for r in result["rows"]]
    with open(os.path.join(folder, "thread_ranks_check.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
