"""One-sided transport: NVSHMEM puts with signals instead of send/recv.

Same interface as ``TwoSidedTransport`` (``all_to_all``, ``exchange``), built
on nvshmem4py's stream-ordered host API (``put_signal`` / ``signal_wait`` /
``signal_op`` on a CUDA stream), so no receive is ever posted and no rank
waits for a matching call: the sender writes straight into the receiver's
symmetric buffer and raises a flag.

Signal protocol of one channel (a channel = one call site and shape, reused
by every layer and step; ``e`` counts the channel's uses, starting at 1):

    sender s -> receiver r, use e
      s (comm stream):    wait  free[r] >= e-1      (r has consumed use e-1)
      s (comm stream):    put   data -> r.inbox[s], then set r.ready[s] = e
      r (compute stream): wait  ready[s] >= e
      r (compute stream): copy  inbox[s] out, then set s.free[r] = e

``ready`` flags live on the receiver, ``free`` flags on the sender; both are
monotonic, so no flag is ever reset and no barrier is needed on the hot path.
Symmetric buffers are allocated on a channel's first use (a collective: every
rank runs the same sequence of calls, as SPMD attention does) and reused
afterwards. The heap is sized by ``SWIFTFUSION_NVSHMEM_HEAP`` (default 4 GiB,
set before NVSHMEM starts); running out raises an error naming the size.

Why host-initiated puts rather than a device kernel: the exchange granularity
of Torus Attention is one whole block per peer per step, which a single
``put_signal`` moves at copy-engine speed; the per-peer signals already let
the attention of block k start when block k has landed. The fused Triton
kernels (packing in the put, attention waiting on the flag) live in
``kernels/`` once they beat this.
"""

from __future__ import annotations

import atexit
import os

import torch
import torch.distributed as dist

_STATE: dict = {}


def unavailable_reason() -> str | None:
    """None when NVSHMEM can be used here, else what is missing and what to do."""
    if not torch.cuda.is_available():
        return "NVSHMEM needs an NVIDIA GPU; on CPU use comm='gloo' (or 'auto')"
    try:
        import nvshmem.core  # noqa: F401
        from cuda.core import Device  # noqa: F401
    except ImportError as err:
        return (f"nvshmem4py is not importable ({err}); install it with "
                "pip install 'swiftfusion-xdit[nvshmem]' (nvshmem4py-cu13)")
    if not dist.is_initialized() or dist.get_backend() != "nccl":
        return "NVSHMEM is bootstrapped from a torch.distributed NCCL process group; none is initialised"
    return None


def _enum(enum_type, *names):
    for name in names:
        if hasattr(enum_type, name):
            return getattr(enum_type, name)
    raise RuntimeError(f"nvshmem4py has none of {names} in {enum_type}: {dir(enum_type)}")


def init_nvshmem() -> None:
    """Start NVSHMEM once per process from the torch.distributed world group."""
    if _STATE:
        return
    os.environ.setdefault("NVSHMEM_DISABLE_NVLS", "1")  # never use NVLink multicast
    os.environ.setdefault("NVSHMEM_SYMMETRIC_SIZE", os.environ.get("SWIFTFUSION_NVSHMEM_HEAP", "4G"))
    import nvshmem.core as nvshmem
    from cuda.core import Device

    rank, world = dist.get_rank(), dist.get_world_size()
    device = Device(torch.cuda.current_device())
    device.set_current()
    uid = nvshmem.get_unique_id(empty=(rank != 0))
    holder = [uid]
    dist.broadcast_object_list(holder, src=0)
    nvshmem.init(device=device, uid=holder[0], rank=rank, nranks=world, initializer_method="uid")
    _STATE.update(nvshmem=nvshmem, channels={},
                  SET=_enum(nvshmem.SignalOp, "SIGNAL_SET", "NVSHMEM_SIGNAL_SET"),
                  GE=_enum(nvshmem.ComparisonType, "CMP_GE", "NVSHMEM_CMP_GE"),
                  comm_stream=torch.cuda.Stream())
    atexit.register(shutdown_nvshmem)


def shutdown_nvshmem() -> None:
    if not _STATE:
        return
    nvshmem = _STATE["nvshmem"]
    torch.cuda.synchronize()
    for channel in _STATE["channels"].values():
        channel.free()
    nvshmem.finalize()
    _STATE.clear()


class _Channel:
    """Symmetric inboxes and flags for one (call site, shape, dtype) in one group."""

    def __init__(self, shape, dtype, group_ranks: list[int]):
        nvshmem = _STATE["nvshmem"]
        n = len(group_ranks)
        self.pes = group_ranks  # group rank -> global PE (PE numbering = torch world ranks)
        try:
            self.inbox = [nvshmem.tensor(shape, dtype=dtype) for _ in range(n)]
            self.outbox = [nvshmem.tensor(shape, dtype=dtype) for _ in range(n)]
            self.ready = [nvshmem.tensor((1,), dtype=torch.int64) for _ in range(n)]
            self.free_flag = [nvshmem.tensor((1,), dtype=torch.int64) for _ in range(n)]
        except Exception as err:
            nbytes = 2 * n * torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
            raise RuntimeError(
                f"NVSHMEM symmetric heap ({os.environ.get('NVSHMEM_SYMMETRIC_SIZE')}) cannot hold "
                f"another {nbytes / 2**20:.0f} MiB for a {tuple(shape)} {dtype} channel: {err}. "
                "Set SWIFTFUSION_NVSHMEM_HEAP larger (e.g. 16G) before the first call.") from err
        for flag in self.ready + self.free_flag:
            flag.zero_()
        torch.cuda.synchronize()
        dist.barrier()  # every rank's flags are zero before anyone signals
        self.uses = 0

    def _buf(self, tensor):
        from nvshmem.core.interop.torch import tensor_get_buffer
        return tensor_get_buffer(tensor)[0]

    def send(self, data: torch.Tensor, me: int, dst: int, use: int) -> None:
        nvshmem, stream = _STATE["nvshmem"], _STATE["comm_stream"]
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            if use > 1:  # the receiver has copied out our previous message
                nvshmem.signal_wait(self._buf(self.free_flag[dst]), use - 1, _STATE["GE"], stream=stream)
            self.outbox[dst].copy_(data)
            data.record_stream(stream)  # keep it alive until the copy above has run
            nvshmem.put_signal(self.inbox[me], self.outbox[dst], self._buf(self.ready[me]), use,
                               _STATE["SET"], remote_pe=self.pes[dst], stream=stream)

    def receive(self, me: int, src: int, use: int) -> torch.Tensor:
        nvshmem, stream = _STATE["nvshmem"], torch.cuda.current_stream()
        nvshmem.signal_wait(self._buf(self.ready[src]), use, _STATE["GE"], stream=stream)
        out = self.inbox[src].clone()
        nvshmem.signal_op(self._buf(self.free_flag[me]), use, _STATE["SET"],
                          remote_pe=self.pes[src], stream=stream)
        return out

    def free(self):
        nvshmem = _STATE["nvshmem"]
        for t in self.inbox + self.outbox + self.ready + self.free_flag:
            nvshmem.free_tensor(t)


class _Pending:
    def __init__(self, channel: _Channel, me: int, src: int, use: int):
        self.channel, self.me, self.src, self.use = channel, me, src, use

    def wait(self) -> torch.Tensor:
        return self.channel.receive(self.me, self.src, self.use)


class NvshmemTransport:
    name = "nvshmem"

    def __init__(self):
        init_nvshmem()
        self._calls: dict = {}

    def _channel(self, kind: str, x: torch.Tensor, group) -> _Channel:
        ranks = dist.get_process_group_ranks(group)
        key = (kind, tuple(x.shape), x.dtype, tuple(ranks))
        channels = _STATE["channels"]
        if key not in channels:
            channels[key] = _Channel(x.shape, x.dtype, ranks)
        return channels[key]

    def all_to_all(self, x: torch.Tensor, group) -> torch.Tensor:
        """x is (P, ...) with chunk p for group rank p; puts go to every peer at once."""
        P, me = dist.get_world_size(group), dist.get_rank(group)
        channel = self._channel("a2a", x[0], group)
        channel.uses += 1
        use = channel.uses
        for step in range(1, P):
            dst = (me + step) % P
            channel.send(x[dst], me, dst, use)
        out = torch.empty_like(x)
        out[me] = x[me]
        for step in range(1, P):
            src = (me - step) % P
            out[src] = channel.receive(me, src, use)
        return out

    def exchange(self, send: torch.Tensor, dst: int, src: int, group):
        me = dist.get_rank(group)
        # one channel per (shape, peer distance): the schedule's steps never share inboxes
        distance = (dst - me) % dist.get_world_size(group)
        channel = self._channel(f"exchange{distance}", send, group)
        channel.uses += 1
        channel.send(send, me, dst, channel.uses)
        return _Pending(channel, me, src, channel.uses)
