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

BENCH_DIR = pathlib.Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"
SUT = "zephyr_fast"
MiB = 2**20

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
# targets of issues 4, 5, 6 and 9
# ----------------------------------------------------------------------------------------------

def _find(records, **kw):
    for r in records:
        if all(r.get(k) == v for k, v in kw.items()):
            return r
    return None


def _status(ok: Optional[bool]) -> str:
    return "not measured" if ok is None else ("**met**" if ok else "**not met**")


def evaluate_targets(records: list[dict], metas: list[dict]) -> list[dict]:
    """Each target of issues 4/5/6/9 with its measured figure and met / not met / not measured."""
    out = []

    def add(issue, target, measured, ok, note=""):
        out.append({"issue": issue, "target": target, "measured": measured, "status": _status(ok),
                    "note": note})

    def speed(issue, target, fast, slow, factor, strict=False):
        """Throughput target: fast tokens/s ≥ factor × slow tokens/s (> when strict)."""
        if not (fast and slow and fast.get("tokens_per_s") and slow.get("tokens_per_s")):
            add(issue, target, "–", None)
            return
        r = fast["tokens_per_s"] / slow["tokens_per_s"]
        add(issue, target, f"{fast['tokens_per_s']:,.0f} vs {slow['tokens_per_s']:,.0f} tokens/s ({r:.2f}×)",
            r > factor if strict else r >= factor)

    _issue9_cpu(records, add)
    _issue9_gpu(records, metas, add)
    # issue 4
    packed = _find(records, suite="packing", provider=SUT, variant="packed+fused")
    padded = _find(records, suite="packing", provider="naive_torch")
    logits = _find(records, suite="packing", provider=SUT, variant="packed+logits")
    speed(4, "packed fwd+bwd tokens/s > padded (same real lengths)", packed, padded, 1.0, strict=True)
    if packed and logits and packed.get("peak_mem_bytes") is not None and logits.get("peak_mem_bytes"):
        saved = logits["peak_mem_bytes"] - packed["peak_mem_bytes"]
        add(4, "memory saved by the logits-free path (recorded)",
            f"{fmt_mem(saved)} ({fmt_mem(logits['peak_mem_bytes'])} → {fmt_mem(packed['peak_mem_bytes'])})",
            saved > 0)
    else:
        add(4, "memory saved by the logits-free path (recorded)", "–", None)
    # issue 5
    zd, trl = _find(records, suite="e2e_dpo", provider=SUT), _find(records, suite="e2e_dpo", provider="trl")
    speed(5, "e2e DPO step tokens/s ≥ 3 × TRL DPOTrainer", zd, trl, 3.0)
    zs, trl_s = _find(records, suite="e2e_sft", provider=SUT), _find(records, suite="e2e_sft", provider="trl")
    speed(5, "e2e SFT step tokens/s vs TRL SFTTrainer (recorded; > 1× expected)", zs, trl_s, 1.0, strict=True)
    speed(5, "reference log-prob pass tokens/s ≥ 2 × DPO training tokens/s",
          _find(records, suite="ref_pass", provider=SUT), zd, 2.0)
    # issue 6
    for m in metas:
        wall, dev = m.get("suite_wall_s"), str(m.get("device_name", ""))
        if wall is None:
            continue
        if m.get("gpu_check"):
            add(6, "gpu_check.sh finishes in < 6 minutes", f"{wall / 60:.1f} min on {dev}", wall < 360)
        elif m.get("full_run"):
            add(6, "the CPU suite `pytest benchmarks/` runs in < 10 minutes",
                f"{wall / 60:.1f} min on {dev}, {m.get('threads')} threads", wall < 600)
    return out


ANCHOR_PROVIDERS = ("naive_torch", "torch_compile", "liger", "cce")


def _issue9_cpu(records, add):
    """Issue 9, CPU: DPO ≤ 0.8 × CCE torch_compile at ≤ 1.3 × the gradient floor (both input kinds);
    CE at V=128256 no slower than naive torch."""
    for kind in ("peaked", "normal"):
        key = dict(suite="lm_head", task="dpo", n=4096, d=512, v=32000, dtype="float32", device="cpu",
                   mode="full", inputs=kind)
        z, cce = _find(records, provider=SUT, **key), _find(records, provider="cce", **key)
        label = f"CPU DPO N4096 D512 V32000 fp32 {kind}: time ≤ 0.8 × CCE torch_compile at ≤ 1.3 × (dW + dX)"
        if not (z and cce):
            add(9, label, "–", None, "zephyr_fast or CCE result missing")
            continue
        r = z["median_s"] / cce["median_s"]
        mem = z.get("peak_mem_bytes")
        floor = z.get("floor_bytes")
        mem_ok = mem is not None and floor and mem / floor <= 1.3
        mem_s = f"{fmt_mem(mem)} = {mem / floor:.2f} × floor" if mem is not None and floor else "memory –"
        ok = r <= 0.8 and bool(mem_ok)
        why = ("" if ok or kind != "normal" else
               "cause: with a flat softmax nothing can be filtered, and under the memory cap a pair's logits "
               "cannot be kept, so DPO computes 4 GEMMs over the completion rows where CCE computes 3 over "
               "its stored logits")
        add(9, label, f"{fmt_time(z['median_s'])} vs CCE {fmt_time(cce['median_s'])} ({r:.2f} × CCE); {mem_s}",
            ok, why)
    for kind in ("peaked", "normal"):
        key = dict(suite="ce_sweep_vocab", task="ce", v=128256, device="cpu", mode="full", inputs=kind)
        z, naive = _find(records, provider=SUT, **key), _find(records, provider="naive_torch", **key)
        label = f"CPU CE N1024 D256 V128256 fp32 {kind}: time ≤ naive torch"
        if z and naive:
            r = z["median_s"] / naive["median_s"]
            add(9, label, f"{fmt_time(z['median_s'])} vs {fmt_time(naive['median_s'])} ({r:.2f} × naive)", r <= 1.0)
        else:
            add(9, label, "–", None)


def _issue9_gpu(records, metas, add):
    """Issue 9, GPU: fwd+bwd ≤ 0.9 × the fastest anchor on peaked inputs, ≤ 1.0 × on normal ones,
    memory ≤ CCE's — per task, vocabulary and N, as measured (with the run's date)."""
    dates = {m["source"]: (m.get("datetime") or "")[:10] for m in metas}
    for kind, factor in (("peaked", 0.9), ("normal", 1.0)):
        for task in ("ce", "dpo"):
            for n in (8192, 16384):
                for v in (32000, 128256):
                    key = dict(suite="lm_head", task=task, n=n, v=v, device="cuda", mode="full", inputs=kind,
                               dtype="bfloat16")
                    label = (f"GPU bf16 {task.upper()} N{n} D4096 V{v} {kind}: time ≤ {factor} × fastest anchor, "
                             f"memory ≤ CCE")
                    z = _find(records, provider=SUT, **key)
                    anchors = [a for a in (_find(records, provider=p, **key) for p in ANCHOR_PROVIDERS)
                               if a and a.get("median_s")]
                    if not (z and z.get("median_s") and anchors):
                        add(9, label, "–", None, "no CUDA result for this case (run benchmarks/gpu_check.sh)")
                        continue
                    best = min(anchors, key=lambda a: a["median_s"])
                    r = z["median_s"] / best["median_s"]
                    cce = _find(records, provider="cce", **key)
                    mem_ok = (cce is not None and z.get("peak_mem_bytes") is not None
                              and cce.get("peak_mem_bytes") is not None
                              and z["peak_mem_bytes"] <= cce["peak_mem_bytes"])
                    mem_s = ("" if cce is None or cce.get("peak_mem_bytes") is None else
                             f"; {fmt_mem(z.get('peak_mem_bytes'))} vs CCE {fmt_mem(cce['peak_mem_bytes'])}")
                    add(9, label, f"{fmt_time(z['median_s'])} vs {best['provider']} {fmt_time(best['median_s'])} "
                        f"({r:.2f}×){mem_s}, {z.get('device_name')}, {dates.get(z['source'], '')}",
                        r <= factor and mem_ok)


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

def render(records: list[dict], metas: list[dict], chart_rel: Optional[str] = None,
           now: Optional[_dt.datetime] = None) -> str:
    now = now or _dt.datetime.now(_dt.timezone.utc)
    names = " ".join(f"results/{pathlib.Path(m['source']).name}" for m in metas)
    lines = ["# zephyr_fast benchmark results", "",
             f"Generated {now:%Y-%m-%d %H:%M UTC} by `python -m benchmarks.report {names}` from "
             f"pytest-benchmark JSON (`pytest benchmarks/` regenerates this file). Where a later JSON "
             f"re-measured a table, that whole table comes from it.", ""]
    lines += ["## Machines and versions", ""]
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
    lines += ["", "## Method", "",
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
              "reason in the pytest output), never substituted.", ""]
    lines += ["## Targets", "", "| issue | target | measured | status |", "|---|---|---|---|"]
    for t in evaluate_targets(records, metas):
        measured = t["measured"] + (f" — {t['note']}" if t["note"] else "")
        lines.append(f"| #{t['issue']} | {t['target']} | {measured} | {t['status']} |")
    lines += ["", "## Results", ""]
    if not records:
        lines += ["No benchmark results in the input JSON.", ""]
    for key, rows in group(records).items():
        lines += [f"### {group_title(key)}", ""] + table(rows) + [""]
    if chart_rel:
        lines += ["## Chart", "", f"![time and memory vs vocab and tokens]({chart_rel})", ""]
    skipped = [s for m in metas for s in (m.get("skipped") or [])]
    if skipped:
        lines += ["## Skipped (with the reason)", ""]
        lines += [f"- `{s['test']}`: {s['reason'].replace('Skipped: ', '')}" for s in skipped] + [""]
    return "\n".join(lines) + "\n"


def default_inputs() -> list[pathlib.Path]:
    return [p for p in (RESULTS_DIR / "latest.json", RESULTS_DIR / "gpu.json") if p.exists()]


def write_report(json_paths, out: pathlib.Path) -> pathlib.Path:
    if isinstance(json_paths, (str, pathlib.Path)):
        json_paths = [pathlib.Path(json_paths)]
        gpu = RESULTS_DIR / "gpu.json"
        if gpu.exists() and gpu.resolve() != json_paths[0].resolve():
            json_paths.append(gpu)
    records, metas = load(json_paths)
    out = pathlib.Path(out)
    png = chart(records, out.parent / ("results" if out.parent == BENCH_DIR else ".") / "chart.png")
    rel = None
    if png is not None:
        rel = str(png.resolve().relative_to(out.parent.resolve())) if png.resolve().is_relative_to(
            out.parent.resolve()) else str(png)
    out.write_text(render(records, metas, rel))
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
