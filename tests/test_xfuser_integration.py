"""--sp-strategy torus on xfuser 0.7.0, on CPU (see xfuser_cpu_shim for what is covered)."""

import os
import random
import subprocess
import sys
import textwrap

import pytest
import torch

import xfuser_cpu_shim  # noqa: F401  (must precede any xfuser import)
from dist_harness import rel_err, run_ranks
from test_torus_attention import reference

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run_python(code: str, env_extra=None) -> str:
    env = {**os.environ, **(env_extra or {})}
    env["PYTHONPATH"] = os.pathsep.join([ROOT, os.path.join(ROOT, "tests"), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


PARSE = """
    import site, sys
    import xfuser_cpu_shim
    site.addsitedir({pth_dir!r})  # runs swiftfusion_xdit.pth, as at start-up (the shim registers nothing)
    from xfuser.config import FlexibleArgumentParser, xFuserArgs
    for add in (xFuserArgs.add_cli_args, xFuserArgs.add_runner_args):
        parser = FlexibleArgumentParser()
        add(parser)
        try:
            ns = parser.parse_args(["--model", "m", "--ulysses_degree", "2", "--ring_degree", "2",
                                    "--sp-strategy", "torus", "--sp-comm", "nccl", "--sp-head-chunks", "3"])
        except SystemExit:
            print("rejected"); continue
        args = xFuserArgs.from_cli_args(ns)
        runner = xFuserArgs.from_runner_args(vars(ns))
        print(args.sp_strategy, args.sp_comm, args.ulysses_degree, args.ring_degree, runner.sp_strategy,
              args.sp_head_chunks)
    ns = parser.parse_args(["--model", "m"])
    print("default", xFuserArgs.from_cli_args(ns).sp_strategy)
"""


def test_startup_hook_adds_flag_to_xfusers_own_parsers():
    out = _run_python(PARSE.format(pth_dir=ROOT)).split("\n")
    assert out[:3] == ["torus nccl 2 2 torus 3", "torus nccl 2 2 torus 3", "default usp"]


def test_startup_hook_imports_nothing_heavy():
    """The hook runs in every Python process of the environment: it must not import torch."""
    out = _run_python(f"""
        import site, sys
        site.addsitedir({ROOT!r})
        print("torch" in sys.modules, "swiftfusion_xdit" in sys.modules)
    """)
    assert out.split() == ["False", "False"]


def test_opt_out_leaves_xfuser_untouched():
    out = _run_python(PARSE.format(pth_dir=ROOT).replace('    ns = parser.parse_args(["--model", "m"])\n'
                                                         '    print("default", xFuserArgs.from_cli_args(ns).sp_strategy)\n', ""),
                      {"SWIFTFUSION_XDIT_DISABLE": "1"})
    assert out.split() == ["rejected", "rejected"]


def _args(argv):
    from xfuser.config import FlexibleArgumentParser, xFuserArgs
    from swiftfusion_xdit.xfuser_integration import install
    install()
    parser = FlexibleArgumentParser()
    xFuserArgs.add_cli_args(parser)
    return xFuserArgs.from_cli_args(parser.parse_args(["--model", "m", *argv]))


def _config_flow(rank, world, seed):
    """create_config: degrees filled in, groups by machine, USP routed to Torus Attention."""
    import xfuser.config.args as xargs
    import xfuser.model_executor.layers.usp as usp_module
    seen = {}
    from swiftfusion_xdit import xfuser_integration as xi
    xi.install()  # a no-op where the start-up hook already ran (wheel installs)
    # xfuser's own create_config needs a GPU (yunchang check); our wrapper runs around a
    # recorder of what xfuser would receive.
    record = lambda self: seen.setdefault("degrees", (self.ulysses_degree, self.ring_degree))
    xargs.xFuserArgs.create_config = lambda self: xi._create_config(self, record)
    args = _args(["--sp-strategy", "torus"])
    args.create_config()
    assert seen["degrees"] == (2, 2), seen  # 2 machines x 2: ulysses inside, torus across
    import xfuser.model_executor.models.transformers.transformer_flux as flux
    import xfuser.model_executor.layers.attention_processor as processors
    assert flux.USP is xi.torus_usp and processors.USP is xi.torus_usp
    assert usp_module.USP is xi.torus_usp
    layout = xi._STATE["layout"]
    assert layout.groups("ulysses") == [[0, 1], [2, 3]] and layout.groups("torus") == [[0, 2], [1, 3]]

    # xfuser's USP contract: (B, H, S_local, D), joint tokens replicated, output [joint; local] (front)
    rng = random.Random(seed)
    heads, tokens, text = 24, 32, 8
    sp_rank = rank  # xfuser's SP rank = shard index
    for strategy in ("front", "rear"):
        g = torch.Generator().manual_seed(rng.randrange(2**31))
        full = [torch.randn(1, heads, tokens, 64, generator=g) for _ in range(3)]
        jq, jk, jv = (torch.randn(1, heads, text, 64, generator=g) for _ in range(3))
        sl = slice(sp_rank * tokens // world, (sp_rank + 1) * tokens // world)
        out = flux.USP(*(x[:, :, sl] for x in full), joint_query=jq, joint_key=jk, joint_value=jv,
                       joint_strategy=strategy)
        from swiftfusion_xdit.torus_attention import Joint
        ref, jref = reference(*full, Joint(jq, jk, jv))
        expect = torch.cat((jref, ref[:, :, sl]) if strategy == "front" else (ref[:, :, sl], jref), 2)
        assert rel_err(out, expect) < 1e-5, strategy
        # stored (B, S, H, D): xfuser's transpose(1, 2).reshape(B, S, H*D) after USP is a view
        assert out.transpose(1, 2).is_contiguous(), strategy
    out = flux.USP(*(x[:, :, sl] for x in full), joint_key=jk, joint_value=jv, joint_strategy="front")
    assert rel_err(out, reference(*full, Joint(None, jk, jv))[0][:, :, sl]) < 1e-5  # text keys only
    out = flux.USP(*(x[:, :, sl] for x in full))
    assert rel_err(out, reference(*full)[0][:, :, sl]) < 1e-5
    # Lumina2's calls: grouped-query K/V (12 K/V heads for 24 queries) and a boolean
    # key-padding mask over the whole sequence
    q, k, v = (x[:, :, sl] for x in full)
    keep = torch.rand(1, tokens, generator=g) > 0.3
    keep[0, 0] = True
    out = flux.USP(q, k[:, ::2], v[:, ::2], kv_head_repeat=2,
                   attention_kwargs={"attn_mask": keep.view(1, 1, 1, -1)})
    kx, vx = (x[:, ::2].repeat_interleave(2, dim=1) for x in full[1:])
    assert rel_err(out, reference(full[0], kx, vx, keep=keep)[0][:, :, sl]) < 1e-5
    # padded text split with the sequence: the valid prefix of the whole sequence
    out = flux.USP(q, k, v, attention_kwargs={"valid_kv_len": tokens - 5})
    prefix = (torch.arange(tokens) < tokens - 5).unsqueeze(0)
    assert rel_err(out, reference(*full, keep=prefix)[0][:, :, sl]) < 1e-5
    with pytest.raises(NotImplementedError, match=r"attention_kwargs \['indices_k'\] .*--sp-strategy usp"):
        flux.USP(q, k, v, attention_kwargs={"indices_k": torch.arange(3)})
    with pytest.raises(NotImplementedError, match="grouped-query K/V .* with joint tokens"):
        flux.USP(q, k[:, ::2], v[:, ::2], kv_head_repeat=2, joint_query=jq, joint_key=jk,
                 joint_value=jv, joint_strategy="front")
    with pytest.raises(ValueError, match=rf"attn_mask must cover the whole sequence, .*, 1, {tokens}\)"):
        flux.USP(q, k, v, attention_kwargs={"attn_mask": keep[:, :tokens // 2].view(1, 1, 1, -1)})
    with pytest.raises(ValueError, match=rf"valid_kv_len must be in \[1, {tokens}\]"):
        flux.USP(q, k, v, attention_kwargs={"valid_kv_len": 0})


def test_config_flow_and_usp_routing_on_two_emulated_machines():
    run_ranks(_config_flow, 2, 2, random.randrange(2**31))


def _refusals(rank, world):
    from swiftfusion_xdit.mesh import LayoutError
    from swiftfusion_xdit.xfuser_integration import choose_strategy, plan_xfuser_torus
    cases = [
        (["--pipefusion_parallel_degree", "2"], "does not compose with PipeFusion"),
        (["--tensor_parallel_degree", "2"], "does not compose with tensor parallelism"),
        (["--ulysses_degree", "4", "--ring_degree", "1"], "ulysses degree 4 puts one all-to-all group on several machines"),
        (["--ulysses_degree", "3", "--ring_degree", "1"], "= 3, but 4 ranks are running"),
    ]
    for argv, message in cases:
        with pytest.raises(LayoutError, match=message):
            plan_xfuser_torus(_args(["--sp-strategy", "torus", *argv]))
    with pytest.raises(LayoutError, match="knows the shapes of FLUX.1 models only, not 'm'"):
        choose_strategy(_args(["--sp-strategy", "auto"]))
    with pytest.raises(LayoutError, match=r"auto picks .* cannot honour \{'--ulysses_degree': 4\}"):
        choose_strategy(_args(["--sp-strategy", "auto", "--model", "FLUX.1-dev", "--ulysses_degree", "4"]))
    with pytest.raises(LayoutError, match="cannot honour --attention_backend FLASH_3_FP8"):
        plan_xfuser_torus(_args(["--sp-strategy", "torus", "--attention_backend", "FLASH_3_FP8"]))
    plan_xfuser_torus(_args(["--sp-strategy", "torus", "--attention_backend", "cudnn"]))  # exact: served
    from swiftfusion_xdit.xfuser_integration import enable_torus
    layout = plan_xfuser_torus(_args(["--sp-strategy", "torus", "--sp-head-chunks", "2"]))
    with pytest.raises(ValueError, match="with a torus degree of 2 the torus steps overlap already"):
        enable_torus(layout, "auto", 2)
    args = _args(["--sp-strategy", "auto", "--model", "black-forest-labs/FLUX.1-dev"])
    choose_strategy(args)  # slow emulated network: one all-gather of K/V hidden under the local block
    assert (args.sp_strategy, args.ulysses_degree, args.ring_degree) == ("torus", 2, 2)
    args = _args(["--sp-strategy", "torus", "--use_cfg_parallel"])
    layout = plan_xfuser_torus(args)
    assert (args.ulysses_degree, args.ring_degree) == (2, 1)  # CFG takes the machine boundary
    assert layout.groups("cfg") == [[0, 2], [1, 3]]


def test_refusals_and_cfg_placement():
    run_ranks(_refusals, 2, 2)


PATCHED_XDIT = """
    import os, sys
    import xfuser_cpu_shim, swiftfusion_xdit  # our hook is registered, and must stand aside
    import torch.distributed as dist
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[1], RANK="0", WORLD_SIZE="1")
    dist.init_process_group("gloo")
    from xfuser.config import FlexibleArgumentParser, xFuserArgs
    import xfuser.model_executor.layers.usp as usp
    from swiftfusion_xdit.xfuser_integration import torus_usp
    # a runner dict before any parser exists in the process (a Python caller, no CLI)
    args = xFuserArgs.from_runner_args({"model": "m", "sp_strategy": "torus", "sp_comm": "nccl",
                                        "sp_head_chunks": 3})
    print("options", args.sp_comm, args.sp_head_chunks)
    parser = FlexibleArgumentParser()
    xFuserArgs.add_cli_args(parser)
    for strategy in ("usp", "torus"):
        args = xFuserArgs.from_cli_args(parser.parse_args(["--model", "m", "--sp_strategy", strategy,
                                                           "--sp-comm", "auto",
                                                           "--sp-head-chunks", "1"]))
        args.create_config()
        print(strategy, usp._SP_ATTENTION is torus_usp)
    # the plugin's own flags reach the engine args through the plugin point
    for make in (lambda ns: xFuserArgs.from_cli_args(ns), lambda ns: xFuserArgs.from_runner_args(vars(ns))):
        args = make(parser.parse_args(["--model", "m", "--sp-strategy", "torus", "--sp-comm", "nccl",
                                       "--sp-head-chunks", "3"]))
        print("options", args.sp_comm, args.sp_head_chunks)
"""


def test_upstream_patch_applies_to_released_xfuser_and_routes_usp(tmp_path):
    """patches/ is a unified diff against xfuser 0.7.0 as released (the installed wheel's files);
    the patched xfuser finds torus through the entry point alone and routes USP to it."""
    import importlib.util
    import shutil
    src = importlib.util.find_spec("xfuser").submodule_search_locations[0]
    shutil.copytree(src, tmp_path / "xfuser", ignore=shutil.ignore_patterns("__pycache__"))
    patch = os.path.join(ROOT, "patches", "xfuser-0.7.0-sp-strategy-plugin-point.diff")
    subprocess.run(["git", "apply", "--check", "-p1", patch], cwd=tmp_path, check=True)
    subprocess.run(["git", "apply", "-p1", patch], cwd=tmp_path, check=True)
    env = {"PYTHONPATH": str(tmp_path)}  # the patched copy first
    port = str(random.randrange(20000, 40000))
    out = _run_python(PATCHED_XDIT.replace("sys.argv[1]", repr(port)), env).split("\n")
    assert [line for line in out if line.startswith(("usp ", "torus "))] == ["usp False", "torus True"]
    assert [line for line in out if line.startswith("options")] == ["options nccl 3"] * 3
