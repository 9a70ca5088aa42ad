"""zephyr_kernels: fused LM-head log-prob, cross-entropy and DPO losses that never build (N, V) logits.

Public API (``__all__``; contracts in docs/ARCHITECTURE.md):

* the losses, one function per loss (Cut Cross-Entropy's pattern): :func:`linear_logprobs` (per-token /
  per-segment log-probs: DPO policy and reference passes), :func:`linear_cross_entropy` (also Cut
  Cross-Entropy's call, :mod:`zephyr_kernels.cce_compat`), :func:`dpo_loss` (on sequence log-probs),
  :func:`fused_linear_dpo_loss` and its module :class:`FusedLinearDPOLoss`;
* Liger's drop-ins: :class:`LigerFusedLinearCrossEntropyLoss`, :func:`liger_fused_linear_cross_entropy`,
  :class:`LigerFusedLinearCrossEntropyFunction`, :class:`CrossEntropyOutput`, :class:`LigerFusedLinearDPOLoss`,
  :class:`LigerFusedLinearDPOFunction`, :func:`liger_fused_linear_dpo`;
* :func:`patch` — one-line fused loss for a Hugging Face causal LM (:mod:`zephyr_kernels.hf_patch`), also
  through TRL's ``SFTTrainer`` / ``DPOTrainer`` heads; :func:`patch_trl` — every TRL SFT / DPO head
  (:mod:`zephyr_kernels.trl_patch`); ``unpatch`` / ``unpatch_trl`` undo them;
* the enums a caller passes values of: :data:`IMPLS` (``impl="auto" | "triton" | "triton_tiled" | "torch"`` on
  every entry point, :mod:`zephyr_kernels.dispatch`; Cut Cross-Entropy's impl names are mapped there too) and
  :data:`LOSS_TYPES` (``loss_type``), with :func:`check_dpo_args`, the one rule for DPO arguments.

Backends, named after the impl they serve: ``torch_chunked`` (``"torch"``), ``triton_chunked`` (``"triton"``),
``triton_tiled`` (``"triton_tiled"``); what they share: ``backend_common`` and, for the Triton ones,
``triton_common``.  Importing this package touches neither CUDA nor Triton; the Triton backend loads on first
use, and ``transformers`` / ``trl`` only when :func:`patch` / :func:`patch_trl` is first looked up.
"""

import importlib

from zephyr_kernels.cross_entropy import linear_cross_entropy
from zephyr_kernels.dispatch import IMPLS
from zephyr_kernels.dpo import FusedLinearDPOLoss, fused_linear_dpo_loss
from zephyr_kernels.liger_ce import (
    CrossEntropyOutput,
    LigerFusedLinearCrossEntropyFunction,
    LigerFusedLinearCrossEntropyLoss,
    liger_fused_linear_cross_entropy,
)
from zephyr_kernels.liger_compat import LigerFusedLinearDPOFunction, LigerFusedLinearDPOLoss, liger_fused_linear_dpo
from zephyr_kernels.linear_logprobs import linear_logprobs
from zephyr_kernels.losses import LOSS_TYPES, check_dpo_args, dpo_loss

__all__ = [
    "linear_logprobs",
    "linear_cross_entropy",
    "dpo_loss",
    "fused_linear_dpo_loss",
    "FusedLinearDPOLoss",
    "LigerFusedLinearCrossEntropyLoss",
    "liger_fused_linear_cross_entropy",
    "CrossEntropyOutput",
    "LigerFusedLinearCrossEntropyFunction",
    "LigerFusedLinearDPOLoss",
    "LigerFusedLinearDPOFunction",
    "liger_fused_linear_dpo",
    "patch",
    "patch_trl",
    "IMPLS",
    "LOSS_TYPES",
    "check_dpo_args",
]

_LAZY = {"patch": "zephyr_kernels.hf_patch", "unpatch": "zephyr_kernels.hf_patch",
         "patch_trl": "zephyr_kernels.trl_patch", "unpatch_trl": "zephyr_kernels.trl_patch"}


def __getattr__(name):
    """``patch`` / ``unpatch`` / ``patch_trl`` / ``unpatch_trl`` import ``transformers`` (and ``trl``); they load on
    first access (PEP 562)."""
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'zephyr_kernels' has no attribute {name!r}")
