"""Checkpoint integrity (issue 12): digests, refused resumes, torn metrics, a full disk, DeepSpeed's loaders.

A tiny SFT run is stopped after step 2 with a checkpoint per step; each test restores that output
folder (same path, so the config is unchanged) and damages it the way the tester did.
"""

import errno
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
import yaml
from tests.train.helpers import REPO, recipe
from tests.train.test_checkpoint import ONE, save

from zephyr_fast.config import build_config
from zephyr_fast.train import main
from zephyr_fast.training import checkpoint as ckpt
from zephyr_fast.training import hf_folder
from zephyr_fast.training.checkpoint import CheckpointError, read_manifest, verify_checkpoint, write_manifest
from zephyr_fast.training.manifest import verifying
from zephyr_fast.training.metrics import ConfigError, read_metrics
from zephyr_fast.training.checkpointer import RunIdentity
from zephyr_fast.training.run import run

ARTEFACTS = ["model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state_0.pt", "trainer_state.json"]


def flip(path, n=64):
    """Flip ``n`` bytes in the middle of ``path`` (the size stays the same)."""
    data = bytearray(open(path, "rb").read())
    mid = max(len(data) // 2 - n // 2, 0)
    for i in range(mid, min(mid + n, len(data))):
        data[i] ^= 0xFF
    open(path, "wb").write(bytes(data))


@pytest.fixture(scope="module")
def stopped(sft_dir, tmp_path_factory):
    """``(recipe dict, output dir)``: a 3-step run stopped after step 2, checkpoint-1 and -2; kept pristine aside."""
    root = tmp_path_factory.mktemp("integrity")
    r = recipe("sft", root / "out", sft_dir, max_steps=3, save_strategy="steps", save_steps=1, save_total_limit=None)
    run(build_config(r, source="test"), stop_after=2)
    shutil.copytree(root / "out", root / "pristine")
    return r, root


@pytest.fixture
def out(stopped):
    """The stopped run's output folder, restored to its pristine state; ``(recipe, path)``."""
    r, root = stopped
    shutil.rmtree(root / "out", ignore_errors=True)
    shutil.copytree(root / "pristine", root / "out")
    return r, root / "out"


def resume(r, **over):
    return run(build_config({**r, "resume_from_checkpoint": "auto", **over}, source="test"))


@pytest.mark.parametrize("name", ARTEFACTS)
def test_a_bit_flip_in_any_artefact_is_refused_naming_the_file(out, name):
    _, path = out
    flip(path / "checkpoint-2" / name)
    with pytest.raises(CheckpointError, match=rf"checkpoint-2/{name}: content does not match its digest"):
        verify_checkpoint(str(path / "checkpoint-2"), dist=ONE)
    verify_checkpoint(str(path / "checkpoint-1"), dist=ONE)  # the other checkpoint is untouched


def test_loading_overlaps_hashing_but_a_damaged_file_is_reported_as_such(out):
    """``load_checkpoint`` loads inside ``verifying``: an error the damage caused is replaced by the refusal."""
    _, path = out
    flip(path / "checkpoint-2" / "optimizer.pt")
    with pytest.raises(CheckpointError, match="checkpoint-2/optimizer.pt: content does not match"):
        with verifying(str(path / "checkpoint-2"), dist=ONE):
            raise RuntimeError("PytorchStreamReader failed reading zip archive")  # what loading the damage gave
    with pytest.raises(RuntimeError, match="an error of its own"):  # intact files: the body's error stands
        with verifying(str(path / "checkpoint-1"), dist=ONE):
            raise RuntimeError("an error of its own")


def test_a_corrupted_manifest_or_an_added_file_is_refused(out):
    _, path = out
    flip(path / "checkpoint-2" / "manifest.json", n=8)
    with pytest.raises(CheckpointError, match=r"checkpoint-2/manifest.json: corrupted"):
        verify_checkpoint(str(path / "checkpoint-2"), dist=ONE)
    (path / "checkpoint-1" / "extra.pt").write_bytes(b"x")
    with pytest.raises(CheckpointError, match=r"checkpoint-1/extra.pt: not in the checkpoint's manifest.json"):
        verify_checkpoint(str(path / "checkpoint-1"), dist=ONE)


def test_the_launcher_refuses_a_corrupted_checkpoint_in_one_line(out, tmp_path, capsys):
    r, path = out
    flip(path / "checkpoint-2" / "optimizer.pt")
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(r))
    assert main([str(tmp_path / "r.yaml"), "--resume_from_checkpoint=auto"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("error: ") and "checkpoint-2/optimizer.pt: content" in err


def test_a_changed_config_is_refused_unless_allowed(out, capsys):
    r, _ = out
    with pytest.raises(CheckpointError, match=r"checkpoint-2: the config changed \(training.learning_rate 0.003 -> "
                                              r"0.001\) since it was written; resume with --resume_allow_changes"):
        resume(r, learning_rate=1e-3)
    s = resume(r, learning_rate=1e-3, resume_allow_changes=True)
    assert s["finished"] and s["global_step"] == 3
    assert "the config changed (training.learning_rate" in capsys.readouterr().out
    allowed = RunIdentity(build_config({**r, "resume_allow_changes": True}, source="test"), None)
    assert allowed.config_hash == RunIdentity(build_config(r, source="test"), None).config_hash  # not a change


def test_a_moved_run_with_new_logging_saving_and_reporting_resumes(out, tmp_path):
    """Where a run writes and how often it logs, saves, evaluates and reports may change on resume
    (RESUMABLE_KEYS): the run folder copied elsewhere resumes without the flag."""
    r, path = out
    moved = tmp_path / "moved"
    shutil.copytree(path, moved)
    s = resume(r, output_dir=str(moved), logging_steps=5, save_total_limit=1, save_steps=2, eval_strategy="epoch",
               report_to=["tensorboard"])
    assert s["finished"] and s["global_step"] == 3


def test_changed_train_data_is_refused_unless_allowed(sft_dir, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(sft_dir, data)
    r = recipe("sft", tmp_path / "out", str(data), max_steps=2, save_strategy="steps", save_steps=1)
    run(build_config(r, source="test"), stop_after=1)
    rows = (data / "train.jsonl").read_text().splitlines()
    (data / "train.jsonl").write_text("\n".join(rows[::-1]) + "\n")  # same rows, another order: other data
    with pytest.raises(CheckpointError, match=r"checkpoint-1: the train data changed \(rows digest [0-9a-f]{12} -> "):
        resume(r)
    s = resume(r, resume_allow_changes=True)
    assert s["finished"] and s["global_step"] == 2


def test_an_edited_global_step_is_refused(out):
    r, path = out
    state_path = path / "checkpoint-2" / "trainer_state.json"
    text = state_path.read_text()
    assert '"global_step": 2' in text
    state_path.write_text(text.replace('"global_step": 2', '"global_step": 1'))  # same size: only the digest tells
    with pytest.raises(CheckpointError, match=r"checkpoint-2/trainer_state.json: content does not match"):
        resume(r)
    index = read_manifest(str(path / "checkpoint-2"))["save_index"]
    write_manifest(str(path / "checkpoint-2"), step=2, save_index=index, dist=ONE)  # a consistent forgery
    with pytest.raises(CheckpointError, match=r"trainer_state.json: global_step 1 disagrees with scheduler.pt "
                                              r"\(stepped 2 times\)"):
        resume(r)


def test_a_torn_last_metrics_line_is_dropped_on_resume(out, capsys):
    r, path = out
    with open(path / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "loss": 10.2, "grad_no')  # killed mid-write
    s = resume(r)
    assert s["finished"] and "dropped a torn last line" in capsys.readouterr().out
    rows, torn = read_metrics(s["metrics_path"])
    assert torn is None and [x["step"] for x in rows if "loss" in x] == [1, 2, 3]


def test_a_bad_metrics_line_before_the_last_is_one_line(tmp_path):
    p = tmp_path / "metrics.jsonl"
    p.write_text('{"step": 1}\n{"step": 2, "lo\n{"step": 3}\n')
    with pytest.raises(ConfigError, match=r"metrics.jsonl: line 2 is not JSON"):
        read_metrics(str(p))


@pytest.mark.parametrize("writer,exc,name", [
    ("save_model", OSError(errno.ENOSPC, "No space left on device"), "model.safetensors"),
    ("torch.save", RuntimeError("[enforce fail at inline_container.cc:626] . unexpected pos 64 vs 0"), "optimizer.pt"),
])
def test_a_full_disk_is_one_line_and_leaves_no_checkpoint(tmp_path, monkeypatch, writer, exc, name):
    save(tmp_path, 1)

    def full(*a, **k):
        raise exc

    monkeypatch.setattr(*((torch, "save") if writer == "torch.save" else (hf_folder, writer)), full)
    with pytest.raises(CheckpointError, match=rf"^no space left on device writing \S+/.checkpoint-2.tmp/{name} "):
        save(tmp_path, 2)
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-1"]  # the partial save is gone
    assert ckpt.resolve_resume("auto", str(tmp_path)) == str(tmp_path / "checkpoint-1")


def test_a_real_full_filesystem_is_one_line(tmp_path):
    fs = tmp_path / "fs"
    fs.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(fs)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {mounted.stderr.decode().strip()}")
    try:
        model = torch.nn.Linear(256, 256)  # 257 KiB of weights, 3x that with AdamW's state
        model(torch.ones(1, 256)).sum().backward()
        opt = torch.optim.AdamW(model.parameters())
        opt.step()
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
        with pytest.raises(CheckpointError, match=r"^no space left on device writing \S+/.checkpoint-1.tmp/"):
            ckpt.save_checkpoint(str(fs), 1, dist=ONE, model=model, optimizer=opt, scheduler=sched, state={})
        assert os.listdir(fs) == []
    finally:
        subprocess.run(["umount", str(fs)], check=True)


def launch(r, tmp_path, *extra, driver=None):
    """``train.py`` in a subprocess (one DeepSpeed rank, in-process group); ``driver``: a script run instead."""
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(r))
    cmd = [sys.executable, driver or "zephyr_fast/train.py", str(tmp_path / "r.yaml"), *extra]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)


SPY = """import json, sys, torch
calls = []
real = torch.load
def spy(f, *a, **k):
    calls.append([str(f), k.get("weights_only")])
    return real(f, *a, **k)
torch.load = spy
from zephyr_fast.train import main
rc = main(sys.argv[1:])
json.dump(calls, open(sys.argv[1] + ".calls.json", "w"))
sys.exit(rc)
"""


@pytest.mark.deepspeed
@pytest.mark.slow
def test_deepspeed_resume_loads_only_through_the_safe_loader(sft_dir, tmp_path):
    r = recipe("sft", tmp_path / "out", sft_dir, max_steps=2, save_strategy="steps", save_steps=1,
               deepspeed="recipes/deepspeed/zero3.json")
    p = launch(r, tmp_path, "--stop_after=1")
    assert p.returncode == 0, p.stderr[-2000:]
    ck = tmp_path / "out" / "checkpoint-1"
    shard = ck / "ds" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    assert "ds/zero_pp_rank_0_mp_rank_00_optim_states.pt" in read_manifest(str(ck))["files"]
    shutil.copytree(ck, tmp_path / "copy")
    (tmp_path / "spy.py").write_text(SPY)
    p = launch(r, tmp_path, "--resume_from_checkpoint=auto", driver=str(tmp_path / "spy.py"))
    assert p.returncode == 0, p.stderr[-2000:]
    calls = json.loads((tmp_path / "r.yaml.calls.json").read_text())
    assert any(f.endswith("optim_states.pt") for f, _ in calls)  # DeepSpeed's own loader ran ...
    assert all(w is True for _, w in calls), calls  # ... and every torch.load was weights_only=True
    flip(tmp_path / "copy" / "ds" / shard.name)
    with pytest.raises(CheckpointError, match=rf"copy/ds/{shard.name}: content does not match"):
        verify_checkpoint(str(tmp_path / "copy"), dist=ONE)
    # a pickled payload in a shard, with a manifest forged to match: DeepSpeed's weights_only=False is overridden
    from tests.train.test_checkpoint import Payload

    model_states = ck / "ds" / "zero_pp_rank_0_mp_rank_00_model_states.pt"
    torch.save({**torch.load(model_states, weights_only=False), "x": Payload()}, model_states)
    write_manifest(str(ck), step=1, save_index=read_manifest(str(ck))["save_index"], dist=ONE)
    p = launch(r, tmp_path, f"--resume_from_checkpoint={ck}")
    assert p.returncode == 2 and "model_states.pt: refused to unpickle a non-tensor object" in p.stderr, p.stderr[-2000:]
