"""One dispatch point: ``impl = "auto" | "triton" | "triton_tiled" | "torch"`` → the backend that runs.

* ``"torch"`` — :mod:`zephyr_kernels.torch_chunked`, anywhere.
* ``"triton"`` — :mod:`zephyr_kernels.triton_chunked`: cuBLAS GEMMs over row / vocab chunks with
  fused Triton epilogues in a bounded workspace (the fast CUDA path: ~550 TFLOP/s-equivalent on
  an H200 for cross-entropy at V=32000, against 34 for the tiled kernels).
* ``"triton_tiled"`` — :mod:`zephyr_kernels.triton_tiled`: fully tiled kernels, no workspace and
  no host sync, but a backward bound by fp32 atomics.
* Both Triton backends run on CUDA tensors, or on CPU tensors when ``TRITON_INTERPRET=1`` (tests).
  An explicit choice that cannot run raises instead of silently falling back.
* ``"auto"`` — ``"triton"`` for CUDA tensors, the torch path otherwise; the first fallback of each
  kind is reported once through :mod:`warnings`.

The decision depends only on ``(impl, device type)`` and is cached, so it is made once.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import os
import warnings

import torch

from zephyr_kernels import torch_chunked

IMPLS = ("auto", "triton", "triton_tiled", "torch")
# Cut Cross-Entropy's impl names (its ``LinearCrossEntropyImpl``) → the zephyr impl that serves them.
# Every CCE preset differs from plain "cce" only in accumulation dtype and gradient filtering; zephyr
# always accumulates in fp32 and filters only below rounding, so they all run the fused default.
# CCE's "torch_compile" materialises the logits in PyTorch: its counterpart is the plain torch path.
CCE_IMPLS = {
    "cce": "auto", "cce_exact": "auto", "cce_kahan_full_c": "auto", "cce_kahan_full_e": "auto",
    "cce_kahan_full_c_full_e": "auto", "cce_kahan_full": "auto", "torch_compile": "torch",
}
_AUTOCAST_DEVICE_TYPES = ("cpu", "cuda")
_TRITON_MODULES = {"triton": "zephyr_kernels.triton_chunked", "triton_tiled": "zephyr_kernels.triton_tiled"}


@functools.lru_cache(maxsize=None)
def _triton_module(impl: str = "triton"):
    """The Triton backend module for ``impl``, or the reason it cannot be imported."""
    try:
        return importlib.import_module(_TRITON_MODULES[impl]), None
    except Exception as exc:  # ImportError, or triton failing to initialise its backend
        return None, f"{type(exc).__name__}: {exc}"


def triton_unavailable_reason(device: torch.device, impl: str = "triton"):
    """None when the ``impl`` Triton backend can run on ``device``, else a human-readable reason."""
    mod, err = _triton_module(impl)
    if mod is None:
        return f"Triton is not importable ({err})"
    interp = os.environ.get("TRITON_INTERPRET", "0") == "1"
    if device.type == "cuda":
        if interp:
            return "TRITON_INTERPRET=1 is set; the interpreter cannot run on CUDA tensors"
        return None
    if device.type == "cpu":
        if not interp:
            return "CPU tensors need TRITON_INTERPRET=1 (set before triton is imported) to run Triton"
        # kernels decorated before the variable was set are compiled kernels, not interpreted ones
        if type(mod.tanh).__name__ != "InterpretedFunction":
            return "TRITON_INTERPRET=1 was set after zephyr_kernels' Triton kernels were imported"
        return None
    return f"no Triton backend for device type {device.type!r}"


_warned = set()


@functools.lru_cache(maxsize=None)
def _resolve(impl: str, device_type: str) -> str:
    if impl not in IMPLS:
        raise ValueError(f"zephyr_kernels: impl must be one of {IMPLS}, got {impl!r}")
    if impl == "torch":
        return "torch"
    reason = triton_unavailable_reason(torch.device(device_type), "triton" if impl == "auto" else impl)
    if impl != "auto":
        if reason is not None:
            raise RuntimeError(f"zephyr_kernels: impl={impl!r} cannot run on {device_type} tensors: {reason}")
        return impl
    if device_type == "cuda" and reason is None:
        return "triton"
    if device_type not in _warned:
        _warned.add(device_type)
        why = "" if device_type == "cpu" else f" ({reason})"
        warnings.warn(
            f"zephyr_kernels: impl='auto' uses the chunked PyTorch path for {device_type} tensors{why}",
            stacklevel=4,
        )
    return "torch"


def canonical_impl(impl) -> str:
    """``impl`` as one of :data:`IMPLS`: zephyr's names unchanged, CCE's names (or its
    ``LinearCrossEntropyImpl`` members) mapped through :data:`CCE_IMPLS`; anything else raises."""
    name = impl.name.lower() if hasattr(impl, "name") and not isinstance(impl, str) else impl
    if name in IMPLS:
        return name
    if name in CCE_IMPLS:
        return CCE_IMPLS[name]
    raise ValueError(f"zephyr_kernels: impl must be one of {IMPLS} or a Cut Cross-Entropy impl "
                     f"{tuple(CCE_IMPLS)}, got {impl!r}")


def resolve(impl: str, device: torch.device) -> str:
    """``"triton"``, ``"triton_tiled"`` or ``"torch"`` for tensors on ``device`` (raises for an
    impossible explicit choice)."""
    return _resolve(impl, torch.device(device).type)


def backend(impl: str, device: torch.device):
    """The module implementing ``stats/grads/fused`` for the resolved ``impl``."""
    name = resolve(impl, device)
    if name in _TRITON_MODULES:
        return _triton_module(name)[0]
    return torch_chunked


def autocast_inputs(*tensors):
    """The floating inputs as ``torch.autocast`` would hand them to ``F.linear``: cast to the autocast
    dtype of their device type when autocast is on there (so an fp32 head under ``bf16`` autocast runs
    in bf16 and its fp32 parameters get fp32 gradients through the cast); unchanged otherwise.
    The autograd Functions then run under :func:`autocast_off` (they pick their own accumulation dtypes)."""
    ref = next((t for t in tensors if t is not None), None)
    if ref is None or not torch.is_autocast_enabled(ref.device.type):
        return tensors
    dtype = torch.get_autocast_dtype(ref.device.type)
    return tuple(t.to(dtype) if t is not None and t.is_floating_point() else t for t in tensors)


def autocast_off(fn):
    """Decorator for the kernels' autograd ``forward`` / ``backward``: run with autocast off on every
    device type where it is on (the kernels pick their own accumulation dtypes; a backward called inside
    an autocast region would otherwise run their GEMMs in the autocast dtype)."""

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with contextlib.ExitStack() as stack:
            for device_type in _AUTOCAST_DEVICE_TYPES:
                if torch.is_autocast_enabled(device_type):
                    stack.enter_context(torch.autocast(device_type, enabled=False))
            return fn(*args, **kwargs)

    return wrapped


def check_inputs(hidden, weight, targets, bias=None, segment_ids=None, num_segments=None, ignore_index=-100):
    """Shape/dtype/device checks shared by every public entry point.

    Value-range checks of ``targets`` / ``segment_ids`` run only for CPU tensors, where reading a
    result costs no device sync; on CUDA an out-of-range target gets no target logit and an
    out-of-range segment id is dropped by the kernel's mask.
    """
    if hidden.dim() != 2 or weight.dim() != 2:
        raise ValueError(f"hidden must be (N, D) and weight (V, D); got {tuple(hidden.shape)} and {tuple(weight.shape)}")
    N, D = hidden.shape
    if weight.shape[1] != D:
        raise ValueError(f"hidden (N, D={D}) and weight (V, D={weight.shape[1]}) disagree on D")
    if targets.shape != (N,) or targets.dtype != torch.int64:
        raise ValueError(f"targets must be (N={N},) int64, got {tuple(targets.shape)} {targets.dtype}")
    if not hidden.is_floating_point() or hidden.dtype != weight.dtype:
        raise ValueError(f"hidden and weight must share a float dtype, got {hidden.dtype} and {weight.dtype}")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"bias must be (V={weight.shape[0]},), got {tuple(bias.shape)}")
    devs = {t.device for t in (hidden, weight, targets, bias, segment_ids) if t is not None}
    if len(devs) > 1:
        raise ValueError(f"all inputs must be on one device, got {sorted(map(str, devs))}")
    if segment_ids is not None:
        if segment_ids.shape != (N,) or segment_ids.dtype != torch.int64:
            raise ValueError(f"segment_ids must be (N={N},) int64, got {tuple(segment_ids.shape)} {segment_ids.dtype}")
        if num_segments is not None and num_segments < 0:
            raise ValueError(f"num_segments must be >= 0, got {num_segments}")
    if targets.device.type == "cpu" and N:
        V = weight.shape[0]
        bad = ((targets < 0) | (targets >= V)) & (targets != ignore_index)
        if bool(bad.any()):
            r = int(bad.nonzero()[0, 0])
            raise ValueError(f"targets[{r}] = {int(targets[r])} is outside [0, V={V}) and is not ignore_index={ignore_index}")
        if segment_ids is not None and num_segments is not None:
            bad = (segment_ids < 0) | (segment_ids >= num_segments)
            if bool(bad.any()):
                r = int(bad.nonzero()[0, 0])
                raise ValueError(f"segment_ids[{r}] = {int(segment_ids[r])} is outside [0, num_segments={num_segments})")
