"""The checkout on ``sys.path`` must not shadow installed distributions.

``python -m pytest``, ``python -m swiftfusion_xdit.cli`` and torchrun's workers put the
working directory first on ``sys.path``. From the repository root that directory holds
``kernels/``, whose name Hugging Face's ``kernels`` distribution also uses (transformers
imports it). The folder has no ``__init__.py``, so it can never win over an installed
package; our kernels are reached only as ``swiftfusion_xdit.kernels``.
"""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_PROBE = r"""
import importlib.metadata, json, sys
sys.path.insert(0, sys.argv[1])
import swiftfusion_xdit
import swiftfusion_xdit.kernels.lse_merge as merge
import transformers.modeling_utils
from diffusers import FluxPipeline
try:
    dist = importlib.metadata.distribution("kernels")
    installed = str(dist.locate_file("kernels"))
except importlib.metadata.PackageNotFoundError:
    installed = None
from transformers.utils import is_kernels_available
import kernels
print(json.dumps({"merge": merge.__file__, "kernels": getattr(kernels, "__file__", None),
                  "kernels_path": list(getattr(kernels, "__path__", [])), "installed": installed,
                  "transformers_sees_kernels": is_kernels_available()}))
"""


def test_checkout_root_on_sys_path_leaves_installed_packages_alone():
    proc = subprocess.run([sys.executable, "-c", _PROBE, ROOT], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    ours = os.path.join(ROOT, "kernels")
    assert seen["merge"].startswith(ours + os.sep)  # our kernels, under our own name
    if seen["installed"] is not None:  # Hugging Face's kernels is installed: it is what loads
        assert os.path.dirname(seen["kernels"]) == seen["installed"]
    else:  # not installed: nothing of ours poses as it
        assert seen["kernels"] is None and not seen["transformers_sees_kernels"]
