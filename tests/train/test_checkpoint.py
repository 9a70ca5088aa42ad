"""Checkpoint discovery (only complete, renamed checkpoints are resumed) and safe loading."""

import json
import os

import pytest
import torch

from zephyr_fast.training.checkpoint import list_checkpoints, resolve_resume, safe_torch_load


def _ckpt(root, name, complete=True):
    os.makedirs(root / name)
    if complete:
        (root / name / "trainer_state.json").write_text(json.dumps({"global_step": 1}))


def test_auto_resume_picks_the_newest_complete_checkpoint(tmp_path):
    assert resolve_resume("auto", str(tmp_path / "missing")) is None
    _ckpt(tmp_path, "checkpoint-4")
    _ckpt(tmp_path, "checkpoint-10")
    _ckpt(tmp_path, "checkpoint-12", complete=False)  # crashed before trainer_state.json
    _ckpt(tmp_path, ".checkpoint-14.tmp")  # crashed before the rename
    assert list_checkpoints(str(tmp_path)) == [str(tmp_path / "checkpoint-4"), str(tmp_path / "checkpoint-10")]
    assert resolve_resume("auto", str(tmp_path)) == str(tmp_path / "checkpoint-10")
    assert resolve_resume(None, str(tmp_path)) is None
    with pytest.raises(FileNotFoundError, match="checkpoint-12' is not a complete checkpoint"):
        resolve_resume(str(tmp_path / "checkpoint-12"), str(tmp_path))


class Payload:  # any non-allow-listed class: unpickling it could run code
    def __reduce__(self):
        return (print, ("unpickled: this must never run",))


def test_safe_load_refuses_arbitrary_objects(tmp_path):
    ok = tmp_path / "ok.pt"
    torch.save({"step": torch.tensor(3), "lr": [1e-3], "betas": (0.9, 0.99)}, ok)
    assert safe_torch_load(str(ok))["betas"] == (0.9, 0.99)
    bad = tmp_path / "bad.pt"
    torch.save({"x": Payload()}, bad)
    with pytest.raises(Exception, match="Weights only load failed|Unsupported global"):
        safe_torch_load(str(bad))
