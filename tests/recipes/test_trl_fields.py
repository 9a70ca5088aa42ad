"""Every field of the installed TRL's ``DPOConfig`` and ``SFTConfig`` (``TrainingArguments`` included)
loads at TRL's own default, so a config written out from TRL loads; a value zephyr_fast cannot honour
is refused in one line with a pointer; and the fields that change results do what TRL does."""

import dataclasses
import json

import pytest
import torch
import zephyr_kernels as zk
from trl import DPOConfig as TRLDPOConfig
from trl import SFTConfig as TRLSFTConfig

from tests.train.conftest import sft_dir  # noqa: F401
from tests.train.helpers import dpo_rows, recipe, write_dpo_dir
from zephyr_fast.config import trl as trl_keys
from zephyr_fast.config import ConfigError, build_config
from zephyr_fast.objectives import make_stage
from zephyr_fast.train import run
from zephyr_fast.training import distributed
from zephyr_fast.training.build import check_config
from zephyr_fast.training.reference import ReferencePass

DPO_DATA = {"dataset_mixer": {"assets/data/ultrafeedback_binarized/sample16.jsonl": 1.0}, "dataset_splits": ["train"]}
SFT_DATA = {"dataset_mixer": {"assets/data/ultrachat_200k/sample16.jsonl": 1.0}, "dataset_splits": ["train"]}
BASE = {"tokenizer_name_or_path": "tok", "model_init": {"hidden_size": 64}, "output_dir": "/tmp/zf-trl-fields"}


def _defaults(cls) -> list:
    out = []
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        if f.default is not dataclasses.MISSING:
            out.append((f.name, f.default))
        elif f.default_factory is not dataclasses.MISSING:
            out.append((f.name, f.default_factory()))
    return out


FIELDS = [("dpo", k, v) for k, v in _defaults(TRLDPOConfig)] + [("sft", k, v) for k, v in _defaults(TRLSFTConfig)]


def _cfg(stage, overrides=(), **kw):
    """The recipe loaded and checked as train.py does (load_config, then check_config: the kernels' DPO rule)."""
    cfg = build_config({**BASE, "stage": stage, **(DPO_DATA if stage == "dpo" else SFT_DATA), **kw},
                       source="r.yaml", overrides=list(overrides))
    check_config(cfg)
    return cfg


def test_the_installed_trl_has_the_fields_we_walk():
    assert len(FIELDS) > 250 and {"loss_type", "beta", "learning_rate", "output_dir"} <= {k for _, k, _ in FIELDS}


@pytest.mark.parametrize("stage,key,value", FIELDS, ids=[f"{s}-{k}" for s, k, _ in FIELDS])
def test_every_trl_field_loads_at_trls_default(stage, key, value):
    cfg = _cfg(stage, **{key: value})
    assert cfg.training.stage == stage


@pytest.mark.parametrize("key,value,expected", [
    ("torch_compile", True, "the model is not compiled"),
    ("use_weighting", "maybe", "expected bool"),
    ("f_divergence_type", "chi2", "f_divergence_type must be one of"),
    ("ld_alpha", 0.5, "LD-DPO"),
    ("neftune_noise_alpha", 5.0, "NEFTune"),
    ("fsdp", "full_shard", "ZeRO-3"),
    ("truncation_mode", "keep_end", "'keep_start' (TRL 1.16's, which deprecates keep_end)"),
    ("optim_args", "foo=1", "adam_beta1"),
])
def test_a_value_zephyr_fast_cannot_honour_is_refused_with_a_pointer(key, value, expected):
    with pytest.raises(ConfigError) as exc:
        _cfg("dpo", **{key: value})
    msg = str(exc.value)
    assert "\n" not in msg and msg.startswith(f"r.yaml: {key}") and expected in msg, msg


@pytest.mark.parametrize("key", sorted(trl_keys.EQUIVALENT))
def test_the_other_value_of_an_equivalent_switch_is_a_notice(key):
    cfg = _cfg("dpo", **{key: False})
    assert any(n.startswith(f"{key}: False -> True") for n in cfg.notices), cfg.notices


def test_no_effect_keys_are_listed_in_the_notice():
    cfg = _cfg("sft", dataloader_pin_memory=False, shuffle_dataset=True)
    assert {"dataloader_pin_memory", "shuffle_dataset"} <= {n.split(":")[0] for n in cfg.notices}


def test_sft_loss_type_nll_is_the_sft_loss_and_not_a_dpo_key():
    assert _cfg("sft", loss_type="nll").training.stage == "sft"
    assert _cfg("sft", loss_type=["nll"]).training.stage == "sft"
    with pytest.raises(ConfigError, match="'dft' .* is not implemented"):
        _cfg("sft", loss_type="dft")
    with pytest.raises(ConfigError, match="nll is SFTConfig's loss_type"):
        _cfg("dpo", loss_type="nll", beta=0.1)


def test_wpo_with_aot_is_refused_when_the_recipe_loads():
    with pytest.raises(ConfigError, match="use_weighting is not supported with loss_type 'aot'"):
        _cfg("dpo", loss_type="aot", use_weighting=True)


def test_eval_steps_default_to_logging_steps_as_hf():
    assert _cfg("sft", eval_strategy="steps", eval_steps=None, logging_steps=7).training.eval_steps == 7


# ---- the fields that change results ---------------------------------------------------------------

def _head_inputs(P=3, D=16, V=53, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = 4 * 2 * P
    h = torch.randn(n, D, generator=g, requires_grad=True)
    w = torch.randn(V, D, generator=g, requires_grad=True)
    labels = torch.randint(0, V, (n,), generator=g)
    seg = torch.arange(n) // 4
    refs = (-torch.rand(P, generator=g) * 30, -torch.rand(P, generator=g) * 30)
    return h, w, labels, seg, refs


@pytest.mark.parametrize("kw,expected", [
    ({"loss_type": ["sigmoid", "bco_pair"], "loss_weights": [0.8, 0.2]},
     dict(loss_type=["sigmoid", "bco_pair"], loss_weights=[0.8, 0.2])),
    ({"loss_type": "discopop", "discopop_tau": 0.2}, dict(loss_type="discopop", discopop_tau=0.2)),
    ({"loss_type": ["ipo"]}, dict(loss_type="ipo")),
    ({"use_weighting": True}, dict(use_weighting=True)),
    ({"f_divergence_type": "alpha_divergence", "f_alpha_divergence_coef": 0.3},
     dict(f_divergence_type="alpha_divergence", f_alpha_divergence_coef=0.3)),
])
def test_dpo_loss_options_reach_the_loss(kw, expected):
    cfg = _cfg("dpo", beta=0.3, **kw)
    head = make_stage(cfg).loss_head(temperature=1.0, softcap=None)
    h, w, labels, seg, refs = _head_inputs()
    got = head(h, w, labels, seg, refs)[0]
    want = zk.fused_linear_dpo_loss(h, w, labels, seg, *refs, beta=0.3, reduction="sum", **expected)[0]
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_label_smoothing_factor_smooths_the_sft_cross_entropy():
    cfg = _cfg("sft", label_smoothing_factor=0.1)
    head = make_stage(cfg).loss_head(temperature=1.0, softcap=None)
    h, w, labels, seg, _ = _head_inputs()
    want = zk.linear_cross_entropy(h, w, labels, reduction="sum", label_smoothing=0.1)
    torch.testing.assert_close(head(h, w, labels, seg, None)[0], want, rtol=0, atol=0)
    plain = zk.linear_cross_entropy(h, w, labels, reduction="sum")
    assert not torch.allclose(want, plain)


@pytest.mark.parametrize("disable", [True, False])
def test_disable_dropout_zeroes_every_dropout_of_the_dpo_model(disable):
    cfg = _cfg("dpo", disable_dropout=disable)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Dropout(0.1), torch.nn.Dropout(0.3))
    make_stage(cfg).prepare_model(model)  # what LossModule does first
    assert [m.p for m in model if isinstance(m, torch.nn.Dropout)] == ([0.0, 0.0] if disable else [0.1, 0.3])


def test_reference_free_makes_every_reference_log_prob_zero():
    cfg = _cfg("dpo", reference_free=True)
    rp = ReferencePass.configure(cfg.dpo, cfg.data, output_dir="/nonexistent", dtype="float32", seed=0, impl="torch")

    class Split:
        examples = [{"index": 3}, {"index": 0}, {"index": 7}]
        rows = None

    refs = rp.run(None, {"train": Split(), "test": None}, None, None, dist=None)  # no model, no identity
    c, r = refs["train"].lookup(torch.tensor([7, 0]))
    assert c.tolist() == r.tolist() == [0.0, 0.0] and refs["train"].path == "reference_free"


def test_use_cpu_keeps_the_run_off_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda *a: None)
    assert distributed._device(0, use_cpu=True).type == "cpu"
    assert distributed._device(0, use_cpu=False).type == "cuda"


def test_eval_on_start_evaluates_before_the_first_step(sft_dir, tmp_path):  # noqa: F811
    cfg = build_config(recipe("sft", tmp_path / "out", sft_dir, max_steps=2, eval_strategy="steps", eval_steps=2,
                              eval_on_start=True), source="test")
    summary = run(cfg)
    evals = [json.loads(line)["step"] for line in open(summary["metrics_path"]) if "eval_loss" in line]
    assert evals == [0, 2]


def test_load_best_model_at_end_follows_hf_rules():
    with pytest.raises(ConfigError, match="load_best_model_at_end: needs eval_strategy and save_strategy"):
        _cfg("sft", load_best_model_at_end=True, eval_strategy="steps", eval_steps=2, save_strategy="no")
    with pytest.raises(ConfigError, match=r"needs save_steps \(3\) to be a multiple of eval_steps \(2\)"):
        _cfg("sft", load_best_model_at_end=True, eval_strategy="steps", eval_steps=2, save_steps=3)
    t = _cfg("dpo", load_best_model_at_end=True, eval_strategy="epoch", save_strategy="epoch",
             metric_for_best_model="rewards/accuracies").training
    assert (t.metric_for_best_model, t.greater_is_better) == ("eval_rewards/accuracies", True)


def test_load_best_model_at_end_ends_with_the_best_checkpoints_weights(sft_dir, tmp_path):  # noqa: F811
    """Three saved evaluations; the metric asked for is best at step 1 (the largest eval loss, a metric
    where greater is better by the recipe's say-so): the final model is checkpoint-1's, kept although
    save_total_limit is 1."""
    from safetensors.torch import load_file

    out = tmp_path / "out"
    cfg = build_config(recipe("sft", out, sft_dir, max_steps=4, eval_strategy="steps", eval_steps=1, save_steps=1,
                              save_strategy="steps", save_total_limit=1, load_best_model_at_end=True,
                              metric_for_best_model="loss", greater_is_better=True), source="test")
    summary = run(cfg)
    evals = {json.loads(line)["step"]: json.loads(line)["eval_loss"] for line in open(summary["metrics_path"])
             if "eval_loss" in line}
    best = max(evals, key=evals.get)
    assert best != 4 and summary["best_step"] == best and summary["best_model_checkpoint"].endswith(f"checkpoint-{best}")
    final, kept = load_file(str(out / "model.safetensors")), load_file(str(out / f"checkpoint-{best}" / "model.safetensors"))
    assert final.keys() == kept.keys() and all(torch.equal(final[k], kept[k]) for k in final)
    assert sorted(p.name for p in out.glob("checkpoint-*")) == sorted({f"checkpoint-{best}", "checkpoint-3"})


def test_reference_free_run_trains_without_a_reference_pass(tmp_path):
    data = write_dpo_dir(tmp_path / "data", dpo_rows(4))
    summary = run(build_config(recipe("dpo", tmp_path / "out", data, max_steps=1, reference_free=True), source="test"))
    assert summary["global_step"] == 1 and summary["ref_logps_train_path"] == "reference_free"
    assert not (tmp_path / "out" / "ref_logps").exists()  # nothing computed, nothing cached


def test_an_unknown_metric_for_best_model_stops_at_the_first_evaluation(sft_dir, tmp_path):  # noqa: F811
    cfg = build_config(recipe("sft", tmp_path / "out", sft_dir, max_steps=2, eval_strategy="steps", eval_steps=1,
                              save_strategy="steps", save_steps=1, load_best_model_at_end=True,
                              metric_for_best_model="bleu", eval_on_start=True), source="test")
    with pytest.raises(ConfigError, match=r"metric_for_best_model: 'eval_bleu' is not an eval metric of this run "
                                          r"\(it has eval_loss"):
        run(cfg)
    assert not list((tmp_path / "out").glob("checkpoint-*"))  # before any step
