"""``zephyr-fast mt-bench MODEL_DIR``: answer MT-Bench's 80 questions and grade them with FastChat's
single-answer judge prompts through the AIF judge client.

Protocol (FastChat ``llm_judge``; its data files are in ``zephyr_fast/eval/data/``):

* answers: both turns, the second with the first answer in the conversation, rendered with the
  model's chat template exactly as in training (``zephyr_fast.model.generate``: empty system turn
  prepended); temperature per category (writing/roleplay 0.7, stem/humanities 0.1, others greedy);
  ``max_new_tokens`` 1024.  Saved in FastChat's ``model_answer`` format
  (``{"question_id", "answer_id", "model_id", "choices": [{"index": 0, "turns": [a1, a2]}], "tstamp"}``),
  append-only per question, so an interrupted run resumes.
* grading: ``single-v1`` (turn 1) / ``single-v1-multi-turn`` (turn 2); for math, reasoning and coding
  the ``single-math-v1*`` prompts with GPT-4's reference answers.  The score is the ``[[r]]`` in the
  judge's answer (FastChat's patterns, 1-10); an unparseable answer is re-asked, then recorded as a
  failure (score -1 in FastChat) and left out of the means — counted in the report, never dropped.
* optional pairwise (``--baseline ANSWERS.jsonl``): ``pair-v2`` / ``pair-math-v1`` (+ multi-turn),
  both orders; a verdict that flips with the order counts as a tie (FastChat's rule); win rate =
  (wins + ties / 2) / games.

Outputs in ``OUT_DIR``: ``answers.jsonl``, ``judgments.jsonl``, ``report.json`` (per-category,
per-turn and overall means), ``report.md`` (table) and ``radar.png``.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import pathlib
import sys
import time
import uuid
from typing import Optional

import torch
from tqdm.auto import tqdm

from ..data.chat import load_tokenizer
from ..model import generate, load_model
from ..aif.client import JudgeClient, JudgeConfig, cli_status
from ..aif.judge import add_judge_args, judge_config_from_args
from ..aif.store import AppendLog, JudgeCache, iter_jsonl, read_input_jsonl
from .grading import grade_pairwise, grade_single
from .report import build_report, write_report

REPO = pathlib.Path(__file__).resolve().parents[2]
QUESTIONS = REPO / "assets" / "data" / "mt_bench" / "question.jsonl"
DATA = pathlib.Path(__file__).resolve().parent / "data"
# FastChat llm_judge/common.py temperature_config
TEMPERATURE = {"writing": 0.7, "roleplay": 0.7, "extraction": 0.0, "math": 0.0, "coding": 0.0, "reasoning": 0.0,
               "stem": 0.1, "humanities": 0.1}


def load_questions(path: str = str(QUESTIONS), per_category: Optional[int] = None) -> list:
    """MT-Bench questions (file order); ``per_category``: the first N of each category."""
    out, seen = [], {}
    for i, q in enumerate(read_input_jsonl(path)):
        if not isinstance(q.get("turns"), list) or len(q["turns"]) != 2 or q.get("category") not in TEMPERATURE:
            raise ValueError(f"{path}: row {i}, field 'turns'/'category': expected 2 turns and a known category")
        seen[q["category"]] = seen.get(q["category"], 0) + 1
        if per_category is None or seen[q["category"]] <= per_category:
            out.append(q)
    return out


@functools.lru_cache(maxsize=None)
def judge_prompts() -> dict:
    return {p["name"]: p for p in iter_jsonl(str(DATA / "judge_prompts.jsonl"), tolerate_torn=False)}


@functools.lru_cache(maxsize=None)
def references() -> dict:
    return {r["question_id"]: r["choices"][0]["turns"]
            for r in iter_jsonl(str(DATA / "reference_answer_gpt-4.jsonl"), tolerate_torn=False)}


def read_answers(path: str) -> dict:
    """``question_id -> [turn 1 answer, turn 2 answer]`` from a FastChat ``model_answer`` file."""
    out = {}
    for i, rec in enumerate(iter_jsonl(path, tolerate_torn=True)):
        turns = (rec.get("choices") or [{}])[0].get("turns")
        if not isinstance(turns, list) or len(turns) != 2:
            raise ValueError(f"{path}: row {i}, field 'choices[0].turns': expected two answers")
        out[rec["question_id"]] = turns
    return out


def answer_questions(model_dir: str, questions: list, out_path: str, *, model_id: Optional[str] = None,
                     max_new_tokens: int = 1024, batch_size: int = 8, seed: int = 0, device: Optional[str] = None,
                     progress: bool = True) -> dict:
    """Answer both turns of every question not yet in ``out_path``; returns all answers by id."""
    done = read_answers(out_path) if os.path.exists(out_path) else {}
    todo = [q for q in questions if q["question_id"] not in done]
    if not todo:
        return done
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, tok = load_model(model_dir).to(device).eval(), load_tokenizer(model_dir)
    model_id = model_id or os.path.basename(os.path.normpath(model_dir))
    bar = tqdm(total=2 * len(todo), desc="mt-bench answers", disable=not progress)
    with AppendLog(out_path) as log:
        for i in range(0, len(todo), batch_size):
            chunk = todo[i:i + batch_size]
            convs = [[{"role": "user", "content": q["turns"][0]}] for q in chunk]
            first = _gen_by_temperature(generate, model, tok, chunk, convs, max_new_tokens, seed)
            bar.update(len(chunk))
            convs = [c + [{"role": "assistant", "content": a}, {"role": "user", "content": q["turns"][1]}]
                     for c, a, q in zip(convs, first, chunk)]
            second = _gen_by_temperature(generate, model, tok, chunk, convs, max_new_tokens, seed + 1)
            bar.update(len(chunk))
            for q, a1, a2 in zip(chunk, first, second):
                log.append({"question_id": q["question_id"], "answer_id": uuid.uuid4().hex, "model_id": model_id,
                            "choices": [{"index": 0, "turns": [a1.strip(), a2.strip()]}], "tstamp": time.time()})
                done[q["question_id"]] = [a1.strip(), a2.strip()]
    bar.close()
    return done


def _gen_by_temperature(generate, model, tok, questions, convs, max_new_tokens, seed) -> list:
    out = [None] * len(questions)
    for temp in sorted({TEMPERATURE[q["category"]] for q in questions}):
        idx = [i for i, q in enumerate(questions) if TEMPERATURE[q["category"]] == temp]
        texts = generate(model, tok, [convs[i] for i in idx], max_new_tokens=max_new_tokens, do_sample=temp > 0,
                         temperature=temp or 1.0, seed=seed, batch_size=len(idx))
        for i, t in zip(idx, texts):
            out[i] = t
    return out


def run_mt_bench(model_dir: Optional[str], out_dir: str, judge: JudgeConfig, *, answers_path: Optional[str] = None,
                 per_category: Optional[int] = None, baseline: Optional[str] = None, max_new_tokens: int = 1024,
                 batch_size: int = 8, progress: bool = True) -> dict:
    """Answer (unless ``answers_path`` is given), grade, report; returns the report dict.

    Raises:
        JudgeRequestError: judge requests failed for good (graded items are cached; rerun).
    """
    os.makedirs(out_dir, exist_ok=True)
    questions = load_questions(per_category=per_category)
    answers_path = answers_path or os.path.join(out_dir, "answers.jsonl")
    if model_dir:
        answers = answer_questions(model_dir, questions, answers_path, max_new_tokens=max_new_tokens,
                                   batch_size=batch_size, progress=progress)
    else:
        answers = read_answers(answers_path)
    missing = [q["question_id"] for q in questions if q["question_id"] not in answers]
    if missing:
        raise ValueError(f"{answers_path}: no answers for questions {missing[:10]}")
    client = JudgeClient(judge)
    cache = JudgeCache(os.path.join(out_dir, "judge_cache.jsonl"))
    try:
        single = grade_single(questions, answers, client, cache, judge_prompts(), references(), progress=progress)
        pairs = None
        if baseline:
            pairs = grade_pairwise(questions, answers, read_answers(baseline), client, cache, judge_prompts(),
                                   references(), progress=progress)
    finally:
        cache.close()
    report = build_report(single, pairs, model=model_dir or answers_path, judge=judge.model,
                          usage=client.usage.as_dict())
    write_report(report, single, pairs, out_dir)
    return report


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="zephyr-fast mt-bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("model_dir", nargs="?", help="model to answer with (omit with --answers)")
    ap.add_argument("--out", help="output dir (default MODEL_DIR/mt_bench)")
    ap.add_argument("--answers", help="grade this FastChat model_answer file instead of generating")
    ap.add_argument("--baseline", help="another model's answers: pairwise win rate")
    ap.add_argument("--per-category", type=int, help="first N questions of each category (default: all 10)")
    ap.add_argument("--max-new-tokens", type=int, default=1024)
    ap.add_argument("--batch-size", type=int, default=8)
    add_judge_args(ap)
    a = ap.parse_args(argv)
    if not a.model_dir and not a.answers:
        ap.error("give MODEL_DIR or --answers")
    out = a.out or os.path.join(a.model_dir or os.path.dirname(a.answers), "mt_bench")

    def body():
        report = run_mt_bench(a.model_dir, out, judge_config_from_args(a), answers_path=a.answers,
                              per_category=a.per_category, baseline=a.baseline, max_new_tokens=a.max_new_tokens,
                              batch_size=a.batch_size, progress=not a.no_progress)
        print(report["table"])
        print(json.dumps({k: report[k] for k in ("overall", "turn_1", "turn_2", "failures")}))
    return cli_status(body)

if __name__ == "__main__":
    sys.exit(main())
