"""The optimisation loop: packed micro-batches -> ``LossModule`` (forward + fused loss) -> step.

Normalisation (why results do not depend on gradient accumulation or world size): every
micro-batch returns a *sum* (the stage's loss head, ``reduction="sum"``) which is divided by the
global count of its optimiser step -- target tokens (SFT) or pairs (DPO) over every micro-batch and
rank, counted on the host from the step's micro-batches (:mod:`zephyr_fast.training.plan`). The step's
gradient is then exactly the gradient of ``Σ losses / Σ count``; under DeepSpeed,
:class:`~zephyr_fast.training.build.Optimisation` undoes its own accumulation / rank averaging.

Host syncs: one scalar per optimiser step (the loss finiteness check, so a NaN never reaches the
weights), plus the metric all-reduce at logging / eval steps.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from tqdm.auto import tqdm

from zephyr_fast.config import TrainingConfig
from zephyr_fast.config.keys import ConfigError, steps_every
from zephyr_fast.objectives import Stage
from zephyr_fast.training.build import Optimisation
from zephyr_fast.training.checkpointer import Checkpointer
from zephyr_fast.training.distributed import DistInfo, all_reduce_sum, sharded_forwards
from zephyr_fast.training.metrics import MetricLogger, peak_memory_gb
from zephyr_fast.training.plan import SplitData, StepPlan, total


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN/inf; a checkpoint of the last good state was written."""


def _sums_to_vector(loss: torch.Tensor, sums: dict, device) -> tuple:
    """``(keys, all-reduced [loss, *sums] on the host)``: the one sync of a logging / eval step."""
    keys = sorted(sums)
    vec = torch.stack([loss.float().reshape(())] + [sums[k].reshape(()) for k in keys])
    return keys, all_reduce_sum(vec.to(device)).cpu()


def _accumulate(sums: dict, mets: dict) -> None:
    for k, v in mets.items():
        sums[k] = v.detach().float() if k not in sums else sums[k] + v.detach().float()


@dataclass
class Window:
    """Device-side sums over the steps since the last log (no host sync until :meth:`reduce`)."""

    device: torch.device
    loss: Optional[torch.Tensor] = None
    sums: dict = field(default_factory=dict)
    steps: int = 0
    pairs: int = 0
    tokens: int = 0
    flops: float = 0.0
    t0: float = field(default_factory=time.time)

    def add(self, step_loss: torch.Tensor, mets: dict, *, pairs: int, tokens: int, flops: float) -> None:
        self.loss = step_loss if self.loss is None else self.loss + step_loss
        _accumulate(self.sums, mets)
        self.steps += 1
        self.pairs += pairs
        self.tokens += tokens
        self.flops += flops

    def reduce(self) -> dict:
        """Mean loss per step, metric sums per pair (TRL names), over every rank."""
        keys, vec = _sums_to_vector(self.loss, self.sums, self.device)
        out = {"loss": float(vec[0]) / max(self.steps, 1)}
        for i, k in enumerate(keys):
            out[k] = float(vec[i + 1]) / max(self.pairs, 1)
        return out


def _ref(refs, batch, device):
    """``batch``'s reference log-probs (``RefLogps.lookup``, host tensors) on ``device``; None without refs."""
    if refs is None:
        return None
    c, r = refs.lookup(batch.pair_index)
    return c.to(device, non_blocking=True), r.to(device, non_blocking=True)


def evaluate(runner, stage: Stage, split: SplitData, refs, *, dist: DistInfo) -> dict:
    """Loss (and DPO metrics) over the whole eval split, sharded across ranks, ``eval_`` prefixed."""
    batches = [m.batch for m in split.micros]
    results = sharded_forwards(runner, batches, lambda j, b: runner(b, _ref(refs, b, dist.device)), dist=dist)
    loss, sums = torch.zeros((), device=dist.device), {}
    for ls, mets in results:
        loss += ls.float()
        _accumulate(sums, mets)
    keys, vec = _sums_to_vector(loss, sums, dist.device)
    denom = max(total(split.micros, stage.denominator), 1)
    out = {"eval_loss": float(vec[0]) / denom}
    for i, k in enumerate(keys):
        out["eval_" + k] = float(vec[i + 1]) / denom
    return out


@dataclass
class LoopState:
    step: int = 0  # completed optimiser steps
    last_metrics: dict = field(default_factory=dict)
    eval_metrics: dict = field(default_factory=dict)
    train_seconds: float = 0.0
    train_tokens: int = 0
    train_pairs: int = 0
    metrics_path: str = ""
    epoch_ends: list = field(default_factory=list)  # wall time (time.time()) at the end of each epoch of this run
    eval_step: int = -1  # the step eval_metrics were measured at
    best: dict = field(default_factory=dict)  # load_best_model_at_end: {"step", "metric"} of the best save

    def summary(self, stage: Stage, plan: StepPlan) -> dict:
        """The run summary's training entries (``finished``: every planned step is done)."""
        secs = max(self.train_seconds, 1e-9)
        return {
            "global_step": self.step, "total_steps": plan.total_steps, "steps_per_epoch": plan.steps_per_epoch,
            "train_runtime": secs, "train_tokens": self.train_tokens,
            "train_tokens_per_second": self.train_tokens / secs, "metrics": self.last_metrics,
            "eval_metrics": self.eval_metrics, "train_loss": self.last_metrics.get("loss"),
            "metrics_path": self.metrics_path, **stage.summary_metrics(self.train_pairs, secs),
            "finished": self.step >= plan.total_steps,
        }


@dataclass
class TrainLoop:
    """One run's optimiser steps over the step plan, with logging, evaluation and checkpoints.

    Built by :func:`zephyr_fast.training.run.run`; the loop asks ``checkpointer``
    (:class:`~zephyr_fast.training.checkpointer.Checkpointer`) to save when a checkpoint is due
    (collective under DeepSpeed); ``flops(stats) -> FLOPs`` counts a step's training FLOPs for MFU.
    """

    t: TrainingConfig
    stage: Stage
    dist: DistInfo
    opt: Optimisation
    plan: StepPlan
    train: SplitData
    train_refs: object  # RefLogps of the train split, or None
    logger: MetricLogger
    checkpointer: Checkpointer
    flops: Callable
    peak_tflops: Optional[float] = None
    eval_split: Optional[SplitData] = None
    eval_refs: object = None  # RefLogps of the eval split, or None
    log: Callable = print

    def __post_init__(self):
        # logging / eval / save intervals in optimiser steps (a fraction of the run resolved now)
        total_steps = self.plan.total_steps
        self.every = {k: max(steps_every(getattr(self.t, f"{k}_steps"), total_steps), 1)
                      for k in ("logging", "eval", "save")}

    def run(self, state: LoopState, stop_after: Optional[int] = None) -> LoopState:
        """Run optimiser steps ``state.step .. plan.total_steps`` (or until ``stop_after`` steps are done)."""
        plan, dist = self.plan, self.dist
        target = plan.total_steps if stop_after is None else min(plan.total_steps, stop_after)
        bar = tqdm(total=plan.total_steps, initial=state.step, disable=not dist.is_main, desc=self.t.stage, unit="step")
        window = Window(dist.device)
        if self.t.eval_on_start and state.step == 0:
            self._evaluate(state)
        self.opt.module.train()
        while state.step < target:
            micros = plan.step_micro(state.step)
            step_loss, step_mets = self._micro_batches(state, micros, total(micros, self.stage.denominator))
            lr = self.opt.scheduler.get_last_lr()[0]
            grad_norm = self.opt.step()
            state.step += 1
            tokens, pairs = total(micros, "tokens"), total(micros, "pairs")
            window.add(step_loss, step_mets, pairs=pairs, tokens=tokens, flops=self.flops([m.stats for m in micros]))
            state.train_tokens += tokens
            state.train_pairs += pairs
            bar.update(1)
            first = self.t.logging_first_step and state.step == 1
            if state.step % self.every["logging"] == 0 or first or state.step in (plan.total_steps, target):
                state.last_metrics = self._log_window(window, state, lr, grad_norm)
                bar.set_postfix(loss=f"{state.last_metrics['loss']:.4f}")
                window = Window(dist.device)
            t_pause = time.time()
            self._evaluate_and_save(state)
            window.t0 += time.time() - t_pause  # eval and checkpoint time is not training throughput
            if state.step % plan.steps_per_epoch == 0:
                state.epoch_ends.append(time.time())
        bar.close()
        return state

    def _micro_batches(self, state: LoopState, micros: list, denom: int) -> tuple:
        """Forward + backward of this rank's micro-batches of the step after ``state.step``;
        ``(step_loss, metric_sums)``."""
        dist = self.dist
        mine = self.plan.rank_micro(micros, dist.rank)
        step_loss, step_mets = torch.zeros((), device=dist.device), {}
        for k, m in enumerate(mine):
            ls, mets = self.opt.runner(m.batch.to(dist.device), _ref(self.train_refs, m.batch, dist.device))
            loss = ls / max(denom, 1)
            step_loss = step_loss + loss.detach().float()
            _accumulate(step_mets, mets)
            if k == len(mine) - 1:
                self._check_finite(state, step_loss)
            self.opt.backward(loss)
        return step_loss, step_mets

    def _check_finite(self, state: LoopState, step_loss: torch.Tensor) -> None:
        """One scalar sync per optimiser step, before the last backward: a NaN/inf loss must stop the
        run before it reaches the weights, so the checkpoint holds the good state."""
        reduced = all_reduce_sum(step_loss.clone()) if self.dist.world_size > 1 else step_loss
        if not math.isfinite(float(reduced)):
            step = state.step
            self.checkpointer.save(state, epoch=self._epoch(state), extra={"stopped": "non-finite loss"})
            raise NonFiniteLossError(
                f"loss is {float(reduced)} at step {step + 1} (epoch {step // self.plan.steps_per_epoch}); a "
                f"checkpoint of the weights before this step was written to {self.t.output_dir}/checkpoint-{step}. "
                f"Lower learning_rate, check the data, or use float32/bfloat16 instead of float16.")

    def _log_window(self, window: Window, state: LoopState, lr: float, grad_norm) -> dict:
        dist = self.dist
        row = window.reduce()
        if dist.device.type == "cuda":
            torch.cuda.synchronize(dist.device)
        dt = max(time.time() - window.t0, 1e-9)
        row.update({"grad_norm": self.opt.grad_norm(grad_norm), "learning_rate": lr,
                    "epoch": self._epoch(state), "train_tokens_per_second": window.tokens / dt,
                    "peak_memory_gb": peak_memory_gb(dist.device)})
        row.update(self.stage.log_metrics(window.pairs, dt))
        if self.peak_tflops:
            row["mfu"] = window.flops / dt / (self.peak_tflops * 1e12 * dist.world_size)
        state.train_seconds += dt
        self.logger.log(state.step, row)
        return row

    def _evaluate(self, state: LoopState) -> None:
        """Evaluate the eval split (if the run has one) and log it at the current step."""
        if self.eval_split is None:
            return
        ev = evaluate(self.opt.runner, self.stage, self.eval_split, self.eval_refs, dist=self.dist)
        state.eval_metrics, state.eval_step = ev, state.step
        if self.t.load_best_model_at_end and self.t.metric_for_best_model not in ev:  # at the first evaluation
            raise ConfigError(f"metric_for_best_model: {self.t.metric_for_best_model!r} is not an eval metric of "
                              f"this run (it has {', '.join(sorted(ev))})")
        self.logger.log(state.step, ev)
        self.log(f"step {state.step}: " + ", ".join(f"{k}={v:.4f}" for k, v in ev.items()))

    def _evaluate_and_save(self, state: LoopState) -> None:
        t, step, last = self.t, state.step, state.step == self.plan.total_steps
        per_epoch = self.plan.steps_per_epoch
        eval_due = step % self.every["eval"] == 0 if t.eval_strategy == "steps" else step % per_epoch == 0
        if eval_due or last:
            self._evaluate(state)
        if t.save_strategy == "steps":
            save_due = t.save_steps > 0 and step % self.every["save"] == 0
        else:
            save_due = step % per_epoch == 0
        if t.save_strategy != "no" and not last and save_due:
            self._track_best(state)  # first: the checkpoint's state records it and keeps it from pruning
            self.checkpointer.save(state, epoch=self._epoch(state))
        elif last:
            self._track_best(state)

    def _epoch(self, state: LoopState) -> float:
        return state.step / self.plan.steps_per_epoch

    def _track_best(self, state: LoopState) -> None:
        """load_best_model_at_end: remember this step when its eval metric beats the best so far (HF's rule:
        only steps that are saved, and the final one, compete)."""
        t = self.t
        if not t.load_best_model_at_end or state.eval_step != state.step:
            return
        value = state.eval_metrics[t.metric_for_best_model]
        best = state.best.get("metric")
        if best is None or (value > best if t.greater_is_better else value < best):
            state.best = {"step": state.step, "metric": value}
