"""One recipe run: setup -> data -> model -> (reference log-probs) -> train -> save.

``run(cfg)`` is the whole trainer for every stage; the stage object (``training/stages``) supplies
what differs between objectives, and every helper gets only the config section it reads. In-process:
``run(load_config(path, overrides)) -> summary dict``; ``zephyr_fast/train.py`` is the launch script.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import time
from typing import Optional

import torch

from zephyr_fast.fileio import atomic_open
from zephyr_fast.config import Config, ConfigError, config_hash
from zephyr_fast.data.chat import load_tokenizer
from zephyr_fast.data.identity import rows_digest
from zephyr_fast.outputs import OutputError, OutputLock, claim_folder
from zephyr_fast.model.forward import unwrap_model
from zephyr_fast.training import checkpoint as ckpt
from zephyr_fast.training import distributed
from zephyr_fast.training import hub
from zephyr_fast.training.build import (build_engine, build_model, check_model, check_runtime, flops_counter,
                                        peak_tflops, seed_everything, set_tf32)
from zephyr_fast.training.loop import LoopState, TrainLoop
from zephyr_fast.training.metrics import MetricLogger, check_report_to, read_metrics, wandb_settings, write_jsonl
from zephyr_fast.training.plan import Batching, make_plan, prepare
from zephyr_fast.training.reference import ReferencePass, ref_summary, reference_identity
from zephyr_fast.training.stages import LossModule, make_stage


def run(cfg: Config, *, stop_after: Optional[int] = None, return_model: bool = False) -> dict:
    """Run the recipe's stage; returns a summary (throughput, final metrics, output paths).

    ``stop_after``: stop once that many optimiser steps are done (after any checkpoint due at that
    step), as if the job were killed -- resume it with ``resume_from_checkpoint="auto"``.
    ``return_model``: add the trained transformers model under ``"model"`` (in-process callers).
    """
    # ---- setup -------------------------------------------------------------------------------
    t0 = time.time()
    dist, log = _setup(cfg)
    with _claim(cfg, dist):  # one writer per output_dir, for the whole run
        return _run(cfg, dist, log, t0, stop_after=stop_after, return_model=return_model)


def _run(cfg: Config, dist, log, t0: float, *, stop_after: Optional[int], return_model: bool) -> dict:
    t, m = cfg.training, cfg.model
    stage = make_stage(cfg)
    # what cannot run is refused in one line before any data work: the model family, QLoRA / bitsandbytes
    # off CUDA, the schedule's kwargs, the reporters, the Hub (push_to_hub: token, reachability, repo)
    check_model(m, stage.model_path(m.model_name_or_path))
    check_runtime(m, t, dist.device)
    check_report_to(t.report_to)
    hub_target = hub.check(t, t.output_dir) if dist.is_main else None
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
        reference_logps = _reference(cfg, dist, unwrap_model(model), path, data, tokenizer, summary, log)

    # ---- reference log-probs only ------------------------------------------------------------
    if not stage.trains:
        reference_logps(unwrap_model(build_engine(t, dist, model, 0, train=False).runner))
        summary["runtime_seconds"] = time.time() - t0
        timeline["end"] = t0 + summary["runtime_seconds"]
        _write_summary(t.output_dir, dist, summary, log)
        return summary

    # ---- train and save ----------------------------------------------------------------------
    lm, state, plan, opt = _train(cfg, dist, stage, model, data, reference_logps, hub_target, tokenizer,
                                  stop_after=stop_after, log=log)
    summary.update(_train_summary(stage, state, plan))
    if t.load_best_model_at_end and state.best and summary["finished"]:
        summary.update(_load_best(cfg, dist, lm, opt, state, log))
    timeline["epochs"] = state.epoch_ends
    summary["runtime_seconds"] = time.time() - t0
    if summary["finished"] and t.save_final_model:
        ckpt.export_final(t.output_dir, cfg=cfg, dist=dist, model=lm.model if m.use_peft else unwrap_model(lm.model),
                          tokenizer=tokenizer, engine=opt.engine, results=_jsonable(summary))
        summary["model_dir"] = t.output_dir
        if dist.is_main and hub_target is not None:
            hub.push_final(hub_target, t.output_dir)
            summary["hub_repo"] = hub_target.repo_id
    timeline["end"] = time.time()
    _write_summary(t.output_dir, dist, summary, log)
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


def _setup(cfg: Config) -> tuple:
    """``(DistInfo, log)``: process group / device, the output folder with the resolved config, seeds."""
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


def _claim(cfg: Config, dist):
    """Rank 0 claims output_dir (:func:`zephyr_fast.outputs.claim_folder`: not an input, not a foreign
    folder, one writer) and writes the resolved config there; a refusal is raised on every rank."""
    t, lock, error = cfg.training, contextlib.nullcontext(), None
    if dist.is_main:
        try:
            lock = claim_folder(t.output_dir, "train", inputs=run_inputs(cfg), overwrite=t.overwrite_output_dir)
            _check_earlier_checkpoints(t)
            cfg.save(os.path.join(t.output_dir, "config.yaml"))
        except OutputError as e:
            if isinstance(lock, OutputLock):
                lock.release()
            error = str(e)
    errors = [e for e in distributed.gather_objects(error, dist.world_size) if e]
    if errors:
        raise OutputError(errors[0])
    return lock


def run_inputs(cfg: Config) -> dict:
    """The run's local inputs (what output_dir must not be): model, tokenizer, data files, configs."""
    m, d = cfg.model, cfg.data
    ids = list(d.dataset_mixer or {}) + [s.id for s in (d.dataset_mixture.datasets if d.dataset_mixture else [])]
    return {"model_name_or_path": m.model_name_or_path, "tokenizer_name_or_path": m.tokenizer_name_or_path,
            "ref_model_name_or_path": getattr(cfg.dpo, "ref_model_name_or_path", None),
            "deepspeed": cfg.training.deepspeed, **{f"dataset {i}": i for i in ids}}


def _check_earlier_checkpoints(t) -> None:
    """A fresh run (no resume) next to an earlier run's checkpoints would rotate them away: refused
    unless ``overwrite_output_dir``."""
    found = ckpt.list_checkpoints(t.output_dir)
    if found and not t.resume_from_checkpoint and not t.overwrite_output_dir:
        raise OutputError(f"output_dir {t.output_dir}: holds an earlier run's checkpoints ({os.path.basename(found[-1])}"
                          f"{f' and {len(found) - 1} more' if len(found) > 1 else ''}); resume with "
                          "--resume_from_checkpoint=auto, pass --overwrite_output_dir=true to start afresh (they "
                          "will be rotated away), or use a new output_dir")


def recipe_tokenizer(cfg: Config):
    """The recipe's tokenizer (``eos_token`` replaced as TRL does); a bad ``eos_token`` or an unreachable /
    missing tokenizer is one line."""
    m = cfg.model
    try:
        return load_tokenizer(m.tokenizer_name_or_path or m.model_name_or_path, cfg.data.chat_template,
                              revision=m.model_revision, eos_token=m.eos_token)
    except (ValueError, FileNotFoundError) as e:
        raise ConfigError(f"{cfg.source}: {e}") from None


def _reference(cfg: Config, dist, core, path, data: dict, tokenizer, summary: dict, log):
    """``net -> {split: RefLogps}``: the reference pass of these weights (``core``, fingerprinted now:
    they *are* the reference weights), cached or computed; adds its entries to ``summary``."""
    t, m = cfg.training, cfg.model
    # the reference model's identity: these weights, or the ref_model_name_or_path whose cache stage
    # ref_logps wrote (computed once on rank 0, broadcast)
    reference = ReferencePass.configure(cfg.dpo, cfg.data, output_dir=t.output_dir, dtype=m.dtype, seed=t.seed,
                                        impl=t.kernel_impl)
    identity = None if reference.reference_free else reference_identity(t.stage, cfg.dpo, m, path=path, model=core,
                                                                         seed=t.seed)

    def reference_logps(net) -> dict:
        refs = reference.run(net, data, tokenizer, identity, dist=dist, log=log)
        summary.update(ref_summary(refs))
        summary["timeline"]["reference"] = time.time()
        return refs

    return reference_logps


def _train(cfg: Config, dist, stage, model, data: dict, reference_logps, hub_target, tokenizer, *, stop_after,
           log) -> tuple:
    """Plan, optimiser, reference log-probs, resume, then the loop; ``(loss_module, state, plan, opt)``."""
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
        ref.lookup(torch.tensor([ex["index"] for ex in data[split].examples], dtype=torch.int64))
    identity = RunIdentity(cfg, data["train"].rows)
    state, logger = _resume(cfg, dist, lm, opt, log, identity)

    def save(step: int, extra: dict) -> str:
        st = {"stage": t.stage, **identity.state(), "epoch": step / plan.steps_per_epoch,
              "last_metrics": state.last_metrics, **extra}
        best = os.path.join(t.output_dir, f"checkpoint-{state.best['step']}") if state.best else None
        path = ckpt.save_checkpoint(t.output_dir, step, dist=dist, model=lm, optimizer=opt.optimizer,
                                    scheduler=opt.scheduler, engine=opt.engine, state={**st, "best": state.best},
                                    total_limit=t.save_total_limit, tokenizer=tokenizer, protect=best)
        log(f"checkpoint: {path}")
        if dist.is_main:
            hub.push_checkpoint(hub_target, t.output_dir, path)
        return path

    loop = TrainLoop(t, stage, dist, opt, plan, data["train"], refs.get("train"), logger, save,
                     flops_counter(lm.model), peak_tflops(t, dist), eval_split=data["test"],
                     eval_refs=refs.get("test"), log=log)
    state = loop.run(state, stop_after)
    logger.close()
    state.metrics_path = logger.path
    return lm, state, plan, opt


def _load_best(cfg: Config, dist, lm, opt, state, log) -> dict:
    """load_best_model_at_end: the best saved step's weights become the run's (the last step's already are
    when it was the best); the summary names them as HF's trainer state does."""
    t, step = cfg.training, state.best["step"]
    path = os.path.join(t.output_dir, f"checkpoint-{step}")
    if step != state.step:
        ckpt.load_checkpoint(path, dist=dist, model=lm, optimizer=opt.optimizer, scheduler=opt.scheduler,
                             engine=opt.engine)
        log(f"load_best_model_at_end: {t.metric_for_best_model}={state.best['metric']:.6g} at step {step}: "
            f"the final model is {path}'s")
    return {"best_model_checkpoint": path if step != state.step else t.output_dir,
            "best_metric": state.best["metric"], "best_step": step}


def _resume(cfg: Config, dist, lm, opt, log, identity: "RunIdentity") -> tuple:
    """``(LoopState, MetricLogger)``: restored from ``resume_from_checkpoint`` when set, else fresh.

    The checkpoint is verified against its manifest; a changed config or train data is refused unless
    ``resume_allow_changes``, a step counter that disagrees with the scheduler always (one line each)."""
    t = cfg.training
    state = LoopState()
    resume = ckpt.resolve_resume(t.resume_from_checkpoint, t.output_dir)
    if resume:
        restored = ckpt.load_checkpoint(resume, dist=dist, model=lm, optimizer=opt.optimizer, scheduler=opt.scheduler,
                                        engine=opt.engine)
        state.step = _check_step(resume, restored, opt.scheduler)
        state.best = restored.get("best") or {}
        changes = identity.changes(restored)
        if changes and not t.resume_allow_changes:
            raise ckpt.CheckpointError(f"{resume}: {'; '.join(changes)} since it was written; resume with "
                                       f"--resume_allow_changes=true to accept, or use a new output_dir")
        for change in changes:
            log(f"warning: {resume}: {change} since it was written; resuming anyway (resume_allow_changes)")
        log(f"resumed from {resume} at step {state.step}")
    logger = MetricLogger(t.output_dir, enabled=dist.is_main, report_to=t.report_to, resume=bool(resume),
                          wandb=wandb_settings(t), run_config=cfg.to_dict())
    if resume and dist.is_main:
        _trim_metrics(logger.path, state.step, log)
    return state, logger


def _check_step(path: str, restored: dict, scheduler) -> int:
    """The checkpoint's global_step, refused when the scheduler it restored stepped a different number of times."""
    step = restored.get("global_step")
    last = getattr(scheduler, "last_epoch", step)
    if not isinstance(step, int) or step < 0 or step != last:
        raise ckpt.CheckpointError(f"{path}/trainer_state.json: global_step {step!r} disagrees with scheduler.pt "
                                   f"(stepped {last} times); the checkpoint was edited or mixed from two saves")
    return step


class RunIdentity:
    """What a checkpoint records of the run it belongs to -- the resumable config (``_resume_view``, and
    its hash) and the train split's rows digest -- and what changed since (:meth:`changes`).

    The digest (one pass over the rows) is computed once, at the first save or resume that needs it.
    """

    def __init__(self, cfg: Config, train_rows):
        view = _resume_view(cfg)
        view.training.resume_allow_changes = False  # the opt-in itself is not a change of the run
        self.config, self.config_hash = _flat(view.to_dict()), config_hash(view)
        self._rows, self._digest = train_rows, None

    @property
    def rows_digest(self) -> str:
        if self._digest is None:
            self._digest = rows_digest(self._rows)
        return self._digest

    def state(self) -> dict:
        """The checkpoint's trainer_state entries."""
        return {"config_hash": self.config_hash, "config": self.config, "train_rows_digest": self.rows_digest}

    def changes(self, restored: dict) -> list:
        """One phrase per difference between this run and the checkpoint's ``restored`` trainer_state."""
        out = []
        if restored.get("config_hash") != self.config_hash:
            old = restored.get("config") or {}
            keys = sorted(k for k in set(old) | set(self.config) if old.get(k) != self.config.get(k))
            shown = ", ".join(f"{k} {old.get(k)!r} -> {self.config.get(k)!r}" for k in keys[:3])
            more = f" and {len(keys) - 3} more" if len(keys) > 3 else ""
            out.append(f"the config changed ({shown or 'config hash'}{more})")
        if restored.get("train_rows_digest") != self.rows_digest:
            old = str(restored.get("train_rows_digest"))[:12]
            out.append(f"the train data changed (rows digest {old} -> {self.rows_digest[:12]})")
        return out


def _flat(d: dict, prefix: str = "") -> dict:
    """``{"training": {"seed": 7}}`` -> ``{"training.seed": 7}`` (JSON-safe leaves)."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v and k != "dataset_mixer":
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = json.loads(json.dumps(v, default=str))
    return out


def _train_summary(stage, state: LoopState, plan) -> dict:
    secs = max(state.train_seconds, 1e-9)
    return {
        "global_step": state.step, "total_steps": plan.total_steps, "steps_per_epoch": plan.steps_per_epoch,
        "train_runtime": secs, "train_tokens": state.train_tokens, "train_tokens_per_second": state.train_tokens / secs,
        "metrics": state.last_metrics, "eval_metrics": state.eval_metrics, "train_loss": state.last_metrics.get("loss"),
        "metrics_path": state.metrics_path, **stage.summary_metrics(state.train_pairs, secs),
        "finished": state.step >= plan.total_steps,
    }


# what a resumed run may change without changing what it trains: where it writes and how often it
# logs, evaluates, saves, reports and pushes (every other key must match the checkpoint's)
RESUMABLE_KEYS = ("output_dir", "overwrite_output_dir", "resume_from_checkpoint", "resume_allow_changes", "save_total_limit", "save_steps",
                  "save_strategy", "save_final_model", "logging_steps", "logging_first_step", "eval_strategy",
                  "eval_steps", "per_device_eval_batch_size", "report_to", "run_name", "wandb_project",
                  "wandb_entity", "wandb_run_group", "push_to_hub", "hub_model_id", "hub_strategy",
                  "hub_private_repo", "hub_model_revision", "hub_token", "peak_tflops")


def _resume_view(cfg: Config) -> Config:
    """The config minus the keys a resumed run may legitimately change (:data:`RESUMABLE_KEYS`, the
    reference cache's location)."""
    c = copy.deepcopy(cfg)
    fresh = type(c.training)(stage=c.training.stage)
    for key in RESUMABLE_KEYS:
        setattr(c.training, key, getattr(fresh, key))
    c.dpo.ref_logps_dir = None
    c.source = None
    return c


def _trim_metrics(path: str, step: int, log=print) -> None:
    """Drop metrics logged after the checkpoint we resume from (the interrupted run's tail, including a
    line torn by the kill, with a warning); the file is replaced atomically."""
    if not os.path.exists(path):
        return
    rows, torn = read_metrics(path)
    if torn is not None:
        log(f"warning: {path}: dropped a torn last line (the previous run was interrupted mid-write): {torn[:80]!r}")
    write_jsonl(path, [r for r in rows if r.get("step", 0) <= step])


def _jsonable(d: dict) -> dict:
    return json.loads(json.dumps(d, default=str))


def _write_summary(output_dir: str, dist, summary: dict, log) -> None:
    if dist.is_main:
        with atomic_open(os.path.join(output_dir, "summary.json")) as f:
            json.dump(_jsonable(summary), f, indent=2)
        log(json.dumps({k: v for k, v in _jsonable(summary).items() if not isinstance(v, dict)}, indent=1))
