"""AIF throughput (issue 26): completions/s of a served pool model (``transformers serve``, 8 requests in
flight) against the in-process transformers backend on the same tiny model, and judge requests/s.

The model is the tests' tiny random Mistral (hidden 32, 1 layer, real tokenizer); 16 bundled prompts,
one pool model, 32 new tokens each, greedy and float32 in both backends (the same work: ``transformers
serve`` samples only when told, and serves the checkpoint's float32); the judge is the same model served and constrained to one rating
token (the demo's judge).  Both backends run on CUDA when there is one (the server with ``--device
cuda``), else on CPU.  Each round writes into a fresh folder, so nothing is resumed or cached.
"""

import itertools

import pytest
import torch

from tests.aif.helpers import REPO, raw_rows, save_tiny_model, write_jsonl
from zephyr_fast.aif.client import JudgeConfig
from zephyr_fast.aif.generate import generate_completions, load_prompts
from zephyr_fast.aif.judge import judge_file
from zephyr_fast.aif.pool import Endpoint
from zephyr_fast.aif.serve import serve_local

from .harness import median_seconds, record, run_timed

pytestmark = pytest.mark.slow
SAMPLE = str(REPO / "assets" / "data" / "ultrafeedback_binarized" / "sample16.jsonl")
DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
PROMPTS, NEW_TOKENS, CONCURRENCY = 16, 32, 8


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    model_dir = save_tiny_model(tmp_path_factory.mktemp("aif-bench") / "tiny", seed=5)
    with serve_local(model_dir, device=DEV.type) as server:
        yield server


def _fresh(tmp_path):
    counter = itertools.count()
    return lambda: (str(tmp_path / f"round{next(counter)}"),)


@pytest.mark.benchmark(group="aif-generate")
@pytest.mark.parametrize("backend", ["served x8", "in-process"])
def test_generate_completions_per_s(benchmark, served, tmp_path, backend):
    prompts = load_prompts(SAMPLE, PROMPTS)
    entry = Endpoint(served.base_url, served.model, api_key="local") if backend == "served x8" else served.model

    def run(out):
        rep = generate_completions(prompts, {"tiny": entry}, out, n_models=1, max_new_tokens=NEW_TOKENS,
                                   temperature=0.0, dtype="float32", batch_size=CONCURRENCY, concurrency=CONCURRENCY,
                                   device=DEV.type, progress=False)
        assert rep.generated == PROMPTS

    run_timed(benchmark, run, _fresh(tmp_path), dev=DEV, rounds=3)
    record(benchmark, suite="aif_generate", provider="zephyr_fast", mode="full", shape=f"tiny x{PROMPTS} prompts",
           dtype="float32", dev=DEV, variant=backend, new_tokens=NEW_TOKENS)
    benchmark.extra_info["completions_per_s"] = PROMPTS / median_seconds(benchmark)


@pytest.mark.benchmark(group="aif-judge")
def test_judge_requests_per_s(benchmark, served, tmp_path):
    inp = write_jsonl(tmp_path / "in.jsonl", raw_rows(8, 2))  # 8 x 2 completions x 4 aspects = 64 requests
    cfg = JudgeConfig(base_url=served.base_url, model=served.model, api_key="local", concurrency=CONCURRENCY,
                      constrain_tokenizer=served.model)

    def run(out):
        rep = judge_file(inp, out + ".jsonl", cfg, progress=False)
        assert rep.usage["requests"] == 64

    run_timed(benchmark, run, _fresh(tmp_path), dev=DEV, rounds=3)
    record(benchmark, suite="aif_judge", provider="zephyr_fast", mode="full", shape="tiny constrained, 64 requests",
           dtype="float32", dev=DEV, variant=f"served x{CONCURRENCY}")
    benchmark.extra_info["requests_per_s"] = 64 / median_seconds(benchmark)
