"""The trainer's side of the data layer: rows -> examples -> packed micro-batches, per split.

Tokenisation and packing run identically on every rank (they are deterministic given the seed and
cheap next to training), so every rank knows every micro-batch's token / target / pair counts and
the loss denominators need no communication.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from zephyr_fast.config import Config
from zephyr_fast.training.plan import MicroStats, micro_stats


@dataclass
class SplitData:
    name: str
    rows: object
    examples: list
    batches: list
    stats: list = field(default_factory=list)
    report: str = ""
    packing: str = ""

    @property
    def tokens(self) -> int:
        return sum(s.tokens for s in self.stats)


def micro_tokens(cfg: Config) -> int:
    """Token budget of one packed micro-batch (``data.max_tokens_per_batch``; derived from
    ``per_device_train_batch_size * max_length`` (x2 for DPO) when the recipe does not set it)."""
    return cfg.data.max_tokens_per_batch


def tokenize_split(cfg: Config, rows, tokenizer, name: str):
    from zephyr_fast.data import preference, sft

    d = cfg.data
    common = dict(max_length=d.max_length, add_empty_system=d.auto_insert_empty_system_msg,
                  skip_invalid_rows=d.skip_invalid_rows, dataset_name=name)
    if cfg.training.stage == "sft":
        return sft.tokenize_sft(rows, tokenizer, assistant_only_loss=d.assistant_only_loss, **common)
    return preference.build_dpo_examples(rows, tokenizer, max_prompt_length=d.max_prompt_length, **common)


def pack_split(cfg: Config, examples: list, max_tokens: int, *, seed: int, num_shards: int = 1):
    """Packed micro-batches (a multiple of ``num_shards``, so no micro-batch is dropped) and stats."""
    from zephyr_fast.data import packing

    if cfg.training.stage == "sft":
        out = packing.pack_sft(examples, max_tokens, seed=seed, overlong=cfg.data.overlong, num_shards=num_shards)
    else:
        out = packing.pack_dpo(examples, max_tokens, layout=cfg.data.dpo_layout, seed=seed, num_shards=num_shards)
    return list(out), getattr(out, "stats", None)


def prepare(cfg: Config, tokenizer, *, world_size: int = 1, log=print) -> dict:
    """``{"train": SplitData, "test": SplitData | None}`` for the recipe's stage."""
    from zephyr_fast.data.loading import load_rows

    rows = load_rows(cfg.data)
    out: dict = {"train": None, "test": None}
    for split in ("train", "test"):
        r = rows.get(split)
        if r is None or len(r) == 0:
            continue
        examples, report = tokenize_split(cfg, r, tokenizer, f"{split}")
        if not examples:
            raise ValueError(f"data ({split}): no usable examples after tokenisation: {report}")
        budget = micro_tokens(cfg)
        # train: a whole number of optimiser steps' worth of micro-batches; eval: one per rank at least
        shards = world_size * (cfg.training.gradient_accumulation_steps if split == "train" else 1)
        batches, pstats = pack_split(cfg, examples, budget, seed=cfg.training.seed, num_shards=shards)
        stats: list[MicroStats] = [micro_stats(b) for b in batches]
        out[split] = SplitData(split, r, examples, batches, stats, str(report), str(pstats or ""))
        log(f"data ({split}): {report}")
        log(f"data ({split}): {pstats}" if pstats else f"data ({split}): {len(batches)} micro-batches")
    if out["train"] is None:
        raise ValueError("data: the train split is empty")
    return out

