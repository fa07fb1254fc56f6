"""Topology-aware mesh builder for the torus strategy.

One dataclass owns every parallel degree; ``plan_layout`` fills in the degrees
the user left out and refuses impossible layouts with a message that names the
numbers and says which degrees would work; ``build_mesh`` turns the plan into a
named ``DeviceMesh``.

Dimensions, outermost first::

    ("dp", "cfg", "torus", "ulysses")

laid over the ranks in machine-major order (``Topology.ranks_by_node``). The
innermost dimension is contiguous inside a machine, so the bandwidth-hungry
Ulysses all-to-all stays on NVLink; the outer, low-traffic dimensions (data
parallel, CFG parallel: one exchange per step or none) take the slow
inter-machine links first, and the torus (sequence ring across machines)
takes whatever machines are left.

The torus exchange runs in one of three modes (see ``torus_attention``):
``"a2a"`` -- a second all-to-all across machines, decomposed into peer
steps -- needs ``heads % (ulysses * torus) == 0``; ``"a2a-kv"`` -- the same
bytes across machines, the heads split by machine and the keys shared inside
one -- needs ``heads % torus == 0``; ``"kv"`` -- each rank gathers the other
machines' K/V, step by step -- works for any head count.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh

from .topology import Topology
from .torus_attention import EXCHANGES, choose_exchange

DIM_NAMES = ("dp", "cfg", "torus", "ulysses")


class LayoutError(ValueError):
    """A parallel layout that cannot run; the message says what would."""


@dataclass(frozen=True)
class ParallelDims:
    ulysses: int
    torus: int
    cfg: int = 1
    dp: int = 1

    @property
    def sp(self) -> int:
        return self.ulysses * self.torus

    @property
    def world_size(self) -> int:
        return self.dp * self.cfg * self.sp

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (self.dp, self.cfg, self.torus, self.ulysses)


@dataclass(frozen=True)
class TorusLayout:
    dims: ParallelDims
    topology: Topology
    num_heads: int
    torus_exchange: str  # "a2a", "a2a-kv" or "kv"
    notes: tuple[str, ...] = field(default=())

    def rank_grid(self) -> torch.Tensor:
        """Global ranks arranged as (dp, cfg, torus, ulysses)."""
        return torch.tensor(self.topology.ranks_by_node).reshape(self.dims.shape)

    def groups(self, dim: str) -> list[list[int]]:
        """Every group of ``dim`` as a list of global ranks."""
        axis = DIM_NAMES.index(dim)
        grid = self.rank_grid().movedim(axis, -1)
        return grid.reshape(-1, grid.shape[-1]).tolist()

    def sp_groups(self) -> list[list[int]]:
        return self.rank_grid().reshape(-1, self.dims.sp).tolist()

    def describe(self) -> str:
        d = self.dims
        return (f"dp={d.dp} cfg={d.cfg} torus={d.torus} ulysses={d.ulysses} "
                f"(torus exchange: {self.torus_exchange}) on {self.topology.describe()}")


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def plan_layout(topology: Topology, num_heads: int | None, *, ulysses: int | None = None,
                torus: int | None = None, cfg: int = 1, dp: int = 1,
                torus_exchange: str = "auto", check_placement: bool = True) -> TorusLayout:
    """Fill in missing degrees and validate; raises ``LayoutError`` with advice.

    ``check_placement=False`` lets a Ulysses group span machines: only for
    running the classic baselines (plain Ulysses over several machines).
    ``num_heads=None`` (not known yet, e.g. before xfuser loads the model)
    skips the head checks; Torus Attention then checks at its first call.
    """
    world, per_node = topology.world_size, topology.gpus_per_node
    notes: list[str] = []
    for name, value in (("cfg", cfg), ("dp", dp), ("ulysses", ulysses), ("torus", torus)):
        if value is not None and value < 1:
            raise LayoutError(f"{name} degree must be >= 1, got {value}")
    if world % (cfg * dp):
        raise LayoutError(f"cfg ({cfg}) x dp ({dp}) = {cfg * dp} does not divide the world size "
                          f"{world}; choose cfg x dp among {_divisors(world)}")
    sp = world // (cfg * dp)

    if torus_exchange not in ("auto", *EXCHANGES):
        raise LayoutError(f"unknown torus exchange {torus_exchange!r}; use 'auto', "
                          f"{', '.join(repr(e) for e in EXCHANGES)}")
    fitting = valid_ulysses(sp, per_node, num_heads, check_placement)

    if ulysses is None and torus is None:  # picked inside a machine even when placement is not enforced
        ulysses = max(valid_ulysses(sp, per_node, num_heads, check_placement=True))
        heads = f"divides the {num_heads} heads and " if num_heads else ""
        notes.append(f"ulysses={ulysses}: the largest degree that {heads}"
                     f"fits in one machine's {per_node} ranks")
    elif ulysses is None:
        if sp % torus:
            raise LayoutError(f"torus degree {torus} does not divide the sequence-parallel size {sp} "
                              f"(world {world} / cfg {cfg} / dp {dp}); choose among {_divisors(sp)}")
        ulysses = sp // torus
        if ulysses not in fitting:
            raise LayoutError(f"torus degree {torus} leaves ulysses degree {ulysses} for the rest of the "
                              f"{sp} sequence-parallel ranks, {_why_not(ulysses, per_node, num_heads)}; "
                              f"torus degrees that work: {sorted(sp // u for u in fitting)}")
        notes.append(f"ulysses={ulysses}: the rest of the {sp} sequence-parallel ranks")
    if torus is None:
        if sp % ulysses:
            raise LayoutError(f"ulysses degree {ulysses} does not divide the sequence-parallel size "
                              f"{sp} (world {world} / cfg {cfg} / dp {dp}); choose among {_divisors(sp)}")
        torus = sp // ulysses
        notes.append(f"torus={torus}: the rest of the {sp} sequence-parallel ranks")

    dims = ParallelDims(ulysses=ulysses, torus=torus, cfg=cfg, dp=dp)
    if dims.world_size != world:
        fix = f"; with ulysses={ulysses}, torus must be {sp // ulysses}" if sp % ulysses == 0 else ""
        raise LayoutError(f"dp {dp} x cfg {cfg} x torus {torus} x ulysses {ulysses} = "
                          f"{dims.world_size}, but {world} ranks are running; the product must "
                          f"equal the world size{fix}")
    if ulysses not in fitting:
        if num_heads is not None and num_heads % ulysses:
            raise LayoutError(f"{num_heads} attention heads are not divisible by ulysses degree "
                              f"{ulysses}; ulysses degrees that work here: {fitting}")
        first = next(g for g in TorusLayout(dims, topology, num_heads, "auto").groups("ulysses")
                     if len({topology.node_of_rank[r] for r in g}) > 1)
        raise LayoutError(
            f"ulysses degree {ulysses} puts one all-to-all group on several machines (ranks {first}), "
            f"but each machine has {per_node} ranks; keep the all-to-all inside a machine (ulysses in "
            f"{fitting}) and give the rest to the torus degree")
    exchange = _torus_exchange(num_heads, dims, torus_exchange, notes)
    layout = TorusLayout(dims, topology, num_heads, exchange)
    return dataclasses.replace(layout, notes=(*notes, *_placement_notes(layout)))


def valid_ulysses(sp: int, per_node: int, num_heads: int | None, check_placement: bool = True) -> list[int]:
    """Ulysses degrees that divide the SP size and the heads and, with ``check_placement``,
    keep every all-to-all group inside one machine: ranks are laid machine by machine, so
    groups of ``d`` consecutive ranks stay inside exactly when ``d`` divides a machine's
    ranks."""
    return [d for d in _divisors(sp)
            if (num_heads is None or num_heads % d == 0)
            and (not check_placement or per_node % d == 0)]


def _why_not(ulysses: int, per_node: int, num_heads: int | None) -> str:
    if num_heads is not None and num_heads % ulysses:
        return f"which does not divide the {num_heads} heads"
    return f"more than fits the all-to-all inside one machine of {per_node} ranks"


def _torus_exchange(num_heads: int | None, dims: ParallelDims, requested: str,
                    notes: list[str]) -> str:
    if num_heads is None:
        return requested  # "auto": decided per call from the heads it sees
    fits_a2a, T = num_heads % dims.sp == 0, dims.torus
    if requested == "auto":
        choice = choose_exchange(num_heads, dims.ulysses, T)
        if T == 2:
            notes.append("torus exchange 'kv': with a torus of 2 it moves the same bytes as "
                         "'a2a' and has no output return to wait for")
        elif T > 1 and choice == "kv" and num_heads % T == 0:
            notes.append(f"torus exchange 'kv': {num_heads} heads do not split over ulysses x torus = "
                         f"{dims.sp}; 'a2a-kv' (heads split by machine) moves {2 * (T - 1) / (4 * (T - 1) / T):g}x "
                         f"fewer bytes across machines: pass it on links slower than about 25 GB/s per GPU")
        elif T > 1 and choice == "kv":
            notes.append(f"torus exchange 'kv': {num_heads} heads split neither over ulysses x "
                         f"torus = {dims.sp} nor over the {T} machines, so K/V travel instead of heads")
        return choice
    if requested == "a2a" and not fits_a2a:
        fallback = "'a2a-kv', 'kv'" if num_heads % T == 0 else "'kv'"
        raise LayoutError(f"torus exchange 'a2a' needs heads divisible by ulysses x torus = "
                          f"{dims.sp}, but there are {num_heads} heads; use {fallback} or 'auto'")
    if requested == "a2a-kv" and num_heads % T:
        raise LayoutError(f"torus exchange 'a2a-kv' needs heads divisible by the torus degree {T}, "
                          f"but there are {num_heads} heads; use 'kv' or 'auto'")
    return requested


def _placement_notes(layout: TorusLayout) -> list[str]:
    """Where the low-traffic dimensions landed: across machines, inside, or some of each."""
    node, notes = layout.topology.node_of_rank, []
    for dim, label in (("torus", "torus ring"), ("cfg", "cfg parallel"), ("dp", "dp parallel")):
        if getattr(layout.dims, dim) > 1:
            groups = layout.groups(dim)
            crossing = sum(len({node[r] for r in g}) > 1 for g in groups)
            where = ("crosses machines" if crossing == len(groups) else
                     "runs inside a machine" if crossing == 0 else
                     f"crosses machines in {crossing} of {len(groups)} groups")
            notes.append(f"{label} {where}")
    return notes


@dataclass
class TorusMesh:
    """The process groups of one rank, built from a ``TorusLayout``."""

    layout: TorusLayout
    device_mesh: DeviceMesh
    sp_group: dist.ProcessGroup

    def group(self, dim: str) -> dist.ProcessGroup:
        return self.device_mesh.get_group(dim)

    @property
    def ulysses_group(self) -> dist.ProcessGroup:
        return self.group("ulysses")

    @property
    def torus_group(self) -> dist.ProcessGroup:
        return self.group("torus")

    def coordinate(self, dim: str) -> int:
        return self.device_mesh.get_local_rank(dim)

    @property
    def sp_rank(self) -> int:
        """Which sequence shard this rank holds: torus-major, ulysses-minor."""
        return self.coordinate("torus") * self.layout.dims.ulysses + self.coordinate("ulysses")


def build_mesh(layout: TorusLayout, device_type: str | None = None) -> TorusMesh:
    """Create the process groups (collective: every rank must call it)."""
    if device_type is None:
        from .transport import process_group_backend
        device_type = "cuda" if process_group_backend() == "nccl" else "cpu"
    grid = layout.rank_grid()
    mesh = DeviceMesh(device_type, grid, mesh_dim_names=DIM_NAMES)
    sp_group = None
    for ranks in layout.sp_groups():  # new_group is collective over all ranks
        group = dist.new_group(ranks)
        if dist.get_rank() in ranks:
            sp_group = group
    return TorusMesh(layout, mesh, sp_group)
