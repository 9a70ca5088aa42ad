"""Helpers for the TRL parity tests: one tiny model, one tokenizer, the same rows for both trainers.

Both trainers get identical inputs: a tiny random-init Mistral saved once with ``save_pretrained``
(fp32, loaded by both from the same folder), the real Mistral-7B tokenizer, and UltraFeedback /
UltraChat rows cut short.  TRL gets every conversation with alignment-handbook's empty system turn
already inserted (zephyr_fast inserts it itself, ``auto_insert_empty_system_msg``; TRL never does).
"""

import os

import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM
from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

from tests.train.helpers import ASSETS, TINY_MODEL, TOKENIZER_DIR, cut_turns, read_jsonl, recipe, write_jsonl
from zephyr_fast.config import build_config
from zephyr_fast.data.chat import ZEPHYR_CHAT_TEMPLATE, load_tokenizer
from zephyr_fast.model.load import tiny_config
from zephyr_fast.training.metrics import read_jsonl as read_metrics
from zephyr_fast.training.run import run

# TRL 1.16 tokenises a conversation with ``apply_chat_template(tokenize=True)``, which never adds
# special tokens: the Zephyr template (no ``bos_token`` in it) then gives no BOS, where zephyr_fast
# and the published recipe (alignment-handbook + TRL 0.7 tokenised the rendered text) start with
# ``<s>``.  This template writes the BOS itself, so both trainers get it and the same ids.
ZEPHYR_BOS_TEMPLATE = "{{ bos_token }}" + ZEPHYR_CHAT_TEMPLATE

_ASSISTANT_LINE = "{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n"
_ASSISTANT_GENERATION = ("{{ '<|assistant|>\n' }}{% generation %}{{ message['content'] + eos_token }}\n"
                         "{% endgeneration %}\n")
# The same text with TRL's ``{% generation %}`` markers around what zephyr_fast trains on in an
# assistant turn (content, ``</s>`` and the newline): TRL's assistant_only_loss needs them.
ZEPHYR_BOS_GENERATION_TEMPLATE = ZEPHYR_BOS_TEMPLATE.replace(_ASSISTANT_LINE, _ASSISTANT_GENERATION)
assert ZEPHYR_BOS_GENERATION_TEMPLATE != ZEPHYR_BOS_TEMPLATE, "the Zephyr template's assistant line moved"

SYSTEM = {"role": "system", "content": ""}
STEPS = 2  # the first logged step has policy == reference (rewards 0); the second follows one update
SEED = 7


def tokenizer(template=ZEPHYR_BOS_TEMPLATE):
    """The real Mistral tokenizer with ``template`` (zephyr_fast's loader: pad = EOS)."""
    return load_tokenizer(str(TOKENIZER_DIR), template)


def save_tiny_model(path) -> str:
    """A tiny random-init Mistral (``TINY_MODEL``) saved in fp32 under ``path``; returns the path."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(**TINY_MODEL), dtype=torch.float32)
    model.save_pretrained(str(path))
    return str(path)


def load_model(path):
    """The saved tiny model in fp32 (what TRL trains; zephyr_fast loads the same folder itself)."""
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def dpo_pairs(n, cut):
    """``n`` UltraFeedback pairs (whole conversations), every turn cut to ``cut`` characters."""
    rows = read_jsonl(ASSETS / "data" / "ultrafeedback_binarized" / "sample16.jsonl")[:n]
    return [{"chosen": cut_turns(r["chosen"], cut), "rejected": cut_turns(r["rejected"], cut)} for r in rows]


def sft_conversations(n, cut, turns=4):
    """``n`` UltraChat conversations of ``turns`` turns, every turn cut to ``cut`` characters."""
    rows = read_jsonl(ASSETS / "data" / "ultrachat_200k" / "sample16.jsonl")[:n]
    return [{"messages": cut_turns(r["messages"][:turns], cut)} for r in rows]


def with_system(rows):
    """The rows as TRL must get them: the empty system turn prepended to every conversation."""
    return [{k: [SYSTEM] + list(v) for k, v in r.items()} for r in rows]


def write_split_dir(path, rows) -> str:
    """``{train,test}.jsonl`` holding ``rows`` (a dataset_mixer folder for zephyr_fast)."""
    for split in ("train", "test"):
        write_jsonl(os.path.join(str(path), f"{split}.jsonl"), rows)
    return str(path)


def common_args(out, batch, lr, max_length, optim):
    """The TrainingArguments both TRL trainers share: one micro-batch per step, fp32 CPU, no schedule."""
    return dict(output_dir=str(out), per_device_train_batch_size=batch, gradient_accumulation_steps=1,
                max_steps=STEPS, logging_steps=1, learning_rate=lr, lr_scheduler_type="constant", warmup_steps=0,
                weight_decay=0.0, max_grad_norm=1.0, optim=optim, max_length=max_length, bf16=False,
                gradient_checkpointing=False, use_cpu=True, report_to=[], save_strategy="no", seed=SEED,
                disable_tqdm=True)


def trl_trainer(trainer_class, args, model_dir, rows, tok):
    """TRL's ``trainer_class`` (DPOTrainer / SFTTrainer) on a fresh copy of the model and ``rows``."""
    return trainer_class(model=load_model(model_dir), args=args, train_dataset=Dataset.from_list(with_system(rows)),
                         processing_class=tok)


def trl_tokenised(trainer_class, args, model_dir, rows, tok):
    """The train split as TRL's ``trainer_class`` tokenises ``rows``; no training."""
    return trl_trainer(trainer_class, args, model_dir, rows, tok).train_dataset


def trl_train(trainer_class, args, model_dir, rows, tok):
    """TRL's ``STEPS`` steps -> ``(logged rows, trained model, tokenised dataset)``."""
    trainer = trl_trainer(trainer_class, args, model_dir, rows, tok)
    dataset = trainer.train_dataset
    trainer.train()
    return train_logs(trainer.state.log_history), trainer.model, dataset


def trl_dpo(model_dir, out, rows, *, beta, lr, max_length, optim):
    """TRL's DPOTrainer for ``STEPS`` steps of all ``rows`` as one batch, reference log-probs precomputed."""
    args = DPOConfig(beta=beta, precompute_ref_log_probs=True, **common_args(out, len(rows), lr, max_length, optim))
    return trl_train(DPOTrainer, args, model_dir, rows, tokenizer())


def trl_sft(model_dir, out, rows, *, lr, max_length, optim, assistant_only_loss):
    """TRL's SFTTrainer (unpacked, padded, not shuffled) for ``STEPS`` steps of all ``rows`` as one batch."""
    args = SFTConfig(assistant_only_loss=assistant_only_loss, packing=False, padding_free=False,
                     shuffle_dataset=False, **common_args(out, len(rows), lr, max_length, optim))
    template = ZEPHYR_BOS_GENERATION_TEMPLATE if assistant_only_loss else ZEPHYR_BOS_TEMPLATE
    return trl_train(SFTTrainer, args, model_dir, rows, tokenizer(template))


def train_logs(history):
    """The per-step training rows of a TRL ``log_history`` (the final summary row dropped)."""
    return [h for h in history if "loss" in h]


def run_ours(stage, model_dir, data_dir, out, *, examples, lr, optim, **over):
    """zephyr_fast for ``STEPS`` steps, all ``examples`` in one micro-batch -> ``(metrics rows, model)``."""
    r = recipe(stage, out, data_dir, model_name_or_path=model_dir, max_steps=STEPS, learning_rate=lr, optim=optim,
               per_device_train_batch_size=examples, max_tokens_per_batch=8192, weight_decay=0.0,
               max_grad_norm=1.0, warmup_ratio=0.0, chat_template=ZEPHYR_BOS_TEMPLATE, save_final_model=False,
               **over)
    r.pop("model_init")
    summary = run(build_config(r, source="tests/parity"), return_model=True)
    rows = [m for m in read_metrics(summary["metrics_path"]) if "loss" in m]
    return rows, summary["model"]


def both(stage, model_dir, out, rows, *, lr, optim, trl, ours):
    """TRL's and zephyr_fast's ``STEPS`` steps of ``stage`` on ``rows`` (``trl`` / ``ours``: their own
    keywords) -> ``{"rows", "trl": (logs, model, tokenised dataset), "ours": (logs, model)}``."""
    trl_run = {"dpo": trl_dpo, "sft": trl_sft}[stage]
    trl_result = trl_run(model_dir, out / "trl", rows, lr=lr, optim=optim, **trl)
    data_dir = write_split_dir(out / "data", rows)
    return {"rows": rows, "trl": trl_result,
            "ours": run_ours(stage, model_dir, data_dir, out / "ours", examples=len(rows), lr=lr, optim=optim, **ours)}


def rel_diff(a: float, b: float) -> float:
    """|a - b| relative to the larger magnitude (0 when both are 0)."""
    scale = max(abs(a), abs(b))
    return abs(a - b) / scale if scale else 0.0


def metric_diffs(trl_rows, our_rows, keys):
    """``{(step, key): relative difference}`` over the logged steps both trainers wrote."""
    assert len(trl_rows) == len(our_rows) == STEPS, (len(trl_rows), len(our_rows))
    return {(i + 1, k): rel_diff(t[k], o[k]) for i, (t, o) in enumerate(zip(trl_rows, our_rows)) for k in keys}


def update_diff(initial, trl_model, our_model) -> float:
    """``||Δ_ours − Δ_trl|| / ||Δ_trl||`` over all parameters, Δ = trained − initial weights."""
    init, a, b = (m.state_dict() for m in (initial, trl_model, our_model))
    num = sum(((b[k] - a[k]).double() ** 2).sum() for k in init)
    den = sum(((a[k] - init[k]).double() ** 2).sum() for k in init)
    assert den > 0, "TRL's step did not change the weights"
    return float((num / den) ** 0.5)
