"""zephyr_kernels: fused LM-head log-prob, cross-entropy and DPO losses that never build (N, V) logits.

Public API (contracts in docs/ARCHITECTURE.md):

* :func:`linear_logprobs` — per-token / per-segment log-probs (DPO policy and reference passes).
* :func:`linear_cross_entropy`, :class:`FusedLinearCrossEntropyLoss` (Liger FLCE call signature).
* :func:`dpo_loss`, :func:`fused_linear_dpo_loss`, :class:`FusedLinearDPOLoss`,
  :class:`LigerFusedLinearDPOLoss` (Liger's drop-in; old name
  ``LigerCompatibleFusedLinearDPOLoss``).
* ``impl="auto" | "triton" | "triton_tiled" | "torch"`` on every entry point (:mod:`zephyr_kernels.dispatch`);
  :mod:`zephyr_kernels.reference` holds the naive fp32 references.

Importing this package touches neither CUDA nor Triton; the Triton backend loads on first use.
"""

from zephyr_kernels.cross_entropy import FusedLinearCrossEntropyLoss, linear_cross_entropy
from zephyr_kernels.dispatch import IMPLS, resolve
from zephyr_kernels.dpo import FusedLinearDPOLoss, fused_linear_dpo_loss
from zephyr_kernels.losses import LOSS_TYPES, check_dpo_args, dpo_loss
from zephyr_kernels.liger_compat import LigerCompatibleFusedLinearDPOLoss, LigerFusedLinearDPOLoss
from zephyr_kernels.linear_logprobs import linear_logprobs

__all__ = [
    "IMPLS",
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
