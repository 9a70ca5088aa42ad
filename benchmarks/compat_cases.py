"""The model case of the drop-in benchmarks (``test_compat.py``): one Hugging Face ``Trainer`` training step
(``Trainer.training_step``: ``compute_loss`` through ``forward(input_ids, labels=...)``, then the accelerator's
``backward``) of a small Mistral, plain or through ``zephyr_kernels.patch(model)`` (fused cross-entropy, no
``(B, T, V)`` logits). Same interface as the other cases (``full``, ``zero_grad``, ``grad_floor_bytes``) so
``memprobe`` measures its peak memory."""

from __future__ import annotations

import tempfile

import torch

VARIANTS = ("plain", "patched")


class HFPatchCase:
    """``spec``: ``variant`` (plain | patched), ``batch``, ``seq``, ``hidden``, ``vocab``, ``seed``; the model is
    fp32 on the CPU, the batch ``(batch, seq)`` int64 token ids that are also the labels."""

    def __init__(self, spec: dict):
        import transformers

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
        args = transformers.TrainingArguments(
            output_dir=tempfile.gettempdir(), use_cpu=True, report_to=[], save_strategy="no", seed=0,
            per_device_train_batch_size=self.input_ids.shape[0], dataloader_num_workers=0)
        self.trainer = transformers.Trainer(model=self.model, args=args)
        # what Trainer passes under gradient accumulation: the label tokens that count (after the shift)
        self.num_items_in_batch = torch.tensor(self.input_ids[:, 1:].numel())

    def loss(self) -> torch.Tensor:
        """One ``Trainer.training_step`` (forward + backward); the step's loss, detached."""
        batch = {"input_ids": self.input_ids, "labels": self.input_ids}
        return self.trainer.training_step(self.model, batch, num_items_in_batch=self.num_items_in_batch)

    def full(self) -> torch.Tensor:
        self.zero_grad()
        return self.loss()

    def grads(self) -> dict:
        """``{name: (shape) fp32 gradient}`` after :meth:`full`."""
        return {n: p.grad for n, p in self.model.named_parameters() if p.grad is not None}

    def zero_grad(self) -> None:
        self.model.zero_grad(set_to_none=True)

    def grad_floor_bytes(self) -> int:
        """The parameters' gradients, which every variant must hold."""
        return sum(p.numel() * p.element_size() for p in self.model.parameters())
