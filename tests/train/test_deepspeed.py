"""2-rank DeepSpeed ZeRO-3 on CPU (``DS_ACCELERATOR=cpu deepspeed --num_gpus 2``) against one process.

The step plan gives a 2-rank x 1-accumulation run exactly the micro-batches of a 1-process x
2-accumulation run, and the loss is normalised by global counts, so the two must agree.
"""

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file
from tests.train.helpers import REPO, recipe, write_dpo_dir, dpo_rows

from zephyr_fast.config import build_config
from zephyr_fast.train import run

pytestmark = [pytest.mark.deepspeed, pytest.mark.slow]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(recipe_dict, tmp_path, name, *extra, timeout=240):
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe_dict))
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(_free_port()),
           "zephyr_fast/train.py", str(path), "--deepspeed=recipes/deepspeed/zero3.json", *extra]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if '"loss"' in line]


def test_zero3_two_ranks_match_one_process(sft_dir, tmp_path):
    r = recipe("sft", tmp_path / "ds", sft_dir, max_steps=2)
    launch(r, tmp_path, "sft")
    single = run(build_config({**r, "output_dir": str(tmp_path / "one"), "gradient_accumulation_steps": 2},
                              source="test"))
    ds, one = metrics(tmp_path / "ds"), metrics(single["output_dir"])
    assert ds[0]["loss"] == pytest.approx(one[0]["loss"], rel=1e-6)  # step 1: same data, same init
    assert ds[1]["loss"] == pytest.approx(one[1]["loss"], rel=1e-5)  # step 2: the update agreed too
    assert ds[0]["grad_norm"] == pytest.approx(one[0]["grad_norm"], rel=1e-3)
    # the ZeRO-3 export is gathered into a whole HF checkpoint equal to the single-process weights
    a, b = load_file(str(tmp_path / "ds" / "model.safetensors")), load_file(str(tmp_path / "one" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=2e-5, rtol=1e-4)


def test_zero3_dpo_kill_resume_matches_one_process(sft_model, tmp_path):
    data = write_dpo_dir(tmp_path / "data", dpo_rows())
    r = recipe("dpo", tmp_path / "ds", data, model_name_or_path=sft_model["model_dir"], max_steps=3,
               save_strategy="steps", save_steps=1, save_total_limit=1, eval_strategy="steps", eval_steps=3)
    launch(r, tmp_path, "dpo", "--stop_after=2")  # preempted after step 2 (checkpoint-2 written)
    assert os.path.isdir(tmp_path / "ds" / "checkpoint-2") and not os.path.isdir(tmp_path / "ds" / "checkpoint-1")
    assert_checkpoint_is_the_gathered_model(str(tmp_path / "ds" / "checkpoint-2"))
    assert_export_rebuilds_it_from_the_partitions(str(tmp_path / "ds"), tmp_path / "older")
    launch(r, tmp_path, "dpo", "--resume_from_checkpoint=auto")
    single = run(build_config({**r, "output_dir": str(tmp_path / "one"), "gradient_accumulation_steps": 2,
                               "save_strategy": "no"}, source="test"))
    ds, one = metrics(tmp_path / "ds"), metrics(single["output_dir"])
    assert [m["step"] for m in ds] == [1, 2, 3]
    for x, y in zip(ds, one):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-5, abs=1e-6)
        assert x["rewards/margins"] == pytest.approx(y["rewards/margins"], rel=1e-4, abs=1e-5)
    ev = [json.loads(line) for line in open(tmp_path / "ds" / "metrics.jsonl") if "eval_loss" in line]
    assert ev[-1]["eval_loss"] == pytest.approx(single["eval_metrics"]["eval_loss"], rel=1e-5)  # sharded eval
    # the sharded reference pass wrote the same cache as the single process
    for split in ("train", "test"):
        c1 = load_file(str(tmp_path / "ds" / "ref_logps" / f"{split}.safetensors"))
        c2 = load_file(str(tmp_path / "one" / "ref_logps" / f"{split}.safetensors"))
        assert torch.equal(c1["index"], c2["index"])
        torch.testing.assert_close(c1["ref_chosen_logps"], c2["ref_chosen_logps"], atol=1e-4, rtol=1e-6)
    a, b = load_file(str(tmp_path / "ds" / "model.safetensors")), load_file(str(tmp_path / "one" / "model.safetensors"))
    assert_adam_trajectories_match(a, b, load_file(os.path.join(sft_model["model_dir"], "model.safetensors")),
                                   lr=r["learning_rate"], steps=3)


def assert_checkpoint_is_the_gathered_model(path):
    """A ZeRO-3 checkpoint is also a HF model folder: its weights, gathered at save time, are the ZeRO
    partitions' (read back by DeepSpeed's own zero_to_fp32, under the safe torch.load)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from transformers import AutoModelForCausalLM

    from zephyr_fast.training.checkpoint import safe_torch_loads

    hf = AutoModelForCausalLM.from_pretrained(path).state_dict()
    with safe_torch_loads():
        parts = get_fp32_state_dict_from_zero_checkpoint(path, tag="ds")
    assert {"model." + k for k in hf} == set(parts)
    for k, v in hf.items():
        assert torch.equal(v, parts["model." + k]), k


def assert_export_rebuilds_it_from_the_partitions(run_dir, older):
    """``zephyr-fast export`` on the same checkpoint written without its HF files (as before they were
    written at save time): the folder rebuilt from ds/ holds the same weights, the checkpoint stays verified."""
    import shutil

    from transformers import AutoModelForCausalLM

    from zephyr_fast.training.checkpoint import verify_checkpoint
    from zephyr_fast.training.export import ONE, export_checkpoint
    from zephyr_fast.training.manifest import read_manifest, write_manifest

    ckpt = str(older / "checkpoint-2")
    shutil.copytree(os.path.join(run_dir, "checkpoint-2"), ckpt)
    shutil.copy(os.path.join(run_dir, "config.yaml"), older / "config.yaml")
    saved = AutoModelForCausalLM.from_pretrained(ckpt).state_dict()
    for name in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                 "tokenizer_config.json", "chat_template.jinja"):
        os.remove(os.path.join(ckpt, name))
    m = read_manifest(ckpt)
    write_manifest(ckpt, step=m["step"], save_index=m["save_index"], dist=ONE)
    assert export_checkpoint(ckpt)["exported"]
    verify_checkpoint(ckpt, dist=ONE)
    rebuilt = AutoModelForCausalLM.from_pretrained(ckpt).state_dict()
    assert rebuilt.keys() == saved.keys() and all(torch.equal(rebuilt[k], saved[k]) for k in saved)


def assert_adam_trajectories_match(a, b, start, *, lr, steps):
    """Weights after ``steps`` Adam steps of two runs whose gradients agree to rounding (2 ZeRO-3 ranks
    reduce in another order than one process). Adam normalises each gradient element by its own
    running RMS, so an element whose gradient is at rounding level moves by up to ~lr per step in
    either run whatever its size: element-wise the runs can differ by up to 2·lr·steps, never more.
    The updates as a whole are well conditioned: their difference is a rounding-sized fraction of
    their size (a wrong batch, order or scale changes them by O(1))."""
    for k in a:
        diff = (a[k].double() - b[k].double())
        assert diff.abs().max() <= 2 * lr * steps, (k, float(diff.abs().max()))
        update = b[k].double() - start[k].double()
        assert diff.norm() <= 1e-2 * update.norm() + 1e-12, (k, float(diff.norm()), float(update.norm()))
