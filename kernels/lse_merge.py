"""One-launch exact merge of a partial attention result into float32 accumulators.

Torus Attention folds every block it computes into (out, lse) accumulators:

    m = max(lse, lse_b);  w = exp(lse - m);  w_b = exp(lse_b - m)
    out = (out * w + out_b * w_b) / (w + w_b);  lse = m + log(w + w_b)

Written as PyTorch ops that is a dozen kernel launches and as many passes
over the float32 output, which dominates the host time of the ``a2a``
exchange's many small blocks (3T-3 merges per layer, one more with joint
queries; ``kv`` merges T-1). Here it is
one launch, one read of each input and one write of each accumulator. Rows
with no key on either side (lse -inf: every key masked) stay at -inf and 0.

Every tensor is read through its own strides, so the accumulators may be row
slices of larger buffers (the ``a2a`` slot layout) and the block's lse may be
any (B, H, S) view of what the attention kernel returned.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _merge_kernel(out, lse, blk, blk_lse, H, S, D,
                  o_b, o_h, o_s, l_b, l_h, l_s, k_b, k_h, k_s, kl_b, kl_h, kl_s,
                  ROWS: tl.constexpr, COLS: tl.constexpr):
    bh = tl.program_id(0).to(tl.int64)  # 64-bit offsets: tensors may pass 2**31 elements
    b, h = bh // H, bh % H
    rows = tl.program_id(1).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, COLS)
    live = rows < S
    tile = live[:, None] & (cols[None, :] < D)

    lse_ptrs = lse + b * l_b + h * l_h + rows * l_s
    a = tl.load(lse_ptrs, mask=live, other=float("-inf"))
    c = tl.load(blk_lse + b * kl_b + h * kl_h + rows * kl_s, mask=live, other=float("-inf"))
    m = tl.maximum(a, c)
    empty = m == float("-inf")
    ref = tl.where(empty, 0.0, m)
    wa, wc = tl.exp(a - ref), tl.exp(c - ref)
    total = wa + wc  # in [1, 2] unless the row is empty (then 0): guard only that case
    inv = tl.where(empty, 0.0, 1.0 / tl.where(empty, 1.0, total))

    out_ptrs = out + b * o_b + h * o_h + rows[:, None] * o_s + cols[None, :]
    acc = tl.load(out_ptrs, mask=tile, other=0.0)
    new = tl.load(blk + b * k_b + h * k_h + rows[:, None] * k_s + cols[None, :], mask=tile,
                  other=0.0).to(tl.float32)
    merged = (acc * (wa * inv)[:, None] + new * (wc * inv)[:, None])
    tl.store(out_ptrs, merged, mask=tile)
    tl.store(lse_ptrs, tl.where(empty, float("-inf"), ref + tl.log(tl.where(empty, 1.0, total))),
             mask=live)


def merge(out: torch.Tensor, lse: torch.Tensor, block_out: torch.Tensor,
          block_lse: torch.Tensor) -> None:
    """``out``/``lse`` (float32, (B, H, S, D) / (B, H, S)) absorb one block, in place.

    The last dimension of ``out`` and ``block_out`` must be contiguous (every
    attention kernel's output and every row slice of one is)."""
    B, H, S, D = out.shape
    if block_out.shape != out.shape or lse.shape != out.shape[:3] or block_lse.shape != lse.shape:
        raise ValueError(f"merge shapes disagree: out {tuple(out.shape)}, lse {tuple(lse.shape)}, "
                         f"block out {tuple(block_out.shape)}, block lse {tuple(block_lse.shape)}")
    if out.dtype != torch.float32 or lse.dtype != torch.float32 or block_lse.dtype != torch.float32:
        raise ValueError("merge accumulates in float32: out, lse and the block's lse must be float32")
    if out.stride(3) != 1 or block_out.stride(3) != 1:
        raise ValueError("merge needs the head dimension contiguous")
    cols = triton.next_power_of_2(D)
    rows = max(1, min(64, 8192 // cols))
    grid = (B * H, triton.cdiv(S, rows))
    _merge_kernel[grid](out, lse, block_out, block_lse, H, S, D,
                        *out.stride()[:3], *lse.stride(), *block_out.stride()[:3],
                        *block_lse.stride(), ROWS=rows, COLS=cols)
