"""Secrets (Hub tokens, judge API keys) kept out of every file, log line, error message and command line.

A secret is known from two places: the environment variables that hold one (:data:`SECRET_ENV`), and
values a run registers when it reads them from a recipe or the command line (``hub_token``, a judge's
``api_key``: :func:`register`).  :func:`redact` replaces every known secret in a text with
:data:`MASK`; the CLIs pass their one error line through it, the model card its recipe text.

``wandb`` (and anything else that records ``sys.argv``) sees the command line after
:func:`redact_argv` has masked the values of :data:`SECRET_OPTIONS` in place.
"""

from __future__ import annotations

import os
import sys
import threading

MASK = "<redacted>"
SECRET_ENV = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "ZEPHYR_JUDGE_API_KEY", "OPENAI_API_KEY", "WANDB_API_KEY")
# command-line options whose value is a secret (recipe keys of the trainer and the AIF recipe)
SECRET_OPTIONS = ("hub_token", "hub-token", "judge.api_key", "api_key", "api-key")
# shorter values are placeholders local servers accept ("x", "EMPTY", "local"), and masking them would
# mask ordinary words in every message; real tokens and keys are far longer (hf_... 37, sk-... 51)
_MIN_LEN = 8
_registered: set = set()
_lock = threading.Lock()


def register(value) -> None:
    """Remember ``value`` (a token or key read from a recipe / flag) as a secret to mask everywhere."""
    if isinstance(value, str) and len(value) >= _MIN_LEN:
        with _lock:
            _registered.add(value)


def known() -> list:
    """Every secret known now, longest first (so a secret containing another is masked whole)."""
    env = {os.environ.get(k) for k in SECRET_ENV}
    with _lock:
        values = {v for v in env | _registered if isinstance(v, str) and len(v) >= _MIN_LEN}
    return sorted(values, key=len, reverse=True)


def redact(text) -> str:
    """``text`` with every known secret replaced by :data:`MASK`."""
    text = str(text)
    for secret in known():
        text = text.replace(secret, MASK)
    return text


def _secret_value(arg: str) -> bool:
    name = arg.lstrip("-").partition("=")[0]
    return arg.startswith("--") and "=" in arg and name in SECRET_OPTIONS


def redact_argv(argv: list) -> list:
    """``argv`` with the value of every ``--hub_token=...`` / ``--api_key=...`` (also given as the next
    argument) masked; the values are :func:`register` ed first."""
    out = list(argv)
    for i, arg in enumerate(out):
        if _secret_value(arg):
            name, _, value = arg.partition("=")
            register(value)
            out[i] = f"{name}={MASK}"
        elif arg.startswith("--") and arg.lstrip("-") in SECRET_OPTIONS and i + 1 < len(out):
            register(out[i + 1])
            out[i + 1] = MASK
    return out


def scrub_process_argv() -> None:
    """Mask the secrets of ``sys.argv`` in place (what wandb and crash reports record)."""
    sys.argv[:] = redact_argv(sys.argv)
