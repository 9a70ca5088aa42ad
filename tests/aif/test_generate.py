"""``zephyr-fast generate``: seeded pool/principle draws, UltraFeedback rows out, resumable after
kill -9 without redoing finished completions."""

import json
import os
import signal
import time

import pytest

from tests.aif.helpers import REPO, fork_run, save_tiny_model, write_jsonl
from zephyr_fast.aif.generate import PARTS, assign, generate_completions, load_prompts, main
from zephyr_fast.aif.ultrafeedback import principles

SAMPLE = str(REPO / "assets" / "data" / "ultrafeedback_binarized" / "sample16.jsonl")


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    d = tmp_path_factory.mktemp("pool")
    return {"alpha": save_tiny_model(d / "alpha", seed=1), "beta": save_tiny_model(d / "beta", seed=2)}


def test_assignment_is_seeded_per_prompt_and_follows_ultrafeedback():
    prompts = load_prompts(SAMPLE)
    plan = assign(prompts, ["a", "b", "c", "d", "e"], 4, seed=7)
    again = assign(list(reversed(prompts[:5])), ["e", "d", "c", "b", "a"], 4, seed=7)
    assert all(again[p["prompt_id"]] == plan[p["prompt_id"]] for p in prompts[:5])  # order-independent
    allowed = {p for ps in principles().values() for p in ps}
    for items in plan.values():
        assert len(items) == 4 and len({m for m, _, _ in items}) == 4
        assert all(pr in ("helpfulness", "honesty", "truthfulness", "verbalized_calibration") and sp in allowed
                   for _, pr, sp in items)
    assert assign(prompts, ["a", "b", "c", "d", "e"], 4, seed=8) != plan
    assert all(len(v) == 2 for v in assign(prompts, ["a", "b"], 4, seed=0).values())  # n capped at pool size


def lines(path):
    return [json.loads(x) for x in open(path)]


def test_generates_rows_and_resumes_without_redoing(pool, tmp_path):
    out = str(tmp_path / "gen")
    kw = dict(n_models=2, seed=0, max_new_tokens=3, batch_size=2, progress=False)
    rep = generate_completions(load_prompts(SAMPLE, 3), pool, out, **kw)
    assert rep.completions == 6 and rep.generated == 6 and rep.resumed == 0
    first = lines(os.path.join(out, PARTS))
    rep = generate_completions(load_prompts(SAMPLE, 5), pool, out, **kw)  # 2 more prompts
    assert rep.resumed == 6 and rep.generated == 4
    parts = lines(os.path.join(out, PARTS))
    assert parts[:6] == first and len(parts) == 10
    rows = lines(rep.output)
    assert [r["instruction"] for r in rows] == [p["instruction"] for p in load_prompts(SAMPLE, 5)]
    for r in rows:
        assert len(r["completions"]) == 2 and r["models"] == [c["model"] for c in r["completions"]]
        assert all(set(c) == {"model", "principle", "custom_system_prompt", "response"} for c in r["completions"])


def test_killed_with_sigkill_resumes_and_never_duplicates(pool, tmp_path, capsys):
    out = tmp_path / "gen"
    argv = [SAMPLE, str(out), "--n-models", "2", "--limit", "5", "--max-new-tokens", "8", "--batch-size", "1",
            "--no-progress"] + [f"--pool={k}={v}" for k, v in pool.items()]
    proc = fork_run(main, argv)  # a forked process: real SIGKILL, no interpreter start-up cost
    parts, deadline = out / PARTS, time.time() + 120
    while not (parts.exists() and len(parts.read_text().splitlines()) >= 3):
        assert proc.is_alive() and time.time() < deadline
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.join()
    before = len(parts.read_text().splitlines())
    assert proc.exitcode == -signal.SIGKILL and before < 10 and not (out / "completions.jsonl").exists()
    capsys.readouterr()
    assert main(argv) == 0
    assert f"{before} already done" in capsys.readouterr().out
    keys = [(r["prompt_id"], r["model"]) for r in lines(parts)]
    assert len(keys) == len(set(keys)) == 10 and len(lines(out / "completions.jsonl")) == 5


def test_bad_input_and_bad_pool_exit_2(pool, tmp_path, capsys):
    bad = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "ok"}, {"prompt": ""}])
    assert main([bad, str(tmp_path / "o"), "--pool", "a=" + pool["alpha"]]) == 2
    assert f"{bad}: row 1, field 'prompt'" in capsys.readouterr().err
    assert main([SAMPLE, str(tmp_path / "o"), "--pool", "a=/nonexistent"]) == 2
    assert "pool model 'a': model '/nonexistent': no such file or directory" in capsys.readouterr().err


def _gen(prompts, pool, out, **kw):
    return generate_completions(prompts, pool, out, **{**dict(n_models=2, seed=0, max_new_tokens=3, batch_size=2,
                                                              progress=False), **kw})


def test_a_completion_is_reused_only_for_the_same_model_settings_and_prompt_text(pool, tmp_path):
    """Issue 21: parts were keyed by (prompt_id, pool name) only."""
    out, prompts = str(tmp_path / "gen"), load_prompts(SAMPLE, 2)
    assert _gen(prompts, pool, out).generated == 4
    assert _gen(prompts, pool, out).resumed == 4
    assert _gen(prompts, pool, out, max_new_tokens=4).generated == 4  # other sampling settings
    assert _gen(prompts, pool, out, temperature=0.5).generated == 4
    other = save_tiny_model(tmp_path / "other", seed=3)  # another model under the name "alpha"
    rep = _gen(prompts, {"alpha": other, "beta": pool["beta"]}, out)
    assert rep.generated == 2 and rep.resumed == 2
    edited = [{**prompts[0], "instruction": prompts[0]["instruction"] + " Answer in French."}, prompts[1]]
    rep = _gen(edited, pool, out)  # the same prompt_id, another text
    assert rep.generated == 2 and rep.resumed == 2
    row = lines(rep.output)[0]
    assert row["instruction"].endswith("Answer in French.")
    fresh = {(r["prompt_id"], r["model"]): r["response"] for r in lines(os.path.join(out, PARTS))[-2:]}
    assert {(row["prompt_id"], c["model"]): c["response"] for c in row["completions"]} == fresh


def test_an_edited_or_damaged_part_line_is_generated_again(pool, tmp_path):
    out, prompts = str(tmp_path / "gen"), load_prompts(SAMPLE, 2)
    _gen(prompts, pool, out)
    parts = os.path.join(out, PARTS)
    recs = open(parts, "rb").read().splitlines(keepends=True)
    first = json.loads(recs[0])
    recs[0] = (json.dumps({**first, "response": "edited by hand"}) + "\n").encode()
    recs[1] = recs[1][:10] + b"\xff" + recs[1][11:]
    open(parts, "wb").write(b"".join(recs))
    rep = _gen(prompts, pool, out)
    assert rep.damaged_lines == 2 and rep.generated == 2 and rep.resumed == 2
    assert "edited by hand" not in open(rep.output).read()


def test_prompts_file_errors_are_one_line_naming_file_row_and_field(pool, tmp_path, capsys):
    argv = [str(tmp_path / "o"), "--pool", "a=" + pool["alpha"], "--no-progress"]
    bad = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "ok"}, {"prompt": "x", "prompt_id": ["a", "list"]}])
    assert main([bad, *argv]) == 2
    assert capsys.readouterr().err == f"error: {bad}: row 1, field 'prompt_id': expected a string, got list\n"
    raw = tmp_path / "latin1.jsonl"
    raw.write_bytes(b'{"prompt": "ok"}\n{"prompt": "caf\xe9"}\n')
    assert main([str(raw), *argv]) == 2
    assert capsys.readouterr().err == f"error: {raw}: line 2: not UTF-8 (byte 0xe9 at column 16)\n"


def test_output_folder_refusals_and_one_writer(pool, tmp_path, capsys):
    from zephyr_fast.outputs import claim_folder

    argv = ["--pool", "alpha=" + pool["alpha"], "--limit", "1", "--max-new-tokens", "2", "--no-progress"]
    listing = sorted(os.listdir(pool["alpha"]))
    assert main([SAMPLE, pool["alpha"], *argv]) == 2
    assert "is also the run's input (pool model alpha)" in capsys.readouterr().err
    assert sorted(os.listdir(pool["alpha"])) == listing  # nothing written into the model
    assert main([SAMPLE, SAMPLE, *argv]) == 2
    assert "is an existing file" in capsys.readouterr().err
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / PARTS).write_text('{"not": "ours"}\n')
    assert main([SAMPLE, str(foreign), *argv]) == 2
    assert "not written by zephyr_fast" in capsys.readouterr().err
    with claim_folder(str(tmp_path / "busy"), "generate"):
        assert main([SAMPLE, str(tmp_path / "busy"), *argv]) == 2
    assert f"another writer holds it (zephyr-fast generate, pid {os.getpid()}" in capsys.readouterr().err
    assert main([SAMPLE, str(tmp_path / "busy"), *argv]) == 0  # released: the folder is ours to resume
