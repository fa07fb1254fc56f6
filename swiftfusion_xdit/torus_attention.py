"""Torus Attention: exact attention over a sequence sharded across machines.

Ranks form a (torus T) x (ulysses U) grid: U ranks per machine share NVLink,
T machines are joined by a slower network. Sequence-parallel rank
``t * U + u`` holds shard ``t * U + u`` of the sequence (S/(T*U) tokens) for
all H heads, in xfuser's ``(B, H, S, D)`` layout.

Schedule (``exchange="a2a"``, heads divisible by U*T)::

  1. Ulysses all-to-all inside the machine (blocking; NVLink is fast):
       rank (t,u): tokens of machine t (S/T), heads of group u (H/U)
  2. Torus all-to-all across machines, decomposed into T-1 shifted steps.
     Step a sends Q,K,V of machine t's tokens for head sub-group t+a to
     machine t+a and receives machine (t-a)'s tokens for our sub-group t:

       machine:   0      1      2      3         slot a of rank t holds the
       step 1:    0->1   1->2   2->3   3->0      chunk of machine t-a;
       step 2:    0->2   1->3   2->0   3->1      slots 0..a are contiguous in
       step 3:    0->3   1->0   2->1   3->2      the receive buffers.

     While step a+1 is in flight, step a's blocks are computed:
       Q[slot a]    x K[slots 0..a]    (new queries, all keys so far)
       Q[slots <a]  x K[slot a]        (old queries, the new keys)
     and each block's (out, lse) is merged exactly into float32 accumulators.
  3. Output back across machines, T-1 shifted steps, overlapped with the
     last step's blocks: as soon as the output of slot b is final, it is sent
     to its owner machine while the next slot is computed.
  4. Ulysses all-to-all back inside the machine.

With ``exchange="kv"`` (any head count) step 2 instead gathers the other
machines' K,V (no Q, no output exchange): more bytes, no head constraint.
T == 1 is plain Ulysses; U == 1 is a pure torus.

With ``exchange="a2a-kv"`` (heads divisible by T only: FLUX's 24 and Wan's 40
heads on 4 or 8 machines of 8 GPUs) machine t takes head group t for the whole
sequence and there is no Ulysses all-to-all: each rank sends its own shard's
queries to every machine in one all-to-all, then its K,V in T-1 peer steps; the
ranks of a machine all-gather each step's K,V over NVLink, so each attends its
machine's heads with the queries of its own column of shards against all keys
(``_torus_a2a_kv``). Across machines it moves what ``a2a`` moves.

On one machine (T == 1) step 1 blocks: nothing else is left to compute while
it runs. ``head_chunks=G`` splits it by head groups so it can overlap too
(two-sided transports; the others run the chunks one after another)::

  compute:  attend g0 | attend g1 | attend g2
  network:  qkv g0 | qkv g1 | out g0, qkv g2 | out g1 | out g2

Each group is exact on its own (attention never mixes heads); the price is G
smaller exchanges and attention calls, so whether it pays is measured
(``benchmarks/harness.py``), and the default stays 1.

Joint (text) tokens are replicated on every rank with all heads, like xfuser's
``joint_strategy``. Their keys/values are prepended to our own chunk (slot 0),
so every query sees them exactly once; their queries ride in front of slot 0
and their output is gathered over heads at the end.

Key padding (``key_mask``, ``Joint.key_mask``): every rank's mask is gathered
once per call, and each block attends only to its unmasked keys (they are
left out of the block, so no kernel needs a mask); a block with none left
merges as nothing. A batch item with no key left anywhere is refused (plain
attention is undefined there: NaN under a boolean mask).

Cross-attention to a sharded sequence of another length (LTX's video queries
against its text, both split by diffusers' plan): the keys and values are
gathered from every rank and our queries attend to them where they are. The
key sequence is short (text), so this moves far less than an all-to-all of
the long query sequence would.

Bytes one GPU sends per attention layer, X = (S/(T*U)) * H * D * bytes
(one rank's shard of one tensor)::

  strategy            intra-machine        inter-machine
  Ulysses (U*T)       4X (U-1)/P           4X (T-1)/T, P = U*T, one blocking
                                           all-to-all
  Ring (U*T)          -                    2X per step on the machine-crossing
                                           hop, (P-1) dependent steps
  USP (U x ring T)    4X (U-1)/U           2X (T-1), relayed ring steps
  torus a2a (U x T)   4X (U-1)/U           4X (T-1)/T, direct peer steps
  torus kv  (U x T)   4X (U-1)/U           2X (T-1), direct peer steps
  torus a2a-kv        2X (U-1), K/V        4X (T-1)/T: Q in one all-to-all,
    (U x T)           all-gathers          K/V in peer steps, O back in steps

Compute: every exchange gives each rank (S/P) x H queries' worth of attention
against all S keys; a2a-kv in more, smaller blocks (8 instead of 4 per layer at
T = 4), which cost 3-12% more on the emulated clusters.

torus a2a moves across machines exactly what a flat Ulysses all-to-all
would; its gain over it is that the T-1 peer steps overlap with attention
instead of blocking. At T=2 torus a2a, torus kv and USP move the same
bytes, and ``auto`` takes kv (no output return after the last block); at
T=4 a2a and a2a-kv move half of what kv/USP move, at T=8 a quarter.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.profiler import record_function

from .block_attention import Kernel, attend_kept, merge_into, pick_final_kernel, pick_kernel
from .transport import Pending, Transport, TransportPair, _Done, default_transport, join_chunks, split_chunks


@dataclass
class SPGroups:
    """The two sequence-parallel groups Torus Attention runs over."""

    ulysses: dist.ProcessGroup | None
    torus: dist.ProcessGroup | None
    exchange: str = "a2a"  # or "kv"; "auto": see choose_exchange
    head_chunks: int = 1  # one machine: the all-to-all in this many head groups, overlapped

    @property
    def ulysses_size(self) -> int:
        return dist.get_world_size(self.ulysses) if self.ulysses is not None else 1

    @property
    def torus_size(self) -> int:
        return dist.get_world_size(self.torus) if self.torus is not None else 1


@dataclass
class Joint:
    """Replicated text tokens, all heads, (B, H, S_text, D) each."""

    q: torch.Tensor | None
    k: torch.Tensor
    v: torch.Tensor
    key_mask: torch.Tensor | None = None  # (B, S_text) bool: which text keys may be attended


def torus_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, groups: SPGroups, *,
                    joint: Joint | None = None, transport: Transport | TransportPair | None = None,
                    kernel: str = "auto", scale: float | None = None,
                    key_mask: torch.Tensor | None = None):
    """Attention of this rank's sequence shard against the whole sequence.

    Returns the output for the local shard, (B, H, S_local, D); with joint
    queries, ``(out, joint_out)`` where ``joint_out`` is (B, H, S_text, D) and
    identical on every rank. ``key_mask`` (B, S_local) bool marks which of our
    keys may be attended (key padding; ``Joint.key_mask`` for the text's).
    ``k``/``v`` may hold a shard of another length than ``q`` (cross-attention
    to a sharded text), without joint tokens.
    """
    transport = transport or default_transport()
    pair = transport if isinstance(transport, TransportPair) else TransportPair(transport, transport)
    U, T = groups.ulysses_size, groups.torus_size
    H, D = q.shape[1], q.shape[3]
    _check_shapes(q, k, v, joint)
    scale = scale if scale is not None else D ** -0.5
    if k.shape[2] != q.shape[2]:  # cross-attention: no heads split, one final block
        return _attend_gathered_keys(q, k, v, groups, pair, pick_final_kernel(q, kernel), scale,
                                     key_mask, joint)
    exchange = groups.exchange
    if exchange == "auto":
        exchange = choose_exchange(H, U, T)
    _check_heads(H, U, T, exchange)
    check_head_chunks(groups.head_chunks, H, U, T)
    attend = pick_kernel(q, kernel)

    masks = None
    if key_mask is not None or (joint is not None and joint.key_mask is not None):
        masks = _KeyMasks.gather(key_mask, q, joint, groups)
        masks = None if masks.keeps_every_key else masks  # e.g. one prompt: nothing padded
    if exchange == "a2a-kv" and T > 1:
        return _torus_a2a_kv((q, k, v), joint, groups, pair, attend, scale, masks)

    u = dist.get_rank(groups.ulysses) if U > 1 else 0
    joint = _head_slice(joint, u * (H // U), H // U)
    if T == 1 and U > 1 and groups.head_chunks > 1:
        out, joint_out = _ulysses_in_head_chunks((q, k, v), joint, groups.ulysses, pair.ulysses,
                                                 pick_final_kernel(q, kernel), scale, masks,
                                                 groups.head_chunks)
    else:
        qkv = _seq_to_heads((q, k, v), groups.ulysses, pair.ulysses)
        if T == 1:
            out, joint_out = _local(qkv, joint, pick_final_kernel(q, kernel), scale, masks)
        elif exchange == "a2a":
            out, joint_out = _torus_a2a(qkv, joint, groups.torus, pair.torus, attend, scale, masks)
        else:
            out, joint_out = _torus_kv(qkv, joint, groups.torus, pair.torus, attend, scale, masks)
        out = _heads_to_seq(out, groups.ulysses, pair.ulysses)

    if joint is None or joint.q is None:
        return out
    if exchange == "a2a" and T > 1:
        joint_out = _all_gather(joint_out, 1, groups.torus, pair.torus)
    return out, _all_gather(joint_out, 1, groups.ulysses, pair.ulysses)


EXCHANGES = ("a2a", "kv", "a2a-kv")


def choose_exchange(heads: int, ulysses: int, torus: int) -> str:
    """``a2a`` where it moves fewer bytes (T > 2) and the heads split over U x T; else ``kv``.

    At T == 2 both move 2X per GPU, but ``kv`` sends it all in one step under
    the local block and has no output return after the last block, so it
    finishes sooner (measured on an emulated 2-machine link: see docs/design.md, decision log).
    ``a2a-kv`` is never chosen here, without the link's speed: it moves half of kv's bytes
    at T = 4 but computes 3-12% more, so it won 1.34-1.43x on emulated 12.5 GB/s links and
    lost (0.83-0.92x) on 50 GB/s ones (docs/design.md); the planner, which knows the link,
    picks it where it wins.
    """
    return "a2a" if torus > 2 and heads % (ulysses * torus) == 0 else "kv"


def _check_shapes(q, k, v, joint: Joint | None) -> None:
    """Every tensor (B, H, ., D) alike; grouped-query K/V must be expanded by the caller."""
    B, H, _, D = q.shape
    named = [("k", k), ("v", v)] + ([] if joint is None else
                                    [(f"joint.{n}", getattr(joint, n)) for n in "qkv"])
    for name, x in named:
        if x is not None and (x.dim() != 4 or (x.shape[0], x.shape[1], x.shape[3]) != (B, H, D)):
            raise ValueError(
                f"{name} has shape {tuple(x.shape)}, but q is (B, H, S, D) = {tuple(q.shape)}: every "
                f"tensor needs the same batch, heads and head dim (grouped-query K/V: "
                f"repeat_interleave its heads to {H} first)")
    if k.shape[2] != v.shape[2]:
        raise ValueError(f"k and v hold {k.shape[2]} and {v.shape[2]} tokens; they must match")


def _check_heads(H: int, U: int, T: int, exchange: str) -> None:
    if H % U:
        raise ValueError(f"{H} heads are not divisible by the ulysses degree {U}")
    if exchange == "a2a" and T > 1 and H % (U * T):
        raise ValueError(f"torus exchange 'a2a' needs {H} heads divisible by ulysses x torus = "
                         f"{U * T}; use exchange 'kv'")
    if exchange == "a2a-kv" and H % T:
        raise ValueError(f"torus exchange 'a2a-kv' needs {H} heads divisible by the torus degree "
                         f"{T}; use exchange 'kv'")
    if exchange not in EXCHANGES:
        raise ValueError(f"unknown torus exchange {exchange!r}; use one of {', '.join(EXCHANGES)}")


def check_head_chunks(chunks: int, H: int | None, U: int, T: int) -> None:
    """``head_chunks`` serves one machine and must split each rank's H/U heads evenly
    (H None: not known yet, checked at the first call)."""
    if not isinstance(chunks, int) or chunks < 1:
        raise ValueError(f"head_chunks must be a positive integer, got {chunks!r}")
    if chunks > 1 and T > 1:
        raise ValueError(f"head_chunks={chunks} splits the all-to-all of one machine; with a torus "
                         f"degree of {T} the torus steps overlap already: use head_chunks=1, or torus=1")
    if H is not None and (H // U) % chunks:
        raise ValueError(f"head_chunks={chunks} must divide the {H // U} heads each of the {U} "
                         f"ranks attends to; choose one of {_divisors(H // U)}")


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


# Named ranges so profiler traces can tell the two exchanges apart
# (tests/gpu/_worker_torus.py records how much of each is hidden).
def _all_to_all(transport: Transport, x: torch.Tensor, group, scatter_dim: int,
                gather_dim: int) -> torch.Tensor:
    with record_function("ulysses_all_to_all"):
        return transport.all_to_all(x, group, scatter_dim, gather_dim)


def _post(transport: Transport, send: torch.Tensor, dst: int, src: int, group):
    with record_function("torus_exchange"):
        return transport.exchange(send, dst, src, group)


# --- Ulysses: sequence <-> heads inside a machine ------------------------------------------

def _seq_to_heads(qkv: tuple[torch.Tensor, ...], group, transport: Transport):
    """(q, k, v), each (B, H, s, D) sharded by sequence -> (3, B, H/U, U*s, D) sharded by heads.

    The three go straight into the all-to-all's send layout, chunk-major by
    destination: one copy each, read from the caller's (often transposed) views.
    Stacking them first and letting the transport split the heads copied twice.
    With U == 1 nothing moves and the caller's tensors are used as they are.
    """
    if group is None or dist.get_world_size(group) == 1:
        return qkv
    U = dist.get_world_size(group)
    send = torch.stack([split_chunks(x, U, 1) for x in qkv], dim=1)  # (U, 3, B, H/U, s, D)
    return _all_to_all(transport, send.flatten(0, 1), group, scatter_dim=0, gather_dim=3)


def _ulysses_in_head_chunks(qkv, joint: Joint | None, group, transport: Transport, attend: Kernel,
                            scale: float, masks, chunks: int):
    """One machine, the all-to-all split into ``chunks`` head groups: group g+1's
    exchange is in flight while group g attends, and group g's output travels home
    while g+1 attends. Returns what ``_local`` after ``_heads_to_seq`` would."""
    U = dist.get_world_size(group)
    B, H, s, D = qkv[0].shape
    hc = H // U // chunks
    by_dest = [split_chunks(x, U, 1) for x in qkv]  # (U, B, H/U, s, D): heads of rank p
    overlap = hasattr(transport, "all_to_all_start")
    # A blocking transport runs the chunks one after another, each result used before the
    # next call: its results may live in buffers it reuses (NVSHMEM's slots).
    start = transport.all_to_all_start if overlap else \
        (lambda x, *args: _Done(transport.all_to_all(x, *args)))

    def send(g: int):
        heads = slice(g * hc, (g + 1) * hc)
        packed = torch.stack([x[:, :, heads] for x in by_dest], dim=1).flatten(0, 1)
        with record_function("ulysses_all_to_all"):
            return start(packed, group, 0, 3)  # -> (3, B, hc, U*s, D)

    out = seq_major((B, H, s, D), qkv[0])
    by_source = out.transpose(1, 2).unflatten(2, (U, chunks, hc))  # (B, s, U, G, hc, D)

    def place(g: int, returning) -> None:  # (U*B, hc, s, D), by source rank
        by_source[:, :, :, g] = returning.wait().unflatten(0, (U, B)).permute(1, 3, 0, 2, 4)

    arriving, returns, joint_outs = send(0), [], []
    for g in range(chunks):
        qkv_g = arriving.wait()
        if overlap and g + 1 < chunks:
            arriving = send(g + 1)
        out_g, joint_out_g = _local(qkv_g, _head_slice(joint, g * hc, hc), attend, scale, masks)
        joint_outs.append(joint_out_g)
        with record_function("ulysses_all_to_all"):
            returns.append(start(out_g, group, 2, 0))
        if not overlap:
            place(g, returns.pop())
            if g + 1 < chunks:
                arriving = send(g + 1)
    for g, returning in enumerate(returns):
        place(g, returning)
    return out, torch.cat(joint_outs, dim=1)


def _heads_to_seq(x: torch.Tensor, group, transport: Transport) -> torch.Tensor:
    """(B, H/U, U*s, D) sharded by heads -> (B, H, s, D) sharded by sequence, sequence-major.

    The unpacking copy lands in a buffer of our own (a transport that lends its
    buffers gets them back) laid out as (B, s, H, D), see ``seq_major``.
    """
    if group is None or dist.get_world_size(group) == 1:
        return x
    U = dist.get_world_size(group)
    B, h, _, D = x.shape
    recv = _all_to_all(transport, x, group, scatter_dim=2, gather_dim=0).reshape(U, B, h, -1, D)
    out = x.new_empty(B, recv.shape[3], U, h, D)
    out.copy_(recv.permute(1, 3, 0, 2, 4))
    return out.flatten(2, 3).transpose(1, 2)


def seq_major(shape, like: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """An empty (B, H, S, D) tensor stored as (B, S, H, D).

    diffusers' and xfuser's processors turn attention's output into (B, S, H*D)
    next; from this layout that is a view instead of a copy."""
    B, H, S, D = shape
    return like.new_empty(B, S, H, D, dtype=dtype or like.dtype).transpose(1, 2)


def _head_slice(joint: Joint | None, start: int, count: int) -> Joint | None:
    if joint is None:
        return None
    pick = lambda t: None if t is None else t[:, start:start + count]
    return Joint(pick(joint.q), pick(joint.k), pick(joint.v), joint.key_mask)


def _all_gather(x: torch.Tensor, dim: int, group, transport: Transport) -> torch.Tensor:
    """Every rank's ``x`` concatenated along ``dim``, in rank order."""
    if group is None or dist.get_world_size(group) == 1:
        return x
    if hasattr(transport, "all_gather"):
        return join_chunks(transport.all_gather(x, group).wait(), dim)
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=dim)


def _attend_gathered_keys(q, k, v, groups: SPGroups, pair: TransportPair, attend: Kernel,
                          scale: float, key_mask, joint: Joint | None) -> torch.Tensor:
    """Cross-attention to a sharded key sequence of another length: gather K,V (and the
    key mask) from every rank (machine by machine, so shards stay in rank order
    t * U + u) and attend with our own queries, which stay put."""
    if joint is not None:
        raise ValueError("joint tokens need queries and keys sharded alike; this call's keys hold "
                         f"{k.shape[2]} tokens per rank and its queries {q.shape[2]}")
    kv = torch.stack((k, v))
    keep = None if key_mask is None else _checked(key_mask, q.shape[0], k.shape[2], "key_mask")
    for group, transport in ((groups.ulysses, pair.ulysses), (groups.torus, pair.torus)):
        kv = _all_gather(kv, 3, group, transport)
        if keep is not None:
            keep = torch.cat(_gather_small(keep, group), dim=1)
    if keep is not None:
        _require_some_key(keep)
        keep = None if bool(keep.all()) else keep
    out, _ = attend_kept(attend, q, kv[0], kv[1], scale, keep)
    return out.to(q.dtype)


# --- key padding ----------------------------------------------------------------------------

@dataclass
class _KeyMasks:
    """Which keys may be attended, gathered once per call: the joint keys' and each
    machine's whole sequence (after the Ulysses all-to-all a rank attends with its
    machine's sequence, and the torus brings the other machines')."""

    joint: torch.Tensor | None  # (B, S_text) bool
    machines: list[torch.Tensor]  # (B, S/T) bool per torus rank
    # Checked once per call: masked blocks cost a host sync and a gather per batch item.
    keeps_every_key: bool = False

    @classmethod
    def gather(cls, key_mask, q: torch.Tensor, joint: Joint | None, groups: SPGroups) -> "_KeyMasks":
        everything = lambda n: torch.ones(q.shape[0], n, dtype=torch.bool, device=q.device)
        local = _checked(key_mask, q.shape[0], q.shape[2], "key_mask") if key_mask is not None \
            else everything(q.shape[2])
        machine = torch.cat(_gather_small(local, groups.ulysses), dim=1)
        joint_mask = None
        if joint is not None:
            joint_mask = everything(joint.k.shape[2]) if joint.key_mask is None else \
                _checked(joint.key_mask, q.shape[0], joint.k.shape[2], "Joint.key_mask")
        masks = cls(joint_mask, _gather_small(machine, groups.torus))
        every = torch.cat(([joint_mask] if joint is not None else []) + masks.machines, 1)
        _require_some_key(every)
        masks.keeps_every_key = bool(every.all())
        return masks

    def own(self, t: int) -> torch.Tensor:
        """Joint keys, then machine t's: the keys of the local block."""
        return self.machines[t] if self.joint is None else torch.cat((self.joint, self.machines[t]), 1)


def _checked(mask: torch.Tensor, batch: int, keys: int, what: str) -> torch.Tensor:
    if mask.dtype != torch.bool or tuple(mask.shape) != (batch, keys):
        raise ValueError(f"{what} must be a bool tensor of shape (batch, keys) = ({batch}, {keys}), "
                         f"True where a key may be attended; got {mask.dtype} {tuple(mask.shape)}")
    return mask


def _require_some_key(keep: torch.Tensor) -> None:
    """Every batch item must keep a key: plain attention over none is undefined."""
    empty = (~keep.any(dim=1)).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"every key of batch item(s) {empty} is masked out; attention over no key "
                         "is undefined (NaN in PyTorch's SDPA). Keep at least one key per item")


def _gather_small(mask: torch.Tensor, group) -> list[torch.Tensor]:
    if group is None or dist.get_world_size(group) == 1:
        return [mask]
    parts = [torch.empty(mask.shape, dtype=torch.uint8, device=mask.device)
             for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, mask.to(torch.uint8).contiguous(), group=group)  # gloo has no bool
    return [p.bool() for p in parts]


# --- attention over the machine's tokens and the torus -------------------------------------

def _accumulators(q: torch.Tensor):
    return (torch.zeros(q.shape, dtype=torch.float32, device=q.device),
            torch.full(q.shape[:3], float("-inf"), dtype=torch.float32, device=q.device))


def _attend_into(attend: Kernel, scale: float, q, k, v, out, lse, keep=None) -> None:
    block_out, block_lse = attend_kept(attend, q, k, v, scale, keep)
    merge_into(out, lse, block_out, block_lse)


def _with_joint(x: torch.Tensor, prefix: torch.Tensor | None) -> torch.Tensor:
    return x if prefix is None else torch.cat((prefix, x), dim=2)


def _local(qkv, joint: Joint | None, attend: Kernel, scale: float, masks: _KeyMasks | None):
    q, k, v = qkv
    jq = None if joint is None else joint.q
    # one block: its output is final, no merge, no float32 pass, no LSE needed
    out, _ = attend_kept(attend, _with_joint(q, jq), _with_joint(k, joint and joint.k),
                         _with_joint(v, joint and joint.v), scale, masks and masks.own(0))
    out = out.to(q.dtype)
    nj = 0 if jq is None else jq.shape[2]
    return out[:, :, nj:], out[:, :, :nj]


def _torus_kv(qkv, joint: Joint | None, group, transport: Transport, attend: Kernel, scale,
              masks: _KeyMasks | None):
    """Gather the other machines' K,V while attending to our own; queries stay home."""
    T, t = dist.get_world_size(group), dist.get_rank(group)
    q, k, v = qkv
    jq = None if joint is None else joint.q
    q_all = _with_joint(q, jq)
    # one send buffer for K and V (free when the all-to-all returned them stacked)
    kv_own = qkv[1:].contiguous() if torch.is_tensor(qkv) else torch.stack(qkv[1:])
    with record_function("torus_exchange"):
        incoming = _kv_arrivals(transport, kv_own, t, T, group)
        next(incoming)  # start the exchange; the local block runs under it
    out, lse = attend_kept(attend, q_all, _with_joint(k, joint and joint.k),
                           _with_joint(v, joint and joint.v), scale, masks and masks.own(t))
    out, lse = out.float(), lse.float()  # the first block starts the float32 accumulators
    for step, kv in enumerate(incoming, start=1):  # step s brings torus rank t-s's K,V
        _attend_into(attend, scale, q_all, kv[0], kv[1], out, lse,
                     masks and masks.machines[(t - step) % T])
    out = seq_major(out.shape, out, q.dtype).copy_(out)
    nj = 0 if jq is None else jq.shape[2]
    return out[:, :, nj:], out[:, :, :nj]


def _kv_arrivals(transport: Transport, kv_own: torch.Tensor, t: int, T: int, group):
    """Start sending our K,V (first ``next``), then yield the others' as they land.

    With two machines the exchange is a single step, and a transport that
    offers a collective all-gather runs it as one (NCCL's ring all-gather
    outruns its send/recv on network links). Otherwise T-1 shifted peer
    steps, each posted before the block it overlaps: step 1 under the local
    block, step s+1 under the block of step s's keys.
    """
    if T == 2 and hasattr(transport, "all_gather"):
        pending = transport.all_gather(kv_own, group)
        yield None
        every = pending.wait()
        for step in range(1, T):
            yield every[(t - step) % T]
        return
    pending = _post(transport, kv_own, (t + 1) % T, (t - 1) % T, group)
    yield None
    for step in range(1, T):
        kv = pending.wait()
        if step + 1 < T:
            pending = _post(transport, kv_own, (t + step + 1) % T, (t - step - 1) % T, group)
        yield kv


class _SlotBuffers:
    """Q/K/V of all machines' chunks for our head sub-group, in arrival order.

    Layout along the sequence: [joint | slot 0 | slot 1 | ...]; slot a holds
    the chunk of torus rank t-a, so "slots 0..a" is one contiguous view. A slot
    holds ``q_rows`` queries and ``kv_rows`` keys (``a2a``: both the machine's
    block; ``a2a-kv``: our rank's shard of it, and the whole machine's keys).
    """

    def __init__(self, like: torch.Tensor, joint: Joint | None, T: int, t: int,
                 masks: _KeyMasks | None, q_rows: int, kv_rows: int):
        B, h, _, D = like.shape  # like: our chunk's Q (batch, head sub-group, dtype, device)
        self.cq, self.ck = q_rows, kv_rows
        self.nq = 0 if joint is None or joint.q is None else joint.q.shape[2]
        self.nk = 0 if joint is None else joint.k.shape[2]
        self.q = like.new_empty(B, h, self.nq + T * q_rows, D)
        self.k, self.v = (like.new_empty(B, h, self.nk + T * kv_rows, D) for _ in range(2))
        if self.nq:
            self.q[:, :, : self.nq] = joint.q
        if self.nk:
            self.k[:, :, : self.nk] = joint.k
            self.v[:, :, : self.nk] = joint.v
        self.out, self.lse = _accumulators(self.q)
        self.keep = None  # key padding, laid out like the keys
        if masks is not None:
            chunks = [masks.machines[(t - a) % T] for a in range(T)]
            self.keep = torch.cat(([masks.joint] if self.nk else []) + chunks, dim=1)

    def fill(self, slot: int, qkv) -> None:
        self.q[:, :, self.q_slots(slot, slot + 1)] = qkv[0]
        self.fill_kv(slot, qkv[1], qkv[2])

    def fill_kv(self, slot: int, k: torch.Tensor, v: torch.Tensor) -> None:
        rows = self.k_slots(slot, slot + 1)
        self.k[:, :, rows] = k
        self.v[:, :, rows] = v

    def fill_gathered_kv(self, slot: int, gathered: torch.Tensor) -> None:
        """``gathered`` (U, 2, B, h, c, D): K/V of each rank of a machine, laid into the slot
        in rank order by one copy each (joining them first copied twice)."""
        rows = self.k_slots(slot, slot + 1)
        for i, buf in enumerate((self.k, self.v)):
            buf[:, :, rows].unflatten(2, (gathered.shape[0], -1)).copy_(gathered[:, i].permute(1, 2, 0, 3, 4))

    # Rows along the sequence: "slots" = slots first..end-1; "through" = the joint
    # rows and slots 0..end-1.
    def q_slots(self, first: int, end: int) -> slice:
        return slice(self.nq + first * self.cq, self.nq + end * self.cq)

    def k_slots(self, first: int, end: int) -> slice:
        return slice(self.nk + first * self.ck, self.nk + end * self.ck)

    def q_through(self, end: int) -> slice:
        return slice(0, self.nq + end * self.cq)

    def k_through(self, end: int) -> slice:
        return slice(0, self.nk + end * self.ck)

    def attend(self, attend: Kernel, scale: float, q_rows: slice, k_rows: slice) -> None:
        """Merge the block (queries ``q_rows``, keys ``k_rows``) into the accumulators."""
        if q_rows.stop == q_rows.start or k_rows.stop == k_rows.start:  # no joint queries/keys
            return
        _attend_into(attend, scale, self.q[:, :, q_rows], self.k[:, :, k_rows], self.v[:, :, k_rows],
                     self.out[:, :, q_rows], self.lse[:, :, q_rows],
                     None if self.keep is None else self.keep[:, k_rows])


def _torus_a2a(qkv, joint: Joint | None, group, transport: Transport, attend: Kernel, scale,
               masks: _KeyMasks | None):
    """All-to-all across machines in T-1 shifted steps, overlapped with attention."""
    T, t = dist.get_world_size(group), dist.get_rank(group)
    B, h, c, D = qkv[0].shape
    by_dest = [x.unflatten(1, (T, h // T)) for x in qkv]  # head sub-group p belongs to torus rank p
    outgoing = lambda dst: torch.stack([x[:, dst] for x in by_dest])  # a send buffer for one peer
    own = [x[:, t] for x in by_dest]  # our own sub-group goes straight into slot 0: no send buffer
    slots = _SlotBuffers(own[0], _head_slice(joint, t * (h // T), h // T), T, t, masks, c, c)
    slots.fill(0, own)
    last = T - 1
    block = lambda q_rows, k_rows: slots.attend(attend, scale, q_rows, k_rows)

    pending = _post(transport, outgoing((t + 1) % T), (t + 1) % T, (t - 1) % T, group)
    returns = {}
    for a in range(T):
        if a > 0:
            slots.fill(a, pending.wait())
            if a < last:
                nxt = a + 1
                pending = _post(transport, outgoing((t + nxt) % T), (t + nxt) % T, (t - nxt) % T, group)
        # new queries against every key so far (joint keys included)
        block(slots.q_slots(a, a + 1), slots.k_through(a + 1))
        if a < last:
            # older queries (and joint queries) against the new keys; at slot 0 the
            # joint queries also meet the joint keys
            block(slots.q_through(a), slots.k_through(1) if a == 0 else slots.k_slots(a, a + 1))
            continue
        # last step: finish slot by slot and send each output home at once
        returns[last] = _send_output(slots, last, t, T, group, transport)
        for b in range(last - 1, 0, -1):
            block(slots.q_slots(b, b + 1), slots.k_slots(last, last + 1))
            returns[b] = _send_output(slots, b, t, T, group, transport)
        block(slots.q_through(1), slots.k_slots(last, last + 1))

    dtype, sub = qkv[0].dtype, h // T
    out = seq_major((B, h, c, D), qkv[0])
    out[:, t * sub:(t + 1) * sub] = slots.out[:, :, slots.q_slots(0, 1)]
    for b, pend in returns.items():  # output step b brings our chunk from torus rank t+b
        p = (t + b) % T
        out[:, p * sub:(p + 1) * sub] = pend.wait()
    joint_out = slots.out[:, :, : slots.nq].to(dtype)
    return out, joint_out


def _send_output(slots: _SlotBuffers, slot: int, t: int, T: int, group, transport: Transport):
    """Slot ``slot`` is final: send it to its owner t-slot, receive ours from t+slot."""
    rows = slots.q_slots(slot, slot + 1)
    final = slots.out[:, :, rows].to(slots.q.dtype)
    return _post(transport, final, (t - slot) % T, (t + slot) % T, group)


# --- a2a-kv: heads split across machines, keys shared inside a machine ----------------------

def _torus_a2a_kv(qkv, joint: Joint | None, groups: SPGroups, pair: TransportPair, attend: Kernel,
                  scale: float, masks: _KeyMasks | None):
    """Machine t attends for head group t (H/T heads) over the whole sequence; its U ranks
    share that group's keys and values instead of splitting its heads, so only T must divide
    the heads. No Ulysses all-to-all: each rank sends its own shard across machines.

    Slot a holds our queries of rank (t-a, u)'s shard and machine t-a's whole block of keys:
    the queries come first, in one all-to-all across machines (a third of the bytes), so
    every later block attends with all of them at once (blocks of one shard's queries
    left the GPU partly idle: 97 tiles for 132 SMs at 4x8); then the K/V in T-1 peer steps,
    each all-gathered inside the machine (NVLink) while the previous slot's keys are
    attended. The last slot's keys are attended slot by slot of queries, each output sent
    home as soon as it is final. Across machines each GPU sends what ``a2a`` sends,
    4X(T-1)/T; inside, the K/V gathers move 2X(U-1) instead of the all-to-all's 4X(U-1)/U.
    """
    T, t = dist.get_world_size(groups.torus), dist.get_rank(groups.torus)
    U = groups.ulysses_size
    B, H, c, D = qkv[0].shape
    hg = H // T
    q, k, v = (x.unflatten(1, (T, hg)) for x in qkv)  # head group p is machine p's
    kv_for = lambda dst: torch.stack((k[:, dst], v[:, dst]))
    kv_step = lambda a: _post(pair.torus, kv_for((t + a) % T), (t + a) % T, (t - a) % T, groups.torus)
    gather_kv = lambda kv: _gather_start(pair.ulysses, kv, groups.ulysses)
    joint, nj = _joint_share(joint, t * hg, hg, groups.ulysses)
    slots = _SlotBuffers(q[:, t], joint, T, t, masks, c, U * c)
    block = lambda q_rows, k_rows: slots.attend(attend, scale, q_rows, k_rows)
    last = T - 1

    queries = _all_to_all_start(pair.torus, q.movedim(1, 0), groups.torus)  # (T, B, hg, c, D) by source
    pending = kv_step(1)
    gathering = gather_kv(kv_for(t))
    slots.q[:, :, slots.q_slots(0, 1)] = q[:, t]
    slots.fill_gathered_kv(0, gathering.wait())
    block(slots.q_through(1), slots.k_through(1))  # our (and the joint) queries: joint keys, our machine's
    arrived = queries.wait()
    for a in range(1, T):
        slots.q[:, :, slots.q_slots(a, a + 1)] = arrived[(t - a) % T]
    for a in range(1, T):
        gathering = gather_kv(pending.wait())
        if a < last:
            pending = kv_step(a + 1)
        if a == 1:  # under the gather: the keys already here, with queries not yet met
            block(slots.q_slots(1, T), slots.k_through(1))
        else:
            block(slots.q_through(T), slots.k_slots(a - 1, a))
        slots.fill_gathered_kv(a, gathering.wait())
    returns = {}
    for b in range(last, 0, -1):  # the last keys, slot by slot: each output home once final
        block(slots.q_slots(b, b + 1), slots.k_slots(last, last + 1))
        returns[b] = _send_output(slots, b, t, T, groups.torus, pair.torus)
    block(slots.q_through(1), slots.k_slots(last, last + 1))

    out = seq_major((B, H, c, D), qkv[0])
    out[:, t * hg:(t + 1) * hg] = slots.out[:, :, slots.q_slots(0, 1)]
    for b, pend in returns.items():  # output step b brings our shard from torus rank t+b
        p = (t + b) % T
        out[:, p * hg:(p + 1) * hg] = pend.wait()
    if joint is None or joint.q is None:
        return out
    joint_out = slots.out[:, :, : slots.nq].to(qkv[0].dtype)
    joint_out = _all_gather(joint_out, 2, groups.ulysses, pair.ulysses)[:, :, :nj]  # rows, padding off
    return out, _all_gather(joint_out, 1, groups.torus, pair.torus)  # heads


def _all_to_all_start(transport: Transport, x: torch.Tensor, group) -> Pending:
    """``x`` (P, ...) by destination -> (P, ...) by source, started now where the transport can."""
    with record_function("torus_exchange"):
        if hasattr(transport, "all_to_all_start"):
            return transport.all_to_all_start(x, group, 0, 0)
        return _Done(transport.all_to_all(x, group, 0, 0))


def _joint_share(joint: Joint | None, start: int, count: int, group) -> tuple[Joint | None, int]:
    """Heads ``start:start+count`` of the joint tokens, and this rank's share of their queries:
    the machine's ranks split the query rows (padded with zero rows to a multiple of U, cut
    off again after the gather) and keep every key. Returns it and the true query count."""
    joint = _head_slice(joint, start, count)
    if joint is None or joint.q is None:
        return joint, 0
    U = dist.get_world_size(group) if group is not None else 1
    u = dist.get_rank(group) if U > 1 else 0
    nj = joint.q.shape[2]
    per = -(-nj // U)
    rows = torch.nn.functional.pad(joint.q, (0, 0, 0, per * U - nj))[:, :, u * per:(u + 1) * per]
    return Joint(rows, joint.k, joint.v, joint.key_mask), nj


class _Gathered:
    """An all-gather done as peer steps (transports without a collective one)."""

    def __init__(self, own: torch.Tensor, me: int, steps: dict):
        self.own, self.me, self.steps = own, me, steps

    def wait(self) -> torch.Tensor:
        P = len(self.steps) + 1
        parts = [self.own] * P
        for d, step in self.steps.items():  # step d brings group rank me-d's
            parts[(self.me - d) % P] = step.wait()
        return torch.stack(parts)


def _gather_start(transport: Transport, x: torch.Tensor, group) -> Pending:
    """Every group rank's ``x``, stacked in rank order, (P, *x.shape); started now."""
    if group is None or dist.get_world_size(group) == 1:
        return _Done(x[None])
    if hasattr(transport, "all_gather"):
        return transport.all_gather(x, group)
    P, me = dist.get_world_size(group), dist.get_rank(group)
    return _Gathered(x, me, {d: _post(transport, x, (me + d) % P, (me - d) % P, group) for d in range(1, P)})
