"""ZeRO-3 on 2 CPU ranks: one fused-loss step equals a single-process step (loss and weights)."""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import zephyr_kernels as zk
from tests.model.helpers import dpo_packed, random_pairs, tiny_model
from zephyr_fast.data.batch import loss_inputs
from zephyr_fast.model import forward_hidden, lm_head_weight, load_model

SCRIPT = Path(__file__).with_name("zero3_step.py")
LR = 1.0  # must match zero3_step.LR


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _single_process_step(model_dir, case):
    model = load_model(model_dir, attn_impl="sdpa_segments")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    losses = []
    for rank in range(2):
        batch = dpo_packed(case["pairs"][rank], case["layout"])
        hidden = forward_hidden(model, batch)
        rows, labels, segment_ids = loss_inputs(hidden, batch)
        with lm_head_weight(model) as w:
            loss, _ = zk.fused_linear_dpo_loss(rows, w, labels, segment_ids, torch.tensor(case["ref_chosen"][rank]),
                                               torch.tensor(case["ref_rejected"][rank]), beta=0.1, impl="torch")
        (loss / 2).backward()  # data-parallel mean over the two ranks
        losses.append(loss.item())
    with torch.no_grad():
        for p in model.parameters():
            p -= LR * p.grad
    return losses, before, {n: p.detach().clone() for n, p in model.named_parameters()}


def _case(tmp_path, name, layout, tied, seed):
    model = tiny_model("mistral", seed=seed, tie_word_embeddings=tied)
    model.save_pretrained(tmp_path / name, safe_serialization=True)
    shapes = [[(5, 4, 6), (1, 3, 2)], [(8, 2, 1), (3, 7, 4)]]
    g = torch.Generator().manual_seed(seed + 1)
    return {
        "name": name,
        "layout": layout,
        "pairs": [random_pairs(s, seed=seed + 2 + r) for r, s in enumerate(shapes)],
        "ref_chosen": [(-20 * torch.rand(2, generator=g)).tolist() for _ in range(2)],
        "ref_rejected": [(-20 * torch.rand(2, generator=g)).tolist() for _ in range(2)],
    }


@pytest.mark.deepspeed
@pytest.mark.slow
def test_zero3_two_rank_step_equals_single_process(tmp_path):
    """Untied head + two-sequence layout, and tied head (= embedding) + prefix-shared layout."""
    if shutil.which("deepspeed") is None:
        pytest.fail("the deepspeed launcher is not on PATH (pip install deepspeed)")
    cases = [_case(tmp_path, "untied_separate", "separate", False, 21),
             _case(tmp_path, "tied_prefix_shared", "prefix_shared", True, 31)]
    (tmp_path / "spec.json").write_text(json.dumps(cases))

    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    cmd = ["deepspeed", "--num_gpus", "2", "--master_port", str(_free_port()), str(SCRIPT),
           "--workdir", str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]

    for case in cases:
        name = case["name"]
        losses, before, after = _single_process_step(str(tmp_path / name), case)
        for rank in range(2):
            got = json.loads((tmp_path / f"{name}.loss{rank}.json").read_text())["loss"]
            assert got == pytest.approx(losses[rank], rel=5e-4, abs=1e-5), (name, rank)
        result = load_file(str(tmp_path / f"{name}.safetensors"))
        assert result.keys() == after.keys()
        for pname in after:
            delta_ds, delta_ref = result[pname] - before[pname], after[pname] - before[pname]
            torch.testing.assert_close(delta_ds, delta_ref, atol=1e-5, rtol=5e-4,
                                       msg=lambda m: f"{name} {pname}: {m}")
        head = "model.embed_tokens.weight" if name.startswith("tied") else "lm_head.weight"
        assert (after[head] - before[head]).abs().max() > 1e-4  # the LM head really got its gradient
