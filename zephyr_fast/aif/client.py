"""A judge client for any OpenAI-compatible chat endpoint (OpenAI, vLLM, TGI, ``transformers serve``).

Configuration (``JudgeConfig.from_env``): ``ZEPHYR_JUDGE_BASE_URL`` (else ``OPENAI_BASE_URL``),
``ZEPHYR_JUDGE_MODEL``, ``ZEPHYR_JUDGE_API_KEY`` (else ``OPENAI_API_KEY``; local servers accept any
key).  Requests go through the ``openai`` client with its own retries off; this module retries
429, 5xx, timeouts and dropped connections with exponential backoff and jitter (honouring
``Retry-After``), and fails fast on other 4xx.  Calls are thread-safe: callers run up to
``concurrency`` of them at once (:meth:`JudgeClient.map`).  Token use and cost are accumulated in
:class:`Usage`.

``constrain_tokenizer`` (for small local judges): the ids of the rating tokens in that tokenizer
are sent as ``logit_bias`` (+100), so the judge can only answer with a rating; the parsers accept
that bare answer.  ``top_logprobs > 0`` asks for the top log-probs of each answer token (OpenAI and
vLLM return them; ``transformers serve`` 5.24 ignores the field), from which a probability-weighted
rating is computed.
"""

from __future__ import annotations

import json
import os
import random
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, fields
from typing import Callable, Iterable, Optional

import openai

from .. import redaction
from .store import cache_key
from .transport import deadline, deadline_client


class JudgeRequestError(RuntimeError):
    """A request that failed for good (non-retryable status, or retries exhausted)."""


class ProtocolError(RuntimeError):
    """A 200 answer that is not a chat completion (an HTML page, no ``choices``, ``content: null``):
    retried like a transport failure, never taken for the judge's answer."""


RETRYABLE = (openai.RateLimitError, openai.InternalServerError, openai.APITimeoutError, openai.APIConnectionError,
             openai.APIResponseValidationError, ProtocolError)


@dataclass
class JudgeConfig:
    """Where and how to call the judge. ``price_*`` are in currency units per 1M tokens.

    ``extra_body``: server-specific request fields sent as they are, e.g. for ``transformers serve``
    ``{"generation_config": "{\"do_sample\": true}"}`` (it samples only when the served model's
    generation config says so, whatever the temperature), or vLLM's ``{"top_k": 20}``.
    """

    base_url: Optional[str] = None
    model: Optional[str] = None
    api_key: Optional[str] = field(default=None, repr=False)  # a secret: never printed, masked everywhere
    concurrency: int = 8
    max_retries: int = 5
    timeout: float = 120.0
    backoff: float = 1.0
    backoff_max: float = 30.0
    temperature: float = 0.0
    max_tokens: int = 1024
    top_logprobs: int = 0
    constrain_tokenizer: Optional[str] = None
    max_reasks: int = 3
    price_input_per_mtok: float = 0.0
    price_output_per_mtok: float = 0.0
    extra_body: Optional[dict] = None
    # what the judge's cache keys call this endpoint: default the base URL; a local server started for
    # the run (random port) names its served model's content instead (``serve.py``)
    endpoint_id: Optional[str] = None

    def __post_init__(self):
        redaction.register(self.api_key)

    @property
    def endpoint(self) -> str:
        """The endpoint's identity in cache keys."""
        return self.endpoint_id or (self.base_url or "https://api.openai.com/v1").rstrip("/")

    @classmethod
    def from_env(cls, **overrides) -> "JudgeConfig":
        """Fill ``base_url`` / ``model`` / ``api_key`` from the environment where not given."""
        env = os.environ
        vals = {"base_url": env.get("ZEPHYR_JUDGE_BASE_URL") or env.get("OPENAI_BASE_URL"),
                "model": env.get("ZEPHYR_JUDGE_MODEL"),
                "api_key": env.get("ZEPHYR_JUDGE_API_KEY") or env.get("OPENAI_API_KEY")}
        vals.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**vals)

    def check(self, label: str = "judge") -> None:
        """One line naming the first bad setting (never the whole config: it holds the API key)."""
        if not self.model:
            if label != "judge":
                raise ValueError(f"{label}: no model name for the endpoint {self.base_url}")
            raise ValueError("judge: no model (set ZEPHYR_JUDGE_MODEL or pass --judge-model)")
        for name, low in (("concurrency", 1), ("max_retries", 0), ("max_reasks", 0), ("top_logprobs", 0),
                          ("max_tokens", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{label}: {name} must be an integer >= {low}, got {value!r}")
        if not (isinstance(self.timeout, (int, float)) and 0 < self.timeout < float("inf")):
            raise ValueError(f"{label}: timeout must be a number of seconds > 0, got {self.timeout!r}")


@dataclass
class Usage:
    """Requests, retries and tokens spent; ``cost`` from the config's prices."""

    requests: int = 0
    retries: int = 0
    failed_requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost: float = 0.0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, **kw) -> None:
        with self._lock:
            for k, v in kw.items():
                setattr(self, k, getattr(self, k) + v)

    def as_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self) if not f.name.startswith("_")}


@dataclass
class ChatResult:
    """One answer: ``text``; ``logprobs`` = ``[(token, logprob, {top_token: logprob})]`` or None."""

    text: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    logprobs: Optional[list] = None
    finish_reason: Optional[str] = None


def _retry_after(exc) -> Optional[float]:
    resp = getattr(exc, "response", None)
    value = resp.headers.get("retry-after") if resp is not None else None
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def _logprobs(choice) -> Optional[list]:
    lp = getattr(choice, "logprobs", None)
    content = getattr(lp, "content", None) if lp is not None else None
    if not content:
        return None
    return [(t.token, t.logprob, {a.token: a.logprob for a in (t.top_logprobs or [])}) for t in content]


class JudgeClient:
    """Thread-safe chat calls with retries, backoff, usage accounting and optional rating constraint."""

    def __init__(self, config: JudgeConfig, sleep: Callable[[float], None] = time.sleep, label: str = "judge"):
        config.check(label)
        self.config, self.label = config, label
        self.usage = Usage()
        self._sleep = sleep
        self._client = openai.OpenAI(base_url=config.base_url, api_key=config.api_key or "EMPTY",
                                     timeout=config.timeout, max_retries=0,
                                     http_client=deadline_client(config.timeout))
        self._bias_cache: dict = {}

    def rating_bias(self, labels: Iterable[str]) -> Optional[dict]:
        """``logit_bias`` forcing the single-token ``labels`` (e.g. ``"1".."5"``), or None when the
        config has no ``constrain_tokenizer``."""
        if not self.config.constrain_tokenizer:
            return None
        labels = tuple(labels)
        if labels not in self._bias_cache:
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(self.config.constrain_tokenizer)
            ids = {}
            for lab in labels:
                got = [i for i in tok.convert_tokens_to_ids([lab, "▁" + lab]) if i != tok.unk_token_id]
                if not got:
                    raise ValueError(f"judge: {lab!r} is not one token in {self.config.constrain_tokenizer}")
                ids[str(got[0])] = 100.0
            self._bias_cache[labels] = ids
        return self._bias_cache[labels]

    def request(self, messages: list, *, max_tokens: Optional[int] = None, logit_bias: Optional[dict] = None,
                temperature: Optional[float] = None, sampling: Optional[dict] = None) -> dict:
        """The request :meth:`chat` sends (the ``openai`` call's arguments; no key, no endpoint).

        ``sampling``: further ``create`` arguments (``top_p``, ``seed``: generation's).
        """
        cfg = self.config
        kw = dict(model=cfg.model, messages=messages, max_tokens=max_tokens or cfg.max_tokens,
                  temperature=cfg.temperature if temperature is None else temperature, **(sampling or {}))
        if logit_bias:
            kw["logit_bias"] = logit_bias
        if cfg.top_logprobs > 0:
            kw.update(logprobs=True, top_logprobs=cfg.top_logprobs)
        if cfg.extra_body:
            kw["extra_body"] = cfg.extra_body
        return kw

    def request_key(self, version: str, messages: list, **options) -> str:
        """Cache key of one request: the endpoint, the template ``version`` and the exact request."""
        return cache_key(self.config.endpoint, version, self.request(messages, **options))

    def chat(self, messages: list, *, max_tokens: Optional[int] = None, logit_bias: Optional[dict] = None,
             temperature: Optional[float] = None, sampling: Optional[dict] = None) -> ChatResult:
        """One chat completion, retried on 429 / 5xx / timeout / connection errors.

        Raises:
            JudgeRequestError: a non-retryable error, or ``max_retries`` retries spent.
        """
        cfg = self.config
        kw = self.request(messages, max_tokens=max_tokens, logit_bias=logit_bias, temperature=temperature,
                          sampling=sampling)
        for attempt in range(cfg.max_retries + 1):
            try:
                with deadline(cfg.timeout):  # --timeout: the whole request, not one socket read
                    result = self._result(self._create(kw))
            except RETRYABLE as exc:
                if attempt == cfg.max_retries:
                    self.usage.add(requests=1, failed_requests=1)
                    raise JudgeRequestError(f"{self.label}: gave up after {attempt + 1} tries: {_describe(exc)}") \
                        from exc
                self.usage.add(requests=1, retries=1)
                delay = _retry_after(exc) or min(cfg.backoff_max, cfg.backoff * 2 ** attempt)
                self._sleep(delay * (0.5 + random.random() / 2))
                continue
            except openai.APIStatusError as exc:
                self.usage.add(requests=1, failed_requests=1)
                raise JudgeRequestError(f"{self.label}: {_describe(exc)} (not retried)") from exc
            self.usage.add(requests=1)
            return result
        raise AssertionError("unreachable")

    def _create(self, kw: dict):
        try:
            return self._client.chat.completions.create(**kw)
        except json.JSONDecodeError as exc:
            raise ProtocolError(f"the answer is not JSON ({exc.msg})") from None

    def _result(self, resp) -> ChatResult:
        """The answer of a chat completion; :class:`ProtocolError` when ``resp`` is not one."""
        if isinstance(resp, (str, bytes)):
            raise ProtocolError(f"the answer is not a chat completion but text: {str(resp)[:80]!r}")
        u = getattr(resp, "usage", None)
        pt, ct = (getattr(u, "prompt_tokens", 0) or 0, getattr(u, "completion_tokens", 0) or 0)
        cost = (pt * self.config.price_input_per_mtok + ct * self.config.price_output_per_mtok) / 1e6
        self.usage.add(prompt_tokens=pt, completion_tokens=ct, cost=cost)  # spent, whatever the answer
        choices = getattr(resp, "choices", None)
        if not isinstance(choices, list) or not choices:
            raise ProtocolError(f"the answer has no choices (choices: {json.dumps(choices)})")
        choice = choices[0]
        content = getattr(getattr(choice, "message", None), "content", None)
        if not isinstance(content, str):
            raise ProtocolError(f"the answer's choices[0].message.content is {type(content).__name__}, not text")
        return ChatResult(content, pt, ct, _logprobs(choice), getattr(choice, "finish_reason", None))

    def map(self, fn: Callable, items: list, *, desc: str = "judge", progress: bool = True) -> list:
        """``[fn(item) for item in items]`` on ``concurrency`` threads, with a progress bar.

        ``fn`` returns a result or raises; raised exceptions are returned in place (never lost).
        """
        from tqdm.auto import tqdm

        def safe(item):
            try:
                return fn(item)
            except Exception as exc:  # noqa: BLE001 - reported by the caller, item by item
                return exc

        with ThreadPoolExecutor(max_workers=self.config.concurrency) as pool:
            return list(tqdm(pool.map(safe, items), total=len(items), desc=desc, disable=not progress))


def cli_status(body: Callable[[], None]) -> int:
    """Exit status of a CLI ``body``: bad input (``ValueError`` — file, row and field named —, missing
    file) prints ``error: ...`` and gives 2; a judge endpoint that failed for good gives 1; else 0."""
    try:
        body()
    except JudgeRequestError as exc:
        print(f"error: {redaction.redact(exc)}", file=sys.stderr)
        return 1
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {redaction.redact(exc)}", file=sys.stderr)
        return 2
    return 0


def _describe(exc) -> str:
    status = getattr(exc, "status_code", None)
    text = " ".join(str(exc).split())[:200]  # one line, whatever the server put in its error body
    return redaction.redact(f"{type(exc).__name__}" + (f" (HTTP {status})" if status else "") + f": {text}")
