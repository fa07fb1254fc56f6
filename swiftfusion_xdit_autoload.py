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
    """Calls ``callback(module)`` right after a module named ``name`` (or, with
    ``prefix``, any module under ``name``) has been executed."""

    def __init__(self, name, callback, prefix=False):
        self.name, self.callback, self.prefix = name, callback, prefix
        self._busy = False  # find_spec below re-enters the finders

    def wants(self, name: str) -> bool:
        return name == self.name or (self.prefix and name.startswith(self.name + "."))

    def find_spec(self, name, path=None, target=None):
        if self._busy or not self.wants(name):
            return None
        if not self.prefix:
            sys.meta_path.remove(self)  # once
        self._busy = True
        try:
            spec = importlib.util.find_spec(name)
        finally:
            self._busy = False
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        load = spec.loader.exec_module

        def exec_module(module):
            load(module)
            self.callback(module)

        spec.loader.exec_module = exec_module
        return spec


def _registered(name: str, callback, prefix: bool) -> bool:
    return any(isinstance(f, _AfterImport) and (f.name, f.callback, f.prefix) == (name, callback, prefix)
               for f in sys.meta_path)


def run_after_import(name: str, callback) -> None:
    """Call ``callback(module)`` once module ``name`` has been imported (now, if it has)."""
    if name in sys.modules:
        callback(sys.modules[name])
    elif not _registered(name, callback, False):
        sys.meta_path.insert(0, _AfterImport(name, callback))


def run_after_each_import(package: str, callback) -> None:
    """Call ``callback(module)`` for every module under ``package`` imported from now on."""
    if not _registered(package, callback, True):
        sys.meta_path.insert(0, _AfterImport(package, callback, prefix=True))


def _install(_module) -> None:
    from swiftfusion_xdit.xfuser_integration import install
    install()


def register() -> None:
    """Add the hook unless opted out. Run by ``swiftfusion_xdit.pth`` at start-up and by
    ``import swiftfusion_xdit``; importing this module alone (the test shim does, for
    ``run_after_import``) registers nothing."""
    if os.environ.get("SWIFTFUSION_XDIT_DISABLE") != "1":
        run_after_import("xfuser.config.args", _install)
