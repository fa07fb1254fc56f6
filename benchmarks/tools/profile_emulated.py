"""Where one rank's step goes, per strategy, on an emulated cluster with instant links: the
CUDA kernels' total time by name (torch.profiler), side by side, two forwards each.

    python benchmarks/tools/profile_emulated.py --model flux-dev --size 4096 --cluster 4x8 \
        --strategies torus-kv,torus-a2a-kv
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import emulated_cluster as ec  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="flux-dev", choices=tuple(ec.MODELS))
    ap.add_argument("--size", type=int, default=2048)
    ap.add_argument("--frames", type=int, default=81)
    ap.add_argument("--height", type=int, default=720)
    ap.add_argument("--width", type=int, default=1280)
    ap.add_argument("--cluster", default="4x8")
    ap.add_argument("--strategies", default="torus-kv,torus-a2a-kv")
    ap.add_argument("--top", type=int, default=12)
    args = ap.parse_args()
    device, dtype = torch.device("cuda"), torch.bfloat16
    machines, gpus = map(int, args.cluster.split("x"))
    base = ec.build(args.model, device, dtype)
    kw = ec.model_inputs(args, device, dtype)
    ec.emulate(machines * gpus, gpus, 0, ec.INSTANT)
    models = {}
    for spec in args.strategies.split(","):
        models[spec] = ec.shared_copy(base)
        print(spec, ec.parallelize(models[spec], spec, machines, gpus, device), flush=True)
    with torch.no_grad():
        for spec, model in models.items():
            ec.forward(model, kw)
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
                for _ in range(2):
                    ec.forward(model, kw)
                torch.cuda.synchronize()
            print(f"\n== {spec}: two forwards", flush=True)
            print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=args.top, max_name_column_width=60))


if __name__ == "__main__":
    main()
