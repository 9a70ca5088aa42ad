"""The logits-free path equals plain transformers forwards (SFT labels loss, padded TRL-style DPO)."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

import zephyr_kernels as zk
from tests.model.helpers import (assert_grads_close, dpo_packed, grads, plain_token_logps, random_pairs, random_seqs,
                           sft_packed, tiny_model)
from zephyr_fast.data.batch import loss_inputs
from zephyr_fast.model import forward_hidden, lm_head_weight, packed_logps, padded_forward_hidden
from zephyr_fast.model.attention import attention_implementation


def _right_pad(seqs, pad=0):
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)], mask[i, : len(s)] = s, 1
    return ids, mask


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_sft_loss_and_grads_equal_transformers_labels_forward(tied):
    model = tiny_model("mistral", tie_word_embeddings=tied)
    if tied:
        assert model.lm_head.weight is model.model.embed_tokens.weight
    seqs = random_seqs([9, 4, 13, 1, 6], seed=7)
    # prompt tokens carry no loss: the first third of every sequence
    masks = [[0] * (len(s) // 3) + [1] * (len(s) - len(s) // 3) for s in seqs]
    batch = sft_packed(seqs, masks)

    hidden = forward_hidden(model, batch)
    with lm_head_weight(model) as w:
        if tied:
            assert w is model.model.embed_tokens.weight
        loss = zk.linear_cross_entropy(hidden, w, batch.labels, reduction="mean", impl="torch")
    tok, seg = packed_logps(model, batch, impl="torch")
    loss.backward()
    g_ours = grads(model)
    model.zero_grad(set_to_none=True)

    ids, attn = _right_pad(seqs)
    labels = torch.full_like(ids, -100)
    for i, (s, m) in enumerate(zip(seqs, masks)):
        labels[i, : len(s)] = torch.where(torch.tensor(m, dtype=torch.bool), s, torch.tensor(-100))
    with attention_implementation(model, "sdpa"):
        ref = model(input_ids=ids, attention_mask=attn, labels=labels, use_cache=False).loss
    ref.backward()
    g_ref = grads(model)

    n_targets = (batch.labels != -100).sum()
    torch.testing.assert_close(loss, ref, atol=1e-5, rtol=5e-4)
    torch.testing.assert_close(-tok.sum() / n_targets, ref.detach(), atol=1e-5, rtol=5e-4)
    torch.testing.assert_close(seg.sum(), tok.sum(), atol=1e-4, rtol=1e-6)
    assert_grads_close(g_ours, g_ref)


def _trl_style_padded_logps(model, pairs):
    """TRL DPOTrainer's computation: padded [prompt+chosen; prompt+rejected] batch, full logits,
    log_softmax, gather, sum over completion tokens."""
    seqs, comp_masks = [], []
    for ex in pairs:
        for comp in (ex["chosen_ids"], ex["rejected_ids"]):
            seqs.append(torch.tensor(ex["prompt_ids"] + comp))
            comp_masks.append([0] * len(ex["prompt_ids"]) + [1] * len(comp))
    ids, attn = _right_pad(seqs)
    loss_mask = torch.zeros_like(ids, dtype=torch.bool)
    for i, m in enumerate(comp_masks):
        loss_mask[i, : len(m)] = torch.tensor(m, dtype=torch.bool)
    with attention_implementation(model, "sdpa"):
        logits = model(input_ids=ids, attention_mask=attn, use_cache=False).logits
    logp = torch.log_softmax(logits[:, :-1].float(), -1).gather(2, ids[:, 1:, None])[..., 0]
    seq_logps = (logp * loss_mask[:, 1:]).sum(-1)
    return seq_logps[0::2], seq_logps[1::2]


@pytest.mark.parametrize("layout", ["separate", "prefix_shared"])
def test_dpo_loss_and_grads_equal_padded_trl_style(layout):
    model = tiny_model("llama", seed=3)
    pairs = random_pairs([(6, 5, 3), (2, 1, 7), (9, 4, 4)], seed=11)
    batch = dpo_packed(pairs, layout)
    g = torch.Generator().manual_seed(12)
    ref_c, ref_r = -20 * torch.rand(3, generator=g), -20 * torch.rand(3, generator=g)

    hidden = forward_hidden(model, batch)
    rows, labels, segment_ids = loss_inputs(hidden, batch)
    with lm_head_weight(model) as w:
        loss, metrics = zk.FusedLinearDPOLoss(beta=0.1, impl="torch")(rows, w, labels, segment_ids, ref_c, ref_r)
    loss.backward()
    g_ours = grads(model)
    model.zero_grad(set_to_none=True)

    pc, pr = _trl_style_padded_logps(model, pairs)
    ref_loss = -F.logsigmoid(0.1 * ((pc - ref_c) - (pr - ref_r))).mean()
    ref_loss.backward()
    g_ref = grads(model)

    torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=5e-4)
    torch.testing.assert_close(metrics["logps/chosen"], pc.mean().detach(), atol=1e-4, rtol=5e-4)
    torch.testing.assert_close(metrics["logps/rejected"], pr.mean().detach(), atol=1e-4, rtol=5e-4)
    assert_grads_close(g_ours, g_ref)


def test_packed_logps_triton_interpreter_matches_plain_reference():
    model = tiny_model("mistral", seed=4)
    batch = sft_packed(random_seqs([5, 8, 2], seed=13))
    with torch.no_grad():
        tok, seg = packed_logps(model, batch, impl="triton")
        ref = plain_token_logps(forward_hidden(model, batch), model.lm_head.weight, batch.labels)
    torch.testing.assert_close(tok, ref, atol=1e-5, rtol=5e-4)
    torch.testing.assert_close(seg, torch.zeros(3).index_add_(0, batch.segment_ids, ref), atol=1e-5, rtol=5e-4)


def test_real_vocab_32000():
    model = tiny_model("mistral", seed=5, vocab_size=32000, hidden_size=32, num_hidden_layers=1)
    batch = sft_packed(random_seqs([11, 1, 6], seed=14, vocab_size=32000))
    tok, seg = packed_logps(model, batch, impl="torch")
    seg.sum().backward()
    g_ours = grads(model)
    model.zero_grad(set_to_none=True)
    ref = plain_token_logps(forward_hidden(model, batch), model.lm_head.weight, batch.labels)
    ref.sum().backward()
    torch.testing.assert_close(tok, ref.detach(), atol=1e-5, rtol=5e-4)
    assert_grads_close(g_ours, grads(model))


def test_padded_forward_hidden_matches_packed():
    model = tiny_model("llama", seed=6)
    seqs = random_seqs([3, 8, 5], seed=15)
    T = 8
    ids = torch.zeros(3, T, dtype=torch.long)
    mask = torch.zeros(3, T, dtype=torch.long)
    for i, s in enumerate(seqs):  # left padding, as in generation
        ids[i, T - len(s):], mask[i, T - len(s):] = s, 1
    with torch.no_grad():
        padded = padded_forward_hidden(model, ids, mask)
        packed = forward_hidden(model, sft_packed(seqs))
    assert model.config._attn_implementation == "zephyr_sdpa_segments"  # restored afterwards
    torch.testing.assert_close(padded[mask.bool()], packed, atol=1e-5, rtol=0)


def test_forward_hidden_rejects_non_packed_input():
    model = tiny_model("mistral", seed=7)
    batch = sft_packed(random_seqs([4, 3], seed=16))
    padded = dataclasses.replace(batch, input_ids=batch.input_ids[None], position_ids=batch.position_ids[None])
    with pytest.raises(ValueError, match="padded_forward_hidden"):
        forward_hidden(model, padded)
    with pytest.raises(ValueError, match="int32"):
        forward_hidden(model, dataclasses.replace(batch, cu_seqlens=batch.cu_seqlens.long()))
