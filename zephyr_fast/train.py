"""zephyr_fast trainer launch script: ``train.py RECIPE.yaml [--key=value ...]``, stage ``sft | ref_logps | dpo``.

``train.py --help`` lists every recipe key with its section, type, default and the handbook / TRL
names it accepts. Bad input ends the launch with one line ``error: ...`` and status 2; ``--debug``
shows the traceback instead.

Launch with ``python`` (one process, plain torch optimiser), ``torchrun`` or ``deepspeed``
(``DS_ACCELERATOR=cpu deepspeed --num_gpus 2 zephyr_fast/train.py recipes/tiny/dpo.yaml`` on CPU),
or ``python -m zephyr_fast.train``. In-process: ``run(load_config(path, overrides)) -> summary dict``.

The run itself reads top to bottom in ``zephyr_fast/training/run.py`` (the package docstring of
``zephyr_fast.training`` lists its modules in call order).
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__":  # run as a script or with -m: neither its folder nor the repo root (whose kernels/
    # folder would shadow the Hugging Face `kernels` package that transformers imports) may be on sys.path;
    # the installed zephyr_fast / zephyr_kernels packages are found through site-packages
    _PKG = os.path.dirname(os.path.abspath(__file__))
    sys.path = [p for p in sys.path if os.path.abspath(p or ".") not in (_PKG, os.path.dirname(_PKG))]
    from zephyr_fast.cli import exit_without_finalisation, run_command
    from zephyr_fast.config import print_help, wants_help

    if wants_help(sys.argv[1:]):  # before the heavy imports below: --help never loads torch or the trainer
        sys.exit(print_help())
    exit_without_finalisation()  # before the heavy imports below, so that their exit handlers run first

from zephyr_fast import redaction  # noqa: E402
from zephyr_fast.config import TRAIN_USAGE as USAGE  # noqa: E402
from zephyr_fast.config import ConfigError, load_config, print_help, wants_help  # noqa: E402
from zephyr_fast.data.validate import DataValidationError  # noqa: E402
from zephyr_fast.training.build import check_config  # noqa: E402
from zephyr_fast.training.distributed import teardown  # noqa: E402
from zephyr_fast.training.reference import StaleRefLogpsError  # noqa: E402
from zephyr_fast.training.run import run  # noqa: E402

__all__ = ["load_config", "main", "parse_args", "run"]


def parse_args(argv: list) -> tuple:
    """``RECIPE.yaml [--key=value ...]``; launcher-added ``--local_rank`` is dropped."""
    args, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a.startswith("--local_rank") or a.startswith("--local-rank"):
            skip = "=" not in a
            continue
        args.append(a)
    if not args or args[0].startswith("--"):
        raise SystemExit(USAGE)
    overrides = []
    rest = args[1:]
    i = 0
    while i < len(rest):  # accept "--key value" as well as "--key=value"
        a = rest[i]
        if a.startswith("--") and "=" not in a and i + 1 < len(rest) and not rest[i + 1].startswith("--"):
            overrides.append(f"{a}={rest[i + 1]}")
            i += 2
        else:
            overrides.append(a)
            i += 1
    return args[0], overrides


def _run_option(overrides: list, name: str) -> tuple:
    """Remove the run option ``--name[=value]`` (not a recipe key); ``(its last value or None, rest)``."""
    found = [o for o in overrides if o == f"--{name}" or o.startswith(f"--{name}=")]
    rest = [o for o in overrides if o not in found]
    return (found[-1].partition("=")[2] or "true" if found else None), rest


def main(argv=None) -> int:
    """Load the recipe and run it; status 0, or 2 with one line naming the bad input."""
    argv = list(sys.argv[1:] if argv is None else argv)
    redaction.redact_argv(argv)  # registers the secrets given as flags
    redaction.scrub_process_argv()  # what wandb records as the command line
    if wants_help(argv):
        return print_help(argv)
    try:
        path, overrides = parse_args(argv)
    except SystemExit as e:
        print(e, file=sys.stderr)
        return 2
    debug, overrides = _run_option(overrides, "debug")
    stop, overrides = _run_option(overrides, "stop_after")  # stop after N steps as if preempted
    debug = debug is not None and debug.lower() not in ("false", "0", "no")
    if stop is not None and not stop.isdigit():
        print(f"error: command line --stop_after: expected a number of steps, got {stop!r}", file=sys.stderr)
        return 2
    try:
        return _load_and_run(path, overrides, int(stop) if stop else None)
    # bad input: one line naming file, row / key and field; a stale or corrupt reference cache names its file
    except (ConfigError, DataValidationError, StaleRefLogpsError) as e:
        if debug:
            raise
        print(f"error: {redaction.redact(e)}", file=sys.stderr)
        return 2


def _load_and_run(path: str, overrides: list, stop_after) -> int:
    cfg = load_config(path, overrides)
    check_config(cfg)  # what only the trainer's code can check, before anything is set up (as load_config)
    try:
        run(cfg, stop_after=stop_after)
    finally:
        teardown()
    return 0


if __name__ == "__main__":
    sys.exit(run_command(main, None))
