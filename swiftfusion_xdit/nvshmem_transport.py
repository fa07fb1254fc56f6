"""One-sided transport: NVSHMEM symmetric buffers written by Triton kernels.

Same interface as ``TwoSidedTransport`` (``all_to_all``, ``exchange``). Each
call site and shape gets a *channel*: a receive buffer with two slots and a
flag array, allocated once on the NVSHMEM symmetric heap and reused by every
layer and step. Senders store straight into the receivers' slots through
NVLink (``swiftfusion_xdit.kernels.peer_copy``: packing fused into the
store, one release-add per CTA on the receiver's flag); receivers wait on
those flags, never on a barrier or a matching receive:

* ``all_to_all``: one kernel per call; its CTAs store our chunk for every
  peer straight into the peer's final layout (the Ulysses transpose is the
  copy itself) and then wait for the peers' chunks to us.
* ``exchange``: the put kernel runs on a communication stream, so attention
  on blocks already here overlaps with it; ``wait()`` enqueues a one-CTA
  kernel on the compute stream that spins on the source's flag, so the
  attention of block k starts as soon as block k has landed.

The hot path makes no host NVSHMEM calls, no staging copies and no
allocations. Results live in a channel slot and stay valid until this
rank's next use of that channel (a peer that has our data of that use may
already be writing the use after: see the kernel module for why two slots
suffice). ``exchange`` also needs every layer to use each peer distance and
its opposite with the same shape, as the torus schedule does: a rank's next
write into a slot waits for data the slot's reader sends after it is done.
Torus Attention consumes each result within the layer and copies its output
out.

CUDA graphs: eager channels count their uses on the host, which a replayed
graph would not advance. Under ``torch.compile`` the all-to-all is one
custom op (``swiftfusion::nvshmem_all_to_all``), so dynamo keeps it in the
graph, and it and any all-to-all made while a stream is capturing take the
counted path: the use number is a device counter the graph itself advances,
the kernel picks the slot from it, and the result is copied out of the slot
(one extra on-GPU copy of the received bytes). ``exchange`` stays host
counted; capturing it is refused.

Symmetric memory is sized from the problem: each channel takes exactly two
slots of its receive shape, checked against the GPU's free memory before it
is allocated (an error says how much the problem needs). NVSHMEM's heap
grows on demand (CUDA VMM), so ``SWIFTFUSION_NVSHMEM_HEAP`` (default 1G) is
only its first reservation; where growth is off, the error names the size to
set. Peers must be NVLink-mapped (``nvshmem_ptr`` non-null), so NVSHMEM runs
one job per machine (``init_nvshmem``) and serves groups inside it; across
machines the torus exchange goes over NCCL (``transport.resolve_transports``).
"""

from __future__ import annotations

import atexit
import os
import re
import sys
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.distributed as dist

from .transport import _Done, join_chunks, split_chunks

_STATE: dict = {}


def a2a_shape(shape, P: int, scatter_dim: int, gather_dim: int) -> torch.Size:
    """What an all-to-all of a ``shape`` tensor returns on each rank."""
    send = split_chunks(torch.empty(shape, device="meta"), P, scatter_dim)
    return join_chunks(send, gather_dim).shape


# Declared functional: its side effects (the channel's counter, the peers' slots) are paired
# across ranks by call order, which compiled graphs keep. Two calls on the very same input
# could be merged by common-subexpression elimination; Torus Attention never makes them.
@torch.library.custom_op("swiftfusion::nvshmem_all_to_all", mutates_args=())
def _all_to_all_op(x: torch.Tensor, group_name: str, scatter_dim: int, gather_dim: int) -> torch.Tensor:
    from torch.distributed.distributed_c10d import _resolve_process_group
    return _STATE["transport"].all_to_all_counted(x, _resolve_process_group(group_name),
                                                  scatter_dim, gather_dim)


@_all_to_all_op.register_fake
def _(x, group_name, scatter_dim, gather_dim):
    from torch.distributed.distributed_c10d import _resolve_process_group
    P = dist.get_world_size(_resolve_process_group(group_name))
    return x.new_empty(a2a_shape(x.shape, P, scatter_dim, gather_dim))


def unavailable_reason() -> str | None:
    """None when NVSHMEM can be used here, else what is missing and what to do."""
    if not torch.cuda.is_available():
        return "NVSHMEM needs an NVIDIA GPU; on CPU use comm='gloo' (or 'auto')"
    try:
        import nvshmem.core  # noqa: F401
        import triton  # noqa: F401
        from cuda.core import Device  # noqa: F401
    except ImportError as err:
        return (f"the one-sided path needs nvshmem4py and triton ({err}); install them with "
                "pip install 'swiftfusion-xdit[nvshmem]' (nvshmem4py-cu13, triton)")
    from .transport import process_group_backend
    if process_group_backend() != "nccl":
        return "NVSHMEM is bootstrapped from a torch.distributed NCCL process group; none is initialised"
    return None


def machine_ranks(node_of_rank: tuple[int, ...], rank: int) -> list[int]:
    """The global ranks on ``rank``'s machine: they form its NVSHMEM job, and a
    rank's PE is its index in this list."""
    return [r for r, node in enumerate(node_of_rank) if node == node_of_rank[rank]]


def init_nvshmem() -> None:
    """Start NVSHMEM once per process: one NVSHMEM job per machine.

    The one-sided kernels only reach NVLink-mapped peers, so an NVSHMEM job
    never needs to span machines -- and one that did would need an NVSHMEM
    network transport between them. The first rank of each machine makes a
    unique id; ids travel over the torch.distributed world group.
    """
    if _STATE:
        return
    from .topology import detect_topology
    os.environ.setdefault("NVSHMEM_DISABLE_NVLS", "1")  # never use NVLink multicast
    # the heap grows on demand (CUDA VMM); this is only its first reservation
    os.environ.setdefault("NVSHMEM_SYMMETRIC_SIZE", os.environ.get("SWIFTFUSION_NVSHMEM_HEAP", "1G"))
    import nvshmem.core as nvshmem
    from cuda.core import Device

    rank = dist.get_rank()
    local = machine_ranks(detect_topology().node_of_rank, rank)
    pe = local.index(rank)
    device = Device(torch.cuda.current_device())
    device.set_current()
    uids = [None] * dist.get_world_size()
    dist.all_gather_object(uids, nvshmem.get_unique_id(empty=(pe != 0)))
    nvshmem.init(device=device, uid=uids[local[0]], rank=pe, nranks=len(local), initializer_method="uid")
    _STATE.update(nvshmem=nvshmem, pe_of_rank={r: i for i, r in enumerate(local)}, channels={},
                  symmetric_bytes=0, comm_stream=torch.cuda.Stream(), failed=False)
    _note_uncaught_exceptions()
    atexit.register(shutdown_nvshmem)


def _note_uncaught_exceptions() -> None:
    previous = sys.excepthook

    def hook(*exc_info):
        _STATE["failed"] = True
        previous(*exc_info)
    sys.excepthook = hook


def shutdown_nvshmem() -> None:
    """Free the channels and finalise NVSHMEM (collective: every PE of the machine).

    A rank leaving on an uncaught exception skips it: the other ranks will not join its
    barrier (or are spinning on flags it never raised), so it would hang instead of
    exiting and letting the launcher see the failure; process exit frees the memory."""
    if not _STATE:
        return
    if not _STATE.get("failed"):
        torch.cuda.synchronize()
        for channel in _STATE["channels"].values():
            channel.free()
        _STATE["nvshmem"].finalize()
    _STATE.clear()
    for transport in NvshmemTransport.instances:  # their sites point into freed channels
        transport._sites.clear()
    NvshmemTransport.instances.clear()


def parse_size(text: str) -> int:
    """NVSHMEM's size syntax: a number, then an optional k/m/g/t (powers of 1024);
    anything after the multiplier is ignored ("1GB" is 1 GiB), as NVSHMEM does."""
    match = re.match(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)", text.lower())
    if match is None:
        raise ValueError(f"not an NVSHMEM size: {text!r} (e.g. 512M, 4G)")
    number, unit = match.groups()
    return int(float(number) * 1024 ** ("_kmgt".index(unit or "_")))


def check_fits(nbytes: int, in_use: int, reserved: int, free: int) -> None:
    """Refuse a channel of ``nbytes`` when the heap (``reserved`` bytes, ``in_use``
    taken) would have to grow by more than the GPU's ``free`` memory, saying what the
    problem needs and what to do."""
    grow = in_use + nbytes - max(reserved, in_use)  # growth already taken is not asked twice
    if grow > free:
        raise RuntimeError(
            f"comm='nvshmem' needs {nbytes / 2**20:.0f} MiB more symmetric memory for this problem "
            f"({in_use / 2**20:.0f} MiB in use of a {reserved / 2**20:.0f} MiB heap), so the heap must "
            f"grow by {grow / 2**20:.0f} MiB, but only {free / 2**20:.0f} MiB of GPU memory is free: "
            "use more GPUs per machine in the Ulysses group, a smaller problem, or comm='nccl'")


def ctas_per_peer(chunk_bytes: int, peers: int) -> int:
    """One CTA per 16 KiB tile of a peer's chunk (a tile is one load/store round), at
    most four CTAs per SM over all peers: enough stores in flight to fill NVLink.
    Measured on one H200 (virtual ranks), 16 CTAs per peer copied 4,608-token chunks at
    only 230-590 GB/s: too few stores in flight."""
    sms = torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count
    return max(1, min(chunk_bytes // (16 * 1024), 4 * sms // peers))


class _Channel:
    """Symmetric receive slots and flags for one (call site, shape, dtype, group)."""

    def __init__(self, recv_shape, dtype, group, chunk_bytes: int):
        from .kernels.peer_copy import PeerBuffers
        nvshmem = _STATE["nvshmem"]
        ranks = dist.get_process_group_ranks(group)
        P = len(ranks)
        nbytes = 2 * torch.Size(recv_shape).numel() * torch.empty((), dtype=dtype).element_size()
        check_fits(nbytes, _STATE["symmetric_bytes"], parse_size(os.environ["NVSHMEM_SYMMETRIC_SIZE"]),
                   torch.cuda.mem_get_info()[0])
        try:
            data = nvshmem.tensor((2, *recv_shape), dtype=dtype)
            flags = nvshmem.tensor((2, P), dtype=torch.int64)
        except Exception as err:
            total = (_STATE["symmetric_bytes"] + nbytes) / 2**30
            raise RuntimeError(
                f"the NVSHMEM symmetric heap (NVSHMEM_SYMMETRIC_SIZE="
                f"{os.environ.get('NVSHMEM_SYMMETRIC_SIZE')}, growth on demand off or failed) cannot "
                f"hold another {nbytes / 2**20:.0f} MiB for a {tuple(recv_shape)} {dtype} channel: {err}. "
                f"Set SWIFTFUSION_NVSHMEM_HEAP (or NVSHMEM_SYMMETRIC_SIZE, which wins) to at least "
                f"{total:.1f}G before the first call.") from err
        _STATE["symmetric_bytes"] += nbytes
        flags.zero_()
        self.buffers = PeerBuffers(data, flags, _peer_deltas(data, ranks), _peer_deltas(flags, ranks))
        self.ctas = ctas_per_peer(chunk_bytes, P)
        self.uses = 0
        self.counter = _kept_tensor([0])  # uses, for CUDA graphs
        self._tables: dict = {}
        torch.cuda.synchronize()
        dist.barrier(group)  # every rank's flags are zero before anyone signals

    def next_use(self) -> int:
        self.uses += 1
        return self.uses

    def table(self, ranks: tuple[int, ...]) -> torch.Tensor:
        if ranks not in self._tables:
            self._tables[ranks] = _kept_tensor(ranks)
        return self._tables[ranks]

    def free(self):
        for t in (self.buffers.data, self.buffers.flags):
            _STATE["nvshmem"].free_tensor(t)


def _peer_deltas(local: torch.Tensor, ranks: list[int]) -> torch.Tensor:
    """Element distance from our mapping of ``local`` to each rank's (nvshmem_ptr)."""
    from nvshmem.core.interop.torch import get_peer_tensor
    deltas = []
    for rank in ranks:
        pe = _STATE["pe_of_rank"].get(rank)
        ptr = _peer_pointer(get_peer_tensor, local, pe) if pe is not None else 0
        if not ptr:
            raise RuntimeError(f"rank {rank} is not NVLink-mapped from rank {dist.get_rank()} (another "
                               "machine?): the one-sided kernels store into peers' memory directly; "
                               "use comm='nccl' across machines")
        deltas.append((ptr - local.data_ptr()) // local.element_size())
    return _kept_tensor(deltas)


def _kept_tensor(values) -> torch.Tensor:
    """An int64 device tensor the transport keeps across calls, made on a helper thread.

    torch.compile's CUDA graphs warm up with this thread's allocations routed into
    their private memory pool, and refuse any that outlive the run (a channel's
    counter and tables are made on its first call, which may be that warm-up)."""
    device = torch.cuda.current_device()

    def make():
        kept = torch.tensor(values, dtype=torch.int64, device=f"cuda:{device}")
        torch.cuda.current_stream(device).synchronize()
        return kept
    return _KEEPER.submit(make).result()


_KEEPER = ThreadPoolExecutor(1)


def _peer_pointer(get_peer_tensor, local: torch.Tensor, pe: int) -> int:
    try:
        return get_peer_tensor(local, pe).data_ptr()
    except Exception:  # no direct mapping to that PE
        return 0


def _refuse_capture() -> None:
    if torch.cuda.is_current_stream_capturing():
        raise RuntimeError("the NVSHMEM torus exchange counts its uses on the host, so a captured "
                           "CUDA graph would replay stale counts (its all-to-all can be captured); "
                           "use comm='nccl' for a torus inside one machine under CUDA graphs")


class _Pending:
    def __init__(self, channel: _Channel, source: torch.Tensor, use: int, sent: torch.cuda.Event):
        self.channel, self.source, self.use, self.sent = channel, source, use, sent

    @torch.compiler.disable  # a host-counted wait: dynamo must not guard on or bake in its use
    def wait(self) -> torch.Tensor:
        from .kernels.peer_copy import wait_flags
        # our put has read its source before that source's buffer can be reused
        torch.cuda.current_stream().wait_event(self.sent)
        ch = self.channel
        wait_flags(ch.buffers, self.source, self.use, ch.ctas)
        return ch.buffers.slots[self.use % 2]


class NvshmemTransport:
    name = "nvshmem"
    instances: list = []  # their call sites point into channels: dropped when NVSHMEM shuts down

    def __init__(self):
        from .kernels import peer_copy
        init_nvshmem()
        self._kernels = peer_copy  # a function-level import costs ~1 us a call on the hot path
        _STATE["transport"] = self  # the compiled graph's op finds it here
        self._sites: dict = {}  # call site -> (channel, our group rank, peer table): one lookup per call
        NvshmemTransport.instances.append(self)

    def _channel(self, kind: str, recv_shape, dtype, group, chunk_bytes: int) -> _Channel:
        key = (kind, tuple(recv_shape), dtype, tuple(dist.get_process_group_ranks(group)))
        channels = _STATE["channels"]
        if key not in channels:
            channels[key] = _Channel(recv_shape, dtype, group, chunk_bytes)
        return channels[key]

    def _a2a_site(self, kind: str, x: torch.Tensor, group, scatter_dim: int, gather_dim: int):
        key = (kind, group, x.shape, x.dtype, scatter_dim, gather_dim)
        if key in self._sites:
            return self._sites[key]
        P, me = dist.get_world_size(group), dist.get_rank(group)
        ch = self._channel(kind, a2a_shape(x.shape, P, scatter_dim, gather_dim), x.dtype, group,
                           x.numel() // P * x.element_size())
        # the first CTAs go to the next peer (remote stores start first, our own copy last),
        # and each rank starts on a different peer
        self._sites[key] = ch, me, ch.table(tuple((me + 1 + i) % P for i in range(P)))
        return self._sites[key]

    def all_to_all(self, x: torch.Tensor, group, scatter_dim: int = 0, gather_dim: int = 0):
        if torch.compiler.is_compiling():  # one op in the graph, so CUDA graphs can hold it
            return torch.ops.swiftfusion.nvshmem_all_to_all(x, group.group_name, scatter_dim, gather_dim)
        if torch.cuda.is_current_stream_capturing():
            return self.all_to_all_counted(x, group, scatter_dim, gather_dim)
        ch, me, dests = self._a2a_site("a2a", x, group, scatter_dim, gather_dim)
        return self._kernels.all_to_all_put(x, scatter_dim, gather_dim, ch.buffers, me, dests, ch.next_use(),
                                            ctas_per_peer=ch.ctas)

    def all_to_all_counted(self, x: torch.Tensor, group, scatter_dim: int = 0, gather_dim: int = 0):
        """The all-to-all with its use number on the device: a replayed CUDA graph advances
        it, and the kernel picks the slot from it. The result is copied out of the slot
        (a slot chosen on the device has no fixed address to hand out)."""
        from .kernels.peer_copy import all_to_all_put, counted_slot
        key = ("a2a-counted", group, x.shape, x.dtype, scatter_dim, gather_dim)
        if key not in self._sites and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("the first counted all-to-all of a shape sets up its channel (allocation, "
                               "barrier), which a CUDA graph capture cannot hold: run the model once under "
                               "torch.compile, or call all_to_all_counted once, before capturing")
        ch, me, dests = self._a2a_site("a2a-counted", x, group, scatter_dim, gather_dim)
        ch.counter.add_(1)
        all_to_all_put(x, scatter_dim, gather_dim, ch.buffers, me, dests, 0, ctas_per_peer=ch.ctas,
                       counter=ch.counter)
        return counted_slot(ch.buffers, ch.counter)

    def _exchange_site(self, send: torch.Tensor, dst: int, src: int, group):
        P, me = dist.get_world_size(group), dist.get_rank(group)
        # one channel per peer distance: the schedule's steps never share slots
        ch = self._channel(f"exchange{(dst - me) % P}", send.shape, send.dtype, group,
                           send.numel() * send.element_size())
        return ch, me, ch.table((dst,)), ch.table((src,))

    @torch.compiler.disable
    def exchange(self, send: torch.Tensor, dst: int, src: int, group):
        from .kernels.peer_copy import put_one
        _refuse_capture()
        key = ("exchange", group, send.shape, send.dtype, dst, src)
        if key not in self._sites:
            if dst == src == dist.get_rank(group):
                return _Done(send)
            self._sites[key] = self._exchange_site(send, dst, src, group)
        ch, me, to, source = self._sites[key]
        use = ch.next_use()
        stream = _STATE["comm_stream"]
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            put_one(send, ch.buffers, me, to, use, ctas_per_peer=ch.ctas)
            sent = torch.cuda.Event()
            sent.record(stream)
        send.record_stream(stream)
        return _Pending(ch, source, use, sent)
