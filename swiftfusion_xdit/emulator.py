"""A P-rank job played by one process: a torch.distributed backend with modeled links.

In an SPMD step every rank does the same work, so one rank's step time is the job's.
``emulate(world_size, ranks_per_machine, rank)`` makes this process rank ``rank`` of
such a job on the ``"emulated"`` backend (registered with
``torch.distributed.Backend.register_backend``): the default group, ``new_group``,
``DeviceMesh`` dimensions and functional collectives over them all run here, so our
code and its callers run unmodified. Compute is real; communication is modeled.

Fill rule: outputs have the right shape and dtype and are made from this rank's own
data, as if every peer did what this rank does:

* all-to-all (single, lists, ``permute_tensor``): the output is the input, element
  for element (what a rank receives is what it sends); where sizes differ, the
  overlap is copied and the rest zeroed.
* all-gather: every slot holds the local input.
* reduce-scatter: this rank's chunk of its own input.
* all-reduce, reduce, broadcast: the tensor is left as it is (a reduction of equal
  tensors under MIN/MAX/AVG; SUM's factor n is not applied, so values stay in range).
* recv: zeros (it is posted before its send, so there is nothing local for it yet).

Time model: n ranks in the group, k of them on this machine (machines are
``ranks_per_machine`` consecutive ranks), m = n - k on others. A call moves the
bytes below to and from each peer; what goes to peers on this machine is its "intra"
leg, to other machines its "inter" leg, each direction ("out", "in") apart.
B is the local tensor's size::

  all_to_all(_single)   the input's segment for each peer out, the output's from each
                        peer in (equal splits: B*(k-1)/n intra, B*m/n inter)
  all_gather            B to and from each peer: B*(k-1) intra, B*m inter
  reduce_scatter        B/n to and from each peer (B: the input)
  all_reduce            2B/n to and from each peer (reduce-scatter, then all-gather)
  broadcast, reduce     B each way on the slowest link of the group (a pipelined chain)
  barrier               no bytes on the slowest link: its latency
  send / recv           B out / in, on the link to the peer

A leg lasts ``LinkModel.duration_us``: latency + bytes / bandwidth; inside a machine by
default interpolated from NCCL's all-to-all measured on two H200s (taken to hold per
GPU behind an NVSwitch). Each (link, direction) is one first-in-first-out stream: a
call starts when it is issued and every stream it uses is free, holds each for its
leg, and completes when its last leg ends. A recv is booked when posted: its peer
posts the matching send at the same moment. This per-peer count is NCCL's cost for
all-to-all and send/recv, and for ring collectives over groups with one rank per
machine (the torus groups); a ring over several ranks per machine pushes (n-1)/m
times more through each NIC than counted here.

Where time passes. CPU tensors: a ``FakeClock`` (injectable) is this rank's timeline,
nothing sleeps; ``Work.wait()`` moves it to the call's end, a caller modeling compute
moves it with ``advance``; ``Cluster.transfers`` logs each leg with start and end.
CUDA tensors: each stream is a CUDA stream that waits for the caller's stream, writes
the fill, then spins on the GPU's wall clock (``kernels/link_spin.py``) for the modeled
time less the fill's copy time (calibrated once); ``Work.wait()`` makes the
caller's current stream wait, as NCCL's does, never the host. The clock still runs
there, without compute: it then sums link time.

Functional collectives (our code under ``torch.compile``) find a group by name, and a
Python ProcessGroup has no C++ backend to hold one ("ProcessGroup name not set").
``group_name`` answers from the name ``init_process_group``/``new_group`` registered
(``_register_process_group``), as torch's ``multi_threaded_pg`` does; the C++ ops then
call this group's ``alltoall_base``, ``allgather_into_tensor_coalesced``, ...

What it cannot see: NVSwitch and NIC contention, congestion, stragglers and skew (every
rank is this one), NCCL algorithm switches beyond the table, and the SMs a collective
holds (``LinkModel.collective_sms`` is the hook; not implemented, refused on CUDA; a
spin holds one thread block). NVSHMEM's one-sided transfers bypass torch.distributed.
Not done: scatter, gather; a future from ``get_future()`` is complete at once; gathered
objects are all this rank's (``detect_topology`` asks the group for its
``emulated_topology`` instead); ``broadcast_object_list`` from another root fails.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

from .topology import Topology

BACKEND = "emulated"
INTRA, INTER = "intra", "inter"
OUT, IN = "out", "in"

# NCCL all-to-all on two H200s (benchmarks/results/h200x2_s10/alltoall_2gpu.json):
# (bytes each rank sends to its peer = per-rank message / 2, microseconds).
H200_NCCL_ALLTOALL = ((131072, 70.05), (524288, 45.94), (2097152, 46.82),
                      (8388608, 57.49), (33554432, 138.36), (134217728, 476.19))

NETWORK_PRESETS = {"400G": 50.0, "100G": 12.5}  # a NIC of 400 / 100 Gb/s per GPU, in GB/s


@dataclass(frozen=True)
class LinkModel:
    """Bandwidths are GB/s (1e9 bytes/s) per GPU per direction."""

    inter_GBps: float = NETWORK_PRESETS["400G"]
    inter_latency_us: float = 20.0  # per message; an assumption until calibrated
    intra_GBps: float = 280.0  # used where ``intra_table`` is empty
    intra_latency_us: float = 25.0
    intra_table: tuple[tuple[int, float], ...] = H200_NCCL_ALLTOALL  # (bytes, us), measured
    collective_sms: int = 0  # SMs a two-sided collective holds: hook only, see module docstring

    @classmethod
    def preset(cls, network: str, **overrides) -> "LinkModel":
        if network not in NETWORK_PRESETS:
            raise ValueError(f"unknown network preset {network!r}; choose one of {sorted(NETWORK_PRESETS)}")
        return cls(inter_GBps=NETWORK_PRESETS[network], **overrides)

    @classmethod
    def from_alltoall_json(cls, path: str, column: str = "nccl_ms", **overrides) -> "LinkModel":
        """Inside-machine times from a committed ``benchmarks/alltoall_bench.py`` result
        (``column="nvshmem_ms"`` for the one-sided transport's)."""
        with open(path) as f:
            run = json.load(f)
        world = run["world"]
        table = tuple((row["per_rank_bytes"] * (world - 1) // world, row[column] * 1e3)
                      for row in run["sizes"])
        return cls(intra_table=table, **overrides)

    def duration_us(self, link: str, nbytes: int) -> float:
        if link == INTER:
            return self.inter_latency_us + nbytes / (self.inter_GBps * 1e3)
        if not self.intra_table:
            return self.intra_latency_us + nbytes / (self.intra_GBps * 1e3)
        return _interpolate(self.intra_table, nbytes)


def _interpolate(table, nbytes: int) -> float:
    """Piecewise linear in bytes, flat below the first point, the last slope above the
    last. A point slower than a larger message (warm-up noise) is clipped to it."""
    sizes = [b for b, _ in table]
    times = [t for _, t in table]
    for i in range(len(times) - 2, -1, -1):
        times[i] = min(times[i], times[i + 1])
    if nbytes <= sizes[0] or len(sizes) == 1:
        return times[0]
    i = next((j for j in range(1, len(sizes)) if nbytes <= sizes[j]), len(sizes) - 1)
    slope = (times[i] - times[i - 1]) / (sizes[i] - sizes[i - 1])
    return times[i - 1] + slope * (nbytes - sizes[i - 1])


class FakeClock:
    """This rank's modeled timeline in microseconds; nothing here sleeps."""

    def __init__(self, now_us: float = 0.0):
        self.now_us = now_us

    def advance(self, us: float) -> None:  # the caller spent ``us`` (compute)
        self.now_us += us

    def advance_to(self, t_us: float) -> None:  # the caller waited until ``t_us``
        self.now_us = max(self.now_us, t_us)


@dataclass(frozen=True)
class Leg:
    link: str  # INTRA or INTER
    direction: str  # OUT or IN
    nbytes: int


@dataclass(frozen=True)
class Transfer:
    """One leg of one call, as booked on its stream."""

    op: str
    link: str
    direction: str
    nbytes: int
    start_us: float
    end_us: float


@dataclass
class Cluster:
    """The emulated job: which ranks share a machine, the links, and this rank's clock."""

    world_size: int
    ranks_per_machine: int
    rank: int = 0
    link: LinkModel = field(default_factory=LinkModel)
    clock: FakeClock = field(default_factory=FakeClock)
    transfers: list[Transfer] = field(default_factory=list)
    _free_at: dict = field(default_factory=dict, repr=False)  # (link, direction) -> free from
    _cuda: "_CudaLinks | None" = field(default=None, repr=False)

    def machine_of(self, rank: int) -> int:
        return rank // self.ranks_per_machine

    @property
    def topology(self) -> Topology:
        """What ``detect_topology`` would see on the real cluster (it cannot here: its
        gather of machine names returns this rank's name from every rank)."""
        return Topology.uniform(self.world_size // self.ranks_per_machine, self.ranks_per_machine,
                                _emulated_link())

    def book(self, op: str, legs: list[Leg]) -> list[Transfer]:
        """Queue the legs on their streams, first in first out: the call starts when the
        caller issues it and every stream it needs is free."""
        streams = {(leg.link, leg.direction) for leg in legs}
        start = max([self.clock.now_us, *(self._free_at.get(s, 0.0) for s in streams)])
        booked = [Transfer(op, leg.link, leg.direction, leg.nbytes, start,
                           start + self.link.duration_us(leg.link, leg.nbytes)) for leg in legs]
        for t in booked:
            self._free_at[(t.link, t.direction)] = t.end_us
        self.transfers.extend(booked)
        return booked

    def cuda_links(self) -> "_CudaLinks":
        if self._cuda is None:
            self._cuda = _CudaLinks(self.link)
        return self._cuda


class EmulatedWork(dist.Work):
    """NCCL-like handle: ``wait()`` makes the caller wait (its CUDA stream, or on CPU the
    clock) for the modeled completion; it never blocks the host on CUDA."""

    def __init__(self, cluster: Cluster, outputs: list, end_us: float, events=()):
        super().__init__()
        self._cluster, self._outputs, self._end_us, self._events = cluster, outputs, end_us, events

    def wait(self, timeout: timedelta | None = None) -> bool:
        for event in self._events:
            torch.cuda.current_stream().wait_event(event)
        self._cluster.clock.advance_to(self._end_us)
        return True

    def is_completed(self) -> bool:
        if self._events:
            return all(event.query() for event in self._events)
        return self._cluster.clock.now_us >= self._end_us

    def is_success(self) -> bool:
        return self.is_completed()

    def exception(self):
        return None

    def result(self) -> list:
        return self._outputs

    def synchronize(self) -> None:
        self.wait()

    def get_future(self) -> torch.futures.Future:
        future = torch.futures.Future()
        future.set_result(self._outputs)
        return future


def _emulated_link() -> str:
    """What a machine's GPUs are taken to be joined by (the measured table is NVLink's)."""
    return "nvlink" if torch.cuda.is_available() else "cpu"


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _segments(t: torch.Tensor, splits, n: int) -> list[int]:
    """Bytes of each peer's rows of an all_to_all_single buffer."""
    row = _nbytes(t) // max(t.shape[0], 1) if t.dim() else _nbytes(t)
    return [s * row for s in (list(splits) if splits else [t.shape[0] // n] * n)]


@torch.no_grad()
def _fit(dst: torch.Tensor, src: torch.Tensor) -> None:
    """dst <- src element for element; the overlap where sizes differ, zeros after it."""
    dst = dst.detach()
    if dst.shape == src.shape:
        dst.copy_(src)
        return
    flat = torch.zeros(dst.numel(), dtype=dst.dtype, device=dst.device)
    n = min(dst.numel(), src.numel())
    flat[:n] = src.reshape(-1)[:n]
    dst.copy_(flat.view(dst.shape))


class EmulatedProcessGroup(dist.ProcessGroup):
    """One group of the emulated job, seen from this rank (method names: c10d's)."""

    def __init__(self, cluster: Cluster, rank: int, size: int, global_ranks: list[int]):
        super().__init__(rank, size)
        self.cluster, self.global_ranks = cluster, global_ranks
        mine = cluster.machine_of(cluster.rank)
        self.link_to = [INTRA if cluster.machine_of(r) == mine else INTER for r in global_ranks]

    @property
    def group_name(self) -> str:  # what functional collectives resolve the group by
        return dist.distributed_c10d._world.pg_names[self]

    def getBackendName(self) -> str:
        return BACKEND

    @property
    def emulated_topology(self) -> Topology:
        """The machines of this group's ranks: ``detect_topology`` answers with it, since
        its gather of machine names would only see this rank's (the fill rule)."""
        machines = [self.cluster.machine_of(r) for r in self.global_ranks]
        order = list(dict.fromkeys(machines))
        return Topology(tuple(order.index(m) for m in machines), tuple(f"node{m}" for m in order),
                        _emulated_link())

    def __repr__(self) -> str:
        return f"EmulatedProcessGroup(ranks={self.global_ranks}, rank={self.rank()})"

    # --- the model: bytes per peer -> legs -> booked time -> a Work -------------------------

    def _legs(self, sent: list[int], received: list[int]) -> list[Leg]:
        totals: dict = {}
        for peer, link in enumerate(self.link_to):
            if peer != self.rank():
                totals[(link, OUT)] = totals.get((link, OUT), 0) + sent[peer]
                totals[(link, IN)] = totals.get((link, IN), 0) + received[peer]
        return [Leg(link, d, b) for (link, d), b in totals.items() if b > 0]

    def _slowest_legs(self, nbytes: int) -> list[Leg]:
        if self.size() == 1:
            return []
        link = INTER if INTER in self.link_to else INTRA
        return [Leg(link, OUT, nbytes), Leg(link, IN, nbytes)]

    def _run(self, op: str, legs: list[Leg], fill, outputs: list, inputs: list = ()) -> EmulatedWork:
        """Book the call and produce its outputs (``fill``; None: nothing to write) now on CPU,
        on the link streams on CUDA."""
        booked = self.cluster.book(op, legs)
        end = max((t.end_us for t in booked), default=self.cluster.clock.now_us)
        if booked and any(t.is_cuda for t in outputs):
            durations = {(t.link, t.direction): t.end_us - t.start_us for t in booked}
            events = self.cluster.cuda_links().submit(durations, fill, outputs, list(inputs))
            return EmulatedWork(self.cluster, outputs, end, events)
        if fill is not None:
            fill()
        return EmulatedWork(self.cluster, outputs, end)

    def _uniform(self, per_peer: int) -> list[int]:
        return [per_peer] * self.size()

    # --- collectives ------------------------------------------------------------------------

    def alltoall_base(self, output, input, output_split_sizes, input_split_sizes, opts=None):
        n = self.size()
        legs = self._legs(_segments(input, input_split_sizes, n), _segments(output, output_split_sizes, n))
        return self._run("all_to_all", legs, lambda: _fit(output, input), [output], [input])

    def alltoall(self, output_tensors, input_tensors, opts=None):
        legs = self._legs([_nbytes(t) for t in input_tensors], [_nbytes(t) for t in output_tensors])

        def fill():
            for out, inp in zip(output_tensors, input_tensors):
                _fit(out, inp)
        return self._run("all_to_all", legs, fill, list(output_tensors), list(input_tensors))

    def allgather(self, output_tensors, input_tensors, opts=None):
        (outs,), (inp,) = output_tensors, input_tensors  # one tensor per rank, as NCCL's API
        legs = self._legs(self._uniform(_nbytes(inp)), [_nbytes(t) for t in outs])

        def fill():
            for out in outs:
                _fit(out, inp)
        return self._run("all_gather", legs, fill, list(outs), [inp])

    def _allgather_base(self, output, input, opts=None):
        return self.allgather_into_tensor_coalesced([output], [input], opts)

    def allgather_into_tensor_coalesced(self, outputs, inputs, opts=None):
        n, each_way = self.size(), self._uniform(sum(map(_nbytes, inputs)))
        legs = self._legs(each_way, each_way)

        def fill():  # one broadcast copy per tensor: a launch per rank cost host time NCCL does not
            for out, inp in zip(outputs, inputs):
                out.detach().view(n, -1).copy_(inp.reshape(1, -1).expand(n, -1))
        return self._run("all_gather", legs, fill, list(outputs), list(inputs))

    def _reduce_scatter_base(self, output, input, opts=None):
        return self.reduce_scatter_tensor_coalesced([output], [input], opts)

    def reduce_scatter_tensor_coalesced(self, outputs, inputs, opts=None):
        n, me = self.size(), self.rank()
        per_peer = sum(_nbytes(t) for t in inputs) // n
        legs = self._legs(self._uniform(per_peer), self._uniform(per_peer))

        def fill():
            for out, inp in zip(outputs, inputs):
                _fit(out, inp.chunk(n)[me])
        return self._run("reduce_scatter", legs, fill, list(outputs), list(inputs))

    def reduce_scatter(self, output_tensors, input_tensors, opts=None):
        (out,), (parts,) = output_tensors, input_tensors
        legs = self._legs([_nbytes(t) for t in parts], self._uniform(_nbytes(out)))
        return self._run("reduce_scatter", legs, lambda: _fit(out, parts[self.rank()]), [out], list(parts))

    def allreduce(self, tensors, opts=None):
        per_peer = 2 * sum(map(_nbytes, tensors)) // self.size()
        legs = self._legs(self._uniform(per_peer), self._uniform(per_peer))
        return self._run("all_reduce", legs, None, list(tensors))

    def allreduce_coalesced(self, tensors, opts=None):
        return self.allreduce(tensors, opts)

    def broadcast(self, tensors, opts=None):
        legs = self._slowest_legs(sum(map(_nbytes, tensors)))
        return self._run("broadcast", legs, None, list(tensors))

    def reduce(self, tensors, opts=None):  # to one root: a chain, like broadcast
        legs = self._slowest_legs(sum(map(_nbytes, tensors)))
        return self._run("reduce", legs, None, list(tensors))

    def barrier(self, opts=None):
        return self._run("barrier", self._slowest_legs(0), None, [])

    # torch >= 2.13 calls these names from Python; the C++ (functional) ops call the ones above
    all_to_all_single = alltoall_base
    all_gather_single = _allgather_base
    all_gather_single_coalesced = allgather_into_tensor_coalesced
    reduce_scatter_single = _reduce_scatter_base
    reduce_scatter_single_coalesced = reduce_scatter_tensor_coalesced

    # --- point to point (peers are group ranks) ---------------------------------------------

    def send(self, tensors, dst: int, tag: int = 0):
        legs = [Leg(self.link_to[dst], OUT, sum(map(_nbytes, tensors)))]
        return self._run("send", legs, None, list(tensors))

    def recv(self, tensors, src: int, tag: int = 0):
        legs = [Leg(self.link_to[src], IN, sum(map(_nbytes, tensors)))]

        def fill():
            for t in tensors:
                t.detach().zero_()
        return self._run("recv", legs, fill, list(tensors))


class _CudaLinks:
    """One CUDA stream per (link, direction); a transfer is its fill plus a timed spin."""

    def __init__(self, link: LinkModel):
        if link.collective_sms:
            raise NotImplementedError("LinkModel.collective_sms: holding SMs during a collective is "
                                      "not implemented (a spin holds one thread block)")
        self.streams: dict = {}
        from .kernels.link_spin import spin  # Triton: imported on a GPU only
        self.spin = spin
        self.copy_us_per_byte = _calibrate_copy()

    def submit(self, durations: dict, fill, outputs: list, inputs: list) -> list:
        """Start the call's streams together once the caller's work so far and every one of
        them is free; fill on the first, spin on each; returns the events a wait joins."""
        issued = torch.cuda.current_stream().record_event()
        for key in durations:  # high priority: a link does not queue behind compute for an SM
            if key not in self.streams:
                self.streams[key] = torch.cuda.Stream(priority=-1)
        streams = [self.streams[key] for key in durations]
        for stream in streams:  # first, so that under graph capture each stream joins it
            stream.wait_event(issued)
        tails = [stream.record_event() for stream in streams]
        copy_us = sum(map(_nbytes, outputs)) * self.copy_us_per_byte if fill else 0.0
        events = []
        for i, (stream, us) in enumerate(zip(streams, durations.values())):
            for tail in tails:
                stream.wait_event(tail)
            with torch.cuda.stream(stream):
                if i == 0:  # the fill stands for the collective's own writes: inside its time
                    if fill is not None:
                        fill()
                    for t in (*outputs, *inputs):  # the caller may free them before we are done
                        t.record_stream(stream)
                    us -= copy_us
                self.spin(int(us * 1e3))
                events.append(stream.record_event())
        return events


def _calibrate_copy(nbytes: int = 256 * 2**20, repeats: int = 5) -> float:
    """Microseconds per byte of a device-to-device copy: the fill's share of a call."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
    return statistics.median(times) / nbytes


# --- registration and entry point -----------------------------------------------------------

_ACTIVE: list[Cluster | None] = [None]  # the cluster that groups created now belong to


def _create_group(common_opts, backend_opts) -> EmulatedProcessGroup:
    cluster = _ACTIVE[0]
    if cluster is None:
        raise RuntimeError(f"backend {BACKEND!r}: call swiftfusion_xdit.emulator.emulate() "
                           "instead of init_process_group")
    ranks = list(common_opts.global_ranks_in_group) or list(range(cluster.world_size))
    return EmulatedProcessGroup(cluster, common_opts.group_rank, common_opts.group_size, ranks)


def register() -> None:
    """Make ``"emulated"`` a torch.distributed backend (idempotent)."""
    if BACKEND.upper() not in dist.Backend._plugins:
        dist.Backend.register_backend(BACKEND, _create_group, extended_api=True, devices=["cpu", "cuda"])


def emulate(world_size: int, ranks_per_machine: int, rank: int = 0, link: LinkModel | None = None,
            clock: FakeClock | None = None) -> Cluster:
    """Initialise the default process group as rank ``rank`` of ``world_size`` ranks,
    ``ranks_per_machine`` consecutive ranks per machine. ``link``: e.g.
    ``LinkModel.preset("100G")``. Undo with ``dist.destroy_process_group()``."""
    if world_size < 1 or ranks_per_machine < 1 or world_size % ranks_per_machine:
        raise ValueError(f"{world_size} ranks do not fill machines of {ranks_per_machine} ranks")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not one of the {world_size} ranks")
    register()
    cluster = Cluster(world_size, ranks_per_machine, rank, link or LinkModel(), clock or FakeClock())
    _ACTIVE[0] = cluster
    if torch.cuda.is_available():
        cluster.cuda_links()  # calibrate now, not inside the first call (it may be a graph capture)
    dist.init_process_group(BACKEND, rank=rank, world_size=world_size, store=dist.HashStore())
    return cluster
