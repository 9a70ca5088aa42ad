"""The run's data plan: packed splits with host-side counts, which micro-batch each rank runs at
each optimiser step, and the global loss denominators.

:func:`prepare` tokenises and packs each split the stage's way. Tokenisation and packing run
identically on every rank (they are deterministic given the seed and cheap next to training), so
every rank knows every micro-batch's token / target / pair counts (:class:`MicroStats`).

The packed micro-batches of an epoch are shuffled with ``seed + epoch`` and cut into optimiser
steps of ``world_size * gradient_accumulation_steps`` micro-batches; rank ``r`` runs micro-batches
``[r*G, (r+1)*G)`` of its step. The global set of micro-batches in a step therefore depends only on
``world_size * G``, so a run with 2 ranks x G=1 sees exactly the data of 1 rank x G=2, and the
loss denominator of a step -- its total target tokens (SFT) or pairs (DPO) across every rank and
micro-batch -- is counted here, once, on the host, so the hot loop needs no collective to normalise.

The order is a pure function of ``(seed, epoch)``; resuming at global step ``k`` needs nothing but
``k`` (the data position is the step counter).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from zephyr_fast.data.batch import IGNORE_INDEX, PackedBatch
from zephyr_fast.data.loading import DataConfig, load_rows
from zephyr_fast.training.stages import Stage


@dataclass
class MicroStats:
    """Host-side counts of one micro-batch, computed once at setup."""

    tokens: int  # real (packed) tokens
    targets: int  # tokens with a label (SFT loss denominator)
    pairs: int  # DPO pairs (DPO loss denominator)
    attn_sq: int  # sum of squared attention-segment lengths (PaLM attention FLOPs term)


def micro_stats(batch: PackedBatch) -> MicroStats:
    lens = (batch.cu_seqlens[1:] - batch.cu_seqlens[:-1]).long()
    targets = int((batch.labels != IGNORE_INDEX).sum())
    if batch.extra_labels is not None:
        targets += int((batch.extra_labels != IGNORE_INDEX).sum())
    return MicroStats(batch.num_tokens, targets, batch.num_pairs, int((lens * lens).sum()))


@dataclass
class SplitData:
    """One split: its rows, the stage's examples, the packed micro-batches and their host-side counts."""

    name: str
    rows: object
    examples: list
    batches: list  # list[PackedBatch]
    stats: list = field(default_factory=list)  # list[MicroStats], one per micro-batch
    report: str = ""
    packing: str = ""


def prepare(data: DataConfig, stage: Stage, tokenizer, *, seed: int, world_size: int = 1, grad_accum: int = 1,
            log=print) -> dict:
    """``{"train": SplitData, "test": SplitData | None}`` packed into ``data.max_tokens_per_batch`` micro-batches.

    Train packs into a multiple of ``world_size * grad_accum`` micro-batches (whole optimiser
    steps, none dropped), test into a multiple of ``world_size`` (one per rank at least).
    """
    rows = load_rows(data)
    out: dict = {"train": None, "test": None}
    for split in ("train", "test"):
        r = rows.get(split)
        if r is None or len(r) == 0:
            continue
        examples, report = stage.tokenize(r, tokenizer, data, split)
        if not examples:
            raise ValueError(f"data ({split}): no usable examples after tokenisation: {report}")
        shards = world_size * (grad_accum if split == "train" else 1)
        batches = stage.pack(examples, data, data.max_tokens_per_batch, seed=seed, num_shards=shards)
        stats = [micro_stats(b) for b in batches]
        out[split] = SplitData(split, r, examples, list(batches), stats, str(report), str(batches.stats))
        log(f"data ({split}): {report}")
        log(f"data ({split}): {batches.stats}")
    if out["train"] is None:
        raise ValueError("data: the train split is empty")
    return out


@dataclass
class StepPlan:
    num_micro: int
    world_size: int
    grad_accum: int
    seed: int
    steps_per_epoch: int
    total_steps: int

    @property
    def per_step(self) -> int:
        return self.world_size * self.grad_accum

    def epoch_order(self, epoch: int) -> list:
        g = torch.Generator().manual_seed(self.seed + epoch)
        return torch.randperm(self.num_micro, generator=g).tolist()

    def step_micro(self, step: int, order: list) -> list:
        """Indices of every micro-batch (all ranks) in global step ``step`` (0-based) of its epoch."""
        s = step % self.steps_per_epoch
        return order[s * self.per_step:(s + 1) * self.per_step]

    def rank_micro(self, step_indices: list, rank: int) -> list:
        return step_indices[rank * self.grad_accum:(rank + 1) * self.grad_accum]


def make_plan(num_micro: int, *, world_size: int, grad_accum: int, seed: int, num_train_epochs: float,
              max_steps: int) -> StepPlan:
    per_step = world_size * grad_accum
    steps_per_epoch = num_micro // per_step  # a ragged last step would break the invariance above
    if steps_per_epoch == 0:
        raise ValueError(
            f"not enough data for one optimiser step: the data packed into {num_micro} micro-batches, "
            f"but one step needs world_size x gradient_accumulation_steps = {per_step}; lower "
            f"gradient_accumulation_steps or max_tokens_per_batch, or add data"
        )
    total = max_steps if max_steps > 0 else int(math.ceil(num_train_epochs * steps_per_epoch))
    return StepPlan(num_micro, world_size, grad_accum, seed, steps_per_epoch, max(1, total))


def total(stats: list, indices, key: str) -> int:
    """Sum of one :class:`MicroStats` field (``tokens`` | ``targets`` | ``pairs`` | ``attn_sq``) over ``indices``."""
    return sum(getattr(stats[i], key) for i in indices)


def denominators(plan: StepPlan, stats: list, epoch: int, key: str) -> list:
    """Per step of ``epoch``: the global count (``key`` = "targets" | "pairs") over all ranks."""
    order = plan.epoch_order(epoch)
    return [total(stats, plan.step_micro(s, order), key) for s in range(plan.steps_per_epoch)]
