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

Pool entries (``aif/pool.py``): a model folder, a Hub id, or an OpenAI-compatible endpoint
(``NAME=URL#MODEL``).  Models are run one at a time (model-major, like UltraFeedback): local ones
in process (``aif/backends.py``: transformers -- any causal LM, batched, KV cache, CPU or GPU -- or
vLLM when installed, on CUDA, and asked for), endpoints through the ``openai`` client with
``concurrency`` requests in flight, retries, and each completion appended as it arrives.  A served
completion's identity is the endpoint (``endpoint_id`` or URL), the exact request (model, messages,
sampling, per-request ``seed``) and the settings; requests that fail for good are not recorded: the
run exits 1 and the rerun asks only for them.

CLI::

    zephyr-fast generate PROMPTS.jsonl OUT_DIR --pool NAME=MODEL_DIR|HUB_ID|URL#MODEL [--pool ...]
        [--n-models 4] [--seed 0] [--max-new-tokens 256] [--batch-size 8] [--dtype auto]
        [--backend auto|transformers|vllm|openai] [--concurrency 8] [--max-retries 5] [--timeout 600]
        [--limit N]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import sys
import time
from dataclasses import dataclass, field
from typing import Optional

from ..data.chat import load_tokenizer
from ..model.generate import prompt_texts
from ..outputs import claim_folder
from .backends import (BACKENDS, ServedModel, pick_backend, pick_dtype, request_seed, transformers_backend,
                       vllm_backend)
from .client import JudgeRequestError, cli_status
from .pool import check_pool, identity, is_endpoint, local_folder, parse_pool
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
    usage: dict = field(default_factory=dict)  # the endpoints' requests, retries, tokens, cost

    def __str__(self) -> str:
        u = self.usage
        return (f"generate: {self.completions} completions for {self.prompts} prompts: {self.resumed} already done, "
                f"{self.generated} generated now in {self.seconds:.1f} s -> {self.output}"
                + (f" ({self.damaged_lines} damaged lines ignored, generated again)" if self.damaged_lines else "")
                + (f"; endpoints: {u['requests']} requests, {u['retries']} retries, {u['prompt_tokens']} prompt + "
                   f"{u['completion_tokens']} completion tokens, cost {u['cost']:.4f}" if u else ""))


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


def resolve_pool(pool: dict, *, download: bool = True) -> dict:
    """``{name: model folder | Endpoint | None}``: Hub ids downloaded (``download``) or taken from the
    cache (None when not there yet, dry runs only); endpoints as they are."""
    return {name: entry if is_endpoint(entry) else local_folder(name, entry, download=download)
            for name, entry in pool.items()}


def completion_keys(plan: dict, prompts: list, pool: dict, settings: dict, served: Optional[dict] = None,
                    folders: Optional[dict] = None) -> dict:
    """``(prompt_id, model) -> key``: the identity of each planned completion (see the module docstring).

    ``pool`` entries as given, ``folders`` their model folders (:func:`resolve_pool`), ``served``
    the :class:`ServedModel` of each endpoint; a model without a folder (a Hub id not downloaded
    yet) gets no keys.
    """
    by_id, keys, folders = {p["prompt_id"]: p for p in prompts}, {}, folders or pool
    for name, entry in sorted(pool.items()):
        items = [(pid, sp) for pid, its in plan.items() for m, _, sp in its if m == name]
        if not items or folders.get(name) is None:
            continue
        who = identity(entry, folders[name])
        if is_endpoint(entry):
            texts = [served[name].request(pid, conversation(sp, by_id[pid]["instruction"])) for pid, sp in items]
            own = {**settings, "backend": "openai", "dtype": None}
        else:
            tok, own = load_tokenizer(folders[name]), settings
            texts = prompt_texts(tok, [conversation(sp, by_id[pid]["instruction"]) for pid, sp in items])
        for (pid, _), text in zip(items, texts):
            keys[(pid, name)] = cache_key(PARTS_VERSION, name, who, text, own)
    return keys


def conversation(system_prompt: str, instruction: str) -> list:
    return [{"role": "system", "content": system_prompt}, {"role": "user", "content": instruction}]


def generate_completions(prompts: list, pool: dict, out_dir: str, *, n_models: int = 4, seed: int = 0,
                         max_new_tokens: int = 256, temperature: float = 1.0, top_p: float = 1.0,
                         batch_size: int = 8, backend: str = "auto", device: Optional[str] = None,
                         dtype: str = "auto", concurrency: int = 8, max_retries: int = 5, timeout: float = 600.0,
                         progress: bool = True, overwrite: bool = False, inputs: Optional[dict] = None) -> GenerateReport:
    """Generate every planned (prompt, model) completion not yet in ``OUT_DIR/completions.parts.jsonl``.

    Args:
        prompts: :func:`load_prompts` rows.
        pool: ``{model name: entry}``: a model folder, a Hub id or an :class:`~zephyr_fast.aif.pool.Endpoint`
            (``zephyr_fast.aif.pool``).
        dtype: of the local models (``auto``: bf16 on CUDA, fp32 on CPU).
        concurrency, max_retries, timeout: of the served models' requests (``timeout``: total, per request).
        overwrite: write into an existing ``out_dir`` that zephyr_fast did not create.
        inputs: further inputs ``out_dir`` must not be (``{name: path}``, e.g. the prompts file).
    Returns:
        the report; ``OUT_DIR/completions.jsonl`` is written when all completions are done.
    Raises:
        JudgeRequestError: served completions failed for good (the others are kept; rerun to finish).
    """
    setup = prepare(prompts, pool, n_models=n_models, seed=seed, max_new_tokens=max_new_tokens,
                    temperature=temperature, top_p=top_p, backend=backend, device=device, dtype=dtype,
                    concurrency=concurrency, max_retries=max_retries, timeout=timeout)
    local = {f"pool model {k}": v for k, v in setup["folders"].items() if not is_endpoint(v)}
    with claim_folder(out_dir, "generate", inputs={**(inputs or {}), **local}, overwrite=overwrite):
        keys = completion_keys(setup["plan"], prompts, setup["pool"], setup["settings"], setup["served"],
                               setup["folders"])
        return _generate(prompts, setup, out_dir, keys, batch_size=batch_size, progress=progress)


def prepare(prompts: list, pool: dict, *, n_models: int, seed: int, max_new_tokens: int, temperature: float,
            top_p: float, backend: str, device: Optional[str], dtype: str, concurrency: int, max_retries: int,
            timeout: float, download: bool = True) -> dict:
    """The plan, settings, model folders and endpoint clients of a run (no model loaded, no request)."""
    import torch

    pool = check_pool(pool, "generate")
    plan = assign(prompts, list(pool), n_models, seed)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    kind = pick_backend(backend, pool)
    settings = {"temperature": temperature, "top_p": top_p, "max_new_tokens": max_new_tokens, "seed": seed,
                "backend": kind, "dtype": pick_dtype(dtype, device)}
    served = {name: ServedModel(name, e, settings, concurrency=concurrency, max_retries=max_retries, timeout=timeout)
              for name, e in pool.items() if is_endpoint(e)}
    return {"plan": plan, "settings": settings, "device": device, "served": served, "pool": pool,
            "folders": resolve_pool(pool, download=download)}


def read_done(parts_path: str, keys: dict, stats: Optional[dict] = None) -> dict:
    """``{key: record}`` of the completions already in the parts file that this run wants (``keys``'
    values), sealed lines only (``stats["damaged"]`` counts the others)."""
    wanted = set(keys.values())
    return {r["key"]: r for r in iter_sealed(parts_path, stats) if r.get("key") in wanted and is_part(r)}


def _generate(prompts, setup, out_dir, keys, *, batch_size, progress) -> GenerateReport:
    t0 = time.time()
    parts_path = os.path.join(out_dir, PARTS)
    stats = {"damaged": 0}
    done = read_done(parts_path, keys, stats)
    rep = GenerateReport(prompts=len(prompts), completions=len(keys), damaged_lines=stats["damaged"])
    rep.resumed = sum(1 for k in keys.values() if k in done)
    by_id, errors = {p["prompt_id"]: p for p in prompts}, []
    with AppendLog(parts_path, sealed=True) as log:
        def record(pid, name, pr, sp, text):
            rec = log.append({"prompt_id": pid, "model": name, "principle": pr, "custom_system_prompt": sp,
                              "response": text.strip(), "key": keys[(pid, name)]})
            done[rec["key"]] = rec

        for name in sorted(setup["pool"]):
            todo = [(pid, pr, sp) for pid, items in setup["plan"].items() for m, pr, sp in items
                    if m == name and keys[(pid, m)] not in done]
            if not todo:
                continue
            if name in setup["served"]:
                errors += _served(setup["served"][name], todo, by_id, record, rep, progress)
            else:
                _local(name, setup, todo, by_id, record, rep, batch_size, progress)
    if errors:
        raise JudgeRequestError(f"{rep}; {len(errors)} completions failed for good (first: {errors[0]}); "
                                "rerun the same command to generate only what is missing")
    rep.output = _finalize(prompts, setup["plan"], {pm: done[k] for pm, k in keys.items()}, out_dir)
    rep.seconds = time.time() - t0
    return rep


def _local(name, setup, todo, by_id, record, rep, batch_size, progress) -> None:
    """The completions of one local pool model, batch by batch (a batch is flushed as it finishes)."""
    from tqdm.auto import tqdm

    settings = setup["settings"]
    kind, device, folder = settings["backend"], setup["device"], setup["folders"][name]
    run = (vllm_backend if kind == "vllm" else transformers_backend)(folder, device, settings["dtype"])
    step = len(todo) if kind == "vllm" else batch_size
    with tqdm(total=len(todo), desc=f"generate {name}", disable=not progress) as bar:
        for i in range(0, len(todo), step):
            chunk = todo[i:i + step]
            convs = [conversation(sp, by_id[pid]["instruction"]) for pid, _, sp in chunk]
            bseed = request_seed(settings["seed"], name, chunk[0][0])  # one seed per batch, as per request
            texts = run(convs, max_new_tokens=settings["max_new_tokens"], temperature=settings["temperature"],
                        top_p=settings["top_p"], seed=bseed, batch_size=batch_size)
            for (pid, pr, sp), text in zip(chunk, texts):
                record(pid, name, pr, sp, text)
            rep.generated += len(chunk)
            bar.update(len(chunk))


def _served(model: ServedModel, todo, by_id, record, rep, progress) -> list:
    """The completions of one endpoint, ``concurrency`` requests in flight, each appended as it
    arrives; returns the errors of those that failed for good (not recorded: a rerun asks again)."""
    def one(item):
        pid, pr, sp = item
        record(pid, model.name, pr, sp, model.complete(pid, conversation(sp, by_id[pid]["instruction"])))

    results = model.client.map(one, todo, desc=f"generate {model.name}", progress=progress)
    errors = [str(r) for r in results if isinstance(r, JudgeRequestError)]
    for r in results:
        if isinstance(r, Exception) and not isinstance(r, JudgeRequestError):
            raise r
    rep.generated += len(todo) - len(errors)
    for k, v in model.client.usage.as_dict().items():
        rep.usage[k] = rep.usage.get(k, 0) + v
    return errors


def is_part(rec: dict) -> bool:
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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="zephyr-fast generate", description=__doc__.split("\n\n")[0])
    ap.add_argument("prompts")
    ap.add_argument("out_dir")
    ap.add_argument("--pool", action="append", required=True,
                    help="NAME=MODEL_DIR, NAME=HUB_ID or NAME=URL#MODEL (an OpenAI-compatible endpoint); repeat")
    ap.add_argument("--n-models", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--backend", default="auto", choices=BACKENDS,
                    help="engine of the local pool models; openai: every entry is an endpoint")
    ap.add_argument("--dtype", default="auto", help="local models: auto (bf16 on CUDA, fp32 on CPU), float32, bfloat16")
    ap.add_argument("--concurrency", type=int, default=8, help="endpoints: requests in flight")
    ap.add_argument("--max-retries", type=int, default=5, help="endpoints: retries of 429 / 5xx / timeouts")
    ap.add_argument("--timeout", type=float, default=600.0, help="endpoints: total seconds per request")
    ap.add_argument("--limit", type=int, help="first N prompts only")
    ap.add_argument("--overwrite_output_dir", "--overwrite", action="store_true",
                    help="write into an existing OUT_DIR that zephyr_fast did not create")
    ap.add_argument("--no-progress", action="store_true")
    a = ap.parse_args(argv)
    return cli_status(lambda: print(generate_completions(
        load_prompts(a.prompts, a.limit), parse_pool(a.pool), a.out_dir, n_models=a.n_models, seed=a.seed,
        max_new_tokens=a.max_new_tokens, temperature=a.temperature, top_p=a.top_p, batch_size=a.batch_size,
        backend=a.backend, dtype=a.dtype, concurrency=a.concurrency, max_retries=a.max_retries, timeout=a.timeout,
        progress=not a.no_progress, overwrite=a.overwrite_output_dir,
        inputs={"prompts": a.prompts})))

if __name__ == "__main__":
    sys.exit(main())
