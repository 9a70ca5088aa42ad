"""The one prepared GPU check (run through ``benchmarks/gpu_check.sh``): correctness, then speed.

    OUT=/some/dir bash benchmarks/gpu_check.sh              # on a CUDA machine (H100/H200), < 8 min
    OUT=/tmp/smoke bash benchmarks/gpu_check.sh --cpu-smoke # here: tiny shapes, Triton interpreter

Sections (each in try/except: a failure is recorded and the next section runs; a global time guard
skips what no longer fits):

1. ``env``: device, versions, which providers import.
2. ``correctness``: every Triton kernel (token log-probs, segment sums, CE, fused DPO loss, and all
   their gradients; dense and with gradient filtering) in bf16 against the fp32 reference; a bf16
   error passes when it is within ``2×`` the error of a plain bf16 PyTorch run of the same
   computation (or below 1e-3 relative); plus fp32 at the project tolerance (atol 1e-5 / rtol 5e-4;
   on GPU ``tl.dot`` may use TF32 — the figure is recorded either way).
3. ``pytest_cuda``: the project's CUDA-marked tests (``benchmarks/gpu_sections.py``): CUDA-graph
   capture, autocast bf16/fp16 through every entry point, attention backends, bitsandbytes, QLoRA.
4. ``lm_head``: issue 9's table — bf16, D=4096, V=32000 (Mistral-7B) and V=128256 (Llama-3-8B),
   CE (20 % ignored rows) and DPO (8 pairs, 25 % prompt rows), ``peaked`` and ``normal`` inputs,
   N=8192 then N=16384: fwd+bwd time, TFLOP/s (6·N·D·V), ``max_memory_allocated`` beyond x, W, dX,
   dW for zephyr_fast, torch eager, torch.compile, Liger and CCE.
5. ``sweep``: the candidate configurations of the zephyr CUDA path (backend × logits workspace ×
   gradient filtering) on the V=32000 CE and DPO cases — the measurement behind the defaults.
6. ``profile``: a ``torch.profiler`` breakdown of each ``lm_head`` case zephyr_fast missed.
7. ``e2e_dpo``, ``e2e_sft``, ``prefix_shared``, ``zero3`` (``benchmarks/gpu_e2e.py``): the ~1B
   Mistral through whole trainers — zephyr_fast vs TRL DPOTrainer / SFTTrainer at their fastest
   settings (pairs/s, tokens/s, peak memory, MFU), prefix-shared vs separate DPO, and a 1-rank
   DeepSpeed ZeRO-3 DPO step against the plain one.
8. ``model``: a ~1B Mistral config in bf16 — packed vs padded fwd+bwd tokens/s, and the packed DPO
   step (precomputed reference) vs a padded one with a reference model in memory.

Files in ``--out`` (≤ 8): ``gpu.json`` (pytest-benchmark-shaped, for ``python -m benchmarks.report``),
``correctness.json``, ``gpu_check.md`` (the Markdown fragment), ``gpu_check.log`` (from the .sh),
``pytest_cuda.log``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pathlib
import sys
import time
import traceback
from types import SimpleNamespace

import torch

from .gpu_sections import profile_lines, section_profile, section_pytest_cuda
from .test_lm_head import _spec, bench_lm_head

T0 = time.time()


class MiniBenchmark:
    """The subset of pytest-benchmark's fixture the suites use: ``pedantic``, ``extra_info``, ``stats``."""

    def __init__(self, name: str):
        self.name, self.group, self.extra_info, self.stats = name, None, {}, None

    def pedantic(self, target, setup=None, rounds=1, iterations=1, warmup_rounds=0):
        times = []
        for i in range(warmup_rounds + rounds):
            args, kwargs = setup() if setup is not None else ((), {})
            t = time.perf_counter()
            target(*args, **kwargs)  # the harness's target synchronises CUDA itself
            if i >= warmup_rounds:
                times.append(time.perf_counter() - t)
        times.sort()
        self.stats = SimpleNamespace(median=times[len(times) // 2], min=times[0], max=times[-1], rounds=rounds)

    def as_json(self) -> dict:
        s = self.stats
        stats = {} if s is None else {"median": s.median, "min": s.min, "max": s.max, "rounds": s.rounds}
        return {"name": self.name, "group": self.group, "stats": stats, "extra_info": self.extra_info}


class Check:
    def __init__(self, out: pathlib.Path, budget_s: float, smoke: bool):
        self.out, self.budget, self.smoke = out, budget_s, smoke
        self.benchmarks: list = []
        self.errors = 0  # benchmarks that raised (a skip is not an error)
        self.correctness: list = []
        self.sections: dict = {}
        self.profiles: list = []  # gpu_sections.section_profile
        self.pytest_summary = None  # gpu_sections.section_pytest_cuda
        self.dev = torch.device("cpu" if smoke else "cuda")

    def left(self) -> float:
        return self.budget - (time.time() - T0)

    def log(self, msg: str) -> None:
        print(f"[gpu_check {time.time() - T0:6.1f}s] {msg}", flush=True)

    def section(self, name: str, fn, need_s: float) -> None:
        if self.left() < need_s:
            self.sections[name] = f"skipped: time guard ({self.left():.0f}s left, needs ~{need_s:.0f}s)"
            self.log(self.sections[name])
            return
        self.log(f"== {name}")
        t, errors_before = time.time(), self.errors
        try:
            fn()
            failed = self.errors - errors_before
            self.sections[name] = (f"FAILED: {failed} benchmark(s) raised (see the log)" if failed
                                   else f"ok ({time.time() - t:.1f}s)")
        except Exception as exc:
            self.sections[name] = f"FAILED: {type(exc).__name__}: {exc}"
            traceback.print_exc()
        self.log(f"{name}: {self.sections[name]}")
        self.write()

    def bench(self, name: str, fn) -> None:
        """Run one suite benchmark function with a MiniBenchmark; skips and failures are recorded."""
        import pytest

        b = MiniBenchmark(name)
        try:
            fn(b)
        except pytest.skip.Exception as exc:
            b.extra_info["skipped"] = str(exc)
        except Exception as exc:
            b.extra_info["error"] = f"{type(exc).__name__}: {exc}"
            self.errors += 1
            traceback.print_exc()
        finally:
            if self.dev.type == "cuda":
                torch.cuda.empty_cache()
        med = b.stats.median if b.stats else None
        self.log(f"{name}: {'%.3f ms' % (med * 1e3) if med else '-'} "
                 f"{ {k: v for k, v in b.extra_info.items() if k in ('tflops', 'tokens_per_s', 'peak_mem_bytes', 'workspace_bytes', 'skipped', 'error')} }")
        self.benchmarks.append(b.as_json())

    def write(self) -> None:
        from .harness import device_name, versions

        meta = {"suite_wall_s": time.time() - T0, "device_name": device_name(self.dev), "versions": versions(),
                "gpu_check": True, "smoke": self.smoke, "sections": self.sections,
                "threads": torch.get_num_threads(), "profiles": self.profiles,
                "pytest_cuda": self.pytest_summary,
                "notes": "benchmarks/gpu_check.sh" + (" --cpu-smoke (tiny shapes, not figures)" if self.smoke else "")}
        doc = {"benchmarks": [b for b in self.benchmarks if b["stats"]], "zephyr_fast": meta,
               "datetime": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
               "machine_info": {"node": os.uname().nodename}, "all": self.benchmarks}
        (self.out / "gpu.json").write_text(json.dumps(doc, indent=1, default=str))
        (self.out / "correctness.json").write_text(json.dumps(self.correctness, indent=1, default=str))
        try:
            from .report import load, render

            records, metas = load([self.out / "gpu.json"])
            md = render(records, metas)
            md += "\n## Correctness (bf16 vs fp32 reference)\n\n" + correctness_table(self.correctness)
            if self.profiles:
                md += "\n## Where the missed cases' time goes (torch.profiler)\n\n" + "\n".join(profile_lines(self.profiles)) + "\n"
            md += "\n## Sections\n\n" + "".join(f"- {k}: {v}\n" for k, v in self.sections.items())
            (self.out / "gpu_check.md").write_text(md)
        except Exception as exc:
            self.log(f"fragment not written: {exc}")


# ----------------------------------------------------------------------------------------------
# correctness
# ----------------------------------------------------------------------------------------------

def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    x, ref = x.detach().float(), ref.detach().float()
    return float((x - ref).norm() / ref.norm().clamp_min(1e-12))


def _kernel_outputs(kind: str, h, w, labels, seg, nseg, g_tok, g_seg, impl):
    """Run one computation (``impl``: a zephyr impl, or "naive" = plain PyTorch in the inputs' dtype)."""
    import zephyr_kernels as zk

    from .lm_head import naive_token_logps

    h = h.detach().clone().requires_grad_(True)
    w = w.detach().clone().requires_grad_(True)
    outs = {}
    if kind == "logprobs":
        if impl == "naive":
            tok = naive_token_logps(h, w, labels)
            segs = torch.zeros(nseg, device=tok.device).index_add(0, seg, tok)
        else:
            tok, segs = zk.linear_logprobs(h, w, labels, segment_ids=seg, num_segments=nseg, impl=impl)
        (tok.float() * g_tok).sum().add((segs.float() * g_seg).sum()).backward()
        outs.update(token_logps=tok, segment_logps=segs)
    elif kind == "ce":
        from .lm_head import naive_ce

        loss = naive_ce(h, w, labels) if impl == "naive" else zk.linear_cross_entropy(h, w, labels, impl=impl)
        loss.backward()
        outs["loss"] = loss
    elif kind == "dpo":
        from .lm_head import naive_dpo

        p = nseg // 2
        ref_c, ref_r = -20.0 * torch.ones(p, device=h.device), -25.0 * torch.ones(p, device=h.device)
        if impl == "naive":
            loss = naive_dpo(h, w, labels, seg, nseg, ref_c, ref_r)
        else:
            loss = zk.FusedLinearDPOLoss(beta=0.1, impl=impl)(h, w, labels, seg, ref_c, ref_r)[0]
        loss.backward()
        outs["loss"] = loss
    outs.update(grad_hidden=h.grad, grad_weight=w.grad)
    return outs


@contextlib.contextmanager
def cuda_path_knobs(**values):
    """Set module knobs of the CUDA path (``triton_chunked._WORKSPACE_BYTES``, ``_FILTER``; None keeps the
    current value) for the block, restoring them after."""
    from zephyr_kernels import triton_chunked

    saved = {k: getattr(triton_chunked, k) for k in values}
    try:
        for k, v in values.items():
            if v is not None:
                setattr(triton_chunked, k, v)
        yield
    finally:
        for k, v in saved.items():
            setattr(triton_chunked, k, v)


def correctness_case(kind: str, n: int, d: int, v: int, dev, seed: int = 0, filtered: bool = False) -> list:
    """bf16 Triton vs fp32 truth, judged against a bf16 PyTorch run's own error; and fp32 Triton.
    ``filtered``: with the CUDA path's gradient filtering on (``triton_chunked._FILTER``)."""
    from .inputs import lm_head_inputs

    h, w, targets = lm_head_inputs(n, d, v, device=dev, kind="peaked", seed=seed, requires_grad=False)
    gen = torch.Generator().manual_seed(seed + 7)
    nseg = 6  # includes empty segments when n is small; DPO pairs = 3
    seg = torch.randint(0, nseg - 1, (n,), generator=gen).to(dev)  # the last segment stays empty
    ignore = (torch.rand(n, generator=gen) < 0.2).to(dev)
    labels = torch.where(ignore, torch.full_like(targets, -100), targets)
    g_tok = torch.randn(n, generator=gen).to(dev)
    g_seg = torch.randn(nseg, generator=gen).to(dev)
    args = (labels, seg, nseg, g_tok, g_seg)
    truth = _kernel_outputs(kind, h.float(), w.float(), *args, impl="naive")
    hb, wb = h.to(torch.bfloat16), w.to(torch.bfloat16)
    torch_bf16 = _kernel_outputs(kind, hb, wb, *args, impl="naive")
    with cuda_path_knobs(_FILTER=filtered):
        triton_bf16 = _kernel_outputs(kind, hb, wb, *args, impl="triton")
        triton_fp32 = _kernel_outputs(kind, h.float(), w.float(), *args, impl="triton")
    kind = kind + (" (filtered)" if filtered else "")
    rows = []
    for key in truth:
        e_tri, e_torch = rel_err(triton_bf16[key], truth[key]), rel_err(torch_bf16[key], truth[key])
        fp32_ok = torch.allclose(triton_fp32[key].detach().float(), truth[key].detach().float(), atol=1e-5, rtol=5e-4)
        rows.append({"kernel": kind, "output": key, "shape": f"N{n} D{d} V{v}",
                     "bf16_rel_err": e_tri, "torch_bf16_rel_err": e_torch,
                     "bf16_pass": e_tri <= max(2.0 * e_torch, 1e-3),
                     "fp32_max_abs_err": float((triton_fp32[key].detach().float() - truth[key].detach().float()).abs().max()),
                     "fp32_pass": bool(fp32_ok)})
    return rows


def correctness_table(rows: list) -> str:
    if not rows:
        return "No correctness results.\n"
    out = ["| kernel | output | shape | bf16 rel err | torch bf16 rel err | bf16 | fp32 max abs err | fp32 |",
           "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            out.append(f"| {r['kernel']} | – | {r['shape']} | {r['error']} | | **FAIL** | | |")
            continue
        out.append(f"| {r['kernel']} | {r['output']} | {r['shape']} | {r['bf16_rel_err']:.2e} | "
                   f"{r['torch_bf16_rel_err']:.2e} | {'pass' if r['bf16_pass'] else '**FAIL**'} | "
                   f"{r['fp32_max_abs_err']:.1e} | {'pass' if r['fp32_pass'] else '**FAIL**'} |")
    return "\n".join(out) + "\n"


# ----------------------------------------------------------------------------------------------
# sections
# ----------------------------------------------------------------------------------------------

def section_env(c: Check) -> None:
    from .harness import PROVIDERS, device_name, provider_unavailable, versions

    c.log(f"device: {device_name(c.dev)}; versions: {versions()}")
    for p in PROVIDERS:
        c.log(f"provider {p}: {provider_unavailable(p, c.dev) or 'available'}")


def section_correctness(c: Check) -> None:
    shapes = ([(47, 31, 123), (64, 32, 257)] if c.smoke else
              [(47, 31, 123), (4096, 4096, 32000), (2048, 1024, 128256)])
    for n, d, v in shapes:
        for kind, filtered in [(k, f) for f in (False, True) for k in ("logprobs", "ce", "dpo")]:
            if c.left() < (5 if c.smoke else 20):
                c.log("correctness: time guard")
                return
            try:
                rows = correctness_case(kind, n, d, v, c.dev, filtered=filtered)
            except Exception as exc:
                traceback.print_exc()
                rows = [{"kernel": kind, "shape": f"N{n} D{d} V{v}", "error": f"{type(exc).__name__}: {exc}"}]
            c.correctness += rows
            for r in rows:
                c.log(f"correctness {r}")
    bad = [r for r in c.correctness if "error" in r or not r.get("bf16_pass")]
    if bad:
        raise AssertionError(f"{len(bad)} bf16 correctness rows failed (see correctness.json)")


ANCHORS = ("zephyr_fast", "naive_torch", "liger", "cce")


def lm_head_plan(smoke: bool) -> list:
    """``(task, provider, shape, v, n, kind)`` in priority order: issue 9's table at N=8192 (peaked,
    then normal inputs; torch.compile after the others, its compile time is the most expensive thing
    here), then the same table at N=16384."""
    if smoke:
        shapes, n, big_n = [("smoke", 1000)], 256, 512
    else:
        shapes, n, big_n = [("mistral-7b", 32000), ("llama-3-8b", 128256)], 8192, 16384
    plan = [(task, p, s, v, n, kind) for kind in ("peaked", "normal") for task in ("ce", "dpo")
            for s, v in shapes for p in ANCHORS]
    plan += [(task, "torch_compile", s, v, n, kind) for kind in ("peaked", "normal") for task in ("ce", "dpo")
             for s, v in shapes]
    plan += [(task, p, s, v, big_n, kind) for kind in ("peaked", "normal") for task in ("ce", "dpo")
             for s, v in shapes for p in ANCHORS + ("torch_compile",)]
    return plan


def section_lm_head(c: Check) -> None:
    d, rounds = (64, 1) if c.smoke else (4096, 10)
    dtype = "float32" if c.smoke else "bfloat16"
    for task, provider, shape, v, n, kind in lm_head_plan(c.smoke):
        need = 90 if provider == "torch_compile" and not c.smoke else (5 if c.smoke else 15)
        if c.left() < need:
            c.log(f"lm_head {task} {provider} V{v} N{n} {kind}: time guard")
            continue
        spec = _spec(task, provider, n, d, v, dtype=dtype, pairs=8, device=c.dev.type, kind=kind)
        r = rounds if n <= 8192 else max(1, rounds // 2)
        c.bench(f"lm_head[{task}-{provider}-{shape}-N{n}-{kind}]",
                lambda b: bench_lm_head(b, spec, shape=shape, rounds=r, memory=not c.smoke))


# candidate configurations of the zephyr CUDA path: backend x fp32 logits workspace x gradient
# filtering (block-sparse dX / dW GEMMs, triton_sparse) x inputs (filtering must not lose on a flat softmax)
SWEEP = [("triton", 64 << 20, False, "peaked"), ("triton", 128 << 20, False, "peaked"),
         ("triton", 256 << 20, False, "peaked"), ("triton", 128 << 20, True, "peaked"),
         ("triton", 256 << 20, True, "peaked"), ("triton", 128 << 20, False, "normal"),
         ("triton", 128 << 20, True, "normal"), ("triton_tiled", None, False, "peaked")]


def section_sweep(c: Check) -> None:
    """Each candidate configuration on the N=8192 / V=32000 CE and DPO cases (suite ``lm_head_sweep``,
    one row per configuration): which one the default should be, measured."""
    n, d, v, rounds = (64, 32, 500, 1) if c.smoke else (8192, 4096, 32000, 5)
    dtype = "float32" if c.smoke else "bfloat16"
    for task in ("ce", "dpo"):
        for impl, ws, filtered, kind in SWEEP:
            if c.left() < (5 if c.smoke else 15):
                c.log("sweep: time guard")
                return
            label = impl + ("" if ws is None else f" ws={ws >> 20}MiB") + (" filtered" if filtered else "")
            spec = dict(_spec(task, "zephyr_fast", n, d, v, dtype=dtype, pairs=8, device=c.dev.type, kind=kind),
                        impl=impl)
            with cuda_path_knobs(_WORKSPACE_BYTES=ws, _FILTER=filtered):
                c.bench(f"lm_head_sweep[{task}-{label}-{kind}]",
                        lambda b: bench_lm_head(b, spec, suite="lm_head_sweep", shape="sweep", rounds=rounds,
                                                memory=not c.smoke, variant=label))


def section_model(c: Check) -> None:
    from .test_packing import bench_model

    model, seqs, dtype, rounds = ("tiny", 2, "float32", 1) if c.smoke else ("1b", 32, "bfloat16", 5)
    for variant in ("padded", "packed+logits", "packed+fused", "dpo_padded_ref", "dpo_packed"):
        if c.left() < (5 if c.smoke else 30):
            c.log(f"model {variant}: time guard")
            continue
        spec = {"case": "model", "variant": variant, "model": model, "seqs": seqs, "dtype": dtype,
                "device": c.dev.type, "seed": 0}
        c.bench(f"model[{variant}-{model}]", lambda b: bench_model(b, spec, rounds=rounds, memory=not c.smoke))


E2E_SECTIONS = ("e2e_dpo", "e2e_sft", "prefix_shared", "zero3")  # benchmarks/gpu_e2e.py (issue 13)


def e2e_sections() -> list:
    """``(name, fn, need_s)`` of gpu_e2e's sections, imported only now: a trainer library missing on the
    GPU machine fails those sections with the reason instead of the whole check."""
    try:
        from .gpu_e2e import SECTIONS
    except Exception as exc:
        reason = f"benchmarks.gpu_e2e does not import ({type(exc).__name__}: {exc})"

        def failed(c):
            raise RuntimeError(reason)

        return [(name, failed, 1) for name in E2E_SECTIONS]
    return list(SECTIONS)


# in run order: what the defaults are chosen from comes first; the trainer sections (gpu_e2e) follow
SECTIONS_BEFORE_E2E = (("env", section_env, 1), ("correctness", section_correctness, 20),
                       ("pytest_cuda", section_pytest_cuda, 60), ("lm_head", section_lm_head, 30),
                       ("sweep", section_sweep, 30), ("profile", section_profile, 15))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="zephyr_fast GPU check (see benchmarks/gpu_check.sh)")
    ap.add_argument("--out", type=pathlib.Path, default=pathlib.Path(os.environ.get("OUT", "gpu_check_out")))
    ap.add_argument("--budget-s", type=float, default=450.0, help="global time guard (seconds)")
    ap.add_argument("--cpu-smoke", action="store_true",
                    help="tiny shapes on CPU with TRITON_INTERPRET=1: exercises every code path but CUDA")
    ap.add_argument("--sections", default=",".join([n for n, _, _ in SECTIONS_BEFORE_E2E] + list(E2E_SECTIONS)
                                                   + ["model"]))
    args = ap.parse_args(argv)
    if not args.cpu_smoke and not torch.cuda.is_available():
        print("gpu_check: no CUDA device (use --cpu-smoke to exercise the code paths on CPU)", file=sys.stderr)
        return 2
    if args.cpu_smoke and os.environ.get("TRITON_INTERPRET") != "1":
        print("gpu_check --cpu-smoke needs TRITON_INTERPRET=1 set before Python starts (gpu_check.sh does it)",
              file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    c = Check(args.out, args.budget_s, args.cpu_smoke)
    wanted = set(args.sections.split(","))
    for name, fn, need in SECTIONS_BEFORE_E2E + (tuple(e2e_sections()) if wanted & set(E2E_SECTIONS) else ()) + (
            ("model", section_model, 40),):
        if name in wanted:
            c.section(name, lambda: fn(c), need if not c.smoke else 1)
    c.write()
    failed = [k for k, v in c.sections.items() if v.startswith("FAILED")]
    c.log(f"done in {time.time() - T0:.0f}s; sections: {c.sections}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
