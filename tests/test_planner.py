"""Cost model arithmetic (bytes per strategy by hand) and plan ranking on synthetic inputs."""

import json

import pytest
import torch

from swiftfusion_xdit import planner
from swiftfusion_xdit.cli import main as cli_main
from swiftfusion_xdit.planner import Hardware, ModelShape, Plan, bytes_per_layer, predict, rank_plans
from swiftfusion_xdit.tiny import FLUX_DEV_TRANSFORMER

def shape(tokens=4096, heads=24, layers=10):
    return ModelShape(layers=layers, heads=heads, head_dim=128, gemm_params_per_token=1e9,
                      image_tokens=tokens)


def test_bytes_per_layer_by_hand():
    s = shape(tokens=4096)  # X = 4096/P * 3072 * 2 bytes
    x8 = 4096 / 8 * 3072 * 2
    assert bytes_per_layer(Plan("usp", 8, 1), s) == (4 * x8 * 7 / 8, 0)
    assert bytes_per_layer(Plan("usp", 4, 2), s) == (4 * x8 * 3 / 4, 2 * x8)
    assert bytes_per_layer(Plan("usp", 2, 4), s) == (4 * x8 / 2, 2 * x8 * 3)
    assert bytes_per_layer(Plan("torus", 2, 4, "a2a"), s) == (4 * x8 / 2, 4 * x8 * 3 / 4)
    assert bytes_per_layer(Plan("torus", 2, 4, "kv"), s) == (4 * x8 / 2, 2 * x8 * 3)
    # 4 machines: the torus a2a moves half the cross-machine bytes of USP's ring
    assert bytes_per_layer(Plan("torus", 2, 4, "a2a"), s)[1] * 2 == bytes_per_layer(Plan("usp", 2, 4), s)[1]
    # a2a-kv: a2a's bytes across machines; inside, the K/V all-gather instead of the all-to-all
    assert bytes_per_layer(Plan("torus", 2, 4, "a2a-kv"), s) == (2 * x8, 4 * x8 * 3 / 4)


def test_a2a_kv_is_planned_on_slow_links_only():
    """FLUX.1-dev at 4096² on 4x8 (24 heads: a2a cannot split them over 32 GPUs): on the
    emulated cluster a2a-kv won 1.43x at 12.5 GB/s per GPU and lost (0.83x) at 50
    (benchmarks/results/emulated_a2a_kv_h200/); the planner must side with each."""
    flux = planner.ModelShape.flux(FLUX_DEV_TRANSFORMER, 4096, 4096)
    best = lambda gbps: rank_plans(flux, planner.replace(planner.H200, inter_GBps=gbps), 4, 8)[0].plan
    assert best(12.5) == Plan("torus", 8, 4, "a2a-kv")
    assert best(50.0).exchange != "a2a-kv"


def test_flux_shape_matches_its_parameter_count():
    s = ModelShape.flux(FLUX_DEV_TRANSFORMER, 1024, 1024)
    assert (s.image_tokens, s.text_tokens, s.layers, s.hidden) == (4096, 512, 57, 3072)
    # FLUX.1-dev's blocks hold ~11.9B parameters; a token passes one of the two
    # streams of each double block (18h^2 of 36h^2) and all of each single block
    assert s.gemm_params_per_token == 3072 ** 2 * (18 * 19 + 15 * 38)


def test_hardware_fit_recovers_known_throughput():
    truth = Hardware(400.0, 600.0, 200.0, 5.0)
    a, b = shape(4096), shape(16384)
    one_gpu = {s: (s.gemm_flops() / 400e9 + s.attention_flops() / 600e9) for s in (a, b)}  # ms
    fit = Hardware.from_measurements(one_gpu, 200.0, 5.0)
    assert fit.gemm_tflops == pytest.approx(truth.gemm_tflops)
    assert fit.attention_tflops == pytest.approx(truth.attention_tflops)


def test_slow_network_prefers_exchanges_that_hide_under_compute():
    hw = Hardware(500.0, 600.0, 200.0, 2.0, 3.0)
    ranked = rank_plans(shape(16384), hw, nodes=2, gpus_per_node=1)
    assert ranked[0].plan == Plan("torus", 1, 2, "kv")
    ulysses = next(p for p in ranked if p.plan == Plan("usp", 2, 1))
    assert "spans machines" in ulysses.why[0] and ulysses.hidden_ms == 0


def test_torus_a2a_beats_ring_with_many_machines():
    hw = Hardware(500.0, 600.0, 200.0, 5.0)
    s = shape(32768, heads=32)
    torus = predict(Plan("torus", 8, 4, "a2a"), s, hw, gpus_per_node=8)
    ring = predict(Plan("usp", 8, 4), s, hw, gpus_per_node=8)
    assert torus.inter_ms < ring.inter_ms and torus.step_ms < ring.step_ms


def test_one_machine_uses_the_fast_link_and_approximate_plans_are_opt_in():
    hw = Hardware(500.0, 600.0, 200.0, 1.0)
    exact = rank_plans(shape(), hw, nodes=1, gpus_per_node=8)
    assert all(p.exact for p in exact)
    fast_network = rank_plans(shape(), Hardware(500.0, 600.0, 200.0, 1000.0), nodes=1, gpus_per_node=8)
    assert [p.step_ms for p in exact] == [p.step_ms for p in fast_network]  # nothing crosses machines
    every = rank_plans(shape(), hw, nodes=1, gpus_per_node=8, include_approximate=True)
    assert any(p.plan.strategy == "pipefusion" for p in every)


def test_plan_command_ranks_and_names_the_best(capsys):
    cli_main(["plan", "--nodes", "4", "--gpus-per-node", "8", "--inter-bw", "50",
              "--height", "2048", "--width", "2048"])
    out = capsys.readouterr().out
    assert "16896 tokens, 4 machine(s) x 8 GPU(s)" in out
    assert "50.0 GB/s between machines" in out
    assert out.strip().splitlines()[-1].startswith("best: ")


def test_probe_is_cached_per_machine(tmp_path):
    first = planner.probe_hardware("cpu", cache_dir=str(tmp_path))
    assert first.gemm_tflops > 0 and first.attention_tflops > 0
    assert len(list(tmp_path.iterdir())) == 1
    assert planner.probe_hardware("cpu", cache_dir=str(tmp_path)) == first  # read back, not re-timed


def test_an_unreadable_probe_cache_is_probed_again(tmp_path):
    first = planner.probe_hardware("cpu", cache_dir=str(tmp_path))
    (cache,) = tmp_path.iterdir()
    cache.write_text('{"gemm_tflops": 1.0')  # cut short
    again = planner.probe_hardware("cpu", cache_dir=str(tmp_path))
    assert again.gemm_tflops > 0 and again.intra_GBps == first.intra_GBps
    assert set(json.loads(cache.read_text())) == {"gemm_tflops", "attention_tflops"}  # links not frozen


@pytest.mark.parametrize("argv,message", [
    (["--nodes", "0", "--gpus-per-node", "8"], "--nodes: must be a positive whole number, not 0"),
    (["--nodes", "2", "--gpus-per-node", "8", "--inter-bw", "0"], "--inter-bw: must be a positive number, not 0"),
    (["--nodes", "2", "--gpus-per-node", "8", "--width", "8"], "--width: must be a multiple of 16"),
])
def test_plan_command_refuses_what_it_cannot_plan(capsys, argv, message):
    with pytest.raises(SystemExit):
        cli_main(["plan", *argv])
    assert message in capsys.readouterr().err


def test_a_ulysses_group_that_does_not_divide_a_machine_takes_the_network():
    """2 machines of 6: ulysses=4 puts ranks 4-7 on both machines, so its all-to-all is
    priced at the inter-machine link, not NVLink."""
    shape = planner.ModelShape.flux(FLUX_DEV_TRANSFORMER, 1024, 1024)
    spanning = planner.predict(planner.Plan("usp", 4, 3), shape, planner.H200, 6)
    inside = planner.predict(planner.Plan("usp", 3, 4), shape, planner.H200, 6)
    assert any("spans machines" in why for why in spanning.why) and not inside.why
    assert spanning.intra_ms > 10 * inside.intra_ms


def test_cost_model_weights_match_the_real_model_classes():
    """The GEMM weights the planner charges per token, against the real diffusers classes
    built from the real configs on the meta device (no memory, no download)."""
    from diffusers import FluxTransformer2DModel, WanTransformer3DModel
    from swiftfusion_xdit.planner import WAN21_14B
    with torch.device("meta"):
        wan = sum(p.numel() for p in WanTransformer3DModel(**WAN21_14B).parameters())
        flux = sum(p.numel() for p in FluxTransformer2DModel(**FLUX_DEV_TRANSFORMER).parameters())
    h = 40 * 128
    # Wan: the text side of cross-attention (K, V: 2h^2 a layer) runs on text tokens only
    charged = ModelShape.wan(WAN21_14B, 81, 480, 832).gemm_params_per_token + 2 * h * h * 40
    assert abs(wan - charged) / wan < 0.02 and 13.5e9 < wan < 14.5e9
    # Flux: a double block holds two streams (18h^2 each); a token passes only its own
    hf = 24 * 128
    charged = ModelShape.flux(FLUX_DEV_TRANSFORMER, 1024, 1024).gemm_params_per_token + 19 * 18 * hf * hf
    assert abs(flux - charged) / flux < 0.02 and 11.5e9 < flux < 12.5e9


def test_measured_rank_compute_replaces_the_fitted_compute():
    """A rank's measured step (no communication) stands in for GEMM + attention; the
    links are added as before, and overlap hides under the measured attention."""
    from swiftfusion_xdit.planner import MeasuredCompute
    shape = ModelShape.flux(FLUX_DEV_TRANSFORMER, 1024, 1024)
    hw = Hardware(500.0, 600.0, intra_GBps=200.0, inter_GBps=2.0, inter_collective_GBps=2.0)
    plan = Plan("torus", 1, 2, "kv")
    fitted = predict(plan, shape, hw, gpus_per_node=1)
    measured = predict(plan, shape, hw, 1, MeasuredCompute(step_ms=140.0, attention_ms_per_layer=0.25))
    assert measured.compute_ms == pytest.approx(140.0)
    L = shape.layers
    _, cross = bytes_per_layer(plan, shape)
    inter = cross / 2.0e6 + hw.latency_us / 1e3  # one all-gather, ms
    assert measured.step_ms == pytest.approx(140.0 + (inter - 0.25 / 2) * L)
    assert measured.inter_ms == pytest.approx(fitted.inter_ms)
    pipefusion = Plan("pipefusion", 1, 2)
    assert predict(pipefusion, shape, hw, 1, MeasuredCompute(1.0, 0.0)).step_ms == \
        pytest.approx(predict(pipefusion, shape, hw, 1).step_ms)  # a stage's compute is not that table's


def test_planner_weighs_both_torus_schedules_against_the_link():
    """At four machines a2a moves half of kv's cross-machine bytes but computes more,
    smaller blocks and returns its output: on a slow link a2a wins, on a fast one kv
    (with one rank's compute as measured: a2a's eager forward ran 1.9x kv's at 1024²)."""
    from swiftfusion_xdit.planner import MeasuredCompute
    shape = ModelShape.flux(FLUX_DEV_TRANSFORMER, 1024, 1024)
    compute = {"kv": MeasuredCompute(126.0, 0.134), "a2a": MeasuredCompute(236.0, 0.242)}
    measured = lambda plan: compute.get(plan.exchange) if plan.strategy == "torus" else None
    best = lambda gbps: next(p.plan for p in rank_plans(shape, Hardware(500.0, 600.0, 200.0, gbps), 4, 1,
                                                       measured=measured) if p.plan.strategy == "torus")
    assert {p.plan.exchange for p in rank_plans(shape, Hardware(500.0, 600.0, 200.0, 3.0), 4, 1)
            if p.plan.strategy == "torus"} == {"kv", "a2a"}
    assert best(3.0) == Plan("torus", 1, 4, "a2a")
    assert best(50.0) == Plan("torus", 1, 4, "kv")


def test_one_sided_all_to_all_speeds_torus_inside_a_machine_only():
    """Torus's all-to-all over NVSHMEM: its own bandwidth and latency, by hand; USP's stays on
    NCCL, and a Ulysses group spanning machines takes the network either way."""
    s = shape(4096)
    x = 4096 / 2 * 3072 * 2
    nccl = Hardware(500.0, 600.0, 200.0, 5.0, latency_us=60.0)
    onesided = Hardware(500.0, 600.0, 200.0, 5.0, latency_us=60.0, onesided_GBps=250.0, onesided_latency_us=40.0)
    torus = predict(Plan("torus", 2, 1, "kv"), s, onesided, gpus_per_node=2)
    assert torus.intra_ms == pytest.approx((2 * x / 250e6 + 2 * 0.040) * s.layers)
    assert "NVSHMEM" in torus.why[0]
    assert predict(Plan("torus", 2, 1, "kv"), s, nccl, 2).intra_ms == pytest.approx((2 * x / 200e6 + 0.120) * s.layers)
    assert predict(Plan("usp", 2, 1), s, onesided, 2).step_ms == predict(Plan("usp", 2, 1), s, nccl, 2).step_ms
    spanning = [predict(Plan("torus", 2, 1, "kv"), s, hw, gpus_per_node=1) for hw in (nccl, onesided)]
    assert spanning[0].step_ms == spanning[1].step_ms
    ranked = rank_plans(s, onesided, nodes=1, gpus_per_node=2)
    assert ranked[0].plan.strategy == "torus" or ranked[0].plan.across > 1  # never USP's own all-to-all


def test_auto_assumes_no_nvshmem_where_it_cannot_start():
    """On this CPU machine NVSHMEM cannot start, so auto's plan uses NCCL's numbers."""
    best = planner.choose_for(FLUX_DEV_TRANSFORMER, 1, 4)  # with NVSHMEM: torus over it
    assert not any("NVSHMEM" in w for w in best.why)


def test_the_one_sided_term_follows_the_transport_comm_gives(monkeypatch):
    """NVSHMEM runs torus's all-to-all with comm='nvshmem', or 'auto' on one machine; 'auto'
    across machines and 'nccl' run it over NCCL, and the plan must be judged so."""
    from swiftfusion_xdit import nvshmem_transport
    monkeypatch.setattr(nvshmem_transport, "unavailable_reason", lambda: None)  # as on a GPU machine
    over = lambda comm, nodes, gpus: any("NVSHMEM" in w for w in
                                         planner.choose_for(FLUX_DEV_TRANSFORMER, nodes, gpus, comm=comm).why)
    assert over("auto", 1, 4) and over("nvshmem", 1, 4)
    assert not over("nccl", 1, 4)
    assert not over("auto", 2, 8) and over("nvshmem", 2, 8)  # at 4x8 the pick, a2a-kv, has no all-to-all
    assert planner.as_run_with(planner.H200, "auto", 2).onesided_GBps is None
    assert planner.as_run_with(planner.H200, "nvshmem", 2) == planner.H200


def test_plan_command_takes_the_transport(capsys):
    cli_main(["plan", "--nodes", "1", "--gpus-per-node", "4", "--sp-comm", "nccl"])
    assert "NVSHMEM" not in capsys.readouterr().out
    cli_main(["plan", "--nodes", "1", "--gpus-per-node", "4"])  # auto on one machine: NVSHMEM's numbers
    assert "all-to-all over NVSHMEM" in capsys.readouterr().out
