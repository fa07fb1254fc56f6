"""Mesh builder: degrees filled in, ranks placed by machine, refusals explained."""

import pytest

from swiftfusion_xdit.mesh import LayoutError, plan_layout
from swiftfusion_xdit.topology import Topology, link_type_from_topo_matrix

FLUX_HEADS = 24


def machines(layout, dim):
    node = layout.topology.node_of_rank
    return [sorted({node[r] for r in g}) for g in layout.groups(dim)]


def test_two_machines_of_four_with_cfg_puts_cfg_across_machines():
    layout = plan_layout(Topology.uniform(2, 4), FLUX_HEADS, cfg=2)
    assert layout.dims.shape == (1, 2, 1, 4)  # dp, cfg, torus, ulysses
    assert all(len(m) == 2 for m in machines(layout, "cfg"))  # CFG crosses the network
    assert all(len(m) == 1 for m in machines(layout, "ulysses"))  # all-to-all stays on NVLink
    assert layout.groups("ulysses") == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert layout.groups("cfg") == [[0, 4], [1, 5], [2, 6], [3, 7]]


def test_four_machines_of_eight():
    layout = plan_layout(Topology.uniform(4, 8), FLUX_HEADS)
    assert (layout.dims.ulysses, layout.dims.torus) == (8, 4)
    assert all(len(m) == 1 for m in machines(layout, "ulysses"))
    assert all(len(m) == 4 for m in machines(layout, "torus"))
    assert layout.groups("torus")[3] == [3, 11, 19, 27]
    # 24 heads do not split over 32 ranks: K/V travel (the link's speed is unknown here), and
    # the note names the exchange that splits the heads by machine for slow links
    assert layout.torus_exchange == "kv"
    assert any("'a2a-kv'" in note and "2x fewer bytes" in note for note in layout.notes)
    assert plan_layout(Topology.uniform(4, 8), FLUX_HEADS, torus_exchange="a2a-kv").torus_exchange == "a2a-kv"
    # 30 heads split over neither (ulysses 2, torus 16): K/V travel instead of heads
    layout = plan_layout(Topology.uniform(4, 8), 30)
    assert (layout.dims.ulysses, layout.dims.torus, layout.torus_exchange) == (2, 16, "kv")
    assert any("split neither" in note for note in layout.notes)


def test_four_machines_of_eight_with_cfg_puts_cfg_across_and_torus_of_two_gathers_kv():
    layout = plan_layout(Topology.uniform(4, 8), FLUX_HEADS, cfg=2)
    assert layout.dims.shape == (1, 2, 2, 8)
    assert layout.torus_exchange == "kv"  # 24 % 16 != 0
    layout = plan_layout(Topology.uniform(4, 8), 32, cfg=2)
    assert all(len(m) == 2 for m in machines(layout, "cfg"))
    # heads split, but with 2 machines a2a saves no bytes and adds an output return
    assert layout.torus_exchange == "kv"
    assert any("a torus of 2" in note for note in layout.notes)


def test_torus_of_four_with_heads_that_split_exchanges_heads():
    layout = plan_layout(Topology.uniform(4, 8), 32)
    assert (layout.dims.ulysses, layout.dims.torus, layout.torus_exchange) == (8, 4, "a2a")


def test_one_machine_of_eight_is_ulysses_only():
    layout = plan_layout(Topology.uniform(1, 8), FLUX_HEADS)
    assert layout.dims.shape == (1, 1, 1, 8)
    assert layout.notes[0].startswith("ulysses=8:")


def test_heads_limit_ulysses_and_rest_goes_to_torus():
    layout = plan_layout(Topology.uniform(1, 8), 12)
    assert (layout.dims.ulysses, layout.dims.torus) == (4, 2)
    assert "torus ring runs inside a machine" in layout.notes


def test_user_degree_is_kept_and_other_filled_in():
    layout = plan_layout(Topology.uniform(2, 4), FLUX_HEADS, ulysses=2)
    assert (layout.dims.ulysses, layout.dims.torus) == (2, 4)
    layout = plan_layout(Topology.uniform(2, 4), FLUX_HEADS, torus=2)
    assert (layout.dims.ulysses, layout.dims.torus) == (4, 2)


@pytest.mark.parametrize("kwargs,heads,message", [
    (dict(ulysses=3), FLUX_HEADS, "ulysses degree 3 does not divide the sequence-parallel size 8"),
    (dict(ulysses=4, torus=4), FLUX_HEADS, "= 16, but 8 ranks are running"),
    (dict(cfg=3), FLUX_HEADS, "cfg (3) x dp (1) = 3 does not divide the world size 8"),
    (dict(ulysses=4), 30, "30 attention heads are not divisible by ulysses degree 4; "
                          "ulysses degrees that work here: [1, 2]"),
    (dict(ulysses=8), FLUX_HEADS, "ulysses degree 8 puts one all-to-all group on several machines"),
    (dict(ulysses=4, torus=2, torus_exchange="a2a"), 12,
     "torus exchange 'a2a' needs heads divisible by ulysses x torus = 8, but there are 12 heads"),
    (dict(ulysses=4, torus=2, torus_exchange="a2a"), 12, "there are 12 heads; use 'a2a-kv', 'kv' or 'auto'"),
    (dict(ulysses=2, torus=4, torus_exchange="a2a"), 6, "there are 6 heads; use 'kv' or 'auto'"),
    (dict(ulysses=1, torus=8, torus_exchange="a2a-kv"), 12,
     "torus exchange 'a2a-kv' needs heads divisible by the torus degree 8, but there are 12 heads"),
    (dict(torus_exchange="ring"), FLUX_HEADS, "unknown torus exchange 'ring'"),
    (dict(ulysses=0), FLUX_HEADS, "ulysses degree must be >= 1"),
])
def test_refusals_say_what_is_wrong_and_what_works(kwargs, heads, message):
    with pytest.raises(LayoutError) as err:
        plan_layout(Topology.uniform(2, 4), heads, **kwargs)
    assert message in str(err.value)


def test_spanning_refusal_suggests_degrees_that_fit():
    with pytest.raises(LayoutError, match=r"ulysses in \[1, 2, 4\]"):
        plan_layout(Topology.uniform(2, 4), FLUX_HEADS, ulysses=8)


def test_unequal_machines_are_refused():
    with pytest.raises(ValueError, match="machine 0: 3, machine 1: 1"):
        Topology((0, 0, 0, 1))


def test_ranks_are_grouped_by_machine_even_when_interleaved():
    topo = Topology((0, 1, 0, 1))  # e.g. a launcher that alternates machines
    layout = plan_layout(topo, FLUX_HEADS, ulysses=2)
    assert layout.groups("ulysses") == [[0, 2], [1, 3]]
    assert layout.groups("torus") == [[0, 1], [2, 3]]


def test_link_type_from_nvidia_smi_matrix():
    nvlink = "\tGPU0\tGPU1\nGPU0\t X \tNV18\nGPU1\tNV18\t X \n"
    pcie = "\tGPU0\tGPU1\nGPU0\t X \tPHB\nGPU1\tPHB\t X \n"
    assert link_type_from_topo_matrix(nvlink) == "nvlink"
    assert link_type_from_topo_matrix(pcie) == "pcie"
    assert link_type_from_topo_matrix("") == "unknown"
    # GPU rows also hold their paths to NICs: those are not GPU-to-GPU links
    with_nics = ("\tGPU0\tGPU1\tNIC0\tNIC1\tCPU Affinity\tNUMA Affinity\n"
                 "GPU0\t X \tNV8\tNODE\tSYS\t0-47\t0\nGPU1\tNV8\t X \tSYS\tPIX\t48-95\t1\n"
                 "NIC0\tNODE\tSYS\t X \tSYS\nNIC1\tSYS\tPIX\tSYS\t X \n")
    assert link_type_from_topo_matrix(with_nics) == "nvlink"


def test_auto_degrees_fit_machines_when_cfg_or_dp_shrink_the_sp_group():
    """SP smaller than a machine: the chosen all-to-all degree must still divide a machine
    (it picked 4 on machines of 6, then refused its own choice)."""
    layout = plan_layout(Topology.uniform(2, 6), 24, cfg=3)
    assert layout.dims.ulysses in (1, 2) and all(len(m) == 1 for m in machines(layout, "ulysses"))
    layout = plan_layout(Topology.uniform(3, 8), None, cfg=2, dp=2)
    assert 8 % layout.dims.ulysses == 0 and all(len(m) == 1 for m in machines(layout, "ulysses"))
    assert plan_layout(Topology.uniform(1, 8), 1).dims.ulysses == 1  # one head: nothing to split


def test_refusals_name_degrees_that_work():
    with pytest.raises(LayoutError, match=r"torus degree 1 leaves ulysses degree 8 .* torus degrees that work: \[2, 4, 8\]"):
        plan_layout(Topology.uniform(2, 4), 24, torus=1)
    with pytest.raises(LayoutError, match="= 16, but 8 ranks are running; .* with ulysses=4, torus must be 2"):
        plan_layout(Topology.uniform(2, 4), 24, ulysses=4, torus=4)
    with pytest.raises(LayoutError, match=r"ulysses degrees that work here: \[1, 2, 3, 6\]"):
        plan_layout(Topology.uniform(4, 6), 12, ulysses=8)  # the list holds placement too
    with pytest.raises(LayoutError, match="unknown torus exchange 'ring'"):
        plan_layout(Topology.uniform(2, 4), None, torus_exchange="ring")


def test_mixed_placement_is_said_as_it_is():
    layout = plan_layout(Topology.uniform(2, 6), 24, cfg=3, ulysses=2)
    assert "torus ring crosses machines in 2 of 6 groups" in layout.notes, layout.notes


def test_degrees_left_out_keep_the_all_to_all_inside_a_machine_even_unchecked():
    """diffusers' 'usp' with no degrees plans with placement unchecked (baselines may span
    machines when asked); the degrees it picks itself still keep Ulysses inside one."""
    layout = plan_layout(Topology.uniform(2, 4), 24, torus_exchange="kv", check_placement=False)
    assert (layout.dims.ulysses, layout.dims.torus) == (4, 2)
    asked = plan_layout(Topology.uniform(2, 4), 24, ulysses=8, check_placement=False)
    assert (asked.dims.ulysses, asked.dims.torus) == (8, 1)  # given by hand: honoured
