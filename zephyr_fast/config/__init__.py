"""The recipe schema, torch-free: ``import zephyr_fast.config`` loads neither torch nor the trainer.

A recipe key's road: the YAML (or ``--key=value``) is read by :mod:`.loader` (``load_config`` /
``build_config``), which resolves aliases and handbook / TRL keys through :mod:`.keys` and
:mod:`.trl`, parses each value by its field's type, reads the stage from the registry in
:mod:`.values`, and builds the section dataclasses -- ``model`` / ``training`` / ``dpo`` in
:mod:`.sections`, ``data`` in :mod:`.data` -- each declaring its keys with a help text (``--help``:
:func:`.loader.keys_help`) and checking its own values against :mod:`.values`, where every valid value
is defined once.

Modules, lowest first: ``keys`` (ConfigError, typed parsing, the keys that are no field) with ``trl``,
``values`` (valid values and the stage registry's torch-free half), ``sections`` (Section, option, the
model / training / dpo sections), ``data``, ``loader`` (Config, build_config, load_config, keys_help).
Nothing here imports ``zephyr_fast.training``, ``zephyr_fast.data``, ``zephyr_fast.model`` or
``zephyr_kernels``.
"""

from zephyr_fast.config.keys import CLI, ConfigError
from zephyr_fast.config.values import ATTN_IMPLEMENTATIONS, DTYPES, LOSS_TYPES, OPTIMIZERS, SCHEDULERS, STAGES, StageSchema
from zephyr_fast.config.sections import DPOConfig, ModelConfig, Section, TrainingConfig
from zephyr_fast.config.data import DataConfig, DatasetMixture, DatasetSpec
from zephyr_fast.config.loader import (SECTIONS, TRAIN_USAGE, Config, _field_index, build_config, config_hash, keys_help,
                                       load_config, print_help, wants_help)


__all__ = [
    "ATTN_IMPLEMENTATIONS", "CLI", "Config", "ConfigError", "DPOConfig", "DTYPES", "DataConfig", "DatasetMixture",
    "DatasetSpec", "LOSS_TYPES", "ModelConfig", "OPTIMIZERS", "SCHEDULERS", "SECTIONS", "STAGES", "Section",
    "StageSchema", "TRAIN_USAGE", "TrainingConfig", "build_config", "config_hash", "keys_help", "load_config",
    "print_help", "wants_help",
]
