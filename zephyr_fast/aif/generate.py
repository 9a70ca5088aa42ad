"""``zephyr-fast generate``: completions from N models sampled from a pool per prompt (UltraFeedback).

For each prompt, ``n_models`` models are drawn from the pool and each gets its own principle
system prompt (helpfulness / honesty / truthfulness / verbalized calibration, drawn by the prompt's
``source`` as UltraFeedback does), all seeded per prompt (``Random(f"{seed}-{prompt_id}")``), so a
rerun makes the same draws.  Sampling: temperature 1.0, top-p 1.0 (UltraFeedback's settings).

Input: JSONL rows with ``prompt`` (or ``instruction``) and optional ``prompt_id`` / ``source`` —
e.g. ``assets/data/ultrafeedback_binarized/sample16.jsonl``.  Output in ``OUT_DIR``:

* ``completions.parts.jsonl`` — append-only, one sealed line per finished completion
  ``{"prompt_id", "model", "principle", "custom_system_prompt", "response", "key", "digest"}``; flushed
  per batch, so a run killed at any point (kill -9 included) loses at most the batch in flight, and
  the rerun generates only what is not in it.  ``key`` is the completion's identity -- the pool
  model's content fingerprint, the prompt as its chat template renders it (principle and prompt
  text), the sampling settings and the backend -- so another model under the same name, other
  settings or an edited prompt text are generated anew, never taken for done; a line whose
  ``digest`` does not verify is damaged (counted, generated again);
* ``completions.jsonl`` — when every completion is done: raw UltraFeedback rows
  ``{"source", "instruction", "prompt_id", "models", "completions": [{"model", "principle",
  "custom_system_prompt", "response"}]}``, the input of ``zephyr-fast judge``.

Models are run one at a time (model-major, like UltraFeedback), with the transformers backend
(``zephyr_fast.model.generate``: batched, KV cache, CPU or GPU) or vLLM when installed, on CUDA,
and asked for (``backend="vllm"`` or ``"auto"``).

CLI::

    zephyr-fast generate PROMPTS.jsonl OUT_DIR --pool NAME=MODEL_DIR [--pool ...] [--n-models 4]
        [--seed 0] [--max-new-tokens 256] [--batch-size 8] [--backend auto|transformers|vllm] [--limit N]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import sys
import time
from dataclasses import dataclass
from typing import Optional

from ..data.chat import load_tokenizer
from ..model import generate, load_model
from ..model.generate import prompt_texts
from ..outputs import claim_folder
from ..training.fingerprint import local_fingerprint
from .client import cli_status
from .store import AppendLog, cache_key, iter_sealed, read_input_jsonl, write_jsonl_atomic
from .ultrafeedback import pick_principle

PARTS, FINAL = "completions.parts.jsonl", "completions.jsonl"
PARTS_VERSION = "generate-part-v1"  # what a completion's key hashes (completion_keys)


@dataclass
class GenerateReport:
    prompts: int = 0
    completions: int = 0
    resumed: int = 0
    generated: int = 0
    damaged_lines: int = 0
    seconds: float = 0.0
    output: str = ""

    def __str__(self) -> str:
        return (f"generate: {self.completions} completions for {self.prompts} prompts: {self.resumed} already done, "
                f"{self.generated} generated now in {self.seconds:.1f} s -> {self.output}"
                + (f" ({self.damaged_lines} damaged lines ignored, generated again)" if self.damaged_lines else ""))


def load_prompts(path: str, limit: Optional[int] = None) -> list:
    """``[{"prompt_id", "instruction", "source"}]`` from JSONL rows with ``prompt`` or ``instruction``.

    Raises:
        ValueError: naming file, row and field of the first bad row.
    """
    out, seen = [], set()
    for i, row in enumerate(read_input_jsonl(path)[:limit]):
        text = row.get("prompt", row.get("instruction")) if isinstance(row, dict) else None
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"{path}: row {i}, field 'prompt': expected a non-empty string")
        pid = row.get("prompt_id") or hashlib.sha256(text.encode("utf-8")).hexdigest()
        if not isinstance(pid, str):
            raise ValueError(f"{path}: row {i}, field 'prompt_id': expected a string, got {type(pid).__name__}")
        if pid in seen:
            raise ValueError(f"{path}: row {i}, field 'prompt_id': duplicate prompt {pid[:12]}")
        source = row.get("source")
        if source is not None and not isinstance(source, str):
            raise ValueError(f"{path}: row {i}, field 'source': expected a string, got {type(source).__name__}")
        seen.add(pid)
        out.append({"prompt_id": pid, "instruction": text, "source": source})
    return out


def assign(prompts: list, pool: list, n_models: int, seed: int) -> dict:
    """``prompt_id -> [(model, principle, system prompt)]``: seeded per prompt, independent of order."""
    if n_models < 1 or not pool:
        raise ValueError(f"generate: need a non-empty pool and n_models >= 1, got {len(pool)}, {n_models}")
    plan = {}
    for p in prompts:
        rng = random.Random(f"{seed}-{p['prompt_id']}")
        models = rng.sample(sorted(pool), min(n_models, len(pool)))
        plan[p["prompt_id"]] = [(m, *pick_principle(p["source"], rng)) for m in models]
    return plan


def _transformers_backend(model_dir: str, device: str):
    model = load_model(model_dir).to(device).eval()
    tok = load_tokenizer(model_dir)

    def run(convs, *, max_new_tokens, temperature, top_p, seed, batch_size):
        return generate(model, tok, convs, max_new_tokens=max_new_tokens, do_sample=temperature > 0,
                        temperature=temperature or 1.0, top_p=top_p, seed=seed, batch_size=batch_size)
    return run


def _vllm_backend(model_dir: str, device: str):
    from vllm import LLM, SamplingParams  # optional extra: pip install vllm (CUDA)

    llm = LLM(model=model_dir, trust_remote_code=False)

    def run(convs, *, max_new_tokens, temperature, top_p, seed, batch_size):
        params = SamplingParams(temperature=temperature, top_p=top_p, max_tokens=max_new_tokens, seed=seed)
        return [o.outputs[0].text for o in llm.chat([list(c) for c in convs], params, use_tqdm=False)]
    return run


def pick_backend(backend: str) -> str:
    import importlib.util

    import torch

    has_vllm = importlib.util.find_spec("vllm") is not None and torch.cuda.is_available()
    if backend == "vllm" and not has_vllm:
        raise ValueError("generate: --backend vllm needs the vllm package and a CUDA device")
    if backend not in ("auto", "transformers", "vllm"):
        raise ValueError(f"generate: unknown backend {backend!r}")
    return "vllm" if backend == "vllm" or (backend == "auto" and has_vllm) else "transformers"


def completion_keys(plan: dict, prompts: list, pool: dict, settings: dict) -> dict:
    """``(prompt_id, model) -> key``: the identity of each planned completion (see the module docstring)."""
    by_id, keys = {p["prompt_id"]: p for p in prompts}, {}
    for name, path in sorted(pool.items()):
        items = [(pid, sp) for pid, its in plan.items() for m, _, sp in its if m == name]
        if not items:
            continue
        fingerprint, tok = local_fingerprint(path), load_tokenizer(path)
        texts = prompt_texts(tok, [_conversation(sp, by_id[pid]["instruction"]) for pid, sp in items])
        for (pid, _), text in zip(items, texts):
            keys[(pid, name)] = cache_key(PARTS_VERSION, name, fingerprint, text, settings)
    return keys


def _conversation(system_prompt: str, instruction: str) -> list:
    return [{"role": "system", "content": system_prompt}, {"role": "user", "content": instruction}]


def generate_completions(prompts: list, pool: dict, out_dir: str, *, n_models: int = 4, seed: int = 0,
                         max_new_tokens: int = 256, temperature: float = 1.0, top_p: float = 1.0,
                         batch_size: int = 8, backend: str = "auto", device: Optional[str] = None,
                         progress: bool = True, overwrite: bool = False, inputs: Optional[dict] = None) -> GenerateReport:
    """Generate every planned (prompt, model) completion not yet in ``OUT_DIR/completions.parts.jsonl``.

    Args:
        prompts: :func:`load_prompts` rows.
        pool: ``{model name: model dir}`` (a saved transformers model with its tokenizer).
        overwrite: write into an existing ``out_dir`` that zephyr_fast did not create.
        inputs: further inputs ``out_dir`` must not be (``{name: path}``, e.g. the prompts file).
    Returns:
        the report; ``OUT_DIR/completions.jsonl`` is written when all completions are done.
    """
    for name, path in pool.items():
        if not os.path.isdir(path):
            raise ValueError(f"generate: pool model {name!r}: {path} is not a directory")
    plan = assign(prompts, list(pool), n_models, seed)
    kind = pick_backend(backend)
    settings = {"temperature": temperature, "top_p": top_p, "max_new_tokens": max_new_tokens, "seed": seed,
                "backend": kind}
    claimed = {**(inputs or {}), **{f"pool model {k}": v for k, v in pool.items()}}
    with claim_folder(out_dir, "generate", inputs=claimed, overwrite=overwrite):
        return _generate(prompts, pool, out_dir, plan, completion_keys(plan, prompts, pool, settings), settings,
                         batch_size=batch_size, device=device, progress=progress)


def _generate(prompts, pool, out_dir, plan, keys, settings, *, batch_size, device, progress) -> GenerateReport:
    import torch
    from tqdm.auto import tqdm

    t0 = time.time()
    parts_path = os.path.join(out_dir, PARTS)
    stats = {"damaged": 0}
    wanted = set(keys.values())
    done = {r["key"]: r for r in iter_sealed(parts_path, stats) if r.get("key") in wanted and _is_part(r)}
    rep = GenerateReport(prompts=len(prompts), completions=len(keys), damaged_lines=stats["damaged"])
    rep.resumed = sum(1 for k in keys.values() if k in done)
    kind, device = settings["backend"], device or ("cuda" if torch.cuda.is_available() else "cpu")
    by_id = {p["prompt_id"]: p for p in prompts}
    bar = tqdm(total=rep.completions - rep.resumed, desc="generate", disable=not progress)
    with AppendLog(parts_path, sealed=True) as log:
        for name in sorted(pool):
            todo = [(pid, pr, sp) for pid, items in plan.items() for m, pr, sp in items
                    if m == name and keys[(pid, m)] not in done]
            if not todo:
                continue
            run = (_vllm_backend if kind == "vllm" else _transformers_backend)(pool[name], device)
            step = len(todo) if kind == "vllm" else batch_size
            for i in range(0, len(todo), step):
                chunk = todo[i:i + step]
                convs = [_conversation(sp, by_id[pid]["instruction"]) for pid, _, sp in chunk]
                bseed = int(hashlib.sha256(f"{settings['seed']}-{name}-{chunk[0][0]}".encode()).hexdigest()[:8], 16)
                texts = run(convs, max_new_tokens=settings["max_new_tokens"], temperature=settings["temperature"],
                            top_p=settings["top_p"], seed=bseed, batch_size=batch_size)
                for (pid, pr, sp), text in zip(chunk, texts):
                    rec = log.append({"prompt_id": pid, "model": name, "principle": pr, "custom_system_prompt": sp,
                                      "response": text.strip(), "key": keys[(pid, name)]})
                    done[rec["key"]] = rec
                rep.generated += len(chunk)
                bar.update(len(chunk))
            del run
    bar.close()
    rep.output = _finalize(prompts, plan, {pm: done[k] for pm, k in keys.items()}, out_dir)
    rep.seconds = time.time() - t0
    return rep


def _is_part(rec: dict) -> bool:
    return all(isinstance(rec.get(k), str) for k in ("prompt_id", "model", "principle", "custom_system_prompt",
                                                     "response"))


def _finalize(prompts, plan, done, out_dir) -> str:
    rows = []
    for p in prompts:
        comps = [{k: done[(p["prompt_id"], m)][k] for k in ("model", "principle", "custom_system_prompt", "response")}
                 for m, *_ in plan[p["prompt_id"]]]
        rows.append({"source": p["source"], "instruction": p["instruction"], "prompt_id": p["prompt_id"],
                     "models": [c["model"] for c in comps], "completions": comps})
    path = os.path.join(out_dir, FINAL)
    write_jsonl_atomic(path, rows)
    return path


def parse_pool(items: list) -> dict:
    pool = {}
    for it in items:
        name, sep, path = it.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--pool: expected NAME=MODEL_DIR, got {it!r}")
        pool[name] = path
    return pool


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="zephyr-fast generate", description=__doc__.split("\n\n")[0])
    ap.add_argument("prompts")
    ap.add_argument("out_dir")
    ap.add_argument("--pool", action="append", required=True, help="NAME=MODEL_DIR (repeat)")
    ap.add_argument("--n-models", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--backend", default="auto", choices=("auto", "transformers", "vllm"))
    ap.add_argument("--limit", type=int, help="first N prompts only")
    ap.add_argument("--overwrite_output_dir", "--overwrite", action="store_true",
                    help="write into an existing OUT_DIR that zephyr_fast did not create")
    ap.add_argument("--no-progress", action="store_true")
    a = ap.parse_args(argv)
    return cli_status(lambda: print(generate_completions(
        load_prompts(a.prompts, a.limit), parse_pool(a.pool), a.out_dir, n_models=a.n_models, seed=a.seed,
        max_new_tokens=a.max_new_tokens, temperature=a.temperature, top_p=a.top_p, batch_size=a.batch_size,
        backend=a.backend, progress=not a.no_progress, overwrite=a.overwrite_output_dir,
        inputs={"prompts": a.prompts})))

if __name__ == "__main__":
    sys.exit(main())
