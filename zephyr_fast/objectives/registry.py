"""The registry: the recipe's ``stage:`` -> its objective's class, the only place a stage name is looked up.

Add an objective: a module here with a :class:`~zephyr_fast.objectives.base.Stage` subclass whose
``schema`` is its entry in ``zephyr_fast.config.values.STAGES`` (the config's torch-free half of the
registry: its section, the keys it owns, tokens per example), and one line in :data:`STAGES`.
"""

from __future__ import annotations

from zephyr_fast.objectives.base import Stage
from zephyr_fast.objectives.dpo import DPOStage, RefLogpsStage
from zephyr_fast.objectives.sft import SFTStage

STAGES = {cls.name: cls for cls in (SFTStage, RefLogpsStage, DPOStage)}  # recipe ``stage:`` -> class


def stage_class(name: str) -> type:
    """The registered stage class called ``name`` (``KeyError`` when there is none)."""
    return STAGES[name]


def make_stage(cfg) -> Stage:
    """The recipe's stage (``cfg.training.stage``), built from the recipe (``Stage.from_config``: a one-line
    ``ConfigError`` for what only the stage's code can check)."""
    return STAGES[cfg.training.stage].from_config(cfg)
