"""Checkpoint discovery (only complete checkpoints, newest *written* first), branch-safe pruning, safe loading."""

import json
import os

import pytest
import torch

from zephyr_fast.training.checkpoint import (CheckpointError, list_checkpoints, read_manifest, resolve_resume,
                                             safe_torch_load, safe_torch_loads, save_checkpoint)
from zephyr_fast.training.distributed import DistInfo

ONE = DistInfo(0, 1, 0, torch.device("cpu"), False, None)


def save(out, step, limit=None):
    """A tiny real checkpoint (Linear + AdamW + LambdaLR) at ``step``."""
    torch.manual_seed(step)
    model = torch.nn.Linear(4, 4)
    opt = torch.optim.AdamW(model.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    return save_checkpoint(str(out), step, dist=ONE, model=model, optimizer=opt, scheduler=sched, state={},
                           total_limit=limit)


def names(out):
    return sorted(n for n in os.listdir(out) if "checkpoint" in n)


def test_auto_resume_picks_the_most_recently_written_complete_checkpoint(tmp_path):
    assert resolve_resume("auto", str(tmp_path / "missing")) is None
    save(tmp_path, 10)
    save(tmp_path, 4)  # written after checkpoint-10: the newer branch
    os.makedirs(tmp_path / "checkpoint-12")  # an old-style / hand-made directory: no manifest
    (tmp_path / "checkpoint-12" / "trainer_state.json").write_text(json.dumps({"global_step": 12}))
    os.makedirs(tmp_path / ".checkpoint-14.tmp")  # crashed before the rename
    assert list_checkpoints(str(tmp_path)) == [str(tmp_path / "checkpoint-10"), str(tmp_path / "checkpoint-4")]
    assert resolve_resume("auto", str(tmp_path)) == str(tmp_path / "checkpoint-4")
    assert resolve_resume(None, str(tmp_path)) is None
    assert resolve_resume(str(tmp_path / "checkpoint-10"), str(tmp_path)) == str(tmp_path / "checkpoint-10")
    with pytest.raises(CheckpointError, match=r"checkpoint-12: not a complete checkpoint \(no manifest.json"):
        resolve_resume(str(tmp_path / "checkpoint-12"), str(tmp_path))
    with pytest.raises(CheckpointError, match="no such checkpoint directory"):
        resolve_resume(str(tmp_path / "checkpoint-99"), str(tmp_path))
    os.remove(tmp_path / "checkpoint-4" / "optimizer.pt")  # a listed file gone: incomplete, auto skips it
    assert resolve_resume("auto", str(tmp_path)) == str(tmp_path / "checkpoint-10")
    with pytest.raises(CheckpointError, match=r"checkpoint-4/optimizer.pt: missing \(listed in manifest.json\)"):
        resolve_resume(str(tmp_path / "checkpoint-4"), str(tmp_path))


def test_pruning_follows_the_order_of_writing_and_keeps_the_checkpoint_just_written(tmp_path):
    save(tmp_path, 5, limit=2)
    save(tmp_path, 6, limit=2)
    save(tmp_path, 2, limit=2)  # resumed from an older step: a new branch (by step number it was pruned)
    assert names(tmp_path) == ["checkpoint-2", "checkpoint-6"]
    assert resolve_resume("auto", str(tmp_path)) == str(tmp_path / "checkpoint-2")
    save(tmp_path, 3, limit=2)
    assert names(tmp_path) == ["checkpoint-2", "checkpoint-3"]  # the stale branch's checkpoint-6 went first
    assert resolve_resume("auto", str(tmp_path)) == str(tmp_path / "checkpoint-3")
    save(tmp_path, 2, limit=1)  # re-saving a step replaces it whole, with a new save counter
    assert names(tmp_path) == ["checkpoint-2"]
    assert read_manifest(str(tmp_path / "checkpoint-2"))["save_index"] == 5


def test_the_manifest_lists_every_file_with_its_size_and_digest(tmp_path):
    path = save(tmp_path, 1)
    m = read_manifest(path)
    assert (m["step"], m["save_index"]) == (1, 1)
    assert sorted(m["files"]) == ["model.safetensors", "optimizer.pt", "rng_state_0.pt", "scheduler.pt",
                                  "trainer_state.json"]
    for rel, entry in m["files"].items():
        assert entry["size"] == os.path.getsize(os.path.join(path, rel))
        assert len(entry["xxh3_128"]) == 1 and len(entry["xxh3_128"][0]) == 32


class Payload:  # any non-allow-listed class: unpickling it could run code
    def __reduce__(self):
        return (print, ("unpickled: this must never run",))


def test_safe_load_refuses_arbitrary_objects(tmp_path):
    ok = tmp_path / "ok.pt"
    torch.save({"step": torch.tensor(3), "lr": [1e-3], "betas": (0.9, 0.99)}, ok)
    assert safe_torch_load(str(ok))["betas"] == (0.9, 0.99)
    bad = tmp_path / "bad.pt"
    torch.save({"x": Payload()}, bad)
    with pytest.raises(CheckpointError, match=r"bad.pt: refused to unpickle a non-tensor object"):
        safe_torch_load(str(bad))


def test_inside_safe_torch_loads_even_weights_only_false_is_safe(tmp_path):
    """What DeepSpeed's loaders (``torch.load(..., weights_only=False)``) get while a checkpoint loads."""
    ok, bad = tmp_path / "ok.pt", tmp_path / "bad.pt"
    torch.save({"w": torch.ones(2)}, ok)
    torch.save({"x": Payload()}, bad)
    original = torch.load
    with safe_torch_loads():
        assert torch.equal(torch.load(str(ok), map_location="cpu", weights_only=False)["w"], torch.ones(2))
        with pytest.raises(CheckpointError, match="bad.pt: refused to unpickle"):
            torch.load(str(bad), weights_only=False)
    assert torch.load is original  # restored afterwards
