"""Every supported model family: packed == unpacked transformers forward (CPU, fp32, tiny configs).

For each family a tiny random model with the family's distinctive features switched on (sliding
windows that bind, per-layer window mixes, Gemma 2 soft-capping and ``query_pre_attn_scalar``,
q/k-norm, NoPE layers, tied embeddings, MoE) is run packed through ``forward_hidden`` /
``packed_logps`` / the fused losses and, as reference, one sequence at a time through
transformers' own eager attention and LM head (plain PyTorch log-softmax on HF's logits).
"""

import inspect
import sys
import types

import pytest
import torch
import torch.nn.functional as F

import zephyr_kernels as zk
from tests.model.helpers import (assert_grads_close, dpo_packed, grads, logits_token_logps, per_sequence_outputs,
                                 random_pairs, random_seqs, sft_packed, tiny_model)
from zephyr_fast.data.batch import loss_inputs
from zephyr_fast.model import attention as attn
from zephyr_fast.model import forward_hidden, lm_head_weight, packed_logps, tiny_config
from zephyr_fast.model.forward import head_transform
from zephyr_fast.model.load import SUPPORTED_MODEL_TYPES, check_supported

W = 4  # sliding window: binds for the 5- to 12-token sequences below
GEMMA2 = dict(sliding_window=W, attn_logit_softcapping=0.5, final_logit_softcapping=1.0, query_pre_attn_scalar=24,
              initializer_range=0.2)  # small caps and larger weights so both soft-caps bind
FAMILIES = {
    "mistral": dict(sliding_window=W),
    "llama": {},
    "llama3": {},  # Llama 3 RoPE scaling
    "smollm": {},  # SmolLM 1/2: tied Llama
    "qwen2": dict(use_sliding_window=True, sliding_window=W, max_window_layers=1),  # layer 1 sliding only
    "qwen3": dict(use_sliding_window=True, sliding_window=W, max_window_layers=1),  # + q/k-norm
    "gemma": {},  # embedding scaling, tied
    "gemma2": GEMMA2,  # layer 0 sliding, layer 1 full
    "gemma3_text": dict(sliding_window=W, layer_types=["full_attention", "sliding_attention"],
                        query_pre_attn_scalar=24),  # q/k-norm, local RoPE base
    "phi3": dict(sliding_window=W),
    "smollm3": dict(no_rope_layers=[1, 0]),  # layer 1 without RoPE
    "starcoder2": dict(sliding_window=W),
    "mixtral": dict(sliding_window=W),
}
WINDOWED = [a for a, kw in FAMILIES.items() if "sliding_window" in kw]
LENGTHS = [7, 1, 12, 3, 5]
PAIRS = [(5, 4, 6), (1, 3, 2), (8, 1, 1)]  # prompt / chosen / rejected lengths


def _model(arch, seed=0):
    return tiny_model(arch, seed=seed, **FAMILIES[arch])


def test_every_supported_model_type_is_covered():
    types_here = {tiny_config(a, vocab_size=64, hidden_size=32, num_hidden_layers=1).model_type for a in FAMILIES}
    assert types_here == set(SUPPORTED_MODEL_TYPES)


@pytest.mark.parametrize("arch", list(FAMILIES))
def test_packed_logps_and_grads_equal_unpacked(arch):
    model = _model(arch)
    seqs = random_seqs(LENGTHS)
    batch = sft_packed(seqs)
    coef = torch.randn(batch.num_tokens, generator=torch.Generator().manual_seed(3))

    tok, seg = packed_logps(model, batch, impl="torch")
    (tok * coef).sum().backward()
    g_packed = grads(model)
    model.zero_grad(set_to_none=True)
    with torch.no_grad():
        hidden = forward_hidden(model, batch)

    ref_hidden, ref_logits = per_sequence_outputs(model, seqs)
    ref_tok = logits_token_logps(ref_logits, batch.labels)
    (ref_tok * coef).sum().backward()
    g_ref = grads(model)

    torch.testing.assert_close(hidden, ref_hidden.detach(), atol=1e-5, rtol=0)
    torch.testing.assert_close(tok, ref_tok.detach(), atol=1e-5, rtol=0)
    torch.testing.assert_close(seg, torch.zeros(len(seqs)).index_add_(0, batch.segment_ids, tok), atol=1e-5, rtol=0)
    assert_grads_close(g_packed, g_ref)


@pytest.mark.parametrize("arch", list(FAMILIES))
def test_sft_loss_and_grads_equal_unpacked(arch):
    model = _model(arch, seed=1)
    seqs = random_seqs([9, 4, 13, 6], seed=7)
    masks = [[0] * (len(s) // 3) + [1] * (len(s) - len(s) // 3) for s in seqs]  # prompt rows carry no loss
    batch = sft_packed(seqs, masks)

    with lm_head_weight(model) as w:
        loss = zk.linear_cross_entropy(forward_hidden(model, batch), w, batch.labels, impl="torch",
                                       **head_transform(model))
    loss.backward()
    g_ours = grads(model)
    model.zero_grad(set_to_none=True)

    _, ref_logits = per_sequence_outputs(model, seqs)
    ref = F.cross_entropy(ref_logits.float(), batch.labels, ignore_index=-100)
    ref.backward()
    torch.testing.assert_close(loss, ref, atol=1e-5, rtol=5e-4)
    assert_grads_close(g_ours, grads(model))


def _fused_dpo(model, batch, ref_c, ref_r, beta):
    """The trainer's DPO path: packed hidden → fused loss (with the head transform)."""
    rows, labels, segment_ids = loss_inputs(forward_hidden(model, batch), batch)
    head = head_transform(model)
    with lm_head_weight(model) as w:
        if head["softcap"] is None or "softcap" in inspect.signature(zk.fused_linear_dpo_loss).parameters:
            extra = {} if head["softcap"] is None else head
            return zk.fused_linear_dpo_loss(rows, w, labels, segment_ids, ref_c, ref_r, beta=beta, impl="torch",
                                            **extra)
        # fused_linear_dpo_loss has no softcap yet: fused log-probs (with softcap) + dpo_loss
        _, seg = zk.linear_logprobs(rows, w, labels, segment_ids=segment_ids, num_segments=2 * ref_c.numel(),
                                    impl="torch", **head)
        return zk.dpo_loss(seg[0::2], seg[1::2], ref_c, ref_r, beta=beta)


@pytest.mark.parametrize("layout", ["separate", "prefix_shared"])
@pytest.mark.parametrize("arch", list(FAMILIES))
def test_dpo_loss_and_grads_equal_unpacked(arch, layout):
    model = _model(arch, seed=2)
    pairs = random_pairs(PAIRS, seed=11)
    g = torch.Generator().manual_seed(12)
    ref_c, ref_r = -20 * torch.rand(len(PAIRS), generator=g), -20 * torch.rand(len(PAIRS), generator=g)

    loss, metrics = _fused_dpo(model, dpo_packed(pairs, layout), ref_c, ref_r, beta=0.1)
    loss.backward()
    g_ours = grads(model)
    model.zero_grad(set_to_none=True)

    seqs, labels = [], []  # unpacked: prompt+chosen, prompt+rejected, each alone
    for ex in pairs:
        for comp in (ex["chosen_ids"], ex["rejected_ids"]):
            seqs.append(torch.tensor(ex["prompt_ids"] + comp))
            labels.append(torch.tensor([-100] * (len(ex["prompt_ids"]) - 1) + comp + [-100]))
    _, ref_logits = per_sequence_outputs(model, seqs)
    tok = logits_token_logps(ref_logits, torch.cat(labels))
    seq_logps = torch.stack([t.sum() for t in tok.split([len(s) for s in seqs])])
    pc, pr = seq_logps[0::2], seq_logps[1::2]
    ref_loss = -F.logsigmoid(0.1 * ((pc - ref_c) - (pr - ref_r))).mean()
    ref_loss.backward()

    torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=5e-4)
    if "logps/chosen" in metrics:
        torch.testing.assert_close(metrics["logps/chosen"], pc.mean().detach(), atol=1e-4, rtol=5e-4)
    assert_grads_close(g_ours, grads(model))


@pytest.mark.parametrize("arch", WINDOWED)
def test_the_window_binds(arch):
    """The comparisons above can fail: without its window the same model gives other states."""
    model = _model(arch)
    batch = sft_packed(random_seqs(LENGTHS))
    with torch.no_grad():
        windowed = forward_hidden(model, batch)
        model.config.sliding_window = None
        for layer in model.model.layers:  # Qwen2/3, Gemma 2/3 keep the window per layer
            if hasattr(layer.self_attn, "sliding_window"):
                layer.self_attn.sliding_window = None
        full = forward_hidden(model, batch)
    assert (full[:7] - windowed[:7]).abs().max() > 1e-4


def test_gemma2_softcaps_and_scaling_bind():
    model = _model("gemma2")
    assert head_transform(model) == {"softcap": 1.0, "temperature": 1.0}
    assert head_transform(_model("llama")) == {"softcap": None, "temperature": 1.0}
    batch = sft_packed(random_seqs(LENGTHS))
    with torch.no_grad():
        tok, _ = packed_logps(model, batch, impl="torch")
        hidden = forward_hidden(model, batch)
        for layer in model.model.layers:
            layer.self_attn.attn_logit_softcapping = None
        assert (forward_hidden(model, batch) - hidden).abs().max() > 1e-3  # attention soft-cap binds
        for layer in model.model.layers:
            layer.self_attn.scaling = 16 ** -0.5
        assert (forward_hidden(model, batch) - hidden).abs().max() > 1e-3
        with lm_head_weight(model) as w:
            plain = zk.linear_logprobs(hidden, w, batch.labels, impl="torch")
    assert (plain - tok).abs().max() > 1e-2  # final soft-cap binds


# ---- every backend honours scaling / sliding_window / softcap, or refuses ---------------------------


def _dense_attention(q, k, v, batch, window, scale, softcap):
    """Dense reference over the whole packed batch: ``q (1, H, N, Dh)`` → ``(1, N, H, Dh)``."""
    n = q.shape[2]
    seg = torch.repeat_interleave(torch.arange(len(batch.cu_seqlens) - 1), torch.diff(batch.cu_seqlens).long())
    idx, pos = torch.arange(n), batch.position_ids
    allowed = (seg[:, None] == seg[None, :]) & (idx[None, :] <= idx[:, None])
    if window is not None:
        allowed &= (pos[:, None] - pos[None, :]) < window
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    s = q @ k.transpose(-1, -2) * scale
    if softcap is not None:
        s = torch.tanh(s / softcap) * softcap
    return (s.masked_fill(~allowed, float("-inf")).softmax(-1) @ v).transpose(1, 2)


def _qkv(batch, dtype=torch.float32):
    g = torch.Generator().manual_seed(6)
    q = 3 * torch.randn(1, 4, batch.num_tokens, 16, generator=g)
    k, v = (3 * torch.randn(1, 2, batch.num_tokens, 16, generator=g) for _ in range(2))
    return q.to(dtype), k.to(dtype), v.to(dtype)


@pytest.mark.parametrize("window,softcap", [(None, None), (W, None), (None, 2.0), (W, 2.0)])
def test_segments_and_fake_flash_honour_window_softcap_scaling(window, softcap, monkeypatch):
    batch = sft_packed(random_seqs([7, 1, 12, 4]))
    q, k, v = _qkv(batch)
    ref = _dense_attention(q, k, v, batch, window, 0.3, softcap)
    # the meta is built for another window than the layer asks for: the layer's keyword wins
    meta = attn.build_varlen_meta(batch, "sdpa_segments", sliding_window=None if window else W)
    out, _ = attn._packed_attention(None, q, k, v, None, scaling=0.3, sliding_window=window, softcap=softcap,
                                    **{attn.META_KWARG: meta})
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)

    calls = []

    def flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p=0.0, softmax_scale=None, causal=False,
                               window_size=(-1, -1), softcap=0.0):
        calls.append((window_size, softcap))
        left = None if window_size[0] < 0 else window_size[0] + 1
        q, k, v = (t.float().transpose(0, 1)[None] for t in (q, k, v))
        return _dense_attention(q, k, v, batch, left, softmax_scale, softcap or None)[0].half()

    monkeypatch.setitem(sys.modules, "flash_attn", types.SimpleNamespace(flash_attn_varlen_func=flash_attn_varlen_func))
    flash_meta = attn.VarlenMeta(backend="flash_attn", cu_seqlens=batch.cu_seqlens, max_seqlen=batch.max_seqlen)
    out16, _ = attn._packed_attention(None, q.half(), k.half(), v.half(), None, scaling=0.3, sliding_window=window,
                                      softcap=softcap, **{attn.META_KWARG: flash_meta})
    assert calls == [((W - 1, 0) if window else (-1, -1), softcap or 0.0)]
    torch.testing.assert_close(out16.float(), _dense_attention(q.half().float(), k.half().float(), v.half().float(),
                                                               batch, window, 0.3, softcap), atol=5e-3, rtol=0)


@pytest.mark.filterwarnings("ignore:.*flex_attention called without torch.compile")
@pytest.mark.parametrize("window,softcap", [(None, 2.0), (W, 2.0)])
def test_flex_plumbing_honours_window_softcap_scaling(window, softcap, monkeypatch):
    """score_mod, per-window block masks and scale of the flex backend, through eager flex_attention
    (the compiled CPU kernel is not what is under test here, and costs a compile per shape)."""
    from torch.nn.attention.flex_attention import flex_attention

    monkeypatch.setattr(attn, "_compiled_flex", lambda: flex_attention)
    batch = sft_packed(random_seqs([7, 1, 12, 4]))
    q, k, v = _qkv(batch)
    meta = attn.build_varlen_meta(batch, "flex", sliding_window=None if window else W, needs_grad=False)
    assert meta.backend == "flex"
    with torch.no_grad():
        out, _ = attn._packed_attention(None, q, k, v, None, scaling=0.3, sliding_window=window, softcap=softcap,
                                        **{attn.META_KWARG: meta})
    torch.testing.assert_close(out, _dense_attention(q, k, v, batch, window, 0.3, softcap), atol=1e-5, rtol=1e-5)


def test_torch_varlen_refuses_softcap_and_unbound_window(monkeypatch):
    batch = sft_packed(random_seqs([7, 12]))
    q, k, v = _qkv(batch, torch.bfloat16)
    meta = attn.VarlenMeta(backend="torch_varlen", cu_seqlens=batch.cu_seqlens, max_seqlen=batch.max_seqlen)
    with pytest.raises(NotImplementedError, match="softcap=2.0.*torch_varlen"):
        attn._packed_attention(None, q, k, v, None, softcap=2.0, **{attn.META_KWARG: meta})
    monkeypatch.setattr(attn, "_varlen_params", lambda: frozenset({"query", "key", "value", "is_causal"}))
    with pytest.raises(NotImplementedError, match="sliding_window=4"):
        attn._packed_attention(None, q, k, v, None, sliding_window=W, **{attn.META_KWARG: meta})


@pytest.mark.parametrize("kw,match", [
    (dict(s_aux=torch.zeros(4)), r"\['s_aux'\]"),
    (dict(is_causal=False), "causal only"),
    (dict(attention_mask=torch.ones(1, 1, 5, 5)), "attention_mask"),
])
def test_unknown_attention_keywords_are_refused(kw, match):
    batch = sft_packed(random_seqs([5]))
    q, k, v = _qkv(batch)
    meta = attn.build_varlen_meta(batch, "sdpa_segments")
    mask = kw.pop("attention_mask", None)
    with pytest.raises(NotImplementedError, match=match):
        attn._packed_attention(None, q, k, v, mask, **kw, **{attn.META_KWARG: meta})


# ---- check_supported ------------------------------------------------------------------------------


def test_check_supported_accepts_every_family_and_refuses_in_one_line(tmp_path):
    for arch in FAMILIES:
        cfg = tiny_config(arch, vocab_size=64, hidden_size=32, num_hidden_layers=1)
        assert check_supported(cfg) == cfg.model_type == check_supported(cfg.model_type)
        assert check_supported(cfg.to_dict()) == cfg.model_type
    tiny_config("gemma2", vocab_size=64, hidden_size=32, num_hidden_layers=1).save_pretrained(tmp_path)
    assert check_supported(str(tmp_path)) == "gemma2"  # a checkpoint folder: only config.json is read
    with pytest.raises(ValueError, match="cannot read the config of") as e:
        check_supported(str(tmp_path / "missing"))
    assert "\n" not in str(e.value)
    for what, match in [("gpt2", "model_type='gpt2' is not supported.*supported: mistral, llama"),
                        ("gemma3", "multimodal.*gemma3_text"),
                        (tiny_config("gemma3_text", use_bidirectional_attention=True), "bidirectional"),
                        (tiny_config("mixtral", output_router_logits=True), "router auxiliary loss")]:
        with pytest.raises(ValueError, match=match) as e:
            check_supported(what)
        assert "\n" not in str(e.value)


def test_load_model_refuses_liger_outside_mistral_llama_and_unknown_tiny_arch():
    from zephyr_fast.model import load_model

    with pytest.raises(ValueError, match="liger_ops=True is wired for"):
        load_model(config=tiny_config("gemma", vocab_size=64, hidden_size=32, num_hidden_layers=1), liger_ops=True)
    with pytest.raises(ValueError, match="arch must be one of"):
        tiny_config("gpt2")
