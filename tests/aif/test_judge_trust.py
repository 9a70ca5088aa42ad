"""The judge trusts nothing it reads back and remembers nothing but answers (issue 21): protocol
failures and timeouts are never cached, the cache key names the endpoint and the exact request,
sealed cache lines (an edited or damaged line is asked again), ``--retry-failed``, one writer per
output and cache, outputs that are inputs or foreign files refused, the API key in no message."""

import json
import os

import pytest

from tests.aif.fake_openai import Faults, start_in_thread
from tests.aif.helpers import fake_config, raw_rows, write_jsonl
from zephyr_fast.aif.client import JudgeClient, JudgeConfig, JudgeRequestError
from zephyr_fast.aif.judge import judge_file, main
from zephyr_fast.aif.store import seal
from zephyr_fast.outputs import claim_file

ITEMS = 2 * 2 * 4  # rows x completions x aspects
BODIES = {
    "html": ("<html><body><h1>502 Bad Gateway</h1></body></html>", "text/html"),
    "no choices": ('{"id": "x", "object": "chat.completion"}', "application/json"),
    "empty choices": ('{"id": "x", "object": "chat.completion", "created": 0, "model": "m", "choices": []}',
                      "application/json"),
    "null content": ('{"id": "x", "object": "chat.completion", "created": 0, "model": "m", "choices": [{"index": 0, '
                     '"finish_reason": "stop", "message": {"role": "assistant", "content": null}}]}',
                     "application/json"),
    "not json": ("{{{", "application/json"),
}


@pytest.fixture
def inp(tmp_path):
    return write_jsonl(tmp_path / "in.jsonl", raw_rows(2, 2))


@pytest.fixture
def healthy():
    srv, url = start_in_thread(Faults())
    yield url
    srv.shutdown()


def judge(inp, out, **faults_and_config):
    faults = {k: faults_and_config.pop(k) for k in list(faults_and_config) if k in Faults.__dataclass_fields__}
    srv, url = start_in_thread(Faults(**faults))
    try:
        return judge_file(inp, out, fake_config(url, **faults_and_config), progress=False)
    finally:
        srv.shutdown()


def cache_lines(out):
    return [json.loads(line) for line in open(out + ".cache.jsonl")]


@pytest.mark.parametrize("kind", sorted(BODIES))
def test_a_protocol_failure_is_retried_and_never_cached(inp, tmp_path, healthy, kind, capsys):
    out = str(tmp_path / "out.jsonl")
    body, ctype = BODIES[kind]
    rep = judge(inp, out, bad_body=body, bad_type=ctype, bad_count=3)  # a glitch: retried, then answers
    assert rep.judged == ITEMS and rep.unparseable == 0 and rep.usage["retries"] == 3
    os.remove(out + ".cache.jsonl")
    srv, url = start_in_thread(Faults(bad_body=body, bad_type=ctype, bad_count=10 ** 6))
    try:  # the endpoint is broken for good: one line, exit 1, nothing cached
        rc = main([inp, out, "--base-url", url, "--judge-model", "fake-judge", "--max-retries", "1", "--no-progress"])
    finally:
        srv.shutdown()
    err = capsys.readouterr().err
    assert rc == 1 and "ProtocolError" in err and len(err.strip().splitlines()) == 1
    assert os.path.getsize(out + ".cache.jsonl") == 0
    rep = judge_file(inp, out, fake_config(healthy), progress=False)  # the next run against a healthy server
    assert rep.cached == 0 and rep.judged == ITEMS and rep.unparseable == 0


def test_timeout_is_a_total_deadline_not_a_per_read_limit(tmp_path):
    """The server trickles every byte 10 ms apart: no single read waits longer than 10 ms, the whole
    answer takes seconds; with ``--timeout 0.3`` the request fails (a per-read timeout never fires)."""
    srv, url = start_in_thread(Faults(trickle=0.01))
    try:
        client = JudgeClient(fake_config(url, timeout=0.3, max_retries=0))
        with pytest.raises(JudgeRequestError, match="APITimeoutError"):
            client.chat([{"role": "user", "content": "x"}])
    finally:
        srv.shutdown()


def test_retry_failed_asks_again_for_answers_that_never_parsed(inp, tmp_path, healthy):
    out = str(tmp_path / "out.jsonl")
    assert judge(inp, out, garbage=True, max_reasks=0, endpoint_id="fake").unparseable == ITEMS
    rep = judge_file(inp, out, fake_config(healthy, endpoint_id="fake"), progress=False)
    assert rep.cached == ITEMS and rep.unparseable == ITEMS  # recorded answers are not asked again by default
    rep = judge_file(inp, out, fake_config(healthy, endpoint_id="fake"), progress=False, retry_failed=True)
    assert rep.judged == ITEMS and rep.unparseable == 0
    rep = judge_file(inp, out, fake_config(healthy, endpoint_id="fake"), progress=False, retry_failed=True)
    assert rep.cached == ITEMS and rep.judged == 0  # parsed answers are never re-asked


def test_cache_key_names_the_endpoint_and_the_request(inp, tmp_path, healthy):
    out = str(tmp_path / "out.jsonl")
    judge(inp, out)
    rep = judge_file(inp, out, fake_config(healthy), progress=False)  # same model name, another server
    assert rep.cached == 0 and rep.judged == ITEMS
    rep = judge_file(inp, out, fake_config(healthy, endpoint_id="my-judge"), progress=False)
    assert rep.cached == 0
    rep = judge_file(inp, out, fake_config(healthy, endpoint_id="my-judge", temperature=0.5), progress=False)
    assert rep.cached == 0  # another sampling setting is another request
    assert judge_file(inp, out, fake_config(healthy, endpoint_id="my-judge"), progress=False).cached == ITEMS


def _edit_first(out, edit):
    lines = open(out + ".cache.jsonl", "rb").read().splitlines(keepends=True)
    lines[0] = edit(lines[0])
    open(out + ".cache.jsonl", "wb").write(b"".join(lines))


def _rating_7(line: bytes, *, reseal: bool) -> bytes:
    rec = json.loads(line)
    rec["parsed"]["Rating"] = "7"
    return (json.dumps(seal(rec) if reseal else rec) + "\n").encode()


@pytest.mark.parametrize("damage", ["edited", "edited and resealed", "not utf-8", "not json"])
def test_a_damaged_or_edited_cache_line_is_asked_again_never_trusted(inp, tmp_path, healthy, damage):
    out = str(tmp_path / "out.jsonl")
    judge(inp, out, endpoint_id="fake")
    edit = {"edited": lambda b: _rating_7(b, reseal=False), "edited and resealed": lambda b: _rating_7(b, reseal=True),
            "not utf-8": lambda b: b[:20] + b"\xff\xfe" + b[22:], "not json": lambda b: b"{oops\n"}[damage]
    _edit_first(out, edit)
    rep = judge_file(inp, out, fake_config(healthy, endpoint_id="fake"), progress=False)
    assert rep.damaged_cache_lines == 1 and rep.judged == 1 and rep.cached == ITEMS - 1
    assert "1 damaged cache lines ignored" in str(rep)
    ratings = [a["Rating"] for r in map(json.loads, open(out)) for c in r["completions"]
               for a in c["annotations"].values()]
    assert len(ratings) == ITEMS and set(ratings) <= set("12345")  # the 7 never reaches binarize


def test_second_judge_on_one_output_or_cache_is_refused_in_one_line(inp, tmp_path, capsys):
    out = str(tmp_path / "out.jsonl")
    argv = [inp, out, "--base-url", "http://127.0.0.1:9/v1", "--judge-model", "m", "--no-progress"]
    for held in (out, out + ".cache.jsonl"):
        with claim_file(held, "judge"):
            assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"pid {os.getpid()}" in err and "another writer holds it" in err
    with claim_file(str(tmp_path / "other.jsonl.cache.jsonl"), "judge"):  # a cache shared by two outputs
        assert main(argv + ["--cache", str(tmp_path / "other.jsonl.cache.jsonl")]) == 2


def test_stale_lock_of_a_dead_process_is_taken_over(inp, tmp_path, healthy):
    import subprocess
    import sys

    out = str(tmp_path / "out.jsonl")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    for path in (out + ".lock", out + ".cache.jsonl.lock"):
        with open(path, "w") as f:
            json.dump({"command": "judge", "pid": int(dead.stdout), "host": "here"}, f)
    assert judge_file(inp, out, fake_config(healthy), progress=False).judged == ITEMS
    assert json.load(open(out + ".lock"))["pid"] == os.getpid()


def test_output_that_is_the_input_or_a_foreign_file_is_refused(inp, tmp_path, healthy, capsys):
    argv = ["--base-url", healthy, "--judge-model", "fake-judge", "--no-progress"]
    before = open(inp).read()
    assert main([inp, inp, *argv]) == 2
    assert "is also the run's input" in capsys.readouterr().err and open(inp).read() == before
    foreign = tmp_path / "notes.jsonl"
    foreign.write_text("my own notes\n")
    assert main([inp, str(foreign), *argv]) == 2
    assert "--overwrite_output_dir" in capsys.readouterr().err and foreign.read_text() == "my own notes\n"
    assert main([inp, str(foreign), *argv, "--overwrite_output_dir"]) == 0
    assert main([inp, str(foreign), *argv]) == 0  # written by zephyr_fast now: a rerun needs no flag


def test_api_key_is_in_no_error_message(inp, tmp_path, monkeypatch, capsys):
    key = "sk-PLANTED-judge-key-0123456789"
    monkeypatch.setenv("ZEPHYR_JUDGE_API_KEY", key)
    assert main([inp, str(tmp_path / "o.jsonl"), "--judge-model", "m", "--concurrency", "0"]) == 2
    err = capsys.readouterr().err
    assert err == "error: judge: concurrency must be an integer >= 1, got 0\n"
    assert key not in repr(JudgeConfig.from_env(model="m"))
    srv, url = start_in_thread(Faults(fail_status=401, fail_count=10 ** 6, echo_auth=True))
    try:
        assert main([inp, str(tmp_path / "o.jsonl"), "--base-url", url, "--judge-model", "m", "--no-progress"]) == 1
    finally:
        srv.shutdown()
    err = capsys.readouterr().err
    assert "HTTP 401" in err and "Bearer <redacted>" in err and key not in err
    assert all(key not in open(os.path.join(tmp_path, n), errors="replace").read() for n in os.listdir(tmp_path))
