"""The pool of ``zephyr-fast generate``: each entry a local model folder, a Hub id or a served endpoint.

Forms (``--pool NAME=VALUE`` on the command line, ``generate.pool: {NAME: VALUE}`` in a recipe):

* ``MODEL_DIR`` -- a saved transformers causal LM with its tokenizer (any architecture transformers
  can generate with, safetensors; the packed-training family restriction does not apply);
* ``org/name`` -- a Hub id: downloaded (safetensors, config and tokenizer files) into the Hugging Face
  cache when the Hub is reachable, taken from that cache with ``HF_HUB_OFFLINE=1``; unreachable and
  not offline: one line saying so (``data.chat.ensure_hub_reachable``);
* ``http(s)://HOST/v1#MODEL`` -- an OpenAI-compatible endpoint (vLLM, TGI, ``transformers serve``,
  a paid API) serving ``MODEL``; its key from ``ZEPHYR_POOL_API_KEY`` (else ``OPENAI_API_KEY``);
* in a recipe also a mapping ``{base_url, model, api_key?, endpoint_id?, extra_body?,
  price_input_per_mtok?, price_output_per_mtok?}``.  ``endpoint_id`` names the endpoint in the
  completions' identity instead of its URL (a server restarted on another port is the same model).

A local entry's identity is its content (``training/fingerprint.local_fingerprint``) or, for a Hub
id, ``hub:ID@COMMIT``; an endpoint's is its ``endpoint_id`` or base URL plus the exact request.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from typing import Optional, Union

from .. import redaction
from ..data.chat import ensure_hub_reachable, hub_offline, is_local_path
from ..training.fingerprint import local_fingerprint
from .client import JudgeConfig

HUB_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "tokenizer*"]


@dataclass
class Endpoint:
    """An OpenAI-compatible chat endpoint serving one pool model (``price_*`` per 1M tokens)."""

    base_url: str
    model: str
    api_key: Optional[str] = field(default=None, repr=False)  # a secret: never printed
    endpoint_id: Optional[str] = None
    extra_body: Optional[dict] = None
    price_input_per_mtok: float = 0.0
    price_output_per_mtok: float = 0.0

    def __post_init__(self):
        redaction.register(self.api_key)

    @property
    def identity(self) -> str:
        return "endpoint:" + (self.endpoint_id or self.base_url.rstrip("/"))

    def config(self, **kw) -> JudgeConfig:
        """The client settings of this endpoint (``kw``: concurrency, retries, timeout, sampling)."""
        return JudgeConfig(base_url=self.base_url, model=self.model, api_key=self.api_key or "EMPTY",
                           endpoint_id=self.endpoint_id, extra_body=self.extra_body,
                           price_input_per_mtok=self.price_input_per_mtok,
                           price_output_per_mtok=self.price_output_per_mtok, **kw)


ENDPOINT_KEYS = tuple(f.name for f in fields(Endpoint))
Entry = Union[str, Endpoint]


def _env_key() -> Optional[str]:
    return os.environ.get("ZEPHYR_POOL_API_KEY") or os.environ.get("OPENAI_API_KEY")


def _from_url(name: str, value: str, where: str) -> Endpoint:
    url, sep, model = value.rpartition("#")
    if not sep or not url or not model:
        raise ValueError(f"{where}: pool entry {name!r}: an endpoint is URL#MODEL (e.g. http://127.0.0.1:8000/v1#my-model), "
                         f"got {redaction.redact(value)!r}")
    return Endpoint(url, model, api_key=_env_key())


def _from_mapping(name: str, value: dict, where: str) -> Endpoint:
    unknown = sorted(set(value) - set(ENDPOINT_KEYS))
    if unknown:
        raise ValueError(f"{where}: pool entry {name!r}: unknown key {unknown[0]!r} (expected {', '.join(ENDPOINT_KEYS)})")
    for key in ("base_url", "model"):
        if not isinstance(value.get(key), str) or not value[key]:
            raise ValueError(f"{where}: pool entry {name!r}, field '{key}': expected a non-empty string")
    if value.get("extra_body") is not None and not isinstance(value["extra_body"], dict):
        raise ValueError(f"{where}: pool entry {name!r}, field 'extra_body': expected a mapping")
    for key in ("price_input_per_mtok", "price_output_per_mtok"):
        price = value.get(key, 0.0)
        if isinstance(price, bool) or not isinstance(price, (int, float)) or not 0 <= price < float("inf"):
            raise ValueError(f"{where}: pool entry {name!r}, field '{key}': expected a number >= 0")
    return Endpoint(**{"api_key": _env_key(), **value})


def parse_entry(name: str, value, where: str = "generate") -> Entry:
    """A pool entry: a local path / Hub id (str) or an :class:`Endpoint`; bad ones are one line."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"{where}: pool names must be non-empty strings, got {name!r}")
    if isinstance(value, Endpoint):
        return value
    if isinstance(value, dict):
        return _from_mapping(name, value, where)
    if not isinstance(value, str) or not value:
        raise ValueError(f"{where}: pool entry {name!r}: expected a model folder, a Hub id, URL#MODEL or a mapping, "
                         f"got {type(value).__name__}")
    if value.startswith(("http://", "https://")):
        return _from_url(name, value, where)
    return value


def parse_pool(items: list) -> dict:
    """``--pool NAME=VALUE`` arguments -> ``{name: entry}``."""
    pool = {}
    for it in items:
        name, sep, value = it.partition("=")
        if not sep or not name or not value:
            raise ValueError(f"--pool: expected NAME=MODEL_DIR, NAME=HUB_ID or NAME=URL#MODEL, got {redaction.redact(it)!r}")
        pool[name] = parse_entry(name, value, "--pool")
    return pool


def check_pool(pool: dict, where: str) -> dict:
    """A recipe's ``generate.pool`` mapping, every entry parsed."""
    return {name: parse_entry(name, value, where) for name, value in pool.items()}


def is_endpoint(entry) -> bool:
    return isinstance(entry, Endpoint)


def local_folder(name: str, entry: str, *, download: bool = True) -> Optional[str]:
    """The model folder of a local path or Hub id (downloaded when ``download``; else None when it is
    not in the Hugging Face cache yet).

    Raises:
        FileNotFoundError: one line -- no such path, the Hub unreachable while not offline, the id not
            on the Hub / not in the cache.
    """
    if os.path.isdir(entry):
        return entry
    try:
        if os.path.exists(entry):
            raise FileNotFoundError(f"'{entry}' is a file, not a model folder")
        if download or is_local_path(entry):
            ensure_hub_reachable(entry, what="model")  # a missing path, or the Hub unreachable: one line
        return _snapshot(entry, local_only=hub_offline() or not download, allow_missing=not download)
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"generate: pool model {name!r}: {exc}") from None


def _snapshot(repo_id: str, local_only: bool, allow_missing: bool) -> Optional[str]:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return snapshot_download(repo_id, allow_patterns=HUB_FILES, local_files_only=local_only)
    except LocalEntryNotFoundError:
        if allow_missing:
            return None
        raise FileNotFoundError(f"'{repo_id}' is not in the Hugging Face cache and HF_HUB_OFFLINE is set "
                                "(download it once online, or pass a local folder)") from None
    except (HfHubHTTPError, ValueError, OSError) as exc:
        raise FileNotFoundError(f"'{repo_id}' could not be downloaded from the Hugging Face Hub: "
                                f"{' '.join(str(exc).split())[:200]}") from None


def identity(entry: Entry, folder) -> str:
    """What a pool model is, in its completions' keys: its content, Hub commit or endpoint."""
    if is_endpoint(entry):
        return entry.identity
    if not os.path.isdir(entry):  # a Hub snapshot: .../snapshots/COMMIT
        return f"hub:{entry}@{os.path.basename(os.path.normpath(folder))}"
    return local_fingerprint(folder)
