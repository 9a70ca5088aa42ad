"""One recipe run: setup -> data -> model -> (reference log-probs) -> train -> save.

``run(cfg)`` is the whole trainer for every stage; the stage object (``objectives``) supplies
what differs between objectives, the :class:`~zephyr_fast.training.checkpointer.Checkpointer` all that
the run writes to output_dir (claim, resume, checkpoints, export, summary), and every helper gets only
the config section it reads. In-process: ``run(load_config(path, overrides)) -> summary dict``;
``zephyr_fast/train.py`` is the launch script.
"""

from __future__ import annotations

import time
from typing import Optional

import torch

from zephyr_fast.config import Config, ConfigError
from zephyr_fast.data.chat import load_tokenizer
from zephyr_fast.data.examples import example_indices
from zephyr_fast.model.forward import unwrap_model
from zephyr_fast.objectives import LossModule, make_stage
from zephyr_fast.training import distributed
from zephyr_fast.training.build import (build_engine, build_model, check_model, check_runtime, flops_counter,
                                        peak_tflops, seed_everything, set_tf32)
from zephyr_fast.training.checkpointer import Checkpointer, RunIdentity
from zephyr_fast.training.loop import LoopState, TrainLoop
from zephyr_fast.training.metrics import MetricLogger, check_report_to, wandb_settings
from zephyr_fast.training.plan import Batching, make_plan, prepare
from zephyr_fast.training.reference import ReferencePass, ref_summary, reference_identity


def run(cfg: Config, *, stop_after: Optional[int] = None, return_model: bool = False) -> dict:
    """Run the recipe's stage; returns a summary (throughput, final metrics, output paths).

    ``stop_after``: stop once that many optimiser steps are done (after any checkpoint due at that
    step), as if the job were killed -- resume it with ``resume_from_checkpoint="auto"``.
    ``return_model``: add the trained transformers model under ``"model"`` (in-process callers).
    """
    # ---- setup -------------------------------------------------------------------------------
    t0 = time.time()
    dist, log = setup(cfg)
    checkpointer = Checkpointer(cfg, dist, log)
    with checkpointer.claim():  # one writer per output_dir, for the whole run
        return _run(cfg, dist, checkpointer, log, t0, stop_after=stop_after, return_model=return_model)


def _run(cfg: Config, dist, checkpointer: Checkpointer, log, t0: float, *, stop_after: Optional[int],
         return_model: bool) -> dict:
    t, m = cfg.training, cfg.model
    stage = make_stage(cfg)
    # what cannot run is refused in one line before any data work: the model family, QLoRA / bitsandbytes
    # off CUDA, the schedule's kwargs, the reporters, the Hub (push_to_hub: token, reachability, repo)
    check_model(m, stage.model_path(m.model_name_or_path))
    check_runtime(m, t, dist.device)
    check_report_to(t.report_to)
    checkpointer.check_hub()
    tokenizer = recipe_tokenizer(cfg)

    # ---- data --------------------------------------------------------------------------------
    data = prepare(cfg.data, stage, tokenizer, batching(cfg, stage, dist.world_size), log=log)
    if stage.trains and t.eval_strategy == "no":
        data["test"] = None  # no evaluation: no test-split reference pass either
    timeline = {"start": t0, "data": time.time()}

    # ---- model -------------------------------------------------------------------------------
    path = stage.model_path(m.model_name_or_path)
    model = build_model(m, dist, seed=t.seed, path=path)
    timeline["model"] = time.time()
    # wall times (time.time()) of the run's phases: where a whole run's seconds went
    summary = {"stage": t.stage, "output_dir": t.output_dir, "world_size": dist.world_size,
               "deepspeed": dist.use_deepspeed, "zero_stage": dist.zero_stage, "device": str(dist.device),
               "timeline": timeline}
    reference_logps = None
    if stage.uses_reference:  # fingerprint the weights now, before any training or resume
        reference_logps = reference_pass(cfg, dist, stage, unwrap_model(model), path, data, tokenizer, summary, log)

    # ---- reference log-probs only ------------------------------------------------------------
    if not stage.trains:
        reference_logps(unwrap_model(build_engine(t, dist, model, 0, train=False).runner))
        summary["runtime_seconds"] = time.time() - t0
        timeline["end"] = t0 + summary["runtime_seconds"]
        checkpointer.write_summary(summary)
        return summary

    # ---- train, then the final model ---------------------------------------------------------
    lm, state, plan = _train(cfg, dist, stage, model, data, reference_logps, checkpointer, tokenizer,
                             stop_after=stop_after, log=log)
    summary.update(state.summary(stage, plan))
    if t.load_best_model_at_end and state.best and summary["finished"]:
        summary.update(checkpointer.load_best(state))
    timeline["epochs"] = state.epoch_ends
    summary["runtime_seconds"] = time.time() - t0
    if summary["finished"] and t.save_final_model:
        summary.update(checkpointer.export(summary))
    timeline["end"] = time.time()
    checkpointer.write_summary(summary)
    if return_model:
        summary["model"] = unwrap_model(lm.model)
    return summary


def batching(cfg: Config, stage, world_size: int) -> Batching:
    """The train split's batching (``batch_by``) for this recipe, stage and world size."""
    t = cfg.training
    return Batching.resolve(cfg.data, stage, per_device_train_batch_size=t.per_device_train_batch_size,
                            per_device_eval_batch_size=t.per_device_eval_batch_size,
                            gradient_accumulation_steps=t.gradient_accumulation_steps, packing=t.packing, seed=t.seed,
                            world_size=world_size)


def setup(cfg: Config) -> tuple:
    """``(DistInfo, log)``: process group / device, the config's notices, TF32, seeds."""
    t, m = cfg.training, cfg.model
    dist = distributed.setup(t, bf16=t.bf16 or m.dtype == "bfloat16")
    log = print if dist.is_main else (lambda *a, **k: None)
    for notice in cfg.notices:  # keys accepted without effect, defaults that differ from TRL's
        log(f"note: {notice}")
    set_tf32(t.tf32)
    if m.use_peft and dist.zero_stage == 3:
        raise ConfigError(f"{cfg.source}: use_peft: LoRA runs use ZeRO-2 or one process (frozen base weights need "
                          f"no partitioning); pass --deepspeed=recipes/deepspeed/zero2.json")
    seed_everything(t.seed)
    return dist, log


def recipe_tokenizer(cfg: Config):
    """The recipe's tokenizer (``eos_token`` replaced as TRL does); a bad ``eos_token`` or an unreachable /
    missing tokenizer is one line."""
    m = cfg.model
    try:
        return load_tokenizer(m.tokenizer_name_or_path or m.model_name_or_path, cfg.data.chat_template,
                              revision=m.model_revision, eos_token=m.eos_token)
    except (ValueError, FileNotFoundError) as e:
        raise ConfigError(f"{cfg.source}: {e}") from None


def reference_pass(cfg: Config, dist, stage, core, path, data: dict, tokenizer, summary: dict, log):
    """``net -> {split: RefLogps}``: the reference pass of these weights (``core``, fingerprinted now:
    they *are* the reference weights), cached or computed; adds its entries to ``summary``."""
    t, m = cfg.training, cfg.model
    # the reference model's identity: these weights, or the ref_model_name_or_path whose cache stage
    # ref_logps wrote (computed once on rank 0, broadcast)
    reference = ReferencePass.configure(cfg.dpo, cfg.data, output_dir=t.output_dir, dtype=m.dtype, seed=t.seed,
                                        impl=t.kernel_impl)
    identity = None if reference.reference_free else reference_identity(stage, m, path=path, model=core,
                                                                         seed=t.seed)

    def reference_logps(net) -> dict:
        refs = reference.run(net, data, tokenizer, identity, dist=dist, log=log)
        summary.update(ref_summary(refs))
        summary["timeline"]["reference"] = time.time()
        return refs

    return reference_logps


def _train(cfg: Config, dist, stage, model, data: dict, reference_logps, checkpointer: Checkpointer, tokenizer, *,
           stop_after, log) -> tuple:
    """Plan, optimiser, reference log-probs, resume, then the loop; ``(loss_module, state, plan)``."""
    t = cfg.training
    try:
        plan = make_plan(data["train"].schedule, world_size=dist.world_size, grad_accum=t.gradient_accumulation_steps,
                         num_train_epochs=t.num_train_epochs, max_steps=t.max_steps)
    except ConfigError as e:  # too little data for the recipe's batch: one line naming the recipe
        raise ConfigError(f"{cfg.source}: {e}") from None
    log(f"{t.stage}: {plan.total_steps} optimiser steps ({plan.steps_per_epoch}/epoch) of {plan.per_step} "
        f"micro-batches (world {dist.world_size} x accumulation {t.gradient_accumulation_steps})")
    lm = LossModule(model, stage)
    opt = build_engine(t, dist, lm, plan.total_steps)
    refs = reference_logps(unwrap_model(lm.model)) if reference_logps is not None else {}
    for split, ref in refs.items():  # every example has its reference log-probs: checked once, before the loop
        ref.lookup(torch.from_numpy(example_indices(data[split].examples)))
    step, best = checkpointer.resume(opt, RunIdentity(cfg, data["train"].rows), tokenizer)
    logger = MetricLogger(t.output_dir, enabled=dist.is_main, report_to=t.report_to,
                          resume=checkpointer.resumed_from is not None, wandb=wandb_settings(t),
                          run_config=cfg.to_dict())
    loop = TrainLoop(t, stage, dist, opt, plan, data["train"], refs.get("train"), logger, checkpointer,
                     flops_counter(lm.model), peak_tflops(t, dist), eval_split=data["test"],
                     eval_refs=refs.get("test"), log=log)
    state = loop.run(LoopState(step=step, best=best), stop_after)
    logger.close()
    state.metrics_path = logger.path
    return lm, state, plan
