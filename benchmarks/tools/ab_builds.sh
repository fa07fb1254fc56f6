#!/usr/bin/env bash
# Two builds of swiftfusion-xdit side by side on one GPU, in one device call (from the
# repository root):
#
#   bash benchmarks/tools/ab_builds.sh OLD_WHEEL_DIR OUT_FOLDER
#
# OLD_WHEEL_DIR holds the wheel of an earlier revision (git worktree add /tmp/old REV &&
# pip wheel --no-deps /tmp/old -w .whl_old); .whl/ holds the dependencies and the current
# build, as for device_session.sh. Each build, in its own processes on the same GPU
# (rank compute in the order old, new, new, old: ab_table.py takes each build's mean):
#   - one rank's eager compute per grid (rank_compute.py; the Ulysses and torus layouts
#     run through Torus Attention over a loopback transport), 1024² (AB_SIZES, AB_GRIDS)
#   - xDiT's runner at one rank, torus, beside xDiT's own USP once (the same GPU and call)
# ab_table.py joins the two into ab.md.
set -uo pipefail
old=$1 out=$2
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/old "$old"/swiftfusion_xdit-*.whl || exit 1
export NVSHMEM_DISABLE_NVLS=1 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1
fail=0
run() { "$@" || fail=1; }
grids=${AB_GRIDS:-1x1,1x2,1x4,2x1,4x1,2x2} sizes=${AB_SIZES:-1024}
xdit() {  # $1 = build label, rest = strategy flags
  local label=$1; shift
  run timeout 150 torchrun --nproc-per-node 1 benchmarks/xdit_random_flux.py --model FLUX.1-dev-random \
    --height 1024 --width 1024 --num_inference_steps 6 --prompt "a cat" --seed 42 "$@" \
    --output_directory "$out/xdit_$label" > "$out/xdit_$label.log" 2>&1
}
mkdir -p "$out"
for build in old new new2 old2; do  # ABBA: drift during the call falls on both builds alike
  site=/tmp/site; case $build in old*) site=/tmp/old:/tmp/site ;; esac
  PYTHONPATH=$site run timeout 200 python3 benchmarks/rank_compute.py --sizes "$sizes" --grids "$grids" \
    --compile-grids none --out "$out/rank_compute_$build"
  case $build in *2) ;; *) PYTHONPATH=$site xdit "torus_$build" --sp-strategy torus --sp-comm nccl ;; esac
done
PYTHONPATH=/tmp/site xdit usp --sp-strategy usp
run python3 benchmarks/tools/ab_table.py "$out"
if [ -n "${OUT:-}" ]; then run bash benchmarks/pack_out.sh "$out" ab; fi  # one returned file, not dozens
exit $fail
