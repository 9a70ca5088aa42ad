"""Optimisers and learning-rate schedules, computed on the packed step count.

The schedule length is the number of *optimiser* steps the packed data gives (see
:mod:`zephyr_fast.training.plan`), not a row count divided by a nominal batch size: packing
changes how many micro-batches an epoch has, and warmup_ratio must be a fraction of real steps.
"""

from __future__ import annotations

import math

import torch

from zephyr_fast.config import TrainingConfig


def build_optimizer(params, t: TrainingConfig) -> torch.optim.Optimizer:
    """AdamW (the handbook's later recipes) or RMSprop (zephyr-7b-beta's DPO) over trainable params."""
    params = [p for p in params if p.requires_grad]
    decay = [p for p in params if _ndim(p) >= 2]
    no_decay = [p for p in params if _ndim(p) < 2]  # norms and biases are not decayed, as in HF Trainer
    groups = [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    if t.optim.startswith("adam"):
        # foreach keeps the CPU and CUDA paths identical; fused is CUDA-only and not bitwise-stable
        return torch.optim.AdamW(groups, lr=t.learning_rate, betas=(t.adam_beta1, t.adam_beta2),
                                 eps=t.adam_epsilon)
    if t.optim == "rmsprop":
        # HF Trainer's "rmsprop" is torch RMSprop with default alpha/eps; zephyr-7b-beta used it for DPO
        return torch.optim.RMSprop(groups, lr=t.learning_rate)
    if t.optim == "sgd":
        return torch.optim.SGD(groups, lr=t.learning_rate)
    raise ValueError(f"optim: unsupported {t.optim!r}")


def _ndim(p) -> int:
    return len(p.ds_shape) if hasattr(p, "ds_shape") else p.dim()  # ZeRO-3 params are flat shards


def warmup_steps(t: TrainingConfig, total_steps: int) -> int:
    return t.warmup_steps if t.warmup_steps > 0 else int(math.ceil(t.warmup_ratio * total_steps))


def lr_lambda(kind: str, total_steps: int, warmup: int):
    """Multiplier of the base LR at step ``s`` (0-based, before the s-th update), HF-Trainer shaped."""

    def f(s: int) -> float:
        if s < warmup:
            return float(s) / float(max(1, warmup))
        if kind in ("constant", "constant_with_warmup"):
            return 1.0
        progress = float(s - warmup) / float(max(1, total_steps - warmup))
        if kind == "linear":
            return max(0.0, 1.0 - progress)
        if kind == "cosine":
            return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
        raise ValueError(f"lr_scheduler_type: unsupported {kind!r}")

    return f


def build_scheduler(optimizer, t: TrainingConfig, total_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(t.lr_scheduler_type, total_steps, warmup_steps(t, total_steps))
    )
