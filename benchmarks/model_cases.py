"""Model-level cases: packed vs padded forward+backward, and a DPO step, on real sequence lengths.

``spec = {"case": "model", "variant": ..., "model": "tiny"|"1b", "seqs": S, "dtype", "device", "seed"}``

Variants (all fwd+bwd of a mean token loss over the same real sequences):

* ``padded`` (anchor ``naive_torch``): the stock transformers path — right-padded ``(S, T_max)``
  batch, SDPA with an attention mask, full ``(S, T_max, V)`` logits, cross-entropy.
* ``packed+logits`` (zephyr_fast): one padding-free packed row through ``forward_hidden`` (the
  registered varlen attention), then ``lm_head`` logits + cross-entropy — packing alone.
* ``packed+fused`` (zephyr_fast): the same packed forward into ``linear_cross_entropy`` — no logits.
* ``dpo_padded_ref`` (anchor ``naive_torch``): a TRL-style padded DPO step — policy forward with
  logits for chosen + rejected, and a *reference model in memory* run without grad.
* ``dpo_packed`` (zephyr_fast): packed separate layout, ``FusedLinearDPOLoss`` with precomputed
  reference log-probs (numbers).

Sequences: the first UltraFeedback pairs, prompt + chosen and prompt + rejected tokenised with the
real Mistral tokenizer, cut at 512 tokens (their real lengths — nothing is padded to a fixed size).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from .harness import provider_unavailable, tensor_bytes, zephyr_impl
from .inputs import IGNORE_INDEX, preference_rows, tokenizer

VARIANTS = {"padded": "naive_torch", "packed+logits": "zephyr_fast", "packed+fused": "zephyr_fast",
            "dpo_padded_ref": "naive_torch", "dpo_packed": "zephyr_fast"}
MODELS = {
    "tiny": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=512),
    # ~1.0B parameters with Mistral-7B's vocab and GQA ratio
    "1b": dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=16, num_key_value_heads=4,
               intermediate_size=7168),
}
MAX_LENGTH = 512


@functools.lru_cache(maxsize=4)
def real_pairs(n_pairs: int) -> tuple:
    """``((prompt_ids, chosen_ids, rejected_ids), ...)`` of the first real pairs, each sequence ≤ 512."""
    tok = tokenizer()
    out = []
    for r in preference_rows(n_pairs):
        p = tok(r["prompt"]).input_ids[:256]
        c = tok(r["chosen"], add_special_tokens=False).input_ids[: MAX_LENGTH - len(p) - 1] + [tok.eos_token_id]
        j = tok(r["rejected"], add_special_tokens=False).input_ids[: MAX_LENGTH - len(p) - 1] + [tok.eos_token_id]
        out.append((tuple(p), tuple(c), tuple(j)))
    return tuple(out)


class ModelCase:
    def __init__(self, spec: dict):
        from zephyr_fast.model.load import load_model, tiny_config

        self.spec = spec
        self.variant = spec["variant"]
        if self.variant not in VARIANTS:
            raise ValueError(f"unknown variant {self.variant!r}")
        self.device = dev = torch.device(spec.get("device", "cpu"))
        reason = provider_unavailable(VARIANTS[self.variant], dev)
        if reason:
            from .lm_head import Unavailable

            raise Unavailable(reason)
        dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[spec.get("dtype", "float32")]
        torch.manual_seed(spec.get("seed", 0))
        config = tiny_config(arch="mistral", vocab_size=32000, **MODELS[spec.get("model", "tiny")])
        padded = self.variant.startswith("dpo_padded") or self.variant == "padded"
        with torch.device(dev):  # initialise on the device: a 1B random init on the host takes minutes
            self.model = load_model(config=config, dtype=dtype, attn_impl="sdpa" if padded else "auto")
        pairs = real_pairs(max(1, spec["seqs"] // 2))
        self.seqs = [p + c for p, c, _ in pairs] + [p + j for p, _, j in pairs]
        self.tokens = sum(len(s) for s in self.seqs)
        self.pairs = pairs
        if self.variant == "dpo_padded_ref":
            with torch.device(dev):
                self.ref_model = load_model(config=config, dtype=dtype, attn_impl="sdpa").eval()
            self.ref_model.requires_grad_(False)
        self._build_inputs()

    # -- inputs -----------------------------------------------------------------------------
    def _build_inputs(self):
        dev = self.device
        if self.variant in ("padded", "dpo_padded_ref"):
            t = max(len(s) for s in self.seqs)
            ids = torch.zeros(len(self.seqs), t, dtype=torch.long)
            mask = torch.zeros(len(self.seqs), t, dtype=torch.long)
            loss_mask = torch.zeros(len(self.seqs), t, dtype=torch.bool)
            for i, s in enumerate(self.seqs):
                ids[i, : len(s)] = torch.tensor(s)
                mask[i, : len(s)] = 1
                start = len(self.pairs[i % len(self.pairs)][0]) if self.variant == "dpo_padded_ref" else 0
                loss_mask[i, start: len(s)] = True
            labels = torch.where(loss_mask, ids, torch.full_like(ids, IGNORE_INDEX))
            self.ids, self.mask, self.labels = ids.to(dev), mask.to(dev), labels.to(dev)
        elif self.variant == "dpo_packed":
            from zephyr_fast.data.packing import dpo_batch

            exs = [{"index": i, "prompt_ids": list(p), "chosen_ids": list(c), "rejected_ids": list(j)}
                   for i, (p, c, j) in enumerate(self.pairs)]
            self.batch = dpo_batch(exs, layout="separate").to(dev)
            gen = torch.Generator().manual_seed(1)
            ref = -1.5 * 300 + 5.0 * torch.randn(2, len(self.pairs), generator=gen)
            self.ref_c, self.ref_r = ref[0].to(dev), ref[1].to(dev)
        else:
            from zephyr_fast.data.packing import sft_batch

            self.batch = sft_batch([(s, [1] * len(s)) for s in self.seqs]).to(dev)

    # -- the step -----------------------------------------------------------------------------
    def loss(self) -> torch.Tensor:
        v = self.variant
        if v == "padded":
            logits = self.model(input_ids=self.ids, attention_mask=self.mask, use_cache=False).logits
            return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), self.labels[:, 1:].flatten(),
                                   ignore_index=IGNORE_INDEX)
        if v == "dpo_padded_ref":
            return self._padded_dpo()
        from zephyr_fast.model.forward import forward_hidden, lm_head_weight

        hidden = forward_hidden(self.model, self.batch)
        with lm_head_weight(self.model) as w:
            if v == "packed+logits":
                return F.cross_entropy((hidden @ w.t()).float(), self.batch.labels, ignore_index=IGNORE_INDEX)
            import zephyr_kernels as zk

            impl = zephyr_impl(self.device)
            if v == "packed+fused":
                return zk.linear_cross_entropy(hidden, w, self.batch.labels, impl=impl)
            loss_fn = zk.FusedLinearDPOLoss(beta=0.1, impl=impl)
            return loss_fn(hidden, w, self.batch.labels, self.batch.segment_ids, self.ref_c, self.ref_r)[0]

    def _seq_logps(self, model):
        logits = model(input_ids=self.ids, attention_mask=self.mask, use_cache=False).logits[:, :-1].float()
        labels = self.labels[:, 1:]
        tok = torch.log_softmax(logits, -1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        return (tok * (labels != IGNORE_INDEX)).sum(-1)

    def _padded_dpo(self):
        p = len(self.pairs)
        with torch.no_grad():
            ref = self._seq_logps(self.ref_model)
        pol = self._seq_logps(self.model)
        margin = (pol[:p] - ref[:p]) - (pol[p:] - ref[p:])
        return -F.logsigmoid(0.1 * margin).mean()

    def zero_grad(self) -> None:
        self.model.zero_grad(set_to_none=True)

    def full(self) -> torch.Tensor:
        self.zero_grad()
        loss = self.loss()
        loss.backward()
        return loss

    def grad_floor_bytes(self) -> int:
        """Parameter gradients: what every variant must hold after backward."""
        return tensor_bytes(*[p for p in self.model.parameters() if p.requires_grad])
