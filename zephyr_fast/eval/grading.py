"""MT-Bench grading requests: FastChat's single-answer and pairwise judge prompts, their parsers.

Single: ``single-v1`` / ``single-math-v1`` for turn 1, the ``-multi-turn`` variants for turn 2
(math, reasoning and coding use the reference answers).  Judgment records::

    {"question_id", "category", "turn": 1|2, "judge_prompt", "status": "ok"|"unparseable",
     "score": float (1-10) | -1, "weighted": float | None, "answers": n, "raw": last judge answer}

Pairwise records add ``"winner": "model"|"baseline"|"tie"`` (and the two per-order verdicts).
Every judge call goes through the AIF :class:`~zephyr_fast.aif.store.JudgeCache`, keyed by the
endpoint, the prompt name + version and the exact request (model, messages, sampling settings), so
nothing is graded twice; a cached grade whose raw answer does not re-parse to it is asked again.
"""

from __future__ import annotations

import re
from typing import Optional

from ..aif.client import JudgeClient, JudgeRequestError
from ..aif.scoring import ask_until_parsed
from ..aif.store import JudgeCache

NEED_REF = ("math", "reasoning", "coding")
VERSION = "fastchat-llm_judge@0e6d3e4"
SCORE_VALUES = tuple(str(i) for i in range(1, 10))  # single-token ratings: the constraint, and weighting
# (an endpoint whose "10" is one token is weighted over 1-10; a split "1","0" gets no weighted score)
VERDICTS = ("A", "B", "C")


_SCORE = r"(\d+(?:\.\d+)?)"  # no nested quantifiers: linear time on any answer
_DOUBLE, _SINGLE, _BARE = re.compile(r"\[\[" + _SCORE + r"\]\]"), re.compile(r"\[" + _SCORE + r"\]"), \
    re.compile(r"\s*" + _SCORE + r"\s*")


def parse_score(text: str) -> Optional[dict]:
    """FastChat's ``[[r]]`` (then ``[r]``) pattern; a bare number (constrained judge); 1 <= r <= 10.

    Every ``[[r]]`` (or, without one, every ``[r]``) must give the same score: two different ones are
    ambiguous, and ambiguous is unparseable (re-asked), as is a score off the scale.
    """
    found = list(_DOUBLE.finditer(text)) or list(_SINGLE.finditer(text))
    bare = _BARE.fullmatch(text) if not found else None
    found = found or ([bare] if bare else [])
    if not found or len({float(m.group(1)) for m in found}) != 1 or not 1 <= float(found[0].group(1)) <= 10:
        return None
    m = found[0]
    return {"score": float(m.group(1)), "rating_offset": m.start(1), "rating_text": m.group(1)}


def parse_verdict(text: str) -> Optional[dict]:
    """``[[A]]`` / ``[[B]]`` / ``[[C]]`` (tie) -- exactly one of them; a bare letter from a constrained judge."""
    given = [v for v in VERDICTS if f"[[{v}]]" in text]
    if len(given) == 1:
        return {"verdict": given[0]}
    m = re.fullmatch(r"\s*([ABC])\s*", text) if not given else None
    return {"verdict": m.group(1)} if m else None


def single_request(q: dict, turn: int, answers: list, prompts: dict, refs: dict, constrained: bool) -> tuple:
    """``(prompt name, messages)`` grading ``answers`` (two turns) of question ``q`` at ``turn``."""
    math = q["category"] in NEED_REF and q["question_id"] in refs
    name = ("single-math-v1" if math else "single-v1") + ("-multi-turn" if turn == 2 else "")
    p = prompts[name]
    ref = refs.get(q["question_id"], ["", ""])
    fields = {"question": q["turns"][0], "answer": answers[0], "question_1": q["turns"][0],
              "question_2": q["turns"][1], "answer_1": answers[0], "answer_2": answers[1],
              "ref_answer_1": ref[0], "ref_answer_2": ref[1]}
    user = p["prompt_template"].format(**fields)
    if constrained:
        user += "\n\nRating (one digit, 1 to 9):"
    return name, [{"role": "system", "content": p["system_prompt"]}, {"role": "user", "content": user}]


def pair_request(q: dict, turn: int, a: list, b: list, prompts: dict, refs: dict, constrained: bool) -> tuple:
    """``(prompt name, messages)`` comparing assistant A's answers ``a`` with B's ``b``."""
    math = q["category"] in NEED_REF and q["question_id"] in refs
    name = ("pair-math-v1" if math else "pair-v2") + ("-multi-turn" if turn == 2 else "")
    p = prompts[name]
    ref = refs.get(q["question_id"], ["", ""])
    fields = {"question": q["turns"][0], "answer_a": a[0], "answer_b": b[0], "question_1": q["turns"][0],
              "question_2": q["turns"][1], "answer_a_1": a[0], "answer_a_2": a[1], "answer_b_1": b[0],
              "answer_b_2": b[1], "ref_answer_1": ref[0], "ref_answer_2": ref[1]}
    user = p["prompt_template"].format(**fields)
    if constrained:
        user += "\n\nVerdict (A, B or C):"
    return name, [{"role": "system", "content": p["system_prompt"]}, {"role": "user", "content": user}]


def _ask(client: JudgeClient, cache: JudgeCache, name: str, messages: list, parse, values) -> dict:
    constrained = bool(client.config.constrain_tokenizer)
    version = VERSION + ("+constrained" if constrained else "")
    bias, max_tokens = client.rating_bias(values), 1 if constrained else 2048
    key = client.request_key(f"{version}/{name}", messages, logit_bias=bias, max_tokens=max_tokens)
    hit = cache.get(key)
    if hit is not None:
        return hit
    rec = ask_until_parsed(client, messages, parse, values=values + ("10",) * (values == SCORE_VALUES),
                           logit_bias=bias, max_tokens=max_tokens)
    return cache.put(key, {"judge_prompt": name, "template_version": version, "endpoint": client.config.endpoint,
                           **rec})


def cached_grade_is_consistent(rec: dict) -> bool:
    """A cached grade is what its raw answer says (re-parsed): an edited score or verdict is refused."""
    name, raw = rec.get("judge_prompt"), rec.get("raw")
    if not isinstance(name, str) or not isinstance(raw, str):
        return False
    parsed = (parse_verdict if name.startswith("pair") else parse_score)(raw)
    if rec.get("status") == "ok":
        return parsed is not None and rec.get("parsed") == parsed
    return rec.get("status") == "unparseable" and parsed is None


def run_jobs(client: JudgeClient, jobs: list, desc: str, progress: bool, what: str = "mt-bench") -> list:
    """Every judge job (a callable) on the client's threads; a request that failed for good raises after all ran."""
    results = client.map(lambda job: job(), jobs, desc=desc, progress=progress)
    errors = [r for r in results if isinstance(r, Exception)]
    for e in errors:
        if not isinstance(e, JudgeRequestError):
            raise e
    if errors:
        raise JudgeRequestError(f"{what}: {len(errors)} judge requests failed for good (first: {errors[0]}); "
                                "graded items are cached, rerun to grade only the rest")
    return results


def grade_single(questions: list, answers: dict, client: JudgeClient, cache: JudgeCache, prompts: dict,
                 refs: dict, *, progress: bool = True) -> list:
    """Single-answer grades of both turns of every question (see the module docstring)."""
    constrained = bool(client.config.constrain_tokenizer)
    items = [(q, t) for q in questions for t in (1, 2)]

    def job(q, t):
        name, msgs = single_request(q, t, answers[q["question_id"]], prompts, refs, constrained)
        rec = _ask(client, cache, name, msgs, parse_score, SCORE_VALUES)
        ok = rec["status"] == "ok"
        return {"question_id": q["question_id"], "category": q["category"], "turn": t, "judge_prompt": name,
                "status": rec["status"], "score": rec["parsed"]["score"] if ok else -1,
                "weighted": rec.get("weighted"), "answers": rec["answers"], "raw": rec["raw"]}

    return run_jobs(client, [lambda q=q, t=t: job(q, t) for q, t in items], "mt-bench grading", progress)


def grade_pairwise(questions: list, answers: dict, baseline: dict, client: JudgeClient, cache: JudgeCache,
                   prompts: dict, refs: dict, *, progress: bool = True) -> list:
    """Pairwise verdicts model vs baseline, both orders per (question, turn)."""
    constrained = bool(client.config.constrain_tokenizer)
    missing = [q["question_id"] for q in questions if q["question_id"] not in baseline]
    if missing:
        raise ValueError(f"--baseline: no answers for questions {missing[:10]}")

    def job(q, t):
        m, b = answers[q["question_id"]], baseline[q["question_id"]]
        g1 = _ask(client, cache, *pair_request(q, t, m, b, prompts, refs, constrained), parse_verdict, VERDICTS)
        g2 = _ask(client, cache, *pair_request(q, t, b, m, prompts, refs, constrained), parse_verdict, VERDICTS)
        v1 = {"A": "model", "B": "baseline", "C": "tie"}.get((g1["parsed"] or {}).get("verdict"), "error")
        v2 = {"A": "baseline", "B": "model", "C": "tie"}.get((g2["parsed"] or {}).get("verdict"), "error")
        winner = "error" if "error" in (v1, v2) else v1 if v1 == v2 else "tie"
        return {"question_id": q["question_id"], "category": q["category"], "turn": t, "winner": winner,
                "order_1": v1, "order_2": v2}

    items = [(q, t) for q in questions for t in (1, 2)]
    return run_jobs(client, [lambda q=q, t=t: job(q, t) for q, t in items], "mt-bench pairwise", progress)
