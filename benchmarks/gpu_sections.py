"""Two ``gpu_check`` sections beside the benchmarks: the project's CUDA-marked tests, and a
``torch.profiler`` breakdown of every LM-head case where zephyr_fast missed its target.

* ``pytest_cuda``: ``pytest -m cuda`` over the test files that hold CUDA tests (compiled Triton
  kernels in bf16/fp32, CUDA-graph capture of one fwd+bwd call with and without gradient filtering,
  ``torch.autocast("cuda")`` bf16/fp16 through every public entry point, the varlen attention backends
  and FlexAttention prefix sharing against the fp32 reference, bitsandbytes optimisers, a QLoRA 4-bit
  model, the trainer's Triton path against its torch path). Log: ``pytest_cuda.log``.
* ``profile``: for each ``lm_head`` case of this run where zephyr_fast is slower than its target
  (0.9 × the fastest anchor on peaked inputs, 1.0 × on normal ones), one profiled fwd+bwd call:
  device time per kernel, the GEMMs' achieved TFLOP/s (FLOPs counted by the profiler) against the
  card's bf16 dense peak, the Triton epilogues' achieved GB/s (bytes they must move: fp32 logits read,
  the ``dz`` operand written) against the card's memory bandwidth. Stored in ``gpu.json`` under
  ``zephyr_fast.profiles``; :func:`profile_lines` renders it.
"""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys
from typing import Optional

import torch

from .fmt import SUT
from .harness import REPO

CUDA_TEST_FILES = ("tests/kernels/test_cuda.py", "tests/kernels/test_autocast_cuda.py",
                   "tests/model/test_attention.py", "tests/model/test_load.py", "tests/train/test_cuda.py",
                   "tests/train/test_integrations.py")
ANCHORS = ("naive_torch", "torch_compile", "liger", "cce")
FACTOR = {"peaked": 0.9, "normal": 1.0}
# HBM bandwidth (bytes/s) by card name, for the epilogues' share of it; bf16 peaks: metrics.PEAK_TFLOPS
PEAK_BYTES_PER_S = {"H200": 4.8e12, "H100": 3.35e12, "A100": 2.0e12}
GEMM_NAME = re.compile(r"gemm|nvjet|cutlass|xmma|cublas|sm90_|sm80_", re.IGNORECASE)
EPILOGUE_NAME = re.compile(r"_row_stats_kernel|_row_grad_kernel|_sparse")


def section_pytest_cuda(c) -> None:
    """Run the CUDA-marked tests in a child process (compiled Triton: ``TRITON_INTERPRET=0``)."""
    files = [f for f in CUDA_TEST_FILES if (REPO / f).exists()]
    timeout = max(10, min(240, int(c.left()) - 30))
    env = dict(os.environ, TRITON_INTERPRET="1" if c.smoke else "0", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "pytest", *files, "-m", "cuda", "-q", "-rfE", "-p", "no:cacheprovider",
           "--continue-on-collection-errors"]
    log = pathlib.Path(c.out) / "pytest_cuda.log"
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
        text, rc = proc.stdout + proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as exc:
        text, rc = f"{exc.stdout or ''}{exc.stderr or ''}\ntimed out after {timeout}s", -1
    log.write_text(text if isinstance(text, str) else text.decode(errors="replace"))
    summary = next((ln.strip("= ") for ln in reversed(text.splitlines()) if re.search(r"\d+ (passed|failed|skipped|deselected)", ln)), "no summary")
    c.pytest_summary = summary
    c.log(f"pytest_cuda: {summary} (exit {rc}; log in pytest_cuda.log)")
    if rc not in (0, 5):  # 5: nothing collected (CPU smoke: every test deselected or skipped)
        raise RuntimeError(f"CUDA tests: {summary}")


def missed_cases(benchmarks: list) -> list:
    """``(task, v, n, kind, ratio)`` of the ``lm_head`` cases where zephyr_fast missed its time target."""
    rows: dict = {}
    for b in benchmarks:
        info, med = b.get("extra_info") or {}, (b.get("stats") or {}).get("median")
        if info.get("suite") != "lm_head" or not med:
            continue
        key = (info.get("task"), info.get("v"), info.get("n"), info.get("inputs"))
        rows.setdefault(key, {})[info.get("provider")] = med
    out = []
    for (task, v, n, kind), times in rows.items():
        anchors = [times[p] for p in ANCHORS if p in times]
        if SUT in times and anchors and times[SUT] > FACTOR.get(kind, 1.0) * min(anchors):
            out.append((task, v, n, kind, times[SUT] / min(anchors)))
    return sorted(out, key=lambda r: (r[2], r[1] != 32000, r[3] != "peaked", r[0]))


def _peak(table: dict, dev) -> Optional[float]:
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else ""
    return next((v for k, v in table.items() if k in name), None)


def profile_case(task: str, n: int, d: int, v: int, kind: str, dev, dtype: str = "bfloat16") -> dict:
    """One profiled fwd+bwd call of zephyr_fast on an ``lm_head`` case (after one warm-up call)."""
    from torch.profiler import ProfilerActivity, profile

    from zephyr_fast.training.metrics import PEAK_TFLOPS

    from .lm_head import LMHeadCase
    from .test_lm_head import _spec

    case = LMHeadCase(_spec(task, SUT, n, d, v, dtype=dtype, pairs=8, device=dev.type, kind=kind))
    case.full()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    with profile(activities=acts, with_flops=True) as prof:
        case.full()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
    kernels, flops = {}, 0.0
    for evt in prof.key_averages():
        flops += float(getattr(evt, "flops", 0) or 0)
        t = float(getattr(evt, "self_device_time_total", 0) or 0) if dev.type == "cuda" else 0.0
        if t > 0 and getattr(evt, "device_type", None) is not None and "CUDA" in str(evt.device_type):
            kernels[evt.key] = (kernels.get(evt.key, (0.0, 0))[0] + t / 1e3, evt.count)
    total = sum(ms for ms, _ in kernels.values())
    gemm = sum(ms for k, (ms, _) in kernels.items() if GEMM_NAME.search(k))
    epi = sum(ms for k, (ms, _) in kernels.items() if EPILOGUE_NAME.search(k))
    n_valid = int((case.labels != -100).sum())
    elem = torch.empty((), dtype=case.hidden.dtype).element_size()
    # each logits pass reads its fp32 block once in the stats kernel; the gradient pass reads it and
    # writes dz: passes = 1 (stats) + 1 (grad) at least
    epi_bytes = n * v * (4 + 4 + elem)
    peak_t, peak_b = _peak(PEAK_TFLOPS, dev), _peak(PEAK_BYTES_PER_S, dev)
    top = sorted(kernels.items(), key=lambda kv: -kv[1][0])[:8]
    return {"case": f"{task.upper()} N{n} D{d} V{v} {kind}", "valid_rows": n_valid, "device_ms": total,
            "gemm_ms": gemm, "gemm_tflops": flops / (gemm * 1e9) if gemm else None, "peak_tflops": peak_t,
            "epilogue_ms": epi, "epilogue_gbps": epi_bytes / (epi * 1e6) if epi else None,
            "peak_gbps": None if peak_b is None else peak_b / 1e9, "other_ms": total - gemm - epi,
            "useful_tflops": 6.0 * n * d * v / (total * 1e9) if total else None,
            "top": [{"kernel": k[:90], "ms": ms, "calls": calls} for k, (ms, calls) in top]}


def section_profile(c, limit: int = 4) -> None:
    """Profile zephyr_fast on the missed ``lm_head`` cases of this run (at most ``limit``)."""
    d = 64 if c.smoke else 4096
    todo = missed_cases(c.benchmarks)
    if c.smoke and not todo:  # exercise the path on the smoke shapes even when nothing missed
        todo = [("dpo", 1000, 256, "peaked", None)]
    c.profiles = getattr(c, "profiles", [])
    for task, v, n, kind, ratio in todo[:limit]:
        if c.left() < (2 if c.smoke else 12):
            c.log("profile: time guard")
            return
        row = profile_case(task, n, d, v, kind, c.dev, dtype="float32" if c.smoke else "bfloat16")
        row["ratio_to_fastest_anchor"] = ratio
        c.profiles.append(row)
        c.log(f"profile {row['case']}: {row['device_ms']:.2f} ms device; GEMMs {row['gemm_ms']:.2f} ms "
              f"at {row['gemm_tflops'] or 0:.0f} TFLOP/s; epilogues {row['epilogue_ms']:.2f} ms")
        if c.dev.type == "cuda":
            torch.cuda.empty_cache()


def profile_lines(profiles: list) -> list:
    """Markdown of the ``profile`` section's rows."""
    if not profiles:
        return []
    out = ["| case | × fastest anchor | device time | GEMMs (achieved / peak TFLOP/s) | Triton epilogues "
           "(achieved / peak GB/s) | other | top kernels |", "|---|---|---|---|---|---|---|"]
    for p in profiles:
        tops = "; ".join(f"{t['kernel'][:40]} {t['ms']:.2f} ms ×{t['calls']}" for t in p["top"][:4])
        r = p.get("ratio_to_fastest_anchor")
        out.append(f"| {p['case']} | {'–' if r is None else f'{r:.2f}'} | {p['device_ms']:.2f} ms | "
                   f"{p['gemm_ms']:.2f} ms ({p['gemm_tflops'] or 0:.0f} / {p['peak_tflops'] or '?'}) | "
                   f"{p['epilogue_ms']:.2f} ms ({p['epilogue_gbps'] or 0:.0f} / {p['peak_gbps'] or '?'}) | "
                   f"{p['other_ms']:.2f} ms | {tops} |")
    return out
