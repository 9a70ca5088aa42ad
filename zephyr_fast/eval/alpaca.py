"""``zephyr-fast alpaca-eval MODEL_DIR``: AlpacaEval 1 and 2 through any OpenAI-compatible judge.

1. **Answers**: the AlpacaEval instructions, one user turn each, rendered with the model's chat template
   exactly as training renders them (``zephyr_fast.model.generate``, the empty system turn prepended),
   greedy, ``--max-new-tokens`` (default 2048); appended to ``OUT/model_outputs.parts.jsonl`` as they
   finish (sealed lines, keyed by the model's weights fingerprint and the settings: a rerun answers only
   what is missing), then ``OUT/model_outputs.json`` in AlpacaEval's format.
2. **Judging** against the baseline's outputs with AlpacaEval's own annotators (templates and configs in
   ``eval/data/alpaca_eval/annotators``): the baseline is ``output_1``, the model ``output_2``, their
   order switched per instruction as AlpacaEval seeds it (``"is_switched_outputs" + instruction + "0"``),
   the preference switched back (3 - p).

   * ``alpaca_eval_gpt4`` (AlpacaEval 1, baseline text-davinci-003): the ranking prompt, ``max_tokens``
     100, temperature 0; the answer is read with ``ast.literal_eval`` (never executed) and model_1's rank
     is the preference; an unparseable answer is re-asked (``--max-reasks``), then recorded as such.
   * ``weighted_alpaca_eval_gpt4_turbo`` (AlpacaEval 2, baseline GPT-4-1106-preview): one token, ``m``
     (output_1) or ``M``; preference = 2 - p(m) / (p(m) + p(M)) from the top-5 log-probs. An endpoint that
     returns no log-probs (``transformers serve``) gives the sampled token's verdict (1 or 2).

   Every judge call goes through the AIF :class:`~zephyr_fast.aif.store.JudgeCache`
   (``OUT/judge_cache.jsonl``), keyed by the endpoint, the annotator and the exact request: a rerun, or a
   run killed midway, sends only what is missing. A small local judge can be forced to answer with a
   verdict token (``--constrain-tokenizer``: ``logit_bias`` on ``m`` / ``M``, or ``1`` / ``2`` for the
   ranking annotator, which then reads the digit as model_1's rank).
3. **Row**: ``OUT/annotations.json`` (AlpacaEval's format) and ``OUT/leaderboard.json`` / ``.md``: win
   rate, standard error, wins / losses / draws, and for AlpacaEval 2 the length-controlled win rate
   (``alpaca_metrics``).

``--from-annotations FILE`` reads an annotation file in AlpacaEval's format (e.g. the published
``results/<model>/<annotator>/annotations.json``) and prints its leaderboard row without a judge.

The bundled baselines cover 32 of the 805 instructions (``PROVENANCE.md``); ``--baseline FILE``
(AlpacaEval's ``model_outputs.json`` of the baseline) evaluates on every instruction it covers.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import json
import math
import os
import random
import sys
from pathlib import Path
from typing import Optional

from ..aif.client import JudgeClient, JudgeConfig, cli_status
from ..aif.judge import add_judge_args, judge_config_from_args
from ..aif.store import JudgeCache
from ..fileio import atomic_open, first_line
from .alpaca_answers import answer_instructions
from .alpaca_metrics import format_row, leaderboard_row
from .grading import run_jobs

__all__ = ["ANNOTATORS", "judge_pairs", "load_annotations", "main", "run_alpaca_eval"]

DATA = Path(__file__).parent / "data" / "alpaca_eval"
VERSION = "alpaca_eval@cd543a1"
ANNOTATORS = {
    "alpaca_eval_gpt4": {"template": "alpaca_eval_gpt4/alpaca_eval.txt", "max_tokens": 100, "temperature": 0.0,
                         "baseline": "text_davinci_003.sample32.json", "verdicts": ("1", "2"), "lc": False},
    "weighted_alpaca_eval_gpt4_turbo": {"template": "weighted_alpaca_eval_gpt4_turbo/alpaca_eval_clf.txt",
                                        "max_tokens": 1, "temperature": 1.0, "top_logprobs": 5,
                                        "baseline": "gpt4_1106_preview.sample32.json", "verdicts": ("m", "M"),
                                        "lc": True},
}
ALIASES = {"1": "alpaca_eval_gpt4", "2": "weighted_alpaca_eval_gpt4_turbo"}


class AlpacaInputError(ValueError):
    """A bad input file: one line naming file, row and field."""


# ---- inputs --------------------------------------------------------------------------------------

def _read_json_list(path: str, fields: tuple) -> list:
    try:
        with open(path) as f:
            rows = json.load(f)
    except (OSError, ValueError) as e:
        raise AlpacaInputError(f"{path}: not a readable JSON file ({first_line(e)})") from None
    if not isinstance(rows, list):
        raise AlpacaInputError(f"{path}: expected a JSON list of records, got {type(rows).__name__}")
    for i, r in enumerate(rows):
        for k in fields:
            if not isinstance(r, dict) or k not in r:
                raise AlpacaInputError(f"{path}: row {i}: field {k!r}: missing")
            if k != "preference" and not isinstance(r[k], str):
                raise AlpacaInputError(f"{path}: row {i}: field {k!r}: expected text, got {type(r[k]).__name__}")
    return rows


def load_annotations(path: str) -> list:
    """An AlpacaEval annotation file; every row's ``preference`` a number in [1, 2], 0, or null (not judged)."""
    rows = _read_json_list(path, ("instruction", "output_1", "output_2", "preference"))
    for i, r in enumerate(rows):
        p = r["preference"]
        ok = p is None or (isinstance(p, (int, float)) and not isinstance(p, bool)
                           and (math.isnan(p) or p == 0 or 1 <= p <= 2))
        if not ok:
            raise AlpacaInputError(f"{path}: row {i}: field 'preference': {p!r} is not in [1, 2], 0 or null")
    return rows


def load_baseline(path: str) -> list:
    return _read_json_list(path, ("instruction", "output"))


def _instruction_index() -> dict:
    with open(DATA / "instructions805.json") as f:
        return {r["instruction"]: i for i, r in enumerate(json.load(f))}


# ---- judge ---------------------------------------------------------------------------------------

def judge_messages(template: str, instruction: str, output_1: str, output_2: str) -> list:
    """AlpacaEval's chat-ML template filled and split into OpenAI messages."""
    text = template.replace("{instruction}", instruction).replace("{output_1}", output_1) \
        .replace("{output_2}", output_2)
    out = []
    for chunk in text.split("<|im_start|>")[1:]:
        role, _, content = chunk.partition("\n")
        out.append({"role": role.strip(), "content": content.split("<|im_end|>")[0].strip()})
    return out


def is_switched(instruction: str, seed: int = 0) -> bool:
    """AlpacaEval's per-instruction order switch (``RandomSwitchTwoColumnsProcessor``, seeded on the instruction)."""
    return random.Random("is_switched_outputs" + instruction + str(seed)).choices([False, True], k=1)[0]


def parse_ranking(text: str) -> Optional[float]:
    """``alpaca_eval_gpt4``: model_1's rank (1 or 2) from the ranking list; a lone digit from a constrained judge."""
    if text.strip() in ("1", "2"):
        return float(text.strip())
    try:
        ranking = ast.literal_eval(text.strip())
        rank = [c for c in ranking if c["model"] == "model_1"][0]["rank"]
    except (ValueError, SyntaxError, TypeError, KeyError, IndexError, MemoryError, RecursionError):
        return None
    return float(rank) if rank in (1, 2) else None


def logprob_preference(logprobs: Optional[list], text: str) -> Optional[float]:
    """``weighted_alpaca_eval_gpt4_turbo``: 2 - p(m) / (p(m) + p(M)) at the first token; the sampled token
    itself when the endpoint returned no log-probs."""
    if logprobs:
        top = {t.strip(): lp for t, lp in logprobs[0][2].items()} if logprobs[0][2] else {}
        found = {t: top[t] for t in ("m", "M") if t in top}
        if found:
            pm, pM = (math.exp(found.get(t, -math.inf)) for t in ("m", "M"))
            return 2 - pm / (pm + pM)
    return {"m": 1.0, "M": 2.0}.get(text.strip())


def _ask(client: JudgeClient, cache: JudgeCache, name: str, messages: list, bias: Optional[dict]) -> dict:
    a = ANNOTATORS[name]
    # a constrained judge answers with one verdict token (a digit for the ranking annotator)
    opts = dict(max_tokens=1 if bias else a["max_tokens"], logit_bias=bias, temperature=a["temperature"])
    key = client.request_key(f"{VERSION}:{name}", messages, **opts)
    hit = cache.get(key)
    if hit is not None:
        return hit
    rec = {"annotator": name, "status": "unparseable", "preference": None, "raw": "", "answers": 0}
    for _ in range(client.config.max_reasks + 1):
        res = client.chat(messages, **opts)
        rec["answers"] += 1
        rec["raw"] = res.text
        p = parse_ranking(res.text) if a["lc"] is False else logprob_preference(res.logprobs, res.text)
        if p is not None:
            rec.update(status="ok", preference=p)
            break
    return cache.put(key, rec)


def judge_pairs(pairs: list, annotator: str, client: JudgeClient, cache: JudgeCache, *, progress: bool = True) -> list:
    """AlpacaEval annotations of ``pairs`` (``instruction``, ``output_1`` = baseline, ``output_2`` = model, ...)."""
    a = ANNOTATORS[annotator]
    template = (DATA / "annotators" / a["template"]).read_text()
    bias = client.rating_bias(a["verdicts"])

    def job(pair: dict) -> dict:
        switched = is_switched(pair["instruction"])
        first, second = (pair["output_2"], pair["output_1"]) if switched else (pair["output_1"], pair["output_2"])
        rec = _ask(client, cache, annotator, judge_messages(template, pair["instruction"], first, second), bias)
        p = rec["preference"]
        return {**pair, "annotator": annotator, "preference": (3 - p) if (p is not None and switched) else p,
                "is_switched_outputs": switched, "raw_completion": rec["raw"], "status": rec["status"]}

    return run_jobs(client, [lambda pair=pair: job(pair) for pair in pairs], f"alpaca-eval {annotator}", progress,
                    what="alpaca-eval")


# ---- the run -------------------------------------------------------------------------------------

def run_alpaca_eval(model_dir: str, out_dir: str, judge: JudgeConfig, *, annotators: tuple,
                    baseline: Optional[str] = None, max_new_tokens: int = 2048, limit: Optional[int] = None,
                    lc: bool = True, progress: bool = True) -> dict:
    """Answers, judgments and leaderboard rows of ``model_dir`` (see the module docstring)."""
    os.makedirs(out_dir, exist_ok=True)
    index, generator = _instruction_index(), os.path.basename(os.path.normpath(model_dir))
    baselines = {name: load_baseline(baseline or str(DATA / ANNOTATORS[name]["baseline"])) for name in annotators}
    wanted = [r["instruction"] for r in next(iter(baselines.values()))][:limit]
    answers = answer_instructions(model_dir, wanted, out_dir, max_new_tokens=max_new_tokens, progress=progress)
    cache = JudgeCache(os.path.join(out_dir, "judge_cache.jsonl"))
    report = {"model": generator, "model_dir": model_dir, "n_instructions": len(wanted), "annotators": {}}
    try:
        for name in annotators:
            base = {r["instruction"]: r for r in baselines[name]}
            pairs = [{"instruction": ins, "dataset": base[ins].get("dataset", ""), "index": index.get(ins, -1),
                      "output_1": base[ins]["output"], "generator_1": base[ins].get("generator", "baseline"),
                      "output_2": answers[ins], "generator_2": generator} for ins in wanted if ins in base]
            # AlpacaEval 2 asks for the top-5 log-probs, AlpacaEval 1 for none
            client = JudgeClient(dataclasses.replace(judge, top_logprobs=ANNOTATORS[name].get("top_logprobs", 0)))
            annotations = judge_pairs(pairs, name, client, cache, progress=progress)
            _write_json(os.path.join(out_dir, f"annotations.{name}.json"), annotations)
            row = leaderboard_row(annotations, lc=lc and ANNOTATORS[name]["lc"])
            row["unparseable"] = sum(a["status"] != "ok" for a in annotations)
            row["usage"] = client.usage.as_dict()
            report["annotators"][name] = row
    finally:
        cache.close()
    _write_json(os.path.join(out_dir, "leaderboard.json"), report)
    with atomic_open(os.path.join(out_dir, "leaderboard.md")) as f:
        f.write("\n\n".join(format_row(generator, row, name) for name, row in report["annotators"].items()) + "\n")
    return report


def _write_json(path: str, obj) -> None:
    with atomic_open(path) as f:
        json.dump(obj, f, indent=1, default=float)


def _annotators(arg: str) -> tuple:
    names = tuple(ALIASES.get(a.strip(), a.strip()) for a in arg.split(",") if a.strip())
    bad = [n for n in names if n not in ANNOTATORS]
    if bad or not names:
        raise AlpacaInputError(f"--annotators: {bad[0] if bad else arg!r} is not one of 1, 2, "
                               f"{', '.join(ANNOTATORS)}")
    return names


def _from_annotations(path: str, lc: Optional[bool]) -> int:
    rows = load_annotations(path)
    index = _instruction_index()
    rows = [{"index": index.get(r["instruction"], -1), **r} for r in rows]  # the LC GLM's instruction difficulty
    annotator = rows[0].get("annotator") if rows else None
    lc = ANNOTATORS.get(annotator, {}).get("lc", False) if lc is None else lc
    name = rows[0].get("generator_2", os.path.basename(path)) if rows else path
    row = leaderboard_row(rows, lc=lc)
    print(format_row(name, row, annotator))
    print(json.dumps({"model": name, "annotator": annotator, **row}, default=float))
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="zephyr-fast alpaca-eval", description=__doc__.split("\n\n")[0])
    ap.add_argument("model_dir", nargs="?", help="the model folder to evaluate (a checkpoint folder works)")
    ap.add_argument("--from-annotations", help="an AlpacaEval annotations.json: print its leaderboard row, no judge")
    ap.add_argument("--lc", choices=("auto", "yes", "no"), default="auto",
                    help="the length-controlled win rate (alpaca_eval's GLM; needs its df_gamed.csv from the Hub): "
                         "auto = for AlpacaEval 2 annotations")
    ap.add_argument("--out", help="output folder (default outputs/alpaca_eval/<model>)")
    ap.add_argument("--annotators", default="1,2", help="1 (alpaca_eval_gpt4), 2 (weighted_alpaca_eval_gpt4_turbo)")
    ap.add_argument("--baseline", help="the baseline's AlpacaEval model_outputs.json (default: the bundled 32)")
    ap.add_argument("--limit", type=int, help="only the first N instructions")
    ap.add_argument("--max-new-tokens", type=int, default=2048)
    add_judge_args(ap)
    args = ap.parse_args(argv)
    try:
        if args.from_annotations:
            return _from_annotations(args.from_annotations, {"auto": None, "yes": True, "no": False}[args.lc])
        if not args.model_dir:
            raise AlpacaInputError("alpaca-eval: give MODEL_DIR, or --from-annotations FILE")
        names = _annotators(args.annotators)
        judge = judge_config_from_args(args)
    except AlpacaInputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = args.out or os.path.join("outputs", "alpaca_eval", os.path.basename(os.path.normpath(args.model_dir)))

    def body() -> None:
        run_alpaca_eval(args.model_dir, out, judge, annotators=names, baseline=args.baseline,
                        max_new_tokens=args.max_new_tokens, limit=args.limit, lc=args.lc != "no")
        print(open(os.path.join(out, "leaderboard.md")).read())
        print(f"report: {out}/leaderboard.json")

    return cli_status(body)


if __name__ == "__main__":
    sys.exit(main())
