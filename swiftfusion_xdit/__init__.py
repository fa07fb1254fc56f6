"""swiftfusion-xdit: topology-aware sequence parallelism (Torus Attention) for xDiT and diffusers."""

from swiftfusion_xdit_autoload import run_after_import

from .mesh import LayoutError, ParallelDims, TorusLayout, build_mesh, plan_layout
from .topology import Topology, detect_topology
from .torus_attention import Joint, SPGroups, torus_attention

__version__ = "0.1.0"


def enable_parallel(pipe, strategy: str = "torus", **kwargs):
    """``swiftfusion_xdit.enable_parallel(pipe, ...)``: see ``diffusers_integration.enable_parallel``."""
    from .diffusers_integration import enable_parallel as _enable
    return _enable(pipe, strategy, **kwargs)


def _add_enable_parallel(module) -> None:
    module.DiffusionPipeline.enable_parallel = enable_parallel


# Importing diffusers' pipelines costs seconds, so we do not import them
# ourselves; the method is added whenever (and if ever) they are imported.
run_after_import("diffusers.pipelines.pipeline_utils", _add_enable_parallel)
