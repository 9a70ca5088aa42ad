"""``zephyr-fast`` console script: one entry point for the pipeline's stages.

    zephyr-fast train RECIPE.yaml [--key=value ...]      # stage from the recipe (sft | ref_logps | dpo); --help: keys
    zephyr-fast sft RECIPE.yaml [--key=value ...]        # train, stage sft (refused if the recipe has DPO keys)
    zephyr-fast dpo RECIPE.yaml [--key=value ...]        # train, stage dpo (refused if the recipe is SFT data)
    zephyr-fast plan RECIPE.yaml [--key=value ...]       # what the run would do, without training
    zephyr-fast ref-logps RECIPE.yaml [--key=value ...]  # only the offline reference pass of a DPO recipe
    zephyr-fast binarize IN OUT [--seed N] [--score ...] # UltraFeedback raw/flat -> ultrafeedback_binarized
    zephyr-fast plot OUT.png LABEL=metrics.jsonl ...     # loss / reward-margin plot of finished runs
    zephyr-fast demo [--fast]                            # dSFT -> ref log-probs -> dDPO -> MT-Bench, tiny CPU model
    zephyr-fast generate PROMPTS OUT_DIR --pool NAME=MODEL_DIR|NAME=HUB_ID|NAME=URL#MODEL ... # AIF completions
    zephyr-fast judge IN OUT [--base-url URL --judge-model M --completions-per-request N]  # UltraFeedback ratings
    zephyr-fast aif recipes/aif.yaml [--dry-run] [--key=value ...] # AIF: generate -> judge -> binarize, one recipe
    zephyr-fast mt-bench MODEL_DIR [--out DIR]                     # MT-Bench answers + single-answer grading report
    zephyr-fast alpaca-eval MODEL_DIR [--annotators 1,2]           # AlpacaEval 1 / 2 (or --from-annotations FILE)
    zephyr-fast evaluate RECIPE.yaml [--split train] [--model DIR] # SFT loss / DPO metrics on a split, no training
    zephyr-fast eval RUN_DIR [judge flags]                         # every checkpoint: preference acc., MT-Bench, AlpacaEval
    zephyr-fast export CHECKPOINT [--out DIR]                      # an older checkpoint -> Hugging Face model folder
    zephyr-fast lm-eval MODEL_DIR [--tasks leaderboard]            # Open LLM Leaderboard tasks through lm_eval

Multi-GPU training goes through a launcher: ``deepspeed --num_gpus N zephyr_fast/train.py RECIPE``.
"""

from __future__ import annotations

import atexit
import importlib
import logging
import os
import sys

from zephyr_fast import redaction
from zephyr_fast.config import print_help, wants_help

USAGE = __doc__.split("\n\n")[1]

# command -> (module, function taking argv, extra argv); each module is imported only when its command
# runs, so `zephyr-fast binarize` or `--help` does not pay for torch, transformers or the Hub
COMMANDS = {
    "train": ("zephyr_fast.train", "main", []),
    "sft": ("zephyr_fast.train", "main", ["--stage=sft"]),
    "dpo": ("zephyr_fast.train", "main", ["--stage=dpo"]),
    "ref-logps": ("zephyr_fast.train", "main", ["--stage=ref_logps"]),
    "plan": ("zephyr_fast.training.preview", "main", []),
    "binarize": ("zephyr_fast.aif.binarize", "main", []),
    "plot": ("zephyr_fast.training.metrics", "plot_main", []),
    "demo": ("zephyr_fast.demo", "main", []),
    "generate": ("zephyr_fast.aif.generate", "main", []),
    "judge": ("zephyr_fast.aif.judge", "main", []),
    "aif": ("zephyr_fast.aif.pipeline", "main", []),
    "mt-bench": ("zephyr_fast.eval.mt_bench", "main", []),
    "alpaca-eval": ("zephyr_fast.eval.alpaca", "main", []),
    "evaluate": ("zephyr_fast.eval.evaluate", "main", []),
    "eval": ("zephyr_fast.eval.run_eval", "main", []),
    "export": ("zephyr_fast.training.export", "main", []),
    "lm-eval": ("zephyr_fast.eval.lm_harness", "main", []),
}
ALIASES = {"ref_logps": "ref-logps", "mt_bench": "mt-bench", "alpaca_eval": "alpaca-eval", "lm_eval": "lm-eval"}
_EXIT: dict = {}


def exit_without_finalisation() -> None:
    """Make this process end, once its command has returned, without the interpreter's finalisation.

    Deallocating torch, transformers, datasets and a run's objects module by module takes seconds
    after a training run (2-3 s measured after the tiny DPO recipe on 2 cores) and does nothing a
    user needs: every file is closed and the process group destroyed by then.  Call it first thing
    in a process's entry point: the handler registered here runs after every exit handler registered
    later (``atexit`` is last-in first-out; wandb's, the Hub's...) and after non-daemon threads are
    joined; it flushes logging and stdio, then ends with the status the command returned (see
    :func:`run_command`).  A command that raised exits the normal way, traceback and all.
    """

    def _end() -> None:
        if "status" in _EXIT:
            logging.shutdown()
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(_EXIT["status"])

    atexit.register(_end)


def run_command(fn, argv) -> int:
    """``fn(argv)``, remembering its status for :func:`exit_without_finalisation`."""
    _EXIT["status"] = status = fn(argv)
    return status


def main(argv=None) -> int:
    if argv is None:  # the console script itself (not an in-process call): end without finalisation
        exit_without_finalisation()
    argv = list(sys.argv[1:] if argv is None else argv)
    redaction.redact_argv(argv)  # registers the secrets given as flags (masked in every message)
    redaction.scrub_process_argv()  # what wandb and crash reports record as the command line
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(__doc__)
        return 0 if argv else 2
    cmd, rest = ALIASES.get(argv[0], argv[0]), argv[1:]
    if cmd not in COMMANDS:
        print(f"zephyr-fast: unknown command {argv[0]!r}\n\n{USAGE}", file=sys.stderr)
        return 2
    module, func, extra = COMMANDS[cmd]
    if module == "zephyr_fast.train" and wants_help(rest):  # every recipe key, without importing the trainer
        return run_command(print_help, rest)
    # the one deferred import of the package (see COMMANDS): the command's own module
    return run_command(getattr(importlib.import_module(module), func), rest + extra)


if __name__ == "__main__":
    sys.exit(main())
