"""Every supported model family through the real trainer on CPU: dSFT, then dDPO from the export.

For each family (the tiny configs of ``tests/model/test_families.py``, their distinctive features
switched on: binding sliding windows, Gemma 2 soft-caps, q/k-norm, NoPE layers, tied embeddings,
MoE) a random-init model is trained by ``zephyr_fast.training.run.run`` for two SFT steps, exported,
and trained from that export for two DPO steps (examples batching, offline reference pass). The
DPO export must reload in stock ``transformers`` and score a pair there, with its own eager attention
one sequence at a time, as the trainer's packed path scores it.
"""

import json
import math
import os

import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.model.helpers import logits_token_logps, per_sequence_outputs
from tests.model.test_families import FAMILIES
from tests.train.helpers import dpo_rows, recipe, write_dpo_dir
from zephyr_fast.config import build_config
from zephyr_fast.data.chat import load_tokenizer
from zephyr_fast.data.packing import dpo_batch
from zephyr_fast.data.preference import build_dpo_examples
from zephyr_fast.model import packed_logps, tiny_config
from zephyr_fast.training.run import run

SIZES = dict(vocab_size=32000, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=64)  # two layers: the per-layer mixes (window / NoPE / layer types) need both


def family_recipe(stage, out, data_dir, arch, **over):
    """The helpers' tiny recipe with the family's model: a random init (SFT) or a checkpoint (DPO)."""
    r = recipe(stage, out, data_dir, model_init={"arch": arch, **SIZES, **FAMILIES[arch]}, max_steps=2, **over)
    if stage == "dpo":
        r.pop("max_tokens_per_batch")  # examples batching: 2 pairs per step
        r.update(model_init={}, per_device_train_batch_size=2)
    return build_config(r, source=f"test-{arch}-{stage}")


def losses(summary):
    """The per-step training rows of a run's ``metrics.jsonl``."""
    with open(summary["metrics_path"]) as f:
        return [row for row in map(json.loads, f) if "loss" in row]


def eager_pair_logps(model, pair):
    """Reference: ``prompt+chosen`` and ``prompt+rejected`` each alone through transformers' eager
    attention and LM head; returns their completion log-prob sums."""
    seqs = [torch.tensor(pair["prompt_ids"] + pair[k]) for k in ("chosen_ids", "rejected_ids")]
    with torch.no_grad():
        _, logits = per_sequence_outputs(model, seqs)
    labels = torch.cat([torch.tensor([-100] * (len(pair["prompt_ids"]) - 1) + pair[k] + [-100])
                        for k in ("chosen_ids", "rejected_ids")])
    tok = logits_token_logps(logits, labels)
    return torch.stack([t.sum() for t in tok.split([len(s) for s in seqs])])


@pytest.fixture(scope="module")
def pairs_dir(tmp_path_factory):
    """4 short UltraFeedback pairs: two DPO steps of 2 pairs."""
    return write_dpo_dir(tmp_path_factory.mktemp("family_pairs"), dpo_rows(n=4, cut=120))


@pytest.mark.parametrize("arch", list(FAMILIES))
def test_family_trains_sft_then_dpo_and_exports_a_transformers_model(arch, sft_dir, pairs_dir, tmp_path):
    sft = run(family_recipe("sft", tmp_path / "sft", sft_dir, arch))
    assert sft["finished"] and [r["step"] for r in losses(sft)] == [1, 2]
    assert all(math.isfinite(r["loss"]) for r in losses(sft))

    cfg = family_recipe("dpo", tmp_path / "dpo", pairs_dir, arch, model_name_or_path=sft["model_dir"])
    dpo = run(cfg, return_model=True)
    rows = losses(dpo)
    assert dpo["finished"] and [r["step"] for r in rows] == [1, 2] and dpo["train_pairs"] == 4
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in rows)
    first, beta = rows[0], cfg.dpo.beta  # step 1: policy == reference, up to fp32 summation order
    for side in ("chosen", "rejected"):
        assert abs(first[f"rewards/{side}"]) <= beta * 1e-6 * abs(first[f"logps/{side}"]), first

    hf = AutoModelForCausalLM.from_pretrained(dpo["model_dir"], dtype=torch.float32).eval()
    assert hf.config.model_type == tiny_config(arch).model_type
    assert {k: getattr(hf.config, k) for k in FAMILIES[arch]} == FAMILIES[arch]  # the family's features survive
    tok = load_tokenizer(dpo["model_dir"])
    with open(os.path.join(pairs_dir, "train.jsonl")) as f:
        examples, _ = build_dpo_examples([json.loads(f.readline())], tok, max_length=160, max_prompt_length=64)
    with torch.no_grad():
        _, ours = packed_logps(dpo["model"].eval(), dpo_batch(examples), impl="torch")  # the trainer's model
    torch.testing.assert_close(ours, eager_pair_logps(hf, examples[0]), atol=1e-4, rtol=1e-5)
