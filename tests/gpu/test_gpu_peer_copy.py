"""The one-sided kernels (kernels/peer_copy.py) with real concurrency, on one GPU.

P "virtual ranks" share the GPU: each has its own receive buffer and flag array, and
the deltas are the address distances between them (``kernel_speed.virtual_ranks``;
``nvshmem_ptr`` gives the same across GPUs). Each rank's kernel runs on its own stream
with the fused wait on, so the flag waits really spin while the other ranks' kernels
store. Every result must be bit-exact against the reference layout, over three uses
(both slots, one reused). The CPU run of these kernels (Triton's interpreter, one
program at a time, no fused wait) is tests/test_peer_copy.py; their speed is
benchmarks/kernel_speed.py.
"""

import time

import pytest
import torch

BF16, FP16 = torch.bfloat16, torch.float16
# (P, n, heads, tokens, dtype): Flux 2048² (16,896 tokens) and 1024² (4,608), 24 heads, n=3
# tensors per call (q, k, v); then an odd shape (3 ranks, 37 tokens each, 6 heads)
ULYSSES = [(P, 3, 24, tokens, dtype) for P in (2, 4, 8) for tokens in (16896, 4608)
           for dtype in (BF16, FP16)] + [(3, 1, 6, 3 * 37, BF16)]


@pytest.mark.parametrize("P,n,heads,tokens,dtype", ULYSSES,
                         ids=[f"P{c[0]}-{c[3]}tok-{str(c[4])[6:]}" for c in ULYSSES])
def test_ulysses_all_to_all_both_ways_is_bit_exact(P, n, heads, tokens, dtype):
    """Sequence-sharded to head-sharded and back, on every rank at once."""
    from kernel_speed import run_all_to_all, virtual_ranks  # here: the kernels import triton
    from swiftfusion_xdit.nvshmem_transport import ctas_per_peer
    g = torch.Generator(device="cuda").manual_seed(100 + ULYSSES.index((P, n, heads, tokens, dtype)))
    s = tokens // P
    ctas = ctas_per_peer(n * (heads // P) * s * 128 * dtype.itemsize, P)  # the transport's choice
    bufs = virtual_ranks(P, (n, 1, heads // P, P * s, 128), dtype)
    back = virtual_ranks(P, (n, 1, heads, s, 128), dtype)
    streams = [torch.cuda.Stream() for _ in range(P)]
    dests = [torch.tensor([(r + i) % P for i in range(P)], device="cuda") for r in range(P)]
    for use in (1, 2, 3):
        xs = [torch.randn(n, 1, heads, s, 128, device="cuda", dtype=dtype, generator=g) for _ in range(P)]
        outs = run_all_to_all(xs, bufs, 2, 3, use, ctas, streams, dests)
        backs = run_all_to_all(outs, back, 3, 2, use, ctas, streams, dests)
        torch.cuda.synchronize()
        for r in range(P):
            h = slice(r * heads // P, (r + 1) * heads // P)
            assert torch.equal(outs[r], torch.cat([x[:, :, h] for x in xs], dim=3)), f"use {use}, rank {r}"
            assert torch.equal(backs[r], xs[r]), f"use {use}, rank {r}, back"


@pytest.mark.parametrize("P", (2, 4))
def test_torus_step_is_bit_exact(P):
    """One peer each (rank r sends to r+1), the receivers waiting on the compute stream
    with ``wait_flags`` as the transport's pending exchange does."""
    from kernel_speed import virtual_ranks
    from swiftfusion_xdit.kernels.peer_copy import put_one, wait_flags
    from swiftfusion_xdit.nvshmem_transport import ctas_per_peer
    g = torch.Generator(device="cuda").manual_seed(9)
    shape = (2, 1, 6, 4224, 128)
    ctas = ctas_per_peer(torch.Size(shape).numel() * 2, P)
    bufs = virtual_ranks(P, shape, BF16)
    streams = [torch.cuda.Stream() for _ in range(P)]
    for use in (1, 2, 3):
        sends = [torch.randn(*shape, device="cuda", dtype=BF16, generator=g) for _ in range(P)]
        for r in range(P):
            streams[r].wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(streams[r]):
                put_one(sends[r], bufs[r], r, torch.tensor([(r + 1) % P], device="cuda"), use, ctas_per_peer=ctas)
        for r in range(P):
            wait_flags(bufs[r], torch.tensor([(r - 1) % P], device="cuda"), use, ctas)
            assert torch.equal(bufs[r].data[use % 2], sends[(r - 1) % P]), f"use {use}, rank {r}"
    torch.cuda.synchronize()


def test_a_wait_for_more_ctas_after_one_for_fewer_still_waits():
    """A wait for 4 CTAs per peer after one for 1 must wait for all 4 (Triton once compiled
    the count 1 into the kernel, and the launch cache served it for 4). P=5: a group size no
    other test uses, so the first wait compiled for it is this one's."""
    from kernel_speed import virtual_ranks
    from swiftfusion_xdit.kernels.peer_copy import wait_flags
    buf = virtual_ranks(5, (4,), torch.float32)[0]
    source = torch.tensor([1], device="cuda")
    buf.flags[1, 1] = 1  # use 1 (slot 1, epoch 1): one CTA of the peer's has signalled
    wait_flags(buf, source, 1, 1)  # one CTA per peer: satisfied at once
    torch.cuda.synchronize()
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        wait_flags(buf, source, 1, 4)  # four CTAs per peer: must spin
        done = torch.cuda.Event()
        done.record(stream)
    time.sleep(1.0)
    returned_early = done.query()
    buf.flags[1, 1] = 4  # the other three signal (another stream than the spinning kernel's)
    stream.synchronize()  # and the wait ends: a hang here is a wait that never sees them
    assert not returned_early


def test_repeated_puts_launch_the_compiled_kernel_directly():
    """After its first launch a put calls the compiled kernel with prepared arguments
    (Triton's own launcher costs tens of microseconds a call); a Triton whose launcher
    takes other arguments turns that off for good (``_FAST``), which must not happen on
    the Triton we ship with."""
    import swiftfusion_xdit.kernels.peer_copy as pc
    from kernel_speed import virtual_ranks
    P = 4
    x = torch.randn(3, 1, 24, 1152, 128, device="cuda", dtype=BF16)
    bufs = virtual_ranks(P, (3, 1, 24 // P, P * 1152, 128), BF16)
    for use in (1, 2, 3):
        pc.all_to_all_put(x, 2, 3, bufs[0], 0, torch.arange(P, device="cuda"), use, ctas_per_peer=4, wait=False)
    torch.cuda.synchronize()
    (layout,) = bufs[0].plans.values()
    assert pc._FAST[0] and layout.compiled and layout.prepared
