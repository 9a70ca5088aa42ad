"""zephyr_fast trainer launch script: ``train.py RECIPE.yaml [--key=value ...]``, stage ``sft | ref_logps | dpo``.

Launch with ``python`` (one process, plain torch optimiser), ``torchrun`` or ``deepspeed``
(``DS_ACCELERATOR=cpu deepspeed --num_gpus 2 zephyr_fast/train.py recipes/tiny/dpo.yaml`` on CPU),
or ``python -m zephyr_fast.train``. In-process: ``run(load_config(path, overrides)) -> summary dict``.

The run itself reads top to bottom in ``zephyr_fast/training/run.py`` (the package docstring of
``zephyr_fast.training`` lists its modules in call order).
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__":  # run as a script: its folder must not shadow top-level modules
    sys.path = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

from zephyr_fast.config import ConfigError, load_config  # noqa: E402
from zephyr_fast.data.validate import DataValidationError  # noqa: E402
from zephyr_fast.training.distributed import teardown  # noqa: E402
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
        raise SystemExit("usage: train.py RECIPE.yaml [--key=value ...]")
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


def main(argv=None) -> int:
    path, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    # --stop_after=N is a run option, not a recipe key: stop after N steps as if preempted
    stop = [o for o in overrides if o.startswith("--stop_after=")]
    overrides = [o for o in overrides if o not in stop]
    stop_after = int(stop[-1].split("=", 1)[1]) if stop else None
    try:
        cfg = load_config(path, overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        run(cfg, stop_after=stop_after)
    except (ConfigError, DataValidationError) as e:  # bad input: one line naming file, row / key and field
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        teardown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
