"""End-to-end training runs for the e2e suite: zephyr_fast's trainer vs TRL's DPOTrainer / SFTTrainer.

Same tiny random-init Mistral (hidden 256, 4 layers, vocab 32000 — ``recipes/tiny``'s model), saved
to one directory both trainers load; same tokenizer and Zephyr chat template; same real rows (the
first ``pairs`` UltraFeedback pairs of ``assets/data/ultrafeedback_binarized/flat1k.jsonl``, in
conversational form so both apply the template; SFT uses prompt + chosen as a conversation); same
lengths (max_length 512, prompt ≤ 256), one epoch, same machine, one process.

Throughput definitions (what the report compares):

* zephyr_fast: the trainer's own ``train_tokens / train_seconds`` (real tokens of the packed batches,
  optimiser-step loop time) and, for DPO, the offline reference pass's ``tokens / seconds``;
* TRL: real (non-padding) tokens of its tokenised dataset after its truncation, over the time from
  ``on_train_begin`` to ``on_train_end`` (its loop, including the reference-model forwards that its
  default ``precompute_ref_log_probs=False`` runs every step).
"""

from __future__ import annotations

import json
import os
import pathlib
import time

import torch

from .harness import TOKENIZER_DIR
from .inputs import preference_rows, tokenizer

MAX_LENGTH = 512
MAX_PROMPT_LENGTH = 256
BATCH_PAIRS = 8
TINY = dict(arch="mistral", vocab_size=32000, hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, intermediate_size=512)
# issue 13's compute-dominated CPU model: Mistral's shape ratios (head dim 64, 3:1 GQA, MLP 3.5 x D)
MID = dict(arch="mistral", vocab_size=32000, hidden_size=768, num_hidden_layers=6, num_attention_heads=12,
           num_key_value_heads=4, intermediate_size=2688)
MODELS = {"tiny": TINY, "mid": MID}


def make_model_dir(root: pathlib.Path, seed: int = 0, model: str = "tiny") -> pathlib.Path:
    """Save a random ``MODELS[model]`` Mistral + the Mistral tokenizer (Zephyr chat template) under ``root``."""
    from transformers import AutoModelForCausalLM

    from zephyr_fast.data.chat import load_tokenizer
    from zephyr_fast.model.load import tiny_config

    out = root / f"{model}-mistral"
    torch.manual_seed(seed)
    cfg = tiny_config(**MODELS[model])
    model = AutoModelForCausalLM.from_config(cfg)
    model.save_pretrained(out, safe_serialization=True)
    tok = load_tokenizer(str(TOKENIZER_DIR))
    tok.save_pretrained(out)
    return out


def write_rows(root: pathlib.Path, pairs: int) -> dict:
    """The same real rows in the two shapes the trainers read: preference pairs and SFT conversations."""
    # rows whose prompt fits max_prompt_length with room for the template, so that no trainer drops
    # or cuts a prompt differently: both see exactly these rows
    tok = tokenizer()
    rows = [r for r in preference_rows(4 * pairs) if len(tok(r["prompt"]).input_ids) <= MAX_PROMPT_LENGTH - 56]
    rows = rows[:pairs]
    pref = root / "pairs.jsonl"
    sft = root / "sft.jsonl"
    with open(pref, "w") as f:
        for r in rows:
            f.write(json.dumps({"prompt": [{"role": "user", "content": r["prompt"]}],
                                "chosen": [{"role": "assistant", "content": r["chosen"]}],
                                "rejected": [{"role": "assistant", "content": r["rejected"]}]}) + "\n")
    with open(sft, "w") as f:
        for r in rows:
            f.write(json.dumps({"messages": [{"role": "user", "content": r["prompt"]},
                                             {"role": "assistant", "content": r["chosen"]}]}) + "\n")
    return {"pairs": pref, "sft": sft, "n": len(rows)}


# ----------------------------------------------------------------------------------------------
# zephyr_fast
# ----------------------------------------------------------------------------------------------

def run_zephyr(stage: str, model_dir: pathlib.Path, data_file: pathlib.Path, out_dir: pathlib.Path) -> dict:
    """One epoch of ``stage`` ("sft" | "dpo") through ``zephyr_fast.train.run``; returns its summary."""
    from zephyr_fast.config import build_config
    from zephyr_fast.train import run

    columns = ["messages"] if stage == "sft" else ["prompt", "chosen", "rejected"]
    raw = {
        "stage": stage, "model_name_or_path": str(model_dir), "tokenizer_name_or_path": str(model_dir),
        "dtype": "float32",
        "dataset_mixture": {"datasets": [{"id": str(data_file), "split": "train", "columns": columns}], "seed": 0},
        "max_length": MAX_LENGTH, "max_prompt_length": MAX_PROMPT_LENGTH,
        # about BATCH_PAIRS pairs (or sequences) per micro-batch, like TRL's batch of 8
        "max_tokens_per_batch": 4096 if stage == "dpo" else 2048,
        "num_train_epochs": 1, "learning_rate": 5.0e-7 if stage == "dpo" else 2.0e-5,
        "optim": "rmsprop" if stage == "dpo" else "adamw_torch", "lr_scheduler_type": "linear",
        "logging_steps": 1, "eval_strategy": "no", "save_strategy": "no", "save_final_model": False,
        "report_to": [], "output_dir": str(out_dir), "seed": 42,
    }
    if stage == "dpo":
        raw.update(beta=0.1, loss_type="sigmoid")
    cfg = build_config(raw, source="benchmarks/e2e.py")
    return run(cfg)


# ----------------------------------------------------------------------------------------------
# TRL
# ----------------------------------------------------------------------------------------------

def _loop_timer():
    from transformers import TrainerCallback

    class LoopTimer(TrainerCallback):
        begin = end = None

        def on_train_begin(self, args, state, control, **kw):
            self.begin = time.perf_counter()

        def on_train_end(self, args, state, control, **kw):
            self.end = time.perf_counter()

    return LoopTimer()


def _common_args(out_dir: pathlib.Path) -> dict:
    return dict(output_dir=str(out_dir), per_device_train_batch_size=BATCH_PAIRS, num_train_epochs=1,
                max_length=MAX_LENGTH, logging_steps=1, save_strategy="no", report_to="none",
                dataloader_num_workers=0, seed=42, bf16=False, use_cpu=not torch.cuda.is_available())


def run_trl_dpo(model_dir: pathlib.Path, data_file: pathlib.Path, out_dir: pathlib.Path) -> dict:
    import datasets
    from transformers import AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    ds = datasets.load_dataset("json", data_files=str(data_file), split="train")
    args = DPOConfig(**_common_args(out_dir), beta=0.1, learning_rate=5.0e-7, optim="rmsprop",
                     lr_scheduler_type="linear")
    timer = _loop_timer()
    trainer = DPOTrainer(model=str(model_dir), args=args, train_dataset=ds, processing_class=tok,
                         callbacks=[timer])
    trainer.train()
    tokens = _dataset_tokens(trainer.train_dataset, ("chosen_ids", "rejected_ids"),
                             prompt_key="prompt_ids")
    return _trl_summary(timer, tokens, pairs=len(ds))


def run_trl_sft(model_dir: pathlib.Path, data_file: pathlib.Path, out_dir: pathlib.Path) -> dict:
    import datasets
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    ds = datasets.load_dataset("json", data_files=str(data_file), split="train")
    args = SFTConfig(**_common_args(out_dir), learning_rate=2.0e-5, packing=True, optim="adamw_torch",
                     lr_scheduler_type="linear")
    timer = _loop_timer()
    trainer = SFTTrainer(model=str(model_dir), args=args, train_dataset=ds, processing_class=tok,
                         callbacks=[timer])
    trainer.train()
    tokens = _dataset_tokens(trainer.train_dataset, ("input_ids",))
    return _trl_summary(timer, tokens)


def _dataset_tokens(ds, keys, prompt_key=None) -> int:
    """Real tokens one epoch feeds the model (prompt counted once per completion, cut at max_length)."""
    total = 0
    for row in ds:
        p = len(row[prompt_key]) if prompt_key else 0
        for k in keys:
            total += min(p + len(row[k]), MAX_LENGTH)
    return total


def _trl_summary(timer, tokens: int, pairs: int = 0) -> dict:
    if timer.begin is None or timer.end is None:
        raise RuntimeError("TRL training loop did not report begin/end")
    secs = timer.end - timer.begin
    out = {"train_runtime": secs, "train_tokens": tokens, "train_tokens_per_second": tokens / secs}
    if pairs:
        out["train_pairs_per_second"] = pairs / secs
    return out


def e2e_pairs() -> int:
    """Rows per e2e run (``ZF_BENCH_E2E_PAIRS``, default 24: keeps the CPU suite under 10 minutes)."""
    return int(os.environ.get("ZF_BENCH_E2E_PAIRS", "24"))
