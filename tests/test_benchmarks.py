"""The benchmark harness's job list and the reports' arithmetic, on committed results; the
A/B tools (benchmarks/tools/); and, reduced to CPU, the threads-as-ranks machinery of the
GPU tests (tests/gpu/thread_ranks.py)."""

import json
import os
import shutil
import sys

import pytest


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "benchmarks")
sys.path[:0] = [BENCH, os.path.join(BENCH, "tools"), os.path.join(ROOT, "tests", "gpu")]

import harness  # noqa: E402
import report  # noqa: E402


def test_harness_runs_every_usp_split_pipefusion_and_torus_per_topology():
    jobs = harness.xdit_jobs(gpus=4, nodes=2, size=2048, steps=6)
    names = [name for name, _, _ in jobs]
    assert names == ["xdit-usp-u1r4", "xdit-usp-u2r2", "xdit-usp-u4r1", "xdit-pipefusion-4",
                     "xdit-torus-nccl", "xdit-torus-nvshmem"]
    for _, nproc, args in jobs:
        assert nproc == 4
        assert args[args.index("--emulate-nodes") + 1] == "2"  # every job crosses the same machines
        assert args[args.index("--height") + 1] == "2048"
    assert "--emulate-nodes" not in harness.xdit_jobs(gpus=2, nodes=1, size=1024, steps=6)[0][2]
    compiled = harness.xdit_jobs(gpus=2, nodes=1, size=1024, steps=6, compile_=True)
    assert all("--use_torch_compile" in args for _, _, args in compiled)  # xDiT's own compile path


def test_pipefusion_suite_sweeps_patches_and_pairs_stages_with_usp():
    jobs = {name: args for name, _, args in harness.pipefusion_jobs(gpus=4, nodes=1, size=1024, steps=6)}
    assert list(jobs) == ["xdit-pipefusion-4-p8", "xdit-pipefusion-4-p16",
                          "xdit-pipefusion-2-u1r2", "xdit-pipefusion-2-u2r1"]
    flag = lambda name, f: jobs[name][jobs[name].index(f) + 1]
    assert flag("xdit-pipefusion-4-p16", "--num_pipeline_patch") == "16"
    assert (flag("xdit-pipefusion-2-u2r1", "--pipefusion_parallel_degree"), flag("xdit-pipefusion-2-u2r1", "--ulysses_degree"),
            flag("xdit-pipefusion-2-u2r1", "--ring_degree")) == ("2", "2", "1")
    assert [n for n, _, _ in harness.pipefusion_jobs(gpus=2, nodes=1, size=1024, steps=6)] == [
        "xdit-pipefusion-2-p4", "xdit-pipefusion-2-p8"]  # two GPUs: no stage holds a USP split
    assert harness.pipefusion_jobs(gpus=1, nodes=1, size=1024, steps=6) == []  # one stage is no pipeline
    import validate_planner
    from swiftfusion_xdit.planner import Plan
    shape = validate_planner.ModelShape.flux(validate_planner.FLUX_DEV_TRANSFORMER, 1024, 1024)
    assert validate_planner.plan_for("", "xdit-pipefusion-4-p8", 4, 1, shape) == Plan("pipefusion", 1, 4)
    assert validate_planner.plan_for("", "xdit-pipefusion-2-u2r1", 4, 1, shape) is None  # not modelled


def test_report_takes_every_number_from_the_results_files(tmp_path):
    folder = tmp_path / "run"
    shutil.copytree(os.path.join(BENCH, "results", "h200x2"), folder)
    report.main(str(folder))
    table = (folder / "report.md").read_text()
    rows = json.load(open(folder / "harness.json"))["rows"]
    torus = next(r for r in rows if r["name"].startswith("xdit-torus-nccl 2x1"))
    assert f"| 2x1 | 1024² | xdit-torus-nccl | {torus['result']['median_step_ms']:.1f} |" in table
    # communication floor by hand: torus kv over 2 machines sends 2X per layer,
    # X = 2048 image tokens (text is replicated in xDiT) x 3072 x 2 bytes, 57 layers
    probe = json.load(open(folder / "probe_2x1.json"))
    bw = max(probe["inter_machine_GBps_per_gpu_per_direction"],
             probe["inter_machine_all_gather_GBps_per_gpu_in"])
    floor_ms = 2 * 2048 * 3072 * 2 * 57 / (bw * 1e6)
    line = next(l for l in table.splitlines() if l.startswith("| 2x1 | 1024² | xdit-torus-nccl |"))
    columns = [c.strip() for c in line.strip("|").split("|")]
    assert columns[7] == f"{floor_ms:.0f}"
    assert columns[6] == "—"  # no rank_compute.json in that folder
    assert (folder / "latency.png").stat().st_size > 0 and (folder / "speedup.png").stat().st_size > 0


def test_report_shows_the_compute_floor_of_a_measured_grid(tmp_path):
    """With rank_compute.json in the folder, eager FLUX rows whose grid was measured show
    that rank's compute (USP's ring reads torus kv's grid)."""
    folder = tmp_path / "run"
    shutil.copytree(os.path.join(BENCH, "results", "h200x2"), folder)
    rows = [dict(size=1024, grid="2x1", ranks=2, ulysses=1, torus=2, exchange="kv", compiled=False,
                 ms=141.5, attention_ms_per_layer=0.25, other_ms_per_layer=2.2)]
    (folder / "rank_compute.json").write_text(json.dumps({"device": "H", "rows": rows}))
    report.main(str(folder))
    table = (folder / "report.md").read_text()
    for strategy in ("xdit-torus-nccl", "xdit-usp-u1r2", "diffusers-ring"):
        line = next(l for l in table.splitlines() if l.startswith(f"| 2x1 | 1024² | {strategy} |"))
        assert [c.strip() for c in line.strip("|").split("|")][6] == "141.5", strategy
    line = next(l for l in table.splitlines() if l.startswith("| 2x1 | 1024² | xdit-usp-u2r1 |"))
    assert [c.strip() for c in line.strip("|").split("|")][6] == "—"  # ulysses=2 grid not measured


def test_paced_twins_carry_their_link_and_compiled_runs_leave_them_out():
    import argparse
    args = argparse.Namespace(topologies="1x4,2x2", paced_gbps=50.0, compile=False,
                              suites="probe,xdit,diffusers,video", sizes="1024", diffusers_sizes="1024",
                              video_sizes="81x480x832", steps=4, out="out")
    labels, plan = harness.build_plan(args, 4)
    assert labels == ["1x4", "2x2", "2x2p50"]
    paced = [job for job in plan if "2x2p50" in job[1]]
    assert paced and all(job[6] == {"SWIFTFUSION_PACED_GBPS": "50.0", "SWIFTFUSION_PACED_NODES": "2"}
                         for job in paced)
    assert all(job[6] == {} for job in plan if "2x2p50" not in job[1])  # NCCL-socket runs: no pacing
    diffusers = next(job for job in paced if job[0] == "diffusers")
    assert "torus-nvshmem" in diffusers[4][diffusers[4].index("--strategies") + 1]  # inside machines only
    strategies = {job[1]: job[4][job[4].index("--strategies") + 1].split(",") for job in plan
                  if job[0] in ("diffusers", "video")}
    # one machine also runs the head-chunked all-to-all: FLUX's 6 heads per rank in 2, Wan's 10 in 2
    assert "torus-nccl+hc2" in strategies["diffusers 1x4"] and "torus-nccl+hc2" in strategies["video 1x4"]
    assert not any("+hc" in s for name, names in strategies.items() if "2x2" in name for s in names)
    assert harness.head_chunks(24, 8) == 3 and harness.head_chunks(24, 24) is None
    video = [job for job in plan if job[1] == "video 2x2p50"]
    assert len(video) == 1 and video[0][4][:2] == ["--model", "wan2.1-14b"]
    assert video[0][5].endswith("wan2.1-14b_check_2x2p50_nccl.json")
    labels, compiled = harness.build_plan(
        argparse.Namespace(**{**vars(args), "compile": True, "compile_mode": "reduce-overhead"}), 4)
    assert labels == ["1x4", "2x2"]
    diffusers = next(job for job in compiled if job[0] == "diffusers")
    assert diffusers[4][-3:] == ["--compile", "--compile-mode", "reduce-overhead"]  # CUDA graphs asked for


def test_append_reuses_the_one_gpu_reference_an_earlier_call_left(tmp_path):
    import torch
    ref_dir = tmp_path / "xdit_1024_1gpu"
    ref_dir.mkdir()
    (ref_dir / "result.json").write_text(json.dumps({"height": 1024, "world": 1}))
    torch.save(torch.ones(3), ref_dir / "latents.pt")
    job = ("xdit", "xdit 1 GPU 1024", 1, "xdit_random_flux.py", [], str(ref_dir), {})
    earlier = {"rows": [{"name": "xdit 1 GPU 1024", "rc": 0}]}
    refs = {}
    assert harness._reusable_reference(job, earlier, refs) and torch.equal(refs[1024], torch.ones(3))
    assert not harness._reusable_reference(job, {"rows": [{"name": "xdit 1 GPU 1024", "rc": 1}]}, {})
    multi = ("xdit", "xdit-usp-u2r1 1x2 1024", 2, "xdit_random_flux.py", [], str(ref_dir), {})
    assert not harness._reusable_reference(multi, earlier, {})  # only one-GPU references are reused


def test_report_compares_compiled_runs_with_compiled_runs_only(tmp_path):
    folder = tmp_path / "run"
    shutil.copytree(os.path.join(BENCH, "results", "h200x2"), folder)
    compiled = json.load(open(folder / "harness.json"))
    compiled["compiled"] = True
    for row in compiled["rows"]:  # a made-up compiled run: every step twice as fast
        if row["kind"] == "xdit" and "result" in row:
            row["result"]["median_step_ms"] /= 2
    (folder / "harness_compiled.json").write_text(json.dumps(compiled))
    report.main(str(folder))
    table = (folder / "report.md").read_text()
    eager_torus = next(r for r in compiled["rows"] if r["name"].startswith("xdit-torus-nccl 2x1"))
    ms = eager_torus["result"]["median_step_ms"]
    # halved step against the halved one-GPU step: the same 0.32x as eager, not 0.65x
    assert f"| 2x1 | 1024² | xdit-torus-nccl compiled | {ms:.1f} | 0.32x |" in table
    assert "| 2x1 | 1024² compiled |" in table and "| 2x1 | 1024² |" in table


def test_kernel_breakdown_splits_gpu_time_and_finds_exposed_communication():
    from kernel_breakdown import breakdown, kernel_class
    assert kernel_class("cudnn_generated_fort_native_sdpa_sm90_knob_7_64x128x128") == "attention"
    assert kernel_class("flash_fwd_kernel<Flash_fwd_kernel_traits>") == "attention"
    assert kernel_class("ncclDevKernel_SendRecv(ncclDevKernelArgsStorage<4096ul>)") == "communication"
    assert kernel_class("_put_chunks_kernel") == kernel_class("spin_kernel") == "communication"
    assert kernel_class("sm90_xmma_gemm_bf16bf16_bf16f32") == "compute"
    # two layers (us): an NCCL kernel 0-100 beside attention 20-60 and a GEMM 50-80,
    # then a lone NCCL kernel 200-230: 100 + 30 us on the GPU, 40 + 30 with nothing beside it
    b = breakdown([("ncclDevKernel_AllGather", 0, 100), ("fmha_cutlassF", 20, 40),
                   ("gemm", 50, 30), ("ncclDevKernel_SendRecv", 200, 30)], layers=2)
    assert b["communication_ms_per_layer"] == 130 / 2 / 1e3
    assert b["exposed_communication_ms_per_layer"] == 70 / 2 / 1e3
    assert b["attention_ms_per_layer"] == 40 / 2 / 1e3 and b["compute_ms_per_layer"] == 30 / 2 / 1e3


def test_report_shows_per_layer_times_when_runs_carry_them(tmp_path):
    folder = tmp_path / "run"
    shutil.copytree(os.path.join(BENCH, "results", "h200x2"), folder)
    check = json.load(open(folder / "flux_check_2x1_nccl.json"))
    for i, run in enumerate(check["runs"]):
        run["per_layer"] = {"attention_ms_per_layer": 0.5 + i, "communication_ms_per_layer": 2.0,
                            "exposed_communication_ms_per_layer": 1.25, "compute_ms_per_layer": 0.75}
    (folder / "flux_check_2x1_nccl.json").write_text(json.dumps(check))
    report.main(str(folder))
    table = (folder / "report.md").read_text()
    assert "## GPU time per transformer layer (ms)" in table
    run = check["runs"][0]
    assert (f"| diffusers | 2x1 | {run['size']}² | {run['strategy']} | 0.500 | 2.000 | 1.250 | 0.750 |") in table


def test_planner_validation_finds_every_topology_and_uses_its_own_probe(tmp_path):
    """A 4-GPU session's folder (1x4, 2x2): checks and probes are found by name, each
    multi-machine topology is planned with the link its own probe measured."""
    import validate_planner
    src, folder = os.path.join(BENCH, "results", "h200x2"), tmp_path / "run"
    folder.mkdir()
    for old, new in (("1x2", "1x4"), ("2x1", "2x2"), ("2x1", "2x2p50")):
        check = json.load(open(os.path.join(src, f"flux_check_{old}_nccl.json")))
        check.update(topology=new, world=4)
        (folder / f"flux_check_{new}_nccl.json").write_text(json.dumps(check))
    probe = json.load(open(os.path.join(src, "probe_2x1.json")))
    probe.update(inter_machine_GBps_per_gpu_per_direction=7.0, inter_machine_all_gather_GBps_per_gpu_in=9.0)
    (folder / "probe_2x2.json").write_text(json.dumps(probe))
    (folder / "probe_2x2p50.json").write_text(json.dumps(dict(probe, inter_machine_GBps_per_gpu_per_direction=50.0)))
    (folder / "harness.json").write_text(json.dumps({"device": "H", "gpus": 4, "rows": []}))
    validate_planner.main(str(folder))
    out = json.load(open(folder / "planner_validation.json"))
    assert out["hardware"]["2x2"]["inter_GBps"] == 7.0 and out["hardware"]["2x2"]["inter_collective_GBps"] == 9.0
    assert {r["topology"] for r in out["rows"]} == {"1x4", "2x2", "2x2p50"}  # paced labels parse
    assert out["hardware"]["2x2p50"]["inter_GBps"] == 50.0
    torus = next(r for r in out["rows"] if (r["run"], r["topology"], r["size"]) == ("torus-nccl", "2x2", 1024))
    assert torus["plan"] == "torus ulysses=2 torus=2 (kv)"
    assert "predicted_measured_ms" not in torus  # no rank compute measured: one prediction


def test_planner_validation_uses_measured_rank_compute_and_the_checks_own_link(tmp_path):
    """With rank_compute.json in the folder, rows whose grid was measured get a second
    prediction built on it (USP's ring reads torus kv's grid; PipeFusion has none), and a
    check that measured its link in-process is planned with that link, not the probe's."""
    import validate_planner
    src, folder = os.path.join(BENCH, "results", "h200x2"), tmp_path / "run"
    shutil.copytree(src, folder)
    check = json.load(open(folder / "flux_check_2x1_nccl.json"))
    check["links"] = {"inter_machine_GBps_per_gpu_per_direction": 4.0, "inter_machine_all_gather_GBps_per_gpu_in": 5.0}
    (folder / "flux_check_2x1_nccl.json").write_text(json.dumps(check))
    harness = json.load(open(folder / "harness.json"))
    for row in harness["rows"]:  # as if timed per step (this run timed PipeFusion per patch)
        row.get("result", {})["timed"] = "per denoising step"
    (folder / "harness.json").write_text(json.dumps(harness))
    rows = [dict(size=1024, grid="1x2", ranks=2, ulysses=2, torus=1, exchange="kv", compiled=False, ms=120.0,
                 attention_ms_per_layer=0.25, other_ms_per_layer=1.8),
            dict(size=1024, grid="2x1", ranks=2, ulysses=1, torus=2, exchange="kv", compiled=False, ms=140.0,
                 attention_ms_per_layer=0.25, other_ms_per_layer=2.2)]
    (folder / "rank_compute.json").write_text(json.dumps({"device": "H", "rows": rows}))
    validate_planner.main(str(folder))
    out = json.load(open(folder / "planner_validation.json"))
    assert out["hardware"]["2x1"]["inter_GBps"] == 4.0 and out["hardware"]["2x1"]["inter_collective_GBps"] == 5.0
    by = {(r["path"], r["run"], r["topology"], r["size"]): r for r in out["rows"]}
    ulysses = by[("xdit", "xdit-usp-u2r1", "1x2", 1024)]
    ring = by[("xdit", "xdit-usp-u1r2", "2x1", 1024)]
    assert ulysses["predicted_measured_ms"] > 120.0 and ring["predicted_measured_ms"] > 140.0  # compute + links
    assert "predicted_measured_ms" not in by[("xdit", "xdit-pipefusion-2", "1x2", 1024)]
    assert "predicted_measured_ms" not in by[("diffusers", "torus-nccl", "1x2", 2048)]  # 2048 not measured
    assert out["configs_measured_compute"] == sum("predicted_measured_ms" in r for r in out["rows"]) > 0
    assert "With one rank's measured compute" in (folder / "planner_validation.md").read_text()


def test_a_topology_named_twice_runs_once():
    import argparse
    args = argparse.Namespace(topologies="2x1,2x1p50,2x1p50", paced_gbps=50.0, compile=False,
                              suites="probe", sizes="1024", diffusers_sizes="1024",
                              video_sizes="81x480x832", steps=4, out="out")
    labels, plan = harness.build_plan(args, 2)
    assert labels == ["2x1", "2x1p50"] and len(plan) == 2  # one probe each


def test_rank_compute_runs_one_ranks_shapes_through_torus_attention(monkeypatch):
    """The one-GPU probe of a rank's share: on a virtual 1x1 grid it is the model itself;
    on 2x2 and 4x1 (kv and a2a) the shard flows through Torus Attention's schedule with
    the loopback transport and comes out with the shard's shape."""
    import torch
    import rank_compute
    from diffusers.models.transformers import transformer_flux
    from thread_ranks import tiny_flux
    monkeypatch.setattr(rank_compute.torus_module, "dist", rank_compute._VirtualDist())
    monkeypatch.setattr(transformer_flux, "dispatch_attention_fn", transformer_flux.dispatch_attention_fn)
    model, kw = tiny_flux("cpu")
    with torch.no_grad():
        reference = model(**kw)[0]
        rank_compute.use_torus_attention(1, 1, "kv")
        assert torch.allclose(model(**kw)[0], reference, atol=1e-5)
        for U, T, exchange, chunks in ((2, 2, "kv", 1), (1, 4, "kv", 1), (1, 4, "a2a", 1), (2, 1, "kv", 2)):
            rank_compute.use_torus_attention(U, T, exchange, chunks)
            out = model(**rank_compute.shard(kw, U * T))[0]
            assert out.shape == (1, 64 // (U * T), reference.shape[2])
    assert rank_compute.exchanges(24, 1, 4) == ["kv", "a2a"] and rank_compute.exchanges(24, 1, 1) == ["kv"]
    counts = rank_compute.head_chunk_counts
    assert counts("2,3,4", 24, 4, 1) == [1, 2, 3] and counts("2", 24, 2, 2) == [1] and counts("2", 24, 1, 1) == [1]


def test_thread_ranks_pass_every_grid_and_catch_a_wrong_merge(monkeypatch):
    """The one-device equality check (one thread per rank) on CPU: every grid and exchange
    within tolerance, for the attention and for a whole tiny Flux; with a merge that drops
    every block after the first, both report failure."""
    import thread_ranks
    grids = "1x2,2x2,3x1,4x1,2x4"
    rows = thread_ranks.attention_rows(grids, "cpu", small=True)
    assert all(r["ok"] for r in rows)
    seen = {(r["grid"], r["exchange"], r["joint"]) for r in rows}
    assert ("4x1", "a2a", "padded") in seen and ("2x4", "kv", "keys_only") in seen
    assert ("1x2", "kv/hc2", "padded") in seen  # the head-chunked all-to-all, overlapped order
    lines = thread_ranks.table("cpu", "Reduced", rows)  # what the GPU test writes
    assert "All within tolerance: yes" in lines[2] and len(lines) == 6 + len(rows)
    model = thread_ranks.flux_rows("tiny", grids, "cpu")  # the whole tiny Flux
    assert all(r["ok"] for r in model)
    assert {(r["grid"], r["exchange"]) for r in model} >= {("2x2", "kv"), ("4x1", "a2a"), ("2x4", "a2a"),
                                                           ("1x2", "kv/hc2")}
    monkeypatch.setattr(thread_ranks.torus_module, "merge_into", lambda *args: None)
    assert not all(r["ok"] for r in thread_ranks.attention_rows("2x1", "cpu", small=True))
    assert not all(r["ok"] for r in thread_ranks.flux_rows("tiny", "2x1", "cpu"))
    import torch
    nan_on_one_rank = [thread_ranks.rel_err(torch.tensor([1.0, float("nan")]), torch.ones(2)), 0.01]
    assert max(nan_on_one_rank) == float("inf")  # a NaN rank is the worst, wherever it is


def test_report_of_a_one_gpu_smoke_run_keeps_its_reference_and_its_1x1_rows(tmp_path):
    """A one-GPU machine runs the harness as 1x1: the reference is the "xdit 1 GPU" job
    (not the last job that ran on one rank), and the 1x1 jobs are rows of their own."""
    folder = tmp_path / "run"
    shutil.copytree(os.path.join(BENCH, "results", "smoke_1gpu_h100"), folder)
    rows = {r["name"]: r["result"] for r in json.load(open(folder / "harness.json"))["rows"]
            if r.get("result")}
    report.main(str(folder))
    table = (folder / "report.md").read_text()
    assert f"One GPU: 1024² {rows['xdit 1 GPU 1024']['median_step_ms']:.1f} ms" in table
    torus = rows["xdit-torus-nccl 1x1 1024"]["median_step_ms"]
    assert f"| 1x1 | 1024² | xdit-torus-nccl | {torus:.1f} |" in table
    # and the harness leaves diffusers' native context parallelism out at one GPU (it
    # refuses degree 1), keeping torus on the diffusers path
    import argparse
    args = argparse.Namespace(topologies="1x1", paced_gbps=None, compile=False, suites="diffusers",
                              sizes="1024", diffusers_sizes="1024", video_sizes="", steps=4, out="o")
    (job,) = harness.build_plan(args, 1)[1]
    assert job[4][job[4].index("--strategies") + 1] == "torus-nccl,torus-nvshmem"


def test_ab_table_joins_two_builds_by_grid_and_compares_gpu_time(tmp_path):
    import ab_table
    for build, other in (("old", 2.0), ("new", 1.5)):
        rows = [dict(grid="2x2", exchange="kv", ms=100.0, attention_ms_per_layer=0.5,
                     other_ms_per_layer=other),
                dict(grid="4x1", exchange="a2a", error="failed")]  # a failed row is left out
        os.makedirs(tmp_path / f"rank_compute_{build}")
        json.dump(dict(device="GPU X", rows=rows), open(tmp_path / f"rank_compute_{build}" / "rank_compute.json", "w"))
    (tmp_path / "xdit_usp.log").write_text('noise\n{"device": "GPU X", "median_step_ms": 181.5}\n')
    ab_table.main(str(tmp_path))
    table = (tmp_path / "ab.md").read_text()
    # GPU ms/layer = attention + other; rows without a size are 1024² (older files)
    assert "| 1024² | 2x2 | kv | 2.500 | 2.000 | 0.800 | 0.500 | 0.500 | 100.0 | 100.0 |" in table
    assert "4x1" not in table
    assert "| usp | 181.5 | - |" in table and "| torus_old | failed | - |" in table  # from the log's JSON line
    assert (tmp_path / "ab.png").stat().st_size > 0


def test_ab_table_averages_each_builds_abba_repeats(tmp_path):
    """ab_builds.sh runs old, new, new2, old2: each build's row is the mean of its two runs."""
    import ab_table
    for build, other, ms in (("old", 2.0, 100.0), ("old2", 1.0, 120.0), ("new", 1.5, 90.0)):
        rows = [dict(grid="2x2", exchange="kv", ms=ms, attention_ms_per_layer=0.5, other_ms_per_layer=other)]
        os.makedirs(tmp_path / f"rank_compute_{build}")
        json.dump(dict(device="GPU X", rows=rows), open(tmp_path / f"rank_compute_{build}" / "rank_compute.json", "w"))
    ab_table.main(str(tmp_path))
    # old: (2.0 + 1.0) / 2 + 0.5 = 2.0 GPU ms per layer, (100 + 120) / 2 = 110 ms; new ran once
    assert "| 1024² | 2x2 | kv | 2.000 | 2.000 | 1.000 | 0.500 | 0.500 | 110.0 | 90.0 |" in (tmp_path / "ab.md").read_text()
    os.remove(tmp_path / "rank_compute_old" / "rank_compute.json")  # the first old run failed: old2 stands
    assert ab_table.rank_rows(str(tmp_path), "old")[(1024, "2x2", "kv")]["ms"] == 120.0


def test_the_device_scripts_name_only_files_and_tests_that_exist():
    """The device checks moved into tests/gpu/ and the A/B tools into benchmarks/tools/: every
    script and test node the device shell scripts name must still be there."""
    import re
    for script in ("device_session.sh", os.path.join("tools", "ab_builds.sh")):
        text = open(os.path.join(BENCH, script)).read()
        paths = set(re.findall(r"(?:benchmarks|tests)/[\w/]+\.(?:py|sh)", text))
        assert paths, script
        assert [p for p in paths if not os.path.exists(os.path.join(ROOT, p))] == [], script
        for path, test in re.findall(r"(tests/gpu/\w+\.py)::(\w+)", text):
            assert f"def {test}(" in open(os.path.join(ROOT, path)).read(), (script, test)


def test_a_device_step_leaves_one_archive_of_its_folder_under_out(tmp_path):
    """A device call returns at most 8 files: the step's folder goes back as one archive (and
    its latents as another), and the loose copy under $OUT is removed."""
    import subprocess
    import tarfile
    out = tmp_path / "out"
    run = out / "h"
    (run / "xdit_1024_1gpu").mkdir(parents=True)
    (run / "harness.json").write_text("{}")
    (run / "xdit_1024_1gpu" / "result.json").write_text("{}")
    (run / "xdit_1024_1gpu" / "latents.pt").write_bytes(b"x")
    subprocess.run(["bash", os.path.join(BENCH, "pack_out.sh"), str(run), "harness-1"], check=True,
                   env={**os.environ, "OUT": str(out)})
    assert sorted(p.name for p in out.iterdir()) == ["h-harness-1-latents.tgz", "h-harness-1.tgz"]
    with tarfile.open(out / "h-harness-1.tgz") as t:
        assert sorted(t.getnames()) == ["h", "h/harness.json", "h/xdit_1024_1gpu", "h/xdit_1024_1gpu/result.json"]
    with tarfile.open(out / "h-harness-1-latents.tgz") as t:
        assert t.getnames() == ["h/xdit_1024_1gpu/latents.pt"]


def test_ab_table_compares_each_runs_latents_with_usps(tmp_path):
    import ab_table
    import torch
    usp = torch.randn(1, 16, 8, 8)
    for label, latents in (("usp", usp), ("torus_new", usp * 1.01)):
        os.makedirs(tmp_path / f"xdit_{label}")
        torch.save(latents, tmp_path / f"xdit_{label}" / "latents.pt")
        json.dump({"device": "GPU X", "median_step_ms": 180.0},
                  open(tmp_path / f"xdit_{label}" / "result.json", "w"))
    ab_table.main(str(tmp_path))
    table = (tmp_path / "ab.md").read_text()
    assert "| torus_new | 180.0 | 1.0e-02 |" in table and "| usp | 180.0 | 0.0e+00 |" in table
    assert "| torus_old | failed | - |" in table


def test_pipefusion_timed_per_patch_is_left_out_and_each_plan_keeps_its_best_run(tmp_path):
    """h200x2's PipeFusion rows timed each patch (xfuser calls back per patch): the report
    and the planner check leave them out and say so. Torus over NCCL and over NVSHMEM run
    one plan: the planner check compares with the faster of the two."""
    import report
    import validate_planner
    folder = tmp_path / "run"
    shutil.copytree(os.path.join(BENCH, "results", "h200x2"), folder)
    report.main(str(folder))
    table = (folder / "report.md").read_text()
    assert "| 1x2 | 1024² | xdit-pipefusion-2 |" not in table
    assert "- xdit-pipefusion-2 1x2 1024: timed per PipeFusion patch, not per denoising step" in table
    validate_planner.main(str(folder))
    out = json.load(open(folder / "planner_validation.json"))
    assert not any("pipefusion" in r["run"] for r in out["rows"])
    for choice in out["choices"]:
        same = [r["measured_ms"] for r in out["rows"] if r["exact"] and
                (r["path"], r["topology"], r["size"]) == (choice["path"], choice["topology"], choice["size"])]
        assert choice["best_measured_ms"] == min(same)


def test_the_diffusers_rows_divide_by_their_own_jobs_one_gpu_time(tmp_path):
    import report
    folder = tmp_path / "run"
    shutil.copytree(os.path.join(BENCH, "results", "h200x2"), folder)
    report.main(str(folder))
    table = (folder / "report.md").read_text()
    for name in ("flux_check_1x2_nccl.json", "flux_check_2x1_nccl.json"):
        check = json.load(open(folder / name))
        topo = f"{check['nodes']}x{check['world'] // check['nodes']}"
        for run in check["runs"]:
            line = next(l for l in table.splitlines()
                        if l.startswith(f"| {topo} | {run['size']}² | {run['strategy']} |"))
            assert f"| {run['one_gpu_ms'] / run['parallel_ms']:.2f}x |" in line, line


def test_a_new_run_into_a_folder_of_an_earlier_run_is_refused(tmp_path):
    """The report reads every result file in its folder: a fresh run there would mix two runs."""
    (tmp_path / "flux_check_1x2_nccl.json").write_text("{}")
    with pytest.raises(SystemExit, match="holds results of an earlier run .*--append"):
        harness._refuse_earlier_results(str(tmp_path), append=False)
    harness._refuse_earlier_results(str(tmp_path), append=True)


def test_alltoall_report_reads_what_the_microbenchmark_writes(tmp_path):
    """alltoall_bench.py's JSON (same keys) -> table and plot, with the speedup computed."""
    import alltoall_report
    sizes = [{"per_rank_bytes": kib * 1024, "nccl_ms": 0.026, "nvshmem_ms": 0.020, "nccl_busbw_GBps": 7.6,
              "nvshmem_busbw_GBps": 9.8, "nccl_over_nvshmem": 1.3} for kib in (256, 4096)]
    sizes[0].update(graphed_nccl_ms=0.030, graphed_nvshmem_ms=0.012)  # captured; the other failed (None)
    sizes[1].update(graphed_nccl_ms=None, graphed_nvshmem_ms=0.02)
    path = tmp_path / "alltoall_4gpu.json"
    path.write_text(json.dumps({"device": "H", "world": 4, "sizes": sizes, "torus_nvshmem_checks": [],
                                "ulysses_checks": [{"tokens": 4608, "dtype": "torch.bfloat16", "bit_exact": True}]}))
    alltoall_report.main(str(path))
    table = (tmp_path / "alltoall_4gpu.md").read_text()
    assert "| 256 KiB | 0.026 | 0.020 | 7.6 | 9.8 | 1.30x |" in table and "| 4 MiB |" in table
    assert "4608 tok bfloat16 yes" in table and (tmp_path / "alltoall_4gpu.png").stat().st_size > 0
    graphed = table.split("Replayed from a CUDA graph")[1]
    assert "| 256 KiB | 0.030 | 0.012 | 2.50x |" in graphed and "4 MiB" not in graphed


def test_pipefusion_step_times_take_the_last_patch_of_each_step():
    """xfuser's PipeFusion calls back on its last stage once per warm-up step, then once per
    patch with the step index counting from 0 again: a step ends at its last patch."""
    from xdit_random_flux import last_call_of_each_step
    assert last_call_of_each_step(6, 6, 0, 1) == [0, 1, 2, 3, 4, 5]  # USP, torus: once per step
    assert last_call_of_each_step(1 + 5 * 2, 6, 1, 2) == [0, 2, 4, 6, 8, 10]
    assert last_call_of_each_step(2 + 4 * 4, 6, 2, 4) == [0, 1, 5, 9, 13, 17]
    with pytest.raises(ValueError, match="10 step-end callbacks for 6 steps"):
        last_call_of_each_step(10, 6, 1, 2)


def test_only_the_one_gpu_job_is_the_reference(tmp_path, monkeypatch):
    """A 1x1 topology's jobs run on one GPU too, but each is compared with the reference,
    not made one (every error read 0.0 when they were; found by review)."""
    import torch

    def fake_torchrun(nproc, script, args, log_path, timeout, env=None):
        out = args[args.index("--output_directory") + 1]
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "result.json"), "w") as f:
            json.dump({"height": 1024, "world": nproc, "median_step_ms": 1.0}, f)
        torch.save(torch.ones(4) * (1 if "1gpu" in out else 2), os.path.join(out, "latents.pt"))
        open(log_path, "w").close()
        return 0
    monkeypatch.setattr(harness, "torchrun", fake_torchrun)
    monkeypatch.setattr(sys, "argv", ["harness.py", "--gpus", "1", "--topologies", "1x1", "--suites", "xdit",
                                      "--sizes", "1024", "--out", str(tmp_path)])
    harness.main()
    errs = {r["name"]: r["rel_err_vs_1gpu"] for r in json.load(open(tmp_path / "harness.json"))["rows"]}
    assert errs.pop("xdit 1 GPU 1024") == 0.0 and errs
    assert all(e == pytest.approx(1.0) for e in errs.values()), errs


def test_planner_validation_takes_the_one_sided_all_to_all_from_the_sessions_own_run(tmp_path):
    """With the session's alltoall_bench output in the folder, torus-nvshmem runs are predicted
    with its measured bandwidth ratio and per-call time, torus-nccl runs without them."""
    import validate_planner
    folder = tmp_path / "run"
    shutil.copytree(os.path.join(BENCH, "results", "h200x2_s10"), folder)
    for name in os.listdir(folder):
        if name.startswith("planner_validation"):
            os.remove(folder / name)
    validate_planner.main(str(folder))
    out = json.load(open(folder / "planner_validation.json"))
    sizes = json.load(open(folder / "alltoall_2gpu.json"))["sizes"]
    hw = out["hardware"]["1x2"]
    ratio = sizes[-1]["nvshmem_busbw_GBps"] / sizes[-1]["nccl_busbw_GBps"]
    assert hw["onesided_GBps"] == pytest.approx(hw["intra_GBps"] * ratio)
    assert hw["onesided_latency_us"] == pytest.approx(sizes[0]["nvshmem_ms"] * 1e3)
    by = {(r["path"], r["run"], r["size"]): r["predicted_ms"] for r in out["rows"]}
    assert by[("diffusers", "torus-nvshmem", 2048)] < by[("diffusers", "torus-nccl", 2048)]
    assert by[("diffusers", "torus-nccl", 2048)] == by[("diffusers", "diffusers-ulysses", 2048)]
    # a torus pick made for NVSHMEM's numbers is judged by the NVSHMEM run, not the faster NCCL one
    validate_planner.main(str(folder), os.path.join(BENCH, "results", "rank_compute_h200", "rank_compute.json"))
    out = json.load(open(folder / "planner_validation.json"))
    pick = next(c for c in out["choices"] if (c["path"], c["size"]) == ("diffusers", 1024))
    runs = {r["run"]: r["measured_ms"] for r in out["rows"] if (r["path"], r["size"]) == ("diffusers", 1024)}
    assert pick["chosen"].startswith("torus ulysses=2")
    assert pick["chosen_measured_ms"] == runs["torus-nvshmem"] > pick["best_measured_ms"] == runs["torus-nccl"]


def test_host_overhead_report_reads_every_run_in_the_order_made(tmp_path):
    import host_overhead_report
    folder = tmp_path / "h"
    shutil.copytree(os.path.join(BENCH, "results", "host_overhead_h200"), folder)
    host_overhead_report.main(str(folder), "old,new,new2,old2")
    table = (folder / "host_overhead.md").read_text()
    run = json.load(open(folder / "host_overhead_new.json"))["paths"]
    nccl, nv = run["nccl all_to_all_single"]["host_us"], run["nvshmem all_to_all (eager)"]["host_us"]
    assert f"| new | {nccl:.1f} | {nv:.1f} |" in table and f"{nccl / nv:.2f}x" in table
    rows = [line.split(" |")[0] for line in table.splitlines() if line.startswith(("| old", "| new"))]
    assert rows[:4] == ["| old", "| new", "| new2", "| old2"]  # the order made, not alphabetical
    peers = json.load(open(folder / "peers_old2.json"))["sizes"][0]["nvshmem_eager_us_slowest_rank"]
    assert f"| old2 | {peers:.1f} |" in table
    assert (folder / "host_overhead.png").stat().st_size > 0
