"""dDPO (Rafailov et al. 2023, eq. 7) against precomputed reference log-probs, and its reference pass.

``loss_sum = Σ_i −log σ(β [(log π(y_c|x) − log π_ref(y_c|x)) − (log π(y_r|x) − log π_ref(y_r|x))])``
over the pairs (every TRL ``loss_type`` / ``label_smoothing`` / ``loss_weights`` variant as in
``zephyr_kernels.losses``), ``zephyr_kernels.FusedLinearDPOLoss(reduction="sum")``; the caller divides
by the step's global pair count (``denominator = "pairs"``).  Its config section is
``zephyr_fast.config.DPOConfig`` (the recipe's ``dpo:`` keys), checked here by the kernels' own rule.
Reference hookup: ``uses_reference`` makes the run fetch ``(ref_chosen, ref_rejected)`` per pair from
``zephyr_fast.training.reference`` (cached once, offline); :class:`RefLogpsStage` (``stage: ref_logps``)
runs only that pass, optionally of ``ref_model_name_or_path``, and stops.
"""

from __future__ import annotations

import os
from typing import Callable, Optional

import torch
from zephyr_kernels import FusedLinearDPOLoss, check_dpo_args

from zephyr_fast.config import STAGES as SCHEMAS
from zephyr_fast.config import DataConfig, DPOConfig
from zephyr_fast.config.keys import did_you_mean
from zephyr_fast.config.values import LOSS_TYPES
from zephyr_fast.data.batch import IGNORE_INDEX
from zephyr_fast.data.packing import dpo_batch, pack_dpo, pair_tokens
from zephyr_fast.data.preference import build_dpo_examples
from zephyr_fast.objectives.base import Stage, common_tokenize_kwargs


class DPOStage(Stage):
    schema = SCHEMAS["dpo"]  # a pair holds two completions
    denominator = "pairs"
    batch_by = "examples"  # TRL counts DPO batches in pairs
    example_name = "pair"
    uses_reference = True

    def __init__(self, impl: str = "auto", section: Optional[DPOConfig] = None):
        super().__init__(impl, section or DPOConfig())

    @classmethod
    def check_section(cls, section: DPOConfig) -> None:
        """The kernels' own rule for the loss arguments (``zephyr_kernels.check_dpo_args``), naming the key
        where the recipe set it; a misspelt loss_type gets a did-you-mean."""
        d = section
        try:
            check_dpo_args(d.beta, d.loss_type, d.label_smoothing, "sum", d.loss_weights, d.discopop_tau,
                           d.f_divergence_type, d.use_weighting)
        except ValueError as e:
            names = [d.loss_type] if isinstance(d.loss_type, str) else list(d.loss_type)
            bad = next((str(n) for n in names if n not in LOSS_TYPES), None)
            hint = did_you_mean(bad, LOSS_TYPES, cutoff=0.6) if bad else ""
            raise section.error(f"{e}{hint}") from None

    def other_reference(self, model_path: Optional[str]) -> Optional[str]:
        """``dpo.ref_model_name_or_path`` when it names another model than the policy's start (its cache is
        what ``stage: ref_logps`` wrote; this run cannot compute it)."""
        ref = self.cfg.ref_model_name_or_path
        return ref if ref and not _same_model(ref, model_path) else None

    def tokenize(self, rows, tokenizer, data: DataConfig, name: str, *, keep_ids: bool = True):
        return build_dpo_examples(rows, tokenizer, max_prompt_length=data.max_prompt_length,
                                  truncation_mode=data.truncation_mode,
                                  max_completion_length=data.max_completion_length,
                                  **common_tokenize_kwargs(data, name, keep_ids))

    def pack(self, examples: list, data: DataConfig, max_tokens: int, *, seed: int, num_shards: int):
        return pack_dpo(examples, max_tokens, layout=data.dpo_layout, seed=seed, num_shards=num_shards)

    def size(self, example: dict, data: DataConfig) -> int:
        return pair_tokens(example, data.dpo_layout)

    def collate(self, examples: list, data: DataConfig):
        return dpo_batch(examples, data.dpo_layout)

    def prepare_model(self, model) -> None:
        """TRL's ``disable_dropout``: every ``nn.Dropout`` (LoRA's included) gets ``p = 0``."""
        if self.cfg.disable_dropout:
            for module in model.modules():
                if isinstance(module, torch.nn.Dropout):
                    module.p = 0.0

    def loss_head(self, *, temperature: float, softcap: Optional[float]) -> Callable:
        d = self.cfg
        dpo_loss = FusedLinearDPOLoss(beta=d.beta, loss_type=d.loss_type, label_smoothing=d.label_smoothing,
                                      rpo_alpha=d.rpo_alpha, reduction="sum", loss_weights=d.loss_weights,
                                      discopop_tau=d.discopop_tau, temperature=temperature, softcap=softcap,
                                      impl=self.impl, f_divergence_type=d.f_divergence_type,
                                      f_alpha_divergence_coef=d.f_alpha_divergence_coef,
                                      use_weighting=d.use_weighting, average_log_prob=d.average_log_prob)

        def head(rows, weight, labels, segment_ids, ref):
            ref_chosen, ref_rejected = ref
            if d.average_log_prob:  # the cache holds sums; the loss sees means on both sides
                ref_chosen, ref_rejected = _per_token(ref_chosen, ref_rejected, labels, segment_ids)
            return dpo_loss(rows, weight, labels, segment_ids, ref_chosen, ref_rejected)

        return head

    def log_metrics(self, pairs: int, seconds: float) -> dict:
        return {"train_pairs_per_second": pairs / seconds}

    def summary_metrics(self, pairs: int, seconds: float) -> dict:
        return {"train_pairs": pairs, "train_pairs_per_second": pairs / seconds}


class RefLogpsStage(DPOStage):
    """Only the reference pass of a DPO recipe (optionally of another model): no training."""

    schema = SCHEMAS["ref_logps"]

    def model_path(self, default: Optional[str]) -> Optional[str]:
        return self.cfg.ref_model_name_or_path or default

    def other_reference(self, model_path: Optional[str]) -> Optional[str]:
        return None  # it builds the reference model itself (model_path)


def _per_token(ref_chosen, ref_rejected, labels, segment_ids, ignore_index: int = IGNORE_INDEX) -> tuple:
    """``(P,)`` reference sums -> means over each completion's target tokens (counted on the device from
    ``labels (M,)`` / ``segment_ids (M,)``, segment ``2i`` chosen and ``2i+1`` rejected; no host sync)."""
    counts = torch.zeros(2 * ref_chosen.numel(), device=labels.device).index_add_(
        0, segment_ids, (labels != ignore_index).float()).clamp(min=1.0)
    return ref_chosen / counts[0::2], ref_rejected / counts[1::2]


def _same_model(a: str, b: Optional[str]) -> bool:
    if not b:
        return False
    if os.path.isdir(a) and os.path.isdir(b):
        return os.path.samefile(a, b)
    return a == b
