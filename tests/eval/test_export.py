"""Checkpoints as Hugging Face model folders: ``zephyr-fast export`` on the older (``model.``-prefixed)
layout, the manifest rewritten so the checkpoint stays verified, refusals in one line."""

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from zephyr_fast.training.export import ONE, export_checkpoint, main
from zephyr_fast.training.hf_folder import is_hf_folder
from zephyr_fast.training.manifest import read_manifest, verify_checkpoint, write_manifest

HF_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


def legacy_copy(run_dir, dst, step=1):
    """``run_dir``'s checkpoint as the trainer wrote it before HF folders: ``model.``-prefixed weights only."""
    src = os.path.join(run_dir, f"checkpoint-{step}")
    ckpt = os.path.join(dst, f"checkpoint-{step}")
    shutil.copytree(src, ckpt)
    shutil.copy(os.path.join(run_dir, "config.yaml"), os.path.join(dst, "config.yaml"))
    state = load_file(os.path.join(ckpt, "model.safetensors"))
    if not all(k.startswith("model.model.") or k.startswith("model.lm_head") for k in state):
        state = {"model." + k: v for k, v in state.items()}
    for name in os.listdir(ckpt):
        if name in HF_FILES:
            os.remove(os.path.join(ckpt, name))
    save_file(state, os.path.join(ckpt, "model.safetensors"))
    m = read_manifest(ckpt)
    write_manifest(ckpt, step=m["step"], save_index=m["save_index"], dist=ONE)
    return ckpt, {k[len("model."):]: v for k, v in state.items()}


def test_export_makes_an_older_checkpoint_a_verified_hf_folder(sft_run, tmp_path):
    _, out = sft_run
    ckpt, weights = legacy_copy(out, tmp_path)
    before = read_manifest(ckpt)
    assert not is_hf_folder(ckpt)
    result = export_checkpoint(ckpt)
    assert result["exported"] and result["bytes"] > 0
    assert is_hf_folder(ckpt)
    after = verify_checkpoint(ckpt, dist=ONE)  # every file, the new ones included, against the rewritten manifest
    assert (after["step"], after["save_index"]) == (before["step"], before["save_index"])
    assert set(HF_FILES) <= set(after["files"])
    model = AutoModelForCausalLM.from_pretrained(ckpt)
    state = model.state_dict()
    assert set(state) == set(weights)
    assert all(torch.equal(state[k], v) for k, v in weights.items())
    assert json.load(open(os.path.join(ckpt, "config.json")))["model_type"] == "mistral"
    assert export_checkpoint(ckpt)["exported"] is False  # already a folder: nothing rewritten


def test_export_clears_the_leftovers_of_a_killed_export(sft_run, tmp_path):
    _, out = sft_run
    ckpt, _ = legacy_copy(out, tmp_path)
    with open(os.path.join(ckpt, "config.json"), "w") as f:
        f.write("{")  # torn, unlisted: what an export killed before its manifest rewrite leaves
    os.makedirs(os.path.join(ckpt, ".hf-export.tmp"))
    assert export_checkpoint(ckpt)["exported"]
    assert not os.path.exists(os.path.join(ckpt, ".hf-export.tmp"))
    verify_checkpoint(ckpt, dist=ONE)
    AutoModelForCausalLM.from_pretrained(ckpt)


def test_export_to_another_folder_leaves_the_checkpoint_untouched(sft_run, tmp_path):
    _, out = sft_run
    ckpt, weights = legacy_copy(out, tmp_path / "run")
    manifest = open(os.path.join(ckpt, "manifest.json")).read()
    assert main([ckpt, "--out", str(tmp_path / "hf")]) == 0
    assert open(os.path.join(ckpt, "manifest.json")).read() == manifest
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"))
    assert torch.equal(model.state_dict()["lm_head.weight"], weights["lm_head.weight"])


@pytest.mark.parametrize("damage", ["flip", "missing"])
def test_export_refuses_an_unverified_checkpoint_in_one_line(sft_run, tmp_path, capsys, damage):
    _, out = sft_run
    ckpt, _ = legacy_copy(out, tmp_path)
    target = os.path.join(ckpt, "optimizer.pt")
    if damage == "flip":
        with open(target, "r+b") as f:
            f.seek(100)
            b = f.read(1)
            f.seek(100)
            f.write(bytes([b[0] ^ 1]))
    else:
        os.remove(target)
    assert main([ckpt]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {target}: ")
    assert not os.path.exists(os.path.join(ckpt, "config.json"))


def _resume_final_weights(r, run_dir, ckpt_dir):
    """Resume ``r`` (copied to ``run_dir``) from ``ckpt_dir`` to its end; the final model's weights."""
    from zephyr_fast.config import build_config
    from zephyr_fast.train import run

    run(build_config({**r, "output_dir": run_dir, "resume_from_checkpoint": ckpt_dir}, source="test"))
    return load_file(os.path.join(run_dir, "model.safetensors"))


@pytest.mark.parametrize("layout", ["saved", "older+exported"])
def test_checkpoints_are_hf_folders_and_resume_exactly_from_them(sft_run, tmp_path, layout):
    from transformers import AutoTokenizer

    r, out = sft_run
    run_dir = str(tmp_path / "run")
    shutil.copytree(out, run_dir)
    ckpt = os.path.join(run_dir, "checkpoint-1")
    if layout == "older+exported":
        shutil.rmtree(ckpt)
        ckpt, _ = legacy_copy(out, run_dir)
        export_checkpoint(ckpt)
    assert is_hf_folder(ckpt)
    verify_checkpoint(ckpt, dist=ONE)
    AutoModelForCausalLM.from_pretrained(ckpt)
    assert AutoTokenizer.from_pretrained(ckpt).chat_template  # the recipe's template travels with the weights
    uninterrupted = load_file(os.path.join(out, "model.safetensors"))
    resumed = _resume_final_weights(r, run_dir, ckpt)
    assert set(resumed) == set(uninterrupted)
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in uninterrupted)
