"""A second machine emulation: a set inter-machine bandwidth ("paced link").

``NCCL_HOSTID`` emulation gets whatever NCCL's socket transport reaches (a
few GB/s per GPU: a slow network; each run's ``link_probe.py`` records it). To see a fast one -- e.g.
50 GB/s per GPU, like 400 Gb/s per GPU -- ranks keep NVLink between the
emulated machines and every torch.distributed call whose peers include
another machine is *paced*: the bytes this GPU exchanges with other machines
occupy its link for ``bytes / bandwidth`` (the larger of the two directions:
links are full duplex). The link is a CUDA stream per GPU on which a spin of
that length starts when the call is issued, queued behind earlier transfers;
the call's results become usable only when both the real transfer and the
link are done. So compute that overlaps a transfer stays overlapped, and two
transfers in flight share the link.

Set ``SWIFTFUSION_PACED_GBPS`` (per GPU, per direction) and
``SWIFTFUSION_PACED_NODES``, then call ``install_from_env()`` before xfuser,
yunchang or swiftfusion_xdit are imported (they bind some functions at import).
Covers everything that talks through torch.distributed, c10d calls and
functional collectives alike: xDiT USP (functional all-to-all and torch's
ring attention), PipeFusion (isend/irecv), diffusers' context parallelism,
torus over NCCL. A functional collective's link time is settled where its
result is waited for, so ring attention keeps its overlap. Not paced:
NVSHMEM (no torch.distributed call) -- which is why it only ever serves the
all-to-all inside a machine, the torus between machines staying on paced
NCCL -- and compiled models (dynamo traces collectives into its own ops,
past these wrappers), which are not run in this mode.
"""

from __future__ import annotations

import functools
import inspect
import os
import statistics
import threading

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.distributed.distributed_c10d as c10d

_PATCHED = ("all_to_all_single", "all_to_all", "all_gather_into_tensor", "all_gather_single",
            "all_gather", "broadcast", "all_reduce", "send", "recv", "isend", "irecv")
# Set while a paced call runs: calls it makes itself (batch_isend_irecv's isends, an
# all_gather_into_tensor that forwards to all_gather_single) are not paced again.
_local = threading.local()


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _rows(t: torch.Tensor, splits, P: int) -> list[int]:
    """Bytes of each peer's slice of an all_to_all_single buffer."""
    row = _nbytes(t) // max(t.shape[0], 1) if t.dim() else _nbytes(t)
    splits = splits or [t.shape[0] // P] * P
    return [n * row for n in splits]


def remote_bytes(name: str, args: dict, me: int, members: list[int], node_of) -> int:
    """Bytes this rank moves to or from other machines in one call (max of the directions)."""
    remote = [node_of(r) != node_of(me) for r in members]
    n_remote, P = sum(remote), len(members)
    if n_remote == 0:
        return 0
    if name == "all_to_all_single":
        send = _rows(args["input"], args.get("input_split_sizes"), P)
        recv = _rows(args["output"], args.get("output_split_sizes"), P)
        return max(sum(b for b, r in zip(send, remote) if r), sum(b for b, r in zip(recv, remote) if r))
    if name == "all_to_all":
        send = [_nbytes(t) for t in args["input_tensor_list"]]
        recv = [_nbytes(t) for t in args["output_tensor_list"]]
        return max(sum(b for b, r in zip(send, remote) if r), sum(b for b, r in zip(recv, remote) if r))
    if name in ("all_gather_into_tensor", "all_gather_single"):
        return _nbytes(args["input_tensor"]) * n_remote
    if name == "all_gather":
        return _nbytes(args["tensor"]) * n_remote
    if name == "broadcast":
        return _nbytes(args["tensor"])
    if name == "all_reduce":
        return 2 * _nbytes(args["tensor"]) * n_remote // P
    raise ValueError(f"no byte model for {name}")


def _peer_bytes(tensor, peer: int, me: int, node_of) -> int:
    return _nbytes(tensor) if node_of(peer) != node_of(me) else 0


class GpuLink:
    """One GPU's inter-machine link: transfers queue on a stream as timed spins."""

    def __init__(self, gbps: float):
        self.bytes_per_s = gbps * 1e9
        self.stream = torch.cuda.Stream()
        self.cycles_per_s = self._calibrate()

    @staticmethod
    def _calibrate() -> float:
        rates = []
        for _ in range(5):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            torch.cuda._sleep(20_000_000)
            end.record()
            end.synchronize()
            rates.append(20_000_000 / (start.elapsed_time(end) * 1e-3))
        return statistics.median(rates)

    def occupy(self, nbytes: int):
        issued = torch.cuda.Event()
        issued.record()
        self.stream.wait_event(issued)
        with torch.cuda.stream(self.stream):
            torch.cuda._sleep(int(nbytes / self.bytes_per_s * self.cycles_per_s))
            done = torch.cuda.Event()
            done.record(self.stream)
        return done

    @staticmethod
    def settle(done) -> None:
        torch.cuda.current_stream().wait_event(done)


class _PacedWork:
    """A Work whose wait() also waits for the link."""

    def __init__(self, work, done, link):
        self._work, self._done, self._link = work, done, link

    def wait(self, *args, **kwargs):
        result = self._work.wait(*args, **kwargs)
        self._link.settle(self._done)
        return result

    def __getattr__(self, name):
        return getattr(self._work, name)


def _unpaced(original, *args, **kwargs):
    _local.inside = True
    try:
        return original(*args, **kwargs)
    finally:
        _local.inside = False


def _members(group) -> list[int]:
    return dist.get_process_group_ranks(group or c10d._get_default_group())


def _paced(name: str, original, link, node_of):
    sig = inspect.signature(original)

    @functools.wraps(original)
    def call(*args, **kwargs):
        if getattr(_local, "inside", False):
            return original(*args, **kwargs)
        bound = sig.bind(*args, **kwargs)
        bound.apply_defaults()
        a, me = bound.arguments, dist.get_rank()
        group = a.get("group")
        if name in ("send", "isend", "recv", "irecv"):
            peer = a.get("dst", a.get("src"))
            if peer is None:  # given as a group rank
                peer = dist.get_global_rank(group, a.get("group_dst", a.get("group_src")))
            nbytes = _peer_bytes(a["tensor"], peer, me, node_of)
        else:
            nbytes = remote_bytes(name, a, me, _members(group), node_of)
        if nbytes == 0:
            return original(*args, **kwargs)
        done = link.occupy(nbytes)
        result = _unpaced(original, *args, **kwargs)
        if result is None or name in ("send", "recv"):  # blocking: results are used next
            link.settle(done)
            return result
        return _PacedWork(result, done, link)
    return call


def _paced_batch(original, link, node_of):
    @functools.wraps(original)
    def call(p2p_op_list):
        me = dist.get_rank()
        sent = sum(_peer_bytes(op.tensor, op.peer, me, node_of) for op in p2p_op_list
                   if op.op is c10d.isend)
        received = sum(_peer_bytes(op.tensor, op.peer, me, node_of) for op in p2p_op_list
                       if op.op is not c10d.isend)
        nbytes = max(sent, received)
        done = link.occupy(nbytes) if nbytes else None
        works = _unpaced(original, p2p_op_list)
        return works if done is None else [_PacedWork(w, done, link) for w in works]
    return call


_FUNCOL = ("all_to_all_single", "all_gather_single", "all_gather_tensor")
_pending_waits: dict = {}  # storage address of a functional result -> its link's done mark


def _funcol_members(group) -> list[int]:
    from torch.distributed.device_mesh import DeviceMesh
    if isinstance(group, tuple) and len(group) == 2 and isinstance(group[0], DeviceMesh):
        group = group[0].get_group(group[1])  # (mesh, dim)
    elif isinstance(group, DeviceMesh):
        group = group.get_group()
    if isinstance(group, dist.ProcessGroup):
        return dist.get_process_group_ranks(group)
    if isinstance(group, (list, tuple)) and all(isinstance(r, int) for r in group):
        return list(group)
    raise TypeError(f"paced link: functional collectives over {type(group).__name__} are not modelled")


def _paced_funcol(name: str, original, link, node_of):
    sig = inspect.signature(original)  # once, not per call

    @functools.wraps(original)
    def call(self, *args, **kwargs):
        if getattr(_local, "inside", False):
            return original(self, *args, **kwargs)
        bound = sig.bind(self, *args, **kwargs)
        bound.apply_defaults()
        a, me = bound.arguments, dist.get_rank()
        members = _funcol_members(a["group"])
        if name == "all_to_all_single":
            args_ = {"input": self, "output": self, "input_split_sizes": a["input_split_sizes"],
                     "output_split_sizes": a["output_split_sizes"]}
            nbytes = remote_bytes("all_to_all_single", args_, me, members, node_of)
        else:
            nbytes = remote_bytes("all_gather_into_tensor", {"input_tensor": self}, me, members, node_of)
        if nbytes == 0:
            return original(self, *args, **kwargs)
        done = link.occupy(nbytes)
        result = _unpaced(original, self, *args, **kwargs)
        if isinstance(result, funcol.AsyncCollectiveTensor):
            _pending_waits[result.elem.untyped_storage().data_ptr()] = done
        else:  # already waited (tracing)
            link.settle(done)
        return result
    return call


def _paced_wait(original, link):
    @functools.wraps(original)
    def wait_tensor(tensor):
        out = original(tensor)
        done = _pending_waits.pop(tensor.untyped_storage().data_ptr(), None)
        if done is not None:
            link.settle(done)
        return out
    return wait_tensor


def install(gbps: float, nodes: int, link=None) -> None:
    """Pace every inter-machine torch.distributed call at ``gbps`` GB/s per GPU.

    ``link`` defaults to a ``GpuLink``; tests pass one that records the bytes.
    Ranks [k*G, (k+1)*G) are machine k, G = world / nodes.
    """
    world = int(os.environ["WORLD_SIZE"])
    if nodes < 1 or world % nodes:
        raise ValueError(f"paced link: {nodes} machines do not divide the {world} ranks evenly")
    per_node = world // nodes
    node_of = lambda rank: rank // per_node
    link = link or GpuLink(gbps)
    for name in _PATCHED:
        if not hasattr(c10d, name):
            continue
        wrapped = _paced(name, getattr(c10d, name), link, node_of)
        # both namespaces: P2POp compares op.op with c10d.isend by identity
        setattr(c10d, name, wrapped)
        setattr(dist, name, wrapped)
    batch = _paced_batch(c10d.batch_isend_irecv, link, node_of)
    c10d.batch_isend_irecv = dist.batch_isend_irecv = batch
    for name in _FUNCOL:
        if hasattr(funcol, name):
            setattr(funcol, name, _paced_funcol(name, getattr(funcol, name), link, node_of))
    funcol.wait_tensor = _paced_wait(funcol.wait_tensor, link)


def install_from_env() -> float | None:
    """Install when SWIFTFUSION_PACED_GBPS is set; returns the bandwidth (None: not paced)."""
    gbps = os.environ.get("SWIFTFUSION_PACED_GBPS")
    if not gbps:
        return None
    if not os.environ.get("SWIFTFUSION_PACED_NODES"):
        raise ValueError("SWIFTFUSION_PACED_GBPS is set but SWIFTFUSION_PACED_NODES is not: "
                         "say how many machines the ranks emulate")
    nodes = int(os.environ["SWIFTFUSION_PACED_NODES"])
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    os.environ["SWIFTFUSION_NODE"] = f"node{rank // (world // nodes)}"  # our topology sees machines
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    install(float(gbps), nodes)
    return float(gbps)


def _self_check(gbps: float = 50.0) -> dict:
    """On one GPU: a paced transfer takes bytes / bandwidth, and two transfers queue."""
    link = GpuLink(gbps)
    out = {"device": torch.cuda.get_device_name(), "set_GBps": gbps, "cycles_per_s": link.cycles_per_s}
    for mib in (16, 256):
        for transfers in (1, 2):
            nbytes = mib * 2**20
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for done in [link.occupy(nbytes) for _ in range(transfers)]:
                link.settle(done)
            end.record()
            end.synchronize()
            ms = start.elapsed_time(end)
            out[f"{mib}MiB_x{transfers}"] = {"ms": ms, "effective_GBps": transfers * nbytes / ms / 1e6}
    return out


if __name__ == "__main__":
    import json
    print(json.dumps(_self_check(), indent=2))
