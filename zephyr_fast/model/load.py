"""Build or load a Mistral/Llama causal LM wired for packed, logits-free training.

``load_model`` returns a stock ``transformers`` ``MistralForCausalLM``/``LlamaForCausalLM`` (so
``save_pretrained``, PEFT and DeepSpeed treat it as usual) whose attention implementation is the
packed varlen function registered by :mod:`zephyr_fast.model.attention`.
"""

from __future__ import annotations

import logging
from typing import Optional, Union

import torch

from .attention import BACKENDS, register_varlen_attention

logger = logging.getLogger(__name__)

SUPPORTED_MODEL_TYPES = ("mistral", "llama")
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}
# transformers keeps only a weakref to the HfDeepSpeedConfig that switches on zero.Init; keep it alive.
_LIVE_DS_CONFIGS: list = []


def tiny_config(arch: str = "mistral", vocab_size: int = 32000, hidden_size: int = 256,
                num_hidden_layers: int = 4, num_attention_heads: int = 4, num_key_value_heads: int = 2,
                intermediate_size: Optional[int] = None, max_position_embeddings: int = 4096,
                tie_word_embeddings: bool = False, **overrides):
    """A small random-init config of the real architecture (tests, demo, CPU benchmarks).

    GQA is on by default (``num_key_value_heads < num_attention_heads``) like Mistral-7B. Extra
    keywords go to the config class (e.g. ``sliding_window=64`` for Mistral).
    """
    from transformers import LlamaConfig, MistralConfig

    classes = {"mistral": MistralConfig, "llama": LlamaConfig}
    if arch not in classes:
        raise ValueError(f"tiny_config: arch must be one of {sorted(classes)}, got {arch!r}")
    return classes[arch](
        vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads, num_key_value_heads=num_key_value_heads,
        intermediate_size=intermediate_size or 4 * hidden_size,
        max_position_embeddings=max_position_embeddings, tie_word_embeddings=tie_word_embeddings,
        bos_token_id=1, eos_token_id=2, pad_token_id=None, **overrides)


def resolve_dtype(dtype: Union[str, torch.dtype]) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)} or a torch.dtype, got {dtype!r}")
    return _DTYPES[dtype]


def _resolve_attn(attn_impl: str, dtype: torch.dtype) -> str:
    if attn_impl == "auto" or attn_impl in BACKENDS:
        return register_varlen_attention(attn_impl, dtype=dtype)
    if attn_impl in ("sdpa", "eager"):  # plain transformers attention: padded baselines only
        return attn_impl
    raise ValueError(f"attn_impl must be 'auto', one of {BACKENDS}, 'sdpa' or 'eager', got {attn_impl!r}")


def _check_zero3(zero3) -> dict:
    if not isinstance(zero3, dict):
        raise TypeError(f"zero3 must be a DeepSpeed config dict, got {type(zero3).__name__}")
    stage = zero3.get("zero_optimization", {}).get("stage")
    if stage != 3:
        raise ValueError(f"zero3 config must have zero_optimization.stage == 3, got {stage!r}")
    return zero3


def load_model(name_or_path: Optional[str] = None, *, config=None, dtype="float32", attn_impl: str = "auto",
               trust_remote_code: bool = False, zero3: Optional[dict] = None,
               gradient_checkpointing: bool = False, liger_ops: bool = False):
    """Load a Mistral/Llama checkpoint (hub id or local dir) or build one from ``config``.

    Args:
        name_or_path: hub id or local directory of a ``*ForCausalLM`` checkpoint (safetensors).
        config: a ``MistralConfig``/``LlamaConfig`` (e.g. :func:`tiny_config`) for a random-init model;
            exactly one of ``name_or_path`` / ``config``.
        dtype: parameter dtype, ``"float32"``/``"bfloat16"``/``"float16"`` or a ``torch.dtype``.
        attn_impl: ``"auto"`` or a packed backend (``flash_attn``/``torch_varlen``/``sdpa_segments``/
            ``flex``); ``"sdpa"``/``"eager"`` give plain transformers attention (padded baselines).
            ``"auto"``: flash-attn, else torch varlen, on CUDA with fp16/bf16; else ``sdpa_segments``.
        trust_remote_code: must stay ``False`` — nothing from a checkpoint is executed.
        zero3: a DeepSpeed config dict with ``zero_optimization.stage == 3``: the model is built
            inside ``deepspeed.zero.Init`` (transformers does this while an ``HfDeepSpeedConfig`` is
            alive), so no rank ever holds the full weights; random init is done on rank 0 and
            broadcast, so every rank agrees.
        gradient_checkpointing: non-reentrant activation checkpointing of every decoder layer.
        liger_ops: Liger-Kernel RMSNorm/SwiGLU/RoPE (CUDA only; never Liger's loss).
    Returns:
        the ``transformers`` causal LM, in train mode.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    if (name_or_path is None) == (config is None):
        raise ValueError("load_model: pass exactly one of name_or_path or config")
    if trust_remote_code:
        raise ValueError("load_model: trust_remote_code=True is refused; zephyr_fast never executes code "
                         "from a checkpoint (Mistral and Llama are built into transformers)")
    torch_dtype = resolve_dtype(dtype)
    attn_name = _resolve_attn(attn_impl, torch_dtype)
    if liger_ops:
        _check_liger()
    if config is None:
        config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=False)
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"load_model: {name_or_path or 'config'} has model_type={config.model_type!r}; "
                         f"supported: {SUPPORTED_MODEL_TYPES}")

    if zero3 is not None:
        from transformers.integrations import HfDeepSpeedConfig

        ds_config = HfDeepSpeedConfig(_check_zero3(zero3))
        _LIVE_DS_CONFIGS.append(ds_config)
    if name_or_path is not None:
        model = AutoModelForCausalLM.from_pretrained(
            name_or_path, config=config, dtype=torch_dtype, attn_implementation=attn_name,
            trust_remote_code=False, use_safetensors=True)
    else:
        model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype, attn_implementation=attn_name,
                                                 trust_remote_code=False)
    if zero3 is not None:
        model._zephyr_ds_config = ds_config  # tie the config's lifetime to the model too

    if gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    if liger_ops:
        _apply_liger(model)
    model.train()
    return model


def _check_liger() -> None:
    if not torch.cuda.is_available():
        raise RuntimeError("liger_ops=True needs a CUDA device (Liger-Kernel's Triton kernels); "
                           "set liger_ops: false for CPU runs")
    try:
        import liger_kernel.transformers  # noqa: F401
    except ImportError as e:
        raise ImportError("liger_ops=True needs liger-kernel (pip install 'liger-kernel>=0.5')") from e


def _apply_liger(model) -> None:
    import importlib

    from liger_kernel.transformers import apply_liger_kernel_to_llama, apply_liger_kernel_to_mistral

    arch = model.config.model_type
    patch = {"mistral": apply_liger_kernel_to_mistral, "llama": apply_liger_kernel_to_llama}[arch]
    module = importlib.import_module(f"transformers.models.{arch}.modeling_{arch}")
    prefix = {"mistral": "Mistral", "llama": "Llama"}[arch]
    classes = {name: getattr(module, name) for name in (f"{prefix}RMSNorm", f"{prefix}MLP")}
    # Our fused kernels own the loss: Liger's (fused linear) cross-entropy stays off.
    patch(rope=True, rms_norm=True, swiglu=True, cross_entropy=False, fused_linear_cross_entropy=False,
          model=model)
    # Liger also swaps the module-level classes, which would silently turn every model built later
    # in this process into a Liger one; this instance is already patched, so put them back.  RoPE
    # stays patched process-wide: the attention forward looks the function up at module level.
    for name, cls in classes.items():
        setattr(module, name, cls)
