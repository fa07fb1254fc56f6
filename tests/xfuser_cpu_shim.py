"""Let xfuser 0.7.0's config and layer modules import on a CPU-only machine.

xfuser computes ``CUDA_VERSION`` at import time from
``xfuser.envs.get_device_version()``, which raises when no accelerator is
present. This shim makes that one function return ``None`` (what xfuser itself
returns on MPS and NPU), nothing else. Tests that use it cover argument
parsing, config flow, the process-group layout and the routing of ``USP(...)``
on gloo ranks; they do not cover xfuser's GPU pipelines, which run on the
device machine (benchmarks/xdit_device_check.py).

Import this module before anything imports xfuser.
"""

import importlib.abc
import importlib.util
import sys


class _ReturnNoDeviceVersion(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name != "xfuser.envs":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        load = spec.loader.exec_module

        def exec_module(module):
            load(module)
            module.get_device_version = lambda: None

        spec.loader.exec_module = exec_module
        return spec


if "xfuser.envs" not in sys.modules:
    sys.meta_path.insert(0, _ReturnNoDeviceVersion())
