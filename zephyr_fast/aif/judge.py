"""``zephyr-fast judge``: rate completions with UltraFeedback's four aspects through any
OpenAI-compatible endpoint, cached on disk, into rows that ``binarize`` reads unchanged.

Input rows (``zephyr-fast generate`` writes them; raw UltraFeedback without annotations)::

    {"instruction": str, "source"?: str, "world_knowledge"?: str,
     "completions": [{"model": str, "response": str, ...}, ...]}

Output rows: the same, each completion with UltraFeedback's ``annotations`` added —
``{aspect: {"Rating": "1".."5" | "N/A" | "FAILED", "Rationale": str, "Weighted Rating"?: float}}`` —
and ``fine-grained_score`` (mean of the numeric ratings), plus ``judge`` (model, template version,
failed aspects).  ``FAILED`` marks an answer that stayed unparseable after every re-ask; it is
listed in ``OUT.failures.jsonl`` and counted in the report (and by ``binarize``).

CLI::

    zephyr-fast judge IN.jsonl OUT.jsonl [--cache CACHE.jsonl] [--base-url URL] [--judge-model NAME]
        [--concurrency 8] [--max-retries 5] [--timeout 120] [--top-logprobs 5]
        [--constrain-tokenizer DIR] [--aspects a,b] [--price-in X --price-out Y] [--retry-failed]
        [--completions-per-request 1|2|3|4] [--overwrite_output_dir]

``--completions-per-request 4`` sends UltraFeedback's own request (a prompt's four completions in one
request per aspect: a quarter of the requests, the rubric sent once); 1 (default) rates each alone,
so that a rating depends only on its own key.  Each mode has its own template version in the keys.

The cache (default ``OUT.cache.jsonl``) is append-only: kill the run at any point and rerun the same
command; only items not in the cache are sent.  A rating's key is the endpoint, the template version
and the exact request; its line is sealed and re-parsed when read (an edited or damaged line is asked
again).  Only answers are cached: requests that fail for good (server down after all retries, or
answers that are not chat completions) are not, the run exits 1 without writing OUT, and the rerun
sends only those; ``--retry-failed`` also asks again for answers that never parsed.  OUT and the
cache are locked for the run (one writer; ``zephyr_fast.outputs``).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from dataclasses import dataclass, field
from typing import Optional, Sequence

from ..outputs import claim_file
from .client import JudgeClient, JudgeConfig, JudgeRequestError, cli_status
from .scoring import ask_until_parsed, weighted_rating
from .store import JudgeCache, read_input_jsonl, write_jsonl_atomic
from .ultrafeedback import (ASPECTS, MAX_TEXTS, MULTI_TEMPLATE_VERSION, RATINGS, TEMPLATE_VERSION, judge_messages,
                            judge_messages_multi, parse_rating, parse_ratings)


@dataclass
class JudgeReport:
    rows: int = 0
    completions: int = 0
    items: int = 0
    cached: int = 0
    judged: int = 0
    unparseable: int = 0
    reasks: int = 0
    weighted: int = 0
    request_errors: int = 0
    damaged_cache_lines: int = 0
    errors: list = field(default_factory=list)
    usage: dict = field(default_factory=dict)

    def __str__(self) -> str:
        u = self.usage
        return (f"judge: {self.items} ratings for {self.completions} completions of {self.rows} prompts: "
                f"{self.cached} from cache, {self.judged} judged now ({self.reasks} re-asks), "
                f"{self.unparseable} unparseable (recorded as FAILED), {self.request_errors} request failures; "
                f"{u.get('requests', 0)} requests, {u.get('retries', 0)} retries, {u.get('prompt_tokens', 0)} prompt + "
                f"{u.get('completion_tokens', 0)} completion tokens, cost {u.get('cost', 0.0):.4f}"
                + (f"; {self.damaged_cache_lines} damaged cache lines ignored (asked again)"
                   if self.damaged_cache_lines else ""))


def check_rows(rows: Sequence, source: str) -> None:
    """Raise ValueError naming file, row and field at the first malformed row."""
    for i, row in enumerate(rows):
        where = f"{source}: row {i}"
        if not isinstance(row, dict):
            raise ValueError(f"{where}: expected an object")
        if not isinstance(row.get("instruction"), str) or not row["instruction"].strip():
            raise ValueError(f"{where}, field 'instruction': expected a non-empty string")
        comps = row.get("completions")
        if not isinstance(comps, list) or not comps:
            raise ValueError(f"{where}, field 'completions': expected a non-empty list")
        for j, c in enumerate(comps):
            if not isinstance(c, dict) or not isinstance(c.get("response"), str):
                raise ValueError(f"{where}, field 'completions[{j}].response': expected a string")


def _version(client: JudgeClient) -> str:
    return TEMPLATE_VERSION + ("+constrained" if client.config.constrain_tokenizer else "")


def _messages(row: dict, response: str, aspect: str, constrained: bool) -> list:
    return judge_messages(aspect, row["instruction"], response, row.get("world_knowledge"), constrained)


def _item_key(client: JudgeClient, bias, row: dict, response: str, aspect: str) -> str:
    """The endpoint, judge model, template version and the exact request of one rating."""
    constrained = bool(client.config.constrain_tokenizer)
    return client.request_key(_version(client), _messages(row, response, aspect, constrained), logit_bias=bias,
                              max_tokens=1 if constrained else None)


def _multi_key(client: JudgeClient, row: dict, responses: list, aspect: str) -> str:
    """The endpoint, judge model, multi-text template version and the exact request of 2-4 ratings."""
    return client.request_key(MULTI_TEMPLATE_VERSION, _multi_messages(row, responses, aspect))


def _multi_messages(row: dict, responses: list, aspect: str) -> list:
    return judge_messages_multi(aspect, row["instruction"], responses, row.get("world_knowledge"))


def cached_rating_is_consistent(rec: dict) -> bool:
    """A cache record's rating is what its raw answer says (re-parsed): an edited rating is refused."""
    aspect = rec.get("aspect")
    if aspect not in ASPECTS or not isinstance(rec.get("raw"), str):
        return False
    if "texts" in rec:
        return _multi_is_consistent(rec, aspect)
    parsed = parse_rating(aspect, rec["raw"])
    if rec.get("status") == "ok":
        return parsed is not None and isinstance(rec.get("parsed"), dict) and \
            rec["parsed"].get("Rating") == parsed["Rating"]
    return rec.get("status") == "unparseable" and parsed is None


def _multi_is_consistent(rec: dict, aspect: str) -> bool:
    n = rec["texts"]
    if isinstance(n, bool) or not isinstance(n, int) or not 2 <= n <= MAX_TEXTS:
        return False
    parsed = parse_ratings(aspect, rec["raw"], n)
    if rec.get("status") == "ok":
        stored = rec.get("parsed", {}).get("texts") if isinstance(rec.get("parsed"), dict) else None
        weighted = rec.get("weighted")
        return parsed is not None and isinstance(stored, list) and isinstance(weighted, list) and \
            len(weighted) == n and [t.get("Rating") if isinstance(t, dict) else None for t in stored] == \
            [t["Rating"] for t in parsed["texts"]]
    return rec.get("status") == "unparseable" and parsed is None


def _annotation(rec: Optional[dict], index: Optional[int] = None) -> dict:
    """UltraFeedback's annotation of one rating: ``rec`` a cache record, ``index`` the text's place
    in a multi-text request (None: a single-text one)."""
    if rec is None or rec["status"] != "ok":
        answers = rec["answers"] if rec else 0
        return {"Rating": "FAILED", "Rationale": "", "judge_error": f"unparseable after {answers} answers",
                "raw": rec["raw"] if rec else ""}
    p = rec["parsed"] if index is None else rec["parsed"]["texts"][index]
    weighted = rec.get("weighted") if index is None else rec["weighted"][index]
    ann = {"Rating": p["Rating"], "Rationale": p["Rationale"]}
    if weighted is not None:
        ann["Weighted Rating"] = weighted
    return ann


def plan_requests(rows: list, client: JudgeClient, cache: Optional[JudgeCache], *, aspects: Sequence[str] = ASPECTS,
                  per_request: int = 1) -> tuple:
    """Which requests rate ``rows``: ``(slots, todo, cached)``.

    ``slots[(row, completion, aspect)] = (key, index)`` (``index``: the completion's place in a
    multi-text request, None for a single-text one); ``todo[key] = (row, responses, aspect)`` the
    distinct requests not in ``cache`` -- what a run sends first (``zephyr-fast aif --dry-run``
    counts the same); ``cached`` the ratings found in ``cache``.  ``per_request``: completions
    rated together (1: each alone; 2-4: UltraFeedback's multi-text request; a last group of one
    is a single-text request).
    """
    if not (isinstance(per_request, int) and 1 <= per_request <= MAX_TEXTS):
        raise ValueError(f"judge: completions_per_request must be 1 to {MAX_TEXTS}, got {per_request!r}")
    constrained = bool(client.config.constrain_tokenizer)
    if constrained and per_request > 1:
        raise ValueError("judge: completions_per_request > 1 needs an unconstrained judge (a constrained one "
                         "answers a single rating token)")
    bias = client.rating_bias(RATINGS)
    slots, todo, cached = {}, {}, 0
    for i, row in enumerate(rows):
        comps = row["completions"]
        for a in aspects:
            for start in range(0, len(comps), per_request):
                group = list(range(start, min(start + per_request, len(comps))))
                responses = [comps[j]["response"] for j in group]
                key = _multi_key(client, row, responses, a) if len(group) > 1 else \
                    _item_key(client, bias, row, responses[0], a)
                for place, j in enumerate(group):
                    slots[(i, j, a)] = (key, place if len(group) > 1 else None)
                if cache is not None and key in cache:
                    cached += len(group)
                elif key not in todo:
                    todo[key] = (row, responses, a)
    return slots, todo, cached


def judge_rows(rows: list, client: JudgeClient, cache: JudgeCache, *, aspects: Sequence[str] = ASPECTS,
               progress: bool = True, per_request: int = 1) -> tuple:
    """Rate every (completion, aspect) of ``rows`` not yet in ``cache`` (``per_request``: see
    :func:`plan_requests`).

    Returns:
        ``(out_rows | None, report, failures)``; ``out_rows`` is None when requests failed for good
        (the failed items are not cached, so calling again sends only them).
    """
    cfg = client.config
    slots, todo, cached = plan_requests(rows, client, cache, aspects=aspects, per_request=per_request)
    report = JudgeReport(rows=len(rows), damaged_cache_lines=cache.stats.get("damaged", 0), items=len(slots),
                         cached=cached, completions=sum(len(r["completions"]) for r in rows))

    def run(item):
        k, (row, responses, aspect) = item
        rec = _ask(client, row, responses, aspect)
        return cache.put(k, {"aspect": aspect, "judge_model": cfg.model, "endpoint": cfg.endpoint, **rec})

    for res in client.map(run, list(todo.items()), desc="judge", progress=progress):
        if isinstance(res, JudgeRequestError):
            report.request_errors += 1
            report.errors.append(str(res))
        elif isinstance(res, Exception):
            raise res
        else:
            report.judged += 1
            report.reasks += res["reasks"]
    report.usage = client.usage.as_dict()
    if report.request_errors:
        return None, report, []
    return _assemble(rows, cache, slots, cfg.model, aspects, report)


def request_messages(client: JudgeClient, row: dict, responses: list, aspect: str) -> list:
    """The messages of one planned request (:func:`plan_requests`' ``todo`` values)."""
    if len(responses) == 1:
        return _messages(row, responses[0], aspect, bool(client.config.constrain_tokenizer))
    return _multi_messages(row, responses, aspect)


def _ask(client: JudgeClient, row: dict, responses: list, aspect: str) -> dict:
    """One request, re-asked until it parses: a single-text rating or a multi-text one."""
    msgs = request_messages(client, row, responses, aspect)
    if len(responses) == 1:
        constrained = bool(client.config.constrain_tokenizer)
        rec = ask_until_parsed(client, msgs, lambda t: parse_rating(aspect, t), values=RATINGS,
                               logit_bias=client.rating_bias(RATINGS), max_tokens=1 if constrained else None)
        return {"template_version": _version(client), **rec}
    n = len(responses)

    def weigh(res, parsed):
        return [weighted_rating(res.logprobs, res.text, p["rating_offset"], RATINGS, p["rating_text"])
                for p in parsed["texts"]]
    rec = ask_until_parsed(client, msgs, lambda t: parse_ratings(aspect, t, n), values=RATINGS, weigh=weigh)
    return {"template_version": MULTI_TEMPLATE_VERSION, "texts": n, **rec,
            "weighted": rec["weighted"] if rec["status"] == "ok" else [None] * n}


def _assemble(rows, cache, slots, judge_model, aspects, report):
    out, failures = [], []
    for i, row in enumerate(rows):
        comps = []
        for j, c in enumerate(row["completions"]):
            anns, failed, versions = {}, [], set()
            for a in aspects:
                key, index = slots[(i, j, a)]
                rec = cache.get(key)
                versions.add(rec["template_version"] if rec else None)
                anns[a] = _annotation(rec, index)
                if anns[a]["Rating"] == "FAILED":
                    failed.append(a)
                    failures.append({"row": i, "completion": j, "aspect": a, "raw": anns[a]["raw"]})
                elif "Weighted Rating" in anns[a]:
                    report.weighted += 1
            nums = [float(x["Rating"]) for x in anns.values() if x["Rating"] not in ("N/A", "FAILED")]
            comps.append({**c, "annotations": anns, "fine-grained_score": sum(nums) / len(nums) if nums else None,
                          "judge": {"model": judge_model, "template_version": "|".join(sorted(v for v in versions if v)),
                                    "failed_aspects": failed}})
        out.append({**row, "completions": comps})
    report.unparseable = len(failures)
    return out, report, failures


def judge_file(input_path: str, output_path: str, config: JudgeConfig, *, cache_path: Optional[str] = None,
               aspects: Sequence[str] = ASPECTS, progress: bool = True, retry_failed: bool = False,
               overwrite: bool = False, per_request: int = 1) -> JudgeReport:
    """Judge ``input_path`` into ``output_path`` (+ ``.failures.jsonl``); see the module docstring.

    ``retry_failed``: ask again for the ratings that stayed unparseable in an earlier run.
    ``overwrite``: replace an existing ``output_path`` that zephyr_fast did not write.
    ``per_request``: completions rated in one request (1, or 2-4: UltraFeedback's multi-text request).

    Raises:
        JudgeRequestError: some requests failed for good (after writing the cache of the others).
        OutputError: the output or cache is an input, foreign, or being written by another run.
    """
    cache_path = cache_path or output_path + ".cache.jsonl"
    rows = read_input_jsonl(input_path)
    check_rows(rows, input_path)
    client = JudgeClient(config)
    with contextlib.ExitStack() as held:
        held.enter_context(claim_file(output_path, "judge", inputs={"input": input_path}, overwrite=overwrite))
        held.enter_context(claim_file(cache_path, "judge", inputs={"input": input_path}, overwrite=True))
        cache = held.enter_context(contextlib.closing(
            JudgeCache(cache_path, valid=cached_rating_is_consistent, retry_failed=retry_failed)))
        out, report, failures = judge_rows(rows, client, cache, aspects=aspects, progress=progress,
                                           per_request=per_request)
        if out is None:
            raise JudgeRequestError(f"{report}; {report.request_errors} requests failed for good (first: "
                                    f"{report.errors[0]}); rerun the same command to judge only what is missing")
        write_jsonl_atomic(output_path, out)
        write_jsonl_atomic(output_path + ".failures.jsonl", failures)
    return report


def add_judge_args(ap: argparse.ArgumentParser) -> None:
    """Judge endpoint options shared by ``judge`` and ``mt-bench`` (defaults from the environment)."""
    ap.add_argument("--base-url", help="OpenAI-compatible base URL (env ZEPHYR_JUDGE_BASE_URL / OPENAI_BASE_URL)")
    ap.add_argument("--judge-model", help="judge model name (env ZEPHYR_JUDGE_MODEL)")
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--max-retries", type=int, default=5)
    ap.add_argument("--max-reasks", type=int, default=3)
    ap.add_argument("--timeout", type=float, default=120.0)
    ap.add_argument("--top-logprobs", type=int, default=0, help="ask for top log-probs: weighted rating")
    ap.add_argument("--constrain-tokenizer", help="tokenizer dir of a small local judge: force rating tokens")
    ap.add_argument("--price-in", type=float, default=0.0, help="cost per 1M prompt tokens")
    ap.add_argument("--price-out", type=float, default=0.0, help="cost per 1M completion tokens")
    ap.add_argument("--no-progress", action="store_true")


def judge_config_from_args(args) -> JudgeConfig:
    return JudgeConfig.from_env(base_url=args.base_url, model=args.judge_model, concurrency=args.concurrency,
                                max_retries=args.max_retries, max_reasks=args.max_reasks, timeout=args.timeout,
                                top_logprobs=args.top_logprobs, constrain_tokenizer=args.constrain_tokenizer,
                                price_input_per_mtok=args.price_in, price_output_per_mtok=args.price_out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="zephyr-fast judge", description=__doc__.split("\n\n")[0])
    ap.add_argument("input")
    ap.add_argument("output")
    ap.add_argument("--cache", help="cache JSONL (default OUT.cache.jsonl)")
    ap.add_argument("--aspects", default=",".join(ASPECTS))
    ap.add_argument("--retry-failed", action="store_true", help="ask again for ratings that never parsed")
    ap.add_argument("--completions-per-request", type=int, default=1,
                    help="1: each completion rated alone; 2-4: a prompt's completions in one request per aspect "
                         "(UltraFeedback's template; fewer requests and tokens, ratings depend on the group)")
    ap.add_argument("--overwrite_output_dir", "--overwrite", action="store_true",
                    help="replace an existing OUT that zephyr_fast did not write")
    add_judge_args(ap)
    args = ap.parse_args(argv)
    aspects = [a for a in args.aspects.split(",") if a]

    def body():
        if any(a not in ASPECTS for a in aspects):
            raise ValueError(f"--aspects: expected a comma list of {ASPECTS}, got {args.aspects!r}")
        print(judge_file(args.input, args.output, judge_config_from_args(args), cache_path=args.cache,
                         aspects=aspects, progress=not args.no_progress, retry_failed=args.retry_failed,
                         overwrite=args.overwrite_output_dir, per_request=args.completions_per_request))
    return cli_status(body)

if __name__ == "__main__":
    sys.exit(main())
