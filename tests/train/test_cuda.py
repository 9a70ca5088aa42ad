"""The trainer on a CUDA device (skipped without one, by the ``cuda`` mark): Triton kernels and the
GPU attention backends inside a real run, against the same run through the torch reference path."""

import json

import pytest
import torch
from tests.train.helpers import recipe

from zephyr_fast.config import build_config
from zephyr_fast.train import run

pytestmark = pytest.mark.cuda


def _losses(summary):
    with open(summary["metrics_path"]) as f:
        return [json.loads(line)["loss"] for line in f if '"loss"' in line]


def test_cuda_sft_triton_matches_torch_path(sft_dir, tmp_path):
    runs = {}
    for impl in ("triton", "torch"):
        cfg = build_config(recipe("sft", tmp_path / impl, sft_dir, max_steps=3, kernel_impl=impl), source="test")
        runs[impl] = run(cfg)
        assert runs[impl]["device"].startswith("cuda")
    a, b = _losses(runs["triton"]), _losses(runs["torch"])
    assert a[0] == pytest.approx(b[0], rel=1e-4)
    assert a[-1] == pytest.approx(b[-1], rel=1e-3)


def test_cuda_bf16_dpo_trains(sft_model, dpo_dir, tmp_path):
    cfg = build_config(recipe("dpo", tmp_path / "dpo", dpo_dir, model_name_or_path=sft_model["model_dir"],
                              torch_dtype="bfloat16", num_train_epochs=3, learning_rate=1e-3, optim="rmsprop",
                              eval_strategy="epoch", kernel_impl="auto"), source="test")
    s = run(cfg)
    assert s["device"].startswith("cuda") and s["train_pairs_per_second"] > 0
    assert s["eval_metrics"]["eval_rewards/margins"] > 0.0
    assert torch.cuda.max_memory_allocated() > 0
