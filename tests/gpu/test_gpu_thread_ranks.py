"""Torus Attention on every grid up to 8 ranks, one thread per rank on one GPU, against
plain attention; and the whole FLUX.1-dev transformer so sharded, against its unsharded
forward. How, and what it does not check: thread_ranks.py."""

import torch

import thread_ranks

# machines x GPUs per machine; each with kv, a2a where the heads split, kv/hc2 on one machine
GRIDS = "1x2,2x1,2x2,1x4,4x1,3x1,2x4,4x2,8x1"


def failed(rows: list[dict]) -> list[dict]:
    return [r for r in rows if not r["ok"]]


def record_and_check(record, name: str, what: str, rows: list[dict]) -> None:
    """The rows' table under the results folder, then every row within tolerance."""
    device = torch.cuda.get_device_name()
    record(name, {"device": device, "rows": rows, "ok": not failed(rows)}, thread_ranks.table(device, what, rows))
    assert not failed(rows), failed(rows)


def test_every_grid_matches_float64_attention(record):
    rows = thread_ranks.attention_rows(GRIDS, "cuda")
    record_and_check(record, "thread_ranks_check", "Every rank's output shard against float64 attention "
                     "over the whole sequence (bf16 within 2e-2)", rows)


# the clusters users run, 24 heads (FLUX, HunyuanVideo) and 40 (Wan 2.1): kv and a2a-kv
LARGE_GRIDS = "2x8,4x8"


def test_large_grids_with_24_and_40_heads_match_float64_attention(record):
    rows = [r for heads in (24, 40) for r in thread_ranks.attention_rows(LARGE_GRIDS, "cuda", heads=heads)]
    assert {r["exchange"] for r in rows} == {"kv", "a2a-kv"}
    record_and_check(record, "thread_ranks_large", "2x8 and 4x8 grids, 24 and 40 heads, head dim 128: every "
                     "rank's output shard against float64 attention over the whole sequence (bf16 within 2e-2)", rows)


def test_whole_flux_on_every_grid_matches_the_unsharded_forward(record):
    rows = thread_ranks.flux_rows("1024,2048", GRIDS, "cuda")
    assert {r["size"] for r in rows} == {"1024", "2048"}
    record_and_check(record, "thread_ranks_flux", "FLUX.1-dev transformer (real config, random bf16 weights), "
                     "1024² and 2048²: the image shards of all ranks joined, against the unsharded forward "
                     "(bf16 within 2e-2)", rows)
