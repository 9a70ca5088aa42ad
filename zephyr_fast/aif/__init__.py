"""AIF (AI feedback): completions from a pool of models, rated by a judge, binarised into pairs.

* :func:`generate_completions` (``zephyr-fast generate``) — N pool models per prompt, UltraFeedback
  principle system prompts, resumable append-only output (``generate.py``).
* :class:`JudgeClient`, :class:`JudgeConfig` — any OpenAI-compatible chat endpoint, retries,
  backoff, concurrency, token / cost accounting (``client.py``).
* :func:`judge_file`, :func:`judge_rows` (``zephyr-fast judge``) — UltraFeedback's four aspects,
  re-asks, on-disk cache (``judge.py``); output feeds ``zephyr_fast.aif.binarize`` unchanged.
* :func:`run_aif` (``zephyr-fast aif recipes/aif.yaml``) — generate -> judge -> binarize (``pipeline.py``).
* :func:`serve_local` — a loopback ``transformers serve`` judge (``serve.py``).
"""

from .client import ChatResult, JudgeClient, JudgeConfig, JudgeRequestError, Usage
from .judge import JudgeReport, judge_file, judge_rows
from .serve import serve_local, start_server
from .store import AppendLog, JudgeCache, cache_key

__all__ = ["AppendLog", "ChatResult", "JudgeCache", "JudgeClient", "JudgeConfig", "JudgeReport",
           "JudgeRequestError", "Usage", "cache_key", "judge_file", "judge_rows", "serve_local", "start_server"]
