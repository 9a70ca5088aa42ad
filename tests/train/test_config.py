"""Recipe parsing: flat vs sectioned YAML, aliases, overrides with coercion, and every error message."""

import glob
import os

import pytest
import yaml
from tests.train.helpers import REPO, recipe

from zephyr_fast.config import ConfigError, build_config, load_config
from zephyr_fast.train import main, parse_args
from zephyr_fast.training.build import check_config

DATA = {"dataset_mixer": {"assets/data/ultrachat_200k/sample16.jsonl": 1.0}, "dataset_splits": ["train"]}
BASE = {"tokenizer_name_or_path": "tok", "model_init": {"hidden_size": 64}, **DATA}


def key_notices(cfg):
    """The notices about keys the recipe gave (not the "not set" ones about defaults)."""
    return [n for n in cfg.notices if ": not set, so" not in n]


def cfg_of(**kw):
    return build_config({**BASE, **kw}, source="r.yaml")


def err(raw, overrides=()):
    """The one-line error of loading ``raw`` and of the checks train makes right after (check_config)."""
    with pytest.raises(ConfigError) as e:
        check_config(build_config(raw, source="r.yaml", overrides=list(overrides)))
    return str(e.value)


def test_flat_and_sectioned_recipes_resolve_identically():
    flat = cfg_of(stage="dpo", learning_rate=5e-7, beta=0.05, max_length=256, max_prompt_length=64, dtype="bfloat16")
    sectioned = build_config({
        "model": {"tokenizer_name_or_path": "tok", "model_init": {"hidden_size": 64}, "dtype": "bfloat16"},
        "data": {**DATA, "max_length": 256, "max_prompt_length": 64},
        "training": {"stage": "dpo", "learning_rate": 5e-7},
        "dpo": {"beta": 0.05},
    }, source="r.yaml")
    assert flat.to_dict() == sectioned.to_dict()
    assert flat.dpo.beta == 0.05 and flat.data.max_length == 256 and flat.model.dtype == "bfloat16"


def test_legacy_aliases_map_to_their_fields():
    c = cfg_of(max_seq_length=333, torch_dtype="bfloat16", evaluation_strategy="steps", eval_steps=5,
               rpo_alpha=1.0, max_prompt_length=100, push_to_hub=True, hub_model_id="x/y")
    assert c.data.max_length == 333 and c.model.dtype == "bfloat16"
    assert c.training.eval_strategy == "steps" and c.dpo.rpo_alpha == 1.0
    assert c.training.stage == "dpo"  # rpo_alpha is a DPO key


def test_seed_is_shared_by_training_and_data():
    c = cfg_of(seed=123)
    assert c.training.seed == 123 and c.data.seed == 123


def test_overrides_are_coerced_to_field_types():
    c = build_config({**BASE}, source="r.yaml", overrides=[
        "--num_train_epochs=2", "--learning_rate=1e-4", "--use_peft=true", "--report_to=tensorboard,wandb",
        "--training.max_steps=7", "--rpo_alpha=none", "--lora-r=8"])
    assert c.training.num_train_epochs == 2.0 and isinstance(c.training.num_train_epochs, float)
    assert c.training.learning_rate == 1e-4 and c.model.use_peft is True
    assert c.training.report_to == ["tensorboard", "wandb"] and c.training.max_steps == 7
    assert c.dpo.rpo_alpha is None and c.model.lora_r == 8


def test_default_token_budget_follows_batch_size_and_stage():
    sft = cfg_of(per_device_train_batch_size=4, max_length=512)
    dpo = cfg_of(stage="dpo", per_device_train_batch_size=4, max_length=512, max_prompt_length=128)
    assert sft.data.max_tokens_per_batch == 4 * 512
    assert dpo.data.max_tokens_per_batch == 2 * 4 * 512  # a pair holds two completions
    assert cfg_of(max_tokens_per_batch=4096).data.max_tokens_per_batch == 4096


@pytest.mark.parametrize("raw, overrides, needle", [
    ({**BASE, "learnig_rate": 1e-5}, (), "unknown key 'learnig_rate'; did you mean 'learning_rate'?"),
    ({**BASE, "training": {"num_train_epoch": 1}}, (), "did you mean 'num_train_epochs'?"),
    ({**BASE, "trainer": {"seed": 1}}, (), "unknown key 'trainer'"),
    ({**BASE}, ["--modle.dtype=float32"], "unknown section 'modle'; did you mean 'model'?"),
    ({**BASE, "dpo": {"learning_rate": 1.0}}, (), "key 'learning_rate' belongs to section 'training', not 'dpo'"),
    ({**BASE, "learning_rate": "fast"}, (), "r.yaml: learning_rate: expected float, got 'fast'"),
    ({**BASE, "use_peft": "maybe"}, (), "use_peft: expected bool"),
    ({**BASE, "gradient_accumulation_steps": 1.5}, (), "gradient_accumulation_steps: expected int"),
    ({**BASE, "stage": "dpoo"}, (), "stage: must be one of ('sft', 'ref_logps', 'dpo'), got 'dpoo'; did you mean 'dpo'?"),
    ({**BASE, "dtype": "fp8"}, (), "dtype: must be one of"),
    ({**BASE, "lr_scheduler_type": "cosine_annealing"}, (), "lr_scheduler_type: must be one of"),
    ({**BASE, "optim": "lion"}, (), "optim: must be one of"),
    ({**BASE, "warmup_ratio": 1.5}, (), "warmup_ratio: must be in [0, 1)"),
    ({**BASE, "gradient_accumulation_steps": 0}, (), "gradient_accumulation_steps: must be >= 1"),
    ({**BASE, "label_smoothing_factor": 1.0}, (), "label_smoothing_factor: must be in [0, 1), got 1.0"),
    ({**BASE, "save_strategy": "sometimes"}, (), "save_strategy: must be no | steps | epoch"),
    ({**BASE, "packing_strategy": "wrapped"}, (), "r.yaml: packing_strategy: 'wrapped' is not supported: zephyr_fast packs"),
    ({**BASE}, ["--average_tokens_across_devices=false"], "command line --average_tokens_across_devices: False is not"),
    ({**BASE, "stage": "dpo", "beta": 0}, (), "beta must be > 0"),
    ({**BASE, "stage": "dpo", "loss_type": "sigmoidd"}, (), "did you mean 'sigmoid'?"),
    ({**BASE, "stage": "dpo", "label_smoothing": 1.0}, (), "label_smoothing must lie in [0"),  # the kernels' rule
    ({**BASE, "stage": "dpo", "loss_type": "robust", "label_smoothing": 0.7}, (), "for loss_type='robust'"),
    ({**BASE, "stage": "dpo", "max_length": 128, "max_prompt_length": 256}, (), "max_prompt_length: must be in (0, max_length=128)"),
    ({**BASE, "max_length": 512, "max_tokens_per_batch": 100}, (), "max_tokens_per_batch: must hold one sequence"),
    ({**BASE, "deepspeed": "/nonexistent/zero3.json"}, (), "deepspeed: file not found"),
    ({**DATA, "tokenizer_name_or_path": "tok"}, (), "model_init: is required when model_name_or_path is not set"),
    ({**DATA, "model_init": {"hidden_size": 8}}, (), "tokenizer_name_or_path: is required"),
    ({"tokenizer_name_or_path": "tok", "model_init": {"hidden_size": 64}}, (), "dataset_mixer"),
    ({**BASE}, ["learning_rate=3"], "override 'learning_rate=3' must look like --key=value"),
    ({**BASE}, ["--learning_rate=-1"], "command line --learning_rate: must be >= 0, got -1.0"),
    ({**BASE}, ["--warmup_ratio=2"], "command line --warmup_ratio: must be in [0, 1)"),
    ({**BASE}, ["--dtype=fp8"], "command line --dtype: must be one of"),
    ({**BASE, "stage": "dpo"}, ["--beta=0"], "command line --beta: beta must be > 0"),
    ({**BASE}, ["--max_length=64", "--max_tokens_per_batch=10"], "command line --max_tokens_per_batch: must hold"),
    ({**BASE}, ["--lr_scheduler_kwargs=fast"], "command line --lr_scheduler_kwargs: expected a YAML / JSON mapping"),
    ([1, 2], (), "a recipe must be a YAML mapping"),
])
def test_config_errors_name_the_key_and_fix(raw, overrides, needle):
    assert needle in err(raw, overrides)


def test_load_config_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="recipe file not found"):
        load_config(str(tmp_path / "missing.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("stage: sft\n  learning_rate: [\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_config(str(bad))
    code = tmp_path / "code.yaml"  # safe_load: python tags are refused, never executed
    code.write_text("stage: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(str(code))


def test_resolved_config_round_trips(tmp_path):
    c = build_config(recipe("dpo", tmp_path / "out", str(tmp_path)), source="r.yaml", overrides=["--beta=0.3"])
    path = tmp_path / "resolved.yaml"
    c.save(str(path))
    again = load_config(str(path))
    assert again.to_dict() == c.to_dict()


def test_cli_parsing_drops_launcher_args_and_reports_errors(tmp_path, capsys):
    path, ov = parse_args(["r.yaml", "--local_rank=1", "--beta", "0.2", "--seed=3"])
    assert path == "r.yaml" and ov == ["--beta=0.2", "--seed=3"]
    assert parse_args(["--local_rank", "0", "r.yaml"])[0] == "r.yaml"
    r = tmp_path / "r.yaml"
    r.write_text(yaml.safe_dump({**BASE, "learnig_rate": 1}))
    assert main([str(r)]) == 2
    assert "did you mean 'learning_rate'?" in capsys.readouterr().err


TRAINER_RECIPES = [p for p in sorted(glob.glob(str(REPO / "recipes" / "**" / "*.yaml"), recursive=True))
                   if os.sep + "accelerate" + os.sep not in p]  # recipes/accelerate/: launcher configs


@pytest.mark.parametrize("path", TRAINER_RECIPES)
def test_every_recipe_loads_and_opens_with_its_launch_command(path, monkeypatch):
    monkeypatch.chdir(REPO)  # recipes use repo-relative paths
    with open(path) as f:
        head = f.read(600)
    assert head.startswith("#") and ("train.py" in head or "zephyr-fast" in head), f"{path}: no launch command"
    if "zephyr-fast aif" in head:
        pytest.skip("an AIF pipeline recipe, loaded by zephyr_fast.aif (tests/aif/test_pipeline.py), not a trainer one")
    cfg = load_config(os.path.relpath(path, REPO))
    assert cfg.training.stage in ("sft", "ref_logps", "dpo")


def test_handbook_dtype_auto_and_no_effect_keys_are_noticed():
    c = cfg_of(torch_dtype=None, bf16=True, dataset_num_proc=12, preprocessing_num_workers=4, log_level="info")
    assert c.model.dtype == "bfloat16"
    assert [n.split(":")[0] for n in key_notices(c)] == ["dataset_num_proc", "preprocessing_num_workers", "log_level"]
    assert all(len(n.split(": ", 1)[1]) > 10 for n in c.notices)  # each says why it has no effect
    assert cfg_of(torch_dtype="auto").model.dtype == "float32" and key_notices(cfg_of()) == []


def test_left_out_keys_whose_default_differs_from_hf_are_noticed():
    notes = cfg_of(stage="sft").notices
    assert "learning_rate: not set, so zephyr_fast's default 2e-05 (transformers / TRL: 5e-05)" in notes
    assert "num_train_epochs: not set, so zephyr_fast's default 1.0 (transformers / TRL: 3.0)" in notes
    assert not any(n.startswith(("beta:", "max_prompt_length:")) for n in notes)  # DPO keys: not for sft
    set_all = cfg_of(learning_rate=5e-5, num_train_epochs=3, lr_scheduler_type="linear", max_length=1024)
    assert set_all.notices == []


def test_bad_data_row_is_one_line_and_exit_status_2(tmp_path, capsys):
    """A data error (here: a line that is not valid UTF-8) ends the launch with status 2 and the
    file / line in the message, not a traceback."""
    data = tmp_path / "data"
    data.mkdir()
    good = '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}\n'
    (data / "train.jsonl").write_bytes(good.encode() + b'{"messages": "\xe9"}\n')
    (data / "test.jsonl").write_text(good)
    r = tmp_path / "r.yaml"
    r.write_text(yaml.safe_dump(recipe("sft", str(tmp_path / "out"), str(data))))
    assert main([str(r)]) == 2
    err = capsys.readouterr().err
    assert "data[train]: line 2" in err and "UTF-8" in err and "Traceback" not in err


def test_unsupported_model_refused_before_any_data_work(tmp_path, capsys):
    """A checkpoint of a family zephyr_fast cannot train is refused in one line (status 2) before
    the data is read: here the data directory does not even exist."""
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text('{"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}')
    r = recipe("sft", str(tmp_path / "out"), str(tmp_path / "no-such-data"))
    r.pop("model_init")
    r["model_name_or_path"] = str(ckpt)
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(r))
    assert main([str(path)]) == 2
    err = capsys.readouterr().err
    assert "gpt2" in err and "no-such-data" not in err and "Traceback" not in err


def test_packing_false_is_accepted():
    assert cfg_of(packing=False).training.packing is False
    assert cfg_of().training.packing is True


@pytest.mark.parametrize("raw, stage", [
    ({}, "sft"),
    ({"beta": 0.01}, "dpo"),
    ({"loss_type": "ipo"}, "dpo"),
    ({"max_prompt_length": 64, "max_length": 128}, "dpo"),
    ({"precompute_ref_log_probs": True}, "dpo"),
    ({"dpo": {"label_smoothing": 0.1}}, "dpo"),
    ({"dataset_mixer": {"d": 1.0}, "dataset_splits": ["train_prefs", "test_prefs"]}, "dpo"),
    ({"dataset_mixer": {"d": 1.0}, "dataset_splits": ["train_sft", "test_sft"]}, "sft"),
    ({"dataset_mixer": None, "dataset_mixture": {"datasets": [{"id": "d", "columns": ["chosen", "rejected"]}]}}, "dpo"),
    ({"dataset_mixer": None, "dataset_mixture": {"datasets": [{"id": "d", "columns": ["messages"]}]}}, "sft"),
    ({"stage": "ref_logps", "beta": 0.1}, "ref_logps"),
])
def test_stage_is_inferred_from_the_recipe_keys(raw, stage):
    assert cfg_of(**raw).training.stage == stage


@pytest.mark.parametrize("raw, overrides, needle", [
    ({"stage": "sft", "beta": 0.1}, (), "r.yaml: stage: 'sft' contradicts the DPO key(s) beta"),
    ({"beta": 0.1}, ["--stage=sft"], "command line --stage: 'sft' contradicts the DPO key(s) beta"),
    ({"loss_type": "sigmoid"}, ["--stage=sft"], "contradicts the DPO key(s) loss_type"),
    ({"dataset_splits": ["train_prefs"]}, ["--stage=sft"], "contradicts the preference data"),
    ({"dataset_splits": ["train_sft"]}, ["--stage=dpo"], "command line --stage: 'dpo' contradicts the chat (SFT) data"),
    ({"dataset_splits": ["train_sft"], "beta": 0.1}, (), "r.yaml: beta: a DPO key, but the data is chat (SFT) data"),
    ({"dataset_splits": ["train_sft", "test_prefs"]}, (), "mixes preference"),
    ({"cpo_alpha": 1.0}, (), "r.yaml: cpo_alpha: is a CPO key; that objective is not implemented"),
    ({"desirable_weight": 1.0}, (), "KTO"),
])
def test_stage_contradictions_and_other_objectives_are_refused(raw, overrides, needle):
    assert needle in err({**BASE, **raw}, overrides)


def test_explicit_sft_with_only_max_prompt_length_is_a_notice():
    c = cfg_of(stage="sft", max_prompt_length=64)
    assert c.training.stage == "sft" and key_notices(c) == ["max_prompt_length: a DPO key, unused by stage sft"]


def test_sft_config_round_trips_without_dpo_keys(tmp_path):
    c = cfg_of(stage="sft", learning_rate=1e-4)
    c.save(str(tmp_path / "c.yaml"))
    saved = yaml.safe_load((tmp_path / "c.yaml").read_text())
    assert "dpo" not in saved and "max_prompt_length" not in saved["data"]
    again = load_config(str(tmp_path / "c.yaml"))
    assert again.to_dict() == c.to_dict() and again.training.stage == "sft"


def test_overrides_parse_by_the_key_type_not_yaml():
    c = build_config({**BASE, "run_name": "x"}, source="r.yaml", overrides=[
        "--eval_strategy=no", "--save_strategy=no", "--run_name=none", "--report_to=[tensorboard, wandb]",
        "--lr_scheduler_kwargs={min_lr_rate: 0.1}", "--gradient_checkpointing_kwargs={\"use_reentrant\": false}",
        "--lora_target_modules=q_proj,v_proj", "--hub_model_id=007", "--bf16=yes", "--logging_first_step=1"])
    t = c.training
    assert t.eval_strategy == "no" and t.save_strategy == "no" and t.run_name is None
    assert t.report_to == ["tensorboard", "wandb"] and t.lr_scheduler_kwargs == {"min_lr_rate": 0.1}
    assert c.model.gradient_checkpointing_kwargs == {"use_reentrant": False}
    assert c.model.lora_target_modules == ["q_proj", "v_proj"]
    assert t.hub_model_id == "007" and t.bf16 is True and t.logging_first_step is True


@pytest.mark.parametrize("typo, suggestion", [
    ("learnig_rate", "learning_rate"), ("num_train_epoch", "num_train_epochs"), ("eos_tokens", "eos_token"),
    ("max_seq_lenght", "max_seq_length"), ("use_flash_attention2", "use_flash_attention_2"),
])
def test_did_you_mean_for_typos(typo, suggestion):
    assert f"did you mean {suggestion!r}?" in err({**BASE, typo: 1})


@pytest.mark.parametrize("name", ["tokens", "max_token", "model", "rate", "flash"])
def test_no_did_you_mean_for_distant_names(name):
    msg = err({**BASE, name: 1})
    assert f"unknown key {name!r}" in msg and "did you mean" not in msg


def test_help_lists_every_key_with_section_type_default_and_aliases(capsys):
    assert main(["--help"]) == 0 and main(["-h"]) == 0
    out = capsys.readouterr().out
    assert "[training]" in out and "[dpo]" in out
    assert "  learning_rate: float = 2e-05" in out and "  rpo_alpha: Optional[float] = None" in out
    assert "  max_length: int = 2048  (also: max_seq_length)" in out
    assert "use_flash_attention_2" in out and "dataset_name" in out and "padding_free: True" in out


def test_debug_shows_the_traceback_instead_of_one_line(tmp_path, capsys):
    r = tmp_path / "r.yaml"
    r.write_text(yaml.safe_dump({**BASE, "learnig_rate": 1}))
    assert main([str(r)]) == 2
    assert capsys.readouterr().err.count("\n") == 1
    with pytest.raises(ConfigError, match="learnig_rate"):
        main([str(r), "--debug"])
    assert main([]) == 2 and "usage:" in capsys.readouterr().err


def test_a_dpo_key_from_the_command_line_is_named_in_the_contradiction():
    msg = err({**BASE, "stage": "sft"}, ["--beta=0.2"])
    assert msg.startswith("r.yaml: stage: 'sft' contradicts the DPO key(s) beta (command line --beta)")


MIX = {"dataset_mixer": None, "dataset_splits": ["train"]}


def mixture_of(**kw):
    return {**MIX, "dataset_mixture": {"datasets": [{"id": "d.jsonl", **kw.pop("spec", {})}], **kw}}


@pytest.mark.parametrize("raw, overrides, needle", [
    ({"weight_decay": -0.1}, (), "r.yaml: weight_decay: must be >= 0, got -0.1"),
    ({}, ["--weight_decay=-0.1"], "command line --weight_decay: must be >= 0, got -0.1"),
    ({"max_grad_norm": -1.0}, (), "r.yaml: max_grad_norm: must be >= 0 (0: no clipping), got -1.0"),
    ({"save_steps": -1}, (), "r.yaml: save_steps: must be >= 0, got -1"),
    ({"eval_steps": -5}, (), "r.yaml: eval_steps: must be >= 0, got -5"),
    ({}, ["--logging_steps=-10"], "command line --logging_steps: must be >= 0, got -10"),
    ({"warmup_steps": -3}, (), "r.yaml: warmup_steps: must be >= 0, got -3"),
    ({"adam_beta1": 1.0}, (), "r.yaml: adam_beta1: must be in [0, 1), got 1.0"),
    ({}, ["--adam_beta2=-0.5"], "command line --adam_beta2: must be in [0, 1), got -0.5"),
    ({"adam_epsilon": 0}, (), "r.yaml: adam_epsilon: must be > 0, got 0.0"),
    ({"attn_implementation": "flash_attention_3"}, (), "r.yaml: attn_implementation: must be one of ('auto', "),
    ({}, ["--attn_implementation=sdpa_segment"], "command line --attn_implementation: must be one of"),
    ({"attn_implementation": "sdpa_segment"}, (), "got 'sdpa_segment'; did you mean 'sdpa_segments'?"),
    ({"model_init_kwargs": {"attn_implementation": "flash"}}, (), "r.yaml: model_init_kwargs.attn_implementation: must"),
    ({"model_init": {"hiden_size": 64}}, (), "r.yaml: model_init: 'hiden_size' is not a MistralConfig key (arch "
                                             "'mistral'): nothing would read it; did you mean 'hidden_size'?"),
    ({"model_init": {"arch": "qwen2", "rope_thetaa": 1.0}}, (), "'rope_thetaa' is not a Qwen2Config key"),
    ({}, ["--model_init={num_layers: 2}"], "command line --model_init: 'num_layers' is not a MistralConfig key"),
    ({"model_init": {"arch": "mistrall"}}, (), "r.yaml: model_init: arch must be one of"),
    ({"model_init": {"arch": "mistrall"}}, (), "got 'mistrall'; did you mean 'mistral'?"),
    (mixture_of(test_split_size=-1), (), "r.yaml: dataset_mixture: test_split_size: must be a positive int"),
    (mixture_of(test_split_size=0), (), "dataset_mixture: test_split_size: must be a positive int"),
    (mixture_of(test_split_size=1.5), (), "r.yaml: dataset_mixture: test_split_size: a fraction must be < 1, got 1.5"),
    (mixture_of(test_split_size="ten"), (), "test_split_size: must be a positive int (rows) or a fraction"),
    (mixture_of(test_split_size=True), (), "test_split_size: must be a positive int (rows) or a fraction"),
    (mixture_of(spec={"weight": 0}), (), "r.yaml: dataset_mixture: datasets[0] ('d.jsonl'): weight must be a number > 0, got 0"),
    (mixture_of(spec={"weight": -1.0}), (), "datasets[0] ('d.jsonl'): weight must be a number > 0, got -1.0"),
    (mixture_of(spec={"weight": "half"}), (), "datasets[0] ('d.jsonl'): weight must be a number > 0, got 'half'"),
    ({"dataset_mixer": {"d.jsonl": -0.5}}, (), "r.yaml: dataset_mixer: the fraction of 'd.jsonl' must be a number "
                                              ">= 0, got -0.5"),
    ({"dataset_mixer": {"d.jsonl": "all"}}, (), "dataset_mixer: the fraction of 'd.jsonl' must be a number >= 0"),
])
def test_ranges_are_checked_when_the_recipe_loads(raw, overrides, needle):
    """Issue 12: a value out of range stops at load, in one line naming where it was set."""
    msg = err({**BASE, **raw}, overrides)
    assert needle in msg and "\n" not in msg


def test_boundary_values_are_accepted():
    """0 disables clipping (HF: max_grad_norm > 0 clips), as 0 steps mean "never" / "every step"."""
    c = cfg_of(max_grad_norm=0, weight_decay=0, warmup_steps=0, save_steps=0, adam_beta1=0, adam_beta2=0.0)
    assert c.training.max_grad_norm == 0.0 and c.training.adam_beta1 == 0.0
    kept = cfg_of(model_init={"arch": "gemma2", "hidden_size": 64, "sliding_window": 8, "rope_theta": 1e4,
                              "final_logit_softcapping": 30.0})  # a legacy key the config class converts is fine
    assert kept.model.model_init["sliding_window"] == 8
    mix = cfg_of(**mixture_of(test_split_size=0.25, spec={"weight": 2.5}))
    assert mix.data.dataset_mixture.test_split_size == 0.25 and mix.data.dataset_mixture.datasets[0].weight == 2.5
    assert cfg_of(dataset_mixer={"d.jsonl": 0}).data.dataset_mixer == {"d.jsonl": 0}  # handbook: test splits only


def test_every_accepted_attn_implementation_is_one_the_model_loader_takes():
    from zephyr_fast.config import ATTN_IMPLEMENTATIONS
    from zephyr_fast.model.attention import BACKENDS
    from zephyr_fast.training.build import attn_backend

    assert set(BACKENDS) < set(ATTN_IMPLEMENTATIONS)
    for name in ATTN_IMPLEMENTATIONS:
        assert cfg_of(attn_implementation=name).model.attn_implementation == name
        assert attn_backend(name) in ("auto", *BACKENDS)


GOOD_SFT = '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}\n'


@pytest.mark.parametrize("data, needle", [
    ({"dataset_mixer": None, "dataset_mixture": {"datasets": [{"id": "{d}/train.jsonl"}], "test_split_size": 5}},
     "dataset_mixture.test_split_size: 5 (5 rows) leaves no training rows: the mixed train data has only 2 rows"),
    ({"dataset_mixer": {"{d}/missing.jsonl": 1.0}}, "{d}/missing.jsonl: no such file or directory"),
    ({"dataset_mixer": {"{d}/train.csv": 1.0}}, "{d}/train.csv: unsupported extension '.csv'"),
    ({"dataset_mixer": {"{d}": 1.0}, "columns_to_keep": ["prompt"]}, "{d}[train]: all rows, field 'prompt': column not found (has ['messages'])"),
    ({"dataset_mixer": {"{d}": 1.0}, "dataset_splits": ["train", "valid"]}, "r.yaml: dataset_splits: split 'valid' must contain 'train' or 'test'"),
])
def test_a_data_problem_found_while_loading_is_one_line_and_status_2(tmp_path, capsys, data, needle):
    """Issue 12: what the loader refuses (a test split larger than the data, a missing or unreadable
    file, a missing column, a split name) ends the launch with status 2 and one line, no traceback."""
    d = tmp_path / "data"
    d.mkdir()
    for name in ("train.jsonl", "test.jsonl", "train.csv"):
        (d / name).write_text(GOOD_SFT * 2)
    fill = lambda v: v.replace("{d}", str(d)) if isinstance(v, str) else v  # noqa: E731
    data = yaml.safe_load(fill(yaml.safe_dump(data)))
    r = tmp_path / "r.yaml"
    r.write_text(yaml.safe_dump(recipe("sft", str(tmp_path / "out"), str(d), **data)))
    assert main([str(r)]) == 2
    err = capsys.readouterr().err
    assert fill(needle) in err and "Traceback" not in err and err.count("\n") == 1, err
