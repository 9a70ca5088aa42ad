"""TRL's fused LM head through zephyr's kernels: ``SFTTrainer`` / ``DPOTrainer`` (TRL 1.16) in one line.

TRL 1.16 never calls ``forward(labels=...)`` for its losses: at construction ``SFTTrainer`` and
``DPOTrainer`` call ``trl.trainer.utils.add_fused_lm_head(model, outputs=...)``, then score tokens with
``model(..., labels=labels, fused_lm_head=True)``, which returns a ``FusedCausalLMOutput`` of
per-token fields (TRL's own chunked kernel, no ``(B, T, V)`` logits). ``use_liger_kernel=True`` there
applies only Liger's layer kernels (RMSNorm, RoPE, SwiGLU, ...; TRL forces
``fused_linear_cross_entropy=False``); no Liger loss class is used, and the DPO loss is TRL's formula
on the ``(B,)`` sums of those token log-probs. So the way into TRL's losses is that head::

    zephyr_kernels.patch_trl()                  # every SFTTrainer / DPOTrainer head built afterwards
    model = zephyr_kernels.patch(model)         # or: this model (HF Trainer and TRL trainers alike)

Both install :func:`add_fused_lm_head` in place of TRL's (in ``trl.trainer.utils``,
``trl.trainer.sft_trainer`` and ``trl.trainer.dpo_trainer``). It keeps TRL's signature and returns the
same ``FusedCausalLMOutput``, computed by zephyr:

* ``log_probs (B, T-1)`` (``(B, T)`` with ``shift_labels``): :func:`zephyr_kernels.linear_logprobs`
  on the valid rows only (``hidden[mask]``), differentiable; 0 where the label is ``-100``;
* ``loss = -Σ log_probs / (num_items_in_batch or max(1, #valid))``, ``label_mask = labels != -100``;
* ``entropy`` ``H = lse - Σ p z``, ``log_sum_sq_probs`` ``log Σ p²``, ``mean_logits`` ``Σ z / V``,
  ``is_top1`` (target is the first argmax): one no-grad row-blocked pass
  (:func:`zephyr_kernels.rowwise_ce.token_statistics`), only for the fields TRL asked for;
* ``z = transform(h Wᵀ + b)``: the family's final-logit soft-cap (Gemma 2/3), then ``/ temperature``
  (TRL's order); ``cast_lm_head_to_fp32`` runs it in fp32 outside autocast, as TRL does.

Whatever TRL's head does that this one cannot do exactly is refused in one line, never approximated:
a gradient through ``entropy`` (SFT / DPO log it detached), a ``logit_scale`` / ``logits_scaling`` /
``lm_head_multiplier`` (no family zephyr supports has one), MoE router auxiliary loss
(``output_router_logits``), an unknown output name. A model not patched, while :func:`patch_trl` is
not active, keeps TRL's own head (the installed function hands it over). Trainers other than
``SFTTrainer`` / ``DPOTrainer`` are not routed.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import types
from contextlib import nullcontext

import torch

from zephyr_kernels.linear_logprobs import linear_logprobs
from zephyr_kernels.rowwise_ce import STAT_NAMES, token_statistics

OUTPUTS = ("log_probs",) + STAT_NAMES
# TRL modules whose ``add_fused_lm_head`` name is replaced (the trainers routed through zephyr)
TRL_MODULES = ("trl.trainer.utils", "trl.trainer.sft_trainer", "trl.trainer.dpo_trainer")
_SCALE_KEYS = ("logit_scale", "output_multiplier", "lm_head_multiplier", "logits_scaling")

_state = {"trl_add": None, "impl": None}  # TRL's own function; impl of patch_trl() (None: per model)


class _NoEntropyGrad(torch.autograd.Function):
    """Identity on the entropy values, tied to ``hidden`` so a gradient reaching it is refused, not dropped."""

    @staticmethod
    def forward(ctx, values, anchor):
        return values.clone()

    @staticmethod
    def backward(ctx, grad):
        raise ValueError("zephyr_kernels.patch_trl: a gradient through `entropy` is not computed by zephyr's "
                         "fused head (SFTTrainer / DPOTrainer log it detached); use TRL's head for this loss")


def fused_head_outputs(hidden, weight, bias, labels, *, outputs=("log_probs",), temperature=1.0, softcap=None,
                       impl="auto"):
    """TRL's per-token fields on flat valid rows: ``hidden (M, D)``, ``weight (V, D)``, ``bias (V,)`` or None,
    ``labels (M,) int64`` in ``[0, V)``. Returns ``(log_probs, entropy, log_sum_sq_probs, mean_logits,
    is_top1)``, each ``(M,)`` (fp32; ``is_top1`` bool) or None when not in ``outputs`` (module docstring)."""
    unknown = [o for o in outputs if o not in OUTPUTS]
    if unknown:
        raise ValueError(f"zephyr_kernels.patch_trl: fused-head output {unknown[0]!r} is not produced; "
                         f"known: {', '.join(OUTPUTS)}")
    logp = linear_logprobs(hidden, weight, labels, bias=bias, temperature=temperature, softcap=softcap, impl=impl)
    stats = token_statistics(hidden.detach(), weight.detach(), None if bias is None else bias.detach(), labels,
                             [n for n in STAT_NAMES if n in outputs], temperature=temperature, softcap=softcap)
    if "entropy" in stats and torch.is_grad_enabled() and hidden.requires_grad:
        stats["entropy"] = _NoEntropyGrad.apply(stats["entropy"], hidden)
    return (logp,) + tuple(stats.get(n) for n in STAT_NAMES)


def _check_scale(text_config):
    for key in _SCALE_KEYS:
        value = getattr(text_config, key, None)
        if value is not None and float(value) != 1.0:
            raise ValueError(f"zephyr_kernels.patch_trl: {key}={value} ({text_config.model_type}) is not "
                             "supported by zephyr's fused head; use TRL's head for this model")


def add_fused_lm_head(model, temperature: float = 1.0, cast_lm_head_to_fp32: bool = False,
                      outputs: tuple = ("log_probs",), *, impl: str = "auto"):
    """TRL's ``add_fused_lm_head`` (same arguments, same ``FusedCausalLMOutput``) through zephyr's kernels.

    ``model(..., labels=labels (B, T) int64, fused_lm_head=True)`` runs the backbone, scores the positions whose
    next-token label is not ``-100`` with :func:`fused_head_outputs` and returns TRL's ``FusedCausalLMOutput``;
    without ``fused_lm_head`` the model's previous forward runs. Refusals: module docstring."""
    from trl.trainer.utils import FusedCausalLMOutput, maybe_gather_lm_head_ctx

    text_config = model.config.get_text_config()
    _check_scale(text_config)
    if getattr(text_config, "output_router_logits", False):
        raise ValueError(f"zephyr_kernels.patch_trl: model_type={text_config.model_type!r} with "
                         "output_router_logits=True: the router auxiliary loss is not computed by the fused head")
    unknown = [o for o in outputs if o not in OUTPUTS]
    if unknown:
        raise ValueError(f"zephyr_kernels.patch_trl: fused-head output {unknown[0]!r} is not produced; "
                         f"known: {', '.join(OUTPUTS)}")
    softcap = getattr(text_config, "final_logit_softcapping", None)
    backbone_attr = "base_model" if text_config is model.config else "model"
    original_forward = model.forward

    @functools.wraps(type(model).forward)  # generate() validates its kwargs against this signature
    def _fused_forward(self, *args, fused_lm_head=False, labels=None, shift_labels=None, num_items_in_batch=None,
                       **kwargs):
        if not fused_lm_head:
            extra = dict(labels=labels, shift_labels=shift_labels, num_items_in_batch=num_items_in_batch)
            return original_forward(*args, **kwargs, **{k: v for k, v in extra.items() if v is not None})
        if kwargs.get("output_router_logits"):
            raise ValueError("zephyr_kernels.patch_trl: output_router_logits=True: the router auxiliary loss is "
                             "not computed by the fused head")
        kwargs["use_cache"] = False
        hidden = getattr(self, backbone_attr)(*args, **kwargs).last_hidden_state
        if shift_labels is None:
            hidden, labels = hidden[:, :-1], labels[:, 1:]
        else:
            labels = shift_labels
        head = self.get_output_embeddings()
        weight, bias = head.weight, head.bias
        hidden, labels = hidden.to(weight.device), labels.to(weight.device)
        mask = labels != -100
        ctx = nullcontext()
        if cast_lm_head_to_fp32:
            ctx = torch.autocast(hidden.device.type, enabled=False)
        with ctx, maybe_gather_lm_head_ctx(weight, bias):
            h, w, b = hidden[mask], weight, bias
            if cast_lm_head_to_fp32:
                h, w, b = h.float(), w.float(), None if b is None else b.float()
            per_token = fused_head_outputs(h, w, b, labels[mask], outputs=tuple(outputs), temperature=temperature,
                                           softcap=softcap, impl=impl)
        # masked_scatter keeps an all-ignored micro-batch connected to the model (a differentiable zero)
        log_probs, entropy, log_sum_sq, mean_logits, is_top1 = (
            None if x is None else x.new_zeros(mask.shape).masked_scatter(mask, x) for x in per_token)
        denom = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
        return FusedCausalLMOutput(loss=-log_probs.sum() / denom, log_probs=log_probs, entropy=entropy,
                                   log_sum_sq_probs=log_sum_sq, mean_logits=mean_logits, is_top1=is_top1,
                                   label_mask=mask)

    model.forward = types.MethodType(_fused_forward, model)
    model._zephyr_trl_head = impl


def _impl_for(model):
    if _state["impl"] is not None:
        return _state["impl"]
    if getattr(model, "_zephyr_original_forward", None) is not None:  # zephyr_kernels.patch(model)
        return model._zephyr_impl
    return None


def _dispatch(model, temperature=1.0, cast_lm_head_to_fp32=False, outputs=("log_probs",)):
    """Installed as TRL's ``add_fused_lm_head``: zephyr's head for a patched model or under :func:`patch_trl`,
    TRL's own otherwise."""
    impl = _impl_for(model)
    if impl is None:
        return _state["trl_add"](model, temperature=temperature, cast_lm_head_to_fp32=cast_lm_head_to_fp32,
                                 outputs=outputs)
    return add_fused_lm_head(model, temperature, cast_lm_head_to_fp32, outputs, impl=impl)


def install() -> bool:
    """Put :func:`_dispatch` in place of TRL's ``add_fused_lm_head`` in :data:`TRL_MODULES`; False without TRL."""
    if importlib.util.find_spec("trl") is None:
        return False
    modules = [importlib.import_module(name) for name in TRL_MODULES]
    if _state["trl_add"] is None:
        _state["trl_add"] = modules[0].add_fused_lm_head
    for module in modules:
        module.add_fused_lm_head = _dispatch
    return True


def patch_trl(impl: str = "auto"):
    """Route every fused LM head TRL's ``SFTTrainer`` / ``DPOTrainer`` build from now on (policy and reference
    models) through zephyr's kernels (module docstring). ``impl``: zephyr's backend (``"auto"``)."""
    if not install():
        raise ValueError("zephyr_kernels.patch_trl: TRL is not installed")
    _state["impl"] = impl


def unpatch_trl():
    """Give TRL its own ``add_fused_lm_head`` back (heads already built keep theirs)."""
    _state["impl"] = None
    if _state["trl_add"] is not None:
        for name in TRL_MODULES:
            importlib.import_module(name).add_fused_lm_head = _state["trl_add"]
