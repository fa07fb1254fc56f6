"""Let xfuser 0.7.0's config and layer modules import on a CPU-only machine.

xfuser computes ``CUDA_VERSION`` at import time from
``xfuser.envs.get_device_version()``, which raises when no accelerator is
present. This shim makes that one function return ``None`` (what xfuser itself
returns on MPS and NPU), nothing else. Tests that use it cover argument
parsing, config flow, the process-group layout and the routing of ``USP(...)``
on gloo ranks; they do not cover xfuser's GPU pipelines, which run on the
device machine (benchmarks/xdit_random_flux.py).

Import this module before anything imports xfuser.
"""

from swiftfusion_xdit_autoload import run_after_import


def _no_device_version(envs) -> None:
    envs.get_device_version = lambda: None


run_after_import("xfuser.envs", _no_device_version)
