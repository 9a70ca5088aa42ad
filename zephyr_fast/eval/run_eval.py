"""``zephyr-fast eval RUN_DIR``: every checkpoint of a training run (and its final model) scored the way
the Zephyr paper's overfitting study scores its epochs -- preference accuracy on the training split
(``evaluate``), MT-Bench and AlpacaEval (the same judge for both) -- then a Markdown table and a plot
of training preference accuracy and the benchmark scores by epoch.

Checkpoints are read in step order from the complete (manifest-verified) ones; one written before
checkpoints were model folders is exported first (``zephyr-fast export``, which verifies it and keeps
it verified). Everything goes under ``RUN_DIR/eval/`` (``--out``): ``<checkpoint>/mt_bench``,
``<checkpoint>/alpaca_eval`` (each resumable: answers and judge calls are cached), ``eval.json``,
``eval.md``, ``eval.png``. The run's own ``config.yaml`` is the recipe the preference accuracy is
measured with (its reference log-probs cache is reused).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from zephyr_fast.fileio import atomic_open
from ..aif.client import JudgeConfig, cli_status
from ..aif.judge import add_judge_args, judge_config_from_args
from ..config import ConfigError, load_config
from ..training.checkpoint import list_checkpoints, read_manifest
from ..training.export import export_checkpoint
from ..training.hf_folder import is_hf_folder
from .alpaca import ANNOTATORS, run_alpaca_eval
from .evaluate import Evaluator
from .mt_bench import run_mt_bench

__all__ = ["main", "run_eval", "run_models"]

BENCHES = ("preference", "mt-bench", "alpaca-eval")


def run_models(run_dir: str, *, log=print) -> list:
    """``[(name, folder, step, epoch)]``: the run's complete checkpoints by step (exported when needed),
    then its final model when it wrote one."""
    out = []
    for path in list_checkpoints(run_dir):
        if not is_hf_folder(path):
            log(f"{path}: not a model folder yet: exporting it")
            export_checkpoint(path)
        with open(os.path.join(path, "trainer_state.json")) as f:
            state = json.load(f)
        out.append((os.path.basename(path), path, read_manifest(path)["step"], state.get("epoch")))
    out.sort(key=lambda m: m[2])
    summary = os.path.join(run_dir, "summary.json")
    if is_hf_folder(run_dir) and os.path.isfile(summary):
        with open(summary) as f:
            s = json.load(f)
        steps = s.get("global_step")
        epoch = steps / s["steps_per_epoch"] if steps and s.get("steps_per_epoch") else None
        out.append(("final", run_dir, steps, epoch))
    return out


def _score(name: str, folder: str, out: str, judge: JudgeConfig, evaluator, benches: tuple, opts: dict) -> dict:
    row = {}
    if "preference" in benches:
        metrics = evaluator.score(folder)
        split = evaluator.split
        row["loss"] = metrics[f"{split}_loss"]
        row["preference_accuracy"] = metrics.get(f"{split}_rewards/accuracies")
    if "mt-bench" in benches:
        rep = run_mt_bench(folder, os.path.join(out, name, "mt_bench"), judge, per_category=opts["per_category"],
                           max_new_tokens=opts["max_new_tokens"], progress=opts["progress"])
        row["mt_bench"] = rep["overall"]
    if "alpaca-eval" in benches:
        rep = run_alpaca_eval(folder, os.path.join(out, name, "alpaca_eval"), judge, annotators=tuple(ANNOTATORS),
                              max_new_tokens=opts["max_new_tokens"], limit=opts["alpaca_limit"], lc=opts["lc"],
                              progress=opts["progress"])
        for annotator, r in rep["annotators"].items():
            row[f"{annotator}_win_rate"] = r["win_rate"]
            row[f"{annotator}_standard_error"] = r["standard_error"]
            if "length_controlled_winrate" in r:
                row[f"{annotator}_lc_win_rate"] = r["length_controlled_winrate"]
    return row


def run_eval(run_dir: str, out: str, judge: JudgeConfig, *, benches: tuple = BENCHES, split: str = "train",
             per_category=None, alpaca_limit=None, max_new_tokens: int = 1024, lc: bool = True,
             progress: bool = True) -> list:
    """Score every model of ``run_dir`` (:func:`run_models`); writes ``eval.json``, ``eval.md``, ``eval.png``."""
    models = run_models(run_dir)
    if not models:
        raise ConfigError(f"{run_dir}: no complete checkpoint and no final model to evaluate")
    os.makedirs(out, exist_ok=True)
    # the run's recipe, evaluated in this one process (a DeepSpeed run's config is read without its launcher)
    evaluator = Evaluator(load_config(os.path.join(run_dir, "config.yaml"), ["--deepspeed=null"]), split) \
        if "preference" in benches else None
    opts = {"per_category": per_category, "alpaca_limit": alpaca_limit, "max_new_tokens": max_new_tokens, "lc": lc,
            "progress": progress}
    rows = []
    for name, folder, step, epoch in models:
        rows.append({"model": name, "step": step, "epoch": epoch,
                     **_score(name, folder, out, judge, evaluator, benches, opts)})
    with atomic_open(os.path.join(out, "eval.json")) as f:
        json.dump({"run_dir": run_dir, "split": split, "rows": rows}, f, indent=1)
    with atomic_open(os.path.join(out, "eval.md")) as f:
        f.write(markdown_table(rows, split) + "\n")
    plot(rows, os.path.join(out, "eval.png"), split)
    return rows


_COLUMNS = [("model", "model", "{}"), ("step", "step", "{}"), ("epoch", "epoch", "{:.2f}"),
            ("loss", "{split} loss", "{:.4f}"), ("preference_accuracy", "{split} preference accuracy", "{:.3f}"),
            ("mt_bench", "MT-Bench", "{:.2f}"),
            ("alpaca_eval_gpt4_win_rate", "AlpacaEval 1 win rate (%)", "{:.2f}"),
            ("weighted_alpaca_eval_gpt4_turbo_win_rate", "AlpacaEval 2 win rate (%)", "{:.2f}"),
            ("weighted_alpaca_eval_gpt4_turbo_lc_win_rate", "AlpacaEval 2 LC (%)", "{:.2f}")]


def markdown_table(rows: list, split: str) -> str:
    cols = [c for c in _COLUMNS if any(r.get(c[0]) is not None for r in rows)]
    lines = ["| " + " | ".join(h.format(split=split) for _, h, _ in cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = [("–" if r.get(k) is None else fmt.format(r[k])) for k, _, fmt in cols]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows: list, path: str, split: str) -> None:
    """The paper's overfitting figure: preference accuracy (left axis) and benchmark scores (right) by epoch."""
    import matplotlib  # as the other plots: only this command pays for it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [r["epoch"] if r.get("epoch") is not None else r["step"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.set_xlabel("epoch")
    ax.set_ylabel(f"{split} preference accuracy")
    if any(r.get("preference_accuracy") is not None for r in rows):
        ax.plot(xs, [r.get("preference_accuracy") for r in rows], "o-", color="tab:blue", label="preference accuracy")
    right = ax.twinx()
    right.set_ylabel("benchmark score")
    for key, label, color in (("mt_bench", "MT-Bench", "tab:red"),
                              ("alpaca_eval_gpt4_win_rate", "AlpacaEval 1 win rate / 10", "tab:green")):
        if any(r.get(key) is not None for r in rows):
            scale = 0.1 if "win_rate" in key else 1.0
            right.plot(xs, [None if r.get(key) is None else r[key] * scale for r in rows], "s--", color=color,
                       label=label)
    handles = ax.get_legend_handles_labels()[0] + right.get_legend_handles_labels()[0]
    if handles:
        ax.legend(handles=handles, loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="zephyr-fast eval", description=__doc__.split("\n\n")[0].replace("``", ""))
    ap.add_argument("run_dir", help="a training run's output_dir (its checkpoints and final model)")
    ap.add_argument("--out", help="default RUN_DIR/eval")
    ap.add_argument("--benches", default=",".join(BENCHES), help=f"any of {', '.join(BENCHES)}")
    ap.add_argument("--split", default="train", help="the split preference accuracy is measured on (train, test)")
    ap.add_argument("--per-category", type=int, help="MT-Bench: only N questions per category")
    ap.add_argument("--alpaca-limit", type=int, help="AlpacaEval: only the first N instructions")
    ap.add_argument("--max-new-tokens", type=int, default=1024)
    ap.add_argument("--lc", choices=("yes", "no"), default="yes", help="AlpacaEval 2 length-controlled win rate")
    add_judge_args(ap)
    args = ap.parse_args(argv)
    benches = tuple(b.strip() for b in args.benches.split(",") if b.strip())
    bad = [b for b in benches if b not in BENCHES]
    if bad or not benches:
        print(f"error: --benches: {bad[0] if bad else args.benches!r} is not one of {', '.join(BENCHES)}",
              file=sys.stderr)
        return 2
    out = args.out or os.path.join(args.run_dir, "eval")

    def body() -> None:
        judge = judge_config_from_args(args) if set(benches) - {"preference"} else None
        rows = run_eval(args.run_dir, out, judge, benches=benches, split=args.split, per_category=args.per_category,
                        alpaca_limit=args.alpaca_limit, max_new_tokens=args.max_new_tokens, lc=args.lc == "yes")
        print(markdown_table(rows, args.split))
        print(f"written: {out}/eval.json, eval.md, eval.png")

    return cli_status(body)  # bad input (ConfigError included: a run without models, a bad recipe): one line, 2


if __name__ == "__main__":
    sys.exit(main())
