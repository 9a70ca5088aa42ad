"""The run's data plan: how the train split becomes optimiser steps, which micro-batches each rank
runs at each step, and the global loss denominators.

Two ways to batch the train split (``batch_by``, resolved by :meth:`Batching.resolve`):

* ``examples`` (default for DPO, and for SFT with ``packing: false``): exactly
  ``per_device_train_batch_size`` examples per micro-batch, so one optimiser step holds exactly
  ``per_device_train_batch_size x gradient_accumulation_steps x world_size`` pairs -- TRL's and the
  paper's count. Epoch ``e`` shuffles the examples with ``seed + e`` and cuts them into steps; the
  last ``n mod per_step`` examples of each epoch's order make a last, smaller step (TRL's and HF
  Trainer's ``dataloader_drop_last: false``; ``drop_last`` leaves them out instead, a different
  remainder each epoch). A step's examples are split into its ``world x accumulation`` micro-batches
  balanced by tokens (longest first, into the lightest micro-batch that still has room) and each
  micro-batch is packed padding-free; a remainder smaller than the step's micro-batch count is
  topped up from the start of the epoch's order so that every micro-batch holds an example (as
  ``DistributedSampler`` pads its last round), and the step's loss is normalised by what it holds. No micro-batch holds more than ``per_device x max_length`` tokens per sequence
  slot, the memory of TRL's padded batch.
* ``tokens`` (packed SFT: TRL's ``packing`` with ``per_device_train_batch_size`` sequences of
  ``max_length``; or any stage with an explicit ``max_tokens_per_batch``): micro-batches are bins of at
  most ``max_tokens_per_batch`` tokens packed once (best-fit decreasing), shuffled per epoch with
  ``seed + epoch`` and cut into steps of ``world x accumulation`` micro-batches. A DPO step then holds
  as many pairs as fit, not the recipe's count; the plan says so.

Either way rank ``r`` runs micro-batches ``[r*G, (r+1)*G)`` of its step, so the global content of a
step depends only on ``world_size * G``: 2 ranks x G=1 see exactly the data of 1 rank x G=2. The
step's loss denominator -- its total target tokens (SFT) or pairs (DPO) over every rank and
micro-batch -- is counted on the host from the same micro-batches, so the hot loop needs no
collective to normalise. Tokenisation and batching are deterministic and run identically on every
rank. The order is a pure function of ``(seed, epoch)``; resuming at global step ``k`` needs only ``k``.

Memory: rows stream through tokenisation and the examples are held compactly
(:mod:`zephyr_fast.data.examples`); token bins are kept as bins of example pieces with their counts,
and a step's micro-batches are built when the step runs (:meth:`TokenSchedule.step`,
:meth:`ExampleSchedule.step`). Every count a plan reports comes from :meth:`step_stats`, which builds
nothing, so :func:`prepare` with ``keep_tokens=False`` (``zephyr-fast plan``) keeps no token ids at all.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
import torch

from zephyr_fast.data.batch import IGNORE_INDEX, PackedBatch
from zephyr_fast.data.examples import DPOExamples, SFTExamples
from zephyr_fast.data.loading import DataConfig, load_rows
from zephyr_fast.data.packing import COUNT_FIELDS, example_counts
from zephyr_fast.config import ConfigError
from zephyr_fast.objectives import Stage


@dataclass
class MicroStats:
    """Host-side counts of one micro-batch."""

    tokens: int  # real (packed) tokens
    targets: int  # tokens with a label (SFT loss denominator)
    pairs: int  # DPO pairs (DPO loss denominator)
    attn_sq: int  # sum of squared attention-segment lengths (PaLM attention FLOPs term)
    examples: int = 0  # examples (pairs / SFT sequences) in it


def micro_stats(batch: PackedBatch) -> MicroStats:
    lens = (batch.cu_seqlens[1:] - batch.cu_seqlens[:-1]).long()
    targets = int((batch.labels != IGNORE_INDEX).sum())
    if batch.extra_labels is not None:
        targets += int((batch.extra_labels != IGNORE_INDEX).sum())
    examples = batch.num_pairs if batch.pair_index is not None else batch.num_segments
    return MicroStats(batch.num_tokens, targets, batch.num_pairs, int((lens * lens).sum()), examples)


@dataclass
class Micro:
    """One micro-batch and its host-side counts."""

    batch: PackedBatch
    stats: MicroStats


class LazyMicro(Micro):
    """A micro-batch of a :class:`~zephyr_fast.data.packing.LazyPackedBatches`: counts now, the batch
    built on each access of :attr:`batch` (not kept: an eval split is not held as tensors between evals)."""

    def __init__(self, batches, k: int, stats: MicroStats):
        self._batches, self._k, self.stats = batches, k, stats

    @property
    def batch(self) -> PackedBatch:
        return self._batches[self._k]


def _stats_of(counts: dict) -> MicroStats:
    return MicroStats(counts["tokens"], counts["targets"], counts["pairs"], counts["attn_sq"], counts["examples"])


def micros_of(batches) -> list:
    """``[Micro]`` of packed batches: built ones with their :func:`micro_stats`, lazy ones (compact
    examples) as :class:`LazyMicro` with the counts packing computed."""
    if hasattr(batches, "counts"):
        return [LazyMicro(batches, k, _stats_of(batches.counts(k))) for k in range(len(batches))]
    return [Micro(b, micro_stats(b)) for b in batches]


def total(micros: list, key: str) -> int:
    """Sum of one :class:`MicroStats` field (``tokens`` | ``targets`` | ``pairs`` | ``attn_sq``) over
    ``micros`` (:class:`Micro` s or bare :class:`MicroStats`)."""
    return sum(getattr(getattr(m, "stats", m), key) for m in micros)


@dataclass
class Batching:
    """How the train split becomes optimiser steps; resolved once from the recipe."""

    by: str  # "examples" | "tokens"
    per_device: int  # examples per micro-batch ("examples")
    max_tokens: int  # token budget of a micro-batch ("tokens")
    eval_max_tokens: int  # token budget of an eval micro-batch (eval results do not depend on it)
    world_size: int
    grad_accum: int
    seed: int
    drop_last: bool = False  # dataloader_drop_last: leave each epoch's remainder out ("examples")

    @property
    def micro_per_step(self) -> int:
        return self.world_size * self.grad_accum

    @classmethod
    def resolve(cls, data: DataConfig, stage: Stage, *, per_device_train_batch_size: int,
                per_device_eval_batch_size: int, gradient_accumulation_steps: int, packing: bool, seed: int,
                world_size: int) -> "Batching":
        """``batch_by: auto`` -> the stage's way (DPO: examples; SFT: tokens, or examples without packing)."""
        by = data.batch_by
        if by == "auto":
            by = stage.batch_by if packing else "examples"
        explicit = data.batch_by == "tokens"
        k = stage.tokens_per_example
        eval_tokens = data.max_tokens_per_batch if explicit else per_device_eval_batch_size * data.max_length * k
        return cls(by, per_device_train_batch_size, data.max_tokens_per_batch, max(eval_tokens, data.max_length * k),
                   world_size, gradient_accumulation_steps, seed, data.dataloader_drop_last)


class _Shuffled:
    """The seeded order of a schedule's ``n`` items in an epoch (``seed + epoch``), kept for its epoch."""

    _cache: tuple = (None, [])

    def _order(self, n: int, epoch: int) -> list:
        if self._cache[0] != epoch:
            g = torch.Generator().manual_seed(self.seed + epoch)
            self._cache = (epoch, torch.randperm(n, generator=g).tolist())
        return self._cache[1]


class TokenSchedule(_Shuffled):
    """``batch_by: tokens``: bins packed once; an epoch is a seeded shuffle of them cut into steps.

    ``batches``: built :class:`PackedBatch` es (kept), or the :class:`~zephyr_fast.data.packing.LazyPackedBatches`
    of compact examples: then only each bin's counts are kept and :meth:`step` builds its step's batches.
    """

    by = "tokens"

    def __init__(self, batches, *, per_step: int, seed: int):
        self.packing = getattr(batches, "stats", None)  # PackingStats of the bins
        self.micros = micros_of(batches)
        self._lazy = batches if hasattr(batches, "counts") else None
        self.per_step, self.seed = per_step, seed
        self.steps_per_epoch = len(self.micros) // per_step  # a ragged last step would break invariance
        self.leftover = len(self.micros) % per_step  # 0: packing makes a multiple of per_step

    def _items(self, epoch: int, s: int) -> list:
        order = self._order(len(self.micros), epoch)
        return order[s * self.per_step:(s + 1) * self.per_step]

    def step(self, epoch: int, s: int) -> list:
        """The micro-batches (all ranks) of step ``s`` of ``epoch`` (lazy bins: built now, host, a few ms)."""
        if self._lazy is None:
            return [self.micros[i] for i in self._items(epoch, s)]
        return [Micro(self._lazy[i], self.micros[i].stats) for i in self._items(epoch, s)]

    def step_stats(self, epoch: int, s: int) -> list:
        """The :class:`MicroStats` of :meth:`step`'s micro-batches, building nothing."""
        return [self.micros[i].stats for i in self._items(epoch, s)]


def balance(items: list, sizes: list, groups: int, per_group: int) -> list:
    """Split ``items`` (``groups * per_group`` of them, or fewer but at least ``groups``: then some lists
    hold fewer) into ``groups`` lists of at most ``per_group`` items with near-equal total
    ``sizes[item]``: longest first, into the lightest group with room (so none stays empty)."""
    out: list = [[] for _ in range(groups)]
    heap = [(0, g) for g in range(groups)]  # (tokens, group) of the groups that still have room
    for i in sorted(items, key=lambda i: (-sizes[i], i)):
        tokens, g = heapq.heappop(heap)
        out[g].append(i)
        if len(out[g]) < per_group:
            heapq.heappush(heap, (tokens + sizes[i], g))
    return out


class ExampleSchedule(_Shuffled):
    """``batch_by: examples``: exactly ``per_micro`` examples per micro-batch, ``per_micro x micro_per_step``
    per optimiser step, balanced by tokens across the step's micro-batches, packed padding-free."""

    by = "examples"

    def __init__(self, examples: list, sizes: list, collate: Callable, *, per_micro: int, micro_per_step: int,
                 seed: int, drop_last: bool = False, counts: Optional[dict] = None):
        """``counts``: per-example :func:`~zephyr_fast.data.packing.example_counts` -- :meth:`step_stats`
        then sums them instead of building the batches (compact examples without token ids have only those)."""
        self.examples, self.sizes, self.collate, self.counts = examples, sizes, collate, counts
        # compact examples hand the collate numpy views (the same values as their dicts, no list copies)
        self._get = examples.arrays if isinstance(examples, (SFTExamples, DPOExamples)) else examples.__getitem__
        self.per_micro, self.micro_per_step, self.seed = per_micro, micro_per_step, seed
        self.per_step = per_micro * micro_per_step  # examples per optimiser step
        full, self.remainder = divmod(len(examples), self.per_step)  # the epoch order's tail
        self.steps_per_epoch = full + (1 if self.remainder and not drop_last else 0)
        self.leftover = self.remainder if drop_last else 0  # examples each epoch leaves out

    def _groups(self, epoch: int, s: int) -> list:
        order = self._order(len(self.examples), epoch)
        items = order[s * self.per_step:(s + 1) * self.per_step]
        if len(items) < self.micro_per_step:  # a small last step: one example per micro-batch at least
            items = items + [order[i % len(order)] for i in range(self.micro_per_step - len(items))]
        return balance(items, self.sizes, self.micro_per_step, -(-len(items) // self.micro_per_step))

    def step(self, epoch: int, s: int) -> list:
        """The micro-batches (all ranks) of step ``s`` of ``epoch``, built now (host, a few ms)."""
        batches = [self.collate([self._get(i) for i in g]) for g in self._groups(epoch, s)]
        return [Micro(b, micro_stats(b)) for b in batches]

    def step_stats(self, epoch: int, s: int) -> list:
        """The :class:`MicroStats` of :meth:`step`'s micro-batches; from ``counts`` without building them."""
        if self.counts is None:
            return [m.stats for m in self.step(epoch, s)]
        return [MicroStats(**{f: int(self.counts[f][g].sum()) for f in COUNT_FIELDS})
                for g in (np.asarray(g, dtype=np.int64) for g in self._groups(epoch, s))]


@dataclass
class SplitData:
    """One split: its rows, the stage's examples, and how they are batched.

    Train: ``schedule`` (a :class:`TokenSchedule` or :class:`ExampleSchedule`). Eval: ``micros``,
    packed once by the eval token budget (an eval average does not depend on how it is batched).
    """

    name: str
    rows: object
    examples: list
    report: str = ""
    packing: str = ""
    schedule: object = None
    micros: list = field(default_factory=list)


def prepare(data: DataConfig, stage: Stage, tokenizer, batching: Batching, *, log=print,
            keep_tokens: bool = True) -> dict:
    """``{"train": SplitData, "test": SplitData | None}``: tokenised, and batched the ``batching`` way.

    ``keep_tokens=False`` (a plan): the examples keep their lengths, not their token ids (see the module
    docstring); the schedules' :meth:`step_stats` and every count are the same, their batches cannot be built.
    """
    rows = load_rows(data)
    out: dict = {"train": None, "test": None}
    for split in ("train", "test"):
        r = rows.get(split)
        if r is None or len(r) == 0:
            continue
        examples, report = stage.tokenize(r, tokenizer, data, split, keep_ids=keep_tokens)
        if not examples:
            raise ValueError(f"data ({split}): no usable examples after tokenisation: {report}")
        log(f"data ({split}): {report}")
        sd = SplitData(split, r, examples, str(report))
        if split == "train":
            sd.schedule = _train_schedule(examples, data, stage, batching)
            sd.packing = describe_schedule(sd.schedule, stage, batching, data.max_length)
        else:
            batches = stage.pack(examples, data, batching.eval_max_tokens, seed=batching.seed,
                                 num_shards=batching.world_size)
            sd.micros = micros_of(batches)
            sd.packing = str(batches.stats)
        log(f"data ({split}): {sd.packing}")
        out[split] = sd
    if out["train"] is None:
        raise ValueError("data: the train split is empty")
    return out


def _train_schedule(examples: list, data: DataConfig, stage: Stage, b: Batching):
    if b.by == "tokens":
        batches = stage.pack(examples, data, b.max_tokens, seed=b.seed, num_shards=b.micro_per_step)
        return TokenSchedule(batches, per_step=b.micro_per_step, seed=b.seed)
    if isinstance(examples, (SFTExamples, DPOExamples)):  # the stage's sizes, from the lengths alone
        counts = example_counts(examples, data.dpo_layout)
        sizes = counts["tokens"].tolist()
    else:
        counts, sizes = None, [stage.size(ex, data) for ex in examples]
    return ExampleSchedule(examples, sizes, lambda exs: stage.collate(exs, data), per_micro=b.per_device,
                           micro_per_step=b.micro_per_step, seed=b.seed, drop_last=b.drop_last, counts=counts)


def describe_schedule(sched, stage: Stage, b: Batching, max_length: int) -> str:
    """One line: what an optimiser step holds, relative to the recipe's batch."""
    name = stage.example_name
    if sched.by == "examples":
        n = len(sched.examples)
        return (f"batch_by examples: {b.per_device} {name}s per micro-batch x {b.grad_accum} accumulation x "
                f"{b.world_size} ranks = {sched.per_step} {name}s per optimiser step, packed padding-free; "
                f"{n} {name}s -> {sched.steps_per_epoch} steps per epoch ({_tail(sched, name)})")
    head = (f"batch_by tokens: {b.micro_per_step} micro-batches of <= {b.max_tokens} tokens per optimiser step "
            f"({sched.packing})")
    if stage.batch_by == "tokens" and b.max_tokens == b.per_device * max_length * stage.tokens_per_example:
        return (f"{head}; a micro-batch is TRL packing's: {b.per_device} packed sequences of max_length "
                f"{max_length}, without padding")
    per_step = [total(sched.step_stats(0, s), "examples") for s in range(sched.steps_per_epoch)]
    return (f"{head}; a step holds {sum(per_step) / max(len(per_step), 1):.1f} {name}s on average "
            f"({min(per_step, default=0)}-{max(per_step, default=0)}), not the recipe's "
            f"per_device_train_batch_size x accumulation x world = {b.per_device * b.micro_per_step}")


def _tail(sched, name: str) -> str:
    if not sched.remainder:
        return "every step full"
    if sched.leftover:
        return f"{sched.leftover} left out per epoch: drop_last"
    return f"the last holds the remaining {sched.remainder} {name}s"


@dataclass
class StepPlan:
    schedule: object  # TokenSchedule | ExampleSchedule
    world_size: int
    grad_accum: int
    total_steps: int

    @property
    def steps_per_epoch(self) -> int:
        return self.schedule.steps_per_epoch

    @property
    def per_step(self) -> int:
        """Micro-batches per optimiser step (all ranks)."""
        return self.world_size * self.grad_accum

    def step_micro(self, step: int) -> list:
        """Every micro-batch (all ranks) of global step ``step`` (0-based): a list of :class:`Micro`."""
        return self.schedule.step(step // self.steps_per_epoch, step % self.steps_per_epoch)

    def rank_micro(self, micros: list, rank: int) -> list:
        return micros[rank * self.grad_accum:(rank + 1) * self.grad_accum]


def make_plan(schedule, *, world_size: int, grad_accum: int, num_train_epochs: float, max_steps: int) -> StepPlan:
    if schedule.steps_per_epoch == 0:
        unit = "examples" if schedule.by == "examples" else "micro-batches"
        have = len(schedule.examples) if schedule.by == "examples" else len(schedule.micros)
        need = schedule.per_step if schedule.by == "examples" else world_size * grad_accum
        raise ConfigError(
            f"not enough data for one optimiser step: the train split has {have} {unit}, one step needs "
            f"{need} (per_device_train_batch_size x gradient_accumulation_steps x world_size); lower them or add data"
        )
    spe = schedule.steps_per_epoch
    steps = max_steps if max_steps > 0 else int(math.ceil(num_train_epochs * spe))
    return StepPlan(schedule, world_size, grad_accum, max(1, steps))
