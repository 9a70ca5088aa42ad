"""End-to-end tiny runs (single process, CPU): dSFT, HF export, offline reference log-probs, dDPO,
kill-and-resume, NaN handling."""

import json
import math
import os
import shutil

import pytest
import torch
from tests.train.helpers import TINY_MODEL, dpo_rows, recipe, write_dpo_dir

from zephyr_fast.config import build_config
from zephyr_fast.training.reference import StaleRefLogpsError, load_verified
from zephyr_fast.train import run


def rows_of(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def _cfg(*a, **kw):
    return build_config(recipe(*a, **kw), source="test-recipe")


def test_sft_lowers_the_loss(sft_model):
    rows = rows_of(sft_model["metrics_path"])
    train = [r["loss"] for r in rows if "loss" in r]
    evals = [r["eval_loss"] for r in rows if "eval_loss" in r]
    assert len(evals) == 4 and len(train) == sft_model["total_steps"] == 20
    assert train[0] == pytest.approx(math.log(32000), rel=0.02)  # random init: uniform over the vocab
    assert evals[-1] < evals[0] - 1.0 and train[-1] < train[0] - 2.0
    assert all(k in rows[0] for k in ("grad_norm", "learning_rate", "epoch", "train_tokens_per_second"))


def test_saved_model_loads_in_transformers_and_matches_trainer_logps(sft_model, sft_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from zephyr_fast.data.packing import pack_sft
    from zephyr_fast.data.sft import tokenize_sft
    from zephyr_fast.model.forward import packed_logps

    out = sft_model["model_dir"]
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, attn_implementation="eager").eval()
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.chat_template and "<|assistant|>" in tok.chat_template
    card = open(os.path.join(out, "README.md")).read()
    assert "stage `sft`" in card and "learning_rate" in card
    assert json.load(open(os.path.join(out, "train_results.json")))["global_step"] == 20
    assert os.path.exists(os.path.join(out, "model.safetensors"))

    examples, _ = tokenize_sft(rows_of(os.path.join(sft_dir, "test.jsonl")), tok, max_length=160)
    batch = pack_sft(examples, 320, seed=0)[0]
    trainer_model = sft_model["model"].eval()
    with torch.no_grad():
        ours, _ = packed_logps(trainer_model, batch, impl="torch")
        cu = batch.cu_seqlens.tolist()
        assert len(cu) == 3  # both test conversations, packed together
        for start, end in zip(cu[:-1], cu[1:]):  # plain per-sequence transformers forward as the reference
            logits = hf(batch.input_ids[start:end][None]).logits[0].float()
            lab = batch.labels[start:end]
            ref = torch.log_softmax(logits, -1).gather(1, lab.clamp(min=0)[:, None])[:, 0] * (lab != -100)
            torch.testing.assert_close(ours[start:end], ref, atol=1e-5, rtol=5e-4)


@pytest.fixture(scope="module")
def ref_cache(sft_model, dpo_dir, tmp_path_factory):
    """Reference log-probs of the dSFT model on the DPO pairs, by ``stage: ref_logps``."""
    out = tmp_path_factory.mktemp("ref")
    cfg = _cfg("ref_logps", out, dpo_dir, model_name_or_path=sft_model["model_dir"], ref_logps_dir=str(out / "cache"))
    return cfg, run(cfg)


def test_ref_logps_match_a_plain_transformers_pass(ref_cache, sft_model):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from zephyr_fast.data.chat import load_tokenizer
    from zephyr_fast.data.loading import load_rows
    from zephyr_fast.data.preference import build_dpo_examples

    cfg, summary = ref_cache
    assert summary["ref_logps_train_reused"] is False
    cache = load_file(summary["ref_logps_train_path"])
    tok = load_tokenizer(sft_model["model_dir"])
    rows = load_rows(cfg.data)["train"]  # the trainer's (seeded, shuffled) rows: pair_index is a row of these
    examples, _ = build_dpo_examples(rows, tok, max_length=160, max_prompt_length=64)
    hf = AutoModelForCausalLM.from_pretrained(sft_model["model_dir"], dtype=torch.float32,
                                              attn_implementation="eager").eval()
    assert cache["index"].tolist() == [ex["index"] for ex in examples]

    def seq_logp(prompt, completion):
        ids = torch.as_tensor(prompt + completion)[None]
        with torch.no_grad():
            lp = torch.log_softmax(hf(ids).logits[0, :-1].float(), -1)
        tgt = ids[0, 1:]
        return lp.gather(1, tgt[:, None])[len(prompt) - 1:, 0].sum()

    for i, ex in enumerate(examples):
        torch.testing.assert_close(cache["ref_chosen_logps"][i], seq_logp(ex["prompt_ids"], ex["chosen_ids"]),
                                   atol=1e-3, rtol=1e-5)
        torch.testing.assert_close(cache["ref_rejected_logps"][i], seq_logp(ex["prompt_ids"], ex["rejected_ids"]),
                                   atol=1e-3, rtol=1e-5)


def test_ref_cache_is_reused_and_refused_when_data_or_model_change(ref_cache, sft_model, tmp_path):
    cfg, first = ref_cache
    cache_dir = cfg.dpo.ref_logps_dir
    path = first["ref_logps_train_path"]
    mtime = os.path.getmtime(path)
    common = dict(model_name_or_path=sft_model["model_dir"], ref_logps_dir=cache_dir)

    data_dir = list(cfg.data.dataset_mixer)[0]
    again = run(_cfg("ref_logps", tmp_path / "again", data_dir, **common))
    assert again["ref_logps_train_reused"] is True and os.path.getmtime(path) == mtime

    other_data = write_dpo_dir(tmp_path / "data2", dpo_rows(n=8, start=8))
    stale = r"train.safetensors: the cached reference log-probs do not match.*dataset"
    with pytest.raises(StaleRefLogpsError, match=stale):
        run(_cfg("ref_logps", tmp_path / "d2", other_data, **common))

    with pytest.raises(StaleRefLogpsError, match=r"model_weights changed.*--ref_logps_recompute=true"):
        run(_cfg("ref_logps", tmp_path / "m2", data_dir, ref_logps_dir=cache_dir))  # random init, not the SFT model

    with pytest.raises(StaleRefLogpsError, match="lengths"):
        run(_cfg("ref_logps", tmp_path / "l2", data_dir, max_prompt_length=32, **common))
    assert os.path.getmtime(path) == mtime  # refusals never touch the cache

    copy = str(tmp_path / "cache_copy")
    shutil.copytree(cache_dir, copy)
    redo = run(_cfg("ref_logps", tmp_path / "redo", data_dir, ref_logps_dir=copy, ref_logps_recompute=True))
    assert redo["ref_logps_train_reused"] is False
    key, _ = load_verified(os.path.join(copy, "train.safetensors"))  # the key lives inside the one cache file
    assert key["model_weights"].startswith("params:")  # the random init's, not the SFT files'


def test_dpo_uses_the_cache_and_raises_reward_margins(ref_cache, sft_model, tmp_path):
    cfg, _ = ref_cache
    data_dir = list(cfg.data.dataset_mixer)[0]
    dcfg = _cfg("dpo", tmp_path / "dpo", data_dir, model_name_or_path=sft_model["model_dir"],
                ref_logps_dir=cfg.dpo.ref_logps_dir, num_train_epochs=3, learning_rate=1e-3, optim="rmsprop",
                eval_strategy="epoch", beta=0.1)
    s = run(dcfg)
    assert s["ref_logps_train_reused"] is True and s["ref_logps_test_reused"] is True
    rows = rows_of(s["metrics_path"])
    first = rows[0]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-5)  # policy == reference at step 1
    assert first["rewards/margins"] == pytest.approx(0.0, abs=1e-5)
    evals = [r for r in rows if "eval_loss" in r]
    assert evals[-1]["eval_rewards/margins"] > 0.5
    assert evals[-1]["eval_rewards/accuracies"] > 0.8
    assert evals[-1]["eval_loss"] < math.log(2) - 0.1
    for key in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "logps/chosen", "logps/rejected",
                "train_pairs_per_second", "grad_norm", "learning_rate"):
        assert key in rows[0], key
    assert s["train_pairs"] == 8 * 3


def test_kill_and_resume_gives_the_same_weights(sft_dir, tmp_path):
    kw = dict(max_steps=7, lr_scheduler_type="cosine", warmup_ratio=0.2)  # 5 steps/epoch: crosses an epoch
    whole = run(_cfg("sft", tmp_path / "whole", sft_dir, **kw), return_model=True)
    cut = _cfg("sft", tmp_path / "cut", sft_dir, save_strategy="steps", save_steps=2, save_total_limit=2, **kw)
    stopped = run(cut, stop_after=5)  # "killed" after step 5: the last checkpoint is step 4
    assert stopped["finished"] is False and stopped["global_step"] == 5
    names = sorted(n for n in os.listdir(tmp_path / "cut") if n.startswith("checkpoint"))
    assert names == ["checkpoint-2", "checkpoint-4"]  # save_total_limit=2, no temp dirs left behind
    cut.training.resume_from_checkpoint = "auto"
    resumed = run(cut, return_model=True)
    assert resumed["finished"] and resumed["global_step"] == whole["global_step"] == 7
    a, b = whole["model"].state_dict(), resumed["model"].state_dict()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    steps = [r["step"] for r in rows_of(resumed["metrics_path"]) if "loss" in r]
    assert steps == list(range(1, 8))  # the interrupted run's step 5 was replaced, not duplicated
    losses = [r["loss"] for r in rows_of(resumed["metrics_path"]) if "loss" in r]
    assert losses == [r["loss"] for r in rows_of(whole["metrics_path"]) if "loss" in r]


def test_non_finite_loss_stops_with_a_checkpoint(sft_dir, tmp_path):
    from zephyr_fast.training.loop import NonFiniteLossError

    cfg = _cfg("sft", tmp_path / "nan", sft_dir, learning_rate=1e12, max_grad_norm=0.0, optim="sgd")
    with pytest.raises(NonFiniteLossError, match=r"loss is (nan|inf) at step \d+.*checkpoint-\d+"):
        run(cfg)
    assert any(n.startswith("checkpoint-") for n in os.listdir(tmp_path / "nan"))


def test_lora_run_trains_adapters_only(sft_dir, tmp_path):
    s = run(_cfg("sft", tmp_path / "lora", sft_dir, use_peft=True, lora_r=4, lora_alpha=8, lora_dropout=0.0,
                 max_steps=2), return_model=True)
    assert os.path.exists(tmp_path / "lora" / "adapter" / "adapter_config.json")
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "lora"), dtype=torch.float32)
    assert merged.config.hidden_size == TINY_MODEL["hidden_size"]


def test_prefix_shared_dpo_agrees_with_the_separate_layout_reference(ref_cache, sft_model, tmp_path):
    """Policy log-probs in the prefix-shared layout at init equal the cached (separate-layout) reference."""
    cfg, _ = ref_cache
    data_dir = list(cfg.data.dataset_mixer)[0]
    s = run(_cfg("dpo", tmp_path / "ps", data_dir, model_name_or_path=sft_model["model_dir"], max_steps=1,
                 dpo_layout="prefix_shared", ref_logps_dir=cfg.dpo.ref_logps_dir, max_tokens_per_batch=2000))
    first = rows_of(s["metrics_path"])[0]
    assert s["ref_logps_train_reused"] is True
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-4)
    assert first["rewards/margins"] == pytest.approx(0.0, abs=1e-3)
