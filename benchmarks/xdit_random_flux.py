"""xDiT's own runner (what ``xdit`` launches) on FLUX.1-dev with random weights.

    torchrun --nproc-per-node 2 benchmarks/xdit_random_flux.py --model FLUX.1-dev-random \
        --ulysses_degree 2 --sp-strategy torus --height 1024 --width 1024 \
        --num_inference_steps 6 --prompt "a cat" --output_directory out/run1 [--emulate-nodes 2]

``xdit`` is ``torchrun -m xfuser.runner``; this file is that module's main
with one change: a model ``FLUX.1-dev-random`` is registered whose loader
builds the pipeline from FLUX.1-dev's configs with seeded random weights
(no download) instead of ``from_pretrained``. Everything else is xfuser's:
its argument parser (with our ``--sp-strategy``), ``xFuserModelRunner``,
the Flux runner model, ``xFuserFlux1Transformer2DWrapper`` and its
``USP(...)`` attention. Writes ``latents.pt`` (the last rank's final latents,
packed) and ``result.json`` (per-step latency of the second call, and GPU time
per layer from a third, profiled one) to ``--output_directory``.
"""

from __future__ import annotations

import json
import os
import statistics
import sys

import torch

import paced_link


def emulate_nodes(argv: list[str]) -> tuple[list[str], int]:
    """Give each rank a machine name before NCCL starts (``--emulate-nodes N``)."""
    if "--emulate-nodes" not in argv:
        return argv, 1
    i = argv.index("--emulate-nodes")
    nodes = int(argv[i + 1])
    from swiftfusion_xdit.topology import emulate_machines
    emulate_machines(nodes)
    return argv[:i] + argv[i + 2:], nodes


def last_call_of_each_step(calls: int, steps: int, warmup: int, patches: int) -> list[int]:
    """Which step-end callbacks end a denoising step. PipeFusion's last stage calls back
    once per step in its ``warmup`` synchronous steps, then once per patch, its step
    index counting from 0 again; everything else calls back once per step."""
    if calls == steps:
        return list(range(steps))
    if steps <= warmup or calls != warmup + (steps - warmup) * patches:
        raise ValueError(f"{calls} step-end callbacks for {steps} steps: expected {steps}, or "
                         f"{warmup} warm-up steps then {patches} patches per step")
    return list(range(warmup)) + [warmup + (k + 1) * patches - 1 for k in range(steps - warmup)]


def register_random_flux():
    from xfuser.model_executor.models.runner_models.base_model import DiffusionOutput, register_model
    from xfuser.model_executor.models.runner_models.flux import xFuserFluxModel
    from xfuser.core.distributed import get_runtime_state, get_pipeline_parallel_world_size

    @register_model("FLUX.1-dev-random")
    class RandomFlux(xFuserFluxModel):
        step_ms: list[float] = []

        def _load_model(self):
            from xfuser.model_executor.models.transformers.transformer_flux import (
                xFuserFlux1Transformer2DWrapper)
            from swiftfusion_xdit.tiny import flux_dev_random_pipeline
            device = f"cuda:{torch.cuda.current_device()}"
            if self.config.pipefusion_parallel_degree > 1:  # xfuser wraps the whole pipeline
                from xfuser.model_executor.pipelines.pipeline_flux import xFuserFluxPipeline
                # fp16, as xfuser's own Flux runner loads it for PipeFusion (its runtime dtype)
                pipe = flux_dev_random_pipeline(seed=0, device=device, dtype=torch.float16)
                return xFuserFluxPipeline(pipe, self.engine_config)
            return flux_dev_random_pipeline(seed=0, device=device,
                                            transformer_cls=xFuserFlux1Transformer2DWrapper)

        def _post_load_and_state_initialization(self, input_args):
            pass  # weights are already random on the device; nothing to fill or place

        def _run_pipe(self, input_args):
            get_runtime_state().set_input_parameters(
                batch_size=1, num_inference_steps=input_args["num_inference_steps"],
                max_condition_sequence_length=input_args["max_sequence_length"],
                split_text_embed_in_sp=get_pipeline_parallel_world_size() == 1)
            start = torch.cuda.Event(enable_timing=True)
            start.record()
            calls = []  # an event per step-end callback (PipeFusion: per patch, last stage only)
            pipefusion = get_pipeline_parallel_world_size() > 1
            warmup = get_runtime_state().runtime_config.warmup_steps if pipefusion else 0
            patches = get_runtime_state().num_pipeline_patch if pipefusion else 1

            def on_step_end(pipe, i, t, kwargs):
                calls.append(torch.cuda.Event(enable_timing=True))
                calls[-1].record()
                return kwargs

            out = self.pipe(height=input_args["height"], width=input_args["width"],
                            prompt=input_args["prompt"],
                            num_inference_steps=input_args["num_inference_steps"],
                            guidance_scale=input_args["guidance_scale"],
                            max_sequence_length=input_args["max_sequence_length"],
                            generator=self._make_generator(input_args["seed"]),
                            output_type="latent", callback_on_step_end=on_step_end)
            torch.cuda.synchronize()
            RandomFlux.step_ms = None  # PipeFusion's other stages see no step end
            if calls:
                steps = input_args["num_inference_steps"]
                ends = [calls[k] for k in last_call_of_each_step(len(calls), steps, warmup, patches)]
                events = [start] + ends
                RandomFlux.step_ms = [a.elapsed_time(b) for a, b in zip(events, events[1:])]
            RandomFlux.latents = out.images if out is not None else None  # PipeFusion: last stage only
            return DiffusionOutput(images=[], pipe_args=input_args)

    return RandomFlux


def profiled_run(runner, input_args, pipeline_stages: int) -> dict:
    """One more call under the profiler: GPU time per transformer layer (the layers this
    rank runs -- all of them, or its PipeFusion stage's -- in every step; the text
    encoders' kernels count as other compute), the rank with the most exposed communication."""
    from kernel_breakdown import profile_step, slowest_rank
    from swiftfusion_xdit.tiny import FLUX_DEV_TRANSFORMER
    blocks = FLUX_DEV_TRANSFORMER["num_layers"] + FLUX_DEV_TRANSFORMER["num_single_layers"]
    layers = blocks / pipeline_stages * input_args["num_inference_steps"]
    return slowest_rank(profile_step(lambda: runner.run(input_args), layers))


def main():
    paced_gbps = paced_link.install_from_env()  # before xfuser binds anything
    sys.argv, nodes = emulate_nodes(sys.argv)
    import swiftfusion_xdit.xfuser_integration as integration
    integration.install()  # what the .pth hook does in a wheel install (editable installs skip it)
    import torch.distributed as dist
    from xfuser import xFuserArgs
    from xfuser.config import FlexibleArgumentParser
    from xfuser.runner import xFuserModelRunner

    model_cls = register_random_flux()
    args = vars(xFuserArgs.add_runner_args(FlexibleArgumentParser()).parse_args())
    runner = xFuserModelRunner(args)
    input_args = runner.preprocess_args(args)
    runner.initialize(input_args)
    runner.run(input_args)  # warm-up call
    runner.run(input_args)
    steps_ms = model_cls.step_ms
    per_layer = profiled_run(runner, input_args, args["pipefusion_parallel_degree"])
    if dist.get_rank() == dist.get_world_size() - 1:  # xfuser's output rank (last stage)
        steps = steps_ms[1:]  # the first step carries one-off costs
        out_dir = args["output_directory"]
        os.makedirs(out_dir, exist_ok=True)
        torch.save(model_cls.latents.float().cpu(), os.path.join(out_dir, "latents.pt"))
        layout = integration._STATE.get("layout")
        result = {"device": torch.cuda.get_device_name(), "world": dist.get_world_size(),
                  "emulated_nodes": nodes, "paced_inter_GBps": paced_gbps,
                  "sp_strategy": args["sp_strategy"], "sp_comm": args["sp_comm"],
                  "ulysses_degree": args["ulysses_degree"], "ring_degree": args["ring_degree"],
                  "pipefusion_parallel_degree": args["pipefusion_parallel_degree"],
                  "layout": layout.describe() if layout and args["sp_strategy"] == "torus" else None,
                  "height": input_args["height"], "width": input_args["width"],
                  "step_ms": steps_ms, "timed": "per denoising step",
                  "median_step_ms": statistics.median(steps),
                  "per_layer": per_layer}
        with open(os.path.join(out_dir, "result.json"), "w") as f:
            json.dump(result, f, indent=2)
        print(json.dumps(result), flush=True)
    runner.cleanup()


if __name__ == "__main__":
    main()
