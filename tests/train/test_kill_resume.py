"""Real ``kill -9`` of ``train.py`` at the moments that matter, then ``--resume_from_checkpoint=auto``.

Every run is a subprocess (same environment, one thread), killed with SIGKILL: mid-step once a
checkpoint exists, mid-save (a ``.checkpoint-*.tmp`` folder being written), and in a DPO run's
reference pass. The resumed runs must end with exactly the weights and per-step metrics of an
uninterrupted run.
"""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml
from safetensors.torch import load_file
from tests.train.helpers import REPO, dpo_rows, recipe, write_dpo_dir

pytestmark = pytest.mark.slow

EXACT = ("loss", "grad_norm", "learning_rate", "rewards/margins")


def start(r, out, name, *extra):
    """``python zephyr_fast/train.py`` on ``r`` with ``output_dir=out``; stdout / stderr go to files."""
    path = out.parent / f"{name}.yaml"
    path.write_text(yaml.safe_dump({**r, "output_dir": str(out)}))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    logs = [open(out.parent / f"{name}.{s}", "w") for s in ("out", "err")]
    proc = subprocess.Popen([sys.executable, "zephyr_fast/train.py", str(path), *extra], cwd=REPO, env=env,
                            stdout=logs[0], stderr=logs[1])
    proc.err_path = out.parent / f"{name}.err"
    return proc


def finish(proc, timeout=240):
    assert proc.wait(timeout) == 0, open(proc.err_path).read()[-3000:]


def kill_when(proc, ready, timeout=240):
    """SIGKILL ``proc`` as soon as ``ready()`` holds (polled every millisecond)."""
    t0 = time.time()
    while not ready():
        assert proc.poll() is None, "the run ended before the kill moment: " + open(proc.err_path).read()[-2000:]
        assert time.time() - t0 < timeout, "the kill moment never came"
        time.sleep(0.001)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()


def tmp_dirs(out):
    return [n for n in os.listdir(out) if n.startswith(".checkpoint-") and n.endswith(".tmp")] if out.exists() else []


def saving(out):
    """A checkpoint is being written: its tmp folder exists and has no manifest yet."""
    return any(not (out / n / "manifest.json").exists() for n in tmp_dirs(out))


def steps_of(out):
    with open(out / "metrics.jsonl") as f:
        rows = [json.loads(line) for line in f]
    return [{k: r[k] for k in ("step", *EXACT) if k in r} for r in rows if "loss" in r]


def assert_same_run(a, b):
    """Bit-identical final weights and per-step metrics."""
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    assert steps_of(a) == steps_of(b)


def test_sft_killed_mid_step_and_mid_save_resumes_bit_exactly(sft_dir, tmp_path):
    r = recipe("sft", tmp_path, sft_dir, max_steps=6, save_strategy="steps", save_steps=1, save_total_limit=2,
               lr_scheduler_type="cosine", warmup_ratio=0.2)
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    finish(start(r, whole, "whole"))
    kill_when(start(r, cut, "run1"), lambda: (cut / "checkpoint-2").exists())  # mid-step, checkpoint-2 on disk
    resumed = start(r, cut, "run2", "--resume_from_checkpoint=auto")
    kill_when(resumed, lambda: saving(cut))  # mid-save
    assert tmp_dirs(cut), "killed after the save finished, not in it"
    finish(start(r, cut, "run3", "--resume_from_checkpoint=auto"))
    assert "resumed from" in open(tmp_path / "run3.out").read()
    assert_same_run(whole, cut)
    assert not tmp_dirs(cut)  # the torn save was cleared by the next one
    assert len([n for n in os.listdir(cut) if n.startswith("checkpoint-")]) <= 2


def test_dpo_killed_in_the_reference_pass_and_mid_step_resumes_bit_exactly(tmp_path):
    data = write_dpo_dir(tmp_path / "data", dpo_rows(n=8, cut=120))
    r = recipe("dpo", tmp_path, data, max_steps=4, save_strategy="steps", save_steps=1)
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    finish(start(r, whole, "whole"))
    first = start(r, cut, "run1")
    kill_when(first, lambda: "ref logps (train)" in open(first.err_path).read())
    assert not (cut / "ref_logps" / "train.safetensors").exists() and not os.path.exists(cut / "checkpoint-1")
    second = start(r, cut, "run2", "--resume_from_checkpoint=auto")  # nothing to resume: starts afresh
    kill_when(second, lambda: (cut / "checkpoint-2").exists())
    finish(start(r, cut, "run3", "--resume_from_checkpoint=auto"))
    assert "reusing" in open(tmp_path / "run3.out").read()  # the reference cache of run2 is reused
    assert_same_run(whole, cut)
