"""``zephyr-fast mt-bench MODEL_DIR``: answer MT-Bench's 80 questions and grade them with FastChat's
single-answer judge prompts through the AIF judge client.

Protocol (FastChat ``llm_judge``; its data files are in ``zephyr_fast/eval/data/``):

* answers: both turns, the second with the first answer in the conversation, rendered with the
  model's chat template exactly as in training (``zephyr_fast.model.generate``: empty system turn
  prepended); temperature per category (writing/roleplay 0.7, stem/humanities 0.1, others greedy);
  ``max_new_tokens`` 1024.  Saved in FastChat's ``model_answer`` format
  (``{"question_id", "answer_id", "model_id", "choices": [{"index": 0, "turns": [a1, a2]}], "tstamp"}``,
  plus ``identity`` and ``digest``), append-only per question, so an interrupted run resumes.  An
  answer is reused only when its ``identity`` -- the model's content fingerprint, the chat template
  and question as rendered, temperature, ``max_new_tokens``, seed -- is this run's and its line's
  ``digest`` verifies: a retrained model answers again, by construction.
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

from ..aif.client import JudgeClient, JudgeConfig, cli_status
from ..aif.judge import add_judge_args, judge_config_from_args
from ..aif.store import AppendLog, JudgeCache, cache_key, iter_jsonl, iter_sealed, read_input_jsonl
from ..data.chat import load_tokenizer
from ..model import generate, load_model
from ..model.generate import prompt_texts
from ..outputs import claim_folder
from ..training.fingerprint import local_fingerprint
from .grading import cached_grade_is_consistent, grade_pairwise, grade_single
from .report import build_report, write_report

REPO = pathlib.Path(__file__).resolve().parents[2]
QUESTIONS = REPO / "assets" / "data" / "mt_bench" / "question.jsonl"
DATA = pathlib.Path(__file__).resolve().parent / "data"
# FastChat llm_judge/common.py temperature_config
TEMPERATURE = {"writing": 0.7, "roleplay": 0.7, "extraction": 0.0, "math": 0.0, "coding": 0.0, "reasoning": 0.0,
               "stem": 0.1, "humanities": 0.1}
ANSWER_VERSION = "mt-bench-answer-v1"  # what an answer's identity hashes (answer_identities)


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
    """``question_id -> [turn 1 answer, turn 2 answer]`` from a FastChat ``model_answer`` file (an input:
    a bad line is one error naming file and line)."""
    out = {}
    for i, rec in enumerate(iter_jsonl(path, tolerate_torn=False), 1):
        turns = _turns(rec)
        if turns is None or not isinstance(rec.get("question_id"), (int, str)):
            raise ValueError(f"{path}: line {i}, field 'question_id' / 'choices[0].turns': expected an id and two "
                             "answers")
        out[rec["question_id"]] = turns
    return out


def _turns(rec: dict) -> Optional[list]:
    choices = rec.get("choices") if isinstance(rec, dict) else None
    turns = choices[0].get("turns") if isinstance(choices, list) and choices and isinstance(choices[0], dict) else None
    return turns if isinstance(turns, list) and len(turns) == 2 and all(isinstance(t, str) for t in turns) else None


def answer_identities(model_dir: str, tok, questions: list, *, max_new_tokens: int, seed: int) -> dict:
    """``question_id -> identity`` of an answer: the model's content fingerprint, the rendered first turn
    (chat template and question), the second turn, the category's temperature, max_new_tokens, seed."""
    fingerprint = local_fingerprint(model_dir)
    rendered = prompt_texts(tok, [[{"role": "user", "content": q["turns"][0]}] for q in questions])
    return {q["question_id"]: cache_key(ANSWER_VERSION, fingerprint, text, q["turns"][1], TEMPERATURE[q["category"]],
                                        max_new_tokens, seed) for q, text in zip(questions, rendered)}


def read_own_answers(path: str, identities: dict, counter: Optional[dict] = None) -> dict:
    """The answers of ``path`` (sealed lines) made by this model with these settings: lines of another
    model, other settings, another question text, or damaged ones are not answers to reuse."""
    out = {}
    for rec in iter_sealed(path, counter):
        qid = rec.get("question_id")
        if _turns(rec) is not None and isinstance(qid, (int, str)) and identities.get(qid) == rec.get("identity"):
            out[qid] = _turns(rec)
    return out


def answer_questions(model_dir: str, questions: list, out_path: str, *, model_id: Optional[str] = None,
                     max_new_tokens: int = 1024, batch_size: int = 8, seed: int = 0, device: Optional[str] = None,
                     progress: bool = True) -> dict:
    """Answer both turns of every question not yet answered in ``out_path`` by this model with these
    settings (:func:`answer_identities`); returns this model's answers by id."""
    tok = load_tokenizer(model_dir)
    ids = answer_identities(model_dir, tok, questions, max_new_tokens=max_new_tokens, seed=seed)
    done = read_own_answers(out_path, ids)
    todo = [q for q in questions if q["question_id"] not in done]
    if not todo:
        return done
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = load_model(model_dir).to(device).eval()
    model_id = model_id or os.path.basename(os.path.normpath(model_dir))
    bar = tqdm(total=2 * len(todo), desc="mt-bench answers", disable=not progress)
    with AppendLog(out_path, sealed=True) as log:
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
                            "choices": [{"index": 0, "turns": [a1.strip(), a2.strip()]}], "tstamp": time.time(),
                            "identity": ids[q["question_id"]]})
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
                 batch_size: int = 8, progress: bool = True, retry_failed: bool = False,
                 overwrite: bool = False) -> dict:
    """Answer (unless ``answers_path`` is given), grade, report; returns the report dict.

    Raises:
        JudgeRequestError: judge requests failed for good (graded items are cached; rerun).
        OutputError: ``out_dir`` is an input, a foreign folder, or being written by another run.
    """
    client = JudgeClient(judge)
    questions = load_questions(per_category=per_category)
    inputs = {"model_dir": model_dir, "--answers": answers_path, "--baseline": baseline}
    with claim_folder(out_dir, "mt-bench", inputs=inputs, overwrite=overwrite):
        if model_dir:
            answers = answer_questions(model_dir, questions, answers_path or os.path.join(out_dir, "answers.jsonl"),
                                       max_new_tokens=max_new_tokens, batch_size=batch_size, progress=progress)
        else:
            answers = read_answers(answers_path)
        missing = [q["question_id"] for q in questions if q["question_id"] not in answers]
        if missing:
            raise ValueError(f"{answers_path}: no answers for questions {missing[:10]}")
        cache = JudgeCache(os.path.join(out_dir, "judge_cache.jsonl"), valid=cached_grade_is_consistent,
                           retry_failed=retry_failed)
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
        report["damaged_cache_lines"] = cache.stats["damaged"]
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
    ap.add_argument("--retry-failed", action="store_true", help="ask again for grades that never parsed")
    ap.add_argument("--overwrite_output_dir", "--overwrite", action="store_true",
                    help="write into an existing folder that zephyr_fast did not create")
    add_judge_args(ap)
    a = ap.parse_args(argv)
    if not a.model_dir and not a.answers:
        ap.error("give MODEL_DIR or --answers")
    out = a.out or os.path.join(a.model_dir or os.path.dirname(a.answers), "mt_bench")

    def body():
        report = run_mt_bench(a.model_dir, out, judge_config_from_args(a), answers_path=a.answers,
                              per_category=a.per_category, baseline=a.baseline, max_new_tokens=a.max_new_tokens,
                              batch_size=a.batch_size, progress=not a.no_progress, retry_failed=a.retry_failed,
                              overwrite=a.overwrite_output_dir)
        print(report["table"])
        print(json.dumps({k: report[k] for k in ("overall", "turn_1", "turn_2", "failures")}))
    return cli_status(body)

if __name__ == "__main__":
    sys.exit(main())
