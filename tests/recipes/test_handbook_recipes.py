"""Every published alignment-handbook recipe (55 files at four commits, ``handbook/PROVENANCE.md``)
either loads to the stage and hyperparameters its YAML states, or is refused at load in one line.

The stage is not in the files (the handbook's script chose it): it is the recipe's folder,
``.../sft/`` or ``.../dpo/``, and zephyr_fast must infer it from the keys alone.
"""

import glob
import os

import pytest
import yaml

from zephyr_fast.config import keys as rk
from zephyr_fast.config import SECTIONS, ConfigError, load_config

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "handbook")
RECIPES = sorted(os.path.relpath(p, HERE) for p in glob.glob(os.path.join(HERE, "*", "**", "*.yaml"), recursive=True))

# recipe -> the reason its one-line refusal must give
REFUSED = {
    "925acdf/zephyr-141b-A35b/orpo/config_full.yaml": "an alignment-handbook ORPO recipe (folder orpo/)",
    "c8f5bdf/zephyr-141b-A35b/orpo/config_full.yaml": "an alignment-handbook ORPO recipe (folder orpo/)",
    "c8f5bdf/gpt2-nl/cpt/config_full.yaml": "continued pretraining on raw text",
}
LOADED = [r for r in RECIPES if r not in REFUSED]
SFT_UNUSED = ("beta", "loss_type", "label_smoothing", "max_prompt_length")  # DPO keys

# Config attribute -> the recipe keys that set it (first one present wins)
FIELDS = {
    "training.learning_rate": ("learning_rate",), "training.num_train_epochs": ("num_train_epochs",),
    "training.max_steps": ("max_steps",),
    "training.per_device_train_batch_size": ("per_device_train_batch_size",),
    "training.per_device_eval_batch_size": ("per_device_eval_batch_size",),
    "training.gradient_accumulation_steps": ("gradient_accumulation_steps",),
    "training.lr_scheduler_type": ("lr_scheduler_type",), "training.lr_scheduler_kwargs": ("lr_scheduler_kwargs",),
    "training.warmup_ratio": ("warmup_ratio",), "training.warmup_steps": ("warmup_steps",),
    "training.optim": ("optim",), "training.max_grad_norm": ("max_grad_norm",), "training.seed": ("seed",),
    "training.eval_strategy": ("eval_strategy", "evaluation_strategy"), "training.eval_steps": ("eval_steps",),
    "training.save_strategy": ("save_strategy",), "training.save_total_limit": ("save_total_limit",),
    "training.logging_steps": ("logging_steps",), "training.bf16": ("bf16",), "training.tf32": ("tf32",),
    "training.output_dir": ("output_dir",), "training.hub_model_id": ("hub_model_id",),
    "data.max_length": ("max_length", "max_seq_length"), "data.max_prompt_length": ("max_prompt_length",),
    "data.dataset_mixer": ("dataset_mixer",), "data.dataset_splits": ("dataset_splits",),
    "data.chat_template": ("chat_template",),
    "dpo.beta": ("beta",), "dpo.loss_type": ("loss_type",),
    "model.model_name_or_path": ("model_name_or_path",), "model.model_revision": ("model_revision",),
    "model.gradient_checkpointing_kwargs": ("gradient_checkpointing_kwargs",), "model.use_peft": ("use_peft",),
    "model.lora_r": ("lora_r",), "model.lora_alpha": ("lora_alpha",), "model.lora_dropout": ("lora_dropout",),
    "model.load_in_4bit": ("load_in_4bit",), "model.attn_implementation": ("attn_implementation",),
}


def raw_of(rel):
    with open(os.path.join(HERE, rel)) as f:
        return yaml.safe_load(f)


def attr(cfg, path):
    section, key = path.split(".")
    return getattr(getattr(cfg, section), key)


def test_the_vendored_tree_is_the_published_one():
    assert len(RECIPES) == 55
    assert os.path.isfile(os.path.join(HERE, "LICENSE")) and os.path.isfile(os.path.join(HERE, "PROVENANCE.md"))
    assert set(REFUSED) <= set(RECIPES)


@pytest.mark.parametrize("rel", LOADED)
def test_recipe_loads_to_its_stage_and_hyperparameters(rel):
    raw, cfg = raw_of(rel), load_config(os.path.join(HERE, rel))
    assert cfg.training.stage == os.path.basename(os.path.dirname(rel))  # .../sft/ or .../dpo/
    checked = 0
    for path, keys in FIELDS.items():
        key = next((k for k in keys if k in raw), None)
        if key is None or (path.startswith("dpo.") and cfg.training.stage == "sft"):
            continue
        assert attr(cfg, path) == raw[key], f"{rel}: {key}"
        checked += 1
    assert checked >= 15


@pytest.mark.parametrize("rel", LOADED)
def test_left_out_keys_get_the_hf_default_or_a_notice(rel):
    """A key the YAML does not set is transformers' / TRL's default, or the run says it is not."""
    raw, cfg = raw_of(rel), load_config(os.path.join(HERE, rel))
    noticed = {n.split(":", 1)[0] for n in cfg.notices}
    for key, hf in rk.HF_DEFAULTS.items():
        aliases = {a for a, target in rk.ALIASES.items() if target == key}
        if key in raw or aliases & set(raw) or (cfg.training.stage == "sft" and key in SFT_UNUSED):
            continue
        value = next(getattr(getattr(cfg, sec), key) for sec in SECTIONS if hasattr(getattr(cfg, sec), key))
        assert value == hf or key in noticed, f"{rel}: {key} = {value!r} silently (HF: {hf!r})"


@pytest.mark.parametrize("rel", LOADED)
def test_keys_without_effect_are_listed_in_notices(rel):
    raw, cfg = raw_of(rel), load_config(os.path.join(HERE, rel))
    noticed = {n.split(":", 1)[0] for n in cfg.notices}
    assert set(raw) & set(rk.NO_EFFECT) <= noticed
    assert noticed - {"dataset_kwargs.add_special_tokens"} <= set(raw) | set(rk.HF_DEFAULTS)


@pytest.mark.parametrize("rel", sorted(REFUSED))
def test_refused_recipe_is_one_line_naming_the_file_and_reason(rel):
    with pytest.raises(ConfigError) as e:
        load_config(os.path.join(HERE, rel))
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(os.path.join(HERE, rel)) and REFUSED[rel] in msg


def test_original_zephyr_7b_beta_recipes_load_as_published():
    """The a0b8d49 release: DPO beta 0.1, RMSprop, 3 epochs, lr 5e-7 linear; SFT save_total_limit: null."""
    dpo = load_config(os.path.join(HERE, "a0b8d49/zephyr-7b-beta/dpo/config_full.yaml"))
    assert dpo.training.stage == "dpo" and dpo.dpo.beta == 0.1 and dpo.training.optim == "rmsprop"
    assert dpo.training.num_train_epochs == 3 and dpo.training.lr_scheduler_type == "linear"
    assert dpo.data.dataset_splits == ["train_prefs", "test_prefs"]
    sft = load_config(os.path.join(HERE, "a0b8d49/zephyr-7b-beta/sft/config_full.yaml"))
    assert sft.training.stage == "sft" and sft.training.save_total_limit is None
    assert sft.training.tf32 is True and dpo.training.tf32 is None


def test_trl_dataset_keys_become_a_dataset_mixer():
    cfg = load_config(os.path.join(HERE, "925acdf/smollm2/sft/config.yaml"))
    assert cfg.data.dataset_mixer == {"HuggingFaceTB/smoltalk": 1.0}
    assert cfg.data.dataset_splits == ["train", "test"] and cfg.data.dataset_configs == ["all"]
