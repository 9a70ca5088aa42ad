"""Model path: transformers Mistral/Llama bodies with varlen attention, logits-free forward.

* :func:`load_model`, :func:`tiny_config` — build/load the model (ZeRO-3 aware).
* :func:`register_varlen_attention` — the packed attention backends (``attention.py``).
* :func:`forward_hidden`, :func:`lm_head_weight`, :func:`packed_logps` — hidden states, never logits.
* :func:`generate` — chat-template generation with the stock HF ``generate``.
"""

from .attention import BACKENDS, register_varlen_attention
from .forward import forward_hidden, lm_head_weight, packed_logps, padded_forward_hidden, unwrap_model
from .generate import generate
from .load import load_model, tiny_config

__all__ = [
    "BACKENDS",
    "forward_hidden",
    "generate",
    "lm_head_weight",
    "load_model",
    "packed_logps",
    "padded_forward_hidden",
    "register_varlen_attention",
    "tiny_config",
    "unwrap_model",
]
