"""``zephyr_kernels.patch(model)``: a Hugging Face causal LM whose ``forward(..., labels=...)`` computes its
loss through zephyr's fused linear cross-entropy and keeps no ``(B, T, V)`` logits.

The counterpart of Liger's ``apply_liger_kernel_to_*`` / ``AutoLigerKernelForCausalLM`` and CCE's
``cce_patch(model)``, one line before building the ``transformers.Trainer``::

    model = zephyr_kernels.patch(AutoModelForCausalLM.from_pretrained(...))

Semantics are those of the model's own loss (``transformers.loss.loss_utils.ForCausalLMLoss``): labels
shifted by one (or ``shift_labels`` as given), ``-100`` ignored, mean over the non-ignored tokens — or
the sum divided by ``num_items_in_batch`` when the Trainer passes it (gradient accumulation) — and the
family's final-logit soft-capping (Gemma 2 / Gemma 3). Without ``labels`` the original forward runs
(generation is unchanged). ``keep_logits=True`` also returns the logits (one extra ``lm_head`` matmul).

Families: those zephyr_fast supports (:data:`SUPPORTED_MODEL_TYPES`, the same list as
``zephyr_fast.model.load``), whose heads are a plain ``lm_head`` matmul plus, for Gemma 2/3, a
soft-cap; any other ``model_type`` is refused in one line (its head may scale or transform the logits).
Mixtral's router auxiliary loss (``output_router_logits=True``) is refused too, as zephyr_fast does.

TRL 1.16's ``SFTTrainer`` and ``DPOTrainer`` score tokens with their own logits-free head
(``trl.trainer.utils.add_fused_lm_head``, called with ``fused_lm_head=True``), not through
``forward(labels=...)``: when TRL is installed, :func:`patch` also installs zephyr's version of that head
for this model (:mod:`zephyr_kernels.trl_patch`), so ``SFTTrainer(model=zephyr_kernels.patch(model))`` trains
through zephyr's kernels too.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import types

import torch.nn.functional as F
from transformers.modeling_outputs import CausalLMOutputWithPast

from zephyr_kernels.cross_entropy import linear_cross_entropy

SUPPORTED_MODEL_TYPES = ("mistral", "llama", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3",
                         "smollm3", "starcoder2", "mixtral")
_LOSS_KWARGS = ("labels", "shift_labels", "num_items_in_batch", "logits_to_keep", "ignore_index")
_OUTPUT_FIELDS = tuple(f.name for f in dataclasses.fields(CausalLMOutputWithPast) if f.name not in ("loss", "logits"))


def _check(model):
    config = model.config
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"zephyr_kernels.patch: model_type={config.model_type!r} is not supported; "
                         f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
    if getattr(config, "output_router_logits", False):
        raise ValueError(f"zephyr_kernels.patch: model_type={config.model_type!r} with output_router_logits=True: "
                         "the router auxiliary loss is not computed by the fused head")
    if getattr(model, "_zephyr_original_forward", None) is not None:
        raise ValueError("zephyr_kernels.patch: this model is already patched")


def fused_causal_lm_loss(hidden, lm_head, labels=None, shift_labels=None, num_items_in_batch=None,
                         ignore_index=-100, softcap=None, impl="auto"):
    """``ForCausalLMLoss`` on ``hidden (B, T, D)`` through ``lm_head`` without logits (module docstring)."""
    if shift_labels is None:
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    targets = shift_labels.reshape(-1).to(hidden.device)
    reduction = "mean" if num_items_in_batch is None else "sum"
    loss = linear_cross_entropy(hidden.reshape(-1, hidden.shape[-1]), lm_head.weight, targets,
                                getattr(lm_head, "bias", None), ignore_index, softcap, reduction, impl=impl)
    if num_items_in_batch is not None:
        loss = loss / (num_items_in_batch.to(loss.device) if hasattr(num_items_in_batch, "to") else num_items_in_batch)
    return loss


def _fused_forward(self, *args, **kwargs):
    """The patched ``forward`` (module docstring); bound to the model instance by :func:`patch`."""
    original = self._zephyr_original_forward
    kwargs.update(zip(self._zephyr_arg_names, args))
    if kwargs.get("labels") is None and kwargs.get("shift_labels") is None:
        return original(**kwargs)
    if kwargs.get("output_router_logits"):
        raise ValueError("zephyr_kernels.patch: output_router_logits=True is not supported by the fused head")
    loss_kw = {k: kwargs.pop(k) for k in _LOSS_KWARGS if k in kwargs}
    outputs = self.model(**kwargs)
    hidden = outputs.last_hidden_state
    keep = loss_kw.get("logits_to_keep", 0)
    if not (isinstance(keep, int) and keep == 0):
        hidden = hidden[:, slice(-keep, None) if isinstance(keep, int) else keep, :]
    head = self.get_output_embeddings()
    softcap = getattr(self.config, "final_logit_softcapping", None)
    loss = fused_causal_lm_loss(hidden, head, loss_kw.get("labels"), loss_kw.get("shift_labels"),
                                loss_kw.get("num_items_in_batch"), loss_kw.get("ignore_index", -100), softcap,
                                self._zephyr_impl)
    logits = None
    if self._zephyr_keep_logits:
        logits = head(hidden)
        if softcap is not None:
            logits = softcap * (logits / softcap).tanh()
    rest = {k: outputs[k] for k in _OUTPUT_FIELDS if k in outputs}
    return CausalLMOutputWithPast(loss=loss, logits=logits, **rest)


def patch(model, *, keep_logits: bool = False, impl: str = "auto"):
    """Make ``model(..., labels=...)`` compute its loss through zephyr's fused kernel (module docstring).

    Args:
        model: a ``transformers`` ``*ForCausalLM`` of a supported family (patched in place, instance only).
        keep_logits: also return ``logits`` (``(B, T, V)``, one extra matmul) when ``labels`` are given.
        impl: zephyr's ``impl`` for the loss (``"auto"``: Triton on CUDA, the chunked torch path on CPU).
    Returns:
        ``model`` itself, so ``model = zephyr_kernels.patch(AutoModelForCausalLM.from_pretrained(...))``.
    """
    _check(model)
    original = model.forward
    model._zephyr_original_forward = original
    model._zephyr_arg_names = tuple(inspect.signature(original).parameters)
    model._zephyr_keep_logits, model._zephyr_impl = bool(keep_logits), impl

    @functools.wraps(type(model).forward)  # keeps the signature: Trainer and generate() read it
    def forward(self, *args, **kwargs):
        return _fused_forward(self, *args, **kwargs)

    model.forward = types.MethodType(forward, model)
    from zephyr_kernels import trl_patch  # TRL's trainers build their own head: give them zephyr's for this model

    trl_patch.install()
    return model


def unpatch(model):
    """Restore the forward :func:`patch` replaced."""
    if getattr(model, "_zephyr_original_forward", None) is None:
        raise ValueError("zephyr_kernels.unpatch: this model is not patched")
    model.forward = model._zephyr_original_forward
    model._zephyr_original_forward = None
    return model
