"""The one-sided kernels (kernels/peer_copy.py) under Triton's CPU interpreter.

Several "ranks" live in one process: each has its own receive buffer and flag
array, and the per-peer deltas are the real address distances between them,
exactly what ``nvshmem_ptr`` gives on a GPU. The interpreter runs one program
at a time, so every rank sends first (``wait=False``) and then waits with
``wait_flags``; the fused wait and real concurrency are checked on the GPU by
``tests/gpu/test_gpu_peer_copy.py`` and ``test_gpu_nvshmem.py``. The scenarios run in a fresh
interpreter because ``TRITON_INTERPRET`` must be set before the kernels are
decorated.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")


def _run(scenario: str) -> None:
    env = dict(os.environ, TRITON_INTERPRET="1")
    done = subprocess.run([sys.executable, __file__, scenario], env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "passed" in done.stdout


def test_ulysses_all_to_all_matches_reference_across_slot_reuse():
    _run("ulysses")


def test_torus_step_lands_in_the_receivers_slot():
    _run("exchange")


def test_use_counted_on_the_device_picks_the_same_slots():
    """The CUDA-graph mode: use numbers read from a device counter, slots chosen in the kernel."""
    _run("counted")


@pytest.mark.parametrize("fused", ["wait_flags", "fused_wait"])
def test_a_wait_past_two_to_the_31_flags_still_waits(fused):
    """Late in a long-running process epoch * ctas passes 2**31: with 32-bit arithmetic
    the target wrapped negative and every wait passed without data. The peer never
    sends, so a correct wait spins until the timeout."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    with pytest.raises(subprocess.TimeoutExpired):
        subprocess.run([sys.executable, __file__, "late_wait", fused], env=env, capture_output=True,
                       text=True, timeout=15)


def test_waits_for_different_cta_counts_do_not_share_a_compiled_kernel(monkeypatch):
    """Triton turns an integer argument of 1 into a constant of the compiled kernel: a wait
    kernel first compiled for 1 CTA per peer, reused for 4, waited for a quarter of the
    flags (found on an H100). The fast-launch cache must tell the counts apart."""
    import torch
    from swiftfusion_xdit.kernels import peer_copy
    keys = []
    monkeypatch.setattr(peer_copy, "_launch", lambda fn, compiled, key, *rest: keys.append(key))
    buffers = peer_copy.PeerBuffers(torch.zeros(2, 8), torch.zeros(2, 4, dtype=torch.int64), None, None)
    sources = torch.tensor([1, 2, 3])
    for ctas in (1, 4):
        peer_copy.wait_flags(buffers, sources, use=1, ctas_per_peer=ctas)
    assert keys[0] != keys[1]


def test_collapse_merges_contiguous_dims_and_refuses_four_outer():
    from swiftfusion_xdit.kernels.peer_copy import collapse
    # Ulysses: the (n, B, h, s, D) = (3, 2, 4, 5, 16) chunk of a (3, 2, 8, 5, 16) tensor,
    # landing in rows [j*s, (j+1)*s) of a (3, 2, 4, 3*5, 16) receive buffer
    shape, (src, dst) = collapse((3, 2, 4, 5, 16), (1280, 640, 80, 16, 1), (960, 480, 240, 16, 1))
    assert shape == [6, 4, 5, 16] and src == [640, 80, 16, 1] and dst == [480, 240, 16, 1]
    # a contiguous chunk becomes rows of the vector width
    shape, (src,) = collapse((2, 1, 4, 9, 32), (1152, 1152, 288, 32, 1))
    assert shape == [1, 1, 72, 32] and src == [0, 0, 32, 1]
    shape, (src,) = collapse((3 * 4096,), (1,))
    assert shape == [1, 1, 12, 1024] and src == [0, 0, 1024, 1]
    assert collapse((2, 3, 4, 5, 6), (1000, 100, 30, 7, 1)) is None


# --- scenarios (run in the subprocess) -------------------------------------------------------

def _ranks(P, recv_shape, dtype):
    import torch
    from swiftfusion_xdit.kernels.peer_copy import PeerBuffers
    datas = [torch.zeros(2, *recv_shape, dtype=dtype) for _ in range(P)]
    flags = [torch.zeros(2, P, dtype=torch.int64) for _ in range(P)]

    def buffers(r):
        dd = [(d.data_ptr() - datas[r].data_ptr()) // datas[r].element_size() for d in datas]
        fd = [(f.data_ptr() - flags[r].data_ptr()) // 8 for f in flags]
        return PeerBuffers(datas[r], flags[r], torch.tensor(dd), torch.tensor(fd))
    return [buffers(r) for r in range(P)], flags


def _ulysses() -> None:
    import torch
    from swiftfusion_xdit.kernels.peer_copy import all_to_all_put, wait_flags
    g = torch.Generator().manual_seed(0)
    for P, (n, B, H, s, D), dtype, ctas in ((3, (3, 2, 6, 5, 16), torch.bfloat16, 2),
                                            (4, (1, 1, 8, 7, 24), torch.float16, 3)):
        bufs, flags = _ranks(P, (n, B, H // P, P * s, D), dtype)
        dests = [torch.tensor([(r + i) % P for i in range(P)]) for r in range(P)]
        for use in (1, 2, 3):  # slots 1, 0, 1: the third use overwrites the first
            xs = [torch.randn(n, B, H, s, D, generator=g).to(dtype) for _ in range(P)]
            outs = [all_to_all_put(xs[r], 2, 3, bufs[r], r, dests[r], use, ctas_per_peer=ctas,
                                   wait=False) for r in range(P)]
            for r in range(P):
                wait_flags(bufs[r], torch.arange(P), use, ctas)
                heads = slice(r * (H // P), (r + 1) * (H // P))
                assert torch.equal(outs[r], torch.cat([x[:, :, heads] for x in xs], dim=3)), (P, use, r)
            # and back: heads -> sequence (scatter the sequence, gather the heads)
            back_bufs, _ = _ranks(P, (n, B, H, s, D), dtype)
            backs = [all_to_all_put(outs[r], 3, 2, back_bufs[r], r, dests[r], use,
                                    ctas_per_peer=ctas, wait=False) for r in range(P)]
            for r in range(P):
                assert torch.equal(backs[r], xs[r]), (P, use, r)
        assert all((f[1] == 2 * ctas).all() and (f[0] == ctas).all() for f in flags)  # 2 uses of slot 1


def _exchange() -> None:
    import torch
    from swiftfusion_xdit.kernels.peer_copy import put_one, wait_flags
    P, ctas = 3, 2
    g = torch.Generator().manual_seed(1)
    shape = (2, 1, 4, 9, 32)  # K,V of one chunk, (2, B, h, c, D)
    bufs, flags = _ranks(P, shape, torch.bfloat16)
    for use in (1, 2):
        sends = [torch.randn(*shape, generator=g).bfloat16() for _ in range(P)]
        for r in range(P):  # one torus step at distance 1: r -> r+1
            put_one(sends[r], bufs[r], r, torch.tensor([(r + 1) % P]), use, ctas_per_peer=ctas)
        for r in range(P):
            wait_flags(bufs[r], torch.tensor([(r - 1) % P]), use, ctas)
            assert torch.equal(bufs[r].data[use % 2], sends[(r - 1) % P]), (use, r)
            assert flags[r][use % 2, (r - 1) % P] == ctas and flags[r][use % 2, (r + 1) % P] == 0


def _counted() -> None:
    import torch
    from swiftfusion_xdit.kernels.peer_copy import all_to_all_put, counted_slot, wait_flags
    P, (n, B, H, s, D), ctas = 3, (3, 1, 6, 4, 16), 2
    g = torch.Generator().manual_seed(2)
    bufs, flags = _ranks(P, (n, B, H // P, P * s, D), torch.bfloat16)
    counters = [torch.zeros(1, dtype=torch.int64) for _ in range(P)]
    dests = [torch.tensor([(r + i) % P for i in range(P)]) for r in range(P)]
    for use in (1, 2, 3):
        xs = [torch.randn(n, B, H, s, D, generator=g).bfloat16() for _ in range(P)]
        for r in range(P):
            counters[r].add_(1)
            all_to_all_put(xs[r], 2, 3, bufs[r], r, dests[r], 0, ctas_per_peer=ctas, wait=False,
                           counter=counters[r])  # host use 0: ignored
        for r in range(P):
            wait_flags(bufs[r], torch.arange(P), 0, ctas, counter=counters[r])
            heads = slice(r * (H // P), (r + 1) * (H // P))
            got = counted_slot(bufs[r], counters[r])
            assert torch.equal(got, torch.cat([x[:, :, heads] for x in xs], dim=3)), (use, r)
            assert torch.equal(got, bufs[r].data[use % 2])  # the host-counted mode's slot
    assert all((f[1] == 2 * ctas).all() and (f[0] == ctas).all() for f in flags)


def _late_wait() -> None:
    import torch
    from swiftfusion_xdit.kernels.peer_copy import all_to_all_put, wait_flags
    P, ctas, use = 2, 2, 2**31 + 1  # epoch 2**30 + 1: epoch * ctas = 2**31 + 2
    bufs, flags = _ranks(P, (1, 1, 1, 2 * 4, 16), torch.float32)
    flags[0][use % 2] = (use + 1) // 2 * ctas - ctas  # every earlier use of the slot arrived
    if sys.argv[2] == "fused_wait":
        all_to_all_put(torch.randn(1, 1, 2, 4, 16), 2, 3, bufs[0], 0, torch.tensor([1, 0]), use,
                       ctas_per_peer=ctas, wait=True)
    else:
        wait_flags(bufs[0], torch.tensor([1]), use, ctas)
    print("returned without the peer's data")


if __name__ == "__main__":
    {"ulysses": _ulysses, "exchange": _exchange, "counted": _counted, "late_wait": _late_wait}[sys.argv[1]]()
    print("passed")
