"""The judge client against a real HTTP server with injected faults: 429, 500, slow answers past the
timeout, garbage answers, a server crash mid-run and restart, kill -9 of the judge itself."""

import json
import os
import signal
import time

import pytest

from tests.aif.fake_openai import Faults, start_in_thread
from tests.aif.helpers import FakeProcess, fork_run, fake_config, log_hashes, raw_rows, write_jsonl
from zephyr_fast.aif.client import JudgeClient, JudgeRequestError
from zephyr_fast.aif.judge import judge_file, main
from zephyr_fast.aif.binarize import binarize_rows

ITEMS = 2 * 2 * 4  # rows x completions x aspects


@pytest.fixture
def inp(tmp_path):
    return write_jsonl(tmp_path / "in.jsonl", raw_rows(2, 2))


def serve(**faults):
    srv, url = start_in_thread(Faults(**faults))
    return srv, url


def read(path):
    return [json.loads(line) for line in open(path)]


@pytest.mark.parametrize("status", [429, 500, 502])
def test_retryable_statuses_are_retried_then_succeed(inp, tmp_path, status):
    srv, url = serve(fail_status=status, fail_count=3)
    try:
        rep = judge_file(inp, str(tmp_path / "out.jsonl"), fake_config(url), progress=False)
    finally:
        srv.shutdown()
    assert rep.judged == ITEMS and rep.request_errors == 0 and rep.usage["retries"] == 3
    assert rep.usage["requests"] == ITEMS + 3 and rep.usage["prompt_tokens"] > 0
    rows = read(tmp_path / "out.jsonl")
    assert all(a["Rating"] in "12345" for r in rows for c in r["completions"] for a in c["annotations"].values())


def test_slow_answer_past_timeout_is_retried(inp, tmp_path):
    srv, url = serve(slow_count=1, delay=1.5)
    try:
        rep = judge_file(inp, str(tmp_path / "out.jsonl"), fake_config(url, timeout=0.5), progress=False)
    finally:
        srv.shutdown()
    assert rep.judged == ITEMS and rep.usage["retries"] >= 1 and rep.request_errors == 0


def test_non_retryable_status_fails_fast(tmp_path):
    srv, url = serve(fail_status=400, fail_count=10 ** 6)
    try:
        client = JudgeClient(fake_config(url, max_retries=5))
        with pytest.raises(JudgeRequestError, match="not retried"):
            client.chat([{"role": "user", "content": "x"}])
    finally:
        srv.shutdown()
    assert client.usage.requests == 1 and client.usage.retries == 0


def test_retries_exhausted_exit_1_nothing_cached_then_rerun_judges_all(inp, tmp_path, capsys):
    out = str(tmp_path / "out.jsonl")
    srv, url = serve(fail_status=500, fail_count=10 ** 6)
    try:
        rc = main([inp, out, "--base-url", url, "--judge-model", "fake", "--max-retries", "1", "--no-progress"])
    finally:
        srv.shutdown()
    assert rc == 1 and "rerun the same command" in capsys.readouterr().err
    assert not os.path.exists(out) and os.path.getsize(out + ".cache.jsonl") == 0
    srv, url = serve()
    try:
        rep = judge_file(inp, out, fake_config(url, model="fake"), progress=False)
    finally:
        srv.shutdown()
    assert rep.judged == ITEMS and rep.cached == 0


def test_garbage_answers_are_reasked_then_recorded_as_failed(inp, tmp_path):
    out = str(tmp_path / "out.jsonl")
    srv, url = serve(garbage=True)
    try:
        rep = judge_file(inp, out, fake_config(url, max_reasks=2), progress=False)
    finally:
        srv.shutdown()
    assert rep.unparseable == ITEMS and rep.reasks == 2 * ITEMS and rep.usage["requests"] == 3 * ITEMS
    fails = read(out + ".failures.jsonl")
    assert len(fails) == ITEMS and all("garbage" in f["raw"] for f in fails)
    comp = read(out)[0]["completions"][0]
    assert comp["judge"]["failed_aspects"] == ["instruction_following", "honesty", "truthfulness", "helpfulness"]
    assert comp["annotations"]["honesty"]["Rating"] == "FAILED" and comp["fine-grained_score"] is None
    # binarize refuses completions with no usable score instead of silently dropping them
    _, report = binarize_rows(read(out), skip_invalid_rows=True)
    assert report.written == 0 and report.skipped.num_skipped == 2 and report.judge_failed == ITEMS


def test_logprob_weighted_rating(inp, tmp_path):
    out = str(tmp_path / "out.jsonl")
    srv, url = serve(logprobs=True)
    try:
        judge_file(inp, out, fake_config(url, top_logprobs=3), progress=False)
    finally:
        srv.shutdown()
    for row in read(out):
        for c in row["completions"]:
            for a in c["annotations"].values():
                d = int(a["Rating"])  # fake server: p(d)=.7, p(d+1)=.2, p(d-1)=.1 within 1..9
                top = {d: .7, **({d + 1: .2} if d < 5 else {}), **({d - 1: .1} if d > 1 else {})}
                top = {k: v for k, v in top.items() if 1 <= k <= 5}
                assert a["Weighted Rating"] == pytest.approx(sum(k * v for k, v in top.items()) / sum(top.values()))


def test_server_killed_mid_run_and_restarted_rerun_judges_only_missing(inp, tmp_path):
    out, log = str(tmp_path / "out.jsonl"), str(tmp_path / "server.log")
    fake = FakeProcess(tmp_path, "--die-after", 5, "--log", log)
    try:
        with pytest.raises(JudgeRequestError):
            judge_file(inp, out, fake_config(fake.base_url, concurrency=1, max_retries=1), progress=False)
    finally:
        fake.stop()
    first = log_hashes(log)
    assert len(first) == 5 and not os.path.exists(out)
    port = fake.base_url.rsplit(":", 1)[1].split("/")[0]
    fake = FakeProcess(tmp_path, "--log", log, "--port", port)  # restarted: the same endpoint and judge model
    try:
        rep = judge_file(inp, out, fake_config(fake.base_url, concurrency=1), progress=False)
    finally:
        fake.stop()
    again = log_hashes(log)[5:]
    assert rep.cached == 5 and rep.judged == ITEMS - 5 and len(again) == ITEMS - 5
    assert not set(first) & set(again)  # nothing judged twice


def test_judge_killed_with_sigkill_resumes_from_cache(inp, tmp_path):
    out, log = str(tmp_path / "out.jsonl"), str(tmp_path / "server.log")
    fake = FakeProcess(tmp_path, "--log", log, "--slow-count", 10 ** 6, "--delay", 0.1)
    argv = [inp, out, "--base-url", fake.base_url, "--judge-model", "fake", "--concurrency", "1", "--no-progress"]
    try:
        proc = fork_run(main, argv)
        deadline = time.time() + 60
        while len(open(out + ".cache.jsonl").readlines() if os.path.exists(out + ".cache.jsonl") else []) < 4:
            assert time.time() < deadline and proc.is_alive()
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
        proc.join()
        cached = len(open(out + ".cache.jsonl").readlines())
        assert 4 <= cached < ITEMS and not os.path.exists(out)
        assert main(argv) == 0
    finally:
        fake.stop()
    hashes = log_hashes(log)
    assert len(set(hashes)) == ITEMS and len(hashes) - ITEMS <= 1  # at most the one request in flight
    assert len(read(out)) == 2


def test_bad_input_names_file_row_field(tmp_path, capsys):
    bad = write_jsonl(tmp_path / "bad.jsonl", [raw_rows(1)[0], {"instruction": "x", "completions": [{"model": "a"}]}])
    assert main([bad, str(tmp_path / "o.jsonl"), "--base-url", "http://127.0.0.1:9/v1", "--judge-model", "m"]) == 2
    assert f"{bad}: row 1, field 'completions[0].response'" in capsys.readouterr().err
