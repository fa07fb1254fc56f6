"""Run from ``swiftfusion_xdit.pth`` at interpreter start-up: adds ``--sp-strategy``
to xfuser's parser as soon as xfuser's args module is imported.

A top-level module, not part of the ``swiftfusion_xdit`` package, because
every Python process in the environment runs it: importing the package would
import torch at every start. Here only ``importlib`` is imported, and nothing
of ours or of xfuser until xfuser's args module loads. Opt out with
``SWIFTFUSION_XDIT_DISABLE=1``.
"""

import importlib.abc
import importlib.util
import os
import sys

_TARGET = "xfuser.config.args"


class _InstallAfterXfuserArgs(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name != _TARGET:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        load = spec.loader.exec_module

        def exec_module(module):
            load(module)
            from swiftfusion_xdit.xfuser_integration import install
            install()

        spec.loader.exec_module = exec_module
        return spec


def register() -> None:
    if os.environ.get("SWIFTFUSION_XDIT_DISABLE") == "1":
        return
    if _TARGET in sys.modules:
        from swiftfusion_xdit.xfuser_integration import install
        install()
    elif not any(isinstance(f, _InstallAfterXfuserArgs) for f in sys.meta_path):
        sys.meta_path.insert(0, _InstallAfterXfuserArgs())


register()
