"""The optimisation loop: packed micro-batches -> logits-free forward -> fused loss -> step.

Normalisation (why results do not depend on gradient accumulation or world size): every
micro-batch returns a *sum* (SFT: summed token NLL via ``linear_cross_entropy(reduction="sum")``;
DPO: summed pair losses via ``FusedLinearDPOLoss(reduction="sum")``) which is divided by the global
count of its optimiser step -- target tokens or pairs over every micro-batch and rank, counted on
the host at setup (:mod:`zephyr_fast.training.plan`). The step's gradient is then exactly the
gradient of ``Σ losses / Σ count``. DeepSpeed divides by ``gradient_accumulation_steps`` in
``engine.backward`` and averages over ranks in its reduce-scatter, so its backward gets the loss
multiplied by ``world_size * gradient_accumulation_steps`` to undo both.

Host syncs: one scalar per optimiser step (the loss finiteness check, so a NaN never reaches the
weights), plus the metric all-reduce at logging / eval steps.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from zephyr_fast import metrics as M
from zephyr_fast.data.batch import loss_inputs
from zephyr_fast.training.distributed import DistInfo, all_reduce_sum

DPO_KEYS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
            "logps/rejected")


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN/inf; a checkpoint of the last good state was written."""


class LossModule(torch.nn.Module):
    """``model`` + the stage's fused loss as one module: ``(batch, ref) -> (loss_sum, metric_sums)``.

    SFT (dSFT, Tunstall et al. 2023 §3):  ``loss_sum = Σ_t −log π(y_t | y_<t)`` over the batch's
    target tokens. DPO (Rafailov et al. 2023, eq. 7; dDPO in Zephyr):
    ``loss_sum = Σ_i −log σ(β [(log π(y_c|x) − log π_ref(y_c|x)) − (log π(y_r|x) − log π_ref(y_r|x))])``
    over the batch's pairs (``loss_type`` / ``label_smoothing`` variants as in ``zephyr_kernels``).
    The caller divides by the step's global token / pair count.

    Args:
        batch: ``PackedBatch`` on the model's device (``input_ids: (N,)``, ``cu_seqlens: (S+1,) int32``).
        ref: DPO only, ``(ref_chosen_logps (P,), ref_rejected_logps (P,))`` fp32 for ``batch.pair_index``.
    Returns:
        ``loss_sum: () fp32`` and a dict of 0-d metric sums over pairs (empty for SFT).

    DeepSpeed wraps *this* module, so the whole packed forward (decoder body, LM-head gather, fused
    loss) runs inside ``engine(...)`` and ZeRO-3's forward/backward hooks see every parameter use.
    """

    def __init__(self, model, cfg):
        super().__init__()
        self.model = model
        self.stage = "sft" if cfg.training.stage == "sft" else "dpo"
        self.impl = cfg.training.kernel_impl
        self.dpo = None
        if self.stage == "dpo":
            from zephyr_kernels import FusedLinearDPOLoss

            d = cfg.dpo
            self.dpo = FusedLinearDPOLoss(beta=d.beta, loss_type=d.loss_type, label_smoothing=d.label_smoothing,
                                          rpo_alpha=d.rpo_alpha, reduction="sum", impl=self.impl)

    def forward(self, batch, ref=None):
        from zephyr_fast.model.forward import forward_hidden, lm_head_weight
        from zephyr_fast.training.build import core_model

        core = core_model(self.model)
        hidden = forward_hidden(core, batch)
        rows, labels, segs = loss_inputs(hidden, batch)
        with lm_head_weight(core) as weight:
            if self.stage == "sft":
                from zephyr_kernels import linear_cross_entropy

                return linear_cross_entropy(rows, weight, labels, reduction="sum", impl=self.impl), {}
            ref_c, ref_r = ref
            return self.dpo(rows, weight, labels, segs, ref_c, ref_r)


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

    def add(self, step_loss: torch.Tensor, mets: dict) -> None:
        self.loss = step_loss if self.loss is None else self.loss + step_loss
        for k, v in mets.items():
            self.sums[k] = v.detach().float() if k not in self.sums else self.sums[k] + v.detach().float()

    def reduce(self, world_size: int) -> dict:
        keys = sorted(self.sums)
        vec = torch.stack([self.loss.float().reshape(())] + [self.sums[k].reshape(()) for k in keys])
        vec = all_reduce_sum(vec.to(self.device)).cpu()  # logging step: the one intended sync
        out = {"loss": float(vec[0]) / max(self.steps, 1)}
        for i, k in enumerate(keys):
            out[k] = float(vec[i + 1]) / max(self.pairs, 1)
        return out


@torch.no_grad()
def evaluate(stage: str, model, split, refs: Optional[list], *, dist: DistInfo) -> dict:
    """Loss (and DPO metrics) over the whole eval split, sharded across ranks, ``eval_`` prefixed."""
    module = getattr(model, "module", model)
    was = module.training
    module.eval()
    n = len(split.batches)
    mine = list(range(dist.rank, n, dist.world_size))
    n_iter = math.ceil(n / dist.world_size)  # equal forwards on every rank (ZeRO-3 collectives)
    loss = torch.zeros((), device=dist.device)
    sums: dict = {}
    for i in range(n_iter):
        real = i < len(mine)
        j = mine[i] if real else 0
        b = split.batches[j].to(dist.device)
        ls, mets = model(b, _ref(refs, j, dist.device))
        if real:
            loss += ls.float()
            for k, v in mets.items():
                sums[k] = sums.get(k, 0.0) + v.float()
    module.train(was)
    keys = sorted(sums)
    vec = all_reduce_sum(torch.stack([loss] + [sums[k].reshape(()) for k in keys])).cpu()
    denom_key = "targets" if stage == "sft" else "pairs"
    denom = sum(getattr(s, denom_key) for s in split.stats)
    out = {"eval_loss": float(vec[0]) / max(denom, 1)}
    for i, k in enumerate(keys):
        out["eval_" + k] = float(vec[i + 1]) / max(denom, 1)
    return out


@dataclass
class LoopState:
    step: int = 0  # completed optimiser steps
    last_metrics: dict = field(default_factory=dict)
    eval_metrics: dict = field(default_factory=dict)
    train_seconds: float = 0.0
    train_tokens: int = 0
    train_pairs: int = 0


def train_loop(*, cfg, dist: DistInfo, model, engine, optimizer, scheduler, stage: str, plan, train,
               train_refs: Optional[list], eval_split=None, eval_refs=None, state: LoopState,
               logger: M.MetricLogger, flops_fn: Callable, peak_tflops: Optional[float],
               save_fn: Callable, stop_after: Optional[int] = None, log=print) -> LoopState:
    """Run optimiser steps ``state.step .. plan.total_steps`` (or until ``stop_after`` steps are done)."""
    from tqdm.auto import tqdm

    t = cfg.training
    denom_key = "targets" if stage == "sft" else "pairs"
    scale = dist.world_size * t.gradient_accumulation_steps if engine is not None else 1
    params = [p for p in model.parameters() if p.requires_grad]
    target = plan.total_steps if stop_after is None else min(plan.total_steps, stop_after)
    bar = tqdm(total=plan.total_steps, initial=state.step, disable=not dist.is_main, desc=t.stage, unit="step")
    window = Window(dist.device)
    order_epoch, order = -1, []
    runner = engine if engine is not None else model  # the LossModule, DeepSpeed-wrapped or not
    model.train()
    while state.step < target:
        step = state.step
        epoch = step // plan.steps_per_epoch
        if epoch != order_epoch:
            order_epoch, order = epoch, plan.epoch_order(epoch)
        idx = plan.step_micro(step, order)
        mine = plan.rank_micro(idx, dist.rank)
        denom = sum(getattr(train.stats[i], denom_key) for i in idx)
        step_tokens = sum(train.stats[i].tokens for i in idx)
        step_loss = torch.zeros((), device=dist.device)
        step_mets: dict = {}
        for k, j in enumerate(mine):
            batch = train.batches[j].to(dist.device)
            ls, mets = runner(batch, _ref(train_refs, j, dist.device))
            loss = ls / max(denom, 1)
            step_loss = step_loss + loss.detach().float()
            for name, v in mets.items():
                step_mets[name] = step_mets.get(name, 0.0) + v.detach().float()
            if k == len(mine) - 1:
                # one scalar sync per optimiser step, before the last backward: a NaN/inf loss must
                # stop the run before it reaches the weights, so the checkpoint holds the good state
                reduced = all_reduce_sum(step_loss.clone()) if dist.world_size > 1 else step_loss
                if not math.isfinite(float(reduced)):
                    save_fn(step, {"stopped": "non-finite loss"})
                    raise NonFiniteLossError(
                        f"loss is {float(reduced)} at step {step + 1} (epoch {epoch}); a checkpoint of the "
                        f"weights before this step was written to {t.output_dir}/checkpoint-{step}. Lower "
                        f"learning_rate, check the data, or use float32/bfloat16 instead of float16.")
            if engine is not None:
                engine.backward(loss * scale)
                engine.step()
            else:
                loss.backward()
        if engine is None:
            max_norm = t.max_grad_norm if t.max_grad_norm > 0 else float("inf")
            grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        else:
            grad_norm = None
        lr = scheduler.get_last_lr()[0]
        scheduler.step()
        state.step += 1
        window.add(step_loss, step_mets)
        window.steps += 1
        window.pairs += sum(train.stats[i].pairs for i in idx)
        window.tokens += step_tokens
        window.flops += flops_fn([train.stats[i] for i in idx])
        state.train_tokens += step_tokens
        state.train_pairs += sum(train.stats[i].pairs for i in idx)
        bar.update(1)

        last = state.step == plan.total_steps
        if state.step % max(t.logging_steps, 1) == 0 or last or state.step == target:
            row = window.reduce(dist.world_size)
            if dist.device.type == "cuda":
                torch.cuda.synchronize(dist.device)
            dt = max(time.time() - window.t0, 1e-9)
            gn = engine.get_global_grad_norm() if engine is not None else float(grad_norm)
            row.update({"grad_norm": float(gn) if gn is not None else float("nan"), "learning_rate": lr,
                        "epoch": state.step / plan.steps_per_epoch,
                        "train_tokens_per_second": window.tokens / dt, "peak_memory_gb": M.peak_memory_gb(dist.device)})
            if stage == "dpo":
                row["train_pairs_per_second"] = window.pairs / dt
            if peak_tflops:
                row["mfu"] = window.flops / dt / (peak_tflops * 1e12 * dist.world_size)
            state.train_seconds += dt
            state.last_metrics = row
            logger.log(state.step, row)
            bar.set_postfix(loss=f"{row['loss']:.4f}")
            window = Window(dist.device)
        t_pause = time.time()
        if eval_split is not None and _due(t, state.step, plan, last):
            ev = evaluate(stage, runner, eval_split, eval_refs, dist=dist)
            state.eval_metrics = ev
            logger.log(state.step, ev)
            log(f"step {state.step}: " + ", ".join(f"{k}={v:.4f}" for k, v in ev.items()))
        if t.save_strategy != "no" and not last and _save_due(t, state.step, plan):
            save_fn(state.step, {})
        window.t0 += time.time() - t_pause  # eval and checkpoint time is not training throughput
    bar.close()
    return state


def _ref(refs, j: int, device):
    if refs is None:
        return None
    c, r = refs[j]
    return c.to(device, non_blocking=True), r.to(device, non_blocking=True)


def _due(t, step: int, plan, last: bool) -> bool:
    if t.eval_strategy == "steps":
        return step % t.eval_steps == 0 or last
    return step % plan.steps_per_epoch == 0 or last  # "epoch"


def _save_due(t, step: int, plan) -> bool:
    if t.save_strategy == "steps":
        return t.save_steps > 0 and step % t.save_steps == 0
    return step % plan.steps_per_epoch == 0  # "epoch"
