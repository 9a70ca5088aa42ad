"""Model, optimiser, schedule and (optionally) DeepSpeed engine construction for the trainer."""

from __future__ import annotations

import random

import numpy as np
import torch

from zephyr_fast import metrics as M
from zephyr_fast.config import Config
from zephyr_fast.training import optim
from zephyr_fast.training.distributed import DistInfo

# transformers' names for attention implementations map onto our registered varlen backends
_ATTN_ALIASES = {"flash_attention_2": "auto", "sdpa": "auto", "eager": "auto", None: "auto"}


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def build_model(cfg: Config, dist: DistInfo, path_override=None):
    """The policy (or reference) model: a checkpoint, or a random init from ``model_init`` (tiny runs)."""
    from zephyr_fast.model.load import load_model, tiny_config

    m = cfg.model
    path = path_override or m.model_name_or_path
    # A checkpoint is loaded inside zero.Init (no rank ever holds the full weights). A random init
    # (tiny CPU runs only) is built whole on every rank from the same seed -- bit-identical to a
    # single-process run -- and deepspeed.initialize partitions it.
    zero3 = dist.ds_config if dist.zero_stage == 3 and path else None
    attn = _ATTN_ALIASES.get(m.attn_implementation, m.attn_implementation)
    # the same seed on every rank (and in a single process): a random init is identical everywhere
    seed_everything(cfg.training.seed)
    config = None if path else tiny_config(**m.model_init)
    model = load_model(path, config=config, dtype=m.dtype, attn_impl=attn, trust_remote_code=False, zero3=zero3,
                       gradient_checkpointing=m.gradient_checkpointing, liger_ops=m.use_liger_ops)
    if m.use_peft:
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(r=m.lora_r, lora_alpha=m.lora_alpha, lora_dropout=m.lora_dropout,
                          target_modules=list(m.lora_target_modules), task_type="CAUSAL_LM")
        model = get_peft_model(model, lora)
    if not dist.use_deepspeed:
        model = model.to(dist.device)
    return model


def core_model(model):
    """The transformers model the forward helpers expect: unwrap DeepSpeed and PEFT wrappers."""
    model = getattr(model, "module", model)
    if hasattr(model, "get_base_model"):  # peft: LoRA layers are injected in place into the base model
        model = model.get_base_model()
    return model


def build_engine(cfg: Config, dist: DistInfo, model, total_steps: int, *, train: bool = True):
    """``(engine | None, optimizer, scheduler)``; DeepSpeed wraps our torch optimiser when enabled."""
    optimizer = scheduler = None
    if train:
        optimizer = optim.build_optimizer(model.parameters(), cfg.training)
        scheduler = optim.build_scheduler(optimizer, cfg.training, total_steps)
    if not dist.use_deepspeed:
        return None, optimizer, scheduler
    import deepspeed

    kwargs = {"model": model, "config": dist.ds_config}
    if optimizer is not None:
        kwargs["optimizer"] = optimizer
    engine, ds_opt, _, _ = deepspeed.initialize(**kwargs)
    return engine, ds_opt or optimizer, scheduler


def peak_tflops(cfg: Config, dist: DistInfo):
    return cfg.training.peak_tflops or M.detect_peak_tflops(dist.device)


def flops_counter(model):
    """``stats list -> training FLOPs`` (PaLM) for the micro-batches of a step."""
    core = core_model(model)
    conf = core.config
    n_params = M.count_matmul_params(core)
    layers, d = conf.num_hidden_layers, conf.hidden_size

    def f(stats) -> float:
        return sum(M.train_flops(n_params, layers, d, s.tokens, s.attn_sq) for s in stats)

    return f
