"""Packed varlen attention equals per-sequence attention (hidden states, log-probs, gradients)."""

import pytest
import torch
import torch.nn.functional as F

from tests.model.helpers import (assert_grads_close, dpo_packed, grads, per_sequence_hidden, plain_token_logps,
                           random_pairs, random_seqs, sft_packed, tiny_model)
from zephyr_fast.model import attention as attn
from zephyr_fast.model import forward_hidden, packed_logps

LENGTHS = [7, 1, 12, 3, 5]  # includes a length-1 sequence


@pytest.mark.parametrize("arch", ["mistral", "llama"])
def test_packed_forward_and_grads_equal_per_sequence(arch):
    model = tiny_model(arch)
    seqs = random_seqs(LENGTHS)
    batch = sft_packed(seqs)
    w = model.lm_head.weight
    coef = torch.randn(batch.num_tokens, generator=torch.Generator().manual_seed(3))

    hidden = forward_hidden(model, batch)
    logps = plain_token_logps(hidden, w, batch.labels)
    (logps * coef).sum().backward()
    g_packed = grads(model)
    model.zero_grad(set_to_none=True)

    ref_hidden = per_sequence_hidden(model, seqs)
    ref_logps = plain_token_logps(ref_hidden, w, batch.labels)
    (ref_logps * coef).sum().backward()
    g_ref = grads(model)

    assert hidden.shape == (sum(LENGTHS), model.config.hidden_size)
    torch.testing.assert_close(hidden, ref_hidden, atol=1e-5, rtol=0)
    torch.testing.assert_close(logps, ref_logps, atol=1e-5, rtol=0)
    assert (batch.labels != -100).sum() == sum(LENGTHS) - len(LENGTHS)
    # every parameter (embeddings, attention, MLP, norms, head) gets a gradient, and they agree
    assert len(g_packed) == len(list(model.parameters()))
    assert_grads_close(g_packed, g_ref)


def test_packed_is_not_cross_contaminated():
    """Sanity of the reference: attention that leaks across segments is detected."""
    model = tiny_model("llama")
    seqs = random_seqs([6, 5])
    leaky = per_sequence_hidden(model, [torch.cat(seqs)])  # one long sequence: tokens 6.. see seq 0
    packed = forward_hidden(model, sft_packed(seqs))
    assert (packed[6:] - leaky[6:]).abs().max() > 1e-3


def test_sliding_window_is_honoured():
    window = 4
    model = tiny_model("mistral", sliding_window=window)
    seqs = random_seqs([9, 3, 6])
    batch = sft_packed(seqs)
    meta = attn.build_varlen_meta(batch, "sdpa_segments", sliding_window=window)
    assert meta.sliding_window == window and meta.masks[0] is not None and meta.masks[1] is None
    with torch.no_grad():
        hidden = forward_hidden(model, batch)
        ref = per_sequence_hidden(model, seqs)  # transformers' own sliding-window causal mask
        model.config.sliding_window = None
        full = forward_hidden(model, batch)
    torch.testing.assert_close(hidden, ref, atol=1e-5, rtol=0)
    # the window binds for the 9- and 6-token sequences, so ignoring it changes their states
    assert (full[window:9] - hidden[window:9]).abs().max() > 1e-4


def test_sliding_window_rejected_when_backend_cannot_apply_it(monkeypatch):
    batch = sft_packed(random_seqs([9, 3]))
    # torch 2.10's varlen_attn has is_causal but no window_size argument
    monkeypatch.setattr(attn, "_varlen_params", lambda: frozenset({"query", "key", "value", "is_causal"}))
    with pytest.raises(NotImplementedError, match="sliding_window=4"):
        attn.build_varlen_meta(batch, "torch_varlen", sliding_window=4)
    # a window longer than every sequence does not bind, so nothing to reject (the next complaint
    # is about the device: the CUDA-only backends refuse CPU tensors by name)
    with pytest.raises(ValueError, match="'torch_varlen' needs CUDA tensors"):
        attn.build_varlen_meta(batch, "torch_varlen", sliding_window=64)


def test_backend_resolution_and_errors():
    assert attn.resolve_backend("auto", torch.device("cpu")) == "sdpa_segments"
    # the flash kernels take fp16/bf16 only: fp32 on CUDA resolves to the exact path
    assert attn.resolve_backend("auto", torch.device("cuda"), torch.float32) == "sdpa_segments"
    assert attn.register_varlen_attention("sdpa_segments") == "zephyr_sdpa_segments"
    assert attn.backend_of("zephyr_flex") == "flex" and attn.backend_of("sdpa") is None
    assert all("flash" not in attn.implementation_name(b) for b in attn.BACKENDS)
    with pytest.raises(ValueError, match="attention backend"):
        attn.resolve_backend("dense")
    if not attn.flash_attn_available():
        with pytest.raises(ImportError, match="flash_attn"):
            attn.resolve_backend("flash_attn")
    model = tiny_model("mistral")
    with pytest.raises(RuntimeError, match="without packed metadata"):
        model.model(input_ids=torch.tensor([[5, 6, 7]]), use_cache=False)


@pytest.mark.parametrize("backend", attn.BACKENDS)
def test_every_backend_name_is_accepted_by_transformers(backend):
    """transformers special-cases names (e.g. anything containing "flash" is imported as a kernel);
    each registered name must be settable on a model whatever is installed here."""
    from transformers import AttentionInterface

    name = attn.implementation_name(backend)
    AttentionInterface.register(name, attn._packed_attention)  # bypasses the availability check
    model = tiny_model("mistral", num_hidden_layers=1)
    model.set_attn_implementation(name)
    assert model.config._attn_implementation == name and attn.backend_of(name) == backend


def test_foreign_attention_is_switched_to_packed():
    model = tiny_model("llama")
    model.set_attn_implementation("sdpa")
    seqs = random_seqs([4, 6])
    hidden = forward_hidden(model, sft_packed(seqs))
    assert model.config._attn_implementation == "zephyr_sdpa_segments"
    torch.testing.assert_close(hidden, per_sequence_hidden(model, seqs), atol=1e-5, rtol=0)


def _fake_varlen_kernel(q, k, v, cu_q, cu_k, max_q, max_k, scale, left, right, gqa):
    """Documented semantics of flash-attn / torch varlen: (N, H, Dh) packed, window (left, right)."""
    assert q.dim() == 3 and q.stride(-1) == 1 and torch.equal(cu_q, cu_k) and cu_q.dtype == torch.int32
    bounds = cu_q.tolist()
    assert max_q == max_k == max(b - a for a, b in zip(bounds[:-1], bounds[1:]))
    outs = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        i = torch.arange(b - a)
        d = i[:, None] - i[None, :]
        mask = torch.ones(b - a, b - a, dtype=torch.bool)
        if right >= 0:
            mask &= -d <= right
        if left >= 0:
            mask &= d <= left
        qs, ks, vs = (t[a:b].transpose(0, 1)[None] for t in (q, k, v))
        outs.append(F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, scale=scale, enable_gqa=gqa)[0]
                    .transpose(0, 1))
    return torch.cat(outs)


@pytest.mark.parametrize("window", [None, 3])
@pytest.mark.parametrize("backend", ["torch_varlen", "flash_attn"])
def test_cuda_backend_plumbing_with_reference_kernels(backend, window, monkeypatch):
    """Argument plumbing of the CUDA wrappers (layout, scale, causal window, GQA) on CPU, with the
    kernels replaced by a reference implementation of their documented semantics."""
    import sys
    import types

    calls = []
    if backend == "torch_varlen":
        def varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, *, scale=None, window_size=(-1, -1),
                        enable_gqa=False):
            calls.append(window_size)
            assert enable_gqa == (q.shape[1] != k.shape[1])
            return _fake_varlen_kernel(q, k, v, cu_q, cu_k, max_q, max_k, scale, *window_size, enable_gqa)

        monkeypatch.setattr("torch.nn.attention.varlen.varlen_attn", varlen_attn)
        monkeypatch.setattr(attn, "_varlen_params",
                            lambda: frozenset({"query", "key", "value", "scale", "window_size", "enable_gqa"}))
    else:
        def flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p=0.0, softmax_scale=None,
                                   causal=False, window_size=(-1, -1)):
            calls.append(window_size)
            left, right = window_size
            return _fake_varlen_kernel(q, k, v, cu_q, cu_k, max_q, max_k, softmax_scale, left,
                                       0 if causal else right, q.shape[1] != k.shape[1])

        monkeypatch.setitem(sys.modules, "flash_attn", types.SimpleNamespace(
            flash_attn_varlen_func=flash_attn_varlen_func))
    batch = sft_packed(random_seqs([7, 1, 12, 4]))
    g = torch.Generator().manual_seed(6)
    q = torch.randn(1, 4, batch.num_tokens, 16, generator=g)
    k, v = (torch.randn(1, 2, batch.num_tokens, 16, generator=g) for _ in range(2))
    ref_meta = attn.build_varlen_meta(batch, "sdpa_segments", sliding_window=window)
    meta = attn.VarlenMeta(backend=backend, cu_seqlens=batch.cu_seqlens, max_seqlen=batch.max_seqlen,
                           sliding_window=window)
    out = attn._IMPLS[backend](q, k, v, meta, 0.3, 0.0)
    ref = attn._IMPLS["sdpa_segments"](q, k, v, ref_meta, 0.3, 0.0)
    assert out.shape == (1, batch.num_tokens, 4, 16) and calls
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-5)
    # the registered entry point refuses fp32 for the flash kernels by name
    with pytest.raises(ValueError, match="needs fp16/bf16"):
        attn._packed_attention(None, q, k, v, None, scaling=0.3, **{attn.META_KWARG: meta})


PAIR_SHAPES = [(5, 4, 6), (1, 3, 2), (8, 1, 1), (3, 7, 4)]  # prompt/chosen/rejected lengths incl. 1


def _seg_logps_and_grads(model, batch, coef):
    model.zero_grad(set_to_none=True)
    _, seg = packed_logps(model, batch, impl="torch")
    (seg * coef).sum().backward()
    return seg.detach(), grads(model)


@pytest.mark.parametrize("window", [None, 4])
def test_prefix_shared_equals_two_sequence_layout(window):
    model = tiny_model("mistral", sliding_window=window)  # window 4 binds: sequences up to 14 tokens
    pairs = random_pairs(PAIR_SHAPES)
    sep, shared = dpo_packed(pairs, "separate"), dpo_packed(pairs, "prefix_shared")
    assert shared.num_tokens < sep.num_tokens
    coef = torch.randn(2 * len(pairs), generator=torch.Generator().manual_seed(4))
    # CPU training path: exact per-segment SDPA with the dense prefix-shared mask
    assert attn.build_varlen_meta(shared, "sdpa_segments").backend == "sdpa_segments"
    seg_shared, g_shared = _seg_logps_and_grads(model, shared, coef)
    seg_sep, g_sep = _seg_logps_and_grads(model, sep, coef)
    torch.testing.assert_close(seg_shared, seg_sep, atol=1e-5, rtol=0)
    assert_grads_close(g_shared, g_sep)

    # and the mask matters: letting rejected tokens see chosen ones changes the rejected sums
    leaky = dpo_packed(pairs, "prefix_shared")
    leaky.part_ids = torch.zeros_like(leaky.part_ids)
    with torch.no_grad():
        _, seg_leaky = packed_logps(model, leaky, impl="torch")
    assert (seg_leaky[1::2] - seg_sep[1::2]).abs().max() > 1e-4
    torch.testing.assert_close(seg_leaky[0::2], seg_sep[0::2], atol=1e-5, rtol=0)


@pytest.mark.slow
def test_prefix_shared_flex_attention_forward():
    """FlexAttention block mask (compiled; no CPU backward, so the no-grad reference pass)."""
    model = tiny_model("mistral", sliding_window=5)  # the block mask also carries the window
    pairs = random_pairs(PAIR_SHAPES, seed=5)
    shared = dpo_packed(pairs, "prefix_shared")
    with torch.no_grad():
        _, seg_sep = packed_logps(model, dpo_packed(pairs, "separate"), impl="torch")
        # on CPU the default backend keeps prefix-shared batches on dense masks; "flex" opts in
        assert attn.build_varlen_meta(shared, "sdpa_segments", needs_grad=False).backend == "sdpa_segments"
        model.set_attn_implementation(attn.register_varlen_attention("flex"))
        meta = attn.build_varlen_meta(shared, "flex", sliding_window=5, needs_grad=False)
        assert meta.backend == "flex" and meta.block_mask is not None and meta.sliding_window == 5
        tok, seg = packed_logps(model, shared, impl="torch")
    assert tok.shape == (shared.num_tokens + len(pairs),)
    torch.testing.assert_close(seg, seg_sep, atol=1e-5, rtol=0)


def _cuda_batch_and_ref(arch, dtype):
    model = tiny_model(arch).to("cuda")
    seqs = random_seqs([37, 1, 130, 64])
    batch = sft_packed(seqs).to("cuda")
    with torch.no_grad():
        ref = forward_hidden(model, batch)  # sdpa_segments, fp32
    return model.to(dtype), batch, ref


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["torch_varlen", "flash_attn", "flex"])
def test_cuda_backends_match_fp32_reference(backend):
    if backend == "flash_attn":
        pytest.importorskip("flash_attn", reason="flash_attn not installed on this CUDA machine")
    if backend == "torch_varlen" and not attn.torch_varlen_available():
        pytest.skip(f"torch {torch.__version__} has no torch.nn.attention.varlen")
    model, batch, ref = _cuda_batch_and_ref("mistral", torch.bfloat16)
    with torch.no_grad():
        same_dtype = forward_hidden(model, batch).float()  # bf16 through sdpa_segments
        model.set_attn_implementation(attn.register_varlen_attention(backend))
        out = forward_hidden(model, batch).float()
    err, base = (out - ref).abs().max(), (same_dtype - ref).abs().max()
    assert err <= 2 * base + 1e-3, (backend, err, base)


@pytest.mark.cuda
def test_cuda_prefix_shared_flex_grads_match_two_sequence_layout():
    model = tiny_model("mistral").to("cuda")
    pairs = random_pairs(PAIR_SHAPES)
    coef = torch.randn(2 * len(pairs), device="cuda")
    shared = dpo_packed(pairs, "prefix_shared").to("cuda")
    assert attn.build_varlen_meta(shared, "sdpa_segments").backend == "flex"
    seg_shared, g_shared = _seg_logps_and_grads(model, shared, coef)
    seg_sep, g_sep = _seg_logps_and_grads(model, dpo_packed(pairs, "separate").to("cuda"), coef)
    torch.testing.assert_close(seg_shared, seg_sep, atol=1e-4, rtol=1e-4)
    assert_grads_close(g_shared, g_sep, atol=1e-4, rtol=1e-3)
