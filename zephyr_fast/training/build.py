"""Model, optimiser, LR schedule and (optionally) DeepSpeed engine construction for the trainer.

The schedule length is the number of *optimiser* steps the packed data gives (see
:mod:`zephyr_fast.training.plan`), not a row count divided by a nominal batch size: packing
changes how many micro-batches an epoch has, and warmup_ratio must be a fraction of real steps.

Each builder takes the config section it reads: ``build_model(cfg.model, ...)``,
``build_engine(cfg.training, ...)``.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from zephyr_fast.config import ConfigError, ModelConfig, TrainingConfig
from zephyr_fast.model.forward import unwrap_model
from zephyr_fast.model.load import check_supported, load_model, tiny_config
from zephyr_fast.training import metrics as M
from zephyr_fast.training.distributed import DistInfo

# transformers' names for attention implementations map onto our registered varlen backends
_ATTN_ALIASES = {"flash_attention_2": "auto", "sdpa": "auto", "eager": "auto", None: "auto"}


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def check_model(m: ModelConfig, path: Optional[str]) -> str:
    """The model family of ``path`` (only its ``config.json`` is read) or of ``model_init``, refused as
    a one-line ``ConfigError`` when zephyr_fast cannot train it — before any data work."""
    try:
        return check_supported(path if path else tiny_config(**m.model_init))
    except ValueError as e:
        raise ConfigError(f"model: {e}") from None


def build_model(m: ModelConfig, dist: DistInfo, *, seed: int, path: Optional[str] = None):
    """The policy (or reference) model from ``path`` (a checkpoint), or a random init from ``model_init``."""
    # A checkpoint is loaded inside zero.Init (no rank ever holds the full weights). A random init
    # (tiny CPU runs only) is built whole on every rank from the same seed -- bit-identical to a
    # single-process run -- and deepspeed.initialize partitions it.
    zero3 = dist.ds_config if dist.zero_stage == 3 and path else None
    attn = _ATTN_ALIASES.get(m.attn_implementation, m.attn_implementation)
    # the same seed on every rank (and in a single process): a random init is identical everywhere
    seed_everything(seed)
    config = None if path else tiny_config(**m.model_init)
    model = load_model(path, config=config, dtype=m.dtype, attn_impl=attn, trust_remote_code=False, zero3=zero3,
                       gradient_checkpointing=m.gradient_checkpointing, liger_ops=m.use_liger_ops)
    if m.use_peft:
        from peft import LoraConfig, get_peft_model  # optional dependency: LoRA runs only

        lora = LoraConfig(r=m.lora_r, lora_alpha=m.lora_alpha, lora_dropout=m.lora_dropout,
                          target_modules=list(m.lora_target_modules), task_type="CAUSAL_LM")
        model = get_peft_model(model, lora)
    if not dist.use_deepspeed:
        model = model.to(dist.device)
    return model


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


@dataclass
class Optimisation:
    """How a loss becomes an update: a DeepSpeed engine, or a plain torch optimiser with clipping.

    ``runner`` is what the loop calls on a batch (the engine, or the module itself). DeepSpeed
    divides by ``gradient_accumulation_steps`` in ``engine.backward`` and averages over ranks in its
    reduce-scatter; the loop's loss is already normalised by the step's global count, so ``scale``
    (``world_size * gradient_accumulation_steps``) undoes both.
    """

    module: torch.nn.Module
    engine: Optional[object]
    optimizer: Optional[torch.optim.Optimizer]
    scheduler: Optional[object]
    max_grad_norm: float = 0.0
    scale: int = 1

    @property
    def runner(self):
        return self.engine if self.engine is not None else self.module

    def backward(self, loss: torch.Tensor) -> None:
        """One micro-batch's backward (DeepSpeed steps itself at the accumulation boundary)."""
        if self.engine is not None:
            self.engine.backward(loss * self.scale)
            self.engine.step()
        else:
            loss.backward()

    def step(self):
        """Finish the optimiser step; returns the pre-clipping grad norm (a tensor, or None under DeepSpeed)."""
        grad_norm = None
        if self.engine is None:
            params = [p for p in self.module.parameters() if p.requires_grad]
            max_norm = self.max_grad_norm if self.max_grad_norm > 0 else float("inf")
            grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        return grad_norm

    def grad_norm(self, local) -> float:
        """The last step's grad norm as a float (``local``: what :meth:`step` returned)."""
        gn = self.engine.get_global_grad_norm() if self.engine is not None else local
        return float(gn) if gn is not None else float("nan")


def build_engine(t: TrainingConfig, dist: DistInfo, module, total_steps: int, *, train: bool = True) -> Optimisation:
    """The optimiser and LR schedule over ``module`` (none when ``train`` is off), DeepSpeed-wrapped when enabled."""
    optimizer = scheduler = None
    if train:
        optimizer = build_optimizer(module.parameters(), t)
        scheduler = build_scheduler(optimizer, t, total_steps)
    engine = None
    if dist.use_deepspeed:
        import deepspeed  # optional heavy dependency: only under a launcher

        kwargs = {"model": module, "config": dist.ds_config}
        if optimizer is not None:
            kwargs["optimizer"] = optimizer
        engine, ds_opt, _, _ = deepspeed.initialize(**kwargs)
        optimizer = ds_opt or optimizer
    scale = dist.world_size * t.gradient_accumulation_steps if engine is not None else 1
    return Optimisation(module, engine, optimizer, scheduler, t.max_grad_norm, scale)


def peak_tflops(t: TrainingConfig, dist: DistInfo):
    """Per-device peak for MFU: the recipe's ``peak_tflops``, else detected from the CUDA card (None on CPU)."""
    return t.peak_tflops or M.detect_peak_tflops(dist.device)


def flops_counter(model):
    """``stats list -> training FLOPs`` (PaLM) for the micro-batches of a step."""
    core = unwrap_model(model)
    conf = core.config
    n_params = M.count_matmul_params(core)
    layers, d = conf.num_hidden_layers, conf.hidden_size

    def f(stats) -> float:
        return sum(M.train_flops(n_params, layers, d, s.tokens, s.attn_sq) for s in stats)

    return f
