"""Build or load a causal LM of a supported family wired for packed, logits-free training.

``load_model`` returns a stock ``transformers`` ``*ForCausalLM`` (so ``save_pretrained``, PEFT and
DeepSpeed treat it as usual) whose attention implementation is the packed varlen function
registered by :mod:`zephyr_fast.model.attention`.

Supported families (:data:`SUPPORTED_MODEL_TYPES`): the transformers implementations that route
attention through ``AttentionInterface`` and are tested here packed == unpacked on CPU with tiny
configs (``tests/model/test_families.py``): Mistral, Llama (incl. Llama 3 RoPE scaling, SmolLM 1/2),
Qwen2, Qwen3 (q/k-norm), Gemma, Gemma 2 (attention and final-logit soft-capping,
``query_pre_attn_scalar``, alternating sliding layers), Gemma 3 text (q/k-norm, local RoPE),
Phi-3, SmolLM3 (NoPE layers), StarCoder2, Mixtral (MoE, without the router auxiliary loss).
:func:`check_supported` refuses anything else in one line, from a config or a model type, before
any data work.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import os
from typing import Optional, Union

import torch

from zephyr_fast.config.keys import did_you_mean
from zephyr_fast.data.chat import ensure_hub_reachable
from zephyr_fast.fileio import first_line

from .attention import BACKENDS, register_varlen_attention

logger = logging.getLogger(__name__)

SUPPORTED_MODEL_TYPES = ("mistral", "llama", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3",
                         "smollm3", "starcoder2", "mixtral")
_HINTS = {  # one extra clause for model types people are likely to try
    "gemma3": "a multimodal Gemma 3 checkpoint; use a text-only one (model_type 'gemma3_text', e.g. "
              "google/gemma-3-1b-pt)",
}
# tiny_config(arch): config class and family defaults that make a small model of the real architecture
_TINY = {
    "mistral": ("MistralConfig", {}),
    "llama": ("LlamaConfig", {}),
    "llama3": ("LlamaConfig", {"rope_parameters": {
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}),
    "smollm": ("LlamaConfig", {"tie_word_embeddings": True}),  # SmolLM 1/2 are tied Llamas
    "qwen2": ("Qwen2Config", {}),
    "qwen3": ("Qwen3Config", {"head_dim": None}),
    "gemma": ("GemmaConfig", {"head_dim": None}),
    "gemma2": ("Gemma2Config", {"head_dim": None, "query_pre_attn_scalar": None}),
    "gemma3_text": ("Gemma3TextConfig", {"head_dim": None, "query_pre_attn_scalar": None}),
    "phi3": ("Phi3Config", {}),
    "smollm3": ("SmolLM3Config", {}),
    "starcoder2": ("Starcoder2Config", {}),
    "mixtral": ("MixtralConfig", {"num_local_experts": 4, "num_experts_per_tok": 2}),
}
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}
# transformers keeps only a weakref to the HfDeepSpeedConfig that switches on zero.Init; keep it alive.
_LIVE_DS_CONFIGS: list = []


def tiny_config(arch: str = "mistral", vocab_size: int = 32000, hidden_size: int = 256,
                num_hidden_layers: int = 4, num_attention_heads: int = 4, num_key_value_heads: int = 2,
                intermediate_size: Optional[int] = None, max_position_embeddings: int = 4096,
                tie_word_embeddings: Optional[bool] = None, **overrides):
    """A small random-init config of the real architecture (tests, demo, CPU benchmarks).

    ``arch``: a supported model type, or ``"llama3"`` (Llama with Llama 3 RoPE scaling) /
    ``"smollm"`` (tied-embedding Llama, SmolLM 1/2).  Built locally, nothing is downloaded.
    GQA is on by default (``num_key_value_heads < num_attention_heads``) like Mistral-7B;
    ``head_dim = hidden_size // num_attention_heads`` and Gemma's ``query_pre_attn_scalar = head_dim``
    unless given; ``tie_word_embeddings=None`` keeps the family's default (tied for Gemma, SmolLM,
    StarCoder2).  Extra keywords go to the config class (e.g. ``sliding_window=64``,
    ``layer_types=[...]``, ``final_logit_softcapping=30.0``).
    """
    import transformers

    if arch not in _TINY:
        raise ValueError(f"tiny_config: arch must be one of {sorted(_TINY)}, got {arch!r}")
    class_name, family = _TINY[arch]
    head_dim = hidden_size // num_attention_heads
    kw = {k: head_dim if v is None else v for k, v in family.items()}
    if tie_word_embeddings is not None:
        kw["tie_word_embeddings"] = tie_word_embeddings
    kw.update(overrides)
    return getattr(transformers, class_name)(
        vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads, num_key_value_heads=num_key_value_heads,
        intermediate_size=intermediate_size or 4 * hidden_size,
        max_position_embeddings=max_position_embeddings, bos_token_id=1, eos_token_id=2, pad_token_id=None, **kw)


def _model_type_of(config_or_model_type) -> tuple:
    """``(model_type, config or None)`` from a config, a config dict, a model type or a checkpoint."""
    if isinstance(config_or_model_type, dict):
        return config_or_model_type.get("model_type"), None
    if not isinstance(config_or_model_type, (str, os.PathLike)):
        return getattr(config_or_model_type, "model_type", None), config_or_model_type
    from transformers import CONFIG_MAPPING, AutoConfig

    name = os.fspath(config_or_model_type)
    if name in CONFIG_MAPPING and not os.path.isdir(name):
        return name, None
    try:
        if not os.path.isdir(name):
            ensure_hub_reachable(name, what="model")  # offline: one line in < 2 s, not ~25 s of retries
        config = AutoConfig.from_pretrained(name, trust_remote_code=False)
    except (OSError, ValueError) as e:  # not found / unreachable / needs remote code: one line, not a traceback
        raise ValueError(f"cannot read the config of {name!r} to check its model type: {first_line(e)}") from None
    return config.model_type, config


def check_supported(config_or_model_type) -> str:
    """Refuse, in one line, a model zephyr_fast cannot train exactly; return its model type.

    Args:
        config_or_model_type: a ``transformers`` config, its ``config.json`` dict, a model type
            (``"mistral"``) or a checkpoint (hub id / local dir: only its ``config.json`` is read,
            never remote code) — cheap enough to call before any data is loaded.
    Raises:
        ValueError: unsupported model type, or a config feature the packed path cannot honour
            (bidirectional attention, Mixtral's router auxiliary loss).
    """
    model_type, config = _model_type_of(config_or_model_type)
    if model_type not in SUPPORTED_MODEL_TYPES:
        hint = f" ({_HINTS[model_type]})" if model_type in _HINTS else ""
        raise ValueError(f"model_type={model_type!r} is not supported by zephyr_fast{hint}; supported: "
                         f"{', '.join(SUPPORTED_MODEL_TYPES)}")
    if config is not None and getattr(config, "use_bidirectional_attention", False):
        raise ValueError(f"model_type={model_type!r} with use_bidirectional_attention=True is not supported: "
                         "zephyr_fast trains causal LMs only")
    if config is not None and getattr(config, "output_router_logits", False):
        raise ValueError(f"model_type={model_type!r} with output_router_logits=True: the router auxiliary loss is not "
                         "implemented on the packed path; set output_router_logits to false")
    return model_type


def resolve_dtype(dtype: Union[str, torch.dtype]) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)} or a torch.dtype, got {dtype!r}")
    return _DTYPES[dtype]


def _resolve_attn(attn_impl: str, dtype: torch.dtype, config) -> str:
    if attn_impl == "auto" or attn_impl in BACKENDS:
        from transformers import AutoModelForCausalLM

        model_class = AutoModelForCausalLM._model_mapping.get(type(config), None)
        return register_varlen_attention(attn_impl, dtype=dtype, model_class=model_class)
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
               gradient_checkpointing: bool = False, liger_ops: bool = False,
               gradient_checkpointing_kwargs: Optional[dict] = None, quantization_config=None, device_map=None,
               revision: Optional[str] = None):
    """Load a checkpoint of a supported family (hub id or local dir) or build one from ``config``.

    Args:
        name_or_path: hub id or local directory of a ``*ForCausalLM`` checkpoint (safetensors).
        config: a config of a supported family (e.g. :func:`tiny_config`) for a random-init model;
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
        gradient_checkpointing: activation checkpointing of every decoder layer (non-reentrant by default).
        liger_ops: Liger-Kernel RMSNorm/SwiGLU/RoPE (CUDA only; Mistral/Llama only; never Liger's loss).
        gradient_checkpointing_kwargs: keywords for ``torch.utils.checkpoint.checkpoint`` over
            ``{"use_reentrant": False}`` (the recipes' ``gradient_checkpointing_kwargs``).
        quantization_config: a ``transformers.BitsAndBytesConfig`` (QLoRA; a checkpoint only, CUDA),
            loaded with ``device_map`` (e.g. ``{"": device}``).
        revision: the hub revision (branch, tag or commit) of ``name_or_path`` -- the recipe's
            ``model_revision``, the same one the reference cache fingerprints; None: ``main``.
    Returns:
        the ``transformers`` causal LM, in train mode.
    """
    from transformers import AutoModelForCausalLM

    config = _checked_config(name_or_path, config, trust_remote_code, liger_ops, quantization_config, revision)
    torch_dtype = resolve_dtype(dtype)
    attn_name = _resolve_attn(attn_impl, torch_dtype, config)
    if zero3 is not None:
        from transformers.integrations import HfDeepSpeedConfig

        ds_config = HfDeepSpeedConfig(_check_zero3(zero3))
        _LIVE_DS_CONFIGS.append(ds_config)
    if name_or_path is not None:
        quant = {} if quantization_config is None else {"quantization_config": quantization_config,
                                                         "device_map": device_map}
        model = AutoModelForCausalLM.from_pretrained(
            name_or_path, config=config, dtype=torch_dtype, attn_implementation=attn_name, revision=revision,
            trust_remote_code=False, use_safetensors=True, **quant)
    else:
        model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype, attn_implementation=attn_name,
                                                 trust_remote_code=False)
    if zero3 is not None:
        model._zephyr_ds_config = ds_config  # tie the config's lifetime to the model too

    if gradient_checkpointing:
        kwargs = {"use_reentrant": False, **(gradient_checkpointing_kwargs or {})}
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    if liger_ops:
        _apply_liger(model)
    model.train()
    return model


def _checked_config(name_or_path, config, trust_remote_code: bool, liger_ops: bool, quantization_config=None,
                    revision: Optional[str] = None):
    """The model config (read from the checkpoint when not given), refused in one line when the
    arguments, the family or the Liger request cannot be honoured."""
    from transformers import AutoConfig

    if (name_or_path is None) == (config is None):
        raise ValueError("load_model: pass exactly one of name_or_path or config")
    if quantization_config is not None and name_or_path is None:
        raise ValueError("load_model: quantization_config needs a checkpoint (name_or_path), not a random init")
    if trust_remote_code:
        raise ValueError("load_model: trust_remote_code=True is refused; zephyr_fast never executes code "
                         "from a checkpoint (every supported family is built into transformers)")
    if config is None:
        if not os.path.isdir(name_or_path):
            ensure_hub_reachable(name_or_path, what="model")
        config = AutoConfig.from_pretrained(name_or_path, revision=revision, trust_remote_code=False)
    check_supported(config)
    if liger_ops and config.model_type not in _LIGER_PATCHES:
        raise ValueError(f"liger_ops=True is wired for {sorted(_LIGER_PATCHES)} only, not {config.model_type!r}; "
                         "set liger_ops: false")
    if liger_ops:
        _check_liger()
    return config


def _check_liger() -> None:
    if not torch.cuda.is_available():
        raise RuntimeError("liger_ops=True needs a CUDA device (Liger-Kernel's Triton kernels); "
                           "set liger_ops: false for CPU runs")
    try:
        import liger_kernel.transformers  # noqa: F401
    except ImportError as e:
        raise ImportError("liger_ops=True needs liger-kernel (pip install 'liger-kernel>=0.5')") from e


_LIGER_PATCHES = {"mistral": "Mistral", "llama": "Llama"}  # model type → transformers class prefix


def _apply_liger(model) -> None:
    import importlib

    import liger_kernel.transformers as liger

    arch = model.config.model_type
    patch = getattr(liger, f"apply_liger_kernel_to_{arch}")
    module = importlib.import_module(f"transformers.models.{arch}.modeling_{arch}")
    prefix = _LIGER_PATCHES[arch]
    classes = {name: getattr(module, name) for name in (f"{prefix}RMSNorm", f"{prefix}MLP")}
    # Our fused kernels own the loss: Liger's (fused linear) cross-entropy stays off.
    patch(rope=True, rms_norm=True, swiglu=True, cross_entropy=False, fused_linear_cross_entropy=False,
          model=model)
    # Liger also swaps the module-level classes, which would silently turn every model built later
    # in this process into a Liger one; this instance is already patched, so put them back.  RoPE
    # stays patched process-wide: the attention forward looks the function up at module level.
    for name, cls in classes.items():
        setattr(module, name, cls)


def _model_init_keys(cls) -> set:
    """The keys a random init reads: tiny_config's own and the fields of the arch's config class."""
    own = set(inspect.signature(tiny_config).parameters) - {"overrides"}
    fields = ({f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls)
              else set(inspect.signature(cls.__init__).parameters))
    return own | fields | set(getattr(cls, "attribute_map", {}))


def check_model_init(init: dict) -> None:
    """A recipe's ``model_init``: a known ``arch``, and only keys its config class reads
    (``ValueError("model_init: ...")`` otherwise).

    transformers keeps an unknown keyword (a typo such as ``hiden_size``) as an attribute nothing
    reads, so the run would train a different model than the recipe says. A legacy key the class
    converts (``rope_theta`` -> ``rope_parameters``) is not left behind, and is accepted.
    """
    arch = init.get("arch", "mistral")
    if arch not in _TINY:
        raise ValueError(f"model_init: arch must be one of {tuple(sorted(_TINY))}, got {arch!r}"
                         f"{did_you_mean(str(arch), _TINY)}")
    class_name = _TINY[arch][0]
    try:
        built = tiny_config(**init)
    except Exception as e:  # noqa: BLE001 - the config class's own validation, whatever its type
        raise ValueError(f"model_init: {class_name} refuses it: {first_line(e)}") from None
    known = _model_init_keys(type(built))
    for key in init:
        if key not in known and key in vars(built):
            raise ValueError(f"model_init: {key!r} is not a {class_name} key (arch {arch!r}): nothing would read it"
                             f"{did_you_mean(key, known)}")
