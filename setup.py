"""Only here to ship swiftfusion_xdit.pth at the top of site-packages (the
start-up hook that adds --sp-strategy to xfuser); everything else is in
pyproject.toml."""

import os

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildPyWithStartupHook(build_py):
    def run(self):
        super().run()
        self.copy_file("swiftfusion_xdit.pth", os.path.join(self.build_lib, "swiftfusion_xdit.pth"))

    def get_outputs(self, include_bytecode=True):
        return super().get_outputs(include_bytecode) + [os.path.join(self.build_lib, "swiftfusion_xdit.pth")]


setup(cmdclass={"build_py": BuildPyWithStartupHook})
