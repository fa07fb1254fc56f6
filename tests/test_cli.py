"""``swiftfusion-xdit generate``: its command line through torchrun, and refusals."""

import os
import subprocess
import sys

import pytest

from swiftfusion_xdit.cli import _parser

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _every_generate_option() -> list[str]:
    generate = _parser()._subparsers._group_actions[0].choices["generate"]
    argv = ["generate"]
    for action in generate._actions:
        if action.option_strings and action.dest != "help":
            argv += [action.option_strings[0]] + ([] if action.nargs == 0 else
                                                  [str(action.choices[0]) if action.choices else "2"])
    return argv


def test_every_generate_option_passes_through_torchruns_parser():
    """The relaunch hands our whole command line to torchrun, whose parser would take an
    abbreviation of its own options (--nproc for --nproc-per-node) as ambiguous."""
    from torch.distributed.run import get_args_parser
    argv = _every_generate_option()
    assert "--ranks" in argv and "--model" in argv
    ns = get_args_parser().parse_args(["--nproc-per-node", "4", "-m", "swiftfusion_xdit.cli", *argv])
    assert ns.training_script_args == argv and ns.nproc_per_node == "4"


def test_a_refused_layout_is_said_once_and_exits_2():
    env = {**os.environ, "PYTHONPATH": ROOT}
    proc = subprocess.run([sys.executable, "-m", "swiftfusion_xdit.cli", "generate", "--ulysses-degree", "3"],
                          capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)
    message = "ulysses degree 3 does not divide the sequence-parallel size 4"
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.count(message) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]


def _generate(*args: str, cwd: str = ROOT) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": ROOT}
    return subprocess.run([sys.executable, "-m", "swiftfusion_xdit.cli", "generate", *args],
                          capture_output=True, text=True, env=env, timeout=600, cwd=cwd)


@pytest.mark.parametrize("args, says", [
    (["--ranks", "3"], "3 ranks cannot share 256 image and 16 text tokens equally at 64x64; "
                       "--ranks that can: [2, 4, 8, 16]"),
    (["--steps", "0"], "argument --steps: must be a positive whole number, not 0"),
    (["--height", "70"], "--height 70 is not a multiple of 4"),
    (["--width", "-16"], "argument --width: must be a positive whole number, not -16"),
    (["--model", "/nonexistent/pipeline"], "is neither a folder nor a valid hub id"),
    (["--model", "not//a hub id"], "is neither a folder nor a valid hub id"),
    (["--model", "{empty_folder}"], "is a folder but not a diffusers pipeline (it has no model_index.json)"),
])
def test_bad_input_is_one_line_and_exit_2(args, says, tmp_path):
    args = [a.format(empty_folder=tmp_path) for a in args]
    proc = _generate(*args)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert len(lines) == 1 and says in lines[0], proc.stderr[-2000:]
