"""swiftfusion-xdit: topology-aware sequence parallelism (Torus Attention) for xDiT and diffusers."""

import importlib.abc
import importlib.util
import sys

from .mesh import LayoutError, ParallelDims, TorusLayout, build_mesh, plan_layout
from .topology import Topology, detect_topology
from .torus_attention import Joint, SPGroups, torus_attention

__version__ = "0.1.0"


def enable_parallel(pipe, strategy: str = "torus", **kwargs):
    """``swiftfusion_xdit.enable_parallel(pipe, ...)``: see ``diffusers_integration.enable_parallel``."""
    from .diffusers_integration import enable_parallel as _enable
    return _enable(pipe, strategy, **kwargs)


_PIPELINE_MODULE = "diffusers.pipelines.pipeline_utils"


class _AddEnableParallel(importlib.abc.MetaPathFinder):
    """Give DiffusionPipeline an ``enable_parallel`` method once diffusers loads it.

    Importing diffusers' pipelines costs seconds, so we do not import them
    ourselves; this adds the method whenever (and if ever) they are imported.
    """

    def find_spec(self, name, path=None, target=None):
        if name != _PIPELINE_MODULE:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        load = spec.loader.exec_module

        def exec_module(module):
            load(module)
            module.DiffusionPipeline.enable_parallel = enable_parallel

        spec.loader.exec_module = exec_module
        return spec


if _PIPELINE_MODULE in sys.modules:
    sys.modules[_PIPELINE_MODULE].DiffusionPipeline.enable_parallel = enable_parallel
elif importlib.util.find_spec("diffusers") is not None:
    sys.meta_path.insert(0, _AddEnableParallel())
