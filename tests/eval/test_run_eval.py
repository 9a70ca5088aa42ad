"""``zephyr-fast eval RUN_DIR``: every checkpoint of a dDPO run and its final model, scored on training-split
preference accuracy, MT-Bench and AlpacaEval through a real served judge; table and plot."""

import json
import os

from zephyr_fast.eval.evaluate import main as evaluate_main
from zephyr_fast.eval.run_eval import main


def test_eval_scores_every_checkpoint_like_the_paper(dpo_run, judge, tmp_path, capsys):
    recipe, run_dir, summary = dpo_run
    out = str(tmp_path / "eval")
    argv = [run_dir, "--out", out, "--per-category", "1", "--alpaca-limit", "2", "--max-new-tokens", "4",
            "--lc", "no", *judge]
    assert main(argv) == 0
    rows = json.load(open(os.path.join(out, "eval.json")))["rows"]
    assert [(r["model"], r["step"]) for r in rows] == [("checkpoint-1", 1), ("final", 2)]
    assert [r["epoch"] for r in rows] == [1 / summary["steps_per_epoch"], 2 / summary["steps_per_epoch"]]
    for r in rows:
        assert 0 <= r["preference_accuracy"] <= 1
        assert 1 <= r["mt_bench"] <= 9  # a constrained judge answers one digit
        assert 0 <= r["alpaca_eval_gpt4_win_rate"] <= 100
        assert 0 <= r["weighted_alpaca_eval_gpt4_turbo_win_rate"] <= 100
    capsys.readouterr()
    assert evaluate_main([recipe, "--split", "train", "--model", run_dir]) == 0  # the final row is evaluate's
    assert json.loads(capsys.readouterr().out)["train_rewards/accuracies"] == rows[1]["preference_accuracy"]
    table = open(os.path.join(out, "eval.md")).read().splitlines()
    assert table[0].startswith("| model | step | epoch | train loss | train preference accuracy | MT-Bench |")
    assert len(table) == 4 and table[2].startswith(f"| checkpoint-1 | 1 | {rows[0]['epoch']:.2f} |")
    assert os.path.getsize(os.path.join(out, "eval.png")) > 10_000
    assert os.path.isfile(os.path.join(run_dir, "checkpoint-1", "config.json"))  # a model folder (exported if needed)


def test_eval_of_a_folder_without_models_is_one_line(tmp_path, capsys):
    assert main([str(tmp_path), "--benches", "preference"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {tmp_path}: no complete checkpoint and no final model to evaluate"]
    assert main([str(tmp_path), "--benches", "bleu"]) == 2
    assert "--benches: 'bleu' is not one of" in capsys.readouterr().err
