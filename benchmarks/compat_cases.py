"""The model case of the drop-in benchmarks (``test_compat.py``): one Hugging Face training step of a small
Mistral, ``forward(input_ids, labels=...)`` then ``loss.backward()``, plain or through
``zephyr_kernels.patch(model)`` (fused cross-entropy, no ``(B, T, V)`` logits). Same interface as the
other cases (``full``, ``zero_grad``, ``grad_floor_bytes``) so ``memprobe`` measures its peak memory."""

from __future__ import annotations

import torch

VARIANTS = ("plain", "patched")


class HFPatchCase:
    def __init__(self, spec: dict):
        import zephyr_kernels
        from zephyr_fast.model.load import load_model, tiny_config

        if spec["variant"] not in VARIANTS:
            raise ValueError(f"unknown variant {spec['variant']!r}")
        torch.manual_seed(spec.get("seed", 0))
        config = tiny_config(arch="mistral", vocab_size=spec.get("vocab", 32000), hidden_size=spec.get("hidden", 256),
                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                             intermediate_size=4 * spec.get("hidden", 256))
        self.model = load_model(config=config, attn_impl="sdpa")
        if spec["variant"] == "patched":
            zephyr_kernels.patch(self.model)
        g = torch.Generator().manual_seed(1)
        self.input_ids = torch.randint(0, config.vocab_size, (spec.get("batch", 4), spec.get("seq", 512)), generator=g)

    def loss(self) -> torch.Tensor:
        return self.model(input_ids=self.input_ids, labels=self.input_ids).loss

    def full(self) -> torch.Tensor:
        self.zero_grad()
        loss = self.loss()
        loss.backward()
        return loss.detach()

    def zero_grad(self) -> None:
        self.model.zero_grad(set_to_none=True)

    def grad_floor_bytes(self) -> int:
        """The parameters' gradients, which every variant must hold."""
        return sum(p.numel() * p.element_size() for p in self.model.parameters())
