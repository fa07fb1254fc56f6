"""The NVSHMEM transport across real processes, one NVSHMEM PE each: the workers run under
torchrun and the tests assert on the JSON they write (what each worker checks, and how:
_worker_nvshmem_transport.py, _worker_shared_gpu.py).

On a one-GPU machine four processes share the GPU under CUDA MPS (the ``mps`` fixture
starts and stops the daemon); with several GPUs the same checks also run one rank per GPU.
"""

import json
import re

import pytest
import torch

pytestmark = pytest.mark.nvshmem


def test_all_to_all_equals_nccls_and_the_heap_refuses_what_cannot_fit(torchrun):
    out = torchrun("_worker_nvshmem_transport.py", torch.cuda.device_count(), log="kernel_nvshmem", timeout=240)
    result = json.loads((out / "kernel_nvshmem.json").read_text())
    checks = result["nvshmem_transport"]  # Flux 2048² and 1024², bf16 and fp16
    assert len(checks) == 4 and all(c["bit_exact"] for c in checks), checks
    refused = result["heap"]["oversize_refused"]  # says what the problem needs, and what is free
    assert refused and re.search(r"needs \d+ MiB .* only \d+ MiB of GPU memory is free", refused), refused


# NVSHMEM's start under MPS asks the MPS control daemon about every PE at once; now and then
# one PE's query goes unanswered ("Cannot send command to MPS control daemon process") and
# NVSHMEM aborts its start (one H200, 2026-12-04: 2 of 7 two-machine launches). That is the
# launch failing, not the transport: such a launch runs once more.
MPS_START_FAILED = "call to nvshmemi_determine_mpg_support_level failed"


def shared_gpu_checks(torchrun, ranks: int, machines: int, env=None) -> dict:
    """Run _worker_shared_gpu.py and assert on every check it made; its result."""
    name = f"shared_gpu_{ranks}ranks_{machines}machines"
    args = ["--machines", machines] + (["--diffusers"] if machines == 1 else [])
    out = torchrun("_worker_shared_gpu.py", ranks, *args, log=name, env=env, timeout=300,
                   retry_if=MPS_START_FAILED if env else None)
    result = json.loads((out / f"{name}.json").read_text())
    (out / f"{name}.md").write_text(table(result))
    # one machine: 4 all-to-alls, a torus step, 3 attention checks, CUDA graph, compiled, diffusers;
    # two machines: the torus needs NCCL between them, so the all-to-alls and a torus step
    assert len(result["checks"]) == (11 if machines == 1 else 5), result["checks"]
    failed = [c for c in result["checks"] if not c.get("bit_exact", True) or not c.get("pass", True)]
    assert not failed, failed
    assert len(result["nvshmem_jobs"]) == machines  # NVSHMEM runs one job per machine
    return result


@pytest.mark.gpus(2)
def test_one_process_per_gpu(torchrun):
    shared_gpu_checks(torchrun, torch.cuda.device_count(), 1)


# after the tests without MPS: the daemon runs from the first of these to the module's end
@pytest.mark.parametrize("machines", (1, 2))
def test_four_processes_sharing_one_gpu(torchrun, mps, machines):
    shared_gpu_checks(torchrun, 4, machines, env=mps)


def table(result: dict) -> str:
    lines = [f"# NVSHMEM transport, {result['world']} processes on {result['device']}", "",
             "One process per rank, one NVSHMEM PE each (`tests/gpu/_worker_shared_gpu.py`); "
             "references from CPU copies over gloo.", "",
             "| ranks | machines (NVSHMEM jobs) | check | size | dtype | result |", "|---|---|---|---|---|---|"]
    for c in result["checks"]:
        size = c.get("tokens") or c.get("image_tokens") or ""
        verdict = ("bit-exact" if c["bit_exact"] else "DIFFERS") if "bit_exact" in c else \
            f"rel err {c['max_rel_err']:.1e}" + (f" (joint {c['max_joint_rel_err']:.1e})"
                                                 if "max_joint_rel_err" in c else "")
        if "cudagraph_skips" in c:
            verdict += f", CUDA-graph skips: {c['cudagraph_skips']}"
        lines.append(f"| {result['world']} | {result['machines']} ({len(result['nvshmem_jobs'])}) | {c['what']} "
                     f"| {size} | {c.get('dtype', 'torch.bfloat16').replace('torch.', '')} | {verdict} |")
    return "\n".join(lines) + "\n"
