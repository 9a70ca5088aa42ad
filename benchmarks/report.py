"""Turn pytest-benchmark JSON into ``benchmarks/RESULTS.md`` (ratio tables + targets) and a PNG chart.

    python -m benchmarks.report [JSON ...] [--out benchmarks/RESULTS.md]

Defaults: ``benchmarks/results/latest.json`` (the CPU suite) plus ``benchmarks/results/gpu.json``
when present (the JSON that ``gpu_check.sh`` writes into ``$OUT`` — copy it there).  Every JSON is a
pytest-benchmark document: ``benchmarks[*]`` with ``name``, ``stats.median`` (seconds) and the
``extra_info`` keys the harness records (suite, provider, mode, shape, dtype, device, ...), plus
a ``zephyr_fast`` block (device name, library versions, suite wall time).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import pathlib
import sys
from collections import OrderedDict
from typing import Iterable, Optional

from . import e2e_report
from .fmt import MiB, SUT, _ratio, fmt_mem, fmt_ratio, fmt_time
from .targets import evaluate_targets

BENCH_DIR = pathlib.Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"
STEP_PROFILE = "step_profile.json"  # profile_step.py's output, rendered when present

# rows of one table share these keys; providers differ
GROUP_KEYS = ("suite", "task", "shape", "n", "d", "v", "dtype", "device", "mode", "inputs")


def load(paths: Iterable[pathlib.Path]) -> tuple[list[dict], list[dict]]:
    """Records (one per benchmark, flattened) and the per-file metadata blocks."""
    records, metas = [], []
    for path in paths:
        doc = json.loads(pathlib.Path(path).read_text())
        meta = dict(doc.get("zephyr_fast") or {})
        meta["source"] = str(path)
        meta["machine_info"] = doc.get("machine_info", {})
        meta["datetime"] = doc.get("datetime")
        metas.append(meta)
        for b in doc.get("benchmarks", []):
            info = dict(b.get("extra_info") or {})
            if "provider" not in info:
                continue  # not one of ours
            rec = {k: info.get(k) for k in GROUP_KEYS}
            rec.update(info)
            rec["name"] = b.get("name")
            rec["median_s"] = (b.get("stats") or {}).get("median")
            rec["source"] = str(path)
            records.append(rec)
    return _latest_groups(records), metas


def _latest_groups(records: list[dict]) -> list[dict]:
    """A table is one run: where a later JSON re-measured a group (same ``GROUP_KEYS``), its rows
    replace the whole group of the earlier files, so every ratio still compares one run's rows."""
    last = {}
    for r in records:
        last[tuple(r.get(k) for k in GROUP_KEYS)] = r["source"]
    return [r for r in records if r["source"] == last[tuple(r.get(k) for k in GROUP_KEYS)]]


def group(records: list[dict]) -> "OrderedDict[tuple, list[dict]]":
    groups: "OrderedDict[tuple, list[dict]]" = OrderedDict()
    for r in records:
        groups.setdefault(tuple(r.get(k) for k in GROUP_KEYS), []).append(r)
    return groups


# ----------------------------------------------------------------------------------------------
# formatting
# ----------------------------------------------------------------------------------------------

def table(rows: list[dict]) -> list[str]:
    """One Markdown table: each provider, and the anchor / zephyr_fast ratios (> 1 = we win)."""
    # the zephyr_fast row the anchors are compared with; ablations (e.g. packed+logits) are compared too
    sut = next((r for r in rows if r["provider"] == SUT and not r.get("ablation")), None)
    throughput_key = "tokens_per_s" if any("tokens_per_s" in r and "tflops" not in r for r in rows) else "tflops"
    head = ["provider", "median time", "TFLOP/s" if throughput_key == "tflops" else "tokens/s",
            "peak mem growth", "time ÷ zephyr", "mem ÷ zephyr"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    order = {p: i for i, p in enumerate(("zephyr_fast", "naive_torch", "torch_compile", "liger", "cce", "trl"))}
    for r in sorted(rows, key=lambda r: (order.get(r["provider"], 99), r.get("variant") or "")):
        thr = r.get(throughput_key)
        thr_s = "–" if thr is None else (f"{thr:.3f}" if throughput_key == "tflops" else f"{thr:,.0f}")
        t_ratio = m_ratio = None
        if sut is not None and r is not sut:
            if throughput_key == "tokens_per_s" and r.get("tokens_per_s") and sut.get("tokens_per_s"):
                t_ratio = sut["tokens_per_s"] / r["tokens_per_s"]
            else:
                t_ratio = _ratio(r.get("median_s"), sut.get("median_s"))
            m_ratio = _ratio(r.get("peak_mem_bytes"), sut.get("peak_mem_bytes"))
        label = r["provider"] + (f" ({r['variant']})" if r.get("variant") else "")
        out.append(f"| {label} | {fmt_time(r.get('median_s'))} | {thr_s} | {fmt_mem(r.get('peak_mem_bytes'))} "
                   f"| {fmt_ratio(t_ratio)} | {fmt_ratio(m_ratio)} |")
    return out


def group_title(key: tuple) -> str:
    d = dict(zip(GROUP_KEYS, key))
    parts = [str(d["suite"])]
    if d.get("task"):
        parts.append(f"task={d['task']}")
    dims = "×".join(f"{k.upper()}={d[k]}" for k in ("n", "d", "v") if d.get(k) is not None)
    if dims:
        parts.append(dims)
    elif d.get("shape"):
        parts.append(str(d["shape"]))
    parts += [str(d.get("dtype")), str(d.get("device")), f"mode={d.get('mode')}"]
    if d.get("inputs"):
        parts.append(f"inputs={d['inputs']}")
    return ", ".join(p for p in parts if p and p != "None")


# ----------------------------------------------------------------------------------------------
# chart
# ----------------------------------------------------------------------------------------------

def chart(records: list[dict], path: pathlib.Path) -> Optional[pathlib.Path]:
    """Time and peak memory vs vocab size and vs tokens (CE sweeps and any other x-varying series)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:
        return None
    series = {}
    for r in records:
        if r.get("mode") != "full" or r.get("task") != "ce" or r.get("median_s") is None:
            continue
        for axis, x, fixed in (("v", r.get("v"), ("n", "d")), ("n", r.get("n"), ("v", "d"))):
            key = (axis, r["provider"], r.get("device"), r.get("dtype")) + tuple(r.get(k) for k in fixed)
            series.setdefault(key, {})[x] = r
    series = {k: v for k, v in series.items() if len(v) >= 2}
    if not series:
        return None
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    for (axis, provider, dev, dtype, *fixed), pts in sorted(series.items(), key=str):
        xs = sorted(pts)
        col = 0 if axis == "v" else 1
        fixed_lbl = ",".join(f"{k.upper()}={v}" for k, v in zip(("n", "d") if axis == "v" else ("v", "d"), fixed))
        label = f"{provider} [{dev} {dtype} {fixed_lbl}]"
        axes[0][col].plot(xs, [pts[x]["median_s"] * 1e3 for x in xs], marker="o", label=label)
        mem = [(x, pts[x].get("peak_mem_bytes")) for x in xs if pts[x].get("peak_mem_bytes") is not None]
        if mem:
            axes[1][col].plot([m[0] for m in mem], [m[1] / MiB for m in mem], marker="o", label=label)
    for col, xl in ((0, "vocab size V"), (1, "tokens N")):
        axes[0][col].set(xlabel=xl, ylabel="fwd+bwd median (ms)", xscale="log", yscale="log")
        axes[1][col].set(xlabel=xl, ylabel="peak memory growth (MiB)", xscale="log", yscale="log")
        for row in (0, 1):
            axes[row][col].grid(True, which="both", alpha=0.3)
            if axes[row][col].lines:
                axes[row][col].legend(fontsize=7)
    fig.suptitle("Fused linear cross-entropy: zephyr_fast vs anchors")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------------------------
# the document
# ----------------------------------------------------------------------------------------------

def _cmd_path(path: pathlib.Path) -> str:
    """``path`` as the report's header command names it: relative to the repository root when inside it."""
    try:
        return str(path.resolve().relative_to(BENCH_DIR.parent.resolve()))
    except ValueError:
        return str(path)


METHOD = [
    "- Same inputs (same seed) for every provider; one untimed warm-up, then the median of the "
    "timed rounds (3 on CPU); CUDA synchronised inside the timed region.",
    "- Peak memory: CUDA `max_memory_allocated` beyond what was allocated before the call; CPU "
    "peak-RSS growth of one call in a fresh subprocess after a warm-up, inputs allocated first, "
    "`MALLOC_MMAP_THRESHOLD_=65536`. The floor of an LM-head call is its dX + dW.",
    "- LM-head TFLOP/s count 6·N·D·V (forward, dX, dW; recomputation not credited).",
    "- `inputs=peaked`: targets Zipf-distributed, hidden states aimed at the predicted token "
    "(softmax peaked like a trained model's); `normal`: N(0,1) inputs, flat softmax.",
    "- Liger's DPO cannot take precomputed reference log-probs: in `task=dpo` it runs "
    "`use_ref_model=False` (less work than the others); `task=dpo_ref` compares our precomputed "
    "numbers against its reference-hidden-states path.",
    "- Ratio columns: anchor ÷ zephyr_fast for time (or zephyr ÷ anchor for tokens/s) and memory; "
    "> 1 means zephyr_fast is faster / leaner.",
    "- An anchor that is not installed or cannot run on the device is absent (skipped with the "
    "reason in the pytest output), never substituted.",
    "- e2e tier (`pytest benchmarks/ --e2e`, tables `e2e_whole_*`): each trainer runs once as a fresh "
    "process on the same model folder, rows and batch, timed from launch to exit; the 1-epoch figure of "
    "a multi-epoch case is launch → end of epoch 1 of that same run (no model is saved). Loop tokens/s "
    "count real (non-padding) tokens. Phases come from zephyr_fast's `summary.json` timeline and a TRL "
    "callback.",
]


def _machines(metas: list[dict]) -> list[str]:
    lines = ["## Machines and versions", ""]
    for m in metas:
        mi = m.get("machine_info") or {}
        cpu = (mi.get("cpu") or {}).get("brand_raw") or mi.get("processor") or "?"
        lines.append(f"- `{pathlib.Path(m['source']).name}`: run {m.get('datetime') or '?'}; device "
                     f"**{m.get('device_name', '?')}**; host CPU {cpu}; node `{mi.get('node', '?')}`; "
                     f"torch threads {m.get('threads', '?')}; wall time "
                     f"{(m.get('suite_wall_s') or 0) / 60:.1f} min")
        vers = m.get("versions") or {}
        if vers:
            lines.append("  - versions: " + ", ".join(f"{k} {v}" for k, v in vers.items() if v))
        if m.get("notes"):
            lines.append("  - notes: " + m["notes"])
    return lines


def _targets(records: list[dict], metas: list[dict]) -> list[str]:
    lines = ["## Targets", "", "| issue | target | measured | status |", "|---|---|---|---|"]
    for t in evaluate_targets(records, metas):
        measured = t["measured"] + (f" — {t['note']}" if t["note"] else "")
        lines.append(f"| #{t['issue']} | {t['target']} | {measured} | {t['status']} |")
    return lines


def _results(records: list[dict]) -> list[str]:
    lines = ["## Results", ""]
    if not records:
        lines += ["No benchmark results in the input JSON.", ""]
    for key, rows in group(records).items():
        body = e2e_report.tables(rows) if e2e_report.is_whole_process(rows) else table(rows)
        lines += [f"### {group_title(key)}", ""] + body + [""]
    return lines


def _extras(metas: list[dict], chart_rel: Optional[str], profile: Optional[dict]) -> list[str]:
    lines = []
    if profile:
        lines += ["## Where one DPO step's seconds go", "",
                  f"`python -m benchmarks.profile_step --json benchmarks/results/{STEP_PROFILE}`, run "
                  f"{profile.get('datetime', '?')} on a quiet machine (profiler overhead included in both):", ""]
        lines += e2e_report.step_profile_lines(profile) + [""]
    if chart_rel:
        lines += ["## Chart", "", f"![time and memory vs vocab and tokens]({chart_rel})", ""]
    skipped = [s for m in metas for s in (m.get("skipped") or [])]
    if skipped:
        lines += ["## Skipped (with the reason)", ""]
        lines += [f"- `{s['test']}`: {s['reason'].replace('Skipped: ', '')}" for s in skipped] + [""]
    return lines


def render(records: list[dict], metas: list[dict], chart_rel: Optional[str] = None,
           now: Optional[_dt.datetime] = None, profile: Optional[dict] = None) -> str:
    """The whole RESULTS.md text (deterministic given ``now``)."""
    now = now or _dt.datetime.now(_dt.timezone.utc)
    names = " ".join(_cmd_path(pathlib.Path(m["source"])) for m in metas)  # runnable from the repo root
    lines = ["# zephyr_fast benchmark results", "",
             f"Generated {now:%Y-%m-%d %H:%M UTC} by `python -m benchmarks.report {names}` from "
             f"pytest-benchmark JSON (`pytest benchmarks/` regenerates this file). Where a later JSON "
             f"re-measured a table, that whole table comes from it.", ""]
    lines += _machines(metas) + ["", "## Method", ""] + METHOD + [""]
    lines += _targets(records, metas) + [""] + _results(records) + _extras(metas, chart_rel, profile)
    return "\n".join(lines) + "\n"


def default_inputs() -> list[pathlib.Path]:
    """Every tier's latest full-run JSON that exists: the kernel tier, the e2e tier, the GPU check."""
    return [p for p in (RESULTS_DIR / n for n in ("latest.json", "e2e.json", "gpu.json")) if p.exists()]


def write_report(json_paths, out: pathlib.Path) -> pathlib.Path:
    if isinstance(json_paths, (str, pathlib.Path)):
        json_paths = [pathlib.Path(json_paths)]
        gpu = RESULTS_DIR / "gpu.json"
        if gpu.exists() and gpu.resolve() != json_paths[0].resolve():
            json_paths.append(gpu)
    records, metas = load(json_paths)
    out = pathlib.Path(out)
    # the committed report owns results/chart.png; any other report (a filtered run's results/RESULTS.md)
    # draws its own next to it, so a partial run never overwrites the committed chart
    committed = out.resolve() == (BENCH_DIR / "RESULTS.md").resolve()
    png = chart(records, RESULTS_DIR / "chart.png" if committed else out.with_name(f"{out.stem}_chart.png"))
    rel = None
    if png is not None:
        rel = str(png.resolve().relative_to(out.parent.resolve())) if png.resolve().is_relative_to(
            out.parent.resolve()) else str(png)
    prof = RESULTS_DIR / STEP_PROFILE
    out.write_text(render(records, metas, rel, profile=json.loads(prof.read_text()) if prof.exists() else None))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("json", nargs="*", type=pathlib.Path, help="pytest-benchmark JSON file(s)")
    ap.add_argument("--out", type=pathlib.Path, default=BENCH_DIR / "RESULTS.md")
    args = ap.parse_args(argv)
    paths = args.json or default_inputs()
    if not paths:
        print("no JSON given and benchmarks/results/latest.json does not exist: run `pytest benchmarks/` first",
              file=sys.stderr)
        return 2
    print(write_report(paths, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
