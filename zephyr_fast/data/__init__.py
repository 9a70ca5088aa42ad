"""Data layer: load -> validate -> chat template -> tokenise -> pack into PackedBatch.

Public API (docs/ARCHITECTURE.md, docs/DATA.md)::

    rows = load_rows(DataConfig(...))                      # {"train": Dataset, "test": Dataset | None}
    tok = load_tokenizer("mistralai/Mistral-7B-v0.1")      # + Zephyr template, pad token
    examples, report = tokenize_sft(rows["train"], tok, max_length=2048)
    batches = pack_sft(examples, max_tokens=8192, seed=0)  # list[PackedBatch], .stats
    pairs, report = build_dpo_examples(rows["train"], tok, max_length=1024, max_prompt_length=512)
    batches = pack_dpo(pairs, max_tokens=8192, layout="prefix_shared")
"""

from .batch import IGNORE_INDEX, PackedBatch, concat_batches, dense_attention_mask, loss_inputs
from .chat import ZEPHYR_CHAT_TEMPLATE, load_tokenizer, render
from .loading import DataConfig, DatasetMixture, DatasetSpec, load_rows
from .packing import (
    PackedBatches,
    PackingStats,
    best_fit_decreasing,
    pack_dpo,
    pack_sft,
)
from .preference import DPOReport, build_dpo_examples
from .sft import SFTReport, tokenize_sft
from .validate import DataError, DataValidationError

__all__ = [
    "IGNORE_INDEX", "PackedBatch", "concat_batches", "dense_attention_mask", "loss_inputs",
    "ZEPHYR_CHAT_TEMPLATE", "load_tokenizer", "render",
    "DataConfig", "DatasetMixture", "DatasetSpec", "load_rows",
    "PackedBatches", "PackingStats", "best_fit_decreasing", "pack_dpo", "pack_sft",
    "DPOReport", "build_dpo_examples", "SFTReport", "tokenize_sft",
    "DataError", "DataValidationError",
]
