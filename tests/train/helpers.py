"""Helpers for the trainer tests: small real-data splits and a tiny random-init Mistral recipe.

Rows come from the bundled UltraChat / UltraFeedback samples with each turn cut to a few hundred
characters, so a run takes seconds on 2 CPU cores while the tokenizer (real Mistral-7B, vocab
32000), chat template and packing are the production ones.
"""

import copy
import json
import os

import pathlib

REPO = pathlib.Path(__file__).resolve().parents[2]
ASSETS = REPO / "assets"
TOKENIZER_DIR = ASSETS / "tokenizers" / "mistral-7b-v0.1"

TINY_MODEL = {"arch": "mistral", "vocab_size": 32000, "hidden_size": 64, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 128}


def cut_turns(messages, n):
    return [{"role": m["role"], "content": m["content"][:n]} for m in messages]


def write_jsonl(path, rows):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def dpo_rows(n=8, start=0, cut=160):
    rows = read_jsonl(ASSETS / "data" / "ultrafeedback_binarized" / "sample16.jsonl")[start:start + n]
    return [{"chosen": cut_turns(r["chosen"], cut), "rejected": cut_turns(r["rejected"], cut)} for r in rows]


def write_dpo_dir(path, rows):
    write_jsonl(os.path.join(path, "train.jsonl"), rows)
    write_jsonl(os.path.join(path, "test.jsonl"), rows)
    return str(path)


def recipe(stage, out, data_dir, **over):
    """A flat recipe dict (alignment-handbook style) for a tiny run on ``data_dir``."""
    r = {
        "stage": stage,
        "tokenizer_name_or_path": str(TOKENIZER_DIR),
        "model_init": copy.deepcopy(TINY_MODEL),
        "dataset_mixer": {data_dir: 1.0},
        "dataset_splits": ["train", "test"],
        "max_seq_length": 160,
        "max_prompt_length": 64,
        "max_tokens_per_batch": 320 if stage == "sft" else 480,
        "learning_rate": 3.0e-3,
        "lr_scheduler_type": "constant",
        "optim": "adamw_torch",
        "num_train_epochs": 1,
        "logging_steps": 1,
        "eval_strategy": "no",
        "save_strategy": "no",
        "report_to": [],
        "seed": 7,
        "output_dir": str(out),
        "kernel_impl": "torch",
    }
    r.update(over)
    return r
