"""GPU tests: the device checks, as tests. ``pytest tests/gpu`` on a GPU machine.

Without CUDA every test here is skipped, for that one reason. With it:

* in-process tests run on one GPU: the one-sided kernels on virtual ranks, the LSE
  kernels, Torus Attention with one thread per rank;
* worker tests launch ``_worker_*.py`` (or a benchmark) under torchrun and assert on the
  JSON it writes: NVSHMEM across processes (four sharing one GPU under CUDA MPS, or one
  per GPU), Torus Attention on two emulated machines, the diffusers path on N GPUs.

A test marked ``gpus(n)`` is skipped with "needs n GPUs" where fewer are present, one
marked ``nvshmem`` where nvshmem4py is not installed; the ``mps`` fixture skips where
CUDA MPS is not installed, and otherwise starts the MPS daemon for its tests and stops it
after them (unless ``CUDA_MPS_PIPE_DIRECTORY`` is set: then the caller runs one).

``SWIFTFUSION_GPU_RESULTS=DIR``: tests also write their results under DIR (JSON, and a
Markdown table where the check made one), and the workers their logs.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
BENCH = ROOT / "benchmarks"
sys.path.insert(0, str(BENCH))  # accuracy, timing, kernel_speed, rank_compute, ...

# Multi-GPU hosts are shared: NVLink multicast (NVLS) can take every GPU of the host out
# of service, so no process started here may use it.
NO_MULTICAST = {"NVSHMEM_DISABLE_NVLS": "1", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NCCL_NVLS_ENABLE": "0"}


def pytest_configure(config):
    config.addinivalue_line("markers", "gpus(n): needs n CUDA GPUs")
    config.addinivalue_line("markers", "nvshmem: needs nvshmem4py (the one-sided transport)")


def pytest_collection_modifyitems(items):
    """Worker tests first: their processes then find the GPU without this process's CUDA
    context and cached memory, and the MPS daemon (test_gpu_nvshmem.py) has stopped before
    this process makes a context outside MPS."""
    ours = [i for i, item in enumerate(items) if HERE in item.path.parents]
    ordered = sorted((items[i] for i in ours), key=lambda item: "torchrun" not in item.fixturenames)
    for i, item in zip(ours, ordered):
        items[i] = item


def pytest_runtest_setup(item):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU (torch.cuda.is_available() is false)")
    marker = item.get_closest_marker("gpus")
    if marker and torch.cuda.device_count() < marker.args[0]:
        pytest.skip(f"needs {marker.args[0]} GPUs ({torch.cuda.device_count()} here)")
    if item.get_closest_marker("nvshmem") and importlib.util.find_spec("nvshmem") is None:
        pytest.skip("needs nvshmem4py: pip install 'swiftfusion-xdit[nvshmem]'")


@pytest.fixture
def out_dir(tmp_path) -> Path:
    """Where this test's results go: SWIFTFUSION_GPU_RESULTS if set, else a temporary folder."""
    folder = os.environ.get("SWIFTFUSION_GPU_RESULTS")
    if not folder:
        return tmp_path
    os.makedirs(folder, exist_ok=True)
    return Path(folder)


@pytest.fixture
def record(out_dir):
    """record(name, result, lines=None): ``name.json`` (and ``name.md`` from ``lines``)."""
    def write(name: str, result: dict, lines: list[str] | None = None) -> None:
        (out_dir / f"{name}.json").write_text(json.dumps(result, indent=2))
        if lines:
            (out_dir / f"{name}.md").write_text("\n".join(lines) + "\n")
    return write


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def torchrun(out_dir):
    """run(script, nproc, *args, log=..., env=..., timeout=..., retry_if=None): the script (a
    name in tests/gpu or a path) on ``nproc`` ranks with ``--out OUT_DIR`` appended; asserts
    that every rank exited 0 (the log's tail in the message) and returns OUT_DIR.
    ``retry_if``: a log line that marks a failed start of the launch itself, not of the code
    under test: then it runs once more (with a warning; the first log kept as LOG.first.log)."""
    def launch(cmd, env, log_path, timeout) -> int:
        with open(log_path, "w") as f:
            launcher = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
            try:
                return launcher.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                # SIGTERM, not SIGKILL: torchrun then stops its workers, which would keep the GPU
                launcher.send_signal(signal.SIGTERM)
                try:
                    launcher.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    launcher.kill()
                pytest.fail(f"{cmd[4]} ran past {timeout} s:\n{log_path.read_text()[-6000:]}")

    def run(script, nproc: int, *args, log: str, env: dict | None = None, timeout: int = 300,
            retry_if: str | None = None) -> Path:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
               f"--master-port={_free_port()}", str(HERE / script), *map(str, args), "--out", str(out_dir)]
        paths = os.pathsep.join([str(ROOT), str(BENCH), str(HERE), os.environ.get("PYTHONPATH", "")])
        full_env = {**os.environ, **NO_MULTICAST, "PYTHONPATH": paths, "PYTHONUNBUFFERED": "1", **(env or {})}
        log_path = out_dir / f"{log}.log"
        rc = launch(cmd, full_env, log_path, timeout)
        if rc != 0 and retry_if and retry_if in log_path.read_text():
            warnings.warn(f"{script}: {retry_if!r}; running it once more")
            log_path.rename(out_dir / f"{log}.first.log")
            rc = launch(cmd, full_env, log_path, timeout)
        assert rc == 0, f"{script} exited with {rc}:\n{log_path.read_text()[-6000:]}"
        return out_dir
    return run


@pytest.fixture(scope="module")
def mps():
    """The environment for worker processes that share one GPU under CUDA MPS. MPS lets
    kernels of different processes run at once; without it the NVSHMEM kernels, which spin
    on each other's flags, would take turns on the GPU and never finish. The daemon runs
    for the module's tests only, so no process outside MPS shares the GPU with its server."""
    control = shutil.which("nvidia-cuda-mps-control")
    if control is None:
        pytest.skip("needs CUDA MPS (nvidia-cuda-mps-control not on PATH)")
    client = {"CUDA_MPS_ACTIVE_THREAD_PERCENTAGE": "25"}  # a quarter of the SMs each, as four GPUs' share
    if os.environ.get("CUDA_MPS_PIPE_DIRECTORY"):  # the caller runs a daemon already
        yield client
        return
    if "CUDA_VISIBLE_DEVICES" not in os.environ and torch.cuda.device_count() > 1:
        client["CUDA_VISIBLE_DEVICES"] = "0"  # one GPU shared, as on a one-GPU machine
    folder = tempfile.mkdtemp(prefix="mps-")  # short: the daemon's socket path has a length limit
    daemon = {"CUDA_MPS_PIPE_DIRECTORY": f"{folder}/pipe", "CUDA_MPS_LOG_DIRECTORY": f"{folder}/log"}
    for path in daemon.values():
        os.makedirs(path)
    subprocess.run([control, "-d"], env={**os.environ, **daemon}, check=True)
    try:
        yield {**client, **daemon}
    finally:
        subprocess.run([control], input="quit\n", text=True, env={**os.environ, **daemon})
        shutil.rmtree(folder, ignore_errors=True)
