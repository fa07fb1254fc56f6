"""xDiT glue: ``--sp-strategy {usp,torus}`` on the stock xfuser 0.7.0 CLI.

Loading: the wheel ships ``swiftfusion_xdit.pth``; Python runs it at start-up
and it registers an import hook (``swiftfusion_xdit_autoload``) that calls ``install()`` the
moment ``xfuser.config.args`` is imported. Nothing of xfuser is imported
early and no xfuser file is edited. Opt out with ``SWIFTFUSION_XDIT_DISABLE=1``.

``install()`` wraps four ``xFuserArgs`` methods:
* ``add_cli_args`` / ``add_runner_args`` add ``--sp-strategy`` (default
  ``usp``: xfuser behaves exactly as before) and ``--sp-comm``;
* ``from_cli_args`` / ``from_runner_args`` carry them onto the args object;
* ``create_config`` -- for ``torus`` only -- fills in degrees the user left
  out (``--ulysses_degree`` = all-to-all inside a machine, ``--ring_degree``
  = torus across machines, so the ``xdit`` launcher's GPU count still works),
  refuses what torus cannot run, lets xfuser build its groups, builds our
  own over the same rank layout (the topology-aware plan), and routes
  xfuser's ``USP(...)`` to Torus Attention in every module that imported it.
  xfuser's runner calls ``create_config`` twice; the plan is made once.

An xfuser carrying ``patches/`` (its own ``--sp-strategy`` and plugin point)
needs none of this: it finds us through the ``xfuser.sp_strategies`` entry
point (``TORUS`` below), and ``install()`` leaves it alone.

Adapters covered: every xfuser attention path that calls ``USP(...)`` --
Flux, Flux2, SD3/PixArt/Latte (``xFuserJointAttnProcessor2_0``,
``xFuserAttnProcessor2_0``), HunyuanDiT, HunyuanVideo (1.0, 1.5), CogVideoX,
ConsisID, Qwen-Image, Z-Image, Lumina2, Krea2, Cosmos3, LTX2, Ideogram4,
Lingbot-video, Wan (its ``USP`` calls). Key padding is served: a boolean
``attn_mask`` (B, 1, 1, S) over the whole sequence (Lumina2) and
``valid_kv_len`` (padded text split with the sequence); so is grouped-query
K/V (Lumina2; expanded before the exchange). Refused when reached: calls
carrying a KV cache (PipeFusion), FP8 communication, other
``attention_kwargs`` (the varlen packing of LTX2 and Krea2), grouped-query
K/V with joint tokens, dropout or causal attention; up front, a
low-precision ``--attention_backend`` (torus computes exact attention) and
the hybrid attention schedule. Step-Video's customised attention and the
Sana linear attention do not go through ``USP``.

Under torus ``--ring_degree`` is the torus degree, so xfuser's own checks
that reject ring attention (Lumina2's padded text, masked text padding in
the joint processors, per-model capability lists) also reject a torus
degree above 1 -- with messages about ``ring_degree``. Those adapters run
with torus degree 1 (Ulysses inside a machine) only.
"""

from __future__ import annotations

import logging
import sys

import torch
import torch.distributed as dist

from swiftfusion_xdit_autoload import run_after_each_import

from .mesh import LayoutError, TorusLayout, build_mesh, plan_layout
from .topology import detect_topology
from .torus_attention import Joint, SPGroups, check_head_chunks, seq_major, torus_attention
from .transport import process_group_backend, resolve_transports

log = logging.getLogger(__name__)

SP_STRATEGIES = ("usp", "torus", "auto")
_STATE: dict = {"groups": None, "transport": None, "original_usp": None}


def add_arguments(parser) -> None:
    group = parser.add_argument_group("SwiftFusion (swiftfusion-xdit)")
    group.add_argument("--sp-strategy", "--sp_strategy", dest="sp_strategy", default="usp",
                       choices=SP_STRATEGIES,
                       help="sequence-parallel strategy: 'usp' (xDiT's Ulysses x Ring), 'torus' "
                            "(Ulysses inside a machine, Torus Attention across machines; "
                            "--ring_degree is then the torus degree), or 'auto' (the planner's "
                            "best exact plan for this topology; FLUX.1 models)")
    add_torus_options(group)


def add_torus_options(parser) -> list[str]:
    """The torus strategy's own flags; their destinations (an xfuser carrying patches/
    copies those onto its engine args)."""
    parser.add_argument("--sp-comm", "--sp_comm", dest="sp_comm", default="auto",
                        choices=("auto", "nccl", "nvshmem"),
                        help="torus transport: auto = NVSHMEM on one machine when it initialises, else "
                             "NCCL; nvshmem across machines = NVSHMEM inside each machine, NCCL between")
    parser.add_argument("--sp-head-chunks", "--sp_head_chunks", dest="sp_head_chunks", type=int, default=1,
                        help="torus on one machine: run the all-to-all in this many head groups, each "
                             "overlapping the previous group's attention (default 1: one all-to-all)")
    return ["sp_comm", "sp_head_chunks"]


def install() -> None:
    """Wrap xFuserArgs; idempotent; a no-op where xfuser carries patches/ (its plugin point)."""
    import xfuser.config.args as xargs
    xFuserArgs = xargs.xFuserArgs
    if getattr(xFuserArgs, "_swiftfusion", False) or hasattr(xargs, "available_sp_strategies"):
        return
    for name in ("add_cli_args", "add_runner_args"):
        setattr(xFuserArgs, name, staticmethod(_with_arguments(getattr(xFuserArgs, name))))
    from_cli, from_runner = xFuserArgs.from_cli_args.__func__, xFuserArgs.from_runner_args.__func__
    xFuserArgs.from_cli_args = classmethod(
        lambda cls, args: _carry(from_cli(cls, args), vars(args)))
    xFuserArgs.from_runner_args = classmethod(
        lambda cls, args: _carry(from_runner(cls, args), args))
    create_config = xFuserArgs.create_config
    xFuserArgs.create_config = lambda self: _create_config(self, create_config)
    xFuserArgs._swiftfusion = True


def _with_arguments(add):
    def add_with_ours(parser):
        result = add(parser)
        add_arguments(parser)
        return result
    return add_with_ours


def _carry(engine_args, values: dict):
    engine_args.sp_strategy = values.get("sp_strategy", "usp")
    engine_args.sp_comm = values.get("sp_comm", "auto")
    engine_args.sp_head_chunks = values.get("sp_head_chunks", 1)
    return engine_args


def _create_config(engine_args, create_config):
    if getattr(engine_args, "sp_strategy", "usp") == "auto":
        choose_strategy(engine_args)
    if getattr(engine_args, "sp_strategy", "usp") != "torus" or hasattr(engine_args, "_torus_layout"):
        return create_config(engine_args)  # usp, or torus already planned (the runner asks twice)
    _ensure_xfuser_distributed()
    layout = plan_xfuser_torus(engine_args)
    configs = create_config(engine_args)
    enable_torus(layout, engine_args.sp_comm, engine_args.sp_head_chunks)
    engine_args._torus_layout = layout
    return configs


def _ensure_xfuser_distributed() -> None:
    """Our planning is collective; xfuser initialises torch.distributed its own way."""
    if not dist.is_initialized():
        from xfuser.core.distributed import init_distributed_environment
        init_distributed_environment()


def choose_strategy(engine_args) -> None:
    """``--sp-strategy auto``: set strategy and SP degrees from the planner (collective)."""
    from .planner import choose_for
    from .tiny import FLUX_DEV_TRANSFORMER
    if "flux.1" not in str(engine_args.model).lower():
        raise LayoutError(f"--sp-strategy auto knows the shapes of FLUX.1 models only, not "
                          f"{engine_args.model!r}; pass --sp-strategy usp or torus")
    chosen = {flag: value for flag, value in (("--ulysses_degree", engine_args.ulysses_degree),
                                              ("--ring_degree", engine_args.ring_degree),
                                              ("--pipefusion_parallel_degree",
                                               engine_args.pipefusion_parallel_degree)) if value != 1}
    if chosen:
        raise LayoutError(f"--sp-strategy auto picks the sequence-parallel degrees itself (no PipeFusion), "
                          f"so it cannot honour {chosen}; leave them out, or pass --sp-strategy usp or torus")
    _ensure_xfuser_distributed()
    topo = detect_topology()
    per_replica = topo.world_size // ((2 if engine_args.use_cfg_parallel else 1)
                                      * engine_args.data_parallel_degree)
    nodes = max(1, per_replica // topo.gpus_per_node)
    best = choose_for(FLUX_DEV_TRANSFORMER, nodes, min(per_replica, topo.gpus_per_node),
                      engine_args.height or 1024, engine_args.width or 1024,
                      comm=getattr(engine_args, "sp_comm", "auto"))
    engine_args.sp_strategy = best.plan.strategy
    engine_args.ulysses_degree, engine_args.ring_degree = best.plan.ulysses, best.plan.across
    if dist.get_rank() == 0:
        log.warning("swiftfusion auto: %s (predicted %.0f ms per step)", best.plan.describe(),
                    best.step_ms)


def plan_xfuser_torus(engine_args) -> TorusLayout:
    """Check the xfuser arguments for torus and fill in the SP degrees (collective)."""
    if engine_args.pipefusion_parallel_degree > 1:
        raise LayoutError("--sp-strategy torus does not compose with PipeFusion "
                          f"(--pipefusion_parallel_degree {engine_args.pipefusion_parallel_degree}); "
                          "use --pipefusion_parallel_degree 1, or --sp-strategy usp")
    if getattr(engine_args, "use_fp8_comms", False):
        raise LayoutError("--sp-strategy torus does not support --use_fp8_comms yet; drop one of them")
    if engine_args.tensor_parallel_degree > 1:
        raise LayoutError("--sp-strategy torus does not compose with tensor parallelism; "
                          "use --tensor_parallel_degree 1")
    _refuse_inexact_backend(engine_args)
    topo = detect_topology()
    cfg = 2 if engine_args.use_cfg_parallel else 1
    given = (engine_args.ulysses_degree, engine_args.ring_degree)
    ulysses, torus = given
    if given == (1, 1) and topo.world_size > cfg * engine_args.data_parallel_degree:
        ulysses = torus = None  # left out: the mesh builder chooses
    layout = plan_layout(topo, None, ulysses=ulysses, torus=torus, cfg=cfg,
                         dp=engine_args.data_parallel_degree)
    if topo.ranks_by_node != list(range(topo.world_size)):
        raise LayoutError("ranks are not numbered machine by machine, so xfuser's groups would not "
                          "follow the machines; launch with torchrun's default rank order")
    engine_args.ulysses_degree, engine_args.ring_degree = layout.dims.ulysses, layout.dims.torus
    if dist.get_rank() == 0:
        log.warning("swiftfusion torus: %s%s", layout.describe(),
                    "".join(f"; {n}" for n in layout.notes))
    return layout


# xfuser backends that compute attention exactly (in the input dtype); torus runs its
# own exact kernel in their place. The others (FP8/FP4/Sage/...) would be silently
# replaced by a more exact, different computation.
EXACT_BACKENDS = ("SDPA", "SDPA_MATH", "SDPA_EFFICIENT", "SDPA_FLASH", "FLASH", "CUDNN", "FLASH_3",
                  "FLASH_4", "AITER", "AITER_BF16")


def _refuse_inexact_backend(engine_args) -> None:
    backend = getattr(engine_args, "attention_backend", None)
    if backend is not None and backend.upper() not in EXACT_BACKENDS:
        raise LayoutError(f"--sp-strategy torus computes exact attention with its own kernel, so it "
                          f"cannot honour --attention_backend {backend}; drop the flag (or pick one of "
                          f"{', '.join(EXACT_BACKENDS)}), or use --sp-strategy usp")
    if getattr(engine_args, "use_hybrid_attn_schedule", False):
        raise LayoutError("--sp-strategy torus does not run xfuser's hybrid attention schedule; drop "
                          "--use_hybrid_attn_schedule, or use --sp-strategy usp")


def enable_torus(layout: TorusLayout, comm: str = "auto", head_chunks: int = 1) -> None:
    """Build our groups (same rank layout as xfuser's) and route USP to Torus Attention."""
    check_head_chunks(head_chunks, layout.num_heads, layout.dims.ulysses, layout.dims.torus)
    device = "cuda" if process_group_backend() == "nccl" else "cpu"
    mesh = build_mesh(layout, device)
    _STATE.update(groups=SPGroups(mesh.ulysses_group, mesh.torus_group, "auto", head_chunks),
                  transport=resolve_transports(comm, layout.topology.num_nodes), layout=layout)
    _route_usp_everywhere()


def _route_usp_everywhere() -> None:
    import xfuser.model_executor.layers.usp as usp_module
    if hasattr(usp_module, "set_sp_strategy"):  # xfuser carries patches/ (the plugin point)
        usp_module.set_sp_strategy(torus_usp)
        return
    _STATE["original_usp"] = _STATE["original_usp"] or usp_module.USP
    for name, module in list(sys.modules.items()):
        if name.startswith("xfuser"):
            _route_usp(module)
    run_after_each_import("xfuser.model_executor", _route_usp)  # modules imported later


def _route_usp(module) -> None:
    if getattr(module, "USP", None) is _STATE["original_usp"]:
        module.USP = torus_usp


def torus_usp(query, key, value, dropout_p=0.0, is_causal=False, joint_query=None, joint_key=None,
              joint_value=None, joint_strategy=None, attn_layer=None, combine_qkv_a2a=None,
              backend=None, attention_kwargs=None, head_balance_layer=None, kv_head_repeat=1):
    """xfuser's ``USP(...)`` contract, computed by Torus Attention.

    Inputs (B, H, S_local, D); joint tensors replicated with all heads. The
    output is (B, H, S_joint + S_local, D) with the joint part in front or
    rear, like xfuser's.
    """
    _refuse_unsupported(dropout_p, is_causal, attn_layer, attention_kwargs, kv_head_repeat,
                        joint_strategy)
    joint = None
    if joint_strategy:
        joint = Joint(joint_query, joint_key, joint_value)
    if kv_head_repeat > 1:  # grouped-query K/V: expanded before the exchange (xfuser: after)
        key, value = (x.repeat_interleave(kv_head_repeat, dim=1) for x in (key, value))
    result = torus_attention(query, key, value, _STATE["groups"], joint=joint,
                             transport=_STATE["transport"],
                             key_mask=_local_key_mask(attention_kwargs, query))
    if joint is None or joint.q is None:  # no joint queries: no joint rows in the output
        return result
    out, joint_out = result
    B, H, s, D = out.shape
    nj = joint_out.shape[2]
    # sequence-major, so that xfuser's transpose(1, 2).reshape(B, S, H*D) after USP is a view
    full = seq_major((B, H, nj + s, D), out)
    joint_rows, own_rows = (slice(0, nj), slice(nj, None)) if joint_strategy == "front" else \
        (slice(s, None), slice(0, s))
    full[:, :, joint_rows] = joint_out
    full[:, :, own_rows] = out
    return full


def _local_key_mask(attention_kwargs, query: torch.Tensor) -> torch.Tensor | None:
    """Our shard's part of the key padding xfuser describes over the whole sequence: a
    boolean ``attn_mask`` (B, 1, 1, S) (Lumina2) or ``valid_kv_len``, the valid prefix
    (the joint processors' padded text)."""
    if not attention_kwargs:
        return None
    groups, (B, S) = _STATE["groups"], (query.shape[0], query.shape[2])
    total = S * groups.ulysses_size * groups.torus_size
    t = dist.get_rank(groups.torus) if groups.torus_size > 1 else 0
    u = dist.get_rank(groups.ulysses) if groups.ulysses_size > 1 else 0
    start = (t * groups.ulysses_size + u) * S  # xfuser's sequence-parallel rank, shard order
    if "valid_kv_len" in attention_kwargs:
        valid = attention_kwargs["valid_kv_len"]
        if not 0 < valid <= total:
            raise ValueError(f"valid_kv_len must be in [1, {total}] (the whole sequence), got {valid}")
        return (torch.arange(start, start + S, device=query.device) < valid).expand(B, S)
    mask = attention_kwargs["attn_mask"]
    if mask.shape[0] not in (1, B) or mask.shape[-1] != total:
        raise ValueError(f"attn_mask must cover the whole sequence, shape ({B} or 1, 1, 1, {total}); "
                         f"got {tuple(mask.shape)}")
    return mask[:, 0, 0, start:start + S].expand(B, S)


def _is_key_padding(attention_kwargs, joint_strategy) -> bool:
    if joint_strategy is not None:
        return False
    if set(attention_kwargs) == {"valid_kv_len"}:
        return isinstance(attention_kwargs["valid_kv_len"], int)
    mask = attention_kwargs.get("attn_mask")
    return (set(attention_kwargs) == {"attn_mask"} and isinstance(mask, torch.Tensor)
            and mask.dtype == torch.bool and mask.dim() == 4 and mask.shape[1:3] == (1, 1))


def _refuse_unsupported(dropout_p, is_causal, attn_layer, attention_kwargs, kv_head_repeat,
                        joint_strategy) -> None:
    problems = []
    if dropout_p or is_causal:
        problems.append("dropout or causal attention")
    if kv_head_repeat > 1 and joint_strategy:
        problems.append(f"grouped-query K/V (kv_head_repeat={kv_head_repeat}) with joint tokens")
    if attention_kwargs and not _is_key_padding(attention_kwargs, joint_strategy):
        problems.append(f"attention_kwargs {sorted(attention_kwargs)} (masks other than key padding: "
                        "a boolean attn_mask of shape (B, 1, 1, S) or valid_kv_len; varlen packing)")
    if joint_strategy not in (None, "front", "rear"):
        problems.append(f"joint_strategy {joint_strategy!r}")
    if attn_layer is not None:
        from xfuser.model_executor.layers.usp import _has_kv_cache
        if _has_kv_cache(attn_layer):
            problems.append("a PipeFusion KV cache")
    if problems:
        raise NotImplementedError(
            "--sp-strategy torus cannot run this attention call: it uses " + ", ".join(problems)
            + ". This model adapter is not covered by torus; run it with --sp-strategy usp.")


class TorusStrategy:
    """Entry point ``xfuser.sp_strategies: torus`` for an xfuser that carries
    ``patches/xfuser-0.7.0-sp-strategy-plugin-point.diff``: no start-up hook needed."""

    add_cli_args = staticmethod(add_torus_options)

    def prepare(self, engine_args) -> None:
        _ensure_xfuser_distributed()
        self.layout = plan_xfuser_torus(engine_args)

    def activate(self, engine_args, engine_config) -> None:
        enable_torus(self.layout, getattr(engine_args, "sp_comm", "auto"),
                     getattr(engine_args, "sp_head_chunks", 1))


TORUS = TorusStrategy()
