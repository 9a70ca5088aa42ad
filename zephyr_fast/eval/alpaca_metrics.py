"""AlpacaEval's leaderboard row from annotations (``preference`` in [1, 2]: 1 = the baseline's output
``output_1`` preferred, 2 = the model's ``output_2``, 1.5 or 0 = a draw), as AlpacaEval computes it:

* ``win_rate`` = mean(preference - 1) x 100, ``standard_error`` = its standard error of the mean (ddof 1)
  x 100, ``n_wins`` / ``n_wins_base`` = preferences above / below 1.5, ``n_draws`` = exactly 1.5 or 0,
  ``n_total``; ``discrete_win_rate`` counts each annotation as a win (1), loss (0) or draw (1/2) --
  AlpacaEval's ``AbsoluteScoringRule`` / ``ZeroOneScoringRule`` (``alpaca_eval.metrics``); a test checks
  this against the package on a real annotation file.
* ``length_controlled_winrate`` (AlpacaEval 2): AlpacaEval's own GLM
  (``alpaca_eval.metrics.get_length_controlled_winrate``, ``length_controlled_v1``), which needs the
  package and its ``df_gamed.csv`` from the Hub (instruction difficulty, gamed baselines); where
  either is missing (offline, not installed) the row says why instead of a number.

``alpaca_eval`` 0.6.6 imports ``pkg_resources``, which setuptools 81+ no longer ships: its two uses
(version parsing, an installed version) are provided from ``packaging`` / ``importlib.metadata``
when the module is missing (:func:`import_alpaca_eval`).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import math
import sys
import types
from typing import Optional

from packaging.version import parse as parse_version

from zephyr_fast.fileio import first_line

__all__ = ["import_alpaca_eval", "leaderboard_row", "length_controlled", "win_rate"]


def import_alpaca_eval():
    """The ``alpaca_eval`` package, or None when not installed."""
    if importlib.util.find_spec("alpaca_eval") is None:
        return None
    if "pkg_resources" not in sys.modules and importlib.util.find_spec("pkg_resources") is None:
        shim = types.ModuleType("pkg_resources")
        shim.parse_version = parse_version
        shim.get_distribution = lambda name: types.SimpleNamespace(version=importlib.metadata.version(name))
        sys.modules["pkg_resources"] = shim
    import alpaca_eval.metrics

    return alpaca_eval


def _valid(p) -> bool:
    return isinstance(p, (int, float)) and not isinstance(p, bool) and not math.isnan(p) and (p == 0 or 1 <= p <= 2)


def win_rate(preferences: list) -> dict:
    """AlpacaEval's head-to-head numbers of ``preferences`` (None / NaN: not annotated, left out)."""
    draws = sum(1 for p in preferences if _valid(p) and p in (0, 1.5))
    ps = [(1.5 if p == 0 else float(p)) - 1 for p in preferences if _valid(p)]
    n = len(ps)
    mean = sum(ps) / n if n else float("nan")
    sem = math.sqrt(sum((x - mean) ** 2 for x in ps) / (n - 1) / n) if n > 1 else float("nan")
    discrete = [1.0 if x > 0.5 else 0.0 if x < 0.5 else 0.5 for x in ps]
    return {"win_rate": mean * 100, "standard_error": sem * 100, "n_wins": sum(x > 0.5 for x in ps),
            "n_wins_base": sum(x < 0.5 for x in ps), "n_draws": draws, "n_total": n,
            "discrete_win_rate": (sum(discrete) / n * 100) if n else float("nan")}


def length_controlled(annotations: list) -> dict:
    """``{"length_controlled_winrate", "lc_standard_error"}`` from AlpacaEval's GLM, or ``{"lc_unavailable": why}``."""
    ae = import_alpaca_eval()
    if ae is None:
        return {"lc_unavailable": "the alpaca_eval package is not installed (pip install alpaca_eval==0.6.6)"}
    need = ("preference", "output_1", "output_2", "generator_1", "generator_2", "index")
    rows = [a for a in annotations if all(k in a for k in need)]
    if len(rows) != len(annotations):
        return {"lc_unavailable": f"annotations need {', '.join(need)} (index: the instruction's position in "
                                  f"AlpacaEval's 805)"}
    import pandas as pd

    try:
        out = ae.metrics.get_length_controlled_winrate(pd.DataFrame(rows), save_weights_dir=None,
                                                       is_add_glm_preference_inplace=False)
    except Exception as e:  # noqa: BLE001 - the Hub file (offline), or the GLM fit: reported in the row
        first = first_line(e)
        return {"lc_unavailable": f"alpaca_eval's length-control GLM did not run: {type(e).__name__}: {first[:160]}"}
    return {"length_controlled_winrate": float(out["length_controlled_winrate"]),
            "lc_standard_error": float(out["lc_standard_error"])}


def leaderboard_row(annotations: list, *, lc: bool) -> dict:
    """The leaderboard numbers of ``annotations`` (AlpacaEval's format); ``lc``: add the length-controlled rate."""
    row = win_rate([a.get("preference") for a in annotations])
    lengths = [len(a["output_2"]) for a in annotations if isinstance(a.get("output_2"), str)]
    row["avg_length"] = int(sum(lengths) / len(lengths)) if lengths else None  # AlpacaEval truncates
    if lc:
        row.update(length_controlled(annotations))
    return row


def format_row(name: str, row: dict, annotator: Optional[str] = None) -> str:
    """One Markdown table (header + row) of a leaderboard row."""
    cols = ["win_rate", "standard_error", "n_wins", "n_wins_base", "n_draws", "n_total", "avg_length"]
    if "length_controlled_winrate" in row:
        cols.insert(0, "length_controlled_winrate")
    cells = [f"{row[c]:.2f}" if isinstance(row[c], float) else str(row[c]) for c in cols]
    lines = [f"| model | {' | '.join(cols)} |", "|" + "---|" * (len(cols) + 1), f"| {name} | {' | '.join(cells)} |"]
    if "lc_unavailable" in row:
        lines.append(f"\nlength-controlled win rate: not computed ({row['lc_unavailable']})")
    if annotator:
        lines.insert(0, f"annotator: {annotator}\n")
    return "\n".join(lines)
