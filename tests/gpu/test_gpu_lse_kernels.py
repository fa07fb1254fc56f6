"""CUDA's log-sum-exp attention kernels and the fused LSE merge, on one GPU.

The CPU runs of the same comparisons: tests/test_lse_merge.py (the merge kernel under
Triton's interpreter) and tests/test_torus_attention.py; the merge's speed is
benchmarks/kernel_speed.py.
"""

import pytest
import torch

from accuracy import rel_err

HEAD_DIM_TOL = {torch.bfloat16: 2e-2, torch.float16: 5e-3}


def head_dim_row(d: int, dtype, name: str) -> dict:
    """Kernel ``name`` at head dim ``d``: its output and LSE against float64 attention, and two
    key halves merged exactly against attention over all keys."""
    from swiftfusion_xdit.block_attention import KERNELS, merge_into, pick_kernel
    g = torch.Generator(device="cuda").manual_seed(d)
    q, k, v = (torch.randn(2, 3, 257, d, device="cuda", dtype=dtype, generator=g) for _ in range(3))
    scale = d ** -0.5
    want, want_lse = KERNELS["math"][0](q.double(), k.double(), v.double(), scale)
    row = {"head_dim": d, "dtype": str(dtype).split(".")[1], "kernel": name}
    try:
        attend = pick_kernel(q, name)
        out, lse = attend(q, k, v, scale)
        acc = torch.zeros(q.shape, device="cuda"), torch.full(q.shape[:3], float("-inf"), device="cuda")
        for half in (slice(0, 128), slice(128, None)):
            block_out, block_lse = attend(q, k[:, :, half], v[:, :, half], scale)
            merge_into(*acc, block_out, block_lse.float())
    except Exception as err:  # noqa: BLE001 -- the row says what failed
        return {**row, "ok": False, "error": f"{type(err).__name__}: {err}"[:300]}
    errs = {"out": rel_err(out, want), "lse": rel_err(lse, want_lse), "merged": rel_err(acc[0], want)}
    return {**row, **{f"rel_err_{k}": v for k, v in errs.items()}, "ok": max(errs.values()) < HEAD_DIM_TOL[dtype]}


def test_lse_kernels_at_head_dims_that_are_not_multiples_of_8(record):
    """cuDNN, flash and memory-efficient attention refuse such head dims;
    ``block_attention.pick_kernel`` zero-pads them. Every kernel, each dtype, five head dims."""
    rows = [head_dim_row(d, dtype, name) for d in (36, 40, 72, 100, 128)
            for dtype in (torch.bfloat16, torch.float16) for name in ("auto", "cudnn", "flash", "efficient")]
    device = torch.cuda.get_device_name()
    lines = [f"# LSE kernels at any head dim, {device} (torch {torch.__version__}, "
             f"cuDNN {torch.backends.cudnn.version()})", "",
             f"{sum(r['ok'] for r in rows)} of {len(rows)} within tolerance (bf16 2e-2, fp16 5e-3) of float64.", "",
             "| head dim | dtype | kernel | out | lse | two blocks merged | ok |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['head_dim']} | {r['dtype']} | {r['kernel']} | {r['error']} | | | no |" if "error" in r else
              f"| {r['head_dim']} | {r['dtype']} | {r['kernel']} | {r['rel_err_out']:.1e} | "
              f"{r['rel_err_lse']:.1e} | {r['rel_err_merged']:.1e} | {'yes' if r['ok'] else 'no'} |" for r in rows]
    record("head_dims", {"device": device, "torch": torch.__version__, "rows": rows}, lines)
    assert all(r["ok"] for r in rows), [r for r in rows if not r["ok"]]


@pytest.fixture
def block_attention(monkeypatch):
    """The module, with its Triton merge there (else "fused" would silently be the PyTorch
    form); its ``fused_merge`` switch is restored after the test."""
    from swiftfusion_xdit import block_attention
    assert block_attention._fused_kernel() is not None, "the Triton merge did not import: is triton installed?"
    monkeypatch.setattr(block_attention, "fused_merge", block_attention.fused_merge)
    return block_attention


def merged(block_attention, fused: bool, out, lse, block_out, block_lse):
    """Copies of (out, lse) with the block merged in by the Triton kernel or the PyTorch ops."""
    block_attention.fused_merge = fused
    out, lse = out.clone(), lse.clone()
    block_attention.merge_into(out, lse, block_out, block_lse)
    return out, lse


@pytest.mark.parametrize("rows", (3, 77, 1152, 3456, 12672))
def test_fused_merge_equals_the_pytorch_form(block_attention, rows):
    """Fresh random inputs, with a row no key has reached yet, one the block has no key
    for, and one neither has (it must stay at -inf and 0, not become NaN)."""
    heads, dim = 6, 128
    out = torch.randn(1, heads, rows, dim, device="cuda")
    lse = torch.randn(1, heads, rows, device="cuda") * 3
    block_out = torch.randn(1, heads, rows, dim, device="cuda").to(torch.bfloat16)
    block_lse = torch.randn(1, heads, rows, device="cuda") * 3
    lse[:, :, 0], out[:, :, 0] = float("-inf"), 0  # no keys yet in this row
    block_lse[:, :, 1] = float("-inf")  # the block has no key for this row
    block_lse[:, :, 2], lse[:, :, 2], out[:, :, 2] = float("-inf"), float("-inf"), 0  # neither side
    case = (out, lse, block_out, block_lse)
    (fo, fl), (to, tl) = merged(block_attention, True, *case), merged(block_attention, False, *case)
    finite = torch.isfinite(tl)
    assert torch.allclose(fo, to, rtol=1e-5, atol=1e-5)
    assert torch.equal(torch.isneginf(fl), torch.isneginf(tl))
    assert torch.allclose(fl[finite], tl[finite], rtol=1e-5, atol=1e-5)
    assert torch.isneginf(fl[:, :, 2]).all() and (fo[:, :, 2] == 0).all()


@pytest.mark.parametrize("tokens", (4608, 16896))
def test_four_key_blocks_merged_equal_one_attention_over_all_keys(block_attention, tokens):
    """cuDNN attention on four key blocks, merged by the Triton kernel."""
    q, k, v = (torch.randn(1, 6, tokens, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    attend = block_attention.pick_kernel(q)
    block_attention.fused_merge = True
    out = torch.zeros(q.shape, device="cuda")
    lse = torch.full(q.shape[:3], float("-inf"), device="cuda")
    for kb, vb in zip(k.split(tokens // 4, dim=2), v.split(tokens // 4, dim=2)):
        block_attention.merge_into(out, lse, *attend(q, kb, vb, 128 ** -0.5))
    full, _ = attend(q, k, v, 128 ** -0.5)
    assert rel_err(out.to(q.dtype), full) < 2e-2
