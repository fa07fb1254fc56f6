#!/usr/bin/env bash
# One step of a multi-GPU device session, each under the 10-minute cap of a device call.
#
#   bash benchmarks/device_session.sh STEP OUT_FOLDER
#
# Run from the repository root on the device machine with .whl/ carried (it must hold
# ../shared/tools/device-wheels.sh's wheels and ours: pip wheel --no-deps . -w .whl/).
# Steps (N = GPUs on the machine):
#   gpu-tests  pytest tests/gpu: every GPU test this machine can run (one GPU: about 8 minutes),
#              results and logs in OUT_FOLDER
#   kernels    (N >= 2) the NVSHMEM tests with a GPU per rank (all-to-all vs NCCL, CUDA graphs and
#              compile over NVSHMEM) and Torus Attention on 2 emulated machines vs one GPU, with the
#              exchange's hidden share
#   alltoall   NVSHMEM vs NCCL all-to-all microbenchmark
#   shared     (one-GPU machines) the NVSHMEM tests with 4 processes sharing the GPU (the test
#              fixture starts and stops CUDA MPS)
#   harness-1  probes + xDiT + diffusers path, 1xN and 2x(N/2)            (new OUT_FOLDER)
#   harness-2  the same for Nx1 and the paced 50 GB/s twins               (--append)
#   compiled   compiled runs (xDiT --use_torch_compile)                    (--append)
#   pipefusion PipeFusion's patch count swept, PipeFusion + USP, 1xN and 2x(N/2) (--append)
#   graphs     the diffusers path under torch.compile with CUDA graphs, 1xN (--append)
#   video      Wan 2.1 14B, 81x720x1280 (75,600 tokens; one forward 12.2 s on one H200), 1xN (--append)
#   video-2    the same on 2x(N/2)                                          (--append)
#   rank-compute  (one GPU is enough) one rank's share of each grid, no communication
#   threads    (one GPU is enough) the tests of Torus Attention on every grid, one thread per rank,
#              vs plain attention, and of the LSE kernels at head dims that are not multiples of 8
#   merge      (one GPU is enough) the fused LSE merge: its tests, its speed, and eager rank compute
#              with each form
#   emulated   (one GPU is enough) FLUX.1-dev 2048² and 4096² on emulated 2x8 and 4x8 clusters at 50
#              and 12.5 GB/s per GPU between machines, eager and CUDA graphs: torus a2a-kv, usp,
#              diffusers' own
#   emulated-video  the same for Wan 2.1 14B at 720x1280: 81 frames on 2x8, 77 on 4x8
#   smoke      (one-GPU machines) the harness end to end as topology 1x1 (new OUT_FOLDER): its code
#              paths, and torus's own overhead beside xDiT's USP at one rank
# Appending steps need the earlier steps' folder in the working tree (unpack it into
# benchmarks/results/ and carry its ignored latents.pt files).
#
# A device call brings back at most 8 files (see the device tool's README), and a harness
# folder holds dozens. So, where the device tool's $OUT is set, the step ends with
# pack_out.sh: OUT_FOLDER becomes $OUT/NAME-STEP.tgz (and NAME-STEP-latents.tgz). Unpack
# here with: tar xzf /work/.device/N/NAME-STEP.tgz -C benchmarks/results/
# A folder under $OUT is removed once packed: to run several harness steps in one call,
# give them a folder in the repository (benchmarks/results/NAME), which stays.
set -uo pipefail
step=$1 out=$2
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD  # the checkout itself, not an installed copy
export NVSHMEM_DISABLE_NVLS=1 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1
export CUDA_MODULE_LOADING=EAGER
n=$(nvidia-smi -L | wc -l)
half=$((n / 2))
fail=0
run() { "$@" || fail=1; }  # every command runs; the step fails if any did
# the harness skips jobs that could not finish inside the call (the device's 10-minute cap)
harness() { run python3 benchmarks/harness.py --gpus "$n" --out "$out" --deadline 540 "$@"; }
# usp runs the layout torus took before a2a-kv (U=8 inside, kv across): the before of each row
emulated="python3 benchmarks/emulated_cluster.py --clusters 2x8,4x8 --links 400G,100G --modes eager,graph --repeats 5"
# GPU tests ($1: seconds), their JSON, Markdown and worker logs in $out; -rs names every skip's reason
gpu_tests() {
  local limit=$1; shift
  mkdir -p "$out" && SWIFTFUSION_GPU_RESULTS="$out" run timeout "$limit" python3 -m pytest -rs -p no:cacheprovider "$@"
}
case $step in
  gpu-tests) gpu_tests 570 tests/gpu ;;
  kernels)
    gpu_tests 550 tests/gpu/test_gpu_nvshmem.py::test_all_to_all_equals_nccls_and_the_heap_refuses_what_cannot_fit \
      tests/gpu/test_gpu_nvshmem.py::test_one_process_per_gpu \
      tests/gpu/test_gpu_multi.py::test_torus_attention_on_two_emulated_machines_matches_one_gpu ;;
  rank-compute)
    run timeout 400 python3 benchmarks/rank_compute.py --sizes 1024,2048 \
      --grids 1x1,1x2,1x4,1x8,2x1,2x2,4x1,2x4,4x2,8x1 --compile-grids 1x1,1x2,1x4 --out "$out"
    run timeout 150 python3 benchmarks/rank_compute.py --sizes 4096 --grids 1x1,1x4,1x8 \
      --compile-grids none --out "$out/4096" ;;
  threads)
    gpu_tests 470 tests/gpu/test_gpu_lse_kernels.py::test_lse_kernels_at_head_dims_that_are_not_multiples_of_8 \
      tests/gpu/test_gpu_thread_ranks.py ;;
  merge)
    gpu_tests 80 tests/gpu/test_gpu_lse_kernels.py -k merge
    run timeout 40 python3 benchmarks/kernel_speed.py --parts merge --out "$out"
    run timeout 450 python3 benchmarks/rank_compute.py --sizes 1024,2048 --grids 1x1,2x2,4x1,4x2,8x1 \
      --compile-grids none --merge torch,fused --host-ops --out "$out/rank_compute" ;;
  alltoall)  run timeout 500 torchrun --nproc-per-node "$n" benchmarks/alltoall_bench.py --out "$out"
             run python3 benchmarks/alltoall_report.py "$out/alltoall_${n}gpu.json" ;;  # table and plot
  shared)    gpu_tests 560 tests/gpu/test_gpu_nvshmem.py -k sharing ;;  # correctness only, nothing timed
  emulated)
    run timeout 260 $emulated --model flux-dev --size 2048 --strategies torus-a2a-kv,usp,diffusers --deadline 200 \
      --out "$out/flux2048"
    run timeout 280 $emulated --model flux-dev --size 4096 --strategies torus-a2a-kv,usp --deadline 220 \
      --out "$out/flux4096" ;;
  emulated-video)  # 81 frames = 75,600 tokens, which 32 ranks cannot split: 4x8 runs 77 (72,000)
    run timeout 300 $emulated --model wan2.1-14b --strategies torus-a2a-kv,usp --deadline 190 --clusters 2x8 \
      --out "$out/wan720"
    run timeout 200 $emulated --model wan2.1-14b --strategies torus-a2a-kv,usp --deadline 120 --clusters 4x8 \
      --frames 77 --out "$out/wan720_77frames" ;;
  smoke)     harness --topologies 1x1 --sizes 1024 --diffusers-sizes 1024 --timeout 150 ;;
  harness-1) harness --topologies "1x$n,2x$half" --sizes 1024 --timeout 240 ;;
  harness-2) harness --topologies "${n}x1,2x${half}p50,${n}x1p50" --sizes 1024 --timeout 240 --append ;;
  compiled)  harness --topologies "1x$n,2x$half" --sizes 1024 --suites xdit --compile --timeout 300 --append ;;
  pipefusion) harness --topologies "1x$n,2x$half" --sizes 1024 --suites pipefusion --timeout 240 --append ;;
  graphs)    harness --topologies "1x$n" --diffusers-sizes 1024 --suites diffusers --compile \
               --compile-mode reduce-overhead --timeout 400 --append ;;
  video)     harness --topologies "1x$n" --suites video --timeout 480 --append ;;  # 208 s at 1x1
  video-2)   harness --topologies "2x$half" --suites video --timeout 480 --append ;;
  *) echo "unknown step $step"; exit 2 ;;
esac
case $step in gpu-tests|kernels|alltoall|shared|rank-compute|merge|threads|emulated*) ;; *) run python3 benchmarks/report.py "$out" > /dev/null ;; esac
if [ -n "${OUT:-}" ] && [ -d "$out" ]; then run bash benchmarks/pack_out.sh "$out" "$step"; fi
exit $fail
