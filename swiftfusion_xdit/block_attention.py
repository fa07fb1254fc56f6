"""Block attention that returns the log-sum-exp, and the exact merge of blocks.

``attend(q, k, v)`` takes (B, H, Sq, D) / (B, H, Sk, D) tensors and returns
``(out, lse)`` with ``lse`` of shape (B, H, Sq) in float32.  Two partial
results over disjoint key sets merge exactly with ``merge_into``:

    lse = log(exp(lse_a) + exp(lse_b))
    out = out_a * exp(lse_a - lse) + out_b * exp(lse_b - lse)

Kernels are registered by name with the devices they run on; ``pick_kernel``
chooses the first that fits (cuDNN, then flash, then memory-efficient on CUDA;
the fused CPU flash kernel on CPU; a reference implementation anywhere, in
float32 or float64, used for float64 and for checks). CUDA's LSE kernels need
a head dim that is a multiple of 8; others are zero-padded to one, which is
exact. The accumulators are float32 whatever the input dtype, so float64
inputs get float32 accuracy from a multi-block schedule. A block whose output is final
(the only block of a call: one machine, or cross-attention to gathered keys)
needs no LSE; ``pick_final_kernel`` lets PyTorch's SDPA choose for it, as the
unparallelised model does.

On CUDA the merge is one Triton launch (``kernels/lse_merge.py``) instead of
a dozen PyTorch ops; ``SWIFTFUSION_FUSED_MERGE=0`` turns it off. Under
``torch.compile`` the PyTorch form is traced (Inductor fuses it itself).
"""

from __future__ import annotations

import os
from typing import Callable

import torch
import torch.nn.functional as F

Kernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float], tuple[torch.Tensor, torch.Tensor]]


def _math(q, k, v, scale):
    dtype = torch.promote_types(q.dtype, torch.float32)
    scores = torch.matmul(q.to(dtype), k.to(dtype).transpose(-1, -2)) * scale
    lse = torch.logsumexp(scores, dim=-1)
    out = torch.matmul(torch.exp(scores - lse.unsqueeze(-1)), v.to(dtype))
    return out.to(q.dtype), lse


def _cpu_flash(q, k, v, scale):
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False,
                                                                          scale=scale)
    return out, lse


def _cuda_flash(q, k, v, scale):
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, False, False,
                                                                  scale=scale)[:2]
    return out, lse


def _cudnn(q, k, v, scale):
    out, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, False,
                                                                  False, scale=scale)[:2]
    return out, lse.reshape(q.shape[:3])  # cuDNN returns (B, H, S, 1)


def _efficient(q, k, v, scale):
    out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, None, True, 0.0,
                                                                      False, scale=scale)[:2]
    return out, lse[..., : q.shape[2]]  # lse is padded to a multiple of 32


_HALF = (torch.float16, torch.bfloat16)
# name -> (kernel, supported(device_type, dtype, head_dim))
KERNELS: dict[str, tuple[Kernel, Callable[[str, torch.dtype, int], bool]]] = {
    "cudnn": (_cudnn, lambda dev, dt, d: dev == "cuda" and dt in _HALF and d <= 128),
    "flash": (_cuda_flash, lambda dev, dt, d: dev == "cuda" and dt in _HALF and d <= 256),
    "efficient": (_efficient, lambda dev, dt, d: dev == "cuda" and dt != torch.float64),
    "cpu_flash": (_cpu_flash, lambda dev, dt, d: dev == "cpu" and dt != torch.float64),
    "math": (_math, lambda dev, dt, d: True),
}


def pick_kernel(q: torch.Tensor, name: str = "auto") -> Kernel:
    dev, dt, d = q.device.type, q.dtype, q.shape[-1]
    padded = dev == "cuda" and d % 8 != 0
    d += -d % 8 if padded else 0
    if name != "auto":
        if name not in KERNELS:
            raise ValueError(f"unknown attention kernel {name!r}; choose from {list(KERNELS)}")
        if not KERNELS[name][1](dev, dt, d):
            raise ValueError(f"attention kernel {name!r} does not run on {dev} with {dt}, "
                             f"head dim {d}")
        kernel = KERNELS[name][0]
    else:
        kernel = next(kernel for kernel, supported in KERNELS.values() if supported(dev, dt, d))
    return pad_head_dim(kernel) if padded and kernel is not _math else kernel


def pad_head_dim(kernel: Kernel) -> Kernel:
    """``kernel`` on q, k, v zero-padded to a head dim that is a multiple of 8 (CUDA's
    cuDNN, flash and efficient kernels refuse others; SDPA pads the same way). Zero
    columns add nothing to any score (the scale stays the real head dim's) and give
    zero output columns, which are sliced off."""
    def padded(q, k, v, scale):
        d = q.shape[-1]
        out, lse = kernel(*(F.pad(x, (0, -d % 8)) for x in (q, k, v)), scale)
        return out[..., :d], lse
    return padded


def _sdpa_final(q, k, v, scale):
    return F.scaled_dot_product_attention(q, k, v, scale=scale), None


def pick_final_kernel(q: torch.Tensor, name: str = "auto") -> Kernel:
    """The kernel for a lone block, whose LSE nothing reads (it returns None for it).

    With ``auto`` PyTorch's SDPA chooses, free to take a kernel that computes no
    LSE, as the unparallelised model does. Alone, per shape, it was within 3% of cuDNN
    with LSE except the small shapes, where it went both ways (4,608 tokens: 3 heads
    0.073 vs 0.089 ms on an H200, 0.088 vs 0.080 on an H100; 6 heads 0.152 vs 0.172
    on the H100; ``benchmarks/results/kernels/attention_kernels*.md``); inside the
    whole model on the H100, 0-2% less attention time (``results/ab_lone_block/``).
    A kernel named by the caller is used as named."""
    return _sdpa_final if name == "auto" else pick_kernel(q, name)


# the environment is read at import; the attribute at each call, so a benchmark can
# compare both forms in one process
fused_merge = os.environ.get("SWIFTFUSION_FUSED_MERGE", "1") != "0"
_fused = None


def _fused_kernel():
    """The Triton merge, or None without triton (CUDA torch wheels ship it; the PyTorch
    form gives the same result)."""
    global _fused
    if _fused is None:
        try:
            from .kernels.lse_merge import merge
        except ImportError:
            merge = False
        _fused = merge
    return _fused or None


def merge_into(out: torch.Tensor, lse: torch.Tensor, block_out: torch.Tensor,
               block_lse: torch.Tensor) -> None:
    """Fold one block's (out, lse) into float32 accumulators, in place.

    Rows with no keys yet on either side (lse -inf, out 0: every key masked)
    stay at -inf and 0 instead of turning into NaN."""
    fused = (fused_merge and out.is_cuda and not torch.compiler.is_compiling()
             and out.stride(-1) == 1 and block_out.stride(-1) == 1
             and block_lse.dtype == torch.float32  # float64 inputs: the math kernel's LSE
             and _fused_kernel())
    if fused:
        try:
            fused(out, lse, block_out, block_lse)
        except ValueError:  # the kernel's own input checks: a caller's bug, said as it is
            raise
        except Exception as e:  # e.g. Triton cannot build for this GPU: say how to go on
            raise RuntimeError(f"the fused LSE merge (Triton) failed: {e}. Set "
                               "SWIFTFUSION_FUSED_MERGE=0 to merge with PyTorch ops instead") from e
        return
    new_lse = torch.logaddexp(lse, block_lse)
    ref = torch.where(torch.isneginf(new_lse), 0.0, new_lse)
    out.mul_(torch.exp(lse - ref).unsqueeze(-1))
    out.add_(block_out.float() * torch.exp(block_lse - ref).unsqueeze(-1))
    lse.copy_(new_lse)


def attend_kept(attend: Kernel, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                keep: torch.Tensor | None):
    """``attend`` over the keys ``keep`` (B, Sk) marks; None: every key.

    Key padding is applied by leaving the masked keys out, which is exact and
    needs no kernel that takes a mask. It costs a host synchronisation and a
    gather per batch item, so only masked calls take it. A batch item with no
    key left gets out 0 and lse -inf, which ``merge_into`` ignores.

    The raw kernels read rows: a last dimension with a stride is copied first, as
    SDPA itself would (Torus Attention passes the caller's tensors on as they are).
    A kernel that returns no LSE (``pick_final_kernel``) gives None for it here too."""
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    if keep is None:
        return attend(q, k, v, scale)
    outs, lses = [], []
    for b in range(q.shape[0]):
        kept = keep[b].nonzero().squeeze(1)
        qb = q[b:b + 1]
        if kept.numel() == 0:
            outs.append(torch.zeros_like(qb))
            lses.append(torch.full(qb.shape[:3], float("-inf"), dtype=torch.float32, device=q.device))
            continue
        out, lse = attend(qb, k[b:b + 1].index_select(2, kept), v[b:b + 1].index_select(2, kept), scale)
        outs.append(out)
        lses.append(None if lse is None else lse.float())
    if any(lse is None for lse in lses):
        return torch.cat(outs), None
    return torch.cat(outs), torch.cat(lses)
