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


class _AfterImport(importlib.abc.MetaPathFinder):
    def __init__(self, name, callback):
        self.name, self.callback = name, callback

    def find_spec(self, name, path=None, target=None):
        if name != self.name:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        load = spec.loader.exec_module

        def exec_module(module):
            load(module)
            self.callback(module)

        spec.loader.exec_module = exec_module
        return spec


def run_after_import(name: str, callback) -> None:
    """Call ``callback(module)`` once module ``name`` has been imported (now, if it has)."""
    if name in sys.modules:
        callback(sys.modules[name])
    elif not any(isinstance(f, _AfterImport) and f.name == name for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterImport(name, callback))


def _install(_module) -> None:
    from swiftfusion_xdit.xfuser_integration import install
    install()


if os.environ.get("SWIFTFUSION_XDIT_DISABLE") != "1":
    run_after_import("xfuser.config.args", _install)
