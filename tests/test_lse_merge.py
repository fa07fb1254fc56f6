"""The one-launch LSE merge (kernels/lse_merge.py) under Triton's CPU interpreter.

``merge_into`` sends CUDA tensors to this kernel and CPU tensors through the
PyTorch form; here the kernel itself runs on CPU tensors (interpreter) and must
give what the PyTorch form gives, and what attention over all keys gives. It
runs in a fresh interpreter because ``TRITON_INTERPRET`` must be set before the
kernel is decorated. The GPU run of the same comparison is
``tests/gpu/test_gpu_lse_kernels.py``.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")


def test_fused_merge_matches_pytorch_merge_and_full_attention():
    env = dict(os.environ, TRITON_INTERPRET="1")
    done = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "passed" in done.stdout


def test_fused_merge_refuses_tensors_that_do_not_match():
    """Checked before launch: a wrong shape would read and write out of bounds."""
    import torch
    from swiftfusion_xdit.kernels.lse_merge import merge
    out, lse = torch.zeros(1, 2, 8, 16), torch.zeros(1, 2, 8)
    with pytest.raises(ValueError, match="shapes disagree"):
        merge(out, lse, torch.zeros(1, 2, 4, 16), torch.zeros(1, 2, 4))
    with pytest.raises(ValueError, match="float32"):
        merge(out.half(), lse, torch.zeros(1, 2, 8, 16), torch.zeros(1, 2, 8))


def _pytorch_merge(out, lse, block_out, block_lse):
    import swiftfusion_xdit.block_attention as ba
    assert not out.is_cuda  # CPU tensors take the PyTorch form
    ba.merge_into(out, lse, block_out, block_lse)


def _scenario() -> None:
    import torch

    from swiftfusion_xdit.block_attention import _math
    from swiftfusion_xdit.kernels.lse_merge import merge

    torch.manual_seed(0)
    # row slices of bigger accumulators (the a2a slot layout), a head dim that is not a
    # power of two, a block lse that is a strided view, half-precision block outputs
    for B, H, S, D, dtype in ((1, 3, 70, 128, torch.bfloat16), (2, 2, 33, 72, torch.float16),
                              (1, 1, 5, 16, torch.float32)):
        big_out = torch.randn(B, H, S + 9, D)
        big_lse = torch.randn(B, H, S + 9) * 3
        rows = slice(4, 4 + S)
        block_out = torch.randn(B, H, S, D).to(dtype)
        block_lse = (torch.randn(B, H, S, 2) * 3)[..., 0]  # non-contiguous
        big_lse[:, :, 4] = float("-inf")  # a row with no keys yet: takes the block as is
        big_out[:, :, 4] = 0
        block_lse[:, :, 1] = float("-inf")  # a block row with no keys: leaves the row alone
        block_lse[:, :, 2] = float("-inf")  # and one with no keys on either side
        big_lse[:, :, 6] = float("-inf")
        big_out[:, :, 6] = 0
        ref_out, ref_lse = big_out.clone(), big_lse.clone()
        _pytorch_merge(ref_out[:, :, rows], ref_lse[:, :, rows], block_out, block_lse)
        merge(big_out[:, :, rows], big_lse[:, :, rows], block_out, block_lse)
        torch.testing.assert_close(big_out, ref_out, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(big_lse, ref_lse, rtol=1e-6, atol=1e-6)
        assert torch.isneginf(big_lse[:, :, 6]).all() and (big_out[:, :, 6] == 0).all()

    # three key blocks merged into empty accumulators equal attention over every key
    q, k, v = (torch.randn(2, 4, n, 64) for n in (40, 90, 90))
    out, lse = torch.zeros(2, 4, 40, 64), torch.full((2, 4, 40), float("-inf"))
    for keys in (slice(0, 30), slice(30, 31), slice(31, 90)):
        merge(out, lse, *_math(q, k[:, :, keys], v[:, :, keys], 0.125))
    full_out, full_lse = _math(q, k, v, 0.125)
    torch.testing.assert_close(out, full_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse, full_lse, rtol=1e-5, atol=1e-5)
    print("passed")


if __name__ == "__main__":
    _scenario()
