"""Ask the judge until its answer parses, and the probability-weighted rating from top log-probs.

Shared by the UltraFeedback judge (:mod:`zephyr_fast.aif.judge`) and MT-Bench grading
(:mod:`zephyr_fast.eval.mt_bench`): an unparseable answer is counted and the same request is sent
again, up to ``max_reasks`` times; after that the item is recorded as ``unparseable`` with the last
answer (never dropped).
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

from .client import ChatResult, JudgeClient


def weighted_rating(logprobs: Optional[list], text: str, offset: Optional[int], values: Sequence[str],
                    expected: Optional[str] = None) -> Optional[float]:
    """Expected rating under the judge's top log-probs at the rating token.

    Args:
        logprobs: ``[(token, logprob, {top_token: logprob})]`` of the answer (``ChatResult.logprobs``).
        text: the answer text (the tokens concatenate to it).
        offset: character index of the rating in ``text``.
        values: the rating labels (``"1".."5"``); top tokens whose stripped text is one of them count.
        expected: the rating as written; when the token at ``offset`` is not all of it (``"10"``
            split as ``"1"``, ``"0"``), the top log-probs do not describe the rating: None.
    Returns:
        ``sum p(v) v / sum p(v)`` over the labels among the top log-probs, or None when the endpoint
        returned no log-probs or the rating token has no label among them.
    """
    if not logprobs or offset is None:
        return None
    pos = 0
    for token, _, top in logprobs:
        end = pos + len(token)
        if pos <= offset < end:
            if expected is not None and token.strip().lstrip("▁") != expected:
                return None
            probs = {}
            for t, lp in top.items():
                label = t.strip().lstrip("▁")
                if label in values:
                    probs[label] = probs.get(label, 0.0) + math.exp(lp)
            total = sum(probs.values())
            return sum(p * float(v) for v, p in probs.items()) / total if total > 0 else None
        pos = end
    return None


def ask_until_parsed(client: JudgeClient, messages: list, parse: Callable[[str], Optional[dict]], *,
                     values: Sequence[str], logit_bias: Optional[dict] = None,
                     max_tokens: Optional[int] = None, weigh: Optional[Callable] = None) -> dict:
    """Send ``messages``; re-ask while ``parse(answer)`` is None.

    ``weigh(result, parsed)``: the ``weighted`` value of a parsed answer (default: the weighted
    rating at ``parsed["rating_offset"]``; a multi-text answer gives one per text).

    Returns:
        ``{"status": "ok"|"unparseable", "parsed": dict | None, "answers": int, "reasks": int,
        "raw": last answer text, "weighted": float | None, "prompt_tokens", "completion_tokens"}``.
    Raises:
        JudgeRequestError: the endpoint failed for good (not cached by callers; a rerun retries).
    """
    rec = {"status": "unparseable", "parsed": None, "answers": 0, "reasks": 0, "raw": "", "weighted": None,
           "prompt_tokens": 0, "completion_tokens": 0}
    for attempt in range(client.config.max_reasks + 1):
        res: ChatResult = client.chat(messages, logit_bias=logit_bias, max_tokens=max_tokens)
        rec["answers"] += 1
        rec["reasks"] = attempt
        rec["raw"] = res.text
        rec["prompt_tokens"] += res.prompt_tokens
        rec["completion_tokens"] += res.completion_tokens
        parsed = parse(res.text)
        if parsed is not None:
            rec.update(status="ok", parsed=parsed,
                       weighted=weigh(res, parsed) if weigh else weighted_rating(
                           res.logprobs, res.text, parsed.get("rating_offset"), values, parsed.get("rating_text")))
            return rec
    return rec
