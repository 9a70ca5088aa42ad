"""The model's answers to AlpacaEval instructions: one user turn each, the model's chat template as in
training, greedy; appended (sealed lines) to ``OUT/model_outputs.parts.jsonl`` as each batch finishes,
each line keyed by the model's weights fingerprint, the instruction and the settings, so a rerun (or a
run killed midway) answers only what is missing and never mixes two models' answers; then
``OUT/model_outputs.json`` in AlpacaEval's format (``instruction``, ``output``, ``generator``)."""

from __future__ import annotations

import json
import os

import torch
from tqdm.auto import tqdm

from zephyr_fast.fileio import atomic_open
from ..aif.store import AppendLog, cache_key, iter_sealed
from ..data.chat import load_tokenizer
from ..model import generate, load_model
from ..model.generate import prompt_texts
from ..training.fingerprint import local_fingerprint

__all__ = ["answer_instructions"]

ANSWER_VERSION = "zephyr_fast-alpaca-answers-1"


def _identity(fingerprint: str, prompt: str, max_new_tokens: int) -> str:
    """An answer's key: the weights, the prompt exactly as rendered (the tokenizer's chat template is not
    part of the weights' fingerprint) and the generation settings."""
    return cache_key(ANSWER_VERSION, fingerprint, prompt, max_new_tokens)


def answer_instructions(model_dir: str, instructions: list, out_dir: str, *, max_new_tokens: int = 2048,
                        batch_size: int = 8, progress: bool = True) -> dict:
    """``{instruction: output}`` for ``instructions``, generating only those not yet in the parts file."""
    parts = os.path.join(out_dir, "model_outputs.parts.jsonl")
    fingerprint = local_fingerprint(model_dir)
    tok = load_tokenizer(model_dir)
    prompts = prompt_texts(tok, [[{"role": "user", "content": ins}] for ins in instructions])
    ids = {ins: _identity(fingerprint, prompt, max_new_tokens) for ins, prompt in zip(instructions, prompts)}
    known = {r.get("identity"): r.get("output") for r in iter_sealed(parts, {"damaged": 0})}
    done = {ins: known[k] for ins, k in ids.items() if isinstance(known.get(k), str)}
    todo = [ins for ins in instructions if ins not in done]
    if todo:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        model = load_model(model_dir).to(device).eval()
        bar = tqdm(total=len(todo), desc="alpaca-eval answers", disable=not progress)
        with AppendLog(parts, sealed=True) as log:
            for i in range(0, len(todo), batch_size):
                chunk = todo[i:i + batch_size]
                outs = generate(model, tok, [[{"role": "user", "content": ins}] for ins in chunk],
                                max_new_tokens=max_new_tokens, batch_size=batch_size)
                for ins, out in zip(chunk, outs):
                    log.append({"instruction": ins, "output": out.strip(), "identity": ids[ins]})
                    done[ins] = out.strip()
                bar.update(len(chunk))
        bar.close()
    generator = os.path.basename(os.path.normpath(model_dir))
    rows = [{"instruction": ins, "output": done[ins], "generator": generator} for ins in instructions]
    with atomic_open(os.path.join(out_dir, "model_outputs.json")) as f:
        json.dump(rows, f, indent=1)
    return done
