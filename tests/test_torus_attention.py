"""Torus Attention on spawned gloo ranks equals single-process attention.

Every case draws fresh random Q/K/V (and joint text tokens), runs the
distributed schedule on the emulated grid (machines x ranks per machine) and
compares each rank's output shard with float64 attention over the whole
sequence computed in one process.
"""

import os
import random
import sys

import pytest
import torch
import torch.distributed as dist

from dist_harness import rel_err, run_ranks
from swiftfusion_xdit.block_attention import KERNELS
from swiftfusion_xdit.mesh import build_mesh, plan_layout
from swiftfusion_xdit.topology import detect_topology
from swiftfusion_xdit.torus_attention import Joint, SPGroups, torus_attention

TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}
HEADS, HEAD_DIM = 24, 128  # Flux's attention shape, on a reduced sequence


def reference(q, k, v, joint=None, keep=None):
    """Plain attention over [joint; sequence] in float64 (order does not matter);
    ``keep`` (B, S_text + S): key padding, True where a key may be attended."""
    if joint is not None:
        k, v = torch.cat((joint.k, k), 2), torch.cat((joint.v, v), 2)
        q = torch.cat((joint.q, q), 2) if joint.q is not None else q
    if keep is None:
        out, _ = KERNELS["math"][0](q.double(), k.double(), v.double(), q.shape[-1] ** -0.5)
    else:
        scores = q.double() @ k.double().transpose(-1, -2) * q.shape[-1] ** -0.5
        out = torch.softmax(scores.masked_fill(~keep[:, None, None, :], float("-inf")), -1) @ v.double()
    if joint is None or joint.q is None:
        return out, None
    n = joint.q.shape[2]
    return out[:, :, n:], out[:, :, :n]


def _cases(seed, world):
    rng = random.Random(seed)
    for dtype in (torch.float32, torch.bfloat16):
        for joint in ("none", "front", "rear", "kv_only"):
            tokens = world * rng.choice((8, 12, 16))
            yield dtype, joint, tokens, rng.randrange(2**31)


class PeerStepsOnly:
    """The gloo transport without its collective all-gather: K/V take T-1 peer steps
    (the path one-sided transports use)."""

    def __init__(self):
        from swiftfusion_xdit.transport import TwoSidedTransport
        self.inner, self.name = TwoSidedTransport("gloo"), "gloo-peer-steps"
        self.all_to_all, self.exchange = self.inner.all_to_all, self.inner.exchange


def _check_grid(rank, world, nodes, per_node, seed, heads, exchange, peer_steps=False, head_chunks=1,
                transport=None):
    topo = detect_topology()
    assert topo.num_nodes == nodes and topo.gpus_per_node == per_node
    layout = plan_layout(topo, heads, ulysses=per_node, torus=nodes, torus_exchange=exchange)
    mesh = build_mesh(layout)
    groups = SPGroups(mesh.ulysses_group, mesh.torus_group, layout.torus_exchange, head_chunks)
    transport = transport() if transport else PeerStepsOnly() if peer_steps else None
    for dtype, joint_kind, tokens, case_seed in _cases(seed, world):
        g = torch.Generator().manual_seed(case_seed)
        full = [torch.randn(2, heads, tokens, HEAD_DIM, generator=g).to(dtype) for _ in range(3)]
        joint = None
        if joint_kind != "none":
            jq, jk, jv = (torch.randn(2, heads, 7, HEAD_DIM, generator=g).to(dtype) for _ in range(3))
            joint = Joint(None if joint_kind == "kv_only" else jq, jk, jv)
        shard = tokens // world
        lo = mesh.sp_rank * shard
        local = [x[:, :, lo:lo + shard] for x in full]
        result = torus_attention(*local, groups, joint=joint, transport=transport)
        out, joint_out = result if isinstance(result, tuple) else (result, None)
        if joint_kind in ("none", "kv_only"):  # with joint queries xfuser's USP contract joins both
            # stored (B, S, H, D): the processors' reshape to (B, S, H*D) that follows is a view
            assert out.transpose(1, 2).is_contiguous(), f"output strides {out.stride()}"
        ref, joint_ref = reference(*full, joint)
        err = rel_err(out, ref[:, :, lo:lo + shard])
        assert err < TOL[dtype], f"{dtype} joint={joint_kind} tokens={tokens}: rel err {err:.2e}"
        if joint_ref is not None:
            jerr = rel_err(joint_out, joint_ref)
            assert jerr < TOL[dtype], f"{dtype} joint={joint_kind}: joint rel err {jerr:.2e}"


GRIDS = [(1, 2), (2, 1), (2, 2), (1, 4), (4, 1), (3, 1)]


@pytest.mark.parametrize("nodes,per_node", GRIDS, ids=[f"{m}x{g}" for m, g in GRIDS])
def test_matches_single_process(nodes, per_node):
    run_ranks(_check_grid, nodes, per_node, nodes, per_node, random.randrange(2**31), HEADS, "auto")


@pytest.mark.parametrize("nodes,per_node,heads", [(2, 2, 6), (4, 1, 6), (3, 1, 4)])
def test_kv_exchange_when_heads_do_not_split(nodes, per_node, heads):
    run_ranks(_check_grid, nodes, per_node, nodes, per_node, random.randrange(2**31), heads, "auto")


def test_kv_exchange_forced():
    run_ranks(_check_grid, 2, 2, 2, 2, random.randrange(2**31), HEADS, "kv")


def test_a2a_exchange_forced_with_two_machines():
    run_ranks(_check_grid, 2, 2, 2, 2, random.randrange(2**31), HEADS, "a2a")


def test_kv_exchange_by_peer_steps():
    # two machines: where the gloo transport would otherwise use its all-gather
    run_ranks(_check_grid, 2, 2, 2, 2, random.randrange(2**31), HEADS, "kv", True)


def test_a2a_kv_exchange_forced():
    # 6 heads split over the 2 machines, not over 2 x 2 ranks: a2a is impossible here
    run_ranks(_check_grid, 2, 2, 2, 2, random.randrange(2**31), 6, "a2a-kv")


def test_a2a_kv_exchange_by_peer_steps():
    # the K/V gather inside a machine as peer steps: the path transports without a collective take
    run_ranks(_check_grid, 2, 2, 2, 2, random.randrange(2**31), 6, "a2a-kv", True)


THREAD_GRIDS = [(2, 4), (4, 2), (2, 8), (4, 8)]  # (machines, ranks per machine)


@pytest.mark.parametrize("heads", [24, 40])
@pytest.mark.parametrize("machines,per", THREAD_GRIDS, ids=[f"{m}x{g}" for m, g in THREAD_GRIDS])
def test_every_exchange_on_large_grids_with_a_rank_per_thread(machines, per, heads):
    """Up to 32 ranks as threads of this process (tests/gpu/thread_ranks.py): every exchange
    the heads allow, with each kind of joint text and key padding, against float64 attention."""
    here = os.path.dirname(__file__)  # thread_ranks lives with the GPU tests, its helpers in benchmarks/
    sys.path[:0] = [os.path.join(here, "gpu"), os.path.join(here, "..", "benchmarks")]
    import thread_ranks
    rows = thread_ranks.attention_rows(f"{machines}x{per}", "cpu", small=True, heads=heads)
    assert {r["exchange"] for r in rows} >= {"kv", "a2a-kv"}
    assert {r["joint"] for r in rows} == {"none", "front", "keys_only", "padded"}
    assert all(r["ok"] for r in rows), [r for r in rows if not r["ok"]]


HEAD_CHUNKED = [(2, 3), (2, 4), (4, 2), (4, 6)]  # (ranks, chunks) of one machine, 24 heads


@pytest.mark.parametrize("per_node,chunks", HEAD_CHUNKED, ids=[f"1x{g}-hc{c}" for g, c in HEAD_CHUNKED])
def test_head_chunked_all_to_all_matches_single_process(per_node, chunks):
    run_ranks(_check_grid, 1, per_node, 1, per_node, random.randrange(2**31), HEADS, "auto", False, chunks)


def test_head_chunks_over_a_blocking_transport_that_reuses_its_buffers():
    # no all_to_all_start: the chunks run one after another, each result used before the next
    run_ranks(_check_grid, 1, 4, 1, 4, random.randrange(2**31), HEADS, "auto", False, 3, SlotBorrowing)


def _strided_rows(rank, world, seed):
    """Inputs whose last dimension has a stride: the raw CPU kernel would read them wrongly,
    so the U == 1 path, which otherwise uses the caller's tensors as they are, copies them."""
    groups = SPGroups(None, dist.group.WORLD if world > 1 else None, "kv")
    g = torch.Generator().manual_seed(seed)
    tokens = world * 8
    full = [torch.randn(2, HEAD_DIM, tokens, HEADS, generator=g).permute(0, 3, 2, 1) for _ in range(3)]
    assert full[0].stride(-1) != 1
    lo = rank * 8
    out = torus_attention(*(x[:, :, lo:lo + 8] for x in full), groups)
    assert rel_err(out, reference(*full)[0][:, :, lo:lo + 8]) < 1e-5


@pytest.mark.parametrize("nodes", [1, 2])
def test_inputs_with_a_strided_last_dimension(nodes):
    run_ranks(_strided_rows, nodes, 1, random.randrange(2**31))


def _compiled_grid(rank, world, nodes, per_node, exchange, seed, head_chunks=1):
    """fullgraph=True: dynamo must trace the whole schedule -- exchanges included -- into one graph."""
    topo = detect_topology()
    layout = plan_layout(topo, HEADS, ulysses=per_node, torus=nodes, torus_exchange=exchange)
    mesh = build_mesh(layout)
    groups = SPGroups(mesh.ulysses_group, mesh.torus_group, exchange, head_chunks)
    g = torch.Generator().manual_seed(seed)
    tokens = world * 8
    full = [torch.randn(1, HEADS, tokens, HEAD_DIM, generator=g) for _ in range(3)]
    joint = Joint(*(torch.randn(1, HEADS, 5, HEAD_DIM, generator=g) for _ in range(3)))
    lo = mesh.sp_rank * (tokens // world)
    local = [x[:, :, lo:lo + tokens // world] for x in full]
    from swiftfusion_xdit.transport import resolve_transport
    transport = resolve_transport("auto")  # resolved once, as the integrations do
    compiled = torch.compile(lambda q, k, v: torus_attention(q, k, v, groups, joint=joint, transport=transport),
                             fullgraph=True, backend="aot_eager")
    out, joint_out = compiled(*local)
    ref, joint_ref = reference(*full, joint)
    assert rel_err(out, ref[:, :, lo:lo + tokens // world]) < 1e-5
    assert rel_err(joint_out, joint_ref) < 1e-5


COMPILED = [(2, 2, "kv", 1), (3, 1, "a2a", 1), (1, 2, "kv", 3)]  # (..., head_chunks)


@pytest.mark.parametrize("nodes,per_node,exchange,head_chunks", COMPILED)
def test_compiles_into_one_graph(nodes, per_node, exchange, head_chunks):
    """Under torch.compile the exchanges become functional collectives (no graph break)."""
    run_ranks(_compiled_grid, nodes, per_node, nodes, per_node, exchange, random.randrange(2**31),
              head_chunks)


def _default_transport_compiled(rank, world):
    from swiftfusion_xdit import transport as transport_module
    transport_module._LAST_DEFAULT[0] = None  # a fresh process: nothing resolved yet
    groups = SPGroups(dist.group.WORLD, None, "kv")
    q = torch.randn(1, HEADS, 8, HEAD_DIM)
    compiled = torch.compile(lambda q: torus_attention(q, q, q, groups), fullgraph=True, backend="aot_eager")
    with pytest.raises(Exception, match="the transport must be resolved before tracing"):
        compiled(q)
    eager = torus_attention(q, q, q, groups)  # resolves the default transport
    torch._dynamo.reset()
    assert torch.equal(compiled(q), eager)


def test_default_transport_under_fullgraph_is_resolved_eagerly_first():
    """transport=None cannot be resolved inside a trace (a topology gather): a clear error
    until one eager call has resolved it, then the compiled call uses that transport."""
    run_ranks(_default_transport_compiled, 1, 2)


class SlotBorrowing:
    """gloo underneath, but every result lands in one of two slots per channel and is
    overwritten at this rank's next use of the channel -- what the NVSHMEM transport
    guarantees (a peer may already be writing the use after)."""

    def __init__(self):
        from swiftfusion_xdit.transport import TwoSidedTransport
        self.inner, self.name, self.slots, self.uses = TwoSidedTransport("gloo"), "borrowing", {}, {}

    def _lend(self, kind, result):
        key = (kind, tuple(result.shape))
        use = self.uses[key] = self.uses.get(key, 0) + 1
        slots = self.slots.setdefault(key, [torch.empty_like(result), torch.empty_like(result)])
        slots[(use - 1) % 2].fill_(float("nan"))  # the previous use's result is no longer ours
        slots[use % 2].copy_(result)
        return slots[use % 2]

    def all_to_all(self, x, group, scatter_dim=0, gather_dim=0):
        return self._lend("a2a", self.inner.all_to_all(x, group, scatter_dim, gather_dim))

    def exchange(self, send, dst, src, group):
        pending, lend = self.inner.exchange(send, dst, src, group), self._lend
        distance = (dst - dist.get_rank(group)) % dist.get_world_size(group)

        class Borrowed:
            def wait(self):
                return lend(f"exchange{distance}", pending.wait())
        return Borrowed()


def _layers_with_borrowed_buffers(rank, world, nodes, per_node, exchange, seed):
    """Several layers in a row: every output must still be right after later layers reused
    the transport's slots."""
    layout = plan_layout(detect_topology(), HEADS, ulysses=per_node, torus=nodes, torus_exchange=exchange)
    mesh = build_mesh(layout)
    groups, transport = SPGroups(mesh.ulysses_group, mesh.torus_group, exchange), SlotBorrowing()
    g = torch.Generator().manual_seed(seed)
    tokens, lo = world * 8, mesh.sp_rank * 8
    layers = [[torch.randn(1, HEADS, tokens, HEAD_DIM, generator=g) for _ in range(3)] for _ in range(3)]
    outs = [torus_attention(*(x[:, :, lo:lo + 8] for x in qkv), groups, transport=transport)
            for qkv in layers]
    for qkv, out in zip(layers, outs):
        assert rel_err(out, reference(*qkv)[0][:, :, lo:lo + 8]) < 1e-5


@pytest.mark.parametrize("nodes,per_node,exchange", [(2, 2, "kv"), (3, 1, "a2a"), (1, 2, "kv")])
def test_outputs_survive_a_transport_that_reuses_its_buffers(nodes, per_node, exchange):
    run_ranks(_layers_with_borrowed_buffers, nodes, per_node, nodes, per_node, exchange,
              random.randrange(2**31))


class Counting:
    """gloo, counting the calls each group makes."""

    def __init__(self):
        from swiftfusion_xdit.transport import TwoSidedTransport
        self.inner, self.name, self.calls = TwoSidedTransport("gloo"), "counting", []

    def all_to_all(self, *args):
        self.calls.append("all_to_all")
        return self.inner.all_to_all(*args)

    def exchange(self, *args):
        self.calls.append("exchange")
        return self.inner.exchange(*args)


def _pair_routes_each_group(rank, world, seed):
    from swiftfusion_xdit.transport import TransportPair
    layout = plan_layout(detect_topology(), HEADS, ulysses=2, torus=2, torus_exchange="a2a")
    mesh = build_mesh(layout)
    pair = TransportPair(Counting(), Counting())
    g = torch.Generator().manual_seed(seed)
    full = [torch.randn(1, HEADS, 32, HEAD_DIM, generator=g) for _ in range(3)]
    lo = mesh.sp_rank * 8
    out = torus_attention(*(x[:, :, lo:lo + 8] for x in full),
                          SPGroups(mesh.ulysses_group, mesh.torus_group, "a2a"), transport=pair)
    assert rel_err(out, reference(*full)[0][:, :, lo:lo + 8]) < 1e-5
    assert pair.ulysses.calls == ["all_to_all", "all_to_all"]  # sequence -> heads, and back
    assert pair.torus.calls == ["exchange", "exchange"]  # Q/K/V step, output return


def test_a_transport_pair_serves_each_group_with_its_own_transport():
    run_ranks(_pair_routes_each_group, 2, 2, random.randrange(2**31))


class StartCounting(Counting):
    """Counting, with the asynchronous all-to-all; names each call by its direction."""

    def all_to_all_start(self, x, group, scatter_dim=0, gather_dim=0):
        self.calls.append("qkv" if gather_dim == 3 else "out")
        return self.inner.all_to_all_start(x, group, scatter_dim, gather_dim)


def _head_chunk_order(rank, world, transport_class, seed):
    layout = plan_layout(detect_topology(), HEADS, ulysses=world, torus=1)
    mesh = build_mesh(layout)
    transport = transport_class()
    g = torch.Generator().manual_seed(seed)
    full = [torch.randn(1, HEADS, 8 * world, HEAD_DIM, generator=g) for _ in range(3)]
    lo = mesh.sp_rank * 8
    out = torus_attention(*(x[:, :, lo:lo + 8] for x in full),
                          SPGroups(mesh.ulysses_group, None, head_chunks=3), transport=transport)
    assert rel_err(out, reference(*full)[0][:, :, lo:lo + 8]) < 1e-5
    if transport_class is StartCounting:  # chunk g+1's exchange posted before chunk g attends
        assert transport.calls == ["qkv", "qkv", "out", "qkv", "out", "out"]
    else:  # blocking: strictly one chunk after another
        assert transport.calls == ["all_to_all"] * 6


@pytest.mark.parametrize("transport_class", [StartCounting, Counting], ids=["async", "blocking"])
def test_head_chunks_post_the_next_exchange_before_attending(transport_class):
    run_ranks(_head_chunk_order, 1, 2, transport_class, random.randrange(2**31))


def test_bad_head_chunks_are_refused():
    q = torch.randn(1, 4, 8, 16)
    torus_attention(q, q, q, SPGroups(None, None, head_chunks=2))  # one rank: nothing to split, fine
    with pytest.raises(ValueError, match=r"head_chunks=3 must divide the 4 heads .* one of \[1, 2, 4\]"):
        torus_attention(q, q, q, SPGroups(None, None, head_chunks=3))
    with pytest.raises(ValueError, match="head_chunks must be a positive integer, got 0"):
        torus_attention(q, q, q, SPGroups(None, None, head_chunks=0))


def _chunks_across_machines(rank, world):
    groups = SPGroups(None, dist.group.WORLD, head_chunks=2)
    q = torch.randn(1, 4, 8, 16)
    with pytest.raises(ValueError, match="with a torus degree of 2 the torus steps overlap already"):
        torus_attention(q, q, q, groups)


def test_head_chunks_across_machines_are_refused():
    run_ranks(_chunks_across_machines, 2, 1)


def _check_masked(rank, world, nodes, per_node, exchange, seed, with_joint=True):
    """Key padding: batch items with different masks, text keys masked too, and one
    rank's whole shard masked for the first item (a block with no key at all; without
    text keys, a row of the accumulators has none either until later blocks)."""
    layout = plan_layout(detect_topology(), HEADS, ulysses=per_node, torus=nodes, torus_exchange=exchange)
    mesh = build_mesh(layout)
    groups = SPGroups(mesh.ulysses_group, mesh.torus_group, layout.torus_exchange)
    g = torch.Generator().manual_seed(seed)
    tokens, text = world * 8, 7
    full = [torch.randn(2, HEADS, tokens, HEAD_DIM, generator=g) for _ in range(3)]
    joint_qkv = [torch.randn(2, HEADS, text, HEAD_DIM, generator=g) for _ in range(3)]
    keep = torch.rand(2, text + tokens, generator=g) > 0.3
    keep[0, text + 8 * (world - 1):] = False  # the last rank's shard, whole
    keep[:, text] = True  # every query keeps some key
    joint = Joint(*joint_qkv, key_mask=keep[:, :text]) if with_joint else None
    keep = keep if with_joint else keep[:, text:]
    lo, nj = mesh.sp_rank * 8, text if with_joint else 0
    result = torus_attention(*(x[:, :, lo:lo + 8] for x in full), groups, joint=joint,
                             key_mask=keep[:, nj + lo:nj + lo + 8])
    out, joint_out = result if with_joint else (result, None)
    ref, joint_ref = reference(*full, joint, keep)
    assert rel_err(out, ref[:, :, lo:lo + 8]) < 1e-5
    assert joint_ref is None or rel_err(joint_out, joint_ref) < 1e-5


MASKED = [(1, 2, "auto"), (2, 2, "kv"), (2, 2, "a2a"), (4, 1, "a2a"), (3, 1, "kv")]


@pytest.mark.parametrize("nodes,per_node,exchange", MASKED, ids=[f"{m}x{g}-{e}" for m, g, e in MASKED])
def test_key_padding_matches_masked_attention(nodes, per_node, exchange):
    run_ranks(_check_masked, nodes, per_node, nodes, per_node, exchange, random.randrange(2**31))


@pytest.mark.parametrize("nodes,per_node", [(2, 2), (4, 1)])
def test_key_padding_without_text_keys(nodes, per_node):
    run_ranks(_check_masked, nodes, per_node, nodes, per_node, "a2a", random.randrange(2**31), False)


def test_a_mask_that_keeps_every_key_runs_the_unmasked_kernels(monkeypatch):
    """Masked blocks cost a host sync and a gather per batch item: a mask with nothing
    masked (one prompt, no padding) must not take that path."""
    import importlib
    module = importlib.import_module("swiftfusion_xdit.torus_attention")  # not the function of that name
    seen, attend_kept = [], module.attend_kept
    monkeypatch.setattr(module, "attend_kept", lambda *a: seen.append(a[-1] is None) or attend_kept(*a))
    q, k, v, jq, jk, jv = (torch.randn(2, 4, n, 16) for n in (8, 8, 8, 3, 3, 3))
    for keep, plain in ((torch.ones(2, 8, dtype=torch.bool), True),
                        (torch.ones(2, 8, dtype=torch.bool).index_fill(1, torch.tensor([5]), False), False)):
        seen.clear()
        joint = Joint(jq, jk, jv, key_mask=torch.ones(2, 3, dtype=torch.bool))
        out, joint_out = torus_attention(q, k, v, SPGroups(None, None), joint=joint, key_mask=keep)
        ref, joint_ref = reference(q, k, v, joint, torch.cat((joint.key_mask, keep), 1))
        assert rel_err(out, ref) < 1e-5 and rel_err(joint_out, joint_ref) < 1e-5
        assert seen == [plain], seen


def test_a_malformed_key_mask_is_named():
    q = torch.randn(1, 4, 8, 16)
    with pytest.raises(ValueError, match=r"key_mask must be a bool tensor of shape \(batch, keys\) = \(1, 8\)"):
        torus_attention(q, q, q, SPGroups(None, None), key_mask=torch.ones(1, 8))  # additive float
    joint = Joint(q[:, :, :3], q[:, :, :3], q[:, :, :3], key_mask=torch.ones(1, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"Joint.key_mask .* \(1, 3\)"):
        torus_attention(q, q, q, SPGroups(None, None), joint=joint)


def _check_cross(rank, world, nodes, per_node, seed):
    """Cross-attention to a sharded sequence of another length (LTX's text): each rank's
    queries against every rank's keys, with and without key padding, fp32 and bf16."""
    layout = plan_layout(detect_topology(), HEADS, ulysses=per_node, torus=nodes)
    mesh = build_mesh(layout)
    groups = SPGroups(mesh.ulysses_group, mesh.torus_group, layout.torus_exchange)
    g = torch.Generator().manual_seed(seed)
    q_all = torch.randn(2, HEADS, world * 6, HEAD_DIM, generator=g)
    kv_all = [torch.randn(2, HEADS, world * 3, HEAD_DIM, generator=g) for _ in range(2)]
    keep = torch.rand(2, world * 3, generator=g) > 0.4
    keep[:, 0] = True
    keep[0, 3 * (world - 1):] = False  # the last rank holds only padding for the first item
    mine = lambda x, n: x[:, :, mesh.sp_rank * n:(mesh.sp_rank + 1) * n]
    for dtype in (torch.float32, torch.bfloat16):
        for mask in (None, keep):
            out = torus_attention(mine(q_all, 6).to(dtype), *(mine(x, 3).to(dtype) for x in kv_all),
                                  groups, key_mask=None if mask is None else mask[:, mesh.sp_rank * 3:][:, :3])
            ref, _ = reference(q_all, *kv_all, keep=mask)
            err = rel_err(out, mine(ref, 6))
            assert err < TOL[dtype], f"{dtype} masked={mask is not None}: rel err {err:.2e}"


@pytest.mark.parametrize("nodes,per_node", [(1, 2), (2, 2), (3, 1)])
def test_cross_attention_to_sharded_keys_of_another_length(nodes, per_node):
    run_ranks(_check_cross, nodes, per_node, nodes, per_node, random.randrange(2**31))


def test_a_batch_item_without_any_key_is_refused():
    q = torch.randn(2, 4, 8, 16)
    keep = torch.ones(2, 8, dtype=torch.bool)
    keep[1] = False
    with pytest.raises(ValueError, match=r"every key of batch item\(s\) \[1\] is masked out"):
        torus_attention(q, q, q, SPGroups(None, None), key_mask=keep)
    with pytest.raises(ValueError, match=r"every key of batch item\(s\) \[1\] is masked out"):
        torus_attention(q, q[:, :, :4], q[:, :, :4], SPGroups(None, None), key_mask=keep[:, :4])


@pytest.mark.parametrize("masked", [False, True])
def test_a_lone_block_lets_sdpa_choose_unless_a_kernel_is_named(monkeypatch, masked):
    """One machine, one rank: the block's output is final, so its LSE is not computed
    (PyTorch's SDPA picks the kernel); a kernel named by the caller is still used."""
    q, k, v = (torch.randn(2, 4, 24, 16) for _ in range(3))
    joint = Joint(*(torch.randn(2, 4, 5, 16) for _ in range(3)))
    keep = torch.rand(2, 29) > 0.3 if masked else None
    want, want_joint = reference(q, k, v, joint, keep)
    if masked:
        joint.key_mask = keep[:, :5]
    sdpa, calls = torch.nn.functional.scaled_dot_product_attention, []
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda *a, **kw: calls.append(kw) or sdpa(*a, **kw))
    for kernel, via_sdpa in (("auto", True), ("math", False)):
        calls.clear()
        out, joint_out = torus_attention(q, k, v, SPGroups(None, None), joint=joint, kernel=kernel,
                                         key_mask=None if keep is None else keep[:, 5:])
        assert bool(calls) == via_sdpa
        assert rel_err(out, want) < 1e-5 and rel_err(joint_out, want_joint) < 1e-5


def test_mismatched_heads_are_refused_not_dropped():
    q = torch.randn(1, 4, 8, 16)
    with pytest.raises(ValueError, match=r"joint.k has shape \(1, 8, 3, 16\), .* same batch, heads and head dim"):
        torus_attention(q, q, q, SPGroups(None, None), joint=Joint(None, *(torch.randn(1, 8, 3, 16),) * 2))
    with pytest.raises(ValueError, match=r"k has shape \(1, 2, 8, 16\).*repeat_interleave its heads to 4"):
        torus_attention(q, q[:, :2], q[:, :2], SPGroups(None, None))


def test_padding_the_head_dim_is_exact():
    """CUDA's LSE kernels take head dims that are multiples of 8 only; others are padded
    with zeros (checked here with the CPU kernel against the unpadded reference)."""
    from swiftfusion_xdit.block_attention import pad_head_dim
    q, k, v = (torch.randn(2, 3, 11, 36) for _ in range(3))
    out, lse = pad_head_dim(KERNELS["cpu_flash"][0])(q, k, v, 36 ** -0.5)
    want, want_lse = KERNELS["math"][0](q.double(), k.double(), v.double(), 36 ** -0.5)
    assert out.shape == q.shape and rel_err(out, want) < 1e-6 and rel_err(lse, want_lse) < 1e-6
    assert want.dtype == torch.float64  # the reference really is float64
