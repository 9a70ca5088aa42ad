"""The original zephyr-7b-beta dDPO recipe (alignment-handbook a0b8d49) run as written on the bundled
UltraFeedback rows (turns cut short) -- only the model, data location, dtype and hub push overridden --
trains DPO with
exactly ``per_device_train_batch_size x gradient_accumulation_steps x world_size`` pairs per optimiser
step, as TRL counts them (issue 11)."""

import os

import pytest
import yaml

from zephyr_fast.config import build_config
from zephyr_fast.training import plan as plan_mod
from zephyr_fast.training.run import run
from tests.train.helpers import TINY_MODEL, TOKENIZER_DIR, dpo_rows, write_jsonl

RECIPE = os.path.join(os.path.dirname(__file__), "..", "recipes", "handbook", "a0b8d49", "zephyr-7b-beta", "dpo",
                      "config_full.yaml")


def _handbook_data(path):
    rows = dpo_rows(16, cut=200)  # the 16 bundled UltraFeedback pairs, turns cut short (CPU time)
    write_jsonl(os.path.join(path, "train_prefs.jsonl"), rows)  # the recipe's split names
    write_jsonl(os.path.join(path, "test_prefs.jsonl"), rows[:4])
    return str(path)


def _recipe(tmp_path, **over):
    with open(RECIPE) as f:
        raw = yaml.safe_load(f)
    raw.update({"model_name_or_path": None, "model_init": dict(TINY_MODEL), "tokenizer_name_or_path": str(TOKENIZER_DIR),
                "dataset_mixer": {_handbook_data(tmp_path / "data"): 1.0}, "bf16": False, "torch_dtype": "float32",
                "push_to_hub": False, "gradient_checkpointing": False, "output_dir": str(tmp_path / "out"),
                "report_to": [], "kernel_impl": "torch"})
    raw.update(over)
    return raw


def _record_steps(monkeypatch):
    """Pairs per micro-batch of every optimiser step the trainer actually runs."""
    steps = []
    original = plan_mod.ExampleSchedule.step

    def step(self, epoch, s):
        micros = original(self, epoch, s)
        steps.append([m.stats.pairs for m in micros])
        return micros

    monkeypatch.setattr(plan_mod.ExampleSchedule, "step", step)
    return steps


@pytest.mark.slow
def test_original_zephyr_dpo_recipe_makes_exactly_the_recipes_pairs_per_step(tmp_path, monkeypatch):
    steps = _record_steps(monkeypatch)
    cfg = build_config(_recipe(tmp_path), source=RECIPE)
    assert cfg.training.stage == "dpo" and cfg.dpo.beta == 0.1 and cfg.training.optim == "rmsprop"
    s = run(cfg)
    per_step = 8 * 1 * 1  # per_device_train_batch_size x gradient_accumulation_steps x world_size
    assert s["finished"] and s["global_step"] == 3 * (16 // per_step)  # 3 epochs of the 16 bundled pairs
    assert steps == [[per_step]] * s["global_step"]
    assert s["train_pairs"] == per_step * s["global_step"]
    # the summary's timeline: one wall time per phase and per epoch, in order (the e2e benchmark's clock)
    tl = s["timeline"]
    marks = [tl["start"], tl["data"], tl["model"], tl["reference"], *tl["epochs"], tl["end"]]
    assert len(tl["epochs"]) == 3 and marks == sorted(marks)


def test_accumulation_splits_a_step_into_equal_pair_counts(tmp_path, monkeypatch):
    steps = _record_steps(monkeypatch)
    cfg = build_config(_recipe(tmp_path, per_device_train_batch_size=3, gradient_accumulation_steps=2,
                               num_train_epochs=1), source=RECIPE)
    s = run(cfg)  # TRL keeps the epoch's last 16 mod 6 pairs as a smaller last step
    assert s["global_step"] == 3 and steps == [[3, 3], [3, 3], [2, 2]] and s["train_pairs"] == 16


def test_dataloader_drop_last_leaves_each_epochs_remainder_out(tmp_path, monkeypatch):
    steps = _record_steps(monkeypatch)
    cfg = build_config(_recipe(tmp_path, per_device_train_batch_size=3, gradient_accumulation_steps=2,
                               num_train_epochs=1, dataloader_drop_last=True), source=RECIPE)
    s = run(cfg)
    assert s["global_step"] == 16 // 6 and steps == [[3, 3]] * 2 and s["train_pairs"] == 12


def test_explicit_token_budget_is_the_opt_in_token_batching(tmp_path, monkeypatch):
    steps = _record_steps(monkeypatch)
    cfg = build_config(_recipe(tmp_path, max_tokens_per_batch=4096, num_train_epochs=1), source=RECIPE)
    assert cfg.data.batch_by == "tokens"
    s = run(cfg)
    assert steps == [] and s["global_step"] >= 1  # bins of tokens: the example schedule never ran


def test_too_little_data_for_one_step_is_one_line_and_status_2(tmp_path, capsys):
    from zephyr_fast.train import main

    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(_recipe(tmp_path, per_device_train_batch_size=32, dataloader_drop_last=True)))
    assert main([str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith(f"error: {path}: not enough data for one optimiser step"), err
