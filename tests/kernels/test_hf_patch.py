"""``zephyr_kernels.patch(model)``: a patched HF causal LM gives its own loss and gradients without logits,
for every supported family, and one HF ``Trainer`` step (gradient accumulation, padding) matches."""

import pytest
import torch
import transformers

import zephyr_kernels as zk
from zephyr_fast.model import tiny_config
from zephyr_fast.model.load import SUPPORTED_MODEL_TYPES
from zephyr_kernels import hf_patch
from zephyr_kernels.hf_patch import SUPPORTED_MODEL_TYPES as PATCHED_TYPES

ARCHS = ("mistral", "llama", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3", "smollm3", "starcoder2",
         "mixtral")


def _model(arch, seed=0, **kw):
    torch.manual_seed(seed)
    cfg = tiny_config(arch, vocab_size=97, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, **kw)
    return transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").float()


def _batch(B=3, T=13, V=97, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, V, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, 9:] = 0  # right padding
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :3] = -100  # prompt
    return dict(input_ids=ids, attention_mask=mask, labels=labels)


def _loss_and_grads(model, batch, **kw):
    model.zero_grad()
    out = model(**batch, **kw)
    out.loss.backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_patch_covers_exactly_the_supported_families():
    assert set(PATCHED_TYPES) == set(SUPPORTED_MODEL_TYPES)
    assert {tiny_config(a, vocab_size=64, hidden_size=32, num_hidden_layers=1).model_type for a in ARCHS} == set(ARCHS)


@pytest.mark.parametrize("arch", ARCHS)
def test_patched_forward_equals_model_loss(arch):
    kw = {"final_logit_softcapping": 5.0} if arch in ("gemma2", "gemma3_text") else {}
    model, batch = _model(arch, **kw), _batch()
    want, want_g = _loss_and_grads(model, batch)
    zk.patch(model, impl="torch")
    got, got_g = _loss_and_grads(model, batch)
    assert got.logits is None and want.logits is not None
    torch.testing.assert_close(got.loss, want.loss, rtol=1e-5, atol=1e-6)
    assert got_g.keys() == want_g.keys()
    for name, g in want_g.items():
        torch.testing.assert_close(got_g[name], g, rtol=1e-4, atol=1e-6, msg=name)
    # num_items_in_batch (Trainer's gradient accumulation) and no labels (generation) behave as the model's own
    n = torch.tensor(17)
    torch.testing.assert_close(model(**batch, num_items_in_batch=n).loss,
                               zk.unpatch(model)(**batch, num_items_in_batch=n).loss, rtol=1e-5, atol=1e-6)


def test_keep_logits_no_labels_and_refusals():
    model, batch = _model("gemma2", final_logit_softcapping=5.0), _batch()
    want = model(**batch)
    zk.patch(model, keep_logits=True, impl="torch")
    got = model(**batch)
    torch.testing.assert_close(got.logits, want.logits, rtol=1e-5, atol=1e-5)
    no_labels = {k: v for k, v in batch.items() if k != "labels"}
    torch.testing.assert_close(model(**no_labels).logits, want.logits, rtol=0, atol=0)
    with pytest.raises(ValueError, match="already patched"):
        zk.patch(model)
    with pytest.raises(ValueError, match="output_router_logits"):
        zk.patch(_model("mixtral", output_router_logits=True))
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50))
    with pytest.raises(ValueError, match="model_type='gpt2' is not supported"):
        zk.patch(gpt2)


class _Rows(torch.utils.data.Dataset):
    def __init__(self, batch):
        self.rows = [{k: v[i] for k, v in batch.items()} for i in range(len(batch["input_ids"]))]

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


def _trainer_step(tmp_path, patched, monkeypatch):
    model = _model("mistral", seed=3)
    calls = []
    if patched:
        zk.patch(model, impl="torch")
        fused = hf_patch.linear_cross_entropy
        monkeypatch.setattr(hf_patch, "linear_cross_entropy", lambda *a, **k: calls.append(a[6]) or fused(*a, **k))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / ("p" if patched else "u")), per_device_train_batch_size=2,
        gradient_accumulation_steps=2, max_steps=1, learning_rate=1.0, optim="sgd", lr_scheduler_type="constant",
        max_grad_norm=0.0, weight_decay=0.0, report_to=[], save_strategy="no", logging_steps=1, use_cpu=True,
        dataloader_num_workers=0, seed=0,
    )
    trainer = transformers.Trainer(model=model, args=args, train_dataset=_Rows(_batch(B=4, T=11)))
    loss = trainer.train().training_loss
    assert calls == (["sum", "sum"] if patched else [])  # the fused loss ran, with Trainer's num_items_in_batch
    return loss, {n: before[n] - p.detach() for n, p in model.named_parameters()}


def test_hf_trainer_step_same_loss_and_gradients(tmp_path, monkeypatch):
    """One optimizer step (2 micro-batches of 2 rows, padding, Trainer's num_items_in_batch): plain SGD with
    lr 1 makes each parameter's change its gradient, so equal changes mean equal gradients."""
    want_loss, want = _trainer_step(tmp_path, False, monkeypatch)
    got_loss, got = _trainer_step(tmp_path, True, monkeypatch)
    assert abs(got_loss - want_loss) < 1e-5 * abs(want_loss)
    assert sum(float(d.abs().sum()) for d in want.values()) > 0
    for name, d in want.items():
        torch.testing.assert_close(got[name], d, rtol=1e-4, atol=1e-6, msg=name)
