"""MT-Bench report: per-category / per-turn / overall means, a Markdown table, a radar chart.

``build_report`` -> ``{"model", "judge", "overall", "turn_1", "turn_2", "categories": {cat: mean},
"weighted_overall" (when the judge returned log-probs), "graded", "failures", "failed_items",
"pairwise" (wins / losses / ties / errors / win_rate, when a baseline was given), "usage", "table"}``.
Means are over graded (question, turn) items; failures (unparseable after every re-ask) are left out
of the means and counted (FastChat drops score -1 the same way when it averages).
"""

from __future__ import annotations

import json
import math
import os
from typing import Optional

from zephyr_fast.fileio import atomic_open
from ..aif.store import write_jsonl_atomic

CATEGORIES = ("writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem", "humanities")


def _mean(xs) -> Optional[float]:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else None


def pairwise_summary(pairs: list) -> dict:
    n = {k: sum(1 for p in pairs if p["winner"] == k) for k in ("model", "baseline", "tie", "error")}
    games = n["model"] + n["baseline"] + n["tie"]
    return {"wins": n["model"], "losses": n["baseline"], "ties": n["tie"], "errors": n["error"],
            "win_rate": (n["model"] + n["tie"] / 2) / games if games else None}


def build_report(single: list, pairs: Optional[list], *, model: str, judge: Optional[str], usage: dict) -> dict:
    ok = [j for j in single if j["status"] == "ok"]
    cats = [c for c in CATEGORIES if any(j["category"] == c for j in single)]
    weighted = [j["weighted"] for j in ok if j.get("weighted") is not None]
    report = {
        "model": model, "judge": judge,
        "overall": _mean(j["score"] for j in ok),
        "turn_1": _mean(j["score"] for j in ok if j["turn"] == 1),
        "turn_2": _mean(j["score"] for j in ok if j["turn"] == 2),
        "categories": {c: _mean(j["score"] for j in ok if j["category"] == c) for c in cats},
        "weighted_overall": _mean(weighted) if len(weighted) == len(ok) and ok else None,
        "graded": len(ok), "failures": len(single) - len(ok),
        "failed_items": [{"question_id": j["question_id"], "turn": j["turn"], "raw": j["raw"][:200]}
                         for j in single if j["status"] != "ok"],
        "pairwise": pairwise_summary(pairs) if pairs is not None else None,
        "usage": usage,
    }
    report["table"] = table(report, single)
    return report


def _fmt(x) -> str:
    return "–" if x is None else f"{x:.2f}"


def table(report: dict, single: list) -> str:
    """Markdown table: category, turn 1, turn 2, mean, graded/failed."""
    lines = ["| category | turn 1 | turn 2 | mean | graded | failed |", "|---|---:|---:|---:|---:|---:|"]
    for c, mean in report["categories"].items():
        rows = [j for j in single if j["category"] == c]
        t = [_mean(j["score"] for j in rows if j["turn"] == k and j["status"] == "ok") for k in (1, 2)]
        ok = sum(j["status"] == "ok" for j in rows)
        lines.append(f"| {c} | {_fmt(t[0])} | {_fmt(t[1])} | {_fmt(mean)} | {ok} | {len(rows) - ok} |")
    lines.append(f"| **overall** | {_fmt(report['turn_1'])} | {_fmt(report['turn_2'])} | "
                 f"**{_fmt(report['overall'])}** | {report['graded']} | {report['failures']} |")
    if report.get("pairwise"):
        p = report["pairwise"]
        lines.append(f"\npairwise vs baseline: {p['wins']} wins, {p['losses']} losses, {p['ties']} ties "
                     f"({p['errors']} errors); win rate {_fmt(p['win_rate'])}")
    return "\n".join(lines)


def radar(categories: dict, path: str, title: str) -> str:
    """Radar chart of per-category means (0-10) as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(categories)
    vals = [categories[n] or 0.0 for n in names]
    angles = [2 * math.pi * i / len(names) for i in range(len(names))]
    fig = plt.figure(figsize=(5.5, 5.5))
    ax = fig.add_subplot(111, polar=True)
    ax.plot(angles + angles[:1], vals + vals[:1], linewidth=2)
    ax.fill(angles + angles[:1], vals + vals[:1], alpha=0.25)
    ax.set_xticks(angles)
    ax.set_xticklabels(names)
    ax.set_ylim(0, 10)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_report(report: dict, single: list, pairs: Optional[list], out_dir: str) -> None:
    """``report.json``, ``report.md``, ``judgments.jsonl`` (+ ``pairwise.jsonl``), ``radar.png``."""
    write_jsonl_atomic(os.path.join(out_dir, "judgments.jsonl"), single)
    if pairs is not None:
        write_jsonl_atomic(os.path.join(out_dir, "pairwise.jsonl"), pairs)
    title = f"MT-Bench {os.path.basename(str(report['model']).rstrip('/'))} (judge: {report['judge']})"
    report["radar"] = radar(report["categories"], os.path.join(out_dir, "radar.png"), title)
    with atomic_open(os.path.join(out_dir, "report.md")) as f:
        f.write(f"# {title}\n\n{report['table']}\n")
    with atomic_open(os.path.join(out_dir, "report.json")) as f:
        json.dump(report, f, indent=2)
