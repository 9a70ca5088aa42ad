"""Varlen attention for packed batches, registered with transformers' ``AttentionInterface``.

The stock Mistral/Llama modules stay untouched: they call whatever function
``config._attn_implementation`` names, passing ``query: (1, H, N, Dh)``, ``key/value: (1, Hkv, N, Dh)``
and every extra keyword of ``model.model(...)``.  :func:`forward_hidden` passes one extra keyword,
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

Sliding window (Mistral ``sliding_window``, query ``q`` sees key ``k`` iff ``0 <= q - k < W``, the
same rule as ``transformers.masking_utils.sliding_window_overlay``) is honoured by every backend
except ``torch_varlen`` on torch 2.10 (no ``window_size`` argument), which raises when the window
would bind.

No dense ``(N, N)`` mask is ever built by transformers: the registered name has no
``AttentionMaskInterface`` entry, so ``create_causal_mask`` returns ``None`` at once — which also
skips its packed-sequence detection (a host sync per forward).
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import inspect
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

BACKENDS = ("flash_attn", "torch_varlen", "sdpa_segments", "flex")
# Registered names.  None may contain "flash": transformers treats any such name as a flash-attention
# request and tries to import it as a kernel (``is_flash_attention_requested`` is a substring test).
_NAMES = {"flash_attn": "zephyr_fa_varlen", "torch_varlen": "zephyr_torch_varlen",
          "sdpa_segments": "zephyr_sdpa_segments", "flex": "zephyr_flex"}
_BACKEND_OF = {v: k for k, v in _NAMES.items()}
META_KWARG = "zephyr_varlen"


@dataclass
class VarlenMeta:
    """Per-batch attention metadata, shared by every layer of one forward.

    Attributes:
        backend: one of :data:`BACKENDS` actually used for this batch.
        cu_seqlens: ``(S+1,) int32`` on the batch device.
        max_seqlen: longest segment (Python int).
        sliding_window: ``W`` or ``None`` (only set when it binds: ``W < max_seqlen``).
        bounds: host-side ``[(start, end), ...]`` per segment (``sdpa_segments`` only).
        masks: per-segment ``(L, L)`` bool masks or ``None`` for plain causal (``sdpa_segments``).
        block_mask: FlexAttention ``BlockMask`` (``flex`` only).
    """

    backend: str
    cu_seqlens: torch.Tensor
    max_seqlen: int
    sliding_window: Optional[int] = None
    bounds: Optional[list] = None
    masks: Optional[list] = None
    block_mask: object = None


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
                              dtype: Optional[torch.dtype] = None) -> str:
    """Register the packed-attention function for ``backend`` and return its implementation name.

    Use the name as ``attn_implementation`` (``from_pretrained``/``from_config``) or with
    ``model.set_attn_implementation(name)``.  Registering twice is harmless.
    """
    from transformers import AttentionInterface

    name = implementation_name(resolve_backend(backend, device, dtype))
    AttentionInterface.register(name, _packed_attention)
    return name


def implementation_name(backend: str) -> str:
    """The ``attn_implementation`` name under which ``backend`` is registered."""
    if backend not in _NAMES:
        raise ValueError(f"unknown attention backend {backend!r}; expected one of {BACKENDS}")
    return _NAMES[backend]


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
                      sliding_window=window)
    n = batch.num_tokens
    if backend == "sdpa_segments":
        # One host read of the boundaries per batch (free on CPU; this backend is the CPU path).
        cu = batch.cu_seqlens.tolist()
        meta.bounds = list(zip(cu[:-1], cu[1:]))
        masks = []
        for a, b in meta.bounds:
            part = batch.part_ids[a:b] if prefix_shared else None
            if part is None and (window is None or b - a <= window):
                masks.append(None)  # plain causal: let SDPA use is_causal
            else:
                masks.append(_segment_mask(batch.position_ids[a:b], part, window))
        meta.masks = masks
    elif backend == "flex":
        meta.block_mask = _flex_block_mask(batch, window, n, device)
    return meta


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


def _packed_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                      sliding_window=None, **kwargs):
    """transformers attention interface: ``query (1, H, N, Dh)`` → ``(1, N, H, Dh)``, no weights."""
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
    return _IMPLS[meta.backend](query, key, value, meta, scaling, dropout), None


def _flash_attn(query, key, value, meta, scaling, dropout):
    from flash_attn import flash_attn_varlen_func

    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # (N, H, Dh), last dim contiguous
    window = (meta.sliding_window - 1, 0) if meta.sliding_window is not None else (-1, -1)
    out = flash_attn_varlen_func(q, k, v, meta.cu_seqlens, meta.cu_seqlens, meta.max_seqlen, meta.max_seqlen,
                                 dropout_p=dropout, softmax_scale=scaling, causal=True, window_size=window)
    return out.unsqueeze(0)


@functools.lru_cache(maxsize=1)
def _varlen_params():
    from torch.nn.attention.varlen import varlen_attn

    return frozenset(inspect.signature(varlen_attn).parameters)


def _torch_varlen(query, key, value, meta, scaling, dropout):
    from torch.nn.attention.varlen import varlen_attn

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
        kwargs["window_size"] = (meta.sliding_window - 1 if meta.sliding_window else -1, 0)
    else:  # torch 2.10
        kwargs["is_causal"] = True
    seq = meta.cu_seqlens
    out = varlen_attn(q, k, v, seq, seq, meta.max_seqlen, meta.max_seqlen, **kwargs)
    return out.unsqueeze(0)


def _sdpa_segments(query, key, value, meta, scaling, dropout):
    gqa = query.shape[1] != key.shape[1]
    # split, not slicing: the backward of S slices zero-fills S full-size gradients; split's
    # backward is one concatenation.  Concatenating (1, L, H, Dh) pieces along the token axis
    # yields the (1, N, H, Dh) layout transformers reshapes next without another copy.
    lengths = [b - a for a, b in meta.bounds]
    outs = [
        F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=mask is None,
                                       scale=scaling, enable_gqa=gqa).transpose(1, 2)
        for q, k, v, mask in zip(query.split(lengths, 2), key.split(lengths, 2), value.split(lengths, 2),
                                 meta.masks)
    ]
    return torch.cat(outs, dim=1)


@functools.lru_cache(maxsize=1)
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    # FlexAttention only runs fused when compiled (eager falls back to a dense O(N^2) loop).
    return torch.compile(flex_attention)


def _flex(query, key, value, meta, scaling, dropout):
    gqa = query.shape[1] != key.shape[1]
    out = _compiled_flex()(query, key, value, block_mask=meta.block_mask, scale=scaling, enable_gqa=gqa)
    return out.transpose(1, 2)


_IMPLS = {
    "flash_attn": _flash_attn,
    "torch_varlen": _torch_varlen,
    "sdpa_segments": _sdpa_segments,
    "flex": _flex,
}
