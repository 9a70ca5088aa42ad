"""``zephyr-fast plan RECIPE [--key=value ...] [--world_size=N] [--json]``: what a run will do, before it runs.

Resolves the recipe exactly as ``train`` does, loads and tokenises the data (streamed; the examples
keep their lengths, not their token ids, so the plan's memory does not grow with the data: see
``benchmarks/plan_memory.py``), builds the train split's batching (``zephyr_fast.training.plan``) and
prints -- without building the model or touching a GPU -- the stage, the model, the optimiser steps,
examples and tokens per step relative to the recipe's batch, the packing efficiency, the token budget,
a per-GPU memory estimate under ZeRO-2 and ZeRO-3, and the reference-log-prob cache a DPO run will
use (reused or computed).

The memory estimate (per GPU, GiB) is a model, not a measurement:

* model states, ``P`` parameters over ``W`` ranks: bf16 mixed precision keeps bf16 weights (2P) and
  gradients (2P) plus fp32 master weights and optimiser moments (4P + 8P for Adam, 4P + 4P for
  RMSprop); fp32 runs keep 4P + 4P + the moments. ZeRO-2 partitions gradients and optimiser states
  (weights whole on every rank); ZeRO-3 partitions all three (Rajbhandari et al. 2020, Table 1).
* activations of the largest micro-batch, ``T`` tokens, ``L`` layers, width ``D``: per layer about
  ``34 T D`` bytes in bf16 without the attention-score term (Korthikanti et al. 2022, eq. 2, with
  flash/varlen attention); with gradient checkpointing only each layer's input (``2 T D``) is kept
  plus one layer's worth during recompute. The fused LM head never materialises ``T x V`` logits.
"""

from __future__ import annotations

import json
import os
import sys

import torch

from zephyr_fast import redaction
from zephyr_fast.config import ConfigError, load_config
from zephyr_fast.data.validate import DataValidationError
from zephyr_fast.fileio import first_line
from zephyr_fast.model.load import tiny_config
from zephyr_fast.objectives import make_stage
from zephyr_fast.training.build import build_model, check_model
from zephyr_fast.training.distributed import DistInfo
from zephyr_fast.training.plan import make_plan, prepare, total
from zephyr_fast.training.reference import (ReferencePass, StaleRefLogpsError, cache_key, cache_path, read_cache,
                                             reference_identity)
from zephyr_fast.training.run import batching, recipe_tokenizer

GIB = 1024 ** 3
USAGE = "usage: zephyr-fast plan RECIPE.yaml [--key=value ...] [--world_size=N] [--json]"


def model_shape(m, path) -> dict:
    """Parameters, layers and width of the recipe's model from its config alone (meta device)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path, revision=m.model_revision, trust_remote_code=False) if path \
        else tiny_config(**m.model_init)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=False)
    return {"model_type": config.model_type, "parameters": sum(p.numel() for p in model.parameters()),
            "layers": config.num_hidden_layers, "hidden_size": config.hidden_size, "vocab_size": config.vocab_size}


def memory_estimate(shape: dict, *, max_tokens: int, world_size: int, bf16: bool, optim: str,
                    gradient_checkpointing: bool) -> dict:
    """``{"zero2": GiB, "zero3": GiB}`` per GPU (see the module docstring for the model)."""
    p, layers, d = shape["parameters"], shape["layers"], shape["hidden_size"]
    moments = 4 if optim in ("rmsprop", "sgd") else 8
    weights, grads, opt = (2 * p, 2 * p, 4 * p + moments * p) if bf16 else (4 * p, 4 * p, moments * p)
    act_layer = 34 * max_tokens * d * (1 if bf16 else 2)
    acts = (2 * max_tokens * d * (1 if bf16 else 2) * layers + act_layer) if gradient_checkpointing \
        else act_layer * layers
    w = max(world_size, 1)
    return {"zero2": (weights + (grads + opt) / w + acts) / GIB, "zero3": ((weights + grads + opt) / w + acts) / GIB}


def reference_cache(cfg, stage, path, data: dict, tokenizer) -> dict:
    """What the run will do with each split's reference log-probs, decided as the run decides it: the
    same cache key (weights fingerprint, tokenizer, rows, examples, lengths, dtype) read and verified the
    same way -- reused, computed, recomputed, or refused with the run's own one-line reason."""
    d, t = cfg.dpo, cfg.training
    ref = ReferencePass.configure(d, cfg.data, output_dir=t.output_dir, dtype=cfg.model.dtype, seed=t.seed,
                                  impl=t.kernel_impl)
    if ref.reference_free:
        return {"dir": "-", "all": "reference_free: every reference log-prob is 0, nothing is computed"}
    model = None if path else build_model(cfg.model, DistInfo(0, 1, 0, torch.device("cpu"), False), seed=t.seed)
    identity = reference_identity(stage, cfg.model, path=path, model=model, seed=t.seed)
    out = {"dir": ref.cache_dir}
    for name in ("train", "test"):
        split = data.get(name)
        if split is None:
            continue
        key = cache_key(split=name, rows=split.rows, examples=split.examples, tokenizer=tokenizer,
                        weights=identity.weights, dtype=ref.dtype, **ref.lengths)
        out[name] = _cache_verdict(ref, name, key, identity)
    return out


def _cache_verdict(ref: ReferencePass, split: str, key: dict, identity) -> str:
    exists = os.path.exists(cache_path(ref.cache_dir, split))
    try:
        hit = read_cache(ref.cache_dir, split, key, recompute=ref.recompute and identity.computable,
                         log=lambda *a, **k: None)
    except StaleRefLogpsError as e:
        return f"refused at run start: {first_line(e)}"
    if hit is not None:
        return "cached: digest and key verified now, reused"
    if not identity.computable:
        return f"refused at run start: no cache of ref_model_name_or_path={identity.source} (stage ref_logps writes it)"
    return "stale: recomputed at run start (ref_logps_recompute)" if exists else "absent: computed once at run start"


def build_plan(cfg, *, world_size: int = 1, log=lambda *a, **k: None) -> dict:
    """The plan of ``cfg`` at ``world_size`` ranks as a JSON-able dict."""
    t, m, d = cfg.training, cfg.model, cfg.data
    stage = make_stage(cfg)
    path = stage.model_path(m.model_name_or_path)
    check_model(m, path)
    tokenizer = recipe_tokenizer(cfg)
    b = batching(cfg, stage, world_size)
    data = prepare(d, stage, tokenizer, b, log=log, keep_tokens=False)  # counts only: no token ids held
    train = data["train"]
    plan = make_plan(train.schedule, world_size=world_size, grad_accum=t.gradient_accumulation_steps,
                     num_train_epochs=t.num_train_epochs, max_steps=t.max_steps)
    steps = [train.schedule.step_stats(0, s) for s in range(plan.steps_per_epoch)]
    micro_tokens = [mb.tokens for st in steps for mb in st]
    capacity = b.max_tokens if b.by == "tokens" else b.per_device * d.max_length * stage.tokens_per_example
    shape = model_shape(m, path)
    out = {
        "recipe": cfg.source, "stage": t.stage, "model": path or f"random init {m.model_init}", **shape,
        "world_size": world_size, "batch_by": b.by, "batching": train.packing,
        "train_examples": len(train.examples), "eval_examples": len(data["test"].examples) if data["test"] else 0,
        "steps_per_epoch": plan.steps_per_epoch, "total_steps": plan.total_steps,
        "examples_per_step": [min(total(s, "examples") for s in steps), max(total(s, "examples") for s in steps)],
        "recipe_examples_per_step": t.per_device_train_batch_size * t.gradient_accumulation_steps * world_size,
        "tokens_per_step_mean": sum(total(s, "tokens") for s in steps) / len(steps),
        "micro_batch_tokens_max": max(micro_tokens), "micro_batch_token_budget": capacity,
        "packing_efficiency": sum(micro_tokens) / (len(micro_tokens) * capacity),
        "memory_gib_per_gpu": memory_estimate(shape, max_tokens=max(micro_tokens), world_size=world_size,
                                              bf16=t.bf16 or m.dtype == "bfloat16", optim=t.optim,
                                              gradient_checkpointing=m.gradient_checkpointing),
    }
    if stage.uses_reference:
        out["reference_logps"] = reference_cache(cfg, stage, path, data, tokenizer)
    return out


def format_plan(p: dict) -> str:
    lines = [f"recipe:            {p['recipe']}", f"stage:             {p['stage']}",
             f"model:             {p['model']} ({p['model_type']}, {p['parameters'] / 1e6:.1f}M parameters, "
             f"{p['layers']} layers, width {p['hidden_size']}, vocab {p['vocab_size']})",
             f"data:              {p['train_examples']} train / {p['eval_examples']} eval examples",
             f"batching:          {p['batching']}",
             f"steps:             {p['total_steps']} optimiser steps ({p['steps_per_epoch']} per epoch) on "
             f"{p['world_size']} rank(s)",
             f"examples per step: {p['examples_per_step'][0]}-{p['examples_per_step'][1]} "
             f"(recipe: {p['recipe_examples_per_step']})",
             f"tokens per step:   {p['tokens_per_step_mean']:.0f} on average; largest micro-batch "
             f"{p['micro_batch_tokens_max']} of a {p['micro_batch_token_budget']}-token budget "
             f"(packing efficiency {100 * p['packing_efficiency']:.1f}%)",
             "memory per GPU:    ZeRO-2 {zero2:.2f} GiB, ZeRO-3 {zero3:.2f} GiB (estimate)".format(
                 **p["memory_gib_per_gpu"])]
    if "reference_logps" in p:
        r = p["reference_logps"]
        lines.append(f"reference logps:   {r['dir']}: " + "; ".join(f"{k} {v}" for k, v in r.items() if k != "dir"))
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    path, rest = argv[0], argv[1:]
    as_json = "--json" in rest
    world = [a for a in rest if a.startswith("--world_size=")]
    overrides = [a for a in rest if a != "--json" and a not in world]
    try:
        world_size = int(world[-1].split("=", 1)[1]) if world else 1
        p = build_plan(load_config(path, overrides), world_size=world_size)
    except (ConfigError, DataValidationError, ValueError) as e:  # one line, status 2
        print(f"error: {redaction.redact(e)}", file=sys.stderr)
        return 2
    print(json.dumps(p, indent=1) if as_json else format_plan(p))
    return 0


if __name__ == "__main__":
    sys.exit(main())
