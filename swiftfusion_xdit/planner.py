"""Cost model and planner: which SP strategy and degrees for a model and cluster.

Per transformer layer, each GPU holds S/P of the S tokens (P = SP degree)
and X = (S/P) * H * D * b bytes of one of Q, K, V or O. What each GPU sends:

  plan                   inside a machine      across machines
  USP (ulysses U, ring R) 4X (U-1)/U            2X per ring step, R-1 steps
  torus a2a (U x T)       4X (U-1)/U            4X (T-1)/T in T-1 peer steps
  torus kv  (U x T)       4X (U-1)/U            2X (T-1) in T-1 peer steps
                                                (T = 2: one all-gather)
  torus a2a-kv (U x T)    2X (U-1), K/V         4X (T-1)/T in T-1 peer steps
                          all-gathers
  PipeFusion (N stages)   activations S*h*b per stage boundary (approximate output)

Time per layer = GEMM + attention compute (split P ways) + the Ulysses
all-to-all (blocking) + whatever part of the cross-machine exchange is not
hidden under the attention blocks that can run while it is in flight:
ring step k hides under block k; the torus all-gather hides under the local
block; torus a2a hides its Q/K/V steps under the blocks already received and
pays the output return. Each collective or step also pays a fixed latency.
Torus's all-to-all inside a machine runs over NVSHMEM with comm='nvshmem', or
'auto' on one machine where NVSHMEM starts (``as_run_with``): its own bandwidth
and per-call latency (``onesided_*``), measured beside NCCL's by
``benchmarks/alltoall_bench.py``.

Hardware numbers come from measurements (``Hardware.from_measurements``):
GEMM and attention throughput fitted from one-GPU step times at two sizes,
link bandwidths from ``benchmarks/link_probe.py``. They can also be stated
(``--inter-bw``) to plan clusters larger than the one at hand.

Where one rank's compute for a plan's grid has been measured
(``MeasuredCompute``, from ``benchmarks/rank_compute.py``) it replaces the
GEMM + attention terms: small shards run well below the fitted throughput
(kernel launches, eager host time; FLUX.1-dev at 1024^2 on 4 ranks measured
0.50x of perfect scaling with no communication at all).
"""

from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import dataclass, field, replace

import torch

from .tiny import WAN21_14B_TRANSFORMER
from .torus_attention import choose_exchange


@dataclass(frozen=True)
class ModelShape:
    """What the cost depends on: tokens, heads, widths, and GEMM work per token."""

    layers: int
    heads: int
    head_dim: int
    gemm_params_per_token: float  # weights each token multiplies, summed over layers
    image_tokens: int
    text_tokens: int = 0
    dtype_bytes: int = 2
    text_in_exchange: bool = True  # False: text replicated on every rank (xfuser's joint tokens)

    @property
    def tokens(self) -> int:
        return self.image_tokens + self.text_tokens

    @property
    def exchanged_tokens(self) -> int:
        return self.image_tokens + (self.text_tokens if self.text_in_exchange else 0)

    @property
    def hidden(self) -> int:
        return self.heads * self.head_dim

    def gemm_flops(self) -> float:
        return 2.0 * self.gemm_params_per_token * self.tokens

    def attention_flops(self) -> float:  # QK^T and PV, per step
        return 4.0 * self.tokens ** 2 * self.hidden * self.layers

    @classmethod
    def flux(cls, config: dict, height: int, width: int, text_tokens: int = 512,
             text_in_exchange: bool = True) -> "ModelShape":
        """FluxTransformer2DModel: a double block has 18h^2 weights per stream
        (QKV 3, out 1, MLP 8, adaLN 6), a single block 15h^2 (QKV 3, MLP-in 4,
        out 5, adaLN 3); every token passes one stream of each block."""
        h = config["num_attention_heads"] * config["attention_head_dim"]
        per_token = h * h * (18 * config["num_layers"] + 15 * config["num_single_layers"])
        return cls(layers=config["num_layers"] + config["num_single_layers"],
                   heads=config["num_attention_heads"], head_dim=config["attention_head_dim"],
                   gemm_params_per_token=per_token, image_tokens=(height // 16) * (width // 16),
                   text_tokens=text_tokens, text_in_exchange=text_in_exchange)


    @classmethod
    def wan(cls, config: dict, frames: int, height: int, width: int) -> "ModelShape":
        """WanTransformer3DModel: VAE 4x in time and 8x in space, patch (1, 2, 2);
        per layer self-attention 4h^2, cross-attention Q/O 2h^2, FFN 2*h*ffn.
        Text enters by cross-attention only, so it is not in the SP exchange."""
        h = config["num_attention_heads"] * config["attention_head_dim"]
        per_layer = 6 * h * h + 2 * h * config["ffn_dim"]
        tokens = ((frames - 1) // 4 + 1) * (height // 16) * (width // 16)
        return cls(layers=config["num_layers"], heads=config["num_attention_heads"],
                   head_dim=config["attention_head_dim"],
                   gemm_params_per_token=per_layer * config["num_layers"], image_tokens=tokens)


WAN21_14B = WAN21_14B_TRANSFORMER


@dataclass(frozen=True)
class Hardware:
    gemm_tflops: float
    attention_tflops: float
    intra_GBps: float  # per-GPU all-to-all bandwidth inside a machine
    inter_GBps: float  # per-GPU, per direction, between machines (send/recv)
    inter_collective_GBps: float | None = None  # the same link driven by an all-gather
    latency_us: float = 60.0  # per collective or step (NCCL small-message floor, measured)
    # torus's all-to-all inside a machine over NVSHMEM (one-sided puts and signals), where it runs
    onesided_GBps: float | None = None
    onesided_latency_us: float | None = None

    @classmethod
    def from_measurements(cls, one_gpu_ms: dict[ModelShape, float], intra_GBps: float,
                          inter_GBps: float, inter_collective_GBps: float | None = None,
                          latency_us: float = 60.0) -> "Hardware":
        """Fit GEMM and attention throughput to one-GPU step times at two sizes."""
        (a, ta), (b, tb) = sorted(one_gpu_ms.items(), key=lambda kv: kv[0].tokens)[:2]
        # t = gemm/G + attn/A: two equations in 1/G and 1/A
        det = a.gemm_flops() * b.attention_flops() - b.gemm_flops() * a.attention_flops()
        inv_g = (ta * b.attention_flops() - tb * a.attention_flops()) / det
        inv_a = (a.gemm_flops() * tb - b.gemm_flops() * ta) / det
        if inv_g <= 0 or inv_a <= 0:
            raise ValueError("one-GPU timings do not fit compute-bound GEMM + attention; "
                             "measure at two sizes further apart")
        return cls(1e-9 / inv_g, 1e-9 / inv_a, intra_GBps, inter_GBps, inter_collective_GBps,
                   latency_us)  # ms and flops -> TFLOP/s


@dataclass(frozen=True)
class Plan:
    strategy: str  # "usp", "torus", "pipefusion"
    ulysses: int = 1
    across: int = 1  # ring degree (usp), torus degree, or pipeline stages
    exchange: str = ""  # torus: "a2a", "a2a-kv" or "kv"

    def describe(self) -> str:
        if self.strategy == "usp":
            return f"usp ulysses={self.ulysses} ring={self.across}"
        if self.strategy == "torus":
            return f"torus ulysses={self.ulysses} torus={self.across} ({self.exchange})"
        return f"pipefusion stages={self.across}"


@dataclass(frozen=True)
class MeasuredCompute:
    """One rank's step for a plan's grid with no communication: every kernel, launch and
    layout copy at that rank's shapes (``benchmarks/rank_compute.py``)."""

    step_ms: float
    attention_ms_per_layer: float


@dataclass
class Prediction:
    plan: Plan
    step_ms: float
    compute_ms: float
    intra_ms: float
    inter_ms: float
    hidden_ms: float
    exact: bool = True
    why: list[str] = field(default_factory=list)


def bytes_per_layer(plan: Plan, shape: ModelShape) -> tuple[float, float]:
    """(intra-machine, cross-machine) bytes one GPU sends per attention layer.

    For USP the ring's bytes are counted as cross-machine; where its ring stays
    inside a machine ``predict`` moves them to the fast link.
    """
    P = plan.ulysses * plan.across
    x = shape.exchanged_tokens / P * shape.hidden * shape.dtype_bytes
    U, A = plan.ulysses, plan.across
    ulysses = 4 * x * (U - 1) / U
    if plan.strategy == "usp":
        return ulysses, 2 * x * (A - 1)
    if plan.strategy == "torus" and plan.exchange == "a2a-kv":  # no all-to-all: K/V gathered inside
        return 2 * x * (U - 1), 4 * x * (A - 1) / A
    if plan.strategy == "torus":
        return ulysses, 4 * x * (A - 1) / A if plan.exchange == "a2a" else 2 * x * (A - 1)
    if plan.strategy == "pipefusion":
        return 0.0, shape.tokens * shape.hidden * shape.dtype_bytes / shape.layers
    raise ValueError(f"unknown strategy {plan.strategy!r}")


def predict(plan: Plan, shape: ModelShape, hw: Hardware, gpus_per_node: int,
            measured: MeasuredCompute | None = None) -> Prediction:
    P = plan.ulysses * plan.across
    L, lat = shape.layers, hw.latency_us / 1e3
    gemm = shape.gemm_flops() / (hw.gemm_tflops * 1e9) / P / L
    attn = shape.attention_flops() / (hw.attention_tflops * 1e9) / P / L
    if measured is not None and plan.strategy != "pipefusion":
        attn = measured.attention_ms_per_layer
        gemm = measured.step_ms / L - attn  # everything but attention
    intra_b, cross_b = bytes_per_layer(plan, shape)
    ms = lambda nbytes, gbps: nbytes / (gbps * 1e6)
    why = []
    if plan.strategy == "pipefusion":
        # a stage runs L/P layers on all tokens: per GPU the same work as an even SP split,
        # plus the activations handed to the next stage (no pipeline bubble modelled)
        comm = ms(cross_b, hw.inter_GBps if gpus_per_node < P else hw.intra_GBps)
        return Prediction(plan, (gemm + attn + comm) * L, (gemm + attn) * L, 0, comm * L, 0,
                          exact=False, why=["stale activations between steps: output is approximate"])
    ulysses_local = gpus_per_node % plan.ulysses == 0  # ranks go machine by machine (mesh.py)
    a2a_GBps, a2a_lat = hw.intra_GBps, lat
    if plan.exchange == "a2a-kv":  # T K/V all-gathers over NCCL, counted as not hidden (an upper bound)
        a2a_lat = plan.across * lat / 2
    elif plan.strategy == "torus" and plan.ulysses > 1 and ulysses_local and hw.onesided_GBps:
        a2a_GBps, a2a_lat = hw.onesided_GBps, hw.onesided_latency_us / 1e3
        why.append("all-to-all over NVSHMEM (one-sided)")
    intra = ms(intra_b, a2a_GBps if ulysses_local else hw.inter_GBps)
    intra += 2 * a2a_lat if plan.ulysses > 1 else 0
    if not ulysses_local:
        why.append(f"ulysses={plan.ulysses} spans machines: its all-to-all takes the network")
    cross_local = P <= gpus_per_node  # the whole SP group fits in one machine
    bw = hw.intra_GBps if cross_local else hw.inter_GBps
    A = plan.across
    if A == 1:
        inter, exposed = 0.0, 0.0
    elif plan.exchange == "kv" and A == 2:  # torus: one all-gather under the local block
        gather_bw = bw if cross_local else (hw.inter_collective_GBps or hw.inter_GBps)
        inter = ms(cross_b, gather_bw) + lat
        exposed = max(0.0, inter - attn / A)
    elif plan.strategy == "usp" or plan.exchange == "kv":  # A-1 K/V steps, each under one block
        step = ms(cross_b / (A - 1), bw) + lat
        inter = step * (A - 1)
        exposed = (A - 1) * max(0.0, step - attn / A)
    else:  # a2a: Q/K/V steps hide under received blocks; the output return is paid
        qkv = ms(cross_b * 3 / 4, bw) + lat * (A - 1)
        back = ms(cross_b / 4, bw) + lat * (A - 1)
        inter = qkv + back
        exposed = max(0.0, qkv - attn * (A - 1) / A) + back
    step_ms = (gemm + attn + intra + exposed) * L
    return Prediction(plan, step_ms, (gemm + attn) * L, intra * L, inter * L,
                      (inter - exposed) * L, why=why)


def candidate_plans(shape: ModelShape, nodes: int, gpus_per_node: int) -> list[Plan]:
    world = nodes * gpus_per_node
    plans = []
    for u in (d for d in range(1, world + 1) if world % d == 0 and shape.heads % d == 0):
        plans.append(Plan("usp", u, world // u))
    for u in (d for d in range(1, gpus_per_node + 1) if gpus_per_node % d == 0):
        t = world // u
        if shape.heads % u == 0:
            # every schedule the heads allow: a2a and a2a-kv move fewer bytes from T = 3 on,
            # but kv needs no output return and computes fewer, larger blocks, which wins on
            # a fast link (and choose_exchange's byte rule cannot see that)
            exchanges = {choose_exchange(shape.heads, u, t)}
            if t > 1 and shape.heads % (u * t) == 0:
                exchanges |= {"kv", "a2a"}
            if t > 1 and u > 1 and shape.heads % t == 0:  # u == 1: a2a-kv is a2a
                exchanges |= {"kv", "a2a-kv"}
            plans += [Plan("torus", u, t, e) for e in sorted(exchanges)]
    if world <= shape.layers:  # a stage needs at least one layer
        plans.append(Plan("pipefusion", 1, world))
    return plans


def rank_plans(shape: ModelShape, hw: Hardware, nodes: int, gpus_per_node: int,
               include_approximate: bool = False, measured=None) -> list[Prediction]:
    """Predictions for every candidate, fastest first; exact plans only unless asked.
    ``measured(plan)``: that plan's ``MeasuredCompute`` where known, else None."""
    measured = measured or (lambda plan: None)
    preds = [predict(p, shape, hw, gpus_per_node, measured(p))
             for p in candidate_plans(shape, nodes, gpus_per_node)]
    preds = [p for p in preds if p.exact or include_approximate]
    return sorted(preds, key=lambda p: p.step_ms)


# Fitted on 2x H200 (benchmarks/results/h200x2/planner_validation.json); links as measured there.
# One-sided all-to-all: h200x2_s10/alltoall_2gpu.json (bus bandwidth 1.25x NCCL's at 256 MiB,
# 40 us per call up to 4 MiB).
H200 = Hardware(gemm_tflops=523.0, attention_tflops=640.0, intra_GBps=222.0, inter_GBps=2.1,
                inter_collective_GBps=2.7, onesided_GBps=278.0, onesided_latency_us=40.0)


def as_run_with(hw: Hardware, comm: str, nodes: int) -> Hardware:
    """The hardware as a torus run with ``comm`` sees it: its all-to-all goes over NVSHMEM with
    comm='nvshmem', or 'auto' on one machine ('auto' across machines stays with NCCL)."""
    if comm == "nvshmem" or (comm == "auto" and nodes == 1):
        return hw
    return replace(hw, onesided_GBps=None, onesided_latency_us=None)


def probe_hardware(device: str | None = None, cache_dir: str | None = None,
                   refresh: bool = False) -> Hardware:
    """GEMM and attention throughput of this machine's device, timed in a few
    seconds and cached per host and device name. Link bandwidths are not
    probed here (``benchmarks/link_probe.py`` needs all ranks); the H200
    session's measured values stand in until stated with ``--inter-bw``."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = device.type == "cuda"
    name = torch.cuda.get_device_name(device) if cuda else "cpu"
    cache_dir = cache_dir or os.path.join(os.path.expanduser("~"), ".cache", "swiftfusion-xdit")
    path = os.path.join(cache_dir, f"hardware-{socket.gethostname()}-{name.replace(' ', '_')}.json")
    if os.path.exists(path) and not refresh:
        try:  # only the probed compute is cached
            with open(path) as f:
                cached = json.load(f)
            return replace(H200, gemm_tflops=cached["gemm_tflops"], attention_tflops=cached["attention_tflops"])
        except (OSError, ValueError, KeyError, TypeError):
            pass  # unreadable or from another version: probe again
    dtype = torch.bfloat16 if cuda else torch.float32
    n = 4096 if cuda else 512
    sync = (lambda: torch.cuda.synchronize(device)) if cuda else (lambda: None)

    def tflops(fn, flops, repeats=5):
        fn()
        sync()
        t = time.perf_counter()
        for _ in range(repeats):
            fn()
        sync()
        return flops * repeats / (time.perf_counter() - t) / 1e12

    a = torch.randn(n, n, device=device, dtype=dtype)
    gemm = tflops(lambda: a @ a, 2 * n ** 3)
    s = 4096 if device == "cuda" else 512
    q = torch.randn(1, 24, s, 128, device=device, dtype=dtype)
    attn = tflops(lambda: torch.nn.functional.scaled_dot_product_attention(q, q, q),
                  4 * s * s * 24 * 128)
    os.makedirs(cache_dir, exist_ok=True)
    with open(path + ".tmp", "w") as f:  # whole or not at all: another process may read it
        json.dump({"gemm_tflops": gemm, "attention_tflops": attn}, f)
    os.replace(path + ".tmp", path)
    return replace(H200, gemm_tflops=gemm, attention_tflops=attn)  # links: not probed, see above


def choose_for(config, nodes: int, gpus_per_node: int, height: int = 1024, width: int = 1024,
               hw: Hardware | None = None, comm: str = "auto") -> Prediction:
    """``strategy="auto"``: the best exact plan for a transformer config on this topology,
    with torus's all-to-all over the transport ``comm`` will give it here.

    Flux-like configs get their real shape; others a generic DiT shape (12h^2
    GEMM weights per layer, image tokens only) from heads, head dim and layers.
    """
    get = config.get if hasattr(config, "get") else (lambda k, d=None: getattr(config, k, d))
    if get("num_single_layers") is not None:
        shape = ModelShape.flux(dict(config), height, width)
    else:
        h = get("num_attention_heads") * get("attention_head_dim")
        layers = get("num_layers")
        shape = ModelShape(layers=layers, heads=get("num_attention_heads"),
                           head_dim=get("attention_head_dim"), gemm_params_per_token=12 * h * h * layers,
                           image_tokens=(height // 16) * (width // 16))
    from .nvshmem_transport import unavailable_reason
    usable = comm if unavailable_reason() is None else "nccl"  # no NVSHMEM here: NCCL runs it
    return rank_plans(shape, as_run_with(hw or H200, usable, nodes), nodes, gpus_per_node)[0]
