"""The one-launch LSE merge on a GPU: equal to the PyTorch form, and what it saves.

    python benchmarks/merge_check.py --out benchmarks/results/merge/

Checks, on fresh random inputs: the Triton merge (``kernels/lse_merge.py``)
against the PyTorch ops it replaces (rows with no keys included), and four
cuDNN key blocks merged with it against one cuDNN attention over every key
(bf16 tolerance). Times one merge of each form at the block shapes Torus
Attention's ``a2a`` exchange merges at Flux 1024² and 2048² on four machines
(6 heads, slots of S/4 tokens): GPU time (CUDA events over back-to-back calls)
and host time to issue one call (no synchronisation inside the loop).
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

from accuracy import rel_err
from swiftfusion_xdit import block_attention
from swiftfusion_xdit.block_attention import merge_into, pick_kernel
from timing import median_ms


def merged(fused: bool, out, lse, block_out, block_lse):
    block_attention.fused_merge = fused
    out, lse = out.clone(), lse.clone()
    merge_into(out, lse, block_out, block_lse)
    return out, lse


def random_case(rows: int, heads: int = 6, dim: int = 128, dtype=torch.bfloat16):
    out = torch.randn(1, heads, rows, dim, device="cuda")
    lse = torch.randn(1, heads, rows, device="cuda") * 3
    block_out = torch.randn(1, heads, rows, dim, device="cuda").to(dtype)
    block_lse = torch.randn(1, heads, rows, device="cuda") * 3
    lse[:, :, 0] = float("-inf")  # no keys yet in this row
    out[:, :, 0] = 0
    block_lse[:, :, 1] = float("-inf")  # the block has no key for this row
    block_lse[:, :, 2] = float("-inf")  # neither side has one
    lse[:, :, 2] = float("-inf")
    out[:, :, 2] = 0
    return out, lse, block_out, block_lse


def check_equal_to_pytorch(rows: int) -> dict:
    case = random_case(rows)
    (fo, fl), (to, tl) = merged(True, *case), merged(False, *case)
    finite = torch.isfinite(tl)
    return {"rows": rows, "max_abs_out": (fo - to).abs().max().item(),
            "max_abs_lse": (fl[finite] - tl[finite]).abs().max().item(),
            "empty_rows_kept": bool(torch.isneginf(fl[:, :, 2]).all() and (fo[:, :, 2] == 0).all()),
            "ok": torch.allclose(fo, to, rtol=1e-5, atol=1e-5) and torch.equal(torch.isneginf(fl), torch.isneginf(tl))
            and torch.allclose(fl[finite], tl[finite], rtol=1e-5, atol=1e-5)}


def check_blocks_equal_full_attention(tokens: int) -> dict:
    q, k, v = (torch.randn(1, 6, tokens, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    attend = pick_kernel(q)
    block_attention.fused_merge = True
    out = torch.zeros(q.shape, device="cuda")
    lse = torch.full(q.shape[:3], float("-inf"), device="cuda")
    for kb, vb in zip(k.split(tokens // 4, dim=2), v.split(tokens // 4, dim=2)):
        merge_into(out, lse, *attend(q, kb, vb, 128 ** -0.5))
    full, _ = attend(q, k, v, 128 ** -0.5)
    rel = rel_err(out.to(q.dtype), full)
    return {"tokens": tokens, "rel_err": rel, "ok": rel < 2e-2}


def time_merge(fused: bool, rows: int) -> dict:
    out, lse, block_out, block_lse = random_case(rows)
    block_attention.fused_merge = fused
    call = lambda: merge_into(out, lse, block_out, block_lse)
    gpu_ms = median_ms(call, repeats=20, inner=20)
    torch.cuda.synchronize()
    host = []
    for _ in range(10):
        start = time.perf_counter()
        for _ in range(20):
            call()
        host.append((time.perf_counter() - start) / 20 * 1e6)
        torch.cuda.synchronize()
    return {"form": "fused" if fused else "torch", "rows": rows, "gpu_us": gpu_ms * 1e3,
            "host_us": sorted(host)[len(host) // 2]}


def write_table(result: dict, path: str) -> None:
    lines = [f"# LSE merge, one Triton launch vs PyTorch ops, {result['device']}", "",
             f"Equal to the PyTorch form and to full attention: {'yes' if result['ok'] else 'NO'}.",
             "GPU us: CUDA-event time per merge over 20 back-to-back merges (a launch-bound "
             "merge shows the host's issue rate here); host us: time to issue one merge.", "",
             "| rows (6 heads, dim 128) | form | GPU us | host us |", "|---|---|---|---|"]
    lines += [f"| {t['rows']} | {t['form']} | {t['gpu_us']:.1f} | {t['host_us']:.1f} |" for t in result["timing"]]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--table-only", action="store_true", help="rewrite the table from OUT's JSON")
    args = ap.parse_args()
    if args.table_only:
        folder = args.out
        write_table(json.load(open(os.path.join(folder, "merge_check.json"))),
                    os.path.join(folder, "merge_check.md"))
        return 0
    if block_attention._fused_kernel() is None:  # else "fused" would silently be the PyTorch form
        raise SystemExit("the Triton merge did not import: is triton installed?")
    slot = {1024: 4608 // 4, 2048: 16896 // 4}  # tokens per machine at four machines
    result = {"device": torch.cuda.get_device_name(),
              "equal_to_pytorch": [check_equal_to_pytorch(r) for r in (3, 77, 1152, 3456, 12672)],
              "blocks_equal_full": [check_blocks_equal_full_attention(t) for t in (4608, 16896)],
              "timing": [time_merge(f, slot[s] * n) for s in slot for n in (1, 3) for f in (False, True)]}
    result["ok"] = all(c["ok"] for c in result["equal_to_pytorch"] + result["blocks_equal_full"])
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "merge_check.json"), "w") as f:
        json.dump(result, f, indent=2)
    write_table(result, os.path.join(args.out, "merge_check.md"))
    print(json.dumps(result, indent=2))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
