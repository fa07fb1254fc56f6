"""diffusers glue: ``pipe.enable_parallel(strategy="torus", ...)``.

diffusers' own context-parallel machinery does the sequence bookkeeping: the
model's ``_cp_plan`` hooks split the inputs over the CP mesh and gather the
output. We give it our own mesh (dims "ring" = torus across machines,
"ulysses" inside a machine, laid out by the topology-aware builder) and
replace only the attention: the transformer module's ``dispatch_attention_fn``
is wrapped so that calls carrying our config run Torus Attention and every
other call (cross-attention, non-parallel models) goes to diffusers unchanged.

Why not ``model.enable_parallelism``: in diffusers 0.42 it derives the device
as ``rank % torch.accelerator.device_count()``, which divides by zero on a
CPU-only machine, and it insists on one of diffusers' own CP backends. We run
its three steps ourselves (config setup, processor configs, plan hooks) so the
same path runs on CPU ranks and GPUs.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import logging
import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist
from diffusers.hooks.context_parallel import _find_submodule_by_name, apply_context_parallel
from diffusers.models._modeling_parallel import ContextParallelConfig, ContextParallelInput, ParallelConfig
from torch.distributed.device_mesh import DeviceMesh

from .mesh import LayoutError, TorusLayout, build_mesh, plan_layout
from .topology import detect_topology
from .torus_attention import SPGroups, check_head_chunks, torus_attention
from .transport import COMMS, TransportPair, resolve_transports

log = logging.getLogger(__name__)

STRATEGIES = ("torus", "ulysses", "ring", "usp", "auto")


@dataclass
class TorusContextParallelConfig(ContextParallelConfig):
    """diffusers' CP config plus what Torus Attention needs."""

    sp_groups: SPGroups | None = None
    transport: TransportPair | None = None
    kernel: str = "auto"


def ensure_distributed() -> torch.device:
    """Initialise torch.distributed from torchrun's environment if needed; this rank's device.

    A caller that initialised torch.distributed itself keeps the CUDA device it chose; one
    that chose none (every rank on GPU 0, which NCCL refuses) gets torchrun's LOCAL_RANK."""
    cuda = torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if dist.is_initialized():
        if cuda and local_rank != 0 and torch.cuda.current_device() == 0:
            torch.cuda.set_device(_local_device(local_rank))
    else:
        if "RANK" not in os.environ:
            raise RuntimeError("enable_parallel needs torch.distributed: launch with torchrun "
                               "(or swiftfusion-xdit generate), or call init_process_group first")
        if cuda:
            torch.cuda.set_device(_local_device(local_rank))
        device_id = torch.device("cuda", torch.cuda.current_device()) if cuda else None
        dist.init_process_group("nccl" if cuda else "gloo", device_id=device_id)
    return torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")


def _local_device(local_rank: int) -> int:
    """LOCAL_RANK's GPU; GPU 0 where a launcher shows each process only its own GPU
    (srun --gpus-per-task=1, CUDA_VISIBLE_DEVICES per rank)."""
    count = torch.cuda.device_count()
    if local_rank < count:
        return local_rank
    if count == 1:
        return 0
    raise RuntimeError(f"LOCAL_RANK={local_rank} but this process sees {count} GPUs: launch one process "
                       "per GPU (torchrun --nproc-per-node <GPUs>) or show each process its own GPU")


def plan_strategy(strategy: str, num_heads: int, *, ulysses: int | None = None,
                  torus: int | None = None, config=None, comm: str = "auto",
                  torus_exchange: str = "auto") -> TorusLayout:
    """Map a strategy name onto the (torus, ulysses) grid; collective (gathers topology).
    ``torus_exchange`` ("auto", "a2a", "a2a-kv", "kv"): strategy "torus" only; the others fix it."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; choose one of {STRATEGIES}")
    if torus_exchange != "auto" and strategy != "torus":
        raise ValueError(f"torus_exchange={torus_exchange!r} applies to strategy 'torus' only; "
                         f"{strategy!r} fixes its own exchange")
    topo = detect_topology()
    sp = topo.world_size
    _refuse_fixed_degrees(strategy, sp, ulysses, torus)
    if strategy == "auto":
        return _auto_layout(topo, num_heads, config, comm)
    if strategy == "torus":
        return plan_layout(topo, num_heads, ulysses=ulysses, torus=torus, torus_exchange=torus_exchange)
    # Baselines run on the same code with the classic layouts: placement not enforced.
    if strategy == "ulysses":
        return plan_layout(topo, num_heads, ulysses=sp, torus=1, check_placement=False)
    if strategy == "ring":
        return plan_layout(topo, num_heads, ulysses=1, torus=sp, torus_exchange="kv")
    return plan_layout(topo, num_heads, ulysses=ulysses, torus=torus, torus_exchange="kv",
                       check_placement=False)


def _refuse_fixed_degrees(strategy: str, sp: int, ulysses: int | None, torus: int | None) -> None:
    """ulysses, ring and auto fix the degrees themselves: a different one given is refused."""
    fixed = {"ulysses": (sp, 1), "ring": (1, sp), "auto": (None, None)}.get(strategy)
    if fixed is None:
        return
    for name, given, own in (("ulysses", ulysses, fixed[0]), ("torus", torus, fixed[1])):
        if given is not None and given != own:
            what = "picks the degrees itself" if strategy == "auto" else f"means {name}={own} on {sp} ranks"
            raise LayoutError(f"strategy {strategy!r} {what}, so {name}={given} cannot be honoured; "
                              f"leave the degree out, or use strategy 'torus' or 'usp' with your degrees")


def _auto_layout(topo, num_heads: int, config, comm: str = "auto") -> TorusLayout:
    """The planner's best exact plan for this topology (cost model, H200 numbers)."""
    from .planner import choose_for
    best = choose_for(config, topo.num_nodes, topo.gpus_per_node, comm=comm)
    plan = best.plan
    layout = plan_layout(topo, num_heads, ulysses=plan.ulysses, torus=plan.across,
                         torus_exchange=plan.exchange or "kv",
                         check_placement=plan.strategy == "torus")
    why = f"auto: planner chose {plan.describe()} (predicted {best.step_ms:.0f} ms per step at 1024x1024)"
    return dataclasses.replace(layout, notes=(*layout.notes, why))


def parallelize_transformer(transformer: torch.nn.Module, strategy: str = "torus", *,
                            ulysses: int | None = None, torus: int | None = None,
                            comm: str = "auto", kernel: str = "auto", head_chunks: int = 1,
                            torus_exchange: str = "auto") -> TorusLayout:
    """Shard a diffusers transformer's sequence over all ranks; attention runs Torus Attention.

    ``head_chunks`` > 1 (one machine): the all-to-all runs in that many head groups, each
    overlapping the previous group's attention (see ``torus_attention``). ``torus_exchange``
    ("auto", "a2a", "a2a-kv" or "kv"; strategy "torus" only): what crosses machines, see ``mesh``."""
    if comm not in COMMS:
        raise ValueError(f"unknown comm {comm!r}; choose one of {COMMS}")
    if getattr(transformer, "_parallel_config", None) is not None:
        raise RuntimeError(f"{type(transformer).__name__} is already parallel (enable_parallel or "
                           f"enable_parallelism ran on it); load a fresh pipeline to change the layout")
    plan = getattr(transformer, "_cp_plan", None)
    if plan is None:
        raise ValueError(f"{type(transformer).__name__} has no context-parallel plan (_cp_plan) in "
                         f"diffusers, so its sequence cannot be split; models with one include "
                         f"FluxTransformer2DModel, WanTransformer3DModel, QwenImageTransformer2DModel")
    _refuse_broken_plan(transformer)
    device = ensure_distributed()
    layout = plan_strategy(strategy, transformer.config.num_attention_heads, ulysses=ulysses,
                           torus=torus, config=transformer.config, comm=comm, torus_exchange=torus_exchange)
    check_head_chunks(head_chunks, transformer.config.num_attention_heads, layout.dims.ulysses,
                      layout.dims.torus)
    if dist.get_rank() == 0:
        log.info("swiftfusion %s: %s; %s", strategy, layout.describe(), "; ".join(layout.notes))
    if layout.dims.sp == 1:
        return layout  # one rank: nothing to split
    mesh = build_mesh(layout, device.type)
    cp_mesh = DeviceMesh(device.type, layout.rank_grid().reshape(layout.dims.torus, layout.dims.ulysses),
                         mesh_dim_names=("ring", "ulysses"))
    cp = TorusContextParallelConfig(
        ring_degree=layout.dims.torus, ulysses_degree=layout.dims.ulysses, mesh=cp_mesh,
        sp_groups=SPGroups(mesh.ulysses_group, mesh.torus_group, layout.torus_exchange, head_chunks),
        transport=resolve_transports(comm, layout.topology.num_nodes), kernel=kernel)
    config = ParallelConfig(context_parallel_config=cp)
    config.setup(dist.get_rank(), dist.get_world_size(), device, mesh=cp_mesh)
    transformer._parallel_config = config
    for module in transformer.modules():
        processor = getattr(module, "processor", None)
        if processor is not None and hasattr(processor, "_parallel_config"):
            processor._parallel_config = config
    apply_context_parallel(transformer, cp, plan)
    _refuse_unsplittable_inputs(transformer, plan, layout.dims.sp)
    _name_unsplittable_outputs(transformer, plan, layout.dims.sp)
    _wrap_dispatch(sys.modules[type(transformer).__module__])
    return layout


def _refuse_unsplittable_inputs(transformer: torch.nn.Module, plan: dict, sp: int) -> None:
    """Pre-hooks, run before diffusers' split hooks on each module its plan splits inputs of:
    diffusers shards each planned input into equal parts and otherwise fails with an
    assertion deep in its sharder. Say instead which input cannot be split and which rank
    counts could split them all."""
    for module_name, entries in plan.items():
        if not isinstance(entries, dict):
            continue
        modules = _find_submodule_by_name(transformer, module_name)  # diffusers' "*" rule
        # one module per pattern: the blocks of a "blocks.*" see the same lengths
        module = modules[0] if isinstance(modules, list) else modules
        split = _split_inputs(module, entries)
        if split:
            module.register_forward_pre_hook(functools.partial(_check_split, split, sp), with_kwargs=True)


def _name_unsplittable_outputs(transformer: torch.nn.Module, plan: dict, sp: int) -> None:
    """Some plans split a module's output (Wan's rotary embedding), which no pre-hook can
    measure first: an uneven length fails in diffusers' sharder with a bare assertion,
    before any input the pre-hooks check. Catch that one assertion and say it in one line."""
    splits_outputs = any(isinstance(spec, ContextParallelInput) and spec.split_output
                         for entries in plan.values() if isinstance(entries, dict) for spec in entries.values())
    if not splits_outputs:
        return
    inner = transformer.forward

    @functools.wraps(inner)
    def forward(*args, **kwargs):
        try:
            return inner(*args, **kwargs)
        except AssertionError as e:
            if "divisible by mesh size" not in str(e):
                raise
            raise SequenceSplitError(
                f"{type(transformer).__name__}: a sequence its context-parallel plan splits cannot be split "
                f"evenly over {sp} ranks; choose a size whose token count divides by {sp}") from None
    transformer.forward = forward


def _split_inputs(module: torch.nn.Module, entries: dict) -> list:
    """(name, position in ``forward``'s arguments or None, spec) of each input diffusers
    splits (not an output split); worked out once, so each forward only reads shapes."""
    names = list(inspect.signature(module.forward).parameters)
    return [(key, key if isinstance(key, int) else (names.index(key) if key in names else None), spec)
            for key, spec in entries.items()
            if isinstance(spec, ContextParallelInput) and not spec.split_output]


def _check_split(split: list, sp: int, module, args, kwargs) -> None:
    lengths = {}
    for name, position, spec in split:  # diffusers' rule: a tensor of the expected rank
        value = kwargs.get(name) if isinstance(name, str) else None
        if value is None and position is not None and position < len(args):
            value = args[position]
        if isinstance(value, torch.Tensor) and spec.expected_dims in (None, value.dim()):
            lengths[str(name)] = value.shape[spec.split_dim]
    unsplittable = [name for name, n in lengths.items() if n % sp]
    if unsplittable:
        sizes = sorted(set(lengths.values()))
        raise SequenceSplitError(
            f"{type(module).__name__}: {', '.join(unsplittable)} cannot be split evenly over {sp} "
            f"ranks; rank counts that split every sequence ({' and '.join(map(str, sizes))} "
            f"tokens): {rank_counts_that_split(sizes)}")


def rank_counts_that_split(lengths) -> list[int] | str:
    """The rank counts (2 to 64) that divide every one of ``lengths``, for error messages."""
    return [p for p in range(2, 65) if all(n % p == 0 for n in lengths)] or "none up to 64"


class SequenceSplitError(ValueError):
    """An input sequence that the ranks cannot share equally."""


def _refuse_broken_plan(transformer: torch.nn.Module) -> None:
    """Models whose diffusers 0.42 plan fails or runs wrong with any attention backend
    (diffusers' own context parallelism included); found by running each planned model
    against its unparallelised self on CPU ranks."""
    name = type(transformer).__name__
    if name == "LTX2VideoTransformer3DModel":
        raise ValueError(
            "LTX2VideoTransformer3DModel is not supported: diffusers 0.42's _cp_plan for it splits "
            "the video tokens but not the audio-video cross-attention RoPE (cross_attn_rope), nor the "
            "4-D 'split' RoPE of the released checkpoints, nor per-token timesteps, so the model fails "
            "inside diffusers' hooks; run it unparallelised or on a diffusers release with a fixed plan")
    if name == "HeliosTransformer3DModel" and transformer.config.get("is_amplify_history"):
        raise ValueError(
            "HeliosTransformer3DModel with is_amplify_history=True is not supported: diffusers 0.42's "
            "plan shards the sequence before the attention processor counts the history tokens, so "
            "the history keys would go unscaled (a wrong output, not an error)")


def _wrap_dispatch(module) -> None:
    original = module.dispatch_attention_fn
    if getattr(original, "_swiftfusion", False):
        return

    @functools.wraps(original)
    def dispatch(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                 enable_gqa=False, attention_kwargs=None, *, backend=None, parallel_config=None):
        cp = getattr(parallel_config, "context_parallel_config", None)
        if not isinstance(cp, TorusContextParallelConfig):
            return original(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa,
                            attention_kwargs, backend=backend, parallel_config=parallel_config)
        _refuse_inexact(backend, attention_kwargs)
        if enable_gqa and key.shape[2] != query.shape[2]:  # grouped-query K/V: expand, then exchange
            key, value = (x.repeat_interleave(query.shape[2] // key.shape[2], dim=2) for x in (key, value))
        key_mask = _key_padding(attn_mask, query.shape[0], key.shape[1])
        if (attn_mask is not None and key_mask is None) or is_causal or dropout_p:
            raise NotImplementedError(
                "swiftfusion's sequence-parallel attention supports non-causal attention without "
                "dropout, unmasked or with a key-padding mask: the same for every query and head, "
                "boolean or additive with entries 0 or <= -1000, shaped (B, S) or (B, H, 1, S) (as in "
                "Flux, Wan, Qwen-Image and LTX-Video); this call passes "
                f"attn_mask={None if attn_mask is None else (attn_mask.dtype, tuple(attn_mask.shape))}, "
                f"is_causal={is_causal}, dropout_p={dropout_p}")
        q, k, v = (x.transpose(1, 2) for x in (query, key, value))  # diffusers: (B, S, H, D)
        out = torus_attention(q, k, v, cp.sp_groups, transport=cp.transport, kernel=cp.kernel,
                              scale=scale, key_mask=key_mask)
        return out.transpose(1, 2)

    dispatch._swiftfusion = True
    module.dispatch_attention_fn = dispatch


def _refuse_inexact(backend, attention_kwargs) -> None:
    """Torus Attention computes exact attention with its own kernel: a quantised backend, or
    a backend's own keyword arguments, would be silently replaced."""
    name = getattr(backend, "value", backend)
    if name is not None and "sage" in str(name):
        raise NotImplementedError(
            f"the attention backend {name!r} is quantised (approximate), and swiftfusion's "
            f"sequence-parallel attention computes exact attention instead; reset the backend "
            f"(transformer.reset_attention_backend()) or run this model unparallelised")
    if attention_kwargs:
        raise NotImplementedError(
            f"swiftfusion's sequence-parallel attention takes no backend arguments, got "
            f"attention_kwargs {sorted(attention_kwargs)}; run this model unparallelised")


# An additive bias at or below this marks a padded key: exp() of it underflows to exactly 0
# in float32 beside any logit within 896 of the row's largest. Well above LTX's -10000
# (-9984 in bfloat16), so no rounding of it lands on the wrong side.
PADDING_BIAS = -1e3


def _key_padding(attn_mask, batch: int, keys: int):
    """The (B, S) keys-to-keep of a key-padding mask over this rank's keys, or None.

    A key-padding mask is the same for every query and head: boolean (True =
    attend; Qwen-Image) or additive with entries 0 or <= ``PADDING_BIAS``
    (LTX's ``(1 - mask) * -10000``), shaped (B, S) or (B, H or 1, 1, S).
    diffusers' plan shards it with the sequence, so each rank holds the part
    for its own keys. Anything else (a real bias, per-query masks) is None."""
    if attn_mask is None:
        return None
    if attn_mask.dim() == 4 and attn_mask.shape[2] == 1:
        first_head = attn_mask[:, :1]
        if attn_mask.shape[1] > 1 and not torch.equal(attn_mask, first_head.expand_as(attn_mask)):
            return None
        attn_mask = first_head[:, 0, 0]
    if attn_mask.dim() != 2 or attn_mask.shape[1] != keys or attn_mask.shape[0] not in (1, batch):
        return None
    if attn_mask.dtype != torch.bool:
        if not attn_mask.is_floating_point():
            return None
        keep = attn_mask == 0
        if not (keep | (attn_mask <= PADDING_BIAS)).all():
            return None  # a bias that changes weights, not just padding
        attn_mask = keep
    return attn_mask.expand(batch, keys)


def enable_parallel(pipe, strategy: str = "torus", *, ulysses: int | None = None,
                    torus: int | None = None, comm: str = "auto", kernel: str = "auto",
                    head_chunks: int = 1, output_on_all_ranks: bool = False,
                    torus_exchange: str = "auto"):
    """Run ``pipe`` sequence-parallel over every rank of the torchrun job.

    Places the pipeline on this rank's device, shards the transformer's
    sequence (degrees picked by the topology-aware mesh builder unless given),
    and makes non-zero ranks return ``None`` unless ``output_on_all_ranks``.
    """
    transformers = _transformers_of(pipe)
    device = ensure_distributed()
    pipe.to(device)
    # Wan 2.2 denoises with transformer_2 in its low-noise steps: shard every one.
    layouts = [parallelize_transformer(t, strategy, ulysses=ulysses, torus=torus, comm=comm, kernel=kernel,
                                       head_chunks=head_chunks, torus_exchange=torus_exchange)
               for t in transformers]
    pipe.parallel_layout = layouts[0]
    if not output_on_all_ranks and dist.get_rank() != 0:
        cls = type(pipe)
        pipe.__class__ = type(f"NonMainRank{cls.__name__}", (cls,), {"__call__": _call_then_drop(cls)})
    return pipe


def _transformers_of(pipe) -> list[torch.nn.Module]:
    found = [module for name, module in pipe.components.items()
             if name.startswith("transformer") and isinstance(module, torch.nn.Module)]
    if not found:
        raise ValueError(f"{type(pipe).__name__} has no transformer to split: enable_parallel serves "
                         f"diffusion-transformer pipelines (Flux, Wan, Qwen-Image, LTX-Video, ...)")
    return found


def _call_then_drop(cls):
    def call(self, *args, **kwargs):
        cls.__call__(self, *args, **kwargs)  # every rank must run the collectives
        return None
    return call
