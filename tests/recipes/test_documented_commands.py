"""Every command the documents tell a user to run (``doc_commands``) works as written.

* training commands (``python zephyr_fast/train.py``, ``python -m zephyr_fast.train``, ``zephyr-fast
  train|sft|dpo|plan``, ``deepspeed``, ``torchrun``, ``accelerate launch``, ``sbatch``): the launcher's
  own parser takes the command line, the recipe loads with the command's overrides; a ``recipes/tiny``
  recipe is also planned at the launcher's world size (a step needs data on every rank), and each
  plain single-process one runs for real once (one optimiser step, output in a temporary folder; the
  launchers themselves run in tests/train/test_launch.py and test_multinode.py);
* ``python -m benchmarks.report ...`` runs (into a temporary file); other ``python -m`` modules and
  the other ``zephyr-fast`` commands answer ``--help`` and know every option the command passes;
* ``pytest benchmarks/ [--e2e]`` collects; scripts exist and are valid bash (their own runs are CI's,
  the demo's and a GPU machine's).

A command no rule here covers fails the test: a new documented command comes with its check.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import runpy
import subprocess
import sys

import pytest
import yaml

from zephyr_fast import cli
from zephyr_fast.config import load_config
from zephyr_fast.train import run
from zephyr_fast.training.preview import build_plan

from .doc_commands import REPO, Command, documented_commands

COMMANDS = documented_commands()
TRAIN_SUBCOMMANDS = ("train", "sft", "dpo", "plan")
TRAIN_SCRIPT = "zephyr_fast/train.py"


def _split(cmd: Command) -> list:
    """``a && b`` is two commands."""
    return [Command(cmd.source, part.strip()) for part in cmd.text.split("&&")]


ALL = [c for cmd in COMMANDS for c in _split(cmd)]


def _help_text(argv: list) -> str:
    """What ``argv + ['--help']`` prints, run in this process (argparse exits 0 after printing)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exc:
        if argv[0] == "zephyr-fast":
            status = cli.main([*argv[1:], "--help"])
            raise SystemExit(status)
        old = sys.argv
        sys.argv = [argv[2], "--help"]
        try:
            runpy.run_module(argv[2], run_name="__main__", alter_sys=True)
        finally:
            sys.argv = old
    assert exc.value.code in (0, None), (argv, out.getvalue()[-2000:])
    return out.getvalue()


def _assert_options_known(argv: list, help_argv: list) -> None:
    text = _help_text(help_argv)
    for word in argv:
        flag = word.split("=", 1)[0]
        if flag.startswith("--") and "." not in flag:  # dotted keys are recipe overrides, not parser options
            assert flag in text, f"{' '.join(argv)}: {flag} is not an option of {' '.join(help_argv)}"


# ---------------------------------------------------------------------------------------------------
# training commands: (world size, recipe, overrides) from the launcher's own parser
# ---------------------------------------------------------------------------------------------------

def _hostfile_slots(path: str) -> int:
    lines = [ln.split("#")[0].split() for ln in open(REPO / path)]
    return sum(int(w[1].split("=")[1]) for w in lines if len(w) == 2 and w[1].startswith("slots="))


def _launch(argv: list):
    """``(world_size, script, script_args)`` of a training command, parsed by its launcher's parser."""
    prog = argv[0]
    if prog in ("python", "python3"):
        if argv[1] == "-m":
            assert argv[2] == "zephyr_fast.train", argv
            return 1, TRAIN_SCRIPT, argv[3:]
        return 1, argv[1], argv[2:]
    if prog == "zephyr-fast":
        extra = {"sft": ["--stage=sft"], "dpo": ["--stage=dpo"]}.get(argv[1], [])
        return 1, TRAIN_SCRIPT, argv[2:] + extra
    if prog == "deepspeed":
        from deepspeed.launcher.runner import parse_args

        a = parse_args(argv[1:])
        world = _hostfile_slots(a.hostfile) if a.hostfile != "/job/hostfile" else max(a.num_gpus, 1)
        return world, a.user_script, a.user_args
    if prog == "torchrun":
        from torch.distributed.run import get_args_parser

        a = get_args_parser().parse_args(argv[1:])
        return int(str(a.nnodes).split(":")[-1]) * int(a.nproc_per_node), a.training_script, a.training_script_args
    if prog == "accelerate":
        from accelerate.commands.launch import launch_command_parser

        a = launch_command_parser().parse_args(argv[2:])
        world = a.num_processes or yaml.safe_load(open(REPO / a.config_file))["num_processes"]
        return world, a.training_script, a.training_script_args
    if prog == "sbatch":
        nodes = int(next(w.split("=")[1] for w in argv if w.startswith("--nodes=")))
        script = next(w for w in argv[1:] if not w.startswith("-"))
        subprocess.run(["bash", "-n", str(REPO / script)], check=True)
        return nodes * 8, TRAIN_SCRIPT, argv[argv.index(script) + 1:]  # the script's GPUS_PER_NODE default
    raise AssertionError(f"not a training command: {argv}")


def _is_training(argv: list) -> bool:
    if argv[0] in ("deepspeed", "torchrun", "sbatch") or argv[:2] == ["accelerate", "launch"] and len(argv) > 2:
        return True
    if argv[0] == "zephyr-fast":
        return argv[1] in TRAIN_SUBCOMMANDS and len(argv) > 2
    return argv[0] in ("python", "python3") and (argv[1] == TRAIN_SCRIPT or argv[1:3] == ["-m", "zephyr_fast.train"]) \
        and len(argv) > 3 - (argv[1] == TRAIN_SCRIPT)


TRAINING = [c for c in ALL if _is_training(c.argv) and "--help" not in c.argv]
_RAN: set = set()  # (recipe, overrides) run once already


@pytest.fixture(scope="module")
def tiny_sft_model(tmp_path_factory):
    """One optimiser step of ``recipes/tiny/sft.yaml``: the model ``recipes/tiny/dpo.yaml`` starts from."""
    out = tmp_path_factory.mktemp("tiny_sft")
    cfg = load_config(str(REPO / "recipes/tiny/sft.yaml"), [f"--output_dir={out}", "--max_steps=1",
                                                             "--save_strategy=no", "--report_to=none"])
    run(cfg)
    return str(out)


@pytest.mark.parametrize("cmd", TRAINING, ids=[c.text[:90] for c in TRAINING])
def test_training_command(cmd, tiny_sft_model, tmp_path):
    world, script, args = _launch(cmd.argv)
    assert script == TRAIN_SCRIPT and (REPO / script).is_file(), cmd
    recipe, overrides = args[0], [a for a in args[1:] if a.startswith("--")]
    cfg = load_config(str(REPO / recipe), overrides)  # the recipe loads with the command's overrides
    if not recipe.startswith("recipes/tiny/"):
        return  # full-size recipes: their base models come from the Hub
    over = overrides + [f"--output_dir={tmp_path / 'out'}", "--report_to=none"]
    if cfg.training.stage == "dpo":
        over.append(f"--model_name_or_path={tiny_sft_model}")  # what recipes/tiny/sft.yaml writes
    plan = build_plan(load_config(str(REPO / recipe), over), world_size=world)
    assert plan["total_steps"] >= 1
    key = (recipe, tuple(overrides))
    if world == 1 and cmd.argv[1] != "plan" and not any(o.startswith("--deepspeed") for o in overrides) \
            and key not in _RAN:  # one real step of each plain single-process recipe (DeepSpeed: test_launch)
        _RAN.add(key)
        summary = run(load_config(str(REPO / recipe), over + ["--max_steps=1", "--save_strategy=no"]))
        assert summary["global_step"] == 1


# ---------------------------------------------------------------------------------------------------
# everything else
# ---------------------------------------------------------------------------------------------------

OTHER = [c for c in ALL if c not in TRAINING]


@pytest.mark.parametrize("cmd", OTHER, ids=[c.text[:90] for c in OTHER])
def test_other_command(cmd, tmp_path):
    argv = cmd.argv
    if argv[0] == "bash":
        path = REPO / argv[1]
        assert path.is_file(), cmd
        subprocess.run(["bash", "-n", str(path)], check=True)
        flags = [a for a in argv[2:] if a.startswith("--")]
        body = path.read_text() + (REPO / "benchmarks/gpu_check.py").read_text()
        assert all(f in body for f in flags), cmd
    elif argv[0] == "pytest":
        proc = subprocess.run([sys.executable, "-m", "pytest", *argv[1:], "--collect-only", "-q", "-p",
                               "no:cacheprovider"], cwd=REPO, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0 and re.search(r"\d+ tests? collected", proc.stdout), proc.stdout[-2000:]
    elif argv[:3] == ["python", "-m", "benchmarks.report"]:
        out = tmp_path / "RESULTS.md"
        proc = subprocess.run([sys.executable, *argv[1:], "--out", str(out)], cwd=REPO, capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 0 and out.read_text().startswith("# zephyr_fast benchmark results"), proc.stderr
    elif argv[0] in ("python", "python3") and argv[1] == "-m":
        _assert_options_known(argv, argv[:3])
    elif argv[0] == "zephyr-fast":
        for a in argv[2:]:
            if a.startswith("recipes/"):
                assert (REPO / a).is_file(), cmd
        _assert_options_known(argv, argv[:2])
    elif argv[:2] == ["accelerate", "launch"]:
        from accelerate.commands.launch import launch_command_parser

        assert launch_command_parser().prog  # the subcommand exists
    elif argv[0] in ("python", "python3") and argv[1:] == [TRAIN_SCRIPT, "--help"]:
        proc = subprocess.run([sys.executable, *argv[1:]], cwd=REPO, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0 and "learning_rate" in proc.stdout, proc.stderr[-2000:]
    else:
        raise AssertionError(f"{cmd.source}: no check knows how to run `{cmd.text}`")


def test_commands_are_found():
    """The extraction sees the commands it must (a broken extractor would make the checks vacuous)."""
    texts = [c.text for c in ALL]
    for must in ("bash scripts/demo.sh", "bash scripts/test.sh", "python zephyr_fast/train.py recipes/tiny/dpo.yaml",
                 "DS_ACCELERATOR=cpu deepspeed --num_gpus 2 zephyr_fast/train.py recipes/tiny/dpo.yaml",
                 "sbatch --nodes=2 recipes/multinode/launch.slurm recipes/dpo.yaml"):
        assert must in texts, must
    assert len(TRAINING) >= 20 and len(OTHER) >= 15
    assert os.path.isfile(REPO / "recipes/tiny/sft.yaml")
