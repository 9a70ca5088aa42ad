"""``zephyr-fast lm-eval MODEL_DIR --tasks leaderboard|TASK[,TASK...]``: the Open LLM Leaderboard tasks the
Zephyr paper reports, through EleutherAI's lm-evaluation-harness (``lm_eval``) on the Hugging Face model
folder (a checkpoint folder works), ``trust_remote_code`` off.

``--tasks leaderboard`` is the paper's (Open LLM Leaderboard v1) set with its shot counts:
ARC-challenge 25-shot, HellaSwag 10-shot, MMLU 5-shot, TruthfulQA MC2 0-shot, Winogrande 5-shot, GSM8K
5-shot; tasks sharing a shot count run in one ``lm_eval.simple_evaluate`` call. Other task names run with
``--num-fewshot`` (default: the task's own).

Data: ``lm_eval`` reads each task's dataset from the Hub when online; offline (``--offline``, or
``HF_DATASETS_OFFLINE=1``) from the ``datasets`` cache, and a task defined in a YAML under
``--include-path DIR`` (``dataset_path: json`` with local ``data_files``) reads local files. Writes
``OUT/lm_eval.json`` (every task's metrics and the settings) and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional

from zephyr_fast.fileio import atomic_open, first_line

__all__ = ["LEADERBOARD", "main", "run_lm_eval"]

# Open LLM Leaderboard v1: (lm_eval task, shots, the metric the leaderboard reports)
LEADERBOARD = (("arc_challenge", 25, "acc_norm,none"), ("hellaswag", 10, "acc_norm,none"), ("mmlu", 5, "acc,none"),
               ("truthfulqa_mc2", 0, "acc,none"), ("winogrande", 5, "acc,none"), ("gsm8k", 5, "exact_match,strict-match"))


def _plan(tasks: str, num_fewshot: Optional[int]) -> list:
    """``[(shots, [task, ...])]``: the leaderboard's shot counts, or every named task with ``num_fewshot``."""
    names = [t.strip() for t in tasks.split(",") if t.strip()]
    if not names:
        raise ValueError("--tasks: give leaderboard or task names")
    if names == ["leaderboard"]:
        groups: dict = {}
        for task, shots, _ in LEADERBOARD:
            groups.setdefault(shots, []).append(task)
        return sorted(groups.items())
    if "leaderboard" in names:
        raise ValueError("--tasks: leaderboard is a whole set; run it alone")
    return [(num_fewshot, names)]


def run_lm_eval(model_dir: str, out_dir: str, *, tasks: str = "leaderboard", num_fewshot: Optional[int] = None,
                limit: Optional[float] = None, batch_size: str = "auto", device: Optional[str] = None,
                include_path: Optional[str] = None, dtype: str = "auto") -> dict:
    """Run the tasks; returns ``{"results": {task: metrics}, "settings": ...}`` (also ``OUT/lm_eval.json``)."""
    import lm_eval  # optional dependency: only this command needs it
    from lm_eval.tasks import TaskManager

    if not os.path.isfile(os.path.join(model_dir, "config.json")):
        raise ValueError(f"{model_dir}: not a Hugging Face model folder (no config.json)")
    plan = _plan(tasks, num_fewshot)
    manager = TaskManager(include_path=include_path)
    model_args = {"pretrained": model_dir, "dtype": dtype, "trust_remote_code": False}
    results, versions, shots_of = {}, {}, {}
    for shots, names in plan:
        out = lm_eval.simple_evaluate(model="hf", model_args=model_args, tasks=names, num_fewshot=shots,
                                      batch_size=batch_size, device=device, limit=limit, task_manager=manager,
                                      log_samples=False)
        results.update(out["results"])
        versions.update(out.get("versions", {}))
        shots_of.update({t: shots for t in out["results"]})
    report = {"model": model_dir, "tasks": tasks, "limit": limit, "num_fewshot": shots_of, "versions": versions,
              "results": results, "lm_eval_version": getattr(lm_eval, "__version__", None)}
    os.makedirs(out_dir, exist_ok=True)
    with atomic_open(os.path.join(out_dir, "lm_eval.json")) as f:
        json.dump(report, f, indent=1, default=str)
    return report


def table(report: dict) -> str:
    """One row per task: shots and every numeric metric (``metric,filter`` as lm_eval names them)."""
    lines = ["| task | shots | metric | value | stderr |", "|---|---|---|---|---|"]
    for task, metrics in sorted(report["results"].items()):
        for key, value in sorted(metrics.items()):
            if "_stderr" in key or not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            name, _, filt = key.partition(",")
            err = metrics.get(f"{name}_stderr,{filt}")
            err_s = f"{err:.4f}" if isinstance(err, (int, float)) else "–"
            lines.append(f"| {task} | {report['num_fewshot'].get(task)} | {key} | {value:.4f} | {err_s} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="zephyr-fast lm-eval", description=__doc__.split("\n\n")[0].replace("``", ""))
    ap.add_argument("model_dir")
    ap.add_argument("--tasks", default="leaderboard", help="leaderboard, or lm_eval task names (comma-separated)")
    ap.add_argument("--num-fewshot", type=int, default=None, help="shots for named tasks (default: the task's)")
    ap.add_argument("--limit", type=float, default=None, help="only the first N documents per task (a smoke test)")
    ap.add_argument("--batch-size", default="auto")
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--include-path", default=None, help="a folder of extra task YAMLs (e.g. local data files)")
    ap.add_argument("--offline", action="store_true", help="datasets from the local cache only")
    ap.add_argument("--out", default=None, help="default outputs/lm_eval/<model>")
    args = ap.parse_args(argv)
    if args.offline:
        os.environ["HF_DATASETS_OFFLINE"] = os.environ["HF_HUB_OFFLINE"] = "1"
    out = args.out or os.path.join("outputs", "lm_eval", os.path.basename(os.path.normpath(args.model_dir)))
    try:
        report = run_lm_eval(args.model_dir, out, tasks=args.tasks, num_fewshot=args.num_fewshot, limit=args.limit,
                             batch_size=args.batch_size, device=args.device, include_path=args.include_path,
                             dtype=args.dtype)
    except ValueError as e:
        print(f"error: {first_line(e)}", file=sys.stderr)
        return 2
    print(table(report))
    print(f"written: {out}/lm_eval.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
