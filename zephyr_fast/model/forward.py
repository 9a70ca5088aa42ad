"""Logits-free forward: packed batch → final hidden states → fused log-probs.

The LM head is never applied here.  :func:`forward_hidden` returns the decoder body's final
(normed) hidden states ``(N, D)``; the loss code hands them with :func:`lm_head_weight` to
``zephyr_kernels``, which never materialises ``(N, V)`` logits.
"""

from __future__ import annotations

import contextlib
import logging

import torch
from zephyr_kernels import linear_logprobs

from ..data.batch import PackedBatch, loss_inputs
from .attention import (META_KWARG, attention_implementation, backend_of, build_varlen_meta,
                        register_varlen_attention)

logger = logging.getLogger(__name__)


def _is_deepspeed_engine(model) -> bool:
    return any(c.__name__ == "DeepSpeedEngine" for c in type(model).__mro__)


def unwrap_model(model):
    """The ``transformers`` causal LM inside a DeepSpeed engine / DDP wrapper / PEFT model."""
    while hasattr(model, "module") and isinstance(getattr(model, "module"), torch.nn.Module):
        model = model.module
    if hasattr(model, "get_base_model"):  # peft.PeftModel: LoRA layers live inside the base model
        model = model.get_base_model()
    return model


def ensure_packed_attention(model) -> str:
    """Return the packed backend of ``model``, switching a foreign implementation to ``"auto"``."""
    backend = backend_of(model.config._attn_implementation)
    if backend is None:
        param = next(model.parameters())
        name = register_varlen_attention("auto", device=param.device, dtype=param.dtype, model_class=type(model))
        logger.info("switching attention from %r to %r for packed batches",
                    model.config._attn_implementation, name)
        model.set_attn_implementation(name)
        backend = backend_of(name)
    return backend


def sliding_window_of(config):
    """The window some layer of ``config`` uses (``None`` if none does): pre-built once per batch.

    Which layers use it is each layer's own business (it passes ``sliding_window`` to the attention
    function: Gemma 2/3 and Qwen2 per ``layer_types``, Mistral/Phi-3/StarCoder2/Mixtral every layer)."""
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None and "sliding_attention" not in layer_types:
        return None
    return window


def head_transform(model) -> dict:
    """Keyword arguments of the LM head's logit transform for ``zephyr_kernels`` losses.

    ``softcap``: Gemma 2's (and any config's) ``final_logit_softcapping`` — logits become
    ``c·tanh(z/c)`` before the softmax, as in transformers' ``*ForCausalLM.forward``; ``None``
    otherwise.  ``temperature``: always 1.0 for training.  Pass them as
    ``linear_logprobs(..., **head_transform(model))`` / ``linear_cross_entropy(..., **...)``.
    """
    config = unwrap_model(model).config
    return {"softcap": getattr(config, "final_logit_softcapping", None), "temperature": 1.0}


def forward_hidden(model, batch: PackedBatch) -> torch.Tensor:
    """Final hidden states of a packed batch, without the LM head.

    Args:
        model: a supported causal LM (from :func:`~zephyr_fast.model.load.load_model`), or a
            DeepSpeed engine / PEFT model wrapping one.
        batch: ``PackedBatch`` on the model's device — ``input_ids: (N,)``,
            ``position_ids: (N,)``, ``cu_seqlens: (S+1,) int32``.
    Returns:
        ``hidden: (N, D)`` in the model's dtype (after the final RMSNorm).

    A DeepSpeed engine is called through its own ``forward`` (so ZeRO-3's hooks, gradient
    accumulation scaling and backward prologue run exactly as for any engine forward), with
    ``logits_to_keep`` an empty index so the head produces a ``(1, 0, V)`` tensor.
    """
    if batch.input_ids.dim() != 1 or batch.position_ids.shape != batch.input_ids.shape:
        raise ValueError(f"forward_hidden expects a PackedBatch with 1-D input_ids/position_ids (N,), got "
                         f"{tuple(batch.input_ids.shape)}/{tuple(batch.position_ids.shape)}; for padded "
                         "(B, T) inputs use padded_forward_hidden")
    if batch.cu_seqlens.dtype != torch.int32:
        raise ValueError(f"PackedBatch.cu_seqlens must be int32 (varlen kernels), got {batch.cu_seqlens.dtype}")
    hf = unwrap_model(model)
    backend = ensure_packed_attention(hf)
    meta = build_varlen_meta(batch, backend, sliding_window=sliding_window_of(hf.config),
                             needs_grad=torch.is_grad_enabled())
    kwargs = {"position_ids": batch.position_ids.unsqueeze(0), "use_cache": False, META_KWARG: meta}
    input_ids = batch.input_ids.unsqueeze(0)
    if _is_deepspeed_engine(model):
        keep = torch.empty(0, dtype=torch.long, device=input_ids.device)
        out = model(input_ids=input_ids, logits_to_keep=keep, output_hidden_states=True, **kwargs)
        hidden = out.hidden_states[-1]
    else:
        hidden = hf.get_decoder()(input_ids=input_ids, **kwargs).last_hidden_state
    return hidden.squeeze(0)


def _zero3_partitioned(p) -> bool:
    if not hasattr(p, "ds_id"):
        return False
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    return p.ds_status != ZeroParamStatus.AVAILABLE


def _release_restored(param) -> None:
    """Post-accumulate hook: drop the storage :class:`_GatheredHead` lent back for the backward."""
    full = getattr(param, "_zephyr_restored", None)
    if full is None:
        return
    param._zephyr_restored = None
    # only if DeepSpeed has not re-gathered the parameter meanwhile (tied embedding backward)
    if param.data.data_ptr() == full.data_ptr():
        param.data = torch.empty(0, dtype=param.dtype, device=param.device)


class _GatheredHead(torch.autograd.Function):
    """Identity on a ZeRO-3 parameter that was gathered for this forward only.

    DeepSpeed re-partitions on leaving ``GatheredParameters`` by swapping ``param.data`` for an
    empty tensor.  Two things would then break in the backward: a kernel that saved the parameter
    would read a 0-element shard, and ``AccumulateGrad`` would try to lay the ``(V, D)`` gradient
    out like the now 0-element parameter.  The output here is a plain alias of the gathered storage
    (kept alive for the kernel), and the backward lends that storage back to ``param.data`` just
    for the accumulation; ZeRO-3's post-accumulate hook then reduce-scatters the gradient as for
    any other parameter, and our own hook (registered after DeepSpeed's) drops the storage again.
    """

    @staticmethod
    def forward(ctx, param, full):
        ctx.param, ctx.full = param, full
        return full.view_as(full)

    @staticmethod
    def backward(ctx, grad):
        param = ctx.param
        if param.data.shape != ctx.full.shape:
            param.data = ctx.full
            param._zephyr_restored = ctx.full
            if not getattr(param, "_zephyr_release_hook", False):
                param.register_post_accumulate_grad_hook(_release_restored)
                param._zephyr_release_hook = True
        return grad, None


@contextlib.contextmanager
def lm_head_weight(model):
    """Yield the LM-head weight ``(V, D)`` (tied or untied), gathered under ZeRO-3 when partitioned.

    Use the yielded tensor for the whole loss computation inside the ``with`` block; its gradient
    reaches the real parameter (see :class:`_GatheredHead` for how that works under ZeRO-3, where
    the weight is all-gathered with ``GatheredParameters(modifier_rank=None)`` only if it is
    partitioned and re-partitioned on exit).
    """
    hf = unwrap_model(model)
    head = hf.get_output_embeddings()
    if head is None or getattr(head, "weight", None) is None:
        raise ValueError(f"{type(hf).__name__} has no output embedding (lm_head) weight")
    if getattr(head, "bias", None) is not None:
        raise NotImplementedError("lm_head with a bias is not supported (no supported model family has one)")
    weight = head.weight
    if not _zero3_partitioned(weight):
        yield weight
        return
    from deepspeed.runtime.zero.partition_parameters import GatheredParameters

    with GatheredParameters([weight], modifier_rank=None):
        full = weight.data
        yield _GatheredHead.apply(weight, full) if weight.requires_grad and torch.is_grad_enabled() else full


def packed_logps(model, batch: PackedBatch, impl: str = "auto"):
    """Per-token and per-segment log-probs of a packed batch, logits-free.

    ``log p(labels[t] | tokens <= t)`` from :func:`forward_hidden` and the LM head through
    ``zephyr_kernels.linear_logprobs`` (fp32 accumulation, ``(N, V)`` logits never stored), with the
    model's final-logit soft-capping (:func:`head_transform`).

    Returns:
        ``token_logps: (M,) fp32`` (0 where ``labels == -100``) and ``segment_logps: (S,) fp32``
        (sum over each loss segment; DPO: ``2i`` = pair ``i`` chosen, ``2i+1`` = rejected).
        ``M = N`` except in the prefix-shared layout, where the ``P`` extra predictions of
        :func:`~zephyr_fast.data.batch.loss_inputs` are appended.
    """
    hidden = forward_hidden(model, batch)
    rows, labels, segment_ids = loss_inputs(hidden, batch)
    with lm_head_weight(model) as weight:
        return linear_logprobs(rows, weight, labels, segment_ids=segment_ids,
                               num_segments=batch.num_segments, impl=impl, **head_transform(model))


def padded_forward_hidden(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Baseline: final hidden states of a right- or left-padded batch with stock SDPA attention.

    Args:
        input_ids: ``(B, T) int64``; attention_mask: ``(B, T)`` 1 for real tokens, 0 for padding.
    Returns:
        ``hidden: (B, T, D)`` (rows at padded positions are meaningless).

    For packed-vs-padded comparisons (benchmarks) and TRL-style reference computations.
    """
    hf = unwrap_model(model)
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)
    with attention_implementation(hf, "sdpa"):
        out = hf.get_decoder()(input_ids=input_ids, attention_mask=attention_mask,
                               position_ids=position_ids, use_cache=False)
    return out.last_hidden_state
