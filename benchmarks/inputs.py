"""Realistic benchmark inputs.

Filtering kernels (CCE skips vocab blocks whose softmax is negligible) are data-dependent, so random
normal hidden states — whose softmax over 32k tokens is nearly flat — flatter some providers.  The
``"peaked"`` inputs mimic a trained LM instead:

* targets follow a Zipf law over a random permutation of the vocabulary (real token frequencies are
  Zipfian, so a few rows of ``W`` dominate);
* each hidden state points at the embedding row of the token the "model" predicts, with a
  confidence drawn around ``log V`` so the top token gets tens of percent of the mass; in
  ``1 - p_right`` of the rows the predicted token is another Zipf draw (the model is wrong there).

``"normal"`` is the classic ``hidden ~ N(0, 1)``, ``W ~ N(0, 1/D)``, uniform targets.

Sequence lengths come from the bundled real samples tokenised with the real Mistral-7B tokenizer.
"""

from __future__ import annotations

import functools
import json
import math
from typing import Optional

import torch

from .harness import ASSETS, TOKENIZER_DIR

IGNORE_INDEX = -100
INPUT_KINDS = ("peaked", "normal")


def _zipf(n: int, vocab: int, gen: torch.Generator, s: float = 1.1) -> torch.Tensor:
    dev = gen.device
    ranks = torch.arange(1, vocab + 1, dtype=torch.float64, device=dev)
    probs = ranks.pow(-s)
    perm = torch.randperm(vocab, generator=gen, device=dev)
    draws = torch.multinomial((probs / probs.sum()).float(), n, replacement=True, generator=gen)
    return perm[draws]


def lm_head_inputs(n: int, d: int, v: int, *, dtype=torch.float32, device="cpu", kind: str = "peaked",
                   seed: int = 0, p_right: float = 0.7, requires_grad: bool = True):
    """``hidden (n, d)``, ``weight (v, d)`` (both ``dtype``, leaf tensors) and ``targets (n,) int64``.

    Built in fp32 with a fixed seed (identical for every provider), then cast.  Generated on the
    target device: on a GPU, building a (128256, 4096) weight on the host would take seconds per case.
    """
    if kind not in INPUT_KINDS:
        raise ValueError(f"kind must be one of {INPUT_KINDS}, got {kind!r}")
    dev = torch.device(device)
    gen = torch.Generator(device=dev).manual_seed(seed)
    weight = torch.randn(v, d, generator=gen, device=dev) / math.sqrt(d)
    if kind == "normal":
        hidden = torch.randn(n, d, generator=gen, device=dev)
        targets = torch.randint(0, v, (n,), generator=gen, device=dev)
    else:
        targets = _zipf(n, v, gen)
        wrong = torch.rand(n, generator=gen, device=dev) > p_right
        predicted = torch.where(wrong, _zipf(n, v, gen), targets)
        w_unit = weight / weight.norm(dim=1, keepdim=True)
        confidence = math.log(v) + 2.0 * torch.randn(n, 1, generator=gen, device=dev)
        hidden = confidence * w_unit[predicted] * math.sqrt(d) / weight.norm(dim=1).mean()
        hidden = hidden + torch.randn(n, d, generator=gen, device=dev)
        del w_unit
    hidden = hidden.to(device=device, dtype=dtype).requires_grad_(requires_grad)
    weight = weight.to(device=device, dtype=dtype).requires_grad_(requires_grad)
    return hidden, weight, targets.to(device)


def dpo_layout(n: int, pairs: int, *, prompt_frac: float = 0.25, device="cpu"):
    """DPO rows as Liger lays them out: first half chosen, second half rejected.

    ``n`` rows = ``2 * pairs`` sequences of ``T = n // (2 * pairs)`` tokens.  Returns
    ``(seq_len T, segment_ids (n,) int64, loss_mask (n,) bool)``: segment ``2i`` is pair ``i``'s
    chosen sequence (row block ``i``), ``2i+1`` its rejected one (row block ``pairs + i``); the
    first ``prompt_frac`` of every sequence (the prompt) and its last position carry no target.
    """
    t = n // (2 * pairs)
    if t * 2 * pairs != n or t < 2:
        raise ValueError(f"n={n} is not 2 * pairs({pairs}) * T with T >= 2")
    seq = torch.arange(2 * pairs).repeat_interleave(t)          # sequence index in row order
    pair = seq % pairs
    is_rejected = seq >= pairs
    segment_ids = 2 * pair + is_rejected.long()
    pos = torch.arange(n) % t
    loss_mask = (pos >= int(prompt_frac * t)) & (pos < t - 1)
    return t, segment_ids.to(device), loss_mask.to(device)


# ----------------------------------------------------------------------------------------------
# real lengths
# ----------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=1)
def tokenizer():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def read_jsonl(path, limit: Optional[int] = None) -> list:
    rows = []
    with open(path) as f:
        for i, line in enumerate(f):
            if limit is not None and len(rows) >= limit:
                break
            line = line.strip()
            if not line:
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}: row {i}: invalid JSON ({exc})") from exc
    return rows


def preference_rows(limit: int = 64) -> list:
    """The first ``limit`` real UltraFeedback pairs (flat strings: prompt / chosen / rejected)."""
    path = ASSETS / "data" / "ultrafeedback_binarized" / "flat1k.jsonl"
    rows = read_jsonl(path, limit)
    for i, r in enumerate(rows):
        for field in ("prompt", "chosen", "rejected"):
            if not isinstance(r.get(field), str) or not r[field]:
                raise ValueError(f"{path}: row {i}: field {field!r} must be a non-empty string")
    return rows


@functools.lru_cache(maxsize=4)
def dpo_lengths(limit: int = 64, max_length: int = 512, max_prompt_length: int = 256):
    """Real ``(prompt, chosen, rejected)`` token counts, truncated like TRL (prompt kept left-truncated)."""
    tok = tokenizer()
    out = []
    for r in preference_rows(limit):
        p = min(len(tok(r["prompt"]).input_ids), max_prompt_length)
        c = len(tok(r["chosen"], add_special_tokens=False).input_ids) + 1   # + eos
        j = len(tok(r["rejected"], add_special_tokens=False).input_ids) + 1
        out.append((p, min(c, max_length - p), min(j, max_length - p)))
    return tuple(out)


@functools.lru_cache(maxsize=4)
def sequence_lengths(limit: int = 64, max_length: int = 512) -> tuple:
    """Real sequence lengths (prompt + completion) of the chosen and rejected halves of the pairs."""
    lens = []
    for p, c, j in dpo_lengths(limit, max_length):
        lens += [p + c, p + j]
    return tuple(lens)
