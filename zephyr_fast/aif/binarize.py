"""AIF binarisation: UltraFeedback ratings -> ``ultrafeedback_binarized`` preference pairs.

Zephyr (Tunstall et al. 2023, sec. 3 "dDPO"; HuggingFaceH4/ultrafeedback_binarized card): for each
prompt the completion with the highest score is *chosen* and one of the remaining lower-scored
completions, picked at random, is *rejected*.  The paper used GPT-4's ``overall_score``; Argilla and
the later H4 card found ``overall_score`` buggy for some rows and use the mean of the fine-grained
ratings (instruction following, honesty, truthfulness, helpfulness) — ``score="mean_rating"``.

Inputs (auto-detected per row):

* raw UltraFeedback: ``instruction``, ``completions: [{model, response, overall_score,
  annotations: {aspect: {Rating: "1".."5" | "N/A"}}, fine-grained_score}]``;
* flat pairs: ``prompt``, ``chosen``, ``rejected`` strings (+ optional ``metadata.rating_chosen`` /
  ``rating_rejected`` or ``score_chosen`` / ``score_rejected``);
* rows already binarised (``chosen``/``rejected`` message lists) pass through unchanged.

Output columns (the hub schema): ``prompt, prompt_id (sha256 of prompt), chosen, rejected,
messages (== chosen), score_chosen, score_rejected``.  Rows whose scores all tie are dropped and
counted; the rejected pick is seeded per row (``random.Random(f"{seed}-{row}")``) so it does not
depend on file order or chunking.

CLI::

    python -m zephyr_fast.aif.binarize IN OUT [--seed 42] [--score auto|overall|mean_rating|weighted_rating]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import sys
from dataclasses import dataclass, field
from typing import Optional

from ..fileio import atomic_open
from ..data.loading import load_split
from ..data.validate import (
    LOAD_ERROR_COL,
    DataError,
    DataValidationError,
    SkipReport,
    check_string,
    load_errors,
    read_json_rows,
    resolve,
)

SCORES = ("auto", "overall", "mean_rating", "weighted_rating")
ASPECTS = ("instruction_following", "honesty", "truthfulness", "helpfulness")


@dataclass
class BinarizeReport:
    rows: int = 0
    written: int = 0
    ties_dropped: int = 0
    identical_dropped: int = 0
    judge_failed: int = 0
    formats: dict = field(default_factory=dict)
    skipped: SkipReport = field(default_factory=SkipReport)

    def __str__(self) -> str:
        fmts = ", ".join(f"{k}: {v}" for k, v in sorted(self.formats.items()))
        return (
            f"binarize: {self.written}/{self.rows} rows written ({fmts}); dropped {self.ties_dropped} rows whose "
            f"scores all tie and {self.identical_dropped} with identical chosen/rejected text; {self.skipped}"
            + (f"; {self.judge_failed} judge ratings FAILED (unparseable; left out of the mean like N/A — "
               f"listed in the judge's .failures.jsonl)" if self.judge_failed else "")
        )


def _num(x) -> Optional[float]:
    if isinstance(x, bool) or x is None:
        return None
    if isinstance(x, (int, float)):
        return float(x) if math.isfinite(x) else None
    if isinstance(x, str):
        try:
            v = float(x)
        except ValueError:
            return None  # "N/A"
        return v if math.isfinite(v) else None
    return None


def mean_rating(completion: dict, weighted: bool = False) -> Optional[float]:
    """Mean of the numeric fine-grained ``Rating`` s (``N/A`` aspects ignored), or the row's
    ``fine-grained_score`` when there are no annotations.  ``weighted``: an aspect's
    ``Weighted Rating`` (probability-weighted, written by ``zephyr-fast judge --top-logprobs``)
    replaces its ``Rating`` where present."""
    ann = completion.get("annotations")
    if isinstance(ann, dict):
        vals = [_num(a.get("Weighted Rating", a.get("Rating")) if weighted else a.get("Rating"))
                for a in ann.values() if isinstance(a, dict)]
        vals = [v for v in vals if v is not None]
        if vals:
            return sum(vals) / len(vals)
    return _num(completion.get("fine-grained_score"))


def completion_score(completion: dict, score: str) -> Optional[float]:
    if score == "overall":
        return _num(completion.get("overall_score"))
    if score in ("mean_rating", "weighted_rating"):
        return mean_rating(completion, weighted=score == "weighted_rating")
    s = _num(completion.get("overall_score"))
    return s if s is not None else mean_rating(completion)


def _pair(prompt: str, chosen: str, rejected: str, sc, sr) -> dict:
    c = [{"content": prompt, "role": "user"}, {"content": chosen, "role": "assistant"}]
    r = [{"content": prompt, "role": "user"}, {"content": rejected, "role": "assistant"}]
    return {
        "prompt": prompt,
        "prompt_id": hashlib.sha256(prompt.encode("utf-8")).hexdigest(),
        "chosen": c,
        "rejected": r,
        "messages": c,
        "score_chosen": sc,
        "score_rejected": sr,
    }


def binarize_raw(row: dict, *, row_idx: int, seed: int, score: str, dataset: str):
    """``(pair | None, errors, tie)`` for one raw UltraFeedback row."""
    errs = check_string(row.get("instruction"), dataset=dataset, row=row_idx, field="instruction")
    comps = row.get("completions")
    if not isinstance(comps, list):
        return None, errs + [DataError(dataset, row_idx, "completions", f"expected a list, got {type(comps).__name__}", "wrong_type")], False
    scored = []
    for j, c in enumerate(comps):
        if not isinstance(c, dict):
            errs.append(DataError(dataset, row_idx, f"completions[{j}]", "expected a dict", "wrong_type"))
            continue
        e = check_string(c.get("response"), dataset=dataset, row=row_idx, field=f"completions[{j}].response")
        s = completion_score(c, score)
        if s is None:
            fld = "overall_score" if score == "overall" else "annotations" if score == "mean_rating" else "overall_score|annotations"
            e.append(DataError(dataset, row_idx, f"completions[{j}].{fld}", f"no usable {score} score", "missing_score"))
        errs += e
        if not e:
            scored.append((s, c["response"]))
    if errs:
        return None, errs, False
    if len(scored) < 2:
        return None, [DataError(dataset, row_idx, "completions", f"need >= 2 completions, got {len(scored)}", "too_few")], False
    best = max(s for s, _ in scored)
    chosen = next(resp for s, resp in scored if s == best)  # first of the top-scored, as argmax
    lower = [(s, resp) for s, resp in scored if s < best]
    if not lower:
        return None, [], True
    sr, rejected = random.Random(f"{seed}-{row_idx}").choice(lower)
    return _pair(row["instruction"], chosen, rejected, best, sr), [], False


def binarize_flat(row: dict, *, row_idx: int, dataset: str):
    errs = []
    for f in ("prompt", "chosen", "rejected"):
        errs += check_string(row.get(f), dataset=dataset, row=row_idx, field=f)
    if errs:
        return None, errs, False
    meta = row.get("metadata") if isinstance(row.get("metadata"), dict) else {}
    sc = _num(row.get("score_chosen", meta.get("rating_chosen")))
    sr = _num(row.get("score_rejected", meta.get("rating_rejected")))
    if sc is not None and sr is not None:
        if sc == sr:
            return None, [], True
        if sc < sr:
            return None, [DataError(dataset, row_idx, "score_rejected", f"rejected scores higher than chosen ({sr} > {sc})", "score_order")], False
    return _pair(row["prompt"], row["chosen"], row["rejected"], sc, sr), [], False


def _judge_failed(row: dict) -> int:
    """Ratings that ``zephyr-fast judge`` marked ``FAILED`` (unparseable after every re-ask)."""
    comps = row.get("completions") if isinstance(row.get("completions"), list) else []
    return sum(1 for c in comps if isinstance(c, dict) and isinstance(c.get("annotations"), dict)
               for a in c["annotations"].values() if isinstance(a, dict) and a.get("Rating") == "FAILED")


def row_format(row: dict) -> str:
    if "completions" in row or "instruction" in row:
        return "raw"
    if isinstance(row.get("chosen"), list):
        return "binarized"
    return "flat"


def binarize_rows(rows, *, seed: int = 42, score: str = "auto", skip_invalid_rows: bool = False,
                  dataset_name: str = "ultrafeedback"):
    """Binarise rows (raw / flat / already-binarised, mixed allowed).

    Returns:
        ``(pairs, report)``; ``pairs`` are dicts in the ``ultrafeedback_binarized`` schema.
    Raises:
        DataValidationError: invalid rows (all listed) unless ``skip_invalid_rows``.
    """
    if score not in SCORES:
        raise ValueError(f"score must be one of {SCORES}, got {score!r}")
    report = BinarizeReport()
    out, errors = [], []
    for i, row in enumerate(rows):
        report.rows += 1
        if not isinstance(row, dict):
            errors.append(DataError(dataset_name, i, "<row>", f"expected an object, got {type(row).__name__}", "wrong_type"))
            continue
        if row.get(LOAD_ERROR_COL) is not None:  # a line read_rows could not read (bad UTF-8 / JSON)
            errors += load_errors(row[LOAD_ERROR_COL], dataset=dataset_name, row=i, position=i)
            continue
        fmt = row_format(row)
        report.formats[fmt] = report.formats.get(fmt, 0) + 1
        if fmt == "raw":
            report.judge_failed += _judge_failed(row)
            pair, errs, tie = binarize_raw(row, row_idx=i, seed=seed, score=score, dataset=dataset_name)
        elif fmt == "flat":
            pair, errs, tie = binarize_flat(row, row_idx=i, dataset=dataset_name)
        else:
            pair, errs, tie = {k: row.get(k) for k in ("prompt", "prompt_id", "chosen", "rejected", "messages", "score_chosen", "score_rejected")}, [], False
        if errs:
            errors += errs
            continue
        if tie:
            report.ties_dropped += 1
            continue
        if pair["chosen"][-1]["content"] == pair["rejected"][-1]["content"]:
            report.identical_dropped += 1
            continue
        out.append(pair)
    report.skipped = resolve(errors, skip_invalid_rows=skip_invalid_rows, total_rows=report.rows)
    report.written = len(out)
    return out, report


def read_rows(path: str) -> list:
    """Rows of a .jsonl/.json file (the loader's reader: a line that is not UTF-8 or not JSON is a row
    error naming file and line, skippable) or of a .parquet/.arrow file."""
    if os.path.splitext(path)[1].lower() in (".json", ".jsonl"):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: no such file")
        return read_json_rows(path)
    return list(load_split(path, "train"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m zephyr_fast.aif.binarize", description=__doc__.split("\n\n")[0])
    ap.add_argument("input", help="raw UltraFeedback or flat prompt/chosen/rejected rows (.jsonl/.json/.parquet)")
    ap.add_argument("output", help="output .jsonl in the ultrafeedback_binarized schema")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--score", choices=SCORES, default="auto",
                    help="overall: GPT-4 overall_score (Zephyr paper); mean_rating: mean of fine-grained ratings; "
                         "weighted_rating: the same with the judge's probability-weighted ratings where present")
    ap.add_argument("--skip-invalid-rows", action="store_true")
    args = ap.parse_args(argv)
    try:
        rows = read_rows(args.input)
        pairs, report = binarize_rows(rows, seed=args.seed, score=args.score, skip_invalid_rows=args.skip_invalid_rows,
                                      dataset_name=args.input)
    except (ValueError, FileNotFoundError, DataValidationError) as exc:
        # the loader's advice names the recipe key; this command's switch is --skip-invalid-rows
        print(f"error: {str(exc).replace('set skip_invalid_rows: true', 'pass --skip-invalid-rows')}", file=sys.stderr)
        return 2
    with atomic_open(args.output) as f:
        for p in pairs:
            f.write(json.dumps(p, ensure_ascii=False) + "\n")
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
