"""The handbook / TRL keys that are no section field: translations, always-values, refusals, the
``sft`` / ``dpo`` subcommands and the tokenizer's ``eos_token``."""

import glob
import os

import pytest
import yaml

from tests.train.helpers import TOKENIZER_DIR
from zephyr_fast import cli
from zephyr_fast.config import keys as rk
from zephyr_fast.config import SECTIONS, ConfigError, _field_index, build_config
from zephyr_fast.data.chat import load_tokenizer

HERE = os.path.dirname(os.path.abspath(__file__))
DATA = {"dataset_mixer": {"assets/data/ultrachat_200k/sample16.jsonl": 1.0}, "dataset_splits": ["train"]}
BASE = {"tokenizer_name_or_path": "tok", "model_init": {"hidden_size": 64}, **DATA}


def cfg_of(overrides=(), **kw):
    return build_config({**BASE, **kw}, source="r.yaml", overrides=list(overrides))


def err(overrides=(), **kw):
    with pytest.raises(ConfigError) as e:
        cfg_of(overrides, **kw)
    assert "\n" not in str(e.value)
    return str(e.value)


def test_every_key_of_the_published_recipes_has_a_rule():
    """A field, an alias, a translation / always / no-effect key, or a refusal -- never unknown."""
    handled = set(_field_index()) | rk.extra_keys() | set(rk.REFUSED) | set(rk.OBJECTIVE_KEYS) | set(SECTIONS)
    keys = set()
    for path in glob.glob(os.path.join(HERE, "handbook", "*", "**", "*.yaml"), recursive=True):
        with open(path) as f:
            keys |= set(yaml.safe_load(f))
    assert len(keys) > 70 and keys <= handled, sorted(keys - handled)


def test_use_flash_attention_2_and_model_init_kwargs_translate():
    assert cfg_of(use_flash_attention_2=True).model.attn_implementation == "flash_attention_2"
    assert cfg_of(["--use_flash_attention_2=false"]).model.attn_implementation == "sdpa"
    c = cfg_of(model_init_kwargs={"torch_dtype": "bfloat16", "revision": "v1", "attn_implementation": "eager"})
    assert (c.model.dtype, c.model.model_revision, c.model.attn_implementation) == ("bfloat16", "v1", "eager")
    assert "r.yaml: model_init_kwargs.device_map: has no zephyr_fast equivalent" in err(
        model_init_kwargs={"device_map": "auto"})
    c = cfg_of(model_init_kwargs={"trust_remote_code": True})  # never executed: it stays off, with a notice
    assert any(n.startswith("trust_remote_code: zephyr_fast never executes code") for n in c.notices)


def test_fractional_step_counts_are_fractions_of_the_run():
    """transformers: logging/eval/save_steps below 1 are ceil(fraction x total optimiser steps)."""
    from zephyr_fast.config.keys import steps_every

    c = cfg_of(save_steps=0.25, logging_steps=0.05, eval_steps=3)
    assert (c.training.save_steps, c.training.logging_steps, c.training.eval_steps) == (0.25, 0.05, 3)
    assert isinstance(c.training.eval_steps, int)
    assert [steps_every(v, 37) for v in (0.25, 0.05, 3, 0)] == [10, 2, 3, 0]
    assert cfg_of(packing_strategy="ffd").training.packing  # TRL's older first-fit name: best-fit packs as tight


def test_always_keys_accept_only_what_zephyr_fast_does():
    c = cfg_of(padding_free=True, use_liger_kernel=True, average_tokens_across_devices=True, packing_strategy="bfd",
               logging_strategy="steps", precompute_ref_log_probs=True, max_prompt_length=64, max_length=128)
    assert c.training.stage == "dpo"  # precompute_ref_log_probs is a DPO key
    assert "logging_strategy: 'epoch' is not supported" in err(logging_strategy="epoch")
    assert "average_tokens_across_devices: False is not supported" in err(average_tokens_across_devices=False)
    # TRL's defaults of these switches give the same numbers: a notice, not a refusal (trl_keys.EQUIVALENT)
    notices = cfg_of(["--precompute_ref_log_probs=no"], use_liger_kernel=False).notices
    assert any(n.startswith("use_liger_kernel: False -> True: zephyr_fast always computes the loss") for n in notices)
    assert any(n.startswith("precompute_ref_log_probs: False -> True") for n in notices)


@pytest.mark.parametrize("kw, needle", [
    ({"dataset_text_field": "content"}, "r.yaml: dataset_text_field: 'content' is not supported: raw-text "
                                        "(continued pretraining) data is not"),
    ({"optim_args": "a=1"}, "set adam_beta1 / adam_beta2"),
    ({"dataset_kwargs": {"append_concat_token": True}}, "append_concat_token: true is not supported"),
    ({"dataset_kwargs": {"max_seq_length": 3}}, "dataset_kwargs: 'max_seq_length' has no zephyr_fast equivalent"),
    ({"save_steps": 2.5}, "r.yaml: save_steps: must be a number of optimiser steps or a fraction of the run in (0, 1)"),
    ({"dataset_name": "org/ds"}, "r.yaml: dataset_name: give either dataset_name (TRL) or dataset_mixer, not both"),
    ({"dataset_mixer": None, "dataset_name": "d", "dataset_train_split": "sft"}, "dataset_train_split: split 'sft' must"),
    ({"dataset_mixer": None, "dataset_config": "all"}, "needs dataset_name"),
])
def test_refused_keys_say_what_to_use_instead(kw, needle):
    assert needle in err(**kw)


def test_dataset_kwargs_and_trl_dataset_keys_are_accepted():
    c = cfg_of(dataset_kwargs={"add_special_tokens": False, "append_concat_token": False})
    assert any(n.startswith("dataset_kwargs.add_special_tokens: BOS is added once") for n in c.notices)
    c = cfg_of(["--dataset_name=org/prefs", "--dataset_train_split=train_prefs", "--dataset_test_split=test_prefs"],
               dataset_mixer=None)
    assert c.data.dataset_mixer == {"org/prefs": 1.0} and c.data.dataset_splits == ["train_prefs", "test_prefs"]
    assert c.training.stage == "dpo"  # *_prefs splits are preference data


def test_new_fields_eos_token_and_logging_first_step():
    c = cfg_of(eos_token="<|im_end|>", logging_first_step=True)
    assert c.model.eos_token == "<|im_end|>" and c.training.logging_first_step is True
    assert cfg_of().model.eos_token is None and cfg_of().training.logging_first_step is False


def test_load_tokenizer_sets_eos_token():
    tok = load_tokenizer(str(TOKENIZER_DIR), eos_token="<unk>")
    assert tok.eos_token == "<unk>" and tok.eos_token_id == tok.convert_tokens_to_ids("<unk>")
    assert load_tokenizer(str(TOKENIZER_DIR)).eos_token == "</s>"
    with pytest.raises(ValueError, match="eos_token: '<|im_end|>' is not a token"):
        load_tokenizer(str(TOKENIZER_DIR), eos_token="<|im_end|>")


def test_sft_and_dpo_subcommands_force_the_stage(tmp_path, capsys):
    r = tmp_path / "r.yaml"
    r.write_text(yaml.safe_dump({**BASE, "beta": 0.1}))
    assert cli.main(["sft", str(r)]) == 2
    assert "command line --stage: 'sft' contradicts the DPO key(s) beta" in capsys.readouterr().err
    s = tmp_path / "s.yaml"
    s.write_text(yaml.safe_dump({**BASE, "dataset_splits": ["train_sft"]}))
    assert cli.main(["dpo", str(s)]) == 2
    assert "command line --stage: 'dpo' contradicts the chat (SFT) data" in capsys.readouterr().err
    assert cli.COMMANDS["plan"] == ("zephyr_fast.training.preview", "main", [])
    assert cli.main(["train", "--help"]) == 0 and "[dpo]" in capsys.readouterr().out
