"""The Zephyr chat template, tokenizer loading and fast rendering.

Zephyr-7B (Tunstall et al. 2023, "Zephyr: Direct Distillation of LM Alignment") was trained with
alignment-handbook's template.  Every turn renders as ``<|role|>\\n{content}</s>\\n`` and the
generation prompt is ``<|assistant|>\\n``::

    <|system|>\\n</s>\\n<|user|>\\nHi</s>\\n<|assistant|>\\nHello!</s>\\n

The template never emits ``bos_token``; the tokenizer adds ``<s>`` once (``add_special_tokens``).
Templates that do emit it (e.g. Llama-3) are tokenised with ``add_special_tokens=False`` so there is
never a double BOS — :func:`tokenize_kwargs` decides this once per tokenizer.

:func:`ensure_hub_reachable` (shared with the dataset loader) fails in seconds, naming a local
alternative, when a hub id is asked for and the Hub cannot be reached.
"""

from __future__ import annotations

import functools
import os
import socket
from typing import Any, Optional, Sequence
from urllib.parse import urlparse


# Byte-exact copy of the ``chat_template`` in alignment-handbook's
# recipes/zephyr-7b-beta/{sft,dpo}/config_full.yaml (identical to its DEFAULT_CHAT_TEMPLATE).
# The newlines between tags vanish under transformers' trim_blocks/lstrip_blocks; the ones after
# ``}}`` do not, which is what puts ``\n`` after each ``</s>`` and after the generation prompt.
ZEPHYR_CHAT_TEMPLATE = (
    "{% for message in messages %}\n"
    "{% if message['role'] == 'user' %}\n"
    "{{ '<|user|>\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'system' %}\n"
    "{{ '<|system|>\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'assistant' %}\n"
    "{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n"
    "{% endif %}\n"
    "{% if loop.last and add_generation_prompt %}\n"
    "{{ '<|assistant|>' }}\n"
    "{% endif %}\n"
    "{% endfor %}"
)

# Used only when render() is called without a tokenizer (Mistral/Llama-2 special tokens).
_DEFAULT_SPECIAL = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}


@functools.lru_cache(maxsize=8)
def _compile(template: str):
    # Same environment transformers uses for apply_chat_template (sandboxed: a chat template from
    # a downloaded tokenizer_config.json must not be able to run code), compiled once per string.
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        from jinja2.exceptions import TemplateError

        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template)


def _special_tokens(tokenizer) -> dict:
    if tokenizer is None:
        return dict(_DEFAULT_SPECIAL)
    out = {}
    for name in ("bos_token", "eos_token", "unk_token", "pad_token"):
        tok = getattr(tokenizer, name, None)
        if tok is not None:
            out[name] = str(tok)
    return out


def render(
    messages: Sequence[dict],
    add_generation_prompt: bool = False,
    *,
    tokenizer: Any = None,
    chat_template: Optional[str] = None,
) -> str:
    """Render a conversation to text with the Zephyr template (or ``tokenizer``'s own template).

    Args:
        messages: list of ``{"role": "system"|"user"|"assistant", "content": str}``.
        add_generation_prompt: append ``<|assistant|>\\n`` so the model continues as the assistant.
        tokenizer: supplies the template (``tokenizer.chat_template``) and special tokens; without
            one, the Zephyr template with ``</s>`` as EOS is used.
        chat_template: explicit template string, overrides the tokenizer's.
    Returns:
        the rendered string, identical to ``tokenizer.apply_chat_template(..., tokenize=False)``.
    """
    template = chat_template or getattr(tokenizer, "chat_template", None) or ZEPHYR_CHAT_TEMPLATE
    return _compile(template).render(
        messages=list(messages), add_generation_prompt=add_generation_prompt, **_special_tokens(tokenizer)
    )


def render_fast(messages: Sequence[dict], tokenizer, add_generation_prompt: bool = False) -> str:
    """:func:`render` with a plain-Python path for the Zephyr template (no Jinja per row; the
    tests check both paths agree byte for byte)."""
    if (getattr(tokenizer, "chat_template", None) or ZEPHYR_CHAT_TEMPLATE) != ZEPHYR_CHAT_TEMPLATE:
        return render(messages, add_generation_prompt, tokenizer=tokenizer)
    eos = str(tokenizer.eos_token)
    text = "".join(f"<|{m['role']}|>\n{m['content']}{eos}\n" for m in messages)
    return text + "<|assistant|>\n" if add_generation_prompt else text


def template_emits_bos(tokenizer, chat_template: Optional[str] = None) -> bool:
    """True when the chat template writes ``bos_token`` itself (then never add it again)."""
    bos = getattr(tokenizer, "bos_token", None)
    if not bos:
        return False
    text = render([{"role": "user", "content": "x"}], tokenizer=tokenizer, chat_template=chat_template)
    return text.startswith(str(bos))


def tokenize_kwargs(tokenizer) -> dict:
    """Keyword arguments for ``tokenizer(texts, **kw)`` that give exactly one BOS per sequence."""
    template = getattr(tokenizer, "chat_template", None)
    cached = getattr(tokenizer, "_zephyr_fast_tok_kwargs", None)
    if cached is None or cached[0] != template:  # recomputed when the template is swapped
        cached = (template, {"add_special_tokens": not template_emits_bos(tokenizer)})
        try:
            tokenizer._zephyr_fast_tok_kwargs = cached
        except AttributeError:  # pragma: no cover - exotic tokenizer objects with __slots__
            pass
    return dict(cached[1])


def _set_eos(tok, eos_token: str, name: str) -> None:
    """Make ``eos_token`` the tokenizer's EOS; a string that is not one token of the vocabulary is refused."""
    if eos_token not in tok.get_vocab():
        raise ValueError(f"eos_token: {eos_token!r} is not a token of the tokenizer {name!r}")
    tok.eos_token = eos_token


DATA_EXTS = (".json", ".jsonl", ".parquet", ".arrow")  # the files the dataset loader reads


# --- hub reachability (tokenizers here, datasets in loading.py) ----------------------------------------------------------------------------


def is_local_path(path: str) -> bool:
    """A path (it exists, starts like one or has a data file's extension), not a hub id."""
    return os.path.exists(path) or path.startswith((".", "/", "~")) or os.path.splitext(path)[1] in DATA_EXTS


_LOCAL_HINT = {
    "dataset": "a .json/.jsonl/.parquet/.arrow file or a directory, e.g. assets/data/ultrafeedback_binarized/sample16.jsonl",
    "tokenizer": "a folder with tokenizer.json / tokenizer_config.json, e.g. assets/tokenizers/mistral-7b-v0.1",
    "model": "a folder with config.json and the weights, e.g. a run's output_dir",
}


HUB_PROBE_TIMEOUT_S = 1.5  # a TCP connect to the Hub: an offline machine answers in well under 2 s


def hub_unreachable(timeout: float = HUB_PROBE_TIMEOUT_S) -> Optional[str]:
    """Why the Hugging Face Hub (``HF_ENDPOINT``, read now) cannot be reached from here, or None when it
    answers. One TCP connect (milliseconds online, at most ``timeout`` offline): without it, each
    offline look-up waits through huggingface_hub's retries (~25 s a file) before failing."""
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    host = url.hostname or "huggingface.co"
    try:
        socket.create_connection((host, url.port or (80 if url.scheme == "http" else 443)), timeout=timeout).close()
    except OSError as exc:
        return f"the Hugging Face Hub ({host}) is unreachable ({exc.__class__.__name__})"
    return None


def ensure_hub_reachable(repo_id: str, *, what: str = "dataset") -> None:
    """Fail in under 2 s with a useful message instead of hanging on network timeouts.

    Offline mode (``HF_HUB_OFFLINE``/``HF_DATASETS_OFFLINE``) is respected: then the hub cache is
    used and a miss is reported by the loader with the same advice.
    """
    if is_local_path(repo_id):
        if not os.path.exists(os.path.expanduser(repo_id)):
            raise FileNotFoundError(f"{what} '{repo_id}': no such file or directory")
        return
    if hub_offline():
        return
    why = hub_unreachable()
    if why:
        raise FileNotFoundError(
            f"{what} '{repo_id}' is not a local path and {why}. Pass a local path instead "
            f"({_LOCAL_HINT.get(what, 'a local folder')}), or set HF_HUB_OFFLINE=1 to use a copy already in the "
            f"Hugging Face cache."
        ) from None


def hub_offline() -> bool:
    return any(os.environ.get(v, "0").lower() not in ("0", "", "false") for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def load_tokenizer(path_or_id: str, chat_template: Optional[str] = None, *, revision: Optional[str] = None,
                   eos_token: Optional[str] = None):
    """Load a Hugging Face tokenizer ready for zephyr_fast.

    * ``chat_template`` given: it replaces whatever the tokenizer has.  Otherwise an existing
      template is kept and the Zephyr template is added only when there is none (Mistral base).
    * ``eos_token`` given (a recipe's ``eos_token``, e.g. ``<|im_end|>``): it replaces the
      tokenizer's EOS, as TRL does; it must already be a token of the vocabulary.
    * ``pad_token`` falls back to EOS (alignment-handbook); packed batches never pad, only
      generation does.
    * ``trust_remote_code`` is always off.
    * A hub id while offline raises a :class:`FileNotFoundError` telling you to pass a local path.
    """
    from transformers import AutoTokenizer

    if not os.path.isdir(path_or_id):
        ensure_hub_reachable(path_or_id, what="tokenizer")
    try:
        tok = AutoTokenizer.from_pretrained(path_or_id, revision=revision, trust_remote_code=False)
    except OSError as exc:
        if os.path.isdir(path_or_id):
            raise
        raise FileNotFoundError(
            f"tokenizer '{path_or_id}' could not be loaded from the Hugging Face Hub or its cache ({exc}). "
            "Pass a local path instead (a folder with tokenizer.json / tokenizer_config.json), e.g. "
            "assets/tokenizers/mistral-7b-v0.1."
        ) from exc
    if eos_token is not None:
        _set_eos(tok, eos_token, path_or_id)
    if chat_template is not None:
        tok.chat_template = chat_template
    elif getattr(tok, "chat_template", None) is None:
        tok.chat_template = ZEPHYR_CHAT_TEMPLATE
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok
