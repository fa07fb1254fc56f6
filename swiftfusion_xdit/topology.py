"""Which ranks share a machine, and how the GPUs inside a machine are linked.

Every rank contributes one identity string; ranks with the same string are on
the same machine. The identity is, in order of precedence:

* ``SWIFTFUSION_NODE`` -- set it to emulate several machines on one host;
* ``NCCL_HOSTID``      -- the variable NCCL itself uses for the same purpose,
  so one setting makes both NCCL's transport and our mesh see "machines";
* the host name.

Machines are numbered in order of their lowest rank, and ranks inside a machine
keep their global order, so ``Topology.ranks_by_node`` is the natural
node-major order in which the mesh builder lays out its dimensions.
"""

from __future__ import annotations

import os
import socket
import subprocess
from dataclasses import dataclass

import torch
import torch.distributed as dist


def emulate_machines(nodes: int) -> None:
    """Before NCCL starts, make this torchrun rank one of ``nodes`` emulated machines:
    ranks [k*G, (k+1)*G) are machine k (G = world / nodes). NCCL_HOSTID sends
    NCCL's traffic between them over its network transport (loopback sockets),
    unless a paced link is set (``SWIFTFUSION_PACED_GBPS``, benchmarks/paced_link.py):
    then NCCL keeps NVLink and each inter-machine call is paced to that bandwidth."""
    if nodes <= 1:
        return
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if world % nodes:
        raise ValueError(f"cannot emulate {nodes} machines with {world} ranks: the machines must hold "
                         f"equally many ranks; pick a divisor of {world}")
    os.environ["SWIFTFUSION_NODE"] = f"node{rank // (world // nodes)}"
    if os.environ.get("SWIFTFUSION_PACED_GBPS"):
        return
    os.environ["NCCL_HOSTID"] = os.environ["SWIFTFUSION_NODE"]
    os.environ.setdefault("NCCL_SOCKET_IFNAME", "lo")
    os.environ.setdefault("NCCL_IB_DISABLE", "1")


def local_node_identity() -> str:
    for var in ("SWIFTFUSION_NODE", "NCCL_HOSTID"):
        if os.environ.get(var):
            return os.environ[var]
    return socket.gethostname()


@dataclass(frozen=True)
class Topology:
    """``node_of_rank[r]`` is the machine index of global rank ``r``."""

    node_of_rank: tuple[int, ...]
    node_names: tuple[str, ...] = ()
    intra_link: str = "unknown"  # "nvlink", "pcie", "cpu" or "unknown"

    def __post_init__(self):
        counts = {n: self.node_of_rank.count(n) for n in set(self.node_of_rank)}
        if len(set(counts.values())) > 1:
            detail = ", ".join(f"machine {n}: {c}" for n, c in sorted(counts.items()))
            raise ValueError(
                f"every machine must run the same number of ranks, got {detail}. "
                "Launch the same number of processes per machine (torchrun --nproc-per-node), "
                "or fix SWIFTFUSION_NODE / NCCL_HOSTID if you are emulating machines."
            )

    @classmethod
    def uniform(cls, num_nodes: int, gpus_per_node: int, intra_link: str = "unknown") -> "Topology":
        """A node-major layout, for planning and tests without a process group."""
        return cls(tuple(r // gpus_per_node for r in range(num_nodes * gpus_per_node)),
                   intra_link=intra_link)

    @property
    def world_size(self) -> int:
        return len(self.node_of_rank)

    @property
    def num_nodes(self) -> int:
        return len(set(self.node_of_rank))

    @property
    def gpus_per_node(self) -> int:
        return self.world_size // self.num_nodes

    @property
    def ranks_by_node(self) -> list[int]:
        """Global ranks sorted machine by machine (stable inside a machine)."""
        return sorted(range(self.world_size), key=lambda r: (self.node_of_rank[r], r))

    def describe(self) -> str:
        return (f"{self.num_nodes} machine(s) x {self.gpus_per_node} rank(s), "
                f"intra-machine link: {self.intra_link}")


def detect_topology(group: dist.ProcessGroup | None = None) -> Topology:
    """Gather every rank's machine identity over ``group`` (collective call)."""
    pretend = getattr(group or dist.distributed_c10d._get_default_group(), "emulated_topology", None)
    if pretend is not None:  # the one-GPU cluster emulator (emulator.py) plays every rank
        return pretend
    names: list[str | None] = [None] * dist.get_world_size(group)
    dist.all_gather_object(names, local_node_identity(), group=group)
    first_rank: dict[str, int] = {}
    for rank, name in enumerate(names):
        first_rank.setdefault(name, rank)
    order = sorted(first_rank, key=first_rank.get)
    node_of_rank = tuple(order.index(name) for name in names)
    return Topology(node_of_rank, tuple(order), intra_link=_local_link_type())


def _local_link_type() -> str:
    """NVLink if ``nvidia-smi topo -m`` shows an NV# link between local GPUs."""
    if not torch.cuda.is_available():
        return "cpu"
    if torch.cuda.device_count() < 2:
        return "unknown"
    try:
        matrix = subprocess.run(["nvidia-smi", "topo", "-m"], capture_output=True,
                                text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return link_type_from_topo_matrix(matrix)


def link_type_from_topo_matrix(matrix: str) -> str:
    """Parse ``nvidia-smi topo -m``: the weakest GPU-to-GPU link wins. Only the GPU
    columns of the header count: GPU rows also hold their paths to NICs (PIX, NODE...)."""
    lines = [line.split() for line in matrix.splitlines() if line.strip()]
    if not lines:
        return "unknown"
    gpu_columns = [j for j, name in enumerate(lines[0]) if name.startswith("GPU") and name[3:].isdigit()]
    kinds = set()
    for cells in lines[1:]:
        if not (cells[0].startswith("GPU") and cells[0][3:].isdigit()):
            continue
        for j in gpu_columns:
            cell = cells[1 + j] if 1 + j < len(cells) else ""
            if cell.startswith("NV"):
                kinds.add("nvlink")
            elif cell in ("PIX", "PXB", "PHB", "NODE", "SYS"):
                kinds.add("pcie")
    if not kinds:
        return "unknown"
    return "pcie" if "pcie" in kinds else "nvlink"
