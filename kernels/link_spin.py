"""A wall-clock spin: the cluster emulator's stand-in for a transfer on a link.

``spin(ns)`` launches one program (one thread block: one SM of the GPU's) that reads the
GPU's global timer and loops until ``ns`` nanoseconds have passed. ``torch.cuda._sleep``
counts SM cycles instead, and the SM clock drops when other kernels load the GPU: with
cycles calibrated on an idle H200, a call modeled at 3.2 ms beside 20 bf16 matmuls took
4.8 ms (tests/gpu/test_gpu_emulator.py, 2026-12-04). The link's time must not stretch
with compute, so the spin reads the clock that does not.

Capturable in a CUDA graph (the duration is an argument recorded with the launch).
"""

import triton
from triton.language.extra.cuda import globaltimer


@triton.jit(do_not_specialize=["ns"])
def _spin_kernel(ns):
    start = globaltimer()
    elapsed = globaltimer() - start
    while elapsed < ns:
        elapsed = globaltimer() - start


def spin(ns: int) -> None:
    """Occupy the current CUDA stream for ``ns`` nanoseconds of wall-clock time."""
    if ns > 0:
        _spin_kernel[(1,)](ns)

