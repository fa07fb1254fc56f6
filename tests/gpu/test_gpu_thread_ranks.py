"""Torus Attention on every grid up to 8 ranks, one thread per rank on one GPU, against
plain attention; and the whole FLUX.1-dev transformer so sharded, against its unsharded
forward. How, and what it does not check: thread_ranks.py."""

import torch

import thread_ranks

# machines x GPUs per machine; each with kv, a2a where the heads split, kv/hc2 on one machine
GRIDS = "1x2,2x1,2x2,1x4,4x1,3x1,2x4,4x2,8x1"


def failed(rows: list[dict]) -> list[dict]:
    return [r for r in rows if not r["ok"]]


def test_every_grid_matches_float64_attention(record):
    rows = thread_ranks.attention_rows(GRIDS, "cuda")
    what = ("Every rank's output shard against float64 attention over the whole sequence "
            "(bf16 within 2e-2)")
    device = torch.cuda.get_device_name()
    record("thread_ranks_check", {"device": device, "rows": rows, "ok": not failed(rows)},
           thread_ranks.table(device, what, rows))
    assert not failed(rows), failed(rows)


def test_whole_flux_on_every_grid_matches_the_unsharded_forward(record):
    rows = thread_ranks.flux_rows("1024,2048", GRIDS, "cuda")
    what = ("FLUX.1-dev transformer (real config, random bf16 weights), 1024² and 2048²: the image "
            "shards of all ranks joined, against the unsharded forward (bf16 within 2e-2)")
    device = torch.cuda.get_device_name()
    record("thread_ranks_flux", {"device": device, "rows": rows, "ok": not failed(rows)},
           thread_ranks.table(device, what, rows))
    assert {r["size"] for r in rows} == {"1024", "2048"}
    assert not failed(rows), failed(rows)
