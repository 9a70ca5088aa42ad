"""Peak-RSS growth of one benchmark case, in a fresh process (CPU memory measurement).

Usage (the harness calls it): ``MALLOC_MMAP_THRESHOLD_=65536 python -m benchmarks.memprobe '<spec json>'``.

Steps: build the case's inputs (allocated before measuring), run one warm-up call (compilation,
allocator and thread-pool start-up are not the call's memory), drop the gradients, then reset the
kernel's peak-RSS mark (``/proc/self/clear_refs`` ← 5) and run the measured call.  Prints one JSON
line: ``{"peak_rss_growth": bytes, "floor": bytes, "base_rss": bytes}`` where ``floor`` is what the
call must keep (dX + dW for an LM-head case).
"""

from __future__ import annotations

import gc
import json
import sys


def build(spec: dict):
    kind = spec.get("case", "lm_head")
    if kind == "lm_head":
        from .lm_head import LMHeadCase

        return LMHeadCase(spec)
    if kind == "model":
        from .model_cases import ModelCase

        return ModelCase(spec)
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


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m benchmarks.memprobe '<spec json>'", file=sys.stderr)
        return 2
    print(json.dumps(measure(json.loads(argv[0]))), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
