"""``zephyr-fast generate`` through served pool models (``transformers serve`` on 127.0.0.1, real HTTP),
Hub ids from the Hugging Face cache, any causal LM transformers can generate with."""

import json
import os
import signal
import threading
import time

import pytest
import torch

from tests.aif.helpers import REPO, TOKENIZER
from zephyr_fast.aif.backends import pick_dtype
from zephyr_fast.aif.generate import FINAL, PARTS, generate_completions, load_prompts, main
from zephyr_fast.aif.pool import Endpoint, parse_pool
from zephyr_fast.aif.serve import start_server
from zephyr_fast.data.chat import load_tokenizer

pytestmark = pytest.mark.slow
SAMPLE = str(REPO / "assets" / "data" / "ultrafeedback_binarized" / "sample16.jsonl")


def lines(path):
    return [json.loads(x) for x in open(path)]


def test_served_pool_model_generates_resumes_and_keys_the_request(served_tiny, tmp_path, capsys):
    out = tmp_path / "gen"
    argv = [SAMPLE, str(out), "--pool", f"srv={served_tiny.base_url}#{served_tiny.model}", "--backend", "openai",
            "--n-models", "1", "--limit", "4", "--max-new-tokens", "4", "--concurrency", "4", "--no-progress"]
    assert main(argv) == 0
    report = capsys.readouterr().out
    assert "4 generated now" in report and "endpoints: 4 requests, 0 retries" in report
    rows = lines(out / FINAL)
    assert len(rows) == 4 and all(r["models"] == ["srv"] and r["completions"][0]["response"] for r in rows)
    assert main(argv) == 0  # resumed: nothing sent again
    assert "4 already done, 0 generated now" in capsys.readouterr().out
    assert main(argv[:-1] + ["--max-new-tokens", "5", "--no-progress"]) == 0  # another request: generated anew
    assert "0 already done, 4 generated now" in capsys.readouterr().out
    parts = lines(out / PARTS)
    assert len(parts) == 8 and len({p["key"] for p in parts}) == 8


def test_backend_openai_needs_endpoints_and_bad_entries_are_one_line(served_tiny, tmp_path, capsys):
    out = str(tmp_path / "gen")
    assert main([SAMPLE, out, "--pool", f"loc={served_tiny.model}", "--backend", "openai"]) == 2
    assert capsys.readouterr().err == ("error: generate: --backend openai: pool entry 'loc' is not an endpoint "
                                       "(NAME=URL#MODEL)\n")
    assert main([SAMPLE, out, "--pool", "srv=http://127.0.0.1:9/v1"]) == 2
    assert "pool entry 'srv': an endpoint is URL#MODEL" in capsys.readouterr().err
    with pytest.raises(ValueError, match="field 'model': expected a non-empty string"):
        generate_completions(load_prompts(SAMPLE, 1), {"x": {"base_url": "http://h/v1"}}, out)


def test_served_model_killed_mid_run_then_resumed_elsewhere(served_tiny, tmp_path):
    """The endpoint dies after a few completions: they stay, the run exits 1 without completions.jsonl,
    and the rerun (the same model served again, named by ``endpoint_id``) generates only the rest."""
    doomed = start_server(served_tiny.model)
    out, prompts = tmp_path / "gen", load_prompts(SAMPLE)
    kw = dict(n_models=1, max_new_tokens=24, concurrency=2, max_retries=0, progress=False)

    def kill_after_two():
        while not ((out / PARTS).exists() and len((out / PARTS).read_text().splitlines()) >= 2):
            time.sleep(0.01)
        os.killpg(doomed.process.pid, signal.SIGKILL)

    watcher = threading.Thread(target=kill_after_two, daemon=True)
    watcher.start()
    try:
        with pytest.raises(Exception, match="completions failed for good") as failed:
            generate_completions(prompts, {"tiny": _endpoint(doomed)}, str(out), **kw)
    finally:
        doomed.stop(kill=True)
    assert type(failed.value).__name__ == "JudgeRequestError"
    before = lines(out / PARTS)
    assert 2 <= len(before) < 16 and not (out / FINAL).exists()
    rep = generate_completions(prompts, {"tiny": _endpoint(served_tiny)}, str(out), **kw)
    assert rep.resumed == len(before) and rep.generated == 16 - len(before) and rep.usage["requests"] == rep.generated
    keys = [(p["prompt_id"], p["model"]) for p in lines(out / PARTS)]
    assert len(keys) == len(set(keys)) == 16 and len(lines(out / FINAL)) == 16


def _endpoint(server):
    return Endpoint(server.base_url, server.model, api_key="local", endpoint_id="tiny-served-seed3")


def _tiny_gpt2(path):
    """A causal LM outside the packed-training families (GPT-2), saved with the repo's tokenizer."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    tok = load_tokenizer(str(TOKENIZER))
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=1, n_head=2, n_positions=256)).save_pretrained(
        str(path))
    tok.save_pretrained(str(path))


def test_hub_id_from_the_cache_and_any_causal_lm(tmp_path, monkeypatch):
    from huggingface_hub import constants

    sha = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--tiny-org--tiny-gpt2"
    _tiny_gpt2(repo / "snapshots" / sha)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(sha)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    rep = generate_completions(load_prompts(SAMPLE, 2), parse_pool(["gpt=tiny-org/tiny-gpt2"]), str(tmp_path / "gen"),
                               n_models=1, max_new_tokens=3, progress=False)
    assert rep.generated == 2 and [r["models"] for r in lines(rep.output)] == [["gpt"], ["gpt"]]
    assert pick_dtype("auto", "cpu") == "float32" and pick_dtype("bf16", "cpu") == "bfloat16"


def test_hub_id_while_the_hub_is_unreachable_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    assert main([SAMPLE, str(tmp_path / "gen"), "--pool", "h=some-org/some-model", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pool model 'h': model 'some-org/some-model' is not a local path and the " \
        "Hugging Face Hub (127.0.0.1) is unreachable" in err and "not a directory" not in err
    assert not (tmp_path / "gen").exists()
