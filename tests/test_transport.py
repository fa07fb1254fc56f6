"""Transport selection and its error messages on a CPU machine."""

import pytest
import torch

from dist_harness import run_ranks
from swiftfusion_xdit import transport as tr


def test_unknown_transport_is_named():
    assert "unknown transport 'mpi'" in tr.unavailable_reason("mpi")


def test_nvshmem_on_cpu_says_it_needs_a_gpu():
    assert "needs an NVIDIA GPU" in tr.unavailable_reason("nvshmem")
    with pytest.raises(RuntimeError, match="transport 'nvshmem' cannot be used: NVSHMEM needs an NVIDIA GPU"):
        tr.resolve_transport("nvshmem")


def test_nvshmem_never_serves_a_group_across_machines_emulated_or_not(monkeypatch):
    monkeypatch.setenv("NCCL_HOSTID", "node1")
    assert "spans 2 machines" in tr.unavailable_reason("nvshmem", machines=2)
    assert "needs an NVIDIA GPU" in tr.unavailable_reason("nvshmem", machines=1)  # inside one: fine


def test_transport_pairs_keep_nvshmem_inside_machines():
    pair = tr.resolve_transports("auto", machines=2)
    assert (pair.ulysses.name, pair.torus.name) == ("gloo", "gloo")
    single = tr.resolve_transports("gloo", machines=1)
    assert single.ulysses is single.torus
    # across machines, nvshmem is asked of the Ulysses group only (here: no GPU to give it)
    with pytest.raises(RuntimeError, match="transport 'nvshmem' cannot be used: NVSHMEM needs an NVIDIA GPU"):
        tr.resolve_transports("nvshmem", machines=2)


def test_nvshmem_refused_for_a_layout_across_machines():
    assert "spans 2 machines" in tr.unavailable_reason("nvshmem", machines=2)
    with pytest.raises(RuntimeError, match="use comm='nccl' across machines"):
        tr.resolve_transport("nvshmem", machines=2)


def test_nccl_on_cpu_says_it_needs_cuda():
    with pytest.raises(RuntimeError, match="NCCL needs a CUDA GPU"):
        tr.resolve_transport("nccl")


def _auto_is_gloo_and_exchange_works(rank, world):
    import torch.distributed as dist
    t = tr.resolve_transport("auto")
    assert t.name == "gloo"
    send = torch.full((3,), float(rank))
    got = t.exchange(send, (rank + 1) % world, (rank - 1) % world, dist.group.WORLD).wait()
    assert torch.equal(got, torch.full((3,), float((rank - 1) % world)))
    chunks = torch.arange(world, dtype=torch.float32) + 10 * rank  # chunk p goes to rank p
    got = t.all_to_all(chunks, dist.group.WORLD)
    assert torch.equal(got, torch.arange(world, dtype=torch.float32) * 10 + rank)


def test_auto_picks_gloo_on_cpu_and_moves_data():
    run_ranks(_auto_is_gloo_and_exchange_works, 1, 3)
