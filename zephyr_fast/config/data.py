"""The ``data:`` section of a recipe: the dataset mixture, tokenisation and packing keys.

Both alignment-handbook mixture schemas: the old ``dataset_mixer: {id: fraction}`` +
``dataset_splits`` (handbook <= 0.1) and the new ``dataset_mixture: {datasets: [...], seed,
test_split_size}`` (handbook >= 0.2); docs/DATA.md has examples. ``zephyr_fast.data.loading`` reads
the rows these name.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Optional, Union

from zephyr_fast.config.sections import REQUIRED, Section, option
from zephyr_fast.config.values import BATCH_BY, DPO_LAYOUTS, OVERLONG, TRUNCATION_MODES


@dataclass
class DatasetSpec:
    """One entry of ``dataset_mixture.datasets``."""

    id: str = option(REQUIRED, "a .json / .jsonl / .parquet / .arrow file, a folder of <split> files or of "
                          "save_to_disk output, or a hub id")
    config: Optional[str] = option(None, "the hub dataset's config")
    split: str = option("train", "the split to read")
    columns: Optional[list] = option(None, "the columns to keep")
    weight: Optional[float] = option(None, "subsample (< 1) or repeat (> 1) after a seeded shuffle")
    revision: Optional[str] = option(None, "hub branch, tag or commit")


@dataclass
class DatasetMixture:
    """``dataset_mixture``: its datasets, the seed, and the held-out test rows; checked when built."""

    datasets: list = option([], "the datasets (list of DatasetSpec mappings)")
    seed: int = option(0, "seed of the weights' subsampling and of the test split")
    test_split_size: Optional[Union[int, float]] = option(None, "rows (int) or fraction (in (0, 1)) of the "
                                                                "mixed rows held out as the test split")

    def __post_init__(self):
        if not isinstance(self.datasets, (list, tuple)):
            raise ValueError(f"dataset_mixture: datasets must be a list, got {type(self.datasets).__name__}")
        self.datasets = [_spec(d, i) for i, d in enumerate(self.datasets)]
        if self.test_split_size is not None:
            check_test_split_value(self.test_split_size, "dataset_mixture: test_split_size")


def _from_mapping(cls, value, where: str):
    """``cls(**value)``, refusing a non-mapping or an unknown key in one line naming ``where``."""
    if isinstance(value, cls):
        return value
    if not isinstance(value, dict):
        raise ValueError(f"{where}: expected a mapping, got {value!r}")
    names = [f.name for f in fields(cls)]
    unknown = [k for k in value if k not in names]
    if unknown:
        raise ValueError(f"{where}: unknown key {unknown[0]!r} (keys: {', '.join(names)})")
    return cls(**value)


def _spec(value, i: int) -> DatasetSpec:
    """One ``dataset_mixture.datasets`` entry, its ``weight`` a number > 0 (or left out)."""
    spec = _from_mapping(DatasetSpec, value, f"dataset_mixture: datasets[{i}]")
    w = spec.weight
    if w is not None and (isinstance(w, bool) or not isinstance(w, (int, float)) or not w > 0):
        raise ValueError(f"dataset_mixture: datasets[{i}] ({spec.id!r}): weight must be a number > 0, got {w!r}")
    return spec


def _check_mixer(mixer, splits: list, configs: Optional[list]) -> None:
    """The old schema: ``dataset_mixer: {id: fraction >= 0}`` (0: only its test splits are used),
    ``dataset_splits`` each a train or a test split, ``dataset_configs`` one per dataset."""
    if not isinstance(mixer, dict):
        raise ValueError(f"dataset_mixer: expected a mapping {{dataset: fraction}}, got {mixer!r}")
    for ds_id, frac in mixer.items():
        if isinstance(frac, bool) or not isinstance(frac, (int, float)) or not frac >= 0:
            raise ValueError(f"dataset_mixer: the fraction of {ds_id!r} must be a number >= 0, got {frac!r}")
    for split in splits:
        if "train" not in str(split) and "test" not in str(split):
            raise ValueError(f"dataset_splits: split {split!r} must contain 'train' or 'test' (train splits are "
                             "trained on, test splits evaluated)")
    if configs is not None and len(configs) != len(mixer):
        raise ValueError(f"dataset_configs: must have one entry per dataset_mixer entry ({len(mixer)}), "
                         f"got {len(configs)}")


def check_test_split_value(size, where: str = "dataset_mixture.test_split_size") -> None:
    """``test_split_size`` is a positive int (rows) or a fraction in (0, 1) (leave it out for no test split)."""
    if isinstance(size, bool) or not isinstance(size, (int, float)) or not size > 0:
        raise ValueError(f"{where}: must be a positive int (rows) or a fraction in (0, 1); leave it out for no "
                         f"test split; got {size!r}")
    if isinstance(size, float) and size >= 1:
        raise ValueError(f"{where}: a fraction must be < 1, got {size}")


@dataclass
class DataConfig(Section):
    """The data section of a recipe (the trainer's config embeds it).

    Mixture: exactly one of ``dataset_mixer`` (+ ``dataset_splits``) or ``dataset_mixture``.
    Tokenisation / packing knobs live here too so SFT and DPO read one place.
    """

    dataset_mixer: Optional[dict] = option(None, "old handbook schema: {dataset: fraction of its train splits}")
    dataset_splits: list = option(["train", "test"], "old schema: the splits to read; each contains train "
                                                     "(trained on) or test (evaluated)")
    dataset_configs: Optional[list] = option(None, "old schema: one hub config per dataset_mixer entry")
    dataset_mixture: Optional[DatasetMixture] = option(None, "new handbook schema: {datasets: [{id, config, "
                                                             "split, columns, weight, revision}], seed, "
                                                             "test_split_size}")
    columns_to_keep: Optional[list] = option(None, "columns kept when datasets are mixed")
    seed: int = option(42, "seed of the data order (also the training section's)")
    shuffle: bool = option(True, "shuffle the rows after loading")
    cache_dir: Optional[str] = option(None, "datasets' cache folder")
    chat_template: Optional[str] = option(None, "a Jinja chat template replacing the tokenizer's (default: its "
                                                "own, else Zephyr's)")
    auto_insert_empty_system_msg: bool = option(True, "give a conversation without a system turn an empty one "
                                                      "(alignment-handbook)")
    assistant_only_loss: bool = option(True, "SFT: the loss on the assistant turns only")
    max_length: int = option(2048, "tokens per sequence (DPO: prompt + completion), > 1")
    max_prompt_length: Optional[int] = option(512, "DPO: the prompt is cut from the left to this, in (0, "
                                                   "max_length)")
    max_tokens_per_batch: Optional[int] = option(None, "token budget of a packed micro-batch; none: "
                                                       "per_device_train_batch_size x max_length x the stage's "
                                                       "sequences per example (a DPO pair: 2)")
    batch_by: Optional[str] = option(None, f"how the train split becomes micro-batches: {' | '.join(BATCH_BY)}; "
                                           "examples: exactly per_device_train_batch_size examples per "
                                           "micro-batch (as TRL counts them), tokens: bins of "
                                           "max_tokens_per_batch tokens, auto (the default without "
                                           "max_tokens_per_batch): examples for DPO and unpacked SFT, tokens for "
                                           "packed SFT; an explicit max_tokens_per_batch means tokens")
    dataloader_drop_last: bool = option(False, "HF's key: false keeps each epoch's last n mod step examples as a "
                                               "smaller last step; true leaves them out (examples batching)")
    truncation_mode: Optional[str] = option(None, "DPO truncation: none (alignment-handbook's TRL: the prompt "
                                                  "from the left to max_prompt_length, then the completions "
                                                  "from the right) or keep_start (TRL 1.16's)")
    max_completion_length: Optional[int] = option(None, "older TRL's DPO key: completions cut from the right to "
                                                        "it first")
    dpo_layout: str = option("separate", f"DPO pair layout: {' | '.join(DPO_LAYOUTS)} (prefix_shared: the "
                                         "prompt once, both completions attend to it)")
    overlong: str = option("truncate", f"SFT sequences longer than a bin: {' | '.join(OVERLONG)}")
    skip_invalid_rows: bool = option(False, "skip rows that fail validation (reported) instead of stopping")

    def __post_init__(self):
        if self.dataset_mixture is not None:
            self.dataset_mixture = _from_mapping(DatasetMixture, self.dataset_mixture, "dataset_mixture")
        if (self.dataset_mixer is None) == (self.dataset_mixture is None):
            raise ValueError("data config: give exactly one of `dataset_mixer` (+ `dataset_splits`) or `dataset_mixture`")
        if self.dataset_mixer is not None:
            _check_mixer(self.dataset_mixer, self.dataset_splits, self.dataset_configs)
        if self.dpo_layout not in DPO_LAYOUTS:
            raise ValueError(f"data config: dpo_layout must be 'separate' or 'prefix_shared', got {self.dpo_layout!r}")
        if self.max_length <= 1:
            raise ValueError(f"max_length: must be > 1, got {self.max_length}")
        if self.batch_by is None:
            self.batch_by = "tokens" if self.max_tokens_per_batch is not None else "auto"
        if self.batch_by not in BATCH_BY:
            raise ValueError(f"batch_by: must be auto | examples | tokens, got {self.batch_by!r}")
        if self.max_completion_length is not None and self.max_completion_length < 1:
            raise ValueError(f"max_completion_length: must be >= 1, got {self.max_completion_length}")
        if self.truncation_mode not in TRUNCATION_MODES:
            raise ValueError(f"truncation_mode: {self.truncation_mode!r} is not supported: 'keep_start' (TRL 1.16's, "
                             "which deprecates keep_end) or leave it out for alignment-handbook's truncation "
                             "(the prompt from the left to max_prompt_length)")
        if self.overlong not in OVERLONG:
            raise ValueError(f"data config: overlong must be 'truncate' or 'split', got {self.overlong!r}")
