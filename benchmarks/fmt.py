"""Number formatting shared by the benchmark report's tables and targets."""

from __future__ import annotations

from typing import Optional

SUT = "zephyr_fast"
MiB = 2**20


def fmt_time(s: Optional[float]) -> str:
    if s is None:
        return "–"
    return f"{s * 1e3:.2f} ms" if s < 1 else f"{s:.2f} s"


def fmt_mem(b: Optional[float]) -> str:
    return "–" if b is None else f"{b / MiB:.0f} MiB" if abs(b) >= 10 * MiB else f"{b / MiB:.1f} MiB"


def fmt_ratio(x: Optional[float]) -> str:
    return "–" if x is None else f"{x:.2f}×"


def _ratio(num, den):
    if num is None or den is None or den == 0:
        return None
    return num / den


