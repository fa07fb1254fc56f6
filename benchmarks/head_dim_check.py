"""CUDA's LSE kernels at head dims that are not multiples of 8 (one GPU, correctness only).

    python benchmarks/head_dim_check.py --out benchmarks/results/head_dims/

cuDNN, flash and memory-efficient attention refuse such head dims;
``block_attention.pick_kernel`` zero-pads them. For each head dim, dtype and
kernel this compares the output and the log-sum-exp with float64 attention,
and an exact two-block merge (two key halves) with attention over all keys.
"""

from __future__ import annotations

import argparse
import json
import os

import torch

from accuracy import rel_err
from swiftfusion_xdit.block_attention import KERNELS, merge_into, pick_kernel

TOL = {torch.bfloat16: 2e-2, torch.float16: 5e-3}


def check(d: int, dtype, name: str) -> dict:
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
    return {**row, **{f"rel_err_{k}": v for k, v in errs.items()},
            "ok": max(errs.values()) < TOL[dtype]}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    args = ap.parse_args()
    rows = [check(d, dtype, name) for d in (36, 40, 72, 100, 128) for dtype in (torch.bfloat16, torch.float16)
            for name in ("auto", "cudnn", "flash", "efficient")]
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "cudnn": torch.backends.cudnn.version(), "rows": rows,
              "passed": sum(r["ok"] for r in rows), "cases": len(rows)}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "head_dims.json"), "w") as f:
        json.dump(result, f, indent=2)
    lines = [f"# LSE kernels at any head dim, {result['device']} (torch {result['torch']}, cuDNN {result['cudnn']})",
             "", f"{result['passed']} of {result['cases']} within tolerance (bf16 2e-2, fp16 5e-3) of float64.", "",
             "| head dim | dtype | kernel | out | lse | two blocks merged | ok |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['head_dim']} | {r['dtype']} | {r['kernel']} | {r['error']} | | | no |")
        else:
            lines.append(f"| {r['head_dim']} | {r['dtype']} | {r['kernel']} | {r['rel_err_out']:.1e} | "
                         f"{r['rel_err_lse']:.1e} | {r['rel_err_merged']:.1e} | {'yes' if r['ok'] else 'no'} |")
    with open(os.path.join(args.out, "head_dims.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
