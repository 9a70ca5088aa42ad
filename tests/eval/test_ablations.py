"""``recipes/ablations/``: the paper's ablation rows as recipes, each opening with its launch line; the
full-size ones load, the tiny ones plan and run (one optimiser step each)."""

import pathlib

import pytest

from tests.train.helpers import TINY_MODEL
from zephyr_fast.config import load_config
from zephyr_fast.train import run
from zephyr_fast.training.preview import build_plan

REPO = pathlib.Path(__file__).resolve().parents[2]
ROWS = ("dpo_no_sft", "sft_1epoch", "sft2_ultrafeedback", "dpo_1epoch", "dpo_3epochs")
EXPECT = {"dpo_no_sft": ("dpo", 3), "sft_1epoch": ("sft", 1), "sft2_ultrafeedback": ("sft", 1),
          "dpo_1epoch": ("dpo", 1), "dpo_3epochs": ("dpo", 3)}


@pytest.mark.parametrize("row", ROWS)
def test_full_size_recipe_opens_with_its_launch_line_and_loads(row):
    path = f"recipes/ablations/{row}.yaml"
    first = (REPO / path).read_text().splitlines()[0]
    assert first == f"# Launch:  deepspeed --num_gpus 8 zephyr_fast/train.py {path}"
    cfg = load_config(str(REPO / path), [])
    assert (cfg.training.stage, cfg.training.num_train_epochs) == EXPECT[row]
    base = "mistralai/Mistral-7B-v0.1" if row in ("dpo_no_sft", "sft_1epoch") else "alignment-handbook/zephyr-7b-sft-full"
    assert cfg.model.model_name_or_path == base


@pytest.fixture(scope="module")
def ref_dir(tmp_path_factory):
    """One reference log-probs cache for the tiny DPO rows from the dSFT model: same model, same pairs."""
    return str(tmp_path_factory.mktemp("ablation_ref_logps"))


@pytest.mark.parametrize("row", ROWS)
def test_tiny_recipe_plans_and_runs(row, sft_run, ref_dir, tmp_path, monkeypatch):
    path = f"recipes/ablations/tiny/{row}.yaml"
    assert (REPO / path).read_text().splitlines()[0] == f"# Launch:  python zephyr_fast/train.py {path}"
    monkeypatch.chdir(REPO)  # the recipes name repository paths (assets/, recipes/), as their launch line runs
    cfg = load_config(path, [])
    assert (cfg.training.stage, cfg.training.num_train_epochs) == EXPECT[row]
    # at tiny scale: the tiny dSFT model this suite trained (what recipes/tiny/sft.yaml writes), or the
    # recipe's random init made smaller, so that one step takes a second
    start = ([f"--model_init={TINY_MODEL}"] if cfg.model.model_init and not cfg.model.model_name_or_path
             else [f"--model_name_or_path={sft_run[1]}"])
    over = start + [f"--output_dir={tmp_path / 'out'}", "--report_to=none"]
    if cfg.training.stage == "dpo" and cfg.model.model_name_or_path:
        over.append(f"--ref_logps_dir={ref_dir}")
    plan = build_plan(load_config(path, over), world_size=1)
    assert plan["total_steps"] >= 1
    summary = run(load_config(path, over + ["--max_steps=1", "--save_strategy=no", "--eval_strategy=no"]))
    assert summary["global_step"] == 1 and summary["stage"] == EXPECT[row][0]
