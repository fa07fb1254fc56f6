"""One-sided peer copies: Triton kernels that store straight into peers' memory.

A *peer buffer* is one symmetric allocation (NVSHMEM heap) seen by every rank
of a group; ``deltas[p]`` is the distance, in elements, from our mapping of it
to rank p's (``nvshmem_ptr``; zero for ourselves). ``all_to_all_put`` copies our
chunk for rank p from a strided source into rank p's buffer at *our* region,
packing and unpacking fused into the copy (no staging tensor), then raises our
flag in p's flag array; ``put_one`` does the same for one torus step (one
peer, one contiguous tensor); ``wait_flags`` spins until the chosen sources'
flags reach the expected count. Launch layouts are worked out once per call
site (shapes and strides) and cached on the buffers.

    sender s, use e (slot e % 2, epoch (e + 1) // 2):
      CTA (dest p, lane l):  store its tiles -> p.buf[slot][region of s]
                             barrier; atomic_add(p.flag[slot][s], 1, release, sys)
    receiver r:              spin until flag[slot][s] >= epoch * ctas_per_peer
                             (acquire, sys) for every awaited source s -- in
                             wait_flags, or fused into the put kernel (WAIT):
                             lane 0 of the CTAs sending to p waits for p's flag

With ``COUNTED`` the kernels read the use number from a device counter
instead of taking it as an argument (CUDA graphs: the replayed graph advances
the counter), and the slot and epoch follow from it in the kernel.

Flags only grow, so nothing is ever reset and no barrier is needed. Two
slots: a sender writes slot e % 2 again at use e + 2 only after it has
waited for data that the receiver sent after finishing with use e -- in an
all-to-all the receiver's part of use e + 1; in the torus the step at the
opposite distance of the next layer (every layer uses every distance) -- and
each rank's uses are ordered on its compute stream. The tensor a use returns
is therefore valid until the channel's use after next.

Why stores over NVLink and not ``nvshmem_putmem_signal``: for peers in the
same NVLink domain NVSHMEM's device put *is* a store through ``nvshmem_ptr``,
and doing the stores ourselves lets one kernel read the 4-D source with its
own strides and write the receiver's final layout (the Ulysses
sequence-heads transpose) -- which a contiguous put cannot. Peers without a
direct mapping (another machine) would need the proxy-driven
``nvshmem_putmem_signal``; the transport refuses them and says to use NCCL.

The kernels also run under Triton's interpreter (``TRITON_INTERPRET=1``) on
CPU tensors, where the CPU tests drive them with several "ranks" in one
process (``wait=False`` and a separate ``wait_flags``, since the interpreter
runs one program at a time).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import triton
import triton.language as tl

from ..transport import split_chunks


# Values that change per call or per rank are not specialised on: a new variant
# would be compiled and loaded while another rank's kernel may be spinning on
# this GPU, and loading a module can wait for running kernels (a deadlock).
@triton.jit(do_not_specialize=["me", "epoch", "slot"])
def _put_chunks_kernel(src, dst, flags, dst_deltas, flag_deltas, dests, counter, slot_elems,
                       me, P, epoch, slot,
                       G0, G1, R, D,
                       s_dest, s0, s1, s2,
                       d_src, d0, d1, d2,
                       CTAS_PER_PEER: tl.constexpr, BLOCK_R: tl.constexpr,
                       BLOCK_D: tl.constexpr, WAIT: tl.constexpr, COUNTED: tl.constexpr):
    if COUNTED:  # the use number lives on the device (CUDA graphs replay it correctly)
        use = tl.load(counter)
        slot = use % 2
        epoch = (use + 1) // 2
        dst = dst + slot * slot_elems
    pid = tl.program_id(0)
    lane = pid % CTAS_PER_PEER
    peer = tl.load(dests + pid // CTAS_PER_PEER)
    # peer mappings are page-aligned: keep 16-byte vector stores
    delta = tl.multiple_of(tl.load(dst_deltas + peer), 16)
    src_base = src + peer * s_dest
    dst_base = dst + delta + me * d_src
    rows = tl.arange(0, BLOCK_R)[:, None]
    cols = tl.arange(0, BLOCK_D)[None, :]
    row_blocks = tl.cdiv(R, BLOCK_R)
    for tile in range(lane, G0 * G1 * row_blocks, CTAS_PER_PEER):
        rb = tile % row_blocks
        g = tile // row_blocks
        g1 = g % G1
        g0 = g // G1
        r = rb * BLOCK_R + rows
        mask = (r < R) & (cols < D)
        vals = tl.load(src_base + g0 * s0 + g1 * s1 + r * s2 + cols, mask=mask)
        tl.store(dst_base + g0 * d0 + g1 * d1 + r * d2 + cols, vals, mask=mask)
    tl.debug_barrier()  # every thread's stores precede the release below
    remote_flag = flags + tl.load(flag_deltas + peer) + slot * P + me
    tl.atomic_add(remote_flag, 1, sem="release", scope="sys")
    if WAIT:
        if lane == 0:  # the CTAs sending to p also wait for p's data to us
            flag = flags + slot * P + peer
            seen = tl.atomic_add(flag, 0, sem="acquire", scope="sys")
            target = epoch.to(tl.int64) * CTAS_PER_PEER  # int64: epoch * ctas passes 2**31
            while seen < target:
                seen = tl.atomic_add(flag, 0, sem="acquire", scope="sys")


@triton.jit(do_not_specialize=["slot", "epoch", "ctas_per_peer"])  # ctas 1 would become a constant
def _wait_flags_kernel(flags, sources, counter, slot, P, epoch, ctas_per_peer, COUNTED: tl.constexpr):
    if COUNTED:
        use = tl.load(counter)
        slot = use % 2
        epoch = (use + 1) // 2
    target = epoch.to(tl.int64) * ctas_per_peer  # int64: epoch * ctas passes 2**31
    src = tl.load(sources + tl.program_id(0))
    flag = flags + slot * P + src
    seen = tl.atomic_add(flag, 0, sem="acquire", scope="sys")
    while seen < target:
        seen = tl.atomic_add(flag, 0, sem="acquire", scope="sys")


@dataclass
class PeerBuffers:
    """A channel's buffers: ``data`` (2 slots, each of the receive shape) and
    ``flags`` (2 slots x P int64 counters), with per-peer element distances."""

    data: torch.Tensor
    flags: torch.Tensor
    data_deltas: torch.Tensor  # int64 (P,), in elements of data.dtype
    flag_deltas: torch.Tensor  # int64 (P,), in int64 elements
    plans: dict = field(default_factory=dict)  # launch layouts per call site: no per-call Python work

    def __post_init__(self):
        # made once: a tensor view costs more host time (~1.3 us on an H200 host) than a launch saves
        self.slots = tuple(self.data.unbind(0))
        self.group_size = self.flags.shape[1]


def collapse(shape, *strides) -> tuple[list[int], list[list[int]]] | None:
    """(G0, G1, rows, D) and the matching strides for a chunk of ``shape``.

    The last dim (stride 1 everywhere) stays the vector dim D, split into rows
    of at most 1024 elements when longer; outer dims merge where they are
    contiguous in every stride set. None where more than three outer dims remain.
    """
    *outer, D = shape
    outer_strides = [list(s[:-1]) for s in strides]
    width = next(w for w in (1024, 512, 256, 128, 64, 32, 16, 8, 4, 2, 1) if D % w == 0)
    if D > 1024:  # contiguous, so it is (D / width) rows of width
        outer.append(D // width)
        for s in outer_strides:
            s.append(width)
        D = width
    merged = []
    for i, n in enumerate(outer):
        st = [s[i] for s in outer_strides]
        if merged and all(merged[-1][1 + j] == st[j] * n for j in range(len(st))):
            merged[-1] = [merged[-1][0] * n, *st]
        else:
            merged.append([n, *st])
    if len(merged) > 3:
        return None
    merged = [[1] + [0] * len(strides)] * (3 - len(merged)) + merged
    return ([m[0] for m in merged] + [D],
            [[m[1 + j] for m in merged] + [1] for j in range(len(strides))])


def _launch(kernel_fn, compiled: dict, key, grid: int, args: tuple, constexprs: dict) -> None:
    """Launch ``kernel_fn``; after the first launch for ``key``, call the compiled kernel directly.

    Triton's Python launcher binds and specialises every argument on each call:
    tens of microseconds for the put kernel's 29 arguments (measured on one H200), more than
    copying a small chunk takes. The caller's ``key`` must hold everything the
    specialisation depends on that can change between its calls.
    """
    kernel = compiled.get(key)
    if kernel is not None and _run_compiled(kernel, grid, args[0].get_device(), (*args, *constexprs.values())):
        return
    kernel = kernel_fn[(grid,)](*args, **constexprs)
    if all(hasattr(kernel, a) for a in ("run", "function", "packed_metadata")):  # not the interpreter
        compiled[key] = kernel


def _run_compiled(kernel, grid: int, device: int, args: tuple) -> bool:
    """Launch a compiled kernel straight on the current stream; False (and never again) where
    this Triton's launcher takes other arguments, so the caller keeps to Triton's own path."""
    if not _FAST[0]:
        return False
    try:  # the raw stream handle: torch.cuda.current_stream() builds a Stream object (4 us)
        kernel.run(grid, 1, 1, torch._C._cuda_getCurrentRawStream(device), kernel.function,
                   kernel.packed_metadata, None, None, None, *args)
        return True
    except TypeError:
        _FAST[0] = False
        return False


_FAST = [True]
_WAIT_COMPILED: dict = {}


class _Layout:
    """Everything a launch needs besides the source pointer and the use number.

    ``send`` is (P, *chunk) with any strides (chunk p goes to rank p);
    ``region(slot_tensor)`` is the (P, *chunk) view of a receiver's slot whose
    entry s is where source s's chunk lands.
    """

    def __init__(self, send: torch.Tensor, region, buffers: PeerBuffers):
        send_extent = 1 + sum((n - 1) * st for n, st in zip(send.shape, send.stride()))
        if max(buffers.slots[0].numel(), send_extent) >= 2**31:
            raise ValueError("the peer-copy kernels index with 32-bit offsets: a channel slot or a "
                             "send buffer of 2**31 elements or more has to be split into several calls")
        if send.stride(-1) != 1:
            raise ValueError("the peer-copy kernels read rows: the tensor's last dimension must be "
                             f"contiguous (stride 1), got strides {tuple(send.stride())}")
        views = [region(slot) for slot in buffers.slots]  # alike but for their offsets
        assert views[0].shape == send.shape and views[0].stride(-1) == 1  # our own slot layout
        chunk = send.shape[1:]
        layout = collapse(chunk, send.stride()[1:], views[0].stride()[1:])
        if layout is None:
            raise ValueError(f"cannot copy a {tuple(chunk)} chunk in 4 strided dims")
        (G0, G1, R, D), (src_st, dst_st) = layout
        self.ints = (G0, G1, R, D, send.stride(0), *src_st[:3], views[0].stride(0), *dst_st[:3])
        offsets = [view.storage_offset() - buffers.data.storage_offset() for view in views]
        self.dsts = [buffers.data.view(-1)[offset:] if offset else buffers.data for offset in offsets]
        block_d = triton.next_power_of_2(self.ints[3])
        self.blocks = (max(1, min(64, 8192 // block_d)), block_d)
        self.compiled: dict = {}  # (slot, src 16-byte aligned, wait, ctas) -> compiled kernel
        self.prepared: dict = {}  # the same key + (me, dests, flags) -> a ready launch

    def launch(self, src: torch.Tensor, buffers: PeerBuffers, me: int, dests: torch.Tensor, use: int,
               ctas_per_peer: int, wait: bool, counter: torch.Tensor | None = None) -> None:
        _check_use(use)
        slot = 0 if counter is not None else use % 2  # counted: the kernel picks the slot
        flags = buffers.flags if counter is None else counter
        src_ptr = src.data_ptr()
        # all other arguments are fixed per layout (or not specialised on)
        key = (slot, src_ptr % 16 == 0, wait, ctas_per_peer, counter is not None)
        site = (key, me, dests.data_ptr(), flags.data_ptr())
        ready = self.prepared.get(site)
        if ready is not None:  # only the source and the epoch change between calls
            kernel, grid, head, tail = ready
            if _run_compiled(kernel, grid, src.get_device(), (src_ptr, *head, (use + 1) // 2, slot, *tail)):
                return
        args = (src, self.dsts[slot], buffers.flags, buffers.data_deltas, buffers.flag_deltas, dests,
                flags, buffers.slots[0].numel(), me, buffers.group_size, (use + 1) // 2, slot, *self.ints)
        constexprs = dict(CTAS_PER_PEER=ctas_per_peer, BLOCK_R=self.blocks[0], BLOCK_D=self.blocks[1],
                          WAIT=wait, COUNTED=counter is not None)
        grid = dests.numel() * ctas_per_peer
        _launch(_put_chunks_kernel, self.compiled, key, grid, args, constexprs)
        if key in self.compiled and _FAST[0]:
            # Triton's launcher asks each tensor for its pointer on every call; these tensors live
            # as long as the channel, so their pointers are taken once (1.5-2.7 us a call, measured)
            head = tuple(a.data_ptr() if isinstance(a, torch.Tensor) else a for a in args[1:10])
            self.prepared[site] = (self.compiled[key], grid, head, (*self.ints, *constexprs.values()))


def _check_use(use: int) -> None:
    # The epoch goes to the kernels as a 32-bit argument; 2**32 uses of one channel are
    # billions of layers, but a wrapped epoch would let every wait pass without data.
    if use >= 2**32 - 2:
        raise RuntimeError("a peer-copy channel has been used 2**32 times, past what its 32-bit "
                           "epoch can count; restart the process (or re-create the transport)")


def _cached_layout(buffers: PeerBuffers, key, views) -> _Layout:
    """The call site's layout, worked out on its first use (``views()`` -> send, region)."""
    if key not in buffers.plans:
        buffers.plans[key] = _Layout(*views(), buffers)
    return buffers.plans[key]


def wait_flags(buffers: PeerBuffers, sources: torch.Tensor, use: int, ctas_per_peer: int,
               counter: torch.Tensor | None = None) -> None:
    """Wait (on the current stream) until the data of ``use`` (or of the use in
    ``counter``) from every rank in ``sources`` (int64 device tensor) has landed."""
    counted = counter is not None
    _check_use(use)
    args = (buffers.flags, sources, counter if counted else buffers.flags, use % 2, buffers.group_size,
            (use + 1) // 2, ctas_per_peer)
    # ctas in the key too: a kernel Triton specialised on one count must not serve another
    _launch(_wait_flags_kernel, _WAIT_COMPILED, (buffers.group_size, counted, ctas_per_peer), sources.numel(),
            args, dict(COUNTED=counted))


def all_to_all_put(x: torch.Tensor, scatter_dim: int, gather_dim: int, buffers: PeerBuffers,
                   me: int, dests: torch.Tensor, use: int, *, ctas_per_peer: int,
                   wait: bool = True, counter: torch.Tensor | None = None) -> torch.Tensor:
    """The transport's all-to-all: split ``x`` along ``scatter_dim``, land the
    chunks concatenated along ``gather_dim`` in each receiver's slot; returns
    our slot (complete once the kernel's waits, or ``wait_flags``, are done).

    With ``counter`` (a one-element int64 device tensor the caller has already
    advanced) the use number is read on the device instead and the slot is
    chosen there; take the result with ``counted_slot``."""
    P = buffers.group_size
    layout = _cached_layout(buffers, ("a2a", scatter_dim, gather_dim, x.shape, x.stride()),
                            lambda: (split_chunks(x, P, scatter_dim),
                                     lambda slot: split_chunks(slot, P, gather_dim)))
    layout.launch(x, buffers, me, dests, use, ctas_per_peer, wait, counter)  # the views start at x
    return buffers.slots[use % 2]


def counted_slot(buffers: PeerBuffers, counter: torch.Tensor) -> torch.Tensor:
    """A copy of the slot that the use in ``counter`` landed in (chosen on the device)."""
    return buffers.data.index_select(0, counter.remainder(2)).squeeze(0)


def put_one(send: torch.Tensor, buffers: PeerBuffers, me: int, dest: torch.Tensor, use: int, *,
            ctas_per_peer: int) -> None:
    """One torus step: ``send`` into one receiver's slot (shaped like ``send``)."""
    P = buffers.group_size
    every = lambda t: t.unsqueeze(0).expand(P, *t.shape)  # stride 0: one chunk, one landing place
    layout = _cached_layout(buffers, ("one", send.shape, send.stride()), lambda: (every(send), every))
    layout.launch(send, buffers, me, dest, use, ctas_per_peer, wait=False)
