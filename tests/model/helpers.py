"""Shared builders and plain-PyTorch references for the model-path tests (tiny fp32 CPU models)."""

from __future__ import annotations

import copy

import torch

from zephyr_fast.data.packing import dpo_batch, sft_batch
from zephyr_fast.model import load_model, tiny_config
from zephyr_fast.model.attention import attention_implementation

V = 300  # tiny vocab: fast, still > hidden size


def tiny_model(arch="mistral", seed=0, vocab_size=V, hidden_size=64, num_hidden_layers=2, **kw):
    torch.manual_seed(seed)
    cfg = tiny_config(arch, vocab_size=vocab_size, hidden_size=hidden_size,
                      num_hidden_layers=num_hidden_layers, num_attention_heads=4, num_key_value_heads=2, **kw)
    return load_model(config=cfg, attn_impl="sdpa_segments")


def clone_model(model):
    return copy.deepcopy(model)


def random_seqs(lengths, seed=1, vocab_size=V):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab_size, (n,), generator=g) for n in lengths]


def random_pairs(shapes, seed=2, vocab_size=V):
    """``shapes``: [(prompt_len, chosen_len, rejected_len), ...] → dpo examples."""
    g = torch.Generator().manual_seed(seed)
    rnd = lambda n: torch.randint(3, vocab_size, (n,), generator=g).tolist()  # noqa: E731
    return [{"index": i, "prompt_ids": rnd(p), "chosen_ids": rnd(c), "rejected_ids": rnd(r)}
            for i, (p, c, r) in enumerate(shapes)]


def sft_packed(seqs, loss_masks=None):
    masks = loss_masks or [[1] * len(s) for s in seqs]
    return sft_batch([(s.tolist(), m) for s, m in zip(seqs, masks)])


def dpo_packed(pairs, layout):
    return dpo_batch(pairs, layout=layout)


def per_sequence_hidden(model, seqs):
    """Reference: each sequence alone (batch 1, no padding) through stock SDPA attention."""
    with attention_implementation(model, "sdpa"):
        return torch.cat([model.model(input_ids=s[None], use_cache=False).last_hidden_state[0] for s in seqs])


def plain_token_logps(hidden, weight, labels):
    """Reference: full fp32 logits, log_softmax, gather; 0 where ``labels == -100``."""
    logp = torch.log_softmax(hidden.float() @ weight.float().T, dim=-1)
    valid = labels != -100
    out = logp.gather(1, labels.clamp_min(0)[:, None])[:, 0]
    return torch.where(valid, out, torch.zeros_like(out))


def grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_grads_close(ga, gb, atol=1e-5, rtol=5e-4):
    assert ga.keys() == gb.keys(), set(ga) ^ set(gb)
    assert len(ga) > 0
    for name in ga:
        torch.testing.assert_close(ga[name], gb[name], atol=atol, rtol=rtol, msg=lambda m: f"{name}: {m}")


def per_sequence_outputs(model, seqs, impl="eager"):
    """Reference: each sequence alone (batch 1, no padding) through transformers' own ``impl``
    attention (``eager`` handles every family: soft-capping, per-layer sliding windows).

    Returns ``(hidden (N, D), logits (N, V))`` concatenated over ``seqs``; the logits are the HF
    causal-LM head's, so they include any final-logit soft-capping.
    """
    hidden, logits = [], []
    with attention_implementation(model, impl):
        for s in seqs:
            out = model(input_ids=s[None], use_cache=False, output_hidden_states=True)
            hidden.append(out.hidden_states[-1][0])  # after the final norm, as last_hidden_state
            logits.append(out.logits[0])
    return torch.cat(hidden), torch.cat(logits)


def logits_token_logps(logits, labels):
    """Reference: ``log_softmax`` of given fp32 logits, gathered at ``labels``; 0 where ``-100``."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    out = logp.gather(1, labels.clamp_min(0)[:, None])[:, 0]
    return torch.where(labels != -100, out, torch.zeros_like(out))
