"""zephyr_kernels: fused LM-head log-prob, cross-entropy and DPO losses that never build (N, V) logits.

Public API (contracts in docs/ARCHITECTURE.md):

* :func:`linear_logprobs` — per-token / per-segment log-probs (DPO policy and reference passes).
* :func:`linear_cross_entropy` (also Cut Cross-Entropy's call, :mod:`zephyr_kernels.cce_compat`).
* :class:`LigerFusedLinearCrossEntropyLoss`, :func:`liger_fused_linear_cross_entropy`,
  :class:`CrossEntropyOutput` — Liger's FLCE drop-in (old name :class:`FusedLinearCrossEntropyLoss`).
* :func:`patch` — one-line fused loss for a Hugging Face causal LM (:mod:`zephyr_kernels.hf_patch`), also
  through TRL's ``SFTTrainer`` / ``DPOTrainer`` heads; :func:`patch_trl` — every TRL SFT / DPO head
  (:mod:`zephyr_kernels.trl_patch`).
* :func:`dpo_loss`, :func:`fused_linear_dpo_loss`, :class:`FusedLinearDPOLoss`,
  :class:`LigerFusedLinearDPOLoss` (Liger's drop-in; old name
  ``LigerCompatibleFusedLinearDPOLoss``).
* ``impl="auto" | "triton" | "triton_tiled" | "torch"`` on every entry point (:mod:`zephyr_kernels.dispatch`);
  :mod:`zephyr_kernels.reference` holds the naive fp32 references.

Importing this package touches neither CUDA nor Triton; the Triton backend loads on first use, and
``transformers`` / ``trl`` only when :func:`patch` / :func:`patch_trl` is first looked up.
"""

import importlib

from zephyr_kernels.cross_entropy import linear_cross_entropy
from zephyr_kernels.dispatch import CCE_IMPLS, IMPLS, resolve
from zephyr_kernels.dpo import FusedLinearDPOLoss, fused_linear_dpo_loss
from zephyr_kernels.losses import LOSS_TYPES, check_dpo_args, dpo_loss
from zephyr_kernels.liger_compat import LigerCompatibleFusedLinearDPOLoss, LigerFusedLinearDPOLoss
from zephyr_kernels.liger_ce import (CrossEntropyOutput, FusedLinearCrossEntropyLoss, LigerFusedLinearCrossEntropyLoss,
                                     liger_fused_linear_cross_entropy)
from zephyr_kernels.linear_logprobs import linear_logprobs

__all__ = [
    "CCE_IMPLS",
    "CrossEntropyOutput",
    "IMPLS",
    "LigerFusedLinearCrossEntropyLoss",
    "liger_fused_linear_cross_entropy",
    "LOSS_TYPES",
    "check_dpo_args",
    "FusedLinearCrossEntropyLoss",
    "FusedLinearDPOLoss",
    "LigerCompatibleFusedLinearDPOLoss",
    "LigerFusedLinearDPOLoss",
    "dpo_loss",
    "fused_linear_dpo_loss",
    "linear_cross_entropy",
    "linear_logprobs",
    "resolve",
]

_LAZY = {"patch": "zephyr_kernels.hf_patch", "unpatch": "zephyr_kernels.hf_patch",
         "patch_trl": "zephyr_kernels.trl_patch", "unpatch_trl": "zephyr_kernels.trl_patch"}


def __getattr__(name):
    """``patch`` / ``unpatch`` / ``patch_trl`` / ``unpatch_trl`` import ``transformers`` (and ``trl``); they load on
    first access (PEP 562)."""
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'zephyr_kernels' has no attribute {name!r}")
