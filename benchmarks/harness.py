"""The shared benchmark harness: shapes, providers, timing, peak memory, ``extra_info``.

Fairness rules every suite follows (the report states them):

* every provider gets the same inputs (same seed, same dtype, same device), built before timing;
* one untimed warm-up call (compiles torch.compile / Triton, fills allocator caches), then the
  median of ``rounds`` timed calls; CUDA work is synchronised inside the timed region;
* peak memory is measured on a separate call: CUDA ``max_memory_allocated`` minus what was allocated
  before the call (inputs), and on CPU the peak-RSS growth of the call in a *fresh subprocess*
  (``memprobe.py``: forked from a server that has only imported the libraries) with the inputs
  allocated and a warm-up done beforehand and
  ``MALLOC_MMAP_THRESHOLD_=65536`` so freed blocks go back to the OS instead of hiding in the heap;
* an anchor that is not installed (or cannot run on this device) is skipped with the reason —
  never replaced by something else under its name.
"""

from __future__ import annotations

import atexit
import importlib
import json
import os
import pathlib
import select
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from typing import Callable, Optional

import torch

REPO = pathlib.Path(__file__).resolve().parents[1]
ASSETS = REPO / "assets"
TOKENIZER_DIR = ASSETS / "tokenizers" / "mistral-7b-v0.1"

# Providers: zephyr_fast is the system under test, the rest are anchors; gemm_floor is no provider
# a user could pick but the bare GEMMs a logits-free loss cannot avoid (lm_head.py).
PROVIDERS = ("zephyr_fast", "naive_torch", "torch_compile", "liger", "cce", "trl", "gemm_floor")
MODES = ("fwd", "bwd", "full")


@dataclass(frozen=True)
class ModelShape:
    """LM-head geometry of a real model (hidden size D, vocab V)."""

    name: str
    hidden: int
    vocab: int


SHAPES = {
    "mistral-7b": ModelShape("mistral-7b", 4096, 32000),
    "llama-3-8b": ModelShape("llama-3-8b", 4096, 128256),
    # the CPU shape of issue 2 (and the tiny e2e model's vocab): D 512 keeps 2 cores in budget
    "tiny-cpu": ModelShape("tiny-cpu", 512, 32000),
}


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def device_name(dev: Optional[torch.device] = None) -> str:
    dev = dev or device()
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    import platform

    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores visible)"


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


# ----------------------------------------------------------------------------------------------
# provider availability: skip with the reason, never fake
# ----------------------------------------------------------------------------------------------

_PROVIDER_MODULES = {
    "zephyr_fast": "zephyr_kernels",
    "liger": "liger_kernel",
    "cce": "cut_cross_entropy",
    "trl": "trl",
}


def provider_unavailable(provider: str, dev: Optional[torch.device] = None) -> Optional[str]:
    """Why ``provider`` cannot run here (``None`` when it can)."""
    dev = dev or device()
    mod = _PROVIDER_MODULES.get(provider)
    if mod is not None:
        try:
            importlib.import_module(mod)
        except Exception as exc:  # an anchor's import can fail in many ways; report which
            return f"{provider}: `import {mod}` failed ({type(exc).__name__}: {exc})"
    if provider == "torch_compile" and not hasattr(torch, "compile"):
        return "torch_compile: this torch has no torch.compile"
    return None


def zephyr_impl(dev: torch.device) -> str:
    """The zephyr provider under benchmark: Triton on CUDA, the chunked torch path on CPU.

    Benchmarks never run Triton through the interpreter (that measures the interpreter).
    """
    return "triton" if dev.type == "cuda" else "torch"


def versions() -> dict:
    out = {"python": sys.version.split()[0], "torch": torch.__version__}
    for name in ("triton", "transformers", "trl", "liger_kernel", "cut_cross_entropy", "deepspeed",
                 "datasets", "pytest_benchmark"):
        try:
            from importlib.metadata import version

            dist = {"liger_kernel": "liger-kernel", "cut_cross_entropy": "cut-cross-entropy",
                    "pytest_benchmark": "pytest-benchmark"}.get(name, name)
            out[name] = version(dist)
        except Exception:
            out[name] = None
    return out


# ----------------------------------------------------------------------------------------------
# timing
# ----------------------------------------------------------------------------------------------

def run_timed(benchmark, target: Callable, setup: Optional[Callable] = None, *, dev: torch.device,
              rounds: int = 3, warmup_rounds: int = 1):
    """Median of ``rounds`` timed calls after ``warmup_rounds`` untimed ones (pytest-benchmark pedantic).

    ``setup()`` (untimed) returns the positional args of ``target`` — e.g. the forward output that a
    backward-only measurement consumes.  CUDA work is synchronised inside the timed region.
    """

    def timed(*args):
        out = target(*args)
        sync(dev)
        return out

    def _setup():
        args = setup() if setup is not None else ()
        sync(dev)
        return tuple(args), {}

    return benchmark.pedantic(timed, setup=_setup, rounds=rounds, warmup_rounds=warmup_rounds,
                              iterations=1)


def record(benchmark, *, suite: str, provider: str, mode: str, shape: str, dtype, dev: torch.device,
           **extra) -> None:
    """Fill ``benchmark.extra_info`` with the keys ``report.py`` groups and labels by."""
    assert provider in PROVIDERS, provider
    assert mode in MODES, mode
    info = benchmark.extra_info
    info.update(suite=suite, provider=provider, mode=mode, shape=shape,
                dtype=str(dtype).replace("torch.", ""), device=dev.type,
                device_name=device_name(dev))
    info.update({k: v for k, v in extra.items() if v is not None})


def median_seconds(benchmark) -> Optional[float]:
    stats = getattr(benchmark, "stats", None)
    if stats is None:
        return None
    inner = getattr(stats, "stats", stats)
    return float(inner.median)


def add_throughput(benchmark, *, flops: Optional[float] = None, tokens: Optional[int] = None) -> None:
    """TFLOP/s (for LM-head cases: 6·N·D·V — forward, dX and dW) and/or tokens/s from the median."""
    med = median_seconds(benchmark)
    if not med:
        return
    if flops is not None:
        benchmark.extra_info["tflops"] = flops / med / 1e12
    if tokens is not None:
        benchmark.extra_info["tokens_per_s"] = tokens / med


# ----------------------------------------------------------------------------------------------
# peak memory
# ----------------------------------------------------------------------------------------------

def tensor_bytes(*tensors) -> int:
    return int(sum(t.numel() * t.element_size() for t in tensors if t is not None))


def cuda_peak_growth(fn: Callable[[], object], dev: torch.device) -> int:
    """``max_memory_allocated`` during ``fn()`` minus what was allocated before it (the inputs)."""
    sync(dev)
    torch.cuda.reset_peak_memory_stats(dev)
    base = torch.cuda.memory_allocated(dev)
    out = fn()
    sync(dev)
    peak = torch.cuda.max_memory_allocated(dev) - base
    del out
    return int(peak)


class _ProbeServer:
    """``python -m benchmarks.memprobe --serve``: one fresh forked process per case (see memprobe.py)."""

    proc: Optional[subprocess.Popen] = None

    @classmethod
    def get(cls) -> subprocess.Popen:
        if cls.proc is None or cls.proc.poll() is not None:
            env = dict(os.environ)
            env["MALLOC_MMAP_THRESHOLD_"] = "65536"
            env.pop("TRITON_INTERPRET", None)
            env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
            cls.stderr = tempfile.TemporaryFile(mode="w+")
            cls.proc = subprocess.Popen([sys.executable, "-m", "benchmarks.memprobe", "--serve"], cwd=str(REPO),
                                        env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        stderr=cls.stderr, text=True, bufsize=1)
            atexit.register(cls.close)
        return cls.proc

    @classmethod
    def close(cls) -> None:
        if cls.proc is not None and cls.proc.poll() is None:
            cls.proc.stdin.close()  # the server exits at end of input
            try:
                cls.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                cls.proc.kill()
        cls.proc = None

    @classmethod
    def stderr_tail(cls) -> str:
        cls.stderr.seek(0)
        return cls.stderr.read()[-3000:]


def cpu_peak_growth_subprocess(spec: dict, timeout: float = 600.0) -> dict:
    """Peak RSS growth of one call of the case ``spec`` in a fresh Python process (see memprobe.py).

    Returns the probe's JSON: ``{"peak_rss_growth": bytes, "floor": bytes, ...}``.
    """
    server = _ProbeServer.get()
    server.stdin.write(json.dumps(spec) + "\n")
    server.stdin.flush()
    ready, _, _ = select.select([server.stdout], [], [], timeout)
    line = server.stdout.readline() if ready else ""
    result = json.loads(line) if line.startswith("{") else None
    if result is None or "error" in result:
        if result is None:
            _ProbeServer.close()  # hung or dead: the next probe starts a new server
        why = result["error"] if result else f"no answer within {timeout:.0f} s\n{_ProbeServer.stderr_tail()}"
        raise RuntimeError(f"memprobe failed for {spec}:\n{why[-3000:]}")
    return result


class RssMeter:
    """Peak-RSS growth of a block, from /proc/self (Linux): VmHWM is reset via clear_refs "5"."""

    @staticmethod
    def _status(key: str) -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
        raise RuntimeError(f"{key} not in /proc/self/status")

    def __enter__(self):
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets the peak-RSS high-water mark to the current RSS
        self.base = self._status("VmRSS")
        return self

    def __exit__(self, *exc):
        self.growth = self._status("VmHWM") - self.base
        return False
