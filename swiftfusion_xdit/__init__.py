"""swiftfusion-xdit: topology-aware sequence parallelism (Torus Attention) for xDiT and diffusers."""

import importlib.machinery
import importlib.util
import os
import sys

import swiftfusion_xdit_autoload
from swiftfusion_xdit_autoload import run_after_import

from .mesh import LayoutError, ParallelDims, TorusLayout, build_mesh, plan_layout
from .topology import Topology, detect_topology
from .torus_attention import Joint, SPGroups, torus_attention

__version__ = "0.1.0"


def _kernels_from_checkout() -> None:
    """``kernels/`` sits at the repository top and is installed inside the package as
    ``swiftfusion_xdit.kernels`` (pyproject.toml maps it). Imported from a source checkout
    (``python -m pytest`` in the repository), the package finds it there instead.

    ``kernels/`` has no ``__init__.py`` on purpose: with the checkout on ``sys.path`` a
    regular package named ``kernels`` would shadow Hugging Face's ``kernels``
    distribution, which transformers imports. A folder without one never wins over an
    installed package (tests/test_import_isolation.py)."""
    here = os.path.dirname(os.path.abspath(__file__))
    source = os.path.join(os.path.dirname(here), "kernels")
    if os.path.isdir(os.path.join(here, "kernels")) or not os.path.isfile(os.path.join(source, "peer_copy.py")):
        return  # installed: the kernels are inside the package
    spec = importlib.machinery.ModuleSpec(f"{__name__}.kernels", None, is_package=True)
    spec.submodule_search_locations = [source]
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    globals()["kernels"] = module  # as the import system does for a found submodule


_kernels_from_checkout()


def enable_parallel(pipe, strategy: str = "torus", *, ulysses: int | None = None,
                    torus: int | None = None, comm: str = "auto", kernel: str = "auto",
                    head_chunks: int = 1, output_on_all_ranks: bool = False, torus_exchange: str = "auto"):
    """Run ``pipe`` sequence-parallel over every rank of the torchrun job.

    ``strategy``: "torus", "ulysses", "ring", "usp" or "auto"; ``ulysses`` /
    ``torus``: the degrees inside / across machines (left out: the topology-aware
    mesh builder picks them); ``comm``: "auto", "nccl", "nvshmem" or "gloo";
    ``head_chunks`` (one machine): the all-to-all in that many head groups, each
    overlapping the previous group's attention; ``torus_exchange`` ("auto", "a2a", "a2a-kv", "kv";
    strategy "torus"): what crosses machines.
    Only rank 0 returns the pipeline's output unless ``output_on_all_ranks``.
    See ``diffusers_integration.enable_parallel``. Imported lazily: diffusers'
    pipelines take seconds to import."""
    from .diffusers_integration import enable_parallel as _enable
    return _enable(pipe, strategy, ulysses=ulysses, torus=torus, comm=comm, kernel=kernel,
                   head_chunks=head_chunks, output_on_all_ranks=output_on_all_ranks,
                   torus_exchange=torus_exchange)


def _add_enable_parallel(module) -> None:
    module.DiffusionPipeline.enable_parallel = enable_parallel


# Importing diffusers' pipelines costs seconds, so we do not import them
# ourselves; the method is added whenever (and if ever) they are imported.
run_after_import("diffusers.pipelines.pipeline_utils", _add_enable_parallel)
swiftfusion_xdit_autoload.register()  # --sp-strategy on xfuser's parser, as the .pth does
