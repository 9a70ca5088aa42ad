"""Shared builders for the AIF / MT-Bench tests: tiny saved models, UltraFeedback-format rows, judge
configs pointed at loopback servers, a fake-server subprocess."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import time

import torch

from zephyr_fast.aif.client import JudgeConfig
from zephyr_fast.data.chat import load_tokenizer
from zephyr_fast.model import load_model, tiny_config

REPO = pathlib.Path(__file__).resolve().parents[2]
TOKENIZER = REPO / "assets" / "tokenizers" / "mistral-7b-v0.1"


def save_tiny_model(path, seed: int = 0, hidden_size: int = 32, num_hidden_layers: int = 1) -> str:
    """A random-init Mistral-architecture model (real tokenizer + Zephyr template) saved to ``path``."""
    torch.manual_seed(seed)
    cfg = tiny_config(hidden_size=hidden_size, num_hidden_layers=num_hidden_layers, num_attention_heads=4,
                      num_key_value_heads=2)
    model = load_model(config=cfg, attn_impl="sdpa")
    model.config._attn_implementation = "sdpa"
    model.save_pretrained(str(path))
    load_tokenizer(str(TOKENIZER)).save_pretrained(str(path))
    return str(path)


def raw_rows(n: int = 2, k: int = 2) -> list:
    """``n`` generate-format rows with ``k`` completions each (distinct texts)."""
    return [{"instruction": f"Question {i}: what is {i} + {i}?", "source": "ultrachat",
             "completions": [{"model": f"m{j}", "response": f"Answer {j} to question {i}: {2 * i + j}."}
                             for j in range(k)]} for i in range(n)]


def write_jsonl(path, rows) -> str:
    import json

    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return str(path)


def fake_config(base_url: str, **kw) -> JudgeConfig:
    """A judge config for the fake server: fast backoff, short timeout."""
    return JudgeConfig(**{"base_url": base_url, "model": "fake-judge", "api_key": "x", "backoff": 0.01,
                          "backoff_max": 0.05, "timeout": 5.0, "concurrency": 2, **kw})


class FakeProcess:
    """``tests.aif.fake_openai`` in a subprocess (so it can be killed and restarted)."""

    def __init__(self, tmp, *args):
        self.port_file = str(pathlib.Path(tmp) / f"port-{time.time_ns()}")
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.aif.fake_openai", "--port-file", self.port_file,
                                      *map(str, args)], cwd=str(REPO))
        deadline = time.time() + 30
        while not os.path.exists(self.port_file):
            if self.proc.poll() is not None or time.time() > deadline:
                raise RuntimeError("fake server did not start")
            time.sleep(0.05)
        self.base_url = f"http://127.0.0.1:{open(self.port_file).read()}/v1"

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


def log_hashes(path) -> list:
    import json

    if not os.path.exists(path):
        return []
    return [json.loads(line)["hash"] for line in open(path) if line.strip()]


def fork_run(fn, *args):
    """Run ``fn(*args)`` in a forked child (started, not joined): a real process to ``kill -9``
    without paying Python + torch start-up again.  The child runs torch on one thread: an OpenMP
    pool the parent already used does not survive ``fork``."""
    import multiprocessing

    proc = multiprocessing.get_context("fork").Process(target=_single_threaded, args=(fn, *args), daemon=True)
    proc.start()
    return proc


def _single_threaded(fn, *args):
    torch.set_num_threads(1)
    fn(*args)
