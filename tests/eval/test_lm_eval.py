"""``zephyr-fast lm-eval``: real lm-evaluation-harness on a tiny model and a small task whose data the test
writes (a task YAML under --include-path reading local JSON files: nothing downloaded)."""

import json
import os

import pytest

from tests.aif.helpers import save_tiny_model
from zephyr_fast.eval.lm_harness import _plan, main

pytest.importorskip("lm_eval")

TASK = """task: zf_tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


def test_lm_eval_runs_a_local_task_on_a_model_folder(tmp_path, capsys):
    model = save_tiny_model(tmp_path / "tiny", seed=2)
    # each question once per possible answer: whatever the model prefers, exactly one of its documents is right
    docs = []
    for i, (q, choices) in enumerate([("What is 2 + 2?", ["4", "five", "22"]), ("Colour of the sky?", ["blue", "red"]),
                                      ("Capital of France?", ["Paris", "Rome", "Berlin", "Oslo"])]):
        docs += [{"question": q, "choices": choices, "answer": a} for a in range(len(choices))]
    data = tmp_path / "mc.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "zf_tiny_mc.yaml").write_text(TASK.format(data=data))
    out = tmp_path / "out"
    assert main([model, "--tasks", "zf_tiny_mc", "--include-path", str(tasks), "--num-fewshot", "0",
                 "--batch-size", "4", "--device", "cpu", "--out", str(out), "--offline"]) == 0
    report = json.load(open(out / "lm_eval.json"))
    metrics = report["results"]["zf_tiny_mc"]
    assert metrics["acc,none"] == pytest.approx(3 / 9)  # 3 questions, 9 documents
    assert report["num_fewshot"] == {"zf_tiny_mc": 0}
    assert "| zf_tiny_mc | 0 | acc,none | 0.3333 |" in capsys.readouterr().out


def test_the_leaderboard_set_runs_each_task_with_its_shots():
    assert _plan("leaderboard", None) == [(0, ["truthfulqa_mc2"]), (5, ["mmlu", "winogrande", "gsm8k"]),
                                          (10, ["hellaswag"]), (25, ["arc_challenge"])]
    assert _plan("arc_easy, piqa", 3) == [(3, ["arc_easy", "piqa"])]
    with pytest.raises(ValueError, match="leaderboard is a whole set"):
        _plan("leaderboard,piqa", None)


def test_not_a_model_folder_is_one_line(tmp_path, capsys):
    assert main([str(tmp_path), "--tasks", "piqa", "--out", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err.strip() == f"error: {tmp_path}: not a Hugging Face model folder (no config.json)"
    assert not os.path.exists(tmp_path / "o")
