"""Chat generation with a trained model (demo, MT-Bench style evaluation).

Uses the stock Hugging Face ``generate`` with SDPA attention and a KV cache (the packed varlen
attention is a training path: it has no cache), left padding, and stops at ``</s>``.

The prompt is rendered exactly as training renders it: an empty system turn is prepended when the
conversation has none (alignment-handbook's ``auto_insert_empty_system_msg``, on by default in
``DataConfig``), so a Zephyr-template model sees ``<|system|>\n</s>\n<|user|>\n...`` at
generation as in dSFT/dDPO.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from ..data.sft import with_empty_system
from .attention import attention_implementation
from .forward import unwrap_model


def _zero3_synced() -> bool:
    # Under ZeRO-3 every rank must run the same number of forward passes (each one all-gathers),
    # so ranks that finish early keep stepping: HF generate's ``synced_gpus``.
    try:
        from transformers.integrations import is_deepspeed_zero3_enabled
    except ImportError:  # pragma: no cover
        return False
    return (is_deepspeed_zero3_enabled() and torch.distributed.is_available()
            and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1)


def prompt_texts(tokenizer, conversations: Sequence[Sequence[dict]], add_empty_system: bool = True) -> list:
    """The rendered prompts (chat template + generation prompt) that :func:`generate` tokenises."""
    convs = [with_empty_system(c) if add_empty_system else list(c) for c in conversations]
    return [tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in convs]


@torch.no_grad()
def generate(model, tokenizer, conversations: Sequence[Sequence[dict]], max_new_tokens: int = 128,
             do_sample: bool = False, temperature: float = 0.7, top_p: float = 1.0,
             top_k: Optional[int] = None, batch_size: int = 8, seed: Optional[int] = None,
             add_empty_system: bool = True) -> list:
    """Continue each conversation with one assistant turn.

    Args:
        model: causal LM (or a DeepSpeed engine / PEFT model wrapping one).
        tokenizer: a tokenizer with a chat template (``zephyr_fast.data.chat.load_tokenizer``).
        conversations: lists of ``{"role", "content"}`` messages; the generation prompt
            (``<|assistant|>``) is appended by the template.
        do_sample: greedy when ``False`` (``temperature``/``top_p``/``top_k`` then unused).
        batch_size: conversations per ``generate`` call (left-padded together).
        seed: seeds the sampler (``torch.manual_seed``) for reproducible sampling.
        add_empty_system: prepend ``{"role": "system", "content": ""}`` to conversations without a
            system turn, as training does (set ``False`` only for a model trained without it).
    Returns:
        the decoded completions, special tokens removed, in input order.
    """
    if max_new_tokens < 1 or batch_size < 1:
        raise ValueError(f"max_new_tokens and batch_size must be >= 1, got {max_new_tokens}, {batch_size}")
    if tokenizer.eos_token_id is None:
        raise ValueError("generate: tokenizer has no eos_token (needed to stop at </s>)")
    hf = unwrap_model(model)
    device = next(hf.parameters()).device
    texts = prompt_texts(tokenizer, conversations, add_empty_system)
    bos = tokenizer.bos_token
    # One BOS per prompt: only let the tokenizer add it when the template did not write it.
    add_special = not (bos and texts and texts[0].startswith(bos))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    sampling = dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=top_k) if do_sample \
        else dict(do_sample=False, temperature=None, top_p=None, top_k=None)
    if seed is not None:
        torch.manual_seed(seed)

    old_side = tokenizer.padding_side
    was_training = hf.training
    tokenizer.padding_side = "left"
    hf.eval()
    outputs = []
    try:
        with attention_implementation(hf, "sdpa"):
            for i in range(0, len(texts), batch_size):
                enc = tokenizer(texts[i:i + batch_size], return_tensors="pt", padding=True,
                                add_special_tokens=add_special).to(device)
                gen = hf.generate(**enc, max_new_tokens=max_new_tokens, eos_token_id=tokenizer.eos_token_id,
                                  pad_token_id=pad_id, use_cache=True, synced_gpus=_zero3_synced(), **sampling)
                new = gen[:, enc["input_ids"].shape[1]:]
                outputs.extend(tokenizer.batch_decode(new, skip_special_tokens=True))
    finally:
        tokenizer.padding_side = old_side
        hf.train(was_training)
    return outputs
