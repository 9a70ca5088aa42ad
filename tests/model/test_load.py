"""load_model / tiny_config: checkpoints, configs, dtype, checkpointing, refusals with clear errors."""

import pytest
import torch
from transformers import GPT2Config

from tests.model.helpers import assert_grads_close, grads, random_seqs, sft_packed, tiny_model
from zephyr_fast.model import forward_hidden, load_model, tiny_config
from zephyr_fast.model import load as load_mod
from zephyr_fast.model.attention import implementation_name, resolve_backend


@pytest.mark.parametrize("arch,cls", [("mistral", "MistralForCausalLM"), ("llama", "LlamaForCausalLM")])
def test_tiny_config_builds_the_real_architecture(arch, cls):
    cfg = tiny_config(arch, vocab_size=300, hidden_size=64, num_hidden_layers=2)
    model = load_model(config=cfg)
    assert type(model).__name__ == cls and model.training
    assert model.config._attn_implementation == implementation_name(resolve_backend("auto", dtype=torch.float32))
    assert model.config.num_key_value_heads < model.config.num_attention_heads  # GQA exercised
    assert model.lm_head.weight.shape == (300, 64)


def test_load_from_local_checkpoint_and_dtype(tmp_path):
    model = tiny_model("llama", seed=8)
    model.save_pretrained(tmp_path, safe_serialization=True)
    loaded = load_model(str(tmp_path), attn_impl="sdpa_segments")
    for (n, a), (_, b) in zip(model.named_parameters(), loaded.named_parameters()):
        assert torch.equal(a, b), n
    bf16 = load_model(str(tmp_path), dtype="bfloat16")
    assert all(p.dtype == torch.bfloat16 for p in bf16.parameters())


def test_the_model_revision_is_what_is_loaded(tmp_path, monkeypatch):
    """``model_revision`` reaches transformers for the config and the weights (the reference cache
    fingerprints that revision: the weights loaded must be the same commit). The Hub is out of reach
    here, so transformers' two loaders are replaced by recorders over a local checkpoint (and the
    reachability probe by a no-op)."""
    import transformers

    tiny_model("llama", seed=3).save_pretrained(tmp_path, safe_serialization=True)
    seen = []
    real_config, real_model = transformers.AutoConfig.from_pretrained, transformers.AutoModelForCausalLM.from_pretrained

    def config(name, **kw):
        seen.append(("config", name, kw.get("revision")))
        return real_config(str(tmp_path), **{k: v for k, v in kw.items() if k != "revision"})

    def model(name, **kw):
        seen.append(("weights", name, kw.get("revision")))
        return real_model(str(tmp_path), **{k: v for k, v in kw.items() if k != "revision"})

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", config)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", model)
    monkeypatch.setattr(load_mod, "ensure_hub_reachable", lambda *a, **k: None)  # the recorders stand in for it
    load_model("org/tiny", revision="v2", attn_impl="sdpa_segments")
    assert seen == [("config", "org/tiny", "v2"), ("weights", "org/tiny", "v2")]


def test_refusals_have_clear_errors(tmp_path):
    cfg = tiny_config("mistral", vocab_size=300, hidden_size=64, num_hidden_layers=1)
    with pytest.raises(ValueError, match="exactly one"):
        load_model()
    with pytest.raises(ValueError, match="trust_remote_code"):
        load_model(config=cfg, trust_remote_code=True)
    with pytest.raises(ValueError, match="model_type='gpt2'"):
        load_model(config=GPT2Config(n_layer=1, n_embd=32, n_head=2))
    with pytest.raises(ValueError, match="dtype"):
        load_model(config=cfg, dtype="float8")
    with pytest.raises(ValueError, match="attn_impl"):
        load_model(config=cfg, attn_impl="dense")
    with pytest.raises(ValueError, match="stage == 3"):
        load_model(config=cfg, zero3={"zero_optimization": {"stage": 2}})
    with pytest.raises(ValueError, match="arch"):
        tiny_config("gpt2")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal; the CUDA path is test_liger_ops_cuda")
def test_liger_ops_refused_without_cuda():
    cfg = tiny_config("mistral", vocab_size=300, hidden_size=64, num_hidden_layers=1)
    with pytest.raises(RuntimeError, match="liger_ops=True needs a CUDA device"):
        load_model(config=cfg, liger_ops=True)


def test_gradient_checkpointing_is_non_reentrant_and_exact():
    seqs = random_seqs([6, 1, 9], seed=9)
    batch = sft_packed(seqs)
    results = []
    for gc in (False, True):
        torch.manual_seed(10)
        model = load_model(config=tiny_config("mistral", vocab_size=300, hidden_size=64, num_hidden_layers=2),
                           attn_impl="sdpa_segments", gradient_checkpointing=gc)
        assert model.model.gradient_checkpointing is gc
        hidden = forward_hidden(model, batch)
        (hidden * torch.linspace(-1, 1, hidden.numel()).view_as(hidden)).sum().backward()
        results.append((hidden.detach(), grads(model)))
    torch.testing.assert_close(results[0][0], results[1][0], atol=1e-6, rtol=0)
    assert_grads_close(results[0][1], results[1][1])


@pytest.mark.cuda
def test_liger_ops_cuda(monkeypatch):
    from transformers.models.llama import modeling_llama

    # Liger's RoPE patch is process-wide; undo it after this test so later CPU models stay plain
    monkeypatch.setattr(modeling_llama, "apply_rotary_pos_emb", modeling_llama.apply_rotary_pos_emb)
    seqs = random_seqs([33, 1, 70], seed=16)
    batch = sft_packed(seqs).to("cuda")
    outs = []
    for liger in (False, True):
        torch.manual_seed(17)
        model = load_model(config=tiny_config("llama", vocab_size=300, hidden_size=64, num_hidden_layers=2),
                           attn_impl="sdpa_segments", liger_ops=liger).to("cuda")  # fp32: no flash kernels
        hidden = forward_hidden(model, batch)
        hidden.float().square().sum().backward()
        outs.append((hidden.detach(), grads(model)))
    from liger_kernel.transformers.rms_norm import LigerRMSNorm

    assert model.model.norm.forward.__func__ is LigerRMSNorm.forward  # patched in place, weights kept
    assert not issubclass(modeling_llama.LlamaRMSNorm, LigerRMSNorm)  # later models are not patched
    torch.testing.assert_close(outs[0][0], outs[1][0], atol=1e-4, rtol=1e-4)
    assert_grads_close(outs[0][1], outs[1][1], atol=1e-4, rtol=1e-3)
