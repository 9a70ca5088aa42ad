"""Where ``zephyr-fast generate``'s completions come from: in-process transformers or vLLM for local
pool models, an OpenAI-compatible endpoint (``backend="openai"``) for served ones.

* transformers: any causal LM ``AutoModelForCausalLM`` loads (safetensors, ``trust_remote_code``
  off, SDPA attention), batched with a KV cache through ``zephyr_fast.model.generate`` -- the chat
  template exactly as in training; generation needs none of the packed-training family rules.
* vLLM (CUDA, ``pip install vllm``): ``LLM(model=dir)`` in process, one GPU; for tensor parallelism
  serve the model (``vllm serve --tensor-parallel-size N``) and name the endpoint in the pool.
* openai: the ``openai`` client through :class:`JudgeClient` (retries with backoff, a total deadline
  per request, answers that are not chat completions refused), ``concurrency`` requests in flight;
  the server applies its own chat template.

``dtype="auto"``: bfloat16 on a CUDA device that has it (else float16), float32 on CPU.
"""

from __future__ import annotations

import hashlib
import importlib.util
from typing import Callable

import torch

from ..data.chat import load_tokenizer
from ..model import generate
from ..model.load import resolve_dtype
from .client import JudgeClient
from .pool import Endpoint, is_endpoint

BACKENDS = ("auto", "transformers", "vllm", "openai")


def pick_dtype(dtype: str, device: str) -> str:
    """The dtype name a local pool model runs in (``auto``: bf16 on CUDA, fp32 on CPU)."""
    if dtype != "auto":
        return str(resolve_dtype(dtype)).replace("torch.", "")
    if str(device).startswith("cuda"):
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    return "float32"


def pick_backend(backend: str, pool: dict) -> str:
    """The in-process engine of the local pool models (``openai``: every entry must be an endpoint)."""
    if backend not in BACKENDS:
        raise ValueError(f"generate: unknown backend {backend!r}; expected one of {BACKENDS}")
    if backend == "openai":
        local = sorted(n for n, e in pool.items() if not is_endpoint(e))
        if local:
            raise ValueError(f"generate: --backend openai: pool entry {local[0]!r} is not an endpoint (NAME=URL#MODEL)")
        return "openai"
    has_vllm = importlib.util.find_spec("vllm") is not None and torch.cuda.is_available()
    if backend == "vllm" and not has_vllm:
        raise ValueError("generate: --backend vllm needs the vllm package and a CUDA device")
    return "vllm" if backend == "vllm" or (backend == "auto" and has_vllm) else "transformers"


def load_causal_lm(model_dir: str, dtype: str, device: str):
    """Any causal LM transformers can generate with, in ``dtype``, on ``device``; one line if not."""
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=resolve_dtype(dtype), trust_remote_code=False,
                                                     use_safetensors=True, attn_implementation="sdpa")
    except (ValueError, OSError) as exc:
        raise ValueError(f"generate: {model_dir}: transformers cannot load it as a causal LM "
                         f"({' '.join(str(exc).split())[:200]})") from None
    return model.to(device).eval()


def transformers_backend(model_dir: str, device: str, dtype: str) -> Callable:
    model, tok = load_causal_lm(model_dir, dtype, device), load_tokenizer(model_dir)

    def run(convs, *, max_new_tokens, temperature, top_p, seed, batch_size):
        return generate(model, tok, convs, max_new_tokens=max_new_tokens, do_sample=temperature > 0,
                        temperature=temperature or 1.0, top_p=top_p, seed=seed, batch_size=batch_size)
    return run


def vllm_backend(model_dir: str, device: str, dtype: str) -> Callable:
    from vllm import LLM, SamplingParams  # optional extra: pip install vllm (CUDA)

    llm = LLM(model=model_dir, trust_remote_code=False, dtype=dtype)

    def run(convs, *, max_new_tokens, temperature, top_p, seed, batch_size):
        params = SamplingParams(temperature=temperature, top_p=top_p, max_tokens=max_new_tokens, seed=seed)
        return [o.outputs[0].text for o in llm.chat([list(c) for c in convs], params, use_tqdm=False)]
    return run


def request_seed(seed: int, name: str, prompt_id: str) -> int:
    """The ``seed`` of one served completion (servers that honour it sample reproducibly)."""
    return int(hashlib.sha256(f"{seed}-{name}-{prompt_id}".encode()).hexdigest()[:8], 16)


class ServedModel:
    """One endpoint of the pool: its client and the exact request of each completion."""

    def __init__(self, name: str, endpoint: Endpoint, settings: dict, *, concurrency: int, max_retries: int,
                 timeout: float):
        self.name, self.settings = name, settings
        cfg = endpoint.config(concurrency=concurrency, max_retries=max_retries, timeout=timeout,
                              temperature=settings["temperature"], max_tokens=settings["max_new_tokens"])
        self.client = JudgeClient(cfg, label=f"generate (pool model {name!r})")

    def _sampling(self, prompt_id: str) -> dict:
        return {"top_p": self.settings["top_p"], "seed": request_seed(self.settings["seed"], self.name, prompt_id)}

    def request(self, prompt_id: str, conversation: list) -> dict:
        """What :meth:`complete` sends (its identity: no key, no URL when ``endpoint_id`` is set)."""
        return self.client.request(conversation, sampling=self._sampling(prompt_id))

    def complete(self, prompt_id: str, conversation: list) -> str:
        return self.client.chat(conversation, sampling=self._sampling(prompt_id)).text
