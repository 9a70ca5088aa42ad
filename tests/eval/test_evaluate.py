"""``zephyr-fast evaluate``: the trainer's own evaluation on any split, without training."""

import json

import pytest

from zephyr_fast.eval.evaluate import main

TRL_KEYS = ("loss", "rewards/accuracies", "rewards/margins", "rewards/chosen", "rewards/rejected", "logps/chosen",
            "logps/rejected")


def run_cli(capsys, *argv):
    assert main(list(argv)) == 0
    return json.loads(capsys.readouterr().out)


def test_dpo_metrics_on_the_train_split_are_the_trainers_on_the_same_rows(dpo_run, capsys):
    recipe, out, summary = dpo_run
    logged = summary["eval_metrics"]  # the run evaluated its final model on the test split (= the train rows)
    got = run_cli(capsys, recipe, "--split", "train", "--model", out)
    for k in TRL_KEYS:
        assert got[f"train_{k}"] == pytest.approx(logged[f"eval_{k}"], rel=1e-5, abs=1e-6), k
    assert got["train_rewards/margins"] != 0.0
    test = run_cli(capsys, recipe, "--split", "test", "--model", out)
    assert test["test_rewards/accuracies"] == pytest.approx(got["train_rewards/accuracies"])


def test_the_reference_scored_against_itself_has_zero_rewards(dpo_run, capsys):
    recipe, _, _ = dpo_run
    got = run_cli(capsys, recipe, "--split", "train")
    # the cached reference pass and this forward pack differently: equal up to float rounding
    assert got["train_rewards/chosen"] == pytest.approx(0.0, abs=1e-5)
    assert got["train_rewards/rejected"] == pytest.approx(0.0, abs=1e-5)
    assert got["train_loss"] == pytest.approx(0.6931472, abs=1e-5)  # -log sigmoid(0)


def test_sft_loss_on_the_train_split(sft_run, capsys, tmp_path):
    import yaml

    r, out = sft_run
    path = tmp_path / "sft.yaml"
    path.write_text(yaml.safe_dump(r))
    final = run_cli(capsys, str(path), "--split", "train", "--model", out, "--out", str(tmp_path / "m.json"))
    init = run_cli(capsys, str(path), "--split", "train")  # the random init the run started from
    assert set(final) >= {"train_loss"} and not any("rewards" in k for k in final)
    assert final["train_loss"] < init["train_loss"]  # two steps at lr 3e-3 on these rows lower their loss
    assert json.load(open(tmp_path / "m.json"))["train_loss"] == final["train_loss"]


def test_bad_split_and_non_model_folder_are_one_line(dpo_run, capsys, tmp_path):
    recipe, _, _ = dpo_run
    assert main([recipe, "--split", "validation"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--split: 'validation' is not one of train, test" in err[0]
    assert main([recipe, "--model", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{tmp_path}: not a Hugging Face model folder" in err[0]
