"""``report_to: [tensorboard]``: event files that TensorBoard itself reads back, with HF Trainer's tags;
refused at load, in one line, where TensorBoard is not installed."""

import importlib.util
import json

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tests.train.helpers import recipe

from zephyr_fast.config import ConfigError, build_config
from zephyr_fast.train import run
from zephyr_fast.training import metrics


def test_tensorboard_events_read_back(sft_dir, tmp_path):
    cfg = build_config(recipe("sft", tmp_path / "out", sft_dir, max_steps=3, eval_strategy="steps", eval_steps=3,
                              report_to=["tensorboard"]), source="test")
    summary = run(cfg)
    rows = [json.loads(line) for line in open(summary["metrics_path"])]
    train = {r["step"]: r["loss"] for r in rows if "loss" in r}
    events = EventAccumulator(str(tmp_path / "out" / "runs"))
    events.Reload()
    tags = events.Tags()["scalars"]
    assert "train/loss" in tags and "eval/loss" in tags and "train/learning_rate" in tags, tags
    got = {e.step: e.value for e in events.Scalars("train/loss")}
    assert sorted(got) == sorted(train) == [1, 2, 3]
    for step, loss in train.items():
        assert got[step] == pytest.approx(loss, rel=1e-6)  # TensorBoard stores float32
    evals = [r["eval_loss"] for r in rows if "eval_loss" in r]
    assert [e.value for e in events.Scalars("eval/loss")] == pytest.approx(evals, rel=1e-6)


@pytest.mark.parametrize("report_to", [["tensorboard"], "tensorboard"])
def test_tensorboard_missing_is_refused_in_one_line(monkeypatch, report_to):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    with pytest.raises(ConfigError) as exc:
        metrics.check_report_to(report_to)
    assert "tensorboard is requested but not installed" in str(exc.value) and "\n" not in str(exc.value)
    assert metrics.check_report_to("all") == tuple(r for r in metrics.REPORTERS if r != "tensorboard")
