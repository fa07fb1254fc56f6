"""The one error measure every check and benchmark reports."""

from __future__ import annotations

import torch


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64; infinite where ``out`` is not finite, so that
    a NaN fails every ``< tolerance`` test and wins every ``max`` over ranks or cases."""
    out, ref = out.double(), ref.double()
    if not torch.isfinite(out).all():
        return float("inf")
    return ((out - ref).norm() / ref.norm()).item()
