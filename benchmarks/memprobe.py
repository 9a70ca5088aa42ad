"""Peak-RSS growth of one benchmark case, in a fresh process (CPU memory measurement).

Usage (the harness calls it): ``MALLOC_MMAP_THRESHOLD_=65536 python -m benchmarks.memprobe --serve``,
then one spec JSON per line on stdin → one result JSON per line on stdout; or one-shot
``python -m benchmarks.memprobe '<spec json>'``.

Every case is measured in a process of its own.  The server only *imports* (torch, the case
modules, the provider's library — no tensor work, so no thread pool or allocator state exists
yet) and ``fork()``\\ s one child per spec: each child is a fresh process that starts with the
libraries loaded instead of paying the import again (Liger / CCE imports take many seconds).

Steps in the child: build the case's inputs (allocated before measuring), run one warm-up call
(compilation, allocator and thread-pool start-up are not the call's memory), drop the gradients,
then reset the kernel's peak-RSS mark (``/proc/self/clear_refs`` ← 5) and run the measured call.
Result: ``{"peak_rss_growth": bytes, "floor": bytes, "base_rss": bytes}`` where ``floor`` is what
the call must keep (dX + dW for an LM-head case); ``{"error": traceback}`` when the case failed.
"""

from __future__ import annotations

import gc
import importlib
import json
import os
import sys
import traceback

_CASE_MODULES = {"lm_head": ("benchmarks.lm_head",),
                 "model": ("benchmarks.model_cases", "zephyr_fast.model.load", "zephyr_fast.model.forward",
                           "zephyr_fast.data.packing", "transformers",
                           "transformers.models.mistral.modeling_mistral"),
                 "hf_patch": ("benchmarks.compat_cases", "zephyr_kernels.hf_patch", "zephyr_fast.model.load",
                              "transformers.models.mistral.modeling_mistral")}


def build(spec: dict):
    kind = spec.get("case", "lm_head")
    if kind == "lm_head":
        from .lm_head import LMHeadCase

        return LMHeadCase(spec)
    if kind == "model":
        from .model_cases import ModelCase

        return ModelCase(spec)
    if kind == "hf_patch":
        from .compat_cases import HFPatchCase

        return HFPatchCase(spec)
    raise ValueError(f"memprobe: unknown case kind {kind!r}")


def measure(spec: dict) -> dict:
    import torch

    from .harness import RssMeter

    torch.manual_seed(0)
    case = build(spec)
    mode = spec.get("mode", "full")
    run = case.full if mode == "full" else (lambda: case.loss())
    for _ in range(int(spec.get("warmup", 1))):
        out = run()
        del out
    case.zero_grad()
    gc.collect()
    with RssMeter() as meter:
        out = run()
    del out
    return {"peak_rss_growth": meter.growth, "floor": case.grad_floor_bytes() if mode == "full" else 0,
            "base_rss": meter.base}


def preload(spec: dict) -> None:
    """Import (only import) what the case needs, in the server, so that its children inherit it."""
    from .harness import provider_unavailable
    from .model_cases import VARIANTS

    for mod in _CASE_MODULES.get(spec.get("case", "lm_head"), ()):
        importlib.import_module(mod)
    provider = spec.get("provider") or VARIANTS.get(spec.get("variant"))
    if provider:
        provider_unavailable(provider)  # imports the anchor's library (the child reports a failure)


def _measure_safely(spec: dict) -> dict:
    try:
        return measure(spec)
    except BaseException:  # the parent raises it with the spec
        return {"error": traceback.format_exc()}


def _forked(spec: dict) -> dict:
    """``measure(spec)`` in a forked child; its result comes back through a pipe."""
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: stray prints must not reach the server's protocol stream
        os.close(rfd)
        os.dup2(2, 1)
        data = json.dumps(_measure_safely(spec)).encode()
        with os.fdopen(wfd, "wb") as f:
            f.write(data)
        os._exit(0)
    os.close(wfd)
    with os.fdopen(rfd, "rb") as f:
        data = f.read()
    _, status = os.waitpid(pid, 0)
    if not data:
        return {"error": f"probe process died (wait status {status})"}
    return json.loads(data)


def serve(stdin=None, stdout=None) -> int:
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    for line in stdin:
        if not line.strip():
            continue
        spec = json.loads(line)
        try:
            preload(spec)
        except Exception:
            pass  # the child fails the same import and reports it
        stdout.write(json.dumps(_forked(spec)) + "\n")
        stdout.flush()
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv == ["--serve"]:
        return serve()
    if len(argv) != 1:
        print("usage: python -m benchmarks.memprobe --serve | '<spec json>'", file=sys.stderr)
        return 2
    result = _measure_safely(json.loads(argv[0]))
    print(json.dumps(result), flush=True)
    return 1 if "error" in result else 0


if __name__ == "__main__":
    sys.exit(main())
