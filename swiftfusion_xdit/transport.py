"""Communication transports behind one small interface.

Torus Attention needs two operations:

* ``all_to_all(x, group, scatter_dim, gather_dim)`` -- a blocking all-to-all
  (the Ulysses exchange inside a machine): ``x`` is split into P equal chunks
  along ``scatter_dim``, chunk p goes to group rank p, and the chunks received
  are concatenated along ``gather_dim`` in source order (dims 0 and 0: plain
  ``all_to_all_single``);
* ``exchange(send, dst, src, group)`` -- start sending ``send`` to group rank
  ``dst`` and receiving a tensor like ``send`` from group rank ``src``; returns
  a ``Pending`` whose ``wait()`` gives the received tensor.  This is one step
  of the torus; the caller computes while it is in flight.

Transports are registered by name, like diffusers' attention backends:
``gloo`` and ``nccl`` are the two-sided torch.distributed implementation
(async ``isend``/``irecv``; NCCL runs them on its own streams, so they overlap
with attention on the compute stream, and ``wait()`` only makes the compute
stream wait, it does not block the host); ``nvshmem`` (one-sided puts with
signals) lives in ``swiftfusion_xdit.nvshmem_transport``.

Under ``torch.compile`` the two-sided transport issues functional
collectives instead (``all_to_all_single``; a torus step is a
``permute_tensor`` in which every rank shifts by the same distance, which is
exactly the schedule's step), so dynamo traces Torus Attention into one graph
and the compiler keeps each exchange in flight until its ``wait()``.
``resolve_transport`` says which one is used and why.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Protocol

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol

log = logging.getLogger(__name__)


class Pending(Protocol):
    def wait(self) -> torch.Tensor: ...


class Transport(Protocol):
    name: str

    def all_to_all(self, x: torch.Tensor, group: dist.ProcessGroup, scatter_dim: int = 0,
                   gather_dim: int = 0) -> torch.Tensor: ...

    def exchange(self, send: torch.Tensor, dst: int, src: int,
                 group: dist.ProcessGroup) -> Pending: ...

    # Optional: ``all_gather(x, group)`` -> Pending of (group size, *x.shape),
    # started now. Torus Attention's K/V exchange uses it where offered.
    # Optional: ``all_to_all_start(x, group, scatter_dim, gather_dim)`` -> Pending of
    # what ``all_to_all`` returns, started now: the head-chunked Ulysses schedule
    # overlaps it with attention (``SPGroups.head_chunks``).


@dataclass
class _TwoSidedPending:
    works: list
    recv: torch.Tensor

    def wait(self) -> torch.Tensor:
        for work in self.works:
            work.wait()
        return self.recv


@dataclass
class _WorkPending:
    """An async torch.distributed op and the tensor it fills."""
    work: object
    filled: torch.Tensor

    def wait(self) -> torch.Tensor:
        self.work.wait()
        return self.filled


@dataclass
class _Joined:
    """An all-to-all in flight; its wait lays the received chunks out along ``dim``."""
    chunks: Pending
    dim: int

    def wait(self) -> torch.Tensor:
        return join_chunks(self.chunks.wait(), self.dim)


@dataclass
class _FunctionalPending:
    """A functional collective in flight (compiled graphs): its wait is the graph's wait."""
    moved: torch.Tensor
    shape: tuple

    def wait(self) -> torch.Tensor:
        return funcol.wait_tensor(self.moved).view(self.shape)


class _Done:
    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor

    def wait(self) -> torch.Tensor:
        return self.tensor


class TwoSidedTransport:
    """torch.distributed send/recv and all_to_all_single (NCCL or gloo)."""

    def __init__(self, name: str):
        self.name = name

    def all_to_all(self, x: torch.Tensor, group: dist.ProcessGroup, scatter_dim: int = 0,
                   gather_dim: int = 0) -> torch.Tensor:
        return self.all_to_all_start(x, group, scatter_dim, gather_dim).wait()

    def all_to_all_start(self, x: torch.Tensor, group: dist.ProcessGroup, scatter_dim: int = 0,
                         gather_dim: int = 0) -> Pending:
        """The all-to-all, started: NCCL runs it on its own stream, so compute issued
        before ``wait()`` overlaps it."""
        P = dist.get_world_size(group)
        send = split_chunks(x, P, scatter_dim).contiguous()  # packing copy: NCCL needs it flat
        if torch.compiler.is_compiling():
            moved = _FunctionalPending(funcol.all_to_all_single(send, None, None, group), send.shape)
            return _Joined(moved, gather_dim)
        recv = torch.empty_like(send)
        work = dist.all_to_all_single(recv, send, group=group, async_op=True)
        return _Joined(_WorkPending(work, recv), gather_dim)

    def exchange(self, send: torch.Tensor, dst: int, src: int,
                 group: dist.ProcessGroup) -> Pending:
        me = dist.get_rank(group)
        if dst == me and src == me:
            return _Done(send)
        if torch.compiler.is_compiling():
            # every rank of the group shifts by the same distance in a torus step
            P = dist.get_world_size(group)
            shift = (dst - me) % P
            moved = funcol.permute_tensor(send.contiguous().flatten(), [(r + shift) % P for r in range(P)],
                                          group)
            return _FunctionalPending(moved, send.shape)
        recv = torch.empty(send.shape, dtype=send.dtype, device=send.device)  # contiguous, whatever send's strides
        ops = [dist.P2POp(dist.irecv, recv, dist.get_global_rank(group, src), group),
               dist.P2POp(dist.isend, send.contiguous(), dist.get_global_rank(group, dst), group)]
        return _TwoSidedPending(dist.batch_isend_irecv(ops), recv)

    def all_gather(self, x: torch.Tensor, group: dist.ProcessGroup) -> Pending:
        """One collective, not T-1 peer steps: on NCCL's network transport its
        ring all-gather moved 2.7 GB/s per GPU where send/recv moved 2.1
        (benchmarks/results/h200x2/probe_2x1.json; 3.6 vs 2.6 in an earlier run)."""
        world = dist.get_world_size(group)
        if torch.compiler.is_compiling():
            return _FunctionalPending(funcol.all_gather_tensor(x.contiguous(), 0, group), (world, *x.shape))
        flat = x.new_empty((world * x.shape[0], *x.shape[1:]))  # received in place: no stacking copy
        work = _all_gather_single(flat, x.contiguous(), group=group, async_op=True)
        return _WorkPending(work, flat.view(world, *x.shape))


@dataclass(frozen=True)
class TransportPair:
    """A transport per group of a torus call: the Ulysses all-to-all stays inside a
    machine, the torus exchange crosses machines."""

    ulysses: Transport
    torus: Transport


def split_chunks(x: torch.Tensor, P: int, dim: int) -> torch.Tensor:
    """(P, *chunk) view of ``x`` whose entry p is the p-th slice along ``dim``."""
    return x.unflatten(dim, (P, -1)).movedim(dim, 0)


def join_chunks(chunks: torch.Tensor, dim: int) -> torch.Tensor:
    """Inverse layout: (P, *chunk) -> the chunks concatenated along ``dim``."""
    return chunks.movedim(0, dim).flatten(dim, dim + 1)


def _all_gather_single(*args, **kwargs):
    # torch >= 2.13 renamed all_gather_into_tensor (the older name now warns); GPU images
    # run 2.11. Looked up per call, so wrappers installed later (benchmarks/paced_link.py) apply.
    return (getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor)(*args, **kwargs)


def process_group_backend() -> str | None:
    """The backend that moves CUDA tensors ("nccl") or else CPU tensors ("gloo"), None
    before init. A group made without a backend name reports "undefined" from
    ``get_backend()``; its config ("cpu:gloo,cuda:nccl") says what serves each device."""
    if not dist.is_initialized():
        return None
    name = dist.get_backend()
    if name in ("nccl", "gloo"):
        return name
    if name == "emulated":  # the cluster emulator stands in for NCCL on a GPU, gloo on CPU
        return "nccl" if torch.cuda.is_available() else "gloo"
    config = str(dist.get_backend_config())
    if torch.cuda.is_available() and "cuda:nccl" in config:
        return "nccl"
    return "gloo" if "gloo" in config else name


def _two_sided_available(name: str) -> str | None:
    if not dist.is_available():
        return "torch.distributed is not available in this torch build"
    if name == "nccl" and not (torch.cuda.is_available() and dist.is_nccl_available()):
        return "NCCL needs a CUDA GPU and a torch build with NCCL"
    return None


def _nvshmem_available(machines: int = 1) -> str | None:
    # Emulated machines (NCCL_HOSTID, a paced link) act on NCCL / torch.distributed only:
    # NVSHMEM would reach the other "machines" over NVLink, so it never serves a group that
    # crosses machines, emulated or real -- only the Ulysses group inside one.
    if machines > 1:
        return (f"the group spans {machines} machines, and the one-sided kernels store into "
                "peers' memory over NVLink (one machine); use comm='nccl' across machines")
    from . import nvshmem_transport  # GPU-only pieces are imported lazily
    return nvshmem_transport.unavailable_reason()


def _make_nvshmem(name: str) -> Transport:
    from . import nvshmem_transport
    return nvshmem_transport.NvshmemTransport()


# name -> (why unavailable or None, factory)
_REGISTRY: dict[str, tuple[Callable[[int], str | None], Callable[[str], Transport]]] = {
    "gloo": (lambda machines: _two_sided_available("gloo"), TwoSidedTransport),
    "nccl": (lambda machines: _two_sided_available("nccl"), TwoSidedTransport),
    "nvshmem": (_nvshmem_available, _make_nvshmem),
}
COMMS = ("auto", *_REGISTRY)  # what a user may ask for


def unavailable_reason(name: str, machines: int = 1) -> str | None:
    """Why transport ``name`` cannot serve a layout over ``machines`` machines (None: it can)."""
    if name not in _REGISTRY:
        return f"unknown transport {name!r}; choose one of {sorted(_REGISTRY)} or 'auto'"
    return _REGISTRY[name][0](machines)


def resolve_transports(requested: str, machines: int) -> TransportPair:
    """Transports for a layout over ``machines`` machines. ``nvshmem`` asked for across
    machines: NVSHMEM inside each machine (the Ulysses all-to-all), NCCL between them;
    ``auto`` across machines stays with NCCL for both."""
    if machines == 1:
        transport = resolve_transport(requested)
        return TransportPair(transport, transport)
    # across machines the torus is two-sided whatever was asked: NVSHMEM stores over NVLink
    torus = TwoSidedTransport(process_group_backend() or "gloo") if requested in ("auto", "nvshmem") \
        else resolve_transport(requested, machines)
    ulysses = resolve_transport("nvshmem") if requested == "nvshmem" else torus
    log.info("transports: %s inside each machine, %s between machines%s", ulysses.name, torus.name,
             " (comm='nvshmem' would run the all-to-all inside each machine over NVSHMEM)"
             if requested == "auto" and torus.name == "nccl" else "")
    return TransportPair(ulysses, torus)


_DEFAULT: dict = {}
_LAST_DEFAULT: list = [None]  # what a compiled call uses: the resolution itself cannot be traced


def default_transport() -> Transport:
    """``resolve_transport("auto")``, resolved once per process group backend: a call
    site that passes no transport must not re-resolve (and re-log) on every layer."""
    if torch.compiler.is_compiling():  # dynamo cannot trace a topology gather or NVSHMEM's start
        if _LAST_DEFAULT[0] is None:
            raise RuntimeError(
                "torus_attention(transport=None) under torch.compile: the transport must be resolved "
                "before tracing; pass transport=resolve_transport('auto') (as enable_parallel and the "
                "xDiT strategy do), or make one eager call first")
        return _LAST_DEFAULT[0]
    backend = process_group_backend()
    if backend not in _DEFAULT:
        from .topology import detect_topology  # collective, once: NVSHMEM serves one machine only
        _DEFAULT[backend] = resolve_transport("auto", detect_topology().num_nodes if backend else 1)
    _LAST_DEFAULT[0] = _DEFAULT[backend]
    return _DEFAULT[backend]


def _on_every_rank(ok: bool) -> bool:
    """All ranks agree (NCCL all-reduce, MIN). NVSHMEM must serve every rank or none: a rank
    left on NCCL would never raise the flags that the others' kernels spin on."""
    flag = torch.tensor([int(ok)], dtype=torch.int32, device="cuda")
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def resolve_transport(requested: str = "auto", machines: int = 1) -> Transport:
    """Pick the transport for a layout over ``machines`` machines; ``auto`` prefers
    NVSHMEM (one machine), then NCCL, then gloo."""
    backend = process_group_backend()
    if requested == "auto":
        if backend != "nccl":
            log.info("transport gloo: the process group backend is %s", backend)
            return TwoSidedTransport("gloo")
        why_not, transport = unavailable_reason("nvshmem", machines), None
        if why_not is None:
            try:
                transport = _REGISTRY["nvshmem"][1]("nvshmem")
            except Exception as err:  # installed, but NVSHMEM would not start (NvshmemError is no RuntimeError)
                why_not = f"it did not initialise: {err}"
                log.warning("transport: nvshmem4py is installed but NVSHMEM did not start: %s", err)
        if _on_every_rank(transport is not None):
            log.info("transport nvshmem: nvshmem4py is installed and initialised on every rank")
            return transport
        log.info("transport nccl: NVSHMEM not used (%s)", why_not or "it did not start on every rank")
        return TwoSidedTransport("nccl")
    why_not = unavailable_reason(requested, machines)
    if why_not:
        raise RuntimeError(f"transport {requested!r} cannot be used: {why_not}")
    if requested in ("gloo", "nccl") and backend is not None and backend != requested:
        raise RuntimeError(f"transport {requested!r} asked for, but torch.distributed was "
                           f"initialised with backend {backend!r}; use comm='auto' or "
                           f"init_process_group(backend={requested!r})")
    return _REGISTRY[requested][1](requested)
