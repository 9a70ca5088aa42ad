"""The Checkpointer on its own (no training): claim, save -> resume round trip, metrics trimmed to the
resumed step, identity refusals, pruning that spares the best checkpoint, load_best, summary.json, and
the checkpoint publish (the one rename of checkpoint files)."""

import json
import os

import pytest
import torch

from tests.train.helpers import recipe
from tests.train.test_checkpoint import ONE, names
from zephyr_fast.config import build_config
from zephyr_fast.outputs import OutputError
from zephyr_fast.training.build import Optimisation
from zephyr_fast.training.checkpoint import CheckpointError, publish
from zephyr_fast.training.checkpointer import Checkpointer, RunIdentity
from zephyr_fast.training.loop import LoopState

ROWS = [{"messages": [{"role": "user", "content": "hi"}]}]


def _cfg(out, **over):
    return build_config(recipe("sft", out, str(out.parent / "data"), **over), source="test")


def _opt(seed: int = 0) -> Optimisation:
    """A real optimiser and schedule over a Linear (what ``build_engine`` gives, without DeepSpeed)."""
    torch.manual_seed(seed)
    module = torch.nn.Linear(4, 4)
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-2)
    return Optimisation(module, None, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0))


def _steps(opt: Optimisation, n: int) -> None:
    for _ in range(n):
        opt.module(torch.ones(2, 4)).square().sum().backward()
        opt.step()


def _resumed(out, opt, rows=ROWS, log=None, **over):
    cfg = _cfg(out, resume_from_checkpoint="auto", **over)
    ck = Checkpointer(cfg, ONE, log=(log.append if log is not None else print))
    return ck, ck.resume(opt, RunIdentity(cfg, rows), None)


def test_save_then_resume_restores_the_step_best_weights_and_trims_metrics(tmp_path):
    out = tmp_path / "out"
    cfg = _cfg(out)
    ck = Checkpointer(cfg, ONE, log=lambda *a: None)
    with ck.claim():
        assert (out / "config.yaml").is_file()
        opt = _opt()
        assert ck.resume(opt, RunIdentity(cfg, ROWS), None) == (0, {}) and ck.resumed_from is None
        _steps(opt, 3)
        state = LoopState(step=3, last_metrics={"loss": 1.5}, best={"step": 3, "metric": 0.25})
        path = ck.save(state, epoch=1.5, extra={"note": "x"})
    saved = json.loads((out / "checkpoint-3" / "trainer_state.json").read_text())
    assert path == str(out / "checkpoint-3")
    assert {k: saved[k] for k in ("stage", "epoch", "last_metrics", "note", "best", "global_step")} == {
        "stage": "sft", "epoch": 1.5, "last_metrics": {"loss": 1.5}, "note": "x",
        "best": {"step": 3, "metric": 0.25}, "global_step": 3}
    assert saved["train_rows_digest"] == RunIdentity(cfg, ROWS).rows_digest
    rows = [json.dumps({"step": s, "loss": 1.0}) for s in range(1, 6)]
    (out / "metrics.jsonl").write_text("\n".join(rows) + '\n{"step": 6, "lo')  # killed mid-write
    log, fresh = [], _opt(seed=1)
    ck2, (step, best) = _resumed(out, fresh, log=log)
    assert (step, best, ck2.resumed_from) == (3, {"step": 3, "metric": 0.25}, path)
    assert all(torch.equal(a, b) for a, b in zip(fresh.module.parameters(), opt.module.parameters()))
    assert fresh.scheduler.last_epoch == 3
    kept = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert kept == [1, 2, 3]
    assert any("dropped a torn last line" in m for m in log) and f"resumed from {path} at step 3" in log


def test_changed_rows_or_config_are_refused_in_one_line_unless_allowed(tmp_path):
    out = tmp_path / "out"
    cfg = _cfg(out)
    ck = Checkpointer(cfg, ONE, log=lambda *a: None)
    opt = _opt()
    ck.resume(opt, RunIdentity(cfg, ROWS), None)
    _steps(opt, 1)
    ck.save(LoopState(step=1), epoch=1.0)
    other = [{"messages": [{"role": "user", "content": "bye"}]}]
    with pytest.raises(CheckpointError, match=r"^[^\n]*checkpoint-1: the train data changed \(rows digest \w+ -> "
                                              r"\w+\) since it was written; resume with --resume_allow_changes"):
        _resumed(out, _opt(), rows=other)
    with pytest.raises(CheckpointError, match=r"the config changed \(training.learning_rate 0.003 -> 0.001\)"):
        _resumed(out, _opt(), learning_rate=1e-3)
    log = []
    _, (step, _) = _resumed(out, _opt(), rows=other, log=log, resume_allow_changes=True)
    assert step == 1 and any(m.startswith("warning: ") and "resuming anyway" in m for m in log)


def test_a_fresh_run_beside_earlier_checkpoints_is_refused_on_claim(tmp_path):
    out = tmp_path / "out"
    cfg = _cfg(out)
    ck = Checkpointer(cfg, ONE, log=lambda *a: None)
    with ck.claim():
        opt = _opt()
        ck.resume(opt, RunIdentity(cfg, ROWS), None)
        _steps(opt, 1)
        ck.save(LoopState(step=1), epoch=1.0)
    with pytest.raises(OutputError, match=r"holds an earlier run's checkpoints \(checkpoint-1\); resume with "):
        Checkpointer(_cfg(out), ONE).claim()
    Checkpointer(_cfg(out, resume_from_checkpoint="auto"), ONE).claim().release()


def test_pruning_spares_the_best_and_load_best_restores_its_weights(tmp_path):
    out = tmp_path / "out"
    cfg = _cfg(out, save_total_limit=2)
    ck = Checkpointer(cfg, ONE, log=lambda *a: None)
    opt = _opt()
    ck.resume(opt, RunIdentity(cfg, ROWS), None)
    best, weights = {"step": 3, "metric": 0.5}, None
    for step in range(3, 7):
        _steps(opt, 1)
        ck.save(LoopState(step=step, best=best if step > 3 else {}), epoch=float(step))
        if step == 3:
            weights = [p.detach().clone() for p in opt.module.parameters()]
    assert names(out) == ["checkpoint-3", "checkpoint-5", "checkpoint-6"]  # 2 most recent + the best
    entries = ck.load_best(LoopState(step=6, best=best))
    assert entries == {"best_model_checkpoint": str(out / "checkpoint-3"), "best_metric": 0.5, "best_step": 3}
    assert all(torch.equal(a, b) for a, b in zip(opt.module.parameters(), weights))
    last = ck.load_best(LoopState(step=6, best={"step": 6, "metric": 0.1}))  # the last step was the best
    assert last["best_model_checkpoint"] == str(out)
    ck.write_summary({"global_step": 6, "path": out})
    assert json.loads((out / "summary.json").read_text()) == {"global_step": 6, "path": str(out)}


def test_publish_moves_a_file_or_a_whole_folder_into_place(tmp_path):
    (tmp_path / "staged").write_text("new")
    (tmp_path / "target").write_text("old")
    publish(str(tmp_path / "staged"), str(tmp_path / "target"))
    assert (tmp_path / "target").read_text() == "new" and not (tmp_path / "staged").exists()
    for name, text in ((".checkpoint-2.tmp", "b"), ("checkpoint-2", "a")):
        os.makedirs(tmp_path / name)
        (tmp_path / name / "f").write_text(text)
    publish(str(tmp_path / ".checkpoint-2.tmp"), str(tmp_path / "checkpoint-2"))  # a re-saved step: replaced whole
    assert (tmp_path / "checkpoint-2" / "f").read_text() == "b"
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-2", "target"]  # no hidden leftovers
