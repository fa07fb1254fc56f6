"""``swiftfusion-xdit generate``: run a diffusers pipeline sequence-parallel;
``swiftfusion-xdit plan``: rank the SP strategies for a model and cluster.

With no ``--model`` it runs the embedded default: a tiny random-weight Flux
pipeline (real diffusers classes, nothing downloaded) on 4 CPU ranks with
gloo, checks the parallel image against a single-process run and prints both
timings. Launched outside torchrun, it re-launches itself under torchrun
(like xDiT's ``xdit``).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time

import torch


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive whole number, not {text}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, not {text}")
    return value


def _pixels(text: str) -> int:
    value = _positive(text)
    if value % 16:
        raise argparse.ArgumentTypeError(f"must be a multiple of 16 (the VAE's 8 x the 2x2 patches), "
                                         f"not {text}")
    return value


class _OneLineParser(argparse.ArgumentParser):
    """Bad input gets one line on stderr and exit code 2 (argparse's usual error also
    prints the whole usage, which buries the reason)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def _parser() -> argparse.ArgumentParser:
    ap = _OneLineParser(prog="swiftfusion-xdit")
    sub = ap.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="generate an image sequence-parallel")
    g.add_argument("--model", help="local folder or hub id of a diffusers pipeline "
                                   "(default: embedded tiny random-weight Flux)")
    g.add_argument("--prompt", default="a photo of a red car at night")
    g.add_argument("--height", type=_positive, default=None)
    g.add_argument("--width", type=_positive, default=None)
    g.add_argument("--steps", type=_positive, default=None)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--sp-strategy", default="torus", choices=("torus", "ulysses", "ring", "usp", "auto"))
    g.add_argument("--ulysses-degree", type=_positive, default=None)
    g.add_argument("--torus-degree", type=_positive, default=None)
    g.add_argument("--sp-comm", default="auto", choices=("auto", "gloo", "nccl", "nvshmem"))
    # not --nproc: the whole command line passes through torchrun's parser, where --nproc
    # is an ambiguous abbreviation of --nproc-per-node/--nproc_per_node
    g.add_argument("--ranks", type=_positive, default=None, help="ranks to launch (default: GPUs, or 4 on CPU)")
    g.add_argument("--emulate-nodes", type=_positive, default=None,
                   help="pretend the ranks sit on this many machines (sets SWIFTFUSION_NODE/NCCL_HOSTID); "
                        "default: 2 for the embedded model, so its run crosses a (pretend) machine boundary")
    g.add_argument("--check", action=argparse.BooleanOptionalAction, default=None,
                   help="compare with a single-process run (default: on for the embedded model)")
    g.add_argument("--output", default="swiftfusion.png")

    p = sub.add_parser("plan", help="rank SP strategies for a model and cluster by predicted step time")
    p.add_argument("--model", default="flux-dev", choices=("flux-dev", "wan2.1-14b"),
                   help="transformer config (real configs, built in)")
    p.add_argument("--height", type=_pixels, default=1024)
    p.add_argument("--width", type=_pixels, default=1024)
    p.add_argument("--frames", type=_positive, default=81, help="video models only")
    p.add_argument("--nodes", type=_positive, required=True)
    p.add_argument("--gpus-per-node", type=_positive, required=True)
    p.add_argument("--inter-bw", type=_positive_float, default=None,
                   help="GB/s per GPU per direction between machines (400 Gb/s per GPU = 50)")
    p.add_argument("--intra-bw", type=_positive_float, default=None, help="GB/s per GPU inside a machine")
    p.add_argument("--sp-comm", default="auto", choices=("auto", "nccl", "nvshmem"),
                   help="torus's transport: its all-to-all inside a machine goes over NVSHMEM with nvshmem, "
                        "or auto on one machine (measured H200 numbers)")
    p.add_argument("--hardware", default="h200", choices=("h200", "probe"),
                   help="compute throughput: measured H200 numbers, or probe this machine (cached)")
    p.add_argument("--include-approximate", action="store_true",
                   help="also rank PipeFusion (stale activations: approximate output)")
    return ap


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = _parser().parse_args(argv)
    if args.command == "plan":
        print(plan_report(args))
        return
    if "RANK" not in os.environ:
        problem = _model_argument_problem(args.model)
        if problem:  # before any rank starts: said once, not by each rank
            print(f"swiftfusion-xdit generate: {problem}", file=sys.stderr)
            sys.exit(2)
        _relaunch_under_torchrun(args, argv)
    else:
        _generate(args)


def plan_report(args) -> str:
    import dataclasses

    from . import planner
    from .tiny import FLUX_DEV_TRANSFORMER
    if args.model == "flux-dev":
        shape = planner.ModelShape.flux(FLUX_DEV_TRANSFORMER, args.height, args.width)
        what = f"FLUX.1-dev {args.height}x{args.width}"
    else:
        shape = planner.ModelShape.wan(planner.WAN21_14B, args.frames, args.height, args.width)
        what = f"Wan2.1-14B {args.frames} frames {args.height}x{args.width}"
    hw = planner.H200 if args.hardware == "h200" else planner.probe_hardware()
    hw = dataclasses.replace(hw, **{k: v for k, v in (("inter_GBps", args.inter_bw),
                                                       ("inter_collective_GBps", args.inter_bw),
                                                       ("intra_GBps", args.intra_bw)) if v is not None})
    hw = planner.as_run_with(hw, args.sp_comm, args.nodes)
    preds = planner.rank_plans(shape, hw, args.nodes, args.gpus_per_node, args.include_approximate)
    lines = [f"{what}: {shape.tokens} tokens, {args.nodes} machine(s) x {args.gpus_per_node} GPU(s); "
             f"GEMM {hw.gemm_tflops:.0f} / attention {hw.attention_tflops:.0f} TFLOP/s, links "
             f"{hw.intra_GBps:.0f} GB/s inside, {hw.inter_GBps:.1f} GB/s between machines",
             f"{'plan':<38} {'step ms':>9} {'compute':>9} {'a2a':>8} {'exchange':>9} {'hidden':>8}"]
    for p in preds:
        lines.append(f"{p.plan.describe():<38} {p.step_ms:9.1f} {p.compute_ms:9.1f} {p.intra_ms:8.1f} "
                     f"{p.inter_ms:9.1f} {p.hidden_ms:8.1f}" + "".join(f"  [{w}]" for w in p.why))
    lines.append(f"best: {preds[0].plan.describe()}")
    return "\n".join(lines)


def _relaunch_under_torchrun(args, argv: list[str]) -> None:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun
    nproc = args.ranks or (torch.cuda.device_count() if torch.cuda.is_available() else 4)
    # Each rank would repeat the same start-up chatter (torchrun's OMP_NUM_THREADS notice,
    # transformers' torchvision fallback notice); the ranks set their own thread counts.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    try:
        torchrun(["--nproc-per-node", str(nproc), "--master-port", str(_free_port()),
                  "-m", "swiftfusion_xdit.cli", *argv])
    except ChildFailedError as err:  # the ranks said why; pass on their exit code, not a traceback
        codes = [failure.exitcode for failure in err.failures.values()]  # negative: a signal
        if max(codes) != 2:  # 2: a refused input, already said once by rank 0
            print(f"swiftfusion-xdit generate: ranks failed with exit codes {sorted(set(codes))} "
                  f"(their output is above)", file=sys.stderr)
        sys.exit(max(codes) if max(codes) > 0 else 1)


def _model_argument_problem(model: str | None) -> str | None:
    """Why ``--model`` cannot name a diffusers pipeline, if that shows without loading it."""
    if model is None:
        return None
    if os.path.isdir(model):
        if not os.path.isfile(os.path.join(model, "model_index.json")):
            return f"--model {model} is a folder but not a diffusers pipeline (it has no model_index.json)"
        return None
    from huggingface_hub.utils import HFValidationError, validate_repo_id
    try:
        validate_repo_id(model)
    except HFValidationError:
        return f"--model {model} is neither a folder nor a valid hub id (like black-forest-labs/FLUX.1-dev)"
    return None


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _generate(args) -> None:
    import warnings
    warnings.filterwarnings("ignore", message=".*all_gather_tensor.*is deprecated")
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    nodes = args.emulate_nodes or (2 if args.model is None and world % 2 == 0 else 1)
    from swiftfusion_xdit.topology import emulate_machines
    try:
        emulate_machines(nodes)
    except ValueError as err:
        _fail(rank, err)
    import torch.distributed as dist

    import swiftfusion_xdit
    from swiftfusion_xdit.diffusers_integration import SequenceSplitError, ensure_distributed, plan_strategy
    from swiftfusion_xdit.mesh import LayoutError

    device = ensure_distributed()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world) if device.type == "cpu" else 8)
    tiny = args.model is None
    height, width = args.height or (64 if tiny else 1024), args.width or (64 if tiny else 1024)
    steps = args.steps or (4 if tiny else 28)
    check = tiny if args.check is None else args.check
    call = dict(prompt=args.prompt, height=height, width=width, num_inference_steps=steps)
    if tiny:
        call["max_sequence_length"] = 16

    def run(pipe, output_type="pil"):
        generator = torch.Generator(device="cpu").manual_seed(args.seed)
        start = time.perf_counter()
        out = pipe(**call, generator=generator, output_type=output_type)
        return out, time.perf_counter() - start

    try:
        pipe = _load(args, device)
    except (OSError, ValueError) as err:  # hub errors are OSErrors; their first line says why
        _fail(rank, f"cannot load --model {args.model}: {str(err).strip().splitlines()[0]}")
    try:  # refuse bad input before the (long) single-process run
        _check_size(pipe, height, width)
        plan_strategy(args.sp_strategy, pipe.transformer.config.num_attention_heads,
                      ulysses=args.ulysses_degree, torus=args.torus_degree, config=pipe.transformer.config,
                      comm=args.sp_comm)
        _check_flux_split(pipe, height, width, call.get("max_sequence_length", 512), world)
    except (LayoutError, ValueError) as err:
        _fail(rank, err)
    reference = None
    if check and rank == 0:  # the single-process run, on rank 0 alone, before the pipeline is split
        reference, t_single = run(pipe, "latent")
    dist.barrier()
    pipe = swiftfusion_xdit.enable_parallel(pipe, args.sp_strategy,
                                            ulysses=args.ulysses_degree, torus=args.torus_degree,
                                            comm=args.sp_comm, output_on_all_ranks=True)
    try:
        latents, t_parallel = run(pipe, "latent")
    except SequenceSplitError as err:  # models whose token counts only show at their first forward
        _fail(rank, err)
    passed = True
    if rank == 0:
        layout = pipe.parallel_layout
        print(f"swiftfusion-xdit: {args.sp_strategy} on {world} ranks ({device.type}): {layout.describe()}")
        for note in layout.notes:
            print(f"  - {note}")
        print(f"parallel run: {t_parallel:.2f} s for {steps} steps at {width}x{height}")
        latents = _output_tensor(latents)
        if reference is not None:
            reference = _output_tensor(reference).double()
            err = ((latents.double() - reference).norm() / reference.norm()).item()
            tol = 1e-4 if latents.dtype == torch.float32 else 2e-2
            passed = err < tol
            print(f"single process: {t_single:.2f} s")
            print(f"check against single process: relative error {err:.2e} "
                  f"({'PASS' if passed else 'FAIL'}, tolerance {tol:g})")
        _save(pipe, latents, height, width, args.output)
    dist.barrier()
    dist.destroy_process_group()
    if not passed:
        sys.exit(1)


def _check_size(pipe, height: int, width: int) -> None:
    """Flux-family pipelines pack 2x2 latent patches: other sizes would be resized silently."""
    if not hasattr(pipe, "_unpack_latents"):
        return
    multiple = 2 * pipe.vae_scale_factor
    for name, value in (("--height", height), ("--width", width)):
        if value % multiple:
            raise ValueError(f"{name} {value} is not a multiple of {multiple} (the VAE's "
                             f"{pipe.vae_scale_factor}x downsampling times the 2x2 patches); "
                             f"try {max(multiple, value // multiple * multiple)}")


def _check_flux_split(pipe, height: int, width: int, text_tokens: int, world: int) -> None:
    """The image and text tokens are each shared equally by the ranks (diffusers' split):
    say which rank counts can, before any rank starts the model. Other models are checked
    at their first forward (diffusers_integration's pre-hook)."""
    if not hasattr(pipe, "_unpack_latents") or world == 1:
        return
    image_tokens = (height // (2 * pipe.vae_scale_factor)) * (width // (2 * pipe.vae_scale_factor))
    if image_tokens % world or text_tokens % world:
        from .diffusers_integration import rank_counts_that_split
        raise ValueError(f"{world} ranks cannot share {image_tokens} image and {text_tokens} text tokens "
                         f"equally at {width}x{height}; --ranks that can: "
                         f"{rank_counts_that_split((image_tokens, text_tokens))}")


def _fail(rank: int, err: Exception | str):
    """A refused input: one message (rank 0), no traceback, exit code 2 on every rank."""
    import torch.distributed as dist
    if rank == 0:
        print(f"swiftfusion-xdit generate: {err}", file=sys.stderr)
    if dist.is_initialized():  # leave together: torchrun would SIGTERM a rank still running
        dist.barrier()
        dist.destroy_process_group()
    sys.exit(2)


def _output_tensor(output) -> torch.Tensor:
    """The latents of a pipeline output: ``images`` (image pipelines) or ``frames`` (video)."""
    return output.images if hasattr(output, "images") else output.frames


def _save(pipe, latents, height, width, path: str) -> None:
    image = _decode_flux(pipe, latents, height, width)
    if image is None:
        print(f"not saved: decoding latents to pixels is written for Flux-family pipelines only, and "
              f"{type(pipe).__name__} is not one (the check above stands)")
        return
    image.save(path)
    print(f"saved {path}")


def _decode_flux(pipe, latents, height, width):
    """Flux latents -> PIL image, as FluxPipeline does after its loop (None for other models)."""
    config = pipe.vae.config if hasattr(pipe, "vae") else {}
    if not (hasattr(pipe, "_unpack_latents") and "shift_factor" in config and "scaling_factor" in config):
        return None
    latents = pipe._unpack_latents(latents, height, width, pipe.vae_scale_factor)
    latents = latents / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor
    with torch.no_grad():
        decoded = pipe.vae.decode(latents, return_dict=False)[0]
    return pipe.image_processor.postprocess(decoded, output_type="pil")[0]


def _load(args, device):
    if args.model is None:
        from swiftfusion_xdit.tiny import tiny_flux_pipeline
        return tiny_flux_pipeline(args.seed).to(device)
    from diffusers import DiffusionPipeline
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    return DiffusionPipeline.from_pretrained(args.model, dtype=dtype).to(device)


if __name__ == "__main__":
    main()
