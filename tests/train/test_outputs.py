"""The trainer's output folder (issue 21): one writer, nothing clobbered, no input overwritten, no
secret in any artefact, bounded recipes; every refusal one line with exit status 2."""

import json
import os
import subprocess
import sys

import pytest
import yaml
from tests.train.helpers import REPO, recipe

from zephyr_fast.outputs import LOCK_NAME, claim_folder
from zephyr_fast.train import main


def write_recipe(path, r) -> str:
    path.write_text(yaml.safe_dump(r))
    return str(path)


def refused(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


def test_a_second_writer_is_refused_and_a_dead_holder_lock_is_taken_over(sft_dir, tmp_path, capsys):
    out = tmp_path / "run"
    path = write_recipe(tmp_path / "r.yaml", recipe("sft", out, sft_dir, max_steps=1))
    with claim_folder(str(out), "train"):
        err = refused(capsys, [path])
    assert f"another writer holds it (zephyr-fast train, pid {os.getpid()}" in err
    assert sorted(os.listdir(out)) == [LOCK_NAME]  # the refused run wrote nothing
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (out / LOCK_NAME).write_text(json.dumps({"command": "train", "pid": int(dead.stdout), "host": "gone"}))
    assert main([path]) == 0  # the dead process's lock is taken over
    assert json.loads((out / LOCK_NAME).read_text())["pid"] == os.getpid()


def test_inputs_are_never_outputs(sft_dir, tmp_path, capsys):
    from tests.aif.helpers import save_tiny_model

    model = save_tiny_model(tmp_path / "model")
    capsys.readouterr()
    before = {n: os.path.getmtime(os.path.join(model, n)) for n in os.listdir(model)}
    r = recipe("sft", model, sft_dir, max_steps=1, model_name_or_path=model)
    r.pop("model_init")
    err = refused(capsys, [write_recipe(tmp_path / "r.yaml", r)])
    assert "is also the run's input (model_name_or_path)" in err
    assert {n: os.path.getmtime(os.path.join(model, n)) for n in os.listdir(model)} == before
    data_file = os.path.join(sft_dir, "train.jsonl")
    err = refused(capsys, [write_recipe(tmp_path / "r.yaml", recipe("sft", data_file, sft_dir, max_steps=1))])
    assert f"output folder {data_file}: is an existing file" in err
    err = refused(capsys, [write_recipe(tmp_path / "r.yaml", recipe("sft", sft_dir, sft_dir, max_steps=1))])
    assert f"is also the run's input (dataset {sft_dir})" in err


def test_a_foreign_folder_and_an_earlier_runs_checkpoints_are_not_clobbered(sft_dir, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.yaml").write_text("someone else's\n")
    path = write_recipe(tmp_path / "r.yaml", recipe("sft", out, sft_dir, max_steps=2, save_strategy="steps",
                                                    save_steps=1, save_total_limit=1))
    assert "not written by zephyr_fast" in refused(capsys, [path])
    assert (out / "config.yaml").read_text() == "someone else's\n"
    assert main([path, "--overwrite_output_dir=true"]) == 0  # TRL's key: the user says so
    capsys.readouterr()
    (ckpt,) = [n for n in os.listdir(out) if n.startswith("checkpoint-")]
    err = refused(capsys, [path])  # a fresh run would rotate it away
    assert f"holds an earlier run's checkpoints ({ckpt})" in err and (out / ckpt).is_dir()
    assert main([path, "--resume_from_checkpoint=auto"]) == 0  # resuming its own run is fine


def test_recipe_bombs_and_infinite_values_are_one_line(tmp_path, capsys):
    bomb = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{c}: &{c} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]\n"
        for p, c in zip("abcdefgh", "bcdefghi"))
    (tmp_path / "bomb.yaml").write_text(bomb + "lr_scheduler_kwargs: {x: *i}\n")
    assert "YAML aliases expand to" in refused(capsys, [str(tmp_path / "bomb.yaml")])
    (tmp_path / "loop.yaml").write_text("lr_scheduler_kwargs: &k {self: *k}\n")
    assert "refers to itself" in refused(capsys, [str(tmp_path / "loop.yaml")])
    base = write_recipe(tmp_path / "r.yaml", recipe("sft", tmp_path / "o", str(tmp_path), max_steps=1))
    assert "learning_rate: must be a finite number, got inf" in refused(capsys, [base, "--learning_rate=inf"])
    assert "num_train_epochs: must be <= 1e+06" in refused(capsys, [base, "--num_train_epochs=1e308"])
    (tmp_path / "latin1.yaml").write_bytes(b"learning_rate: 1.0e-3\nrun_name: caf\xe9\n")
    assert "latin1.yaml: not valid YAML" in refused(capsys, [str(tmp_path / "latin1.yaml")])


@pytest.mark.parametrize("where", ["recipe", "command line"])
def test_a_planted_hub_token_reaches_no_artefact(sft_dir, tmp_path, where):
    """A whole ``zephyr-fast train`` process with wandb (offline: its run files are what an online run
    uploads): the token is in no file of the run folder or wandb's, nor in stdout / stderr."""
    token = "hf_PLANTEDtoken0123456789abcdef"
    out, wandb_dir = tmp_path / "run", tmp_path / "wandb"
    wandb_dir.mkdir()
    r = recipe("sft", out, sft_dir, max_steps=1, report_to=["wandb", "tensorboard"], run_name="planted")
    extra = []
    if where == "recipe":
        r["hub_token"] = token
    else:
        extra = [f"--hub_token={token}"]
    path = write_recipe(tmp_path / "r.yaml", r)
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_DIR": str(wandb_dir), "WANDB_SILENT": "true",
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "zephyr_fast.cli", "train", path, *extra], cwd=REPO, env=env,
                          capture_output=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (out / "README.md").exists() and any(wandb_dir.rglob("*.wandb"))
    assert token.encode() not in proc.stdout + proc.stderr
    leaks = [str(p) for top in (out, wandb_dir) for p in top.rglob("*") if p.is_file() and token.encode() in
             p.read_bytes()]
    assert leaks == []
    if where == "recipe":
        assert "hub_token: <redacted>" in (out / "README.md").read_text()  # the recipe as written, masked
    else:  # wandb did record the command line (so the check above can fail), masked
        assert any(b"--hub_token=<redacted>" in p.read_bytes() for p in wandb_dir.rglob("*.wandb"))


def test_redaction_masks_registered_and_environment_secrets_in_every_form(monkeypatch):
    from zephyr_fast import redaction

    monkeypatch.setenv("OPENAI_API_KEY", "sk-env-secret-value")
    argv = ["train", "r.yaml", "--hub_token=hf_flag_secret", "--hub_token", "hf_next_secret", "--judge.api_key=sk-j"]
    assert redaction.redact_argv(argv) == ["train", "r.yaml", "--hub_token=<redacted>", "--hub_token", "<redacted>",
                                           "--judge.api_key=<redacted>"]
    text = "hf_flag_secret and hf_next_secret, sk-env-secret-value; serve_local's key 'local' or sk-j stays"
    assert redaction.redact(text) == "<redacted> and <redacted>, <redacted>; serve_local's key 'local' or sk-j stays"
