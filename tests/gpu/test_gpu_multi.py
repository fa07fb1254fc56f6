"""Checks that need a GPU per rank (NCCL refuses two ranks on one GPU): Torus Attention on
two emulated machines, and the diffusers path's strategies, against one GPU."""

import json
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"

pytestmark = pytest.mark.gpus(2)


def test_torus_attention_on_two_emulated_machines_matches_one_gpu(torchrun):
    """Flux 1024² and 2048² attention (+512 text tokens), bf16 and fp16, NCCL's network
    transport between the machines (_worker_torus.py; it also records how much of the
    exchange hid under compute)."""
    gpus = torch.cuda.device_count() // 2 * 2
    out = torchrun("_worker_torus.py", gpus, "--nodes", 2, log=f"torus_check_2x{gpus // 2}", timeout=300)
    checks = json.loads((out / f"torus_check_2x{gpus // 2}_nccl.json").read_text())["checks"]
    assert len(checks) == 4 and all(c["pass"] for c in checks), checks  # rel err < 2e-2, joint too


def test_diffusers_strategies_match_one_gpu(torchrun):
    """FLUX.1-dev (real config, random bf16 weights) at 1024² and 2048², sharded by torus,
    USP, Ulysses and ring (``parallelize_transformer``) on every GPU, against the same model
    unparallelised: within 2e-2. The harness runs the same script for its latencies."""
    gpus = torch.cuda.device_count()
    out = torchrun(BENCH / "flux_device_check.py", gpus, "--nodes", 1, "--repeats", 1,
                   log=f"flux_check_1x{gpus}", timeout=600)
    runs = json.loads((out / f"flux_check_1x{gpus}_nccl.json").read_text())["runs"]
    assert {(r["strategy"], r["size"]) for r in runs} == {(s, size) for s in ("torus", "usp", "ulysses", "ring")
                                                          for size in (1024, 2048)}
    assert all(r["pass"] for r in runs), [(r["strategy"], r["size"], r["rel_err"]) for r in runs]
