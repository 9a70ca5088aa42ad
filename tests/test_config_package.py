"""The config package (issue 22): torch-free, one definition of every valid value, every key with a
help, the stage registry the only place a stage name is compared, the torch-side checks at run start
with the same one-line errors."""

import ast
import dataclasses
import os
import subprocess
import sys

import pytest
import torch
import zephyr_kernels
from zephyr_kernels import FusedLinearDPOLoss, losses

from tests.conftest import REPO
from zephyr_fast import cli, objectives
from zephyr_fast.config import SECTIONS, STAGES, ConfigError, DataConfig, ModelConfig, build_config, keys_help
from zephyr_fast.config import values
from zephyr_fast.model import attention
from zephyr_fast.training import preview
from zephyr_fast.training.build import check_config, check_model

CONFIG_DIR = REPO / "zephyr_fast" / "config"
DATA = {"dataset_mixer": {"assets/data/ultrachat_200k/sample16.jsonl": 1.0}, "dataset_splits": ["train"]}
BASE = {"tokenizer_name_or_path": "tok", "model_init": {"hidden_size": 64}, **DATA}
HEAVY = ("torch", "transformers", "zephyr_kernels", "zephyr_fast.training", "zephyr_fast.data", "zephyr_fast.model")


def _python(*args, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
                          **kw)


def _loaded(importtime_stderr: str) -> set:
    """The modules ``-X importtime`` reports as imported."""
    return {line.rsplit("|", 1)[-1].strip() for line in importtime_stderr.splitlines() if line.startswith("import time:")}


def _heavy(modules: set) -> list:
    return sorted(m for m in modules if m.startswith(HEAVY))


def test_importing_the_config_loads_neither_torch_nor_the_trainer():
    code = ("import sys, zephyr_fast.config; "
            f"bad = [m for m in sys.modules if m.startswith({HEAVY!r})]; assert not bad, bad")
    out = _python("-c", code)
    assert out.returncode == 0, out.stderr


@pytest.mark.parametrize("argv", [["zephyr_fast/train.py", "--help"], ["-m", "zephyr_fast.cli", "train", "--help"],
                                  ["-m", "zephyr_fast.cli", "dpo", "-h"]])
def test_help_prints_every_key_without_importing_torch(argv):
    out = _python("-X", "importtime", *argv)
    assert out.returncode == 0, out.stderr
    assert not _heavy(_loaded(out.stderr)), _heavy(_loaded(out.stderr))
    assert out.stdout.rstrip().endswith(keys_help().rstrip())
    for cls in SECTIONS.values():
        for f in dataclasses.fields(cls):
            assert f"  {f.name}: " in out.stdout and f"      {f.metadata['help']}" in out.stdout


def test_every_key_has_a_help_text():
    for sec, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            assert len(f.metadata.get("help", "")) > 10, f"{sec}.{f.name} has no help"


def test_the_config_package_imports_nothing_above_it():
    """No module of the package imports the trainer, the data / model layers or the kernels (all load torch)."""
    for path in sorted(CONFIG_DIR.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            for name in names:
                assert not name.startswith(HEAVY), f"{path.name} imports {name}"
                assert not (isinstance(node, ast.ImportFrom) and node.level), f"{path.name}: relative import"


def test_stage_names_are_compared_only_in_the_registry():
    """Outside values.py the package asks the registry (a stage's data, section, keys), never a name."""
    for path in sorted(CONFIG_DIR.glob("*.py")):
        if path.name == "values.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Compare):
                consts = [c.value for c in (node.left, *node.comparators) if isinstance(c, ast.Constant)]
                assert not set(consts) & set(STAGES), f"{path.name}:{node.lineno} compares a stage name"


def test_kernel_values_are_copies_of_the_kernels_own():
    """zephyr_kernels cannot import zephyr_fast, and importing it loads torch: the config holds copies."""
    assert values.LOSS_TYPES == zephyr_kernels.LOSS_TYPES == losses.LOSS_TYPES
    assert values.KERNEL_IMPLS == zephyr_kernels.IMPLS
    assert values.F_DIVERGENCES == losses.F_DIVERGENCES


def test_the_layers_use_the_config_values():
    assert attention.BACKENDS is values.ATTENTION_BACKENDS
    assert set(values.ATTN_IMPLEMENTATIONS) == {"auto", *values.ATTENTION_BACKENDS, *values.HF_ATTENTION_NAMES}
    assert set(values.NATIVE_SCHEDULERS) < set(values.SCHEDULERS)
    assert set(values.BNB_OPTIMIZERS) < set(values.OPTIMIZERS)


def test_the_two_registries_name_the_same_stages_with_the_same_facts():
    assert objectives.STAGES.keys() == STAGES.keys()
    for name, cls in objectives.STAGES.items():
        s = STAGES[name]
        assert (cls.name, cls.section, cls.tokens_per_example, cls.trains) == \
            (s.name, s.section, s.tokens_per_example, s.trains)
        assert s.section is None or s.section in SECTIONS


def test_the_kernels_dpo_options_are_recipe_keys():
    cfg = build_config({**BASE, "stage": "dpo", "loss_type": ["sigmoid", "bco_pair"], "loss_weights": [0.8, 0.2],
                        "discopop_tau": 0.2}, source="r.yaml")
    assert (cfg.dpo.loss_weights, cfg.dpo.discopop_tau) == ([0.8, 0.2], 0.2)
    head = objectives.make_stage(cfg).loss_head(temperature=1.0, softcap=None)  # built by the kernels
    assert callable(head)


def test_average_log_prob_reaches_the_loss_with_the_cached_sums_made_means():
    """The recipe key reaches the fused head; the reference cache holds sums, which the stage divides by
    the same completion-token counts the kernel uses for the policy."""
    cfg = build_config({**BASE, "stage": "dpo", "average_log_prob": True}, source="r.yaml")
    assert cfg.dpo.average_log_prob is True
    head = objectives.make_stage(cfg).loss_head(temperature=1.0, softcap=None)
    g = torch.Generator().manual_seed(0)
    rows, weight = torch.randn(10, 8, generator=g), torch.randn(50, 8, generator=g)
    labels = torch.tensor([-100, 3, 4, -100, 5, 6, 7, 8, 9, 10])
    segs = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 3, 3])
    ref_sums = (torch.tensor([-4.0, -9.0]), torch.tensor([-6.0, -2.0]))
    counts = torch.tensor([2.0, 2.0, 2.0, 2.0])  # target tokens of segments 0..3
    loss, _ = head(rows, weight, labels, segs, ref_sums)
    means = FusedLinearDPOLoss(reduction="sum", average_log_prob=True, impl="torch")(
        rows, weight, labels, segs, ref_sums[0] / counts[0::2], ref_sums[1] / counts[1::2])[0]
    assert torch.allclose(loss, means)
    plain = objectives.make_stage(build_config({**BASE, "stage": "dpo"}, source="r.yaml")).loss_head(
        temperature=1.0, softcap=None)
    assert not torch.allclose(plain(rows, weight, labels, segs, ref_sums)[0], loss)
    with pytest.raises(ConfigError, match="r.yaml: loss_weights needs one weight per loss_type"):
        check_config(build_config({**BASE, "loss_type": ["sigmoid", "ipo"], "loss_weights": [1.0]}, source="r.yaml"))


def test_a_check_at_run_start_names_where_the_key_was_set():
    cfg = build_config({**BASE, "model_init": {"hiden_size": 64}}, source="r.yaml")  # loads: transformers' check
    with pytest.raises(ConfigError, match=r"^r.yaml: model_init: 'hiden_size' is not a MistralConfig key"):
        check_model(cfg.model, None)
    cfg = build_config({**BASE, "stage": "dpo"}, source="r.yaml", overrides=["--beta=0"])
    with pytest.raises(ConfigError, match=r"^command line --beta: beta must be > 0, got 0.0$"):
        objectives.make_stage(cfg)
    built_in_code = ModelConfig(tokenizer_name_or_path="tok", model_init={"hiden_size": 64})
    with pytest.raises(ConfigError, match=r"^model_init: 'hiden_size' is not"):
        check_model(built_in_code, None)


@pytest.mark.parametrize("command", [preview.main, cli.main])
def test_plan_refuses_a_bad_model_init_in_one_line_with_status_2(command, capsys):
    argv = ["recipes/tiny/sft.yaml", "--model_init={hiden_size: 64}"]
    assert command(argv if command is preview.main else ["plan", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: command line --model_init: 'hiden_size' is not a MistralConfig key") and "\n" not in err


def test_data_config_is_the_data_layers():
    from zephyr_fast.data import loading

    assert loading.DataConfig is DataConfig
