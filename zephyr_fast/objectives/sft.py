"""dSFT (Tunstall et al. 2023, §3): supervised fine-tuning on the assistant turns.

``loss_sum = Σ_t −log π(y_t | y_<t)`` over the target tokens (``label_smoothing_factor`` ε mixes in the
uniform distribution as HF Trainer does), ``zephyr_kernels.linear_cross_entropy(reduction="sum")``;
the caller divides by the step's global target-token count (``denominator = "targets"``).
"""

from __future__ import annotations

from typing import Callable, Optional

from zephyr_kernels import linear_cross_entropy

from zephyr_fast.config import STAGES as SCHEMAS
from zephyr_fast.config import DataConfig
from zephyr_fast.data.packing import pack_sft, sft_batch
from zephyr_fast.data.sft import tokenize_sft
from zephyr_fast.objectives.base import Stage, common_tokenize_kwargs


class SFTStage(Stage):
    schema = SCHEMAS["sft"]
    denominator = "targets"
    example_name = "sequence"

    def tokenize(self, rows, tokenizer, data: DataConfig, name: str, *, keep_ids: bool = True):
        return tokenize_sft(rows, tokenizer, assistant_only_loss=data.assistant_only_loss,
                            **common_tokenize_kwargs(data, name, keep_ids))

    def pack(self, examples: list, data: DataConfig, max_tokens: int, *, seed: int, num_shards: int):
        return pack_sft(examples, max_tokens, seed=seed, overlong=data.overlong, num_shards=num_shards)

    def size(self, example: dict, data: DataConfig) -> int:
        return len(example["input_ids"])

    def collate(self, examples: list, data: DataConfig):
        return sft_batch([(ex["input_ids"], ex["loss_mask"]) for ex in examples])  # each <= max_length already

    label_smoothing = 0.0  # training.label_smoothing_factor (from_config)

    @classmethod
    def from_config(cls, cfg) -> "SFTStage":
        stage = super().from_config(cfg)
        stage.label_smoothing = cfg.training.label_smoothing_factor
        return stage

    def loss_head(self, *, temperature: float, softcap: Optional[float]) -> Callable:
        eps = self.label_smoothing

        def head(rows, weight, labels, segment_ids, ref):
            return linear_cross_entropy(rows, weight, labels, reduction="sum", label_smoothing=eps,
                                        temperature=temperature, softcap=softcap, impl=self.impl), {}

        return head
