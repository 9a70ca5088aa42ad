"""Varlen attention for packed batches, registered with transformers' ``AttentionInterface``.

The stock transformers modules (Mistral, Llama, Qwen2/3, Gemma 1/2/3, Phi-3, SmolLM3, StarCoder2,
Mixtral) stay untouched: they call whatever function ``config._attn_implementation`` names, passing
``query: (1, H, N, Dh)``, ``key/value: (1, Hkv, N, Dh)``, the layer's ``scaling``,
``sliding_window`` and (Gemma 2) ``softcap``, and every extra keyword of ``model.model(...)``.  :func:`forward_hidden` passes one extra keyword,
``zephyr_varlen=VarlenMeta``, built once per batch by :func:`build_varlen_meta`, so each layer only
reads precomputed metadata (no host sync, no mask construction per layer).

Backends (picked once, by :func:`resolve_backend`):

* ``flash_attn``    — ``flash_attn.flash_attn_varlen_func`` (CUDA, optional ``[cuda]`` extra).
* ``torch_varlen``  — ``torch.nn.attention.varlen.varlen_attn`` (CUDA; torch >= 2.10).
* ``sdpa_segments`` — exact reference path: one SDPA call per segment (CPU, or anywhere).
* ``flex``          — FlexAttention with a block mask built once per batch.

The prefix-shared DPO layout (``[prompt, chosen, rejected]`` in one segment, rejected never sees
chosen) cannot be expressed by a varlen kernel; it runs on FlexAttention on CUDA, and on CPU on
per-segment SDPA with a dense boolean mask (FlexAttention has no CPU backward in torch 2.13 and
compiles per shape) unless the model's backend is ``flex`` and no gradient is needed.

Every attention keyword a layer passes is honoured or refused, never ignored:

* ``scaling`` (e.g. Gemma's ``query_pre_attn_scalar ** -0.5``): every backend.
* ``sliding_window`` — per layer (Gemma 2/3 and Qwen2 mix sliding and full layers; Mistral, Phi-3,
  StarCoder2, Mixtral pass the config's window to every layer): query ``q`` sees key ``k`` iff
  ``0 <= q - k < W``, the rule of ``transformers.masking_utils.sliding_window_overlay``.  Every
  backend honours it except ``torch_varlen`` on torch 2.10 (no ``window_size``), which raises when
  the window would bind.  Per-window masks are built once per batch and window (lazily).
* ``softcap`` (Gemma 2 attention-logit soft-capping ``c·tanh(s/c)`` before the mask): ``sdpa_segments``
  (explicit per-segment attention), ``flex`` (``score_mod``), ``flash_attn`` (its ``softcap``);
  ``torch_varlen`` refuses it.
* anything else that could change the attention (attention sinks, non-causal attention, an unknown
  keyword) is refused by name; keywords that cannot (``position_ids``, ``use_cache``, ...) pass.

No dense ``(N, N)`` mask is ever built by transformers: the registered name has no
``AttentionMaskInterface`` entry, so ``create_causal_mask`` returns ``None`` at once — which also
skips its packed-sequence detection (a host sync per forward).
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import inspect
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F

from zephyr_fast.config.values import ATTENTION_BACKENDS as BACKENDS  # the recipe's names, defined once

# Registered names.  None may contain "flash": transformers treats any such name as a flash-attention
# request and tries to import it as a kernel (``is_flash_attention_requested`` is a substring test).
_NAMES = {"flash_attn": "zephyr_fa_varlen", "torch_varlen": "zephyr_torch_varlen",
          "sdpa_segments": "zephyr_sdpa_segments", "flex": "zephyr_flex"}
# transformers also treats any name containing "sdpa" as an SDPA request and refuses it for model
# classes without SDPA support (Gemma 2, for its soft-capping): those get this alias of the same backend.
_NO_SDPA_NAME = "zephyr_segments"
_BACKEND_OF = {**{v: k for k, v in _NAMES.items()}, _NO_SDPA_NAME: "sdpa_segments"}
META_KWARG = "zephyr_varlen"


@dataclass
class VarlenMeta:
    """Per-batch attention metadata, shared by every layer of one forward.

    Attributes:
        backend: one of :data:`BACKENDS` actually used for this batch.
        cu_seqlens: ``(S+1,) int32`` on the batch device.
        max_seqlen: longest segment (Python int).
        sliding_window: the pre-built window ``W`` or ``None`` (only set when it binds: ``W < max_seqlen``);
            a layer's own ``sliding_window`` keyword decides what that layer uses (:meth:`binding`).
        bounds: host-side ``[(start, end), ...]`` per segment (``sdpa_segments`` only).
        masks: per-segment ``(L, L)`` bool masks or ``None`` for plain causal, for ``sliding_window``
            (``sdpa_segments``).
        block_mask: FlexAttention ``BlockMask`` for ``sliding_window`` (``flex`` only).
        batch: the ``PackedBatch`` (positions / parts for masks of other windows).
        by_window: ``{window: masks | block_mask}`` built on first use by a layer with that window.
    """

    backend: str
    cu_seqlens: torch.Tensor
    max_seqlen: int
    sliding_window: Optional[int] = None
    bounds: Optional[list] = None
    masks: Optional[list] = None
    block_mask: object = None
    batch: object = None
    by_window: dict = field(default_factory=dict)

    def binding(self, window: Optional[int]) -> Optional[int]:
        """``window`` if it binds for this batch (``W < max_seqlen``), else ``None``."""
        return window if window is not None and window < self.max_seqlen else None

    def masks_for(self, window: Optional[int]) -> list:
        """Per-segment masks (``sdpa_segments``) for a binding ``window`` or ``None``."""
        if window == self.sliding_window and self.masks is not None:
            return self.masks
        if window not in self.by_window:
            self.by_window[window] = _segment_masks(self.batch, self.bounds, window)
        return self.by_window[window]

    def block_mask_for(self, window: Optional[int]):
        """FlexAttention ``BlockMask`` (``flex``) for a binding ``window`` or ``None``."""
        if window == self.sliding_window and self.block_mask is not None:
            return self.block_mask
        if window not in self.by_window:
            self.by_window[window] = _flex_block_mask(self.batch, window, self.batch.num_tokens,
                                                      self.batch.input_ids.device)
        return self.by_window[window]


def flash_attn_available() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def torch_varlen_available() -> bool:
    return importlib.util.find_spec("torch.nn.attention.varlen") is not None


def resolve_backend(backend: str = "auto", device: Optional[torch.device] = None,
                    dtype: Optional[torch.dtype] = None) -> str:
    """Turn ``"auto"`` into a concrete backend for ``device`` (default: CUDA if present) and the
    activation ``dtype`` (the flash kernels take fp16/bf16 only; fp32 gets the exact SDPA path)."""
    if backend != "auto":
        if backend not in BACKENDS:
            raise ValueError(f"attention backend must be 'auto' or one of {BACKENDS}, got {backend!r}")
        if backend == "flash_attn" and not flash_attn_available():
            raise ImportError("attention backend 'flash_attn' requested but flash_attn is not installed "
                              "(pip install 'zephyr_fast[cuda]')")
        if backend == "torch_varlen" and not torch_varlen_available():
            raise ImportError(f"attention backend 'torch_varlen' needs torch >= 2.10, have {torch.__version__}")
        return backend
    on_cuda = torch.cuda.is_available() if device is None else torch.device(device).type == "cuda"
    on_cuda = on_cuda and dtype in (None, torch.float16, torch.bfloat16)
    if on_cuda and flash_attn_available():
        return "flash_attn"
    if on_cuda and torch_varlen_available():
        return "torch_varlen"
    return "sdpa_segments"


def register_varlen_attention(backend: str = "auto", *, device: Optional[torch.device] = None,
                              dtype: Optional[torch.dtype] = None, model_class=None) -> str:
    """Register the packed-attention function for ``backend`` and return its implementation name.

    Use the name as ``attn_implementation`` (``from_pretrained``/``from_config``) or with
    ``model.set_attn_implementation(name)``.  Registering twice is harmless.  Pass the
    ``*ForCausalLM`` class as ``model_class`` so a class without SDPA support gets a name that
    transformers does not mistake for an SDPA request.
    """
    from transformers import AttentionInterface

    name = implementation_name(resolve_backend(backend, device, dtype), model_class)
    AttentionInterface.register(name, _packed_attention)
    return name


def implementation_name(backend: str, model_class=None) -> str:
    """The ``attn_implementation`` name under which ``backend`` is registered (for ``model_class``)."""
    if backend not in _NAMES:
        raise ValueError(f"unknown attention backend {backend!r}; expected one of {BACKENDS}")
    name = _NAMES[backend]
    if "sdpa" in name and model_class is not None and not getattr(model_class, "_supports_sdpa", True):
        return _NO_SDPA_NAME
    return name


def backend_of(attn_implementation: Optional[str]) -> Optional[str]:
    """The zephyr backend behind an ``attn_implementation`` name, or ``None`` for foreign ones."""
    return _BACKEND_OF.get(attn_implementation)


@contextlib.contextmanager
def attention_implementation(model, name: str):
    """Temporarily switch ``model`` (a ``PreTrainedModel``) to another attention implementation."""
    old = model.config._attn_implementation
    if old == name:
        yield model
        return
    model.set_attn_implementation(name)
    try:
        yield model
    finally:
        model.set_attn_implementation(old)


# ---------------------------------------------------------------------------------------------
# per-batch metadata
# ---------------------------------------------------------------------------------------------


def _token_segments(cu_seqlens: torch.Tensor, n: int) -> torch.Tensor:
    """``(N,) int64`` attention-segment index of every token, computed on device (no sync)."""
    idx = torch.arange(n, device=cu_seqlens.device, dtype=cu_seqlens.dtype)
    return torch.searchsorted(cu_seqlens[1:].contiguous(), idx, right=True)


def _segment_mask(pos: torch.Tensor, part: Optional[torch.Tensor], window: Optional[int]) -> torch.Tensor:
    """Dense ``(L, L)`` bool mask of one segment: causal by packed index, prefix-shared, window."""
    n = pos.numel()
    ar = torch.arange(n, device=pos.device)
    allowed = ar[None, :] <= ar[:, None]
    if part is not None:
        allowed = allowed & ~((part[:, None] == 2) & (part[None, :] == 1))
    if window is not None:
        allowed = allowed & ((pos[:, None] - pos[None, :]) < window)
    return allowed


def build_varlen_meta(batch, backend: str, *, sliding_window: Optional[int] = None,
                      needs_grad: bool = True) -> VarlenMeta:
    """Everything the attention layers need for ``batch`` (a ``PackedBatch``), built once.

    Args:
        backend: the model's packed backend (one of :data:`BACKENDS`).
        sliding_window: the model's ``config.sliding_window`` (``None`` = full causal).
        needs_grad: whether a backward will run (FlexAttention has no CPU backward).
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; expected one of {BACKENDS}")
    max_seqlen = int(batch.max_seqlen)
    window = sliding_window if sliding_window is not None and sliding_window < max_seqlen else None
    prefix_shared = batch.layout == "prefix_shared"
    if prefix_shared and batch.part_ids is None:
        raise ValueError("PackedBatch.layout == 'prefix_shared' but part_ids is None")
    device = batch.input_ids.device
    if (backend == "torch_varlen" and window is not None and not prefix_shared
            and "window_size" not in _varlen_params()):
        raise NotImplementedError(
            f"sliding_window={sliding_window} binds (max_seqlen={max_seqlen}) but this torch "
            f"({torch.__version__}) varlen_attn has no window_size; use attn_impl='flash_attn' or "
            "'sdpa_segments', or pack shorter sequences")
    if backend in ("flash_attn", "torch_varlen") and device.type != "cuda" and not prefix_shared:
        raise ValueError(f"attention backend {backend!r} needs CUDA tensors, the batch is on {device}; "
                         "load the model with attn_impl='sdpa_segments' (or 'auto' on this machine)")
    if prefix_shared:
        # varlen kernels cannot express "rejected never sees chosen"; FlexAttention can.  On CPU it
        # has no backward and costs a compile per new shape, so CPU uses exact dense per-segment
        # masks unless the model asked for "flex" and no gradient is needed.
        use_flex = device.type == "cuda" or (backend == "flex" and not needs_grad)
        backend = "flex" if use_flex else "sdpa_segments"
    elif backend == "flex" and device.type != "cuda" and needs_grad:
        backend = "sdpa_segments"
    meta = VarlenMeta(backend=backend, cu_seqlens=batch.cu_seqlens, max_seqlen=max_seqlen,
                      sliding_window=window, batch=batch)
    if backend == "sdpa_segments":
        # One host read of the boundaries per batch (free on CPU; this backend is the CPU path).
        cu = batch.cu_seqlens.tolist()
        meta.bounds = list(zip(cu[:-1], cu[1:]))
        meta.masks = _segment_masks(batch, meta.bounds, window)
    elif backend == "flex":
        meta.block_mask = _flex_block_mask(batch, window, batch.num_tokens, device)
    return meta


def _segment_masks(batch, bounds, window: Optional[int]) -> list:
    """Per-segment ``(L, L)`` bool masks, ``None`` where plain causal (SDPA ``is_causal``)."""
    masks = []
    for a, b in bounds:
        part = batch.part_ids[a:b] if batch.layout == "prefix_shared" else None
        if part is None and (window is None or b - a <= window):
            masks.append(None)
        else:
            masks.append(_segment_mask(batch.position_ids[a:b], part, window))
    return masks


def _flex_block_mask(batch, window, n, device):
    from torch.nn.attention.flex_attention import create_block_mask

    seg = _token_segments(batch.cu_seqlens, n)
    part = batch.part_ids.to(torch.int32) if batch.part_ids is not None else None
    pos = batch.position_ids

    def mask_mod(b, h, q, kv):
        keep = (seg[q] == seg[kv]) & (kv <= q)
        if part is not None:
            keep = keep & ~((part[q] == 2) & (part[kv] == 1))
        if window is not None:
            keep = keep & ((pos[q] - pos[kv]) < window)
        return keep

    return create_block_mask(mask_mod, None, None, n, n, device=str(device))


# ---------------------------------------------------------------------------------------------
# the registered attention function
# ---------------------------------------------------------------------------------------------


# keywords transformers passes along that do not change the attention itself
_INERT_KWARGS = frozenset({META_KWARG, "position_ids", "use_cache", "cache_position", "output_attentions",
                           "output_hidden_states", "return_dict", "logits_to_keep"})


def _check_kwargs(kwargs) -> None:
    if kwargs.get("is_causal", True) is False:
        raise NotImplementedError("zephyr varlen attention is causal only; this layer asked for is_causal=False")
    unknown = sorted(k for k in kwargs if k not in _INERT_KWARGS and k != "is_causal")
    if unknown:
        raise NotImplementedError(
            f"zephyr varlen attention cannot honour the attention keyword(s) {unknown} this model passes "
            "(e.g. attention sinks); refusing rather than ignoring them")


def _packed_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                      sliding_window=None, softcap=None, **kwargs):
    """transformers attention interface: ``query (1, H, N, Dh)`` → ``(1, N, H, Dh)``, no weights.

    ``scaling`` (``None`` = ``Dh**-0.5``), the layer's ``sliding_window`` and ``softcap`` are
    honoured by every backend that can; the others raise (module docstring)."""
    _check_kwargs(kwargs)
    if attention_mask is not None:
        raise NotImplementedError("zephyr varlen attention builds its own masks from the PackedBatch; the model "
                                  f"passed an attention_mask of shape {tuple(attention_mask.shape)}")
    meta = kwargs.get(META_KWARG)
    if meta is None:
        raise RuntimeError(
            "zephyr varlen attention was called without packed metadata: run the model through "
            "zephyr_fast.model.forward_hidden(model, batch), or switch it to 'sdpa' for padded "
            "inputs (zephyr_fast.model.attention.attention_implementation(model, 'sdpa'))")
    if query.shape[0] != 1:
        raise ValueError(f"packed attention expects batch dimension 1, got query {tuple(query.shape)}")
    if meta.backend in ("flash_attn", "torch_varlen") and query.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"attention backend {meta.backend!r} (flash kernels) needs fp16/bf16 activations, got "
                         f"{query.dtype}; load the model with dtype='bfloat16' or attn_impl='sdpa_segments'")
    if dropout and meta.backend in ("torch_varlen", "flex"):
        raise NotImplementedError(f"attention dropout={dropout} is not supported by backend {meta.backend!r}")
    if softcap is not None and meta.backend == "torch_varlen":
        raise NotImplementedError(f"attention softcap={softcap} (Gemma 2) is not supported by backend 'torch_varlen'; "
                                  "use attn_impl='flash_attn', 'flex' or 'sdpa_segments'")
    window = meta.binding(sliding_window)
    return _IMPLS[meta.backend](query, key, value, meta, scaling, dropout, window=window, softcap=softcap), None


_META_WINDOW = object()  # default ``window``: the meta's pre-built ``sliding_window``


def _flash_attn(query, key, value, meta, scaling, dropout, window=_META_WINDOW, softcap=None):
    from flash_attn import flash_attn_varlen_func

    window = meta.sliding_window if window is _META_WINDOW else window
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # (N, H, Dh), last dim contiguous
    extra = {} if softcap is None else {"softcap": softcap}  # flash-attn >= 2.6
    out = flash_attn_varlen_func(q, k, v, meta.cu_seqlens, meta.cu_seqlens, meta.max_seqlen, meta.max_seqlen,
                                 dropout_p=dropout, softmax_scale=scaling, causal=True,
                                 window_size=(window - 1, 0) if window is not None else (-1, -1), **extra)
    return out.unsqueeze(0)


@functools.lru_cache(maxsize=1)
def _varlen_params():
    from torch.nn.attention.varlen import varlen_attn

    return frozenset(inspect.signature(varlen_attn).parameters)


def _torch_varlen(query, key, value, meta, scaling, dropout, window=_META_WINDOW, softcap=None):
    from torch.nn.attention.varlen import varlen_attn

    if softcap is not None:
        raise NotImplementedError("torch varlen_attn has no softcap")
    window = meta.sliding_window if window is _META_WINDOW else window
    params = _varlen_params()
    # (N, H, Dh) packed layout; contiguous because aten's flash forward checks strides strictly
    q, k, v = (t[0].transpose(0, 1).contiguous() for t in (query, key, value))
    kwargs = {}
    if q.shape[1] != k.shape[1]:
        if "enable_gqa" in params:
            kwargs["enable_gqa"] = True
        else:  # older signature: expand the kv heads ourselves
            rep = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    if "scale" in params:
        kwargs["scale"] = scaling
    elif scaling is not None and abs(scaling - q.shape[-1] ** -0.5) > 1e-12:
        raise NotImplementedError("this torch varlen_attn has no scale argument; a non-default scaling is needed")
    if "window_size" in params:  # torch >= 2.11: causal is expressed as a (left, 0) window
        kwargs["window_size"] = (window - 1 if window else -1, 0)
    elif window is not None:
        raise NotImplementedError(f"sliding_window={window} binds but this torch ({torch.__version__}) "
                                  "varlen_attn has no window_size; use attn_impl='flash_attn' or 'sdpa_segments'")
    else:  # torch 2.10
        kwargs["is_causal"] = True
    seq = meta.cu_seqlens
    out = varlen_attn(q, k, v, seq, seq, meta.max_seqlen, meta.max_seqlen, **kwargs)
    return out.unsqueeze(0)


def _softcapped_attention(q, k, v, mask, scale, softcap, dropout):
    """Explicit attention of one segment with logit soft-capping, as transformers' Gemma 2 eager path:
    ``softmax(c·tanh(q kᵀ·scale / c) masked)`` in fp32, ``q (1, H, L, Dh)``, ``k/v (1, Hkv, L, Dh)``."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    scores = torch.matmul(q, k.transpose(-1, -2)) * (q.shape[-1] ** -0.5 if scale is None else scale)
    scores = torch.tanh(scores / softcap) * softcap
    if mask is None:
        L = q.shape[2]
        mask = torch.ones(L, L, dtype=torch.bool, device=q.device).tril()
    probs = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(F.dropout(probs, p=dropout, training=dropout > 0), v)


def _sdpa_segments(query, key, value, meta, scaling, dropout, window=_META_WINDOW, softcap=None):
    gqa = query.shape[1] != key.shape[1]
    masks = meta.masks if window is _META_WINDOW else meta.masks_for(window)
    # split, not slicing: the backward of S slices zero-fills S full-size gradients; split's
    # backward is one concatenation.  Concatenating (1, L, H, Dh) pieces along the token axis
    # yields the (1, N, H, Dh) layout transformers reshapes next without another copy.
    lengths = [b - a for a, b in meta.bounds]
    pieces = zip(query.split(lengths, 2), key.split(lengths, 2), value.split(lengths, 2), masks)
    if softcap is not None:
        outs = [_softcapped_attention(q, k, v, mask, scaling, softcap, dropout).transpose(1, 2)
                for q, k, v, mask in pieces]
    else:
        outs = [F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=mask is None,
                                               scale=scaling, enable_gqa=gqa).transpose(1, 2)
                for q, k, v, mask in pieces]
    return torch.cat(outs, dim=1)


@functools.lru_cache(maxsize=1)
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    # FlexAttention only runs fused when compiled (eager falls back to a dense O(N^2) loop).
    return torch.compile(flex_attention)


def _flex(query, key, value, meta, scaling, dropout, window=_META_WINDOW, softcap=None):
    gqa = query.shape[1] != key.shape[1]
    block_mask = meta.block_mask if window is _META_WINDOW else meta.block_mask_for(window)
    score_mod = None
    if softcap is not None:
        def score_mod(score, b, h, q_idx, kv_idx):
            return torch.tanh(score / softcap) * softcap
    out = _compiled_flex()(query, key, value, score_mod=score_mod, block_mask=block_mask, scale=scaling,
                           enable_gqa=gqa)
    return out.transpose(1, 2)


_IMPLS = {
    "flash_attn": _flash_attn,
    "torch_varlen": _torch_varlen,
    "sdpa_segments": _sdpa_segments,
    "flex": _flex,
}
