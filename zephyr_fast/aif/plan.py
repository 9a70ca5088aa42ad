"""``zephyr-fast aif RECIPE --dry-run``: what the run would send and spend, before any model or request.

Counts, from the recipe and what its output folder already holds (nothing is written, no model is
loaded, no request is sent, no server started; tokenizers are read and local models fingerprinted):

* prompts, planned completions, those already done (the parts file, by identity), those left --
  split into in-process (local models) and served (endpoint requests, one per completion);
* judge requests: the distinct requests of ``judge.plan_requests`` -- the very function the run uses --
  not in the judge cache.  Completions already generated are used as they are (the count is then
  exact); the others are stand-ins, so before generation the count assumes distinct completions
  (a prompt's identical completions are asked once: the run can send fewer, never more);
* estimated input / output tokens and cost at the recipe's prices (``judge.price_*_per_mtok``, an
  endpoint's ``price_*_per_mtok``): input = the requests' text at 4 characters a token (no tokenizer
  of a remote model is at hand), stand-in completions counted at ``max_new_tokens``; output = the
  ``max_tokens`` / ``max_new_tokens`` each request allows (an upper bound).  First tries only: re-asks
  and retries come on top.
"""

from __future__ import annotations

import math
import os
from types import SimpleNamespace

from .client import JudgeClient
from .generate import PARTS, completion_keys, conversation, generate_completions, load_prompts, prepare, read_done
from .judge import cached_rating_is_consistent, plan_requests, request_messages
from .recipe import GEN_KEYS, signature_defaults
from .store import iter_sealed
from .ultrafeedback import ASPECTS

CHARS_PER_TOKEN = 4
PLAN_KEYS = tuple(k for k in GEN_KEYS if k != "batch_size")  # what ``prepare`` takes (batching changes no plan)
GEN_DEFAULTS = signature_defaults(generate_completions, PLAN_KEYS)


def tokens(messages: list) -> int:
    return math.ceil(sum(len(m["content"]) for m in messages) / CHARS_PER_TOKEN)


class CacheView:
    """The valid keys of a judge cache, read only (a dry run creates no file)."""

    def __init__(self, path: str, retry_failed: bool):
        recs = iter_sealed(path, None, lambda r: "key" in r and cached_rating_is_consistent(r))
        self._keys = {r["key"] for r in recs if not (retry_failed and r.get("status") != "ok")}

    def __contains__(self, key: str) -> bool:
        return key in self._keys


def dry_run(recipe: dict, judge_config) -> dict:
    """The plan of ``run_aif(recipe)`` (see the module docstring); ``judge_config(section, server)``
    builds the judge's config as the run does."""
    out, g, j = recipe.get("output_dir", "outputs/aif"), recipe["generate"], recipe.get("judge", {})
    prompts = load_prompts(g["prompts"], g.get("limit"))
    kw = {**GEN_DEFAULTS, **{k: g[k] for k in PLAN_KEYS if k in g}}
    setup = prepare(prompts, g["pool"], device=None, download=False, **kw)
    keys = completion_keys(setup["plan"], prompts, setup["pool"], setup["settings"], setup["served"], setup["folders"])
    parts = os.path.join(out, "completions", PARTS)
    done = read_done(parts, keys)
    gen = _generation(prompts, setup, keys, done, kw["max_new_tokens"])
    if j.get("serve_local") and not os.path.isdir(j["serve_local"]):
        raise FileNotFoundError(f"judge.serve_local: {j['serve_local']}: no such model folder")
    server = SimpleNamespace(base_url="http://127.0.0.1:0/v1", model=j["serve_local"]) if j.get("serve_local") else None
    client = JudgeClient(judge_config(j, server))
    rows = _rows(prompts, setup["plan"], keys, done, kw["max_new_tokens"])
    cache = CacheView(os.path.join(out, "judged.jsonl.cache.jsonl"), bool(j.get("retry_failed")))
    judge = _judging(rows, client, cache, j)
    return {"prompts": len(prompts), "generate": gen, "judge": judge,
            "requests": gen["requests"] + judge["requests"], "cost": gen["cost"] + judge["cost"]}


def _generation(prompts, setup, keys, done, max_new_tokens) -> dict:
    by_id = {p["prompt_id"]: p for p in prompts}
    todo = [(pid, m, sp) for pid, items in setup["plan"].items() for m, _, sp in items
            if keys.get((pid, m)) not in done]
    served = [(pid, m, sp) for pid, m, sp in todo if m in setup["served"]]
    est = {"input_tokens": 0, "output_tokens": 0, "cost": 0.0}
    for pid, m, sp in served:
        cfg = setup["served"][m].client.config
        tin, tout = tokens(conversation(sp, by_id[pid]["instruction"])), max_new_tokens
        est["input_tokens"] += tin
        est["output_tokens"] += tout
        est["cost"] += (tin * cfg.price_input_per_mtok + tout * cfg.price_output_per_mtok) / 1e6
    planned = sum(len(v) for v in setup["plan"].values())
    return {"completions": planned, "done": planned - len(todo), "to_generate": len(todo),
            "in_process": len(todo) - len(served), "requests": len(served),
            "not_local": sorted(n for n, f in setup["folders"].items() if f is None), **est}


def _rows(prompts, plan, keys, done, max_new_tokens) -> list:
    """The judge's input rows: generated completions as they are, the others as distinct stand-ins
    of ``max_new_tokens`` tokens."""
    rows = []
    for p in prompts:
        comps = []
        for m, *_ in plan[p["prompt_id"]]:
            rec = done.get(keys.get((p["prompt_id"], m)))
            text = rec["response"] if rec else f"<{m}> " + "x" * (CHARS_PER_TOKEN * max_new_tokens)
            comps.append({"model": m, "response": text})
        rows.append({"instruction": p["instruction"], "source": p["source"], "completions": comps})
    return rows


def _judging(rows, client: JudgeClient, cache, j: dict) -> dict:
    per_request = j.get("completions_per_request", 1)
    slots, todo, cached = plan_requests(rows, client, cache, aspects=j.get("aspects", ASPECTS),
                                        per_request=per_request)
    cfg = client.config
    out_each = 1 if cfg.constrain_tokenizer else cfg.max_tokens
    tin = sum(tokens(request_messages(client, row, responses, aspect)) for row, responses, aspect in todo.values())
    tout = out_each * len(todo)
    return {"ratings": len(slots), "cached": cached, "completions_per_request": per_request, "requests": len(todo),
            "input_tokens": tin, "output_tokens": tout,
            "cost": (tin * cfg.price_input_per_mtok + tout * cfg.price_output_per_mtok) / 1e6}


def describe(plan: dict) -> str:
    """The dry run's report, a few lines."""
    g, j = plan["generate"], plan["judge"]
    return "\n".join([
        f"aif --dry-run: {plan['prompts']} prompts; nothing was loaded, sent or written",
        f"  generate: {g['completions']} completions planned, {g['done']} done, {g['to_generate']} to generate "
        f"({g['in_process']} in process, {g['requests']} endpoint requests: ~{g['input_tokens']} input tokens, "
        f"<= {g['output_tokens']} output tokens, est. cost {g['cost']:.4f})"
        + (f"; not local yet (Hub ids, downloaded by the run): {', '.join(g['not_local'])}" if g["not_local"] else ""),
        f"  judge: {j['ratings']} ratings, {j['cached']} cached; {j['requests']} requests "
        f"({j['completions_per_request']} completions per request): ~{j['input_tokens']} input tokens, "
        f"<= {j['output_tokens']} output tokens, est. cost {j['cost']:.4f}",
        f"  total: {plan['requests']} requests, est. cost {plan['cost']:.4f} (first tries; re-asks and retries on top)"])
