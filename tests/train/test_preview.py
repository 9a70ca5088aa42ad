"""``zephyr-fast plan``: the run's plan before any training -- stage, steps, examples and tokens per
step, token budget, memory estimate, reference cache."""

import json

import pytest
import yaml

from zephyr_fast.training import preview
from tests.train.helpers import dpo_rows, recipe, write_dpo_dir


def _write_recipe(tmp_path, **over):
    data = write_dpo_dir(tmp_path / "data", dpo_rows(12))
    r = recipe("dpo", tmp_path / "out", data)
    r.pop("max_tokens_per_batch")  # the recipe's batch sizes decide, as in a handbook recipe
    r.update(over)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(r))
    return str(path)


def _plan(capsys, argv):
    assert preview.main(argv + ["--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_plan_of_a_dpo_recipe_counts_the_recipes_pairs_per_step(tmp_path, capsys):
    path = _write_recipe(tmp_path, per_device_train_batch_size=2, gradient_accumulation_steps=3)
    p = _plan(capsys, [path])
    assert p["stage"] == "dpo" and p["batch_by"] == "examples" and p["world_size"] == 1
    assert p["examples_per_step"] == [6, 6] == [p["recipe_examples_per_step"]] * 2
    assert p["steps_per_epoch"] == 12 // 6 and p["total_steps"] == 2
    assert 0 < p["packing_efficiency"] <= 1 and p["micro_batch_tokens_max"] <= p["micro_batch_token_budget"]
    assert p["reference_logps"]["train"].startswith("absent")
    two = _plan(capsys, [path, "--world_size=2", "--gradient_accumulation_steps=1"])
    assert two["examples_per_step"] == [4, 4] and two["steps_per_epoch"] == 3
    mem = two["memory_gib_per_gpu"]
    assert 0 < mem["zero3"] < mem["zero2"]  # ZeRO-3 also partitions the weights


def test_plan_states_token_batching_and_its_step_counts(tmp_path, capsys):
    path = _write_recipe(tmp_path, max_tokens_per_batch=900)
    p = _plan(capsys, [path])
    assert p["batch_by"] == "tokens" and "not the recipe's" in p["batching"]
    assert p["micro_batch_token_budget"] == 900
    text_rc = preview.main([path])
    assert text_rc == 0 and "examples per step" in capsys.readouterr().out


def test_memory_estimate_follows_the_zero_model():
    shape = {"parameters": 7_241_732_096, "layers": 32, "hidden_size": 4096}
    one = preview.memory_estimate(shape, max_tokens=8192, world_size=1, bf16=True, optim="adamw_torch",
                                  gradient_checkpointing=True)
    eight = preview.memory_estimate(shape, max_tokens=8192, world_size=8, bf16=True, optim="adamw_torch",
                                    gradient_checkpointing=True)
    states = 16 * shape["parameters"] / 1024 ** 3  # 2 + 2 + 12 bytes per parameter
    acts = (2 * 8192 * 4096 * 32 + 34 * 8192 * 4096) / 1024 ** 3
    assert one["zero3"] == pytest.approx(states + acts) == one["zero2"]
    assert eight["zero3"] == pytest.approx(states / 8 + acts)
    assert eight["zero2"] == pytest.approx((2 * shape["parameters"] + 14 * shape["parameters"] / 8) / 1024 ** 3 + acts)


def test_plan_refuses_bad_input_in_one_line(tmp_path, capsys):
    assert preview.main([str(tmp_path / "missing.yaml")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "missing.yaml" in err and "\n" not in err


def test_plan_and_train_agree_about_the_reference_cache(tmp_path, capsys):
    """Absent -> computed; then reused; after the data changed, plan names the same refusal train gives."""
    from zephyr_fast.train import main as train_main

    path = _write_recipe(tmp_path, max_steps=1, save_strategy="no")
    assert _plan(capsys, [path])["reference_logps"]["train"] == "absent: computed once at run start"
    assert train_main([path]) == 0
    capsys.readouterr()
    assert _plan(capsys, [path])["reference_logps"]["train"] == "cached: digest and key verified now, reused"
    changed = _write_recipe(tmp_path, max_steps=1, save_strategy="no", max_prompt_length=48, overwrite_output_dir=True)
    verdict = _plan(capsys, [changed])["reference_logps"]["train"]
    assert verdict.startswith("refused at run start: ") and "(lengths changed" in verdict, verdict
    assert train_main([changed]) == 2
    refusal = capsys.readouterr().err.strip().splitlines()[-1]
    assert verdict.removeprefix("refused at run start: ") in refusal
    fresh = _plan(capsys, [changed, "--ref_logps_recompute=true"])["reference_logps"]["train"]
    assert fresh == "stale: recomputed at run start (ref_logps_recompute)"
