"""Which attention kernel that returns the log-sum-exp is fastest, per shape (one GPU).

    python benchmarks/attention_kernels.py --out benchmarks/results/kernels/

Torus Attention needs each block's LSE to merge blocks exactly, so it calls
one of cuDNN, flash or memory-efficient attention through
``swiftfusion_xdit.block_attention``; ``pick_kernel`` takes the first that
runs. This times all three (and PyTorch's own SDPA choice, which returns no
LSE, for scale) on the shapes one GPU sees after the Ulysses all-to-all:
FLUX.1-dev's 24 heads split 1, 2, 4 and 8 ways, 1024² and 2048² with the
512 text tokens, head dim 128, bf16. Median of repeats; outputs checked
against each other.
"""

from __future__ import annotations

import argparse
import json
import os

import torch
import torch.nn.functional as F

from swiftfusion_xdit.block_attention import KERNELS
from timing import median_ms as time_ms


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    args = ap.parse_args()
    rows = []
    for tokens in (4096 + 512, 16384 + 512):
        for split in (1, 2, 4, 8):
            heads = 24 // split
            q, k, v = (torch.randn(1, heads, tokens, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
            row = {"tokens": tokens, "heads": heads}
            ref = F.scaled_dot_product_attention(q, k, v)
            row["sdpa_auto_ms"] = time_ms(lambda: F.scaled_dot_product_attention(q, k, v))
            for name in ("cudnn", "flash", "efficient"):
                kernel = KERNELS[name][0]
                out, _ = kernel(q, k, v, 128 ** -0.5)
                row[f"{name}_max_abs_diff"] = (out.float() - ref.float()).abs().max().item()
                row[f"{name}_ms"] = time_ms(lambda: kernel(q, k, v, 128 ** -0.5))
            rows.append(row)
            print(json.dumps(row), flush=True)
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "attention_kernels.json"), "w") as f:
        json.dump(result, f, indent=2)
    lines = [f"# Attention kernels with LSE, {result['device']}, bf16, head dim 128", "",
             "| tokens | heads | cuDNN ms | flash ms | efficient ms | SDPA auto (no LSE) ms |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['tokens']} | {r['heads']} | {r['cudnn_ms']:.3f} | {r['flash_ms']:.3f} | "
                     f"{r['efficient_ms']:.3f} | {r['sdpa_auto_ms']:.3f} |")
    with open(os.path.join(args.out, "attention_kernels.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
