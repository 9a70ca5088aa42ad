"""TRL 1.16's fused LM head through zephyr (``zephyr_kernels.patch_trl()`` / ``zephyr_kernels.patch(model)``): the
per-token fields against a plain PyTorch head and TRL's own kernel (forward and gradients, odd shapes, V > 64k,
soft-cap and temperature, bf16), and one real ``SFTTrainer`` / ``DPOTrainer`` step patched vs unpatched: same loss,
same parameter change (plain SGD with lr 1: the change is the gradient), same logged metrics."""

import copy

import datasets
import pytest
import torch
import torch.nn.functional as F
import transformers
import trl
from trl.kernels import ChunkedLogProbFunction

import zephyr_kernels as zk
from zephyr_fast.model import tiny_config
from zephyr_kernels import trl_patch
from zephyr_kernels.trl_patch import OUTPUTS, fused_head_outputs

U32 = torch.finfo(torch.float32).eps / 2


@pytest.fixture(autouse=True)
def _trl_unpatched():
    yield
    zk.unpatch_trl()


def _plain_head(h, w, b, t, temperature=1.0, softcap=None):
    """TRL's fields from the full fp32 logits (reference)."""
    z = F.linear(h, w, b).float()
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    z = z / temperature
    logp_all = z.log_softmax(-1)
    p = logp_all.exp()
    return (logp_all.gather(-1, t[:, None])[:, 0], -(p * logp_all).sum(-1),
            torch.logsumexp(2 * logp_all, -1), z.mean(-1), z.argmax(-1) == t)


def _inputs(N, D, V, dtype=torch.float32, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = (torch.randn(N, D, generator=g) * 2).to(dtype).requires_grad_()
    w = (torch.randn(V, D, generator=g) / D ** 0.5).to(dtype).requires_grad_()
    b = (torch.randn(V, generator=g) * 0.1).to(dtype).requires_grad_() if bias else None
    t = torch.randint(0, V, (N,), generator=g)
    return h, w, b, t


def _grads(out, upstream, params):
    return torch.autograd.grad((out.float() * upstream).sum(), [p for p in params if p is not None])


@pytest.mark.parametrize("N, D, V, bias, temperature, softcap, impl", [
    (37, 19, 1031, True, 1.0, None, "torch"),
    (37, 19, 1031, True, 1.0, None, "triton"),        # the CUDA default, through the interpreter
    (37, 19, 1031, True, 1.0, None, "triton_tiled"),
    (5, 8, 65601, False, 0.7, None, "torch"),         # V > 64k
    (23, 16, 517, True, 1.3, 4.0, "torch"),           # Gemma 2 soft-cap, then temperature (TRL's order)
    (23, 16, 517, True, 1.3, 4.0, "triton"),
])
def test_fields_and_gradients_match_plain_head_and_trl(N, D, V, bias, temperature, softcap, impl):
    h, w, b, t = _inputs(N, D, V, bias=bias)
    got = fused_head_outputs(h, w, b, t, outputs=OUTPUTS, temperature=temperature, softcap=softcap, impl=impl)
    want = _plain_head(h, w, b, t, temperature, softcap)
    trl_out = ChunkedLogProbFunction.apply(h, w, b, t, temperature, 4096, softcap, 1.0, OUTPUTS)
    for name, g_, w_, r_ in zip(OUTPUTS, got, want, trl_out):
        if name == "is_top1":
            assert torch.equal(g_, w_) and torch.equal(g_, r_), name
            continue
        torch.testing.assert_close(g_, w_.detach(), rtol=1e-5, atol=1e-5, msg=name)
        torch.testing.assert_close(g_, r_.detach(), rtol=1e-5, atol=1e-5, msg=name)
    up = torch.randn(N, generator=torch.Generator().manual_seed(5))
    for gg, gw in zip(_grads(got[0], up, (h, w, b)), _grads(want[0], up, (h, w, b))):
        torch.testing.assert_close(gg, gw, rtol=1e-4, atol=1e-6)


def test_bf16_within_a_bf16_torch_heads_own_error():
    h, w, b, t = _inputs(41, 24, 70001, dtype=torch.bfloat16)
    ref = _plain_head(*(x.detach().float() for x in (h, w, b)), t)
    own = _plain_head(h, w, b, t)  # the bf16 torch head (logits rounded to bf16)
    got = fused_head_outputs(h, w, b, t, outputs=OUTPUTS, impl="torch")
    for name, g_, o_, r_ in zip(OUTPUTS[:4], got, own, ref):
        own_err = (o_.float() - r_).abs().max()
        assert (g_ - r_).abs().max() <= 2 * own_err + 1e-6, name
    up = torch.randn(41, generator=torch.Generator().manual_seed(3))
    hf, wf, bf = (x.detach().float().requires_grad_() for x in (h, w, b))
    ref_g = _grads(_plain_head(hf, wf, bf, t)[0], up, (hf, wf, bf))
    for gg, go, gr in zip(_grads(got[0], up, (h, w, b)), _grads(own[0], up, (h, w, b)), ref_g):
        assert (gg.float() - gr).abs().max() <= 2 * (go.float() - gr).abs().max() + 1e-6


def test_refusals_name_what_is_not_produced():
    h, w, b, t = _inputs(6, 8, 50)
    ent = fused_head_outputs(h, w, b, t, outputs=("log_probs", "entropy"), impl="torch")[1]
    with pytest.raises(ValueError, match="gradient through `entropy`"):
        ent.sum().backward()
    with pytest.raises(ValueError, match="output 'logits' is not produced"):
        fused_head_outputs(h, w, b, t, outputs=("logits",), impl="torch")
    scaled = _model(logit_scale=0.5)
    with pytest.raises(ValueError, match=r"logit_scale=0.5 \(mistral\) is not supported"):
        trl_patch.add_fused_lm_head(scaled)
    with pytest.raises(ValueError, match="output_router_logits=True"):
        trl_patch.add_fused_lm_head(_model(arch="mixtral", output_router_logits=True))


# ---- one real TRL training step, patched vs unpatched ---------------------------------------------------------

TEXTS = ["The quick brown fox jumps over the lazy dog.", "Zephyr is a small wind from the west.",
         "One two three four five six seven.", "Hello there, general Kenobi!"]
NOT_METRICS = {"epoch", "step", "train_runtime", "train_samples_per_second", "train_steps_per_second",
               "total_flos", "learning_rate", "grad_norm"}


def _model(arch="mistral", seed=0, **kw):
    torch.manual_seed(seed)
    cfg = tiny_config(arch, vocab_size=32000, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, **kw)
    return transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").float()


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    tok = transformers.AutoTokenizer.from_pretrained(str(tokenizer_dir))
    tok.pad_token = tok.pad_token or tok.unk_token
    return tok


def _args(cls, tmp_path, name, bf16=False, **kw):
    """One SGD step (lr 1: the parameter change is the gradient), 2 micro-batches of 2; fp32 unless ``bf16`` (TRL's
    default on this machine: CPU autocast to bf16)."""
    return cls(bf16=bf16, output_dir=str(tmp_path / name), per_device_train_batch_size=2, gradient_accumulation_steps=2,
               max_steps=1, learning_rate=1.0, optim="sgd", lr_scheduler_type="constant", max_grad_norm=0.0,
               weight_decay=0.0, report_to=[], save_strategy="no", logging_steps=1,
               dataloader_num_workers=0, seed=0, **{"use_cpu": True, **kw})


def _spy(monkeypatch):
    """Count zephyr's token log-prob calls; make TRL's own kernel and any lm_head(...) call (full logits) fail."""
    calls = []
    real = trl_patch.linear_logprobs
    monkeypatch.setattr(trl_patch, "linear_logprobs", lambda *a, **k: calls.append(a[0].shape) or real(*a, **k))

    def _no_trl_kernel(*a, **k):
        raise AssertionError("TRL's ChunkedLogProbFunction ran under the zephyr patch")
    monkeypatch.setattr(trl.trainer.utils._ChunkedLogProbFunction, "apply", _no_trl_kernel)
    return calls


def _no_logits(model):
    def hook(*_):
        raise AssertionError("lm_head(...) built full logits")
    return model.get_output_embeddings().register_forward_hook(hook)


def _step_result(trainer, model, before):
    trainer.train()
    logs = {k: v for rec in trainer.state.log_history for k, v in rec.items() if k not in NOT_METRICS}
    return logs, {n: before[n] - p.detach().cpu() for n, p in model.named_parameters()}


def _assert_same(got, want, rtol=1e-5):
    (got_logs, got_d), (want_logs, want_d) = got, want
    assert got_logs.keys() == want_logs.keys()
    for k, v in want_logs.items():
        assert got_logs[k] == pytest.approx(v, rel=rtol, abs=1e-6), k
    assert sum(float(d.abs().sum()) for d in want_d.values()) > 0
    for name, d in want_d.items():
        torch.testing.assert_close(got_d[name], d, rtol=1e-4, atol=1e-6, msg=name)


def _sft_step(tmp_path, tokenizer, monkeypatch, patched, bf16=False):
    model = _model(seed=3)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    calls = _spy(monkeypatch) if patched else None
    if patched:
        zk.patch(model, impl="torch")  # the one line: the model, as for transformers.Trainer
        hook = _no_logits(model)
    data = datasets.Dataset.from_dict({"text": TEXTS})
    args = _args(trl.SFTConfig, tmp_path, f"sft{int(patched)}{int(bf16)}", bf16=bf16, max_length=32)
    trainer = trl.SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer)
    out = _step_result(trainer, model, before)
    if patched:
        hook.remove()
        assert len(calls) == 2  # both micro-batches through zephyr's linear_logprobs
        monkeypatch.undo()
    return out


def test_sft_trainer_step_same_loss_gradients_and_metrics(tmp_path, tokenizer, monkeypatch):
    want = _sft_step(tmp_path, tokenizer, monkeypatch, False)
    got = _sft_step(tmp_path, tokenizer, monkeypatch, True)
    assert {"loss", "entropy", "mean_token_accuracy", "num_tokens"} <= got[0].keys()
    _assert_same(got, want)


def test_sft_trainer_bf16_autocast_within_trls_own_bf16_error(tmp_path, tokenizer, monkeypatch):
    """TRL's default here (bf16 autocast): both heads round to bf16 differently, so each is held to the fp32 run;
    zephyr's loss and parameter changes may be off from it by at most twice what TRL's own bf16 head is (normwise
    per parameter). Zephyr hands the head's dX / dW back in the autocast dtype, as ``F.linear`` under autocast does,
    where TRL keeps them fp32: measured here up to 1.4x TRL's own error, never an order more."""
    exact = _sft_step(tmp_path, tokenizer, monkeypatch, False)
    trl_bf16 = _sft_step(tmp_path, tokenizer, monkeypatch, False, bf16=True)
    ours = _sft_step(tmp_path, tokenizer, monkeypatch, True, bf16=True)
    for key in ("loss", "entropy"):
        trl_err = abs(trl_bf16[0][key] - exact[0][key])
        assert abs(ours[0][key] - exact[0][key]) <= 2 * trl_err + 1e-3 * abs(exact[0][key]), key
    for name, d in exact[1].items():
        trl_err = (trl_bf16[1][name] - d).norm()
        assert trl_err > 0 and (ours[1][name] - d).norm() <= 2 * trl_err, name


PAIRS = {"prompt": ["Say hi.", "Count to three.", "Name a colour.", "What is 2+2?"],
         "chosen": [" Hi there!", " One, two, three.", " Blue.", " Four."],
         "rejected": [" No.", " Three, two.", " A car.", " Five, I think."]}


# Liger's Triton layer kernels (RMSNorm, RoPE, SwiGLU) do not run in the Triton CPU interpreter; on CPU they are
# turned off through TRL's liger_kernel_config, which leaves use_liger_kernel=True's own path (TRL's deprecation,
# Liger's flce forced off) and the fused head; on CUDA they are on.
LIGER_LAYERS_OFF = {"rope": False, "rms_norm": False, "swiglu": False}


def _dpo_step(tmp_path, tokenizer, monkeypatch, patched, loss_type, liger_config=LIGER_LAYERS_OFF, device_kw=None,
              impl="torch"):
    model = _model(seed=4)
    ref = copy.deepcopy(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    calls = _spy(monkeypatch) if patched else None
    if patched:
        zk.patch_trl(impl=impl)  # the one line: every TRL SFT / DPO head, policy and reference
        hooks = [_no_logits(m) for m in (model, ref)]
    args = _args(trl.DPOConfig, tmp_path, f"dpo{int(patched)}", use_liger_kernel=True, liger_kernel_config=liger_config,
                 loss_type=loss_type, beta=0.1, max_length=48, **(device_kw or {}))
    with pytest.warns(FutureWarning, match="use_liger_kernel"):
        trainer = trl.DPOTrainer(model=model, ref_model=ref, args=args, train_dataset=datasets.Dataset.from_dict(PAIRS),
                                 processing_class=tokenizer)
    out = _step_result(trainer, model, before)
    if patched:
        for h in hooks:
            h.remove()
        assert len(calls) == 4  # policy and reference, both micro-batches
        monkeypatch.undo()
    return out


@pytest.mark.parametrize("loss_type", ["sigmoid", "sppo_hard"])
def test_dpo_trainer_use_liger_kernel_step_same_loss_gradients_and_metrics(tmp_path, tokenizer, monkeypatch,
                                                                            loss_type):
    want = _dpo_step(tmp_path, tokenizer, monkeypatch, False, loss_type)
    got = _dpo_step(tmp_path, tokenizer, monkeypatch, True, loss_type)
    assert {"loss", "entropy", "mean_token_accuracy", "logits/chosen", "logits/rejected", "rewards/chosen",
            "rewards/margins", "logps/chosen", "logps/rejected"} <= got[0].keys()
    _assert_same(got, want)


@pytest.mark.cuda
def test_dpo_trainer_with_liger_layer_kernels_on_cuda(tmp_path, tokenizer, monkeypatch):
    """use_liger_kernel=True with Liger's layer kernels on (CUDA): the same step patched and unpatched."""
    kw = {"use_cpu": False}
    want = _dpo_step(tmp_path, tokenizer, monkeypatch, False, "sigmoid", liger_config={}, device_kw=kw)
    got = _dpo_step(tmp_path, tokenizer, monkeypatch, True, "sigmoid", liger_config={}, device_kw=kw,
                    impl="auto")
    _assert_same(got, want, rtol=1e-4)


def test_unpatched_models_keep_trls_head():
    zk.patch(_model())  # installs the dispatcher
    other = _model(seed=1)
    trl.trainer.sft_trainer.add_fused_lm_head(other)
    assert not hasattr(other, "_zephyr_trl_head")
    patched = zk.patch(_model(seed=2), impl="torch")
    trl.trainer.sft_trainer.add_fused_lm_head(patched)
    assert patched._zephyr_trl_head == "torch"
