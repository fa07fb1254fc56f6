"""benchmarks/emulated_cluster.py on CPU: the tiny Flux transformer as rank 0 of 2 emulated
machines x 2 ranks, every strategy, one forward each; the files it writes and what its rows say."""

import json
import os
import sys

import pytest
import torch

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
sys.path.insert(0, BENCH)

import emulated_cluster  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")
STRATEGIES = "torus,torus@u1,usp,ulysses,ring,diffusers,diffusers-ulysses"
EXPANDED = ["torus-kv", "torus-a2a", "torus-kv@u1", "torus-a2a@u1", "usp", "ulysses", "ring", "diffusers",
            "diffusers-ulysses"]  # tiny: 8 heads, so a2a fits U x T = 2 x 2 and 1 x 4


@pytest.fixture
def one_thread():
    """Several intra-op threads on a busy two-core machine make CPU forwards 50x slower at times."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def sweep(out, *extra):
    return emulated_cluster.main(["--model", "tiny", "--clusters", "2x2", "--links", "400G", "--repeats", "1",
                                  "--strategies", STRATEGIES, "--device", "cpu", "--out", str(out), *extra])


def test_every_strategy_gets_its_row_and_the_links_it_used(tmp_path, one_thread):
    result = sweep(tmp_path)
    with open(tmp_path / "emulated_cluster.json") as f:
        rows = json.load(f)["rows"]
    assert len(rows) == len(result["rows"]) == len(EXPANDED)
    assert [(r["cluster"], r["link"], r["strategy"]) for r in rows] == [("2x2", "400G", s) for s in EXPANDED]

    # diffusers' ring needs an attention kernel that returns the LSE, and CPU has none: that
    # row records why in one line, and the others still ran
    failed = {r["strategy"]: r["error"] for r in rows if "error" in r}
    assert list(failed) == ["diffusers"] and "return_lse" in failed["diffusers"]
    ran = {r["strategy"]: r for r in rows if "error" not in r}
    for row in ran.values():
        assert row["step_ms"] > 0 and row["compute_ms"] > 0
        assert row["inter_busy_ms"] > 0 and row["intra_busy_ms"] > 0  # two machines: both links carry
        assert row["inter_busy_ms"] >= row["floor_ms"] > 0  # nothing beats the floor
    assert ran["torus-kv"]["layout"] == "U=2 T=2 (kv)" and ran["torus-a2a@u1"]["layout"] == "U=1 T=4 (a2a)"
    assert ran["diffusers-ulysses"]["layout"] == "ulysses=4 ring=1"

    # one rank's shard of one of Q, K, V: 288 tokens / 4 ranks x 8 heads x 16 x 4 bytes
    X = 288 // 4 * 8 * 16 * 4 / 1e6
    assert ran["torus-kv"]["inter_MB_per_layer"] >= 2 * X  # the other machine's K and V
    # T = 4: the heads' all-to-all moves 4X(T-1)/T, half of what kv's K/V steps move across
    assert ran["torus-a2a@u1"]["inter_MB_per_layer"] < ran["torus-kv@u1"]["inter_MB_per_layer"]
    assert ran["torus-a2a"]["inter_MB_per_layer"] <= ran["torus-kv"]["inter_MB_per_layer"]  # T = 2: the same
    assert all("speedup" in r for s, r in ran.items() if s.startswith("torus"))
    assert not any("speedup" in r for s, r in ran.items() if not s.startswith("torus"))

    table = (tmp_path / "emulated_cluster.md").read_text()
    assert sum(line.startswith("| tiny |") for line in table.splitlines()) == len(EXPANDED)
    assert "failed: ValueError" in table
    assert (tmp_path / "emulated_cluster.png").stat().st_size > 1000


def test_past_the_deadline_nothing_starts_and_every_row_says_so(tmp_path, one_thread):
    rows = sweep(tmp_path, "--deadline", "1e-9")["rows"]
    assert len(rows) == len(EXPANDED) and all(r["error"].startswith("skipped") for r in rows)
    assert (tmp_path / "emulated_cluster.png").exists() and (tmp_path / "emulated_cluster.md").exists()


def test_graph_mode_needs_a_gpu(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        emulated_cluster.main(["--model", "tiny", "--modes", "eager,graph", "--device", "cpu", "--out", str(tmp_path)])
    assert exit_.value.code == 2 and "graph on a GPU only" in capsys.readouterr().err


RESULTS = os.path.join(os.path.dirname(BENCH), "benchmarks", "results", "emulated_a2a_kv_h200")
FOLDERS = [os.path.join(RESULTS, name) for name in ("flux2048", "flux4096", "wan720", "wan720_77frames")]


def test_the_committed_verdict_is_what_the_summary_script_makes(tmp_path):
    """benchmarks/tools/emulated_summary.py on the committed emulated runs: the figures the
    docs quote (graph mode: 1.30x over the judged rows, 1.43x at best)."""
    sys.path.insert(0, os.path.join(BENCH, "tools"))
    import emulated_summary
    summary = emulated_summary.main(["--measured", "2026-12-04", "--out", str(tmp_path), *FOLDERS])
    graph = next(v for v in summary["verdicts"] if v["mode"] == "graph")
    assert (graph["rows"], graph["judged_rows"]) == (12, 4)
    assert round(graph["average_speedup_judged"], 2) == 1.30 and round(graph["best_speedup"], 2) == 1.43
    for name in ("summary.json", "summary.md", "summary.png"):
        assert (tmp_path / name).stat().st_size > 500
    # every judged row is a 12.5 GB/s one: where USP's communication shows, a2a-kv wins
    judged = [r for r in summary["rows"] if r["mode"] == "graph" and r["usp_comm_share"] >= 0.2]
    assert {r["inter_GBps"] for r in judged} == {12.5}


def test_the_planner_picks_what_the_emulator_measured_best(tmp_path):
    """benchmarks/tools/planner_vs_emulator.py: in graph mode (no host time, which the
    planner does not model) its pick is the measured best of every configuration."""
    sys.path.insert(0, os.path.join(BENCH, "tools"))
    import planner_vs_emulator
    rows = planner_vs_emulator.main(["--out", str(tmp_path), *FOLDERS])
    graph = [r for r in rows if r["mode"] == "graph"]
    assert len(graph) == 24 and sum(abs(r["error"]) <= 0.2 for r in graph) >= 23
    picks = [p for p in planner_vs_emulator.picks(rows) if p["mode"] == "graph"]
    assert len(picks) == 12 and all(p["pick_over_best"] == 1.0 for p in picks)
    assert planner_vs_emulator.plan_of({"strategy": "torus-a2a-kv", "layout": "U=8 T=4 (a2a-kv)"}).exchange == "a2a-kv"
    assert planner_vs_emulator.plan_of({"strategy": "diffusers", "layout": "ulysses=8 ring=2"}) is None
