"""Model, optimiser, LR schedule and (optionally) DeepSpeed engine construction for the trainer.

The schedule length is the number of *optimiser* steps the packed data gives (see
:mod:`zephyr_fast.training.plan`), not a row count divided by a nominal batch size: packing
changes how many micro-batches an epoch has, and warmup_ratio must be a fraction of real steps.

Each builder takes the config section it reads: ``build_model(cfg.model, ...)``,
``build_engine(cfg.training, ...)``. :func:`check_runtime` refuses, at start and in one line, what
this machine cannot run (bitsandbytes optimisers and QLoRA off CUDA or without bitsandbytes,
quantized weights without LoRA, ``lr_scheduler_kwargs`` the schedule does not take).

Schedules: ``cosine`` / ``linear`` / ``constant`` / ``constant_with_warmup`` are computed here
(HF-Trainer shaped; cosine takes ``num_cycles``); the rest of transformers' names are built by
``transformers.get_scheduler`` with ``lr_scheduler_kwargs`` (e.g. ``cosine_with_min_lr`` with
``{min_lr_rate: 0.1}``).
"""

from __future__ import annotations

import importlib.util
import math
import random
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import transformers

from zephyr_fast.config import ConfigError, ModelConfig, TrainingConfig
from zephyr_fast.config.values import BNB_4BIT_QUANT_TYPES, BNB_OPTIMIZERS, HF_ATTENTION_NAMES, NATIVE_SCHEDULERS
from zephyr_fast.fileio import first_line
from zephyr_fast.model.forward import unwrap_model
from zephyr_fast.model.load import check_model_init, check_supported, load_model, resolve_dtype, tiny_config
from zephyr_fast.objectives import make_stage
from zephyr_fast.training import metrics as M
from zephyr_fast.training.distributed import DistInfo



def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def check_config(cfg) -> None:
    """The recipe checks that need the trainer's code (torch, transformers, the kernels), which
    ``load_config`` cannot make: the stage's own (the kernels' DPO rule, :func:`make_stage`) and a
    random init's ``model_init`` keys. ``train.py`` makes them right after loading; ``run`` and ``plan``
    make them again first thing (:func:`make_stage`, :func:`check_model`). One-line ``ConfigError``s."""
    stage = make_stage(cfg)
    _check_init(cfg.model, stage.model_path(cfg.model.model_name_or_path))


def _check_init(m: ModelConfig, path: Optional[str]) -> None:
    """A random init's ``model_init`` holds only keys its config class reads (the error names where the
    recipe set it)."""
    if not path:
        try:
            check_model_init(m.model_init)
        except ValueError as e:
            raise m.error(str(e)) from None


def check_model(m: ModelConfig, path: Optional[str]) -> str:
    """The model family of ``path`` (only its ``config.json`` is read) or of ``model_init``, refused as
    a one-line ``ConfigError`` when zephyr_fast cannot train it — before any data work."""
    _check_init(m, path)
    try:
        return check_supported(path if path else tiny_config(**m.model_init))
    except ValueError as e:
        raise ConfigError(f"model: {e}") from None


def check_runtime(m: ModelConfig, t: TrainingConfig, device) -> None:
    """Refuse in one ``ConfigError`` line, before any data work, what cannot run on ``device``:
    QLoRA (``load_in_4bit`` / ``load_in_8bit``) and bitsandbytes optimisers off CUDA or without
    bitsandbytes, quantized weights without LoRA or without a checkpoint, and ``lr_scheduler_kwargs``
    that the schedule does not take (the schedule is built once on a dummy parameter)."""
    if m.load_in_4bit and m.load_in_8bit:
        raise ConfigError("load_in_4bit: and load_in_8bit are exclusive; set one of them")
    quant = "load_in_4bit" if m.load_in_4bit else "load_in_8bit" if m.load_in_8bit else None
    if quant:
        if not m.use_peft:
            raise ConfigError(f"{quant}: quantized weights are frozen; QLoRA trains LoRA adapters, set use_peft: true")
        if m.model_name_or_path is None:
            raise ConfigError(f"{quant}: needs model_name_or_path (a checkpoint to quantize), not a random init")
        if m.bnb_4bit_quant_type not in BNB_4BIT_QUANT_TYPES:
            raise ConfigError(f"bnb_4bit_quant_type: must be nf4 | fp4, got {m.bnb_4bit_quant_type!r}")
        _need_bitsandbytes(quant, "QLoRA loading", device, "drop it (full or LoRA training in dtype)")
    if t.optim in BNB_OPTIMIZERS:
        _need_bitsandbytes("optim", repr(t.optim), device, "use optim: adamw_torch")
    build_scheduler(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=t.learning_rate or 1.0), t, 10)


def _need_bitsandbytes(key: str, what: str, device, instead: str) -> None:
    if torch.device(device).type != "cuda":
        raise ConfigError(f"{key}: {what} needs a CUDA device (bitsandbytes); on {torch.device(device).type}, "
                          f"{instead}")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError(f"{key}: {what} needs bitsandbytes, which is not installed; pip install bitsandbytes, "
                          f"or {instead}")


def quantization_config(m: ModelConfig):
    """transformers' ``BitsAndBytesConfig`` for ``load_in_4bit`` / ``load_in_8bit`` (None otherwise); the
    4-bit compute dtype is the model dtype (as TRL's ``get_quantization_config``)."""
    if m.load_in_4bit:
        return transformers.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type=m.bnb_4bit_quant_type,
            bnb_4bit_use_double_quant=m.use_bnb_nested_quant, bnb_4bit_compute_dtype=resolve_dtype(m.dtype))
    if m.load_in_8bit:
        return transformers.BitsAndBytesConfig(load_in_8bit=True)
    return None


def set_tf32(enabled: Optional[bool]) -> None:
    """``tf32``: TF32 tensor-core matmuls / convolutions on CUDA (None: leave torch's defaults)."""
    if enabled is not None:
        torch.backends.cuda.matmul.allow_tf32 = bool(enabled)
        torch.backends.cudnn.allow_tf32 = bool(enabled)


def attn_backend(name: Optional[str]) -> str:
    """The packed backend an ``attn_implementation`` names: transformers' names (and none) map onto ``auto``."""
    return "auto" if name is None or name in HF_ATTENTION_NAMES else name


def build_model(m: ModelConfig, dist: DistInfo, *, seed: int, path: Optional[str] = None):
    """The policy (or reference) model from ``path`` (a checkpoint), or a random init from ``model_init``."""
    # A checkpoint is loaded inside zero.Init (no rank ever holds the full weights). A random init
    # (tiny CPU runs only) is built whole on every rank from the same seed -- bit-identical to a
    # single-process run -- and deepspeed.initialize partitions it.
    zero3 = dist.ds_config if dist.zero_stage == 3 and path else None
    attn = attn_backend(m.attn_implementation)
    # the same seed on every rank (and in a single process): a random init is identical everywhere
    seed_everything(seed)
    config = None if path else tiny_config(**m.model_init)
    quant = quantization_config(m)  # QLoRA: placed on this rank's device while loading (no .to() after)
    model = load_model(path, config=config, dtype=m.dtype, attn_impl=attn, trust_remote_code=False, zero3=zero3,
                       gradient_checkpointing=m.gradient_checkpointing, liger_ops=m.use_liger_ops,
                       gradient_checkpointing_kwargs=m.gradient_checkpointing_kwargs, quantization_config=quant,
                       device_map={"": str(dist.device)} if quant is not None else None, revision=m.model_revision)
    if m.use_peft:
        from peft import LoraConfig, get_peft_model  # optional dependency: LoRA runs only

        lora = LoraConfig(r=m.lora_r, lora_alpha=m.lora_alpha, lora_dropout=m.lora_dropout,
                          target_modules=list(m.lora_target_modules), task_type="CAUSAL_LM")
        model = get_peft_model(model, lora)
        if quant is not None:  # as TRL: the adapters train in the model dtype, not the quantized storage's
            for p in model.parameters():
                if p.requires_grad:
                    p.data = p.data.to(resolve_dtype(m.dtype))
    if not dist.use_deepspeed and quant is None:
        model = model.to(dist.device)
    return model


def build_optimizer(params, t: TrainingConfig) -> torch.optim.Optimizer:
    """AdamW (the handbook's later recipes) or RMSprop (zephyr-7b-beta's DPO) over trainable params."""
    params = [p for p in params if p.requires_grad]
    decay = [p for p in params if _ndim(p) >= 2]
    no_decay = [p for p in params if _ndim(p) < 2]  # norms and biases are not decayed, as in HF Trainer
    groups = [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    if t.optim in BNB_OPTIMIZERS:
        import bitsandbytes  # optional CUDA-only dependency; check_runtime refused its absence at start

        cls = getattr(bitsandbytes.optim, BNB_OPTIMIZERS[t.optim])
        return cls(groups, lr=t.learning_rate, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_epsilon)
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


def lr_lambda(kind: str, total_steps: int, warmup: int, num_cycles: float = 0.5):
    """Multiplier of the base LR at step ``s`` (0-based, before the s-th update), as transformers'
    schedules of the same name (``constant`` has no warmup there either)."""

    def f(s: int) -> float:
        if kind == "constant":
            return 1.0
        if s < warmup:
            return float(s) / float(max(1, warmup))
        if kind == "constant_with_warmup":
            return 1.0
        progress = float(s - warmup) / float(max(1, total_steps - warmup))
        if kind == "linear":
            return max(0.0, 1.0 - progress)
        if kind == "cosine":
            return max(0.0, 0.5 * (1.0 + math.cos(math.pi * float(num_cycles) * 2.0 * progress)))
        raise ValueError(f"lr_scheduler_type: unsupported {kind!r}")

    return f


def build_scheduler(optimizer, t: TrainingConfig, total_steps: int):
    """The LR schedule over ``total_steps`` optimiser steps; one-line ``ConfigError`` for
    ``lr_scheduler_kwargs`` the schedule does not take (or a transformers schedule's missing ones)."""
    kind, kwargs, warmup = t.lr_scheduler_type, dict(t.lr_scheduler_kwargs or {}), warmup_steps(t, total_steps)
    if kind in NATIVE_SCHEDULERS:
        extra = sorted(set(kwargs) - set(NATIVE_SCHEDULERS[kind]))
        if extra:
            takes = ", ".join(NATIVE_SCHEDULERS[kind]) or "none"
            raise ConfigError(f"lr_scheduler_kwargs: {extra[0]!r} means nothing to lr_scheduler_type {kind!r} "
                              f"(it takes: {takes})")
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(kind, total_steps, warmup, **kwargs))
    try:
        return transformers.get_scheduler(kind, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps,
                                          scheduler_specific_kwargs=kwargs)
    except (TypeError, ValueError) as e:
        first = first_line(e)
        raise ConfigError(f"lr_scheduler_kwargs: {first} (lr_scheduler_type {kind!r})") from None


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
