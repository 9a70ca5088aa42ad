"""Tables of the e2e tier: whole training processes (``test_e2e.py``), zephyr_fast against TRL.

One table per (stage, model): launch → exit, launch → end of the first epoch, the loop's tokens/s and
the anchor ÷ zephyr_fast ratios; then where each process's seconds went (``e2e._phases``).
"""

from __future__ import annotations

from .fmt import SUT, _ratio, fmt_ratio, fmt_time
from .targets import whole_seconds


# profile_step.CATEGORIES (kept here so that rendering does not import TRL)
PROFILE_CATEGORIES = ("attention", "body_linear", "lm_head", "reference", "optimizer", "other")


def is_whole_process(rows: list[dict]) -> bool:
    return any(str(r.get("suite", "")).startswith("e2e_whole") for r in rows)


def _ordered(rows: list[dict]) -> list[dict]:
    return sorted(rows, key=lambda r: (r["provider"] != SUT, r["provider"]))


def whole_table(rows: list[dict]) -> list[str]:
    """Whole-process seconds (at the end of epoch 1 and at exit), loop tokens/s, ratios (> 1 = we win)."""
    sut = next((r for r in rows if r["provider"] == SUT), None)
    epochs = max(r.get("epochs") or 1 for r in rows)
    head = ["provider", "rows", f"whole process ({epochs} epoch{'s' if epochs > 1 else ''})", "ratio"]
    if epochs > 1:
        head += ["at end of epoch 1", "ratio"]
    head += ["loop tokens/s", "ratio"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in _ordered(rows):
        label = r["provider"] + (f" ({r['variant']})" if r.get("variant") else "")
        cells = [label, str(r.get("rows", "–")), fmt_time(r.get("whole_s")), _vs(r, sut, None)]
        if epochs > 1:
            cells += [fmt_time(whole_seconds(r, 1)), _vs(r, sut, 1)]
        tps = r.get("tokens_per_s")
        loop_ratio = None if r is sut or sut is None else _ratio(sut.get("tokens_per_s"), tps)
        cells += ["–" if tps is None else f"{tps:,.0f}", "–" if r is sut else fmt_ratio(loop_ratio)]
        out.append("| " + " | ".join(cells) + " |")
    return out


def _vs(r: dict, sut, epochs) -> str:
    if sut is None or r is sut:
        return "–"
    return fmt_ratio(_ratio(whole_seconds(r, epochs), whole_seconds(sut, epochs)))


_PHASES = ("start-up", "data", "model", "data + model", "reference")


def _phase_order(name: str) -> tuple:
    """Launch order: start-up, data, model (TRL: data + model), reference, epoch 1..k, exit."""
    if name in _PHASES:
        return (0, _PHASES.index(name))
    if name.startswith("epoch "):
        return (1, int(name.split()[1]))
    return (2, 0)


def phase_table(rows: list[dict]) -> list[str]:
    """Seconds per phase of each process (start-up, data, model, reference, each epoch, exit)."""
    rows = [r for r in _ordered(rows) if r.get("phases")]
    if not rows:
        return []
    names: list = []
    for r in rows:
        names += [k for k in r["phases"] if k not in names]
    names.sort(key=_phase_order)
    out = ["| phase | " + " | ".join(r["provider"] for r in rows) + " |", "|---|" + "---|" * len(rows)]
    for name in names:
        out.append(f"| {name} | " + " | ".join(fmt_time(r["phases"].get(name)) for r in rows) + " |")
    out.append("| **whole process** | " + " | ".join(f"**{fmt_time(r.get('whole_s'))}**" for r in rows) + " |")
    return out


def tables(rows: list[dict]) -> list[str]:
    return whole_table(rows) + ["", "Where the seconds went:", ""] + phase_table(rows)


def step_profile_lines(result: dict) -> list:
    """Markdown lines: seconds and % of the step per category for both trainers, then FLOP/s lines."""
    z, t = result["zephyr_fast"], result["trl"]
    zs, ts = z["seconds"], t["seconds"]
    lines = [f"One DPO optimiser step, {result['pairs']} pairs, model `{result['model']}`, max_length "
             f"{result['max_length']} (fp32, CPU, {result['threads']} threads; torch.profiler self time):", "",
             "| category | zephyr_fast s | % of step | TRL s | % of step |", "|---|---:|---:|---:|---:|"]
    for cat in PROFILE_CATEGORIES + ("total",):
        lines.append(f"| {cat} | {zs[cat]:.3f} | {100 * zs[cat] / zs['total']:.1f} | "
                     f"{ts[cat]:.3f} | {100 * ts[cat] / ts['total']:.1f} |")
    lines.append("")
    for name, r in (("zephyr_fast", z), ("TRL", t)):
        lines.append(f"- {name}: {r['flops']['total'] / 1e12:.3f} TFLOP executed "
                     f"({r['processed_tokens']} tokens processed, {r['real_tokens']} real) -> "
                     f"{r['executed_flops_per_s'] / 1e9:.1f} GFLOP/s executed, "
                     f"{r['useful_flops_per_s'] / 1e9:.1f} GFLOP/s useful (6·params·real tokens = "
                     f"{r['useful_flops'] / 1e12:.3f} TFLOP)")
    ref = z["offline_reference"]
    lines.append(f"- zephyr_fast offline reference pass (outside the step, once per run): "
                 f"{ref['seconds']:.3f} s for {ref['tokens']} tokens, {ref['seconds_per_pair']:.3f} s per pair")
    return lines
