"""Peak memory of ``zephyr-fast plan`` against the size of its JSON Lines input (issue 21: "reading
data is streamed, memory independent of file size, measured").

    python -m benchmarks.plan_memory [--sizes-mb 20 200] [--stages sft dpo] [--json OUT.json]

For each stage and size: a JSON Lines file of that size is made from the bundled real rows
(``assets/data/ultrachat_200k/sample16.jsonl`` for SFT, ``assets/data/ultrafeedback_binarized/
sample16.jsonl`` for DPO, each copy's first user turn tagged with its copy number so that no two rows
are equal), a recipe is written from ``recipes/tiny/{sft,dpo}.yaml`` with that file as its only
dataset (``max_length`` 2048, as Zephyr's recipes; the DPO model a random init so that nothing has to
be trained first), and ``python -m zephyr_fast.cli plan RECIPE`` runs in a fresh process while this
process samples its ``/proc/PID/status`` every 20 ms. Reported per run:

* ``peak_rss_mb``: the kernel's peak resident set (``ru_maxrss`` of the child), everything included;
* ``peak_anon_mb``: the largest sampled ``RssAnon`` -- the process's own (heap) memory, without the
  file-backed pages of memory-mapped Arrow files, which are page cache the kernel reclaims under
  pressure (``peak_file_mb``, the largest sampled ``RssFile``, shows them);
* ``seconds`` and the plan's first line of data (the row / example counts), so two runs can be
  checked to have planned the same data.

The growth from the smaller to the larger file is the figure that matters: memory that is independent
of the file size grows by the per-example arrays alone (a few bytes per example), not by the rows or
their tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCES = {"sft": os.path.join(ROOT, "assets", "data", "ultrachat_200k", "sample16.jsonl"),
           "dpo": os.path.join(ROOT, "assets", "data", "ultrafeedback_binarized", "sample16.jsonl")}
TOKENIZER = os.path.join(ROOT, "assets", "tokenizers", "mistral-7b-v0.1")
MODEL_INIT = ("{arch: mistral, vocab_size: 32000, hidden_size: 256, num_hidden_layers: 4, num_attention_heads: 4, "
              "num_key_value_heads: 2, intermediate_size: 512}")


def _tag(row: dict, k: int, stage: str) -> dict:
    """A copy of ``row`` whose first user turn ends with `` (copy k)``, the same in chosen and rejected."""
    row = json.loads(json.dumps(row))
    fields = ("messages",) if stage == "sft" else ("chosen", "rejected", "messages")
    for f in fields:
        turns = row.get(f) or []
        for m in turns:
            if m.get("role") == "user":
                m["content"] += f" (copy {k})"
                break
    if isinstance(row.get("prompt"), str):
        row["prompt"] += f" (copy {k})"
    return row


def make_jsonl(stage: str, size_bytes: int, path: str) -> int:
    """Writes ``path`` (at least ``size_bytes``), returns its number of rows."""
    with open(SOURCES[stage], encoding="utf-8") as f:
        base = [json.loads(line) for line in f if line.strip()]
    n, written = 0, 0
    with open(path, "w", encoding="utf-8") as out:
        while written < size_bytes:
            line = json.dumps(_tag(base[n % len(base)], n, stage), ensure_ascii=False) + "\n"
            out.write(line)
            written += len(line.encode("utf-8"))
            n += 1
    return n


def make_recipe(stage: str, data_path: str, folder: str) -> str:
    """The tiny recipe of ``stage`` on ``data_path`` (max_length 2048, random-init model)."""
    common = (f"model_init: {MODEL_INIT}\ntokenizer_name_or_path: {TOKENIZER}\ntorch_dtype: float32\n"
              f"dataset_mixture:\n  datasets:\n    - {{id: {data_path}, split: train, columns: "
              f"{'[messages]' if stage == 'sft' else '[chosen, rejected]'}}}\n  seed: 0\n  test_split_size: 16\n"
              "skip_invalid_rows: true\nnum_train_epochs: 1\ngradient_accumulation_steps: 1\nseed: 42\n"
              f"report_to: []\noutput_dir: {os.path.join(folder, 'out')}\n")
    if stage == "sft":
        body = "stage: sft\nmax_seq_length: 2048\nper_device_train_batch_size: 4\n"
    else:
        body = ("stage: dpo\nmax_length: 2048\nmax_prompt_length: 1024\ndpo_layout: separate\nbeta: 0.1\n"
                "per_device_train_batch_size: 8\n")
    path = os.path.join(folder, f"{stage}.yaml")
    with open(path, "w") as f:
        f.write(body + common)
    return path


def _status(pid: int) -> dict:
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                k, _, v = line.partition(":")
                if k in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
                    out[k] = int(v.split()[0]) * 1024
    except OSError:
        pass
    return out


def run_plan(recipe: str) -> dict:
    """``zephyr-fast plan recipe`` in a fresh process, its memory sampled every 20 ms."""
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "zephyr_fast.cli", "plan", recipe], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = {"RssAnon": 0, "RssFile": 0, "VmRSS": 0}
    done = threading.Event()

    def sample():
        while not done.is_set():
            s = _status(proc.pid)
            for k in peak:
                peak[k] = max(peak[k], s.get(k, 0))
            time.sleep(0.02)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    stdout, stderr = proc.communicate()
    done.set()
    th.join()
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"plan failed ({proc.returncode}): {stderr[-2000:]}")
    # the children's peak (the only child of this process that has ended so far this call)
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    data_line = next((ln for ln in stdout.splitlines() if ln.startswith("data:")), "")
    return {"peak_rss_mb": ru.ru_maxrss / 1024, "peak_sampled_rss_mb": peak["VmRSS"] / 2 ** 20,
            "peak_anon_mb": peak["RssAnon"] / 2 ** 20, "peak_file_mb": peak["RssFile"] / 2 ** 20,
            "seconds": round(seconds, 1), "plan": stdout, "data": data_line.strip()}


def measure_one(stage: str, size_mb: float) -> dict:
    """One fresh process per measurement (``ru_maxrss`` of RUSAGE_CHILDREN is a maximum over children)."""
    code = ("import json, sys; from benchmarks.plan_memory import _measure_here; "
            f"print(json.dumps(_measure_here({stage!r}, {size_mb!r})))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def _measure_here(stage: str, size_mb: float) -> dict:
    with tempfile.TemporaryDirectory(prefix="zf_plan_mem_") as d:
        data = os.path.join(d, f"{stage}.jsonl")
        rows = make_jsonl(stage, int(size_mb * 2 ** 20), data)
        r = run_plan(make_recipe(stage, data, d))
        r.update(stage=stage, file_mb=round(os.path.getsize(data) / 2 ** 20, 1), rows=rows)
        return r


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.plan_memory")
    ap.add_argument("--sizes-mb", type=float, nargs="+", default=[20, 200])
    ap.add_argument("--stages", nargs="+", default=["sft", "dpo"], choices=["sft", "dpo"])
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args(argv)
    results = []
    print(f"machine: {os.uname().nodename}, {os.cpu_count()} CPUs, python {sys.version.split()[0]}")
    print("| stage | file MB | rows | peak RSS MB | peak anon MB | peak file-backed MB | s |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for stage in args.stages:
        for size in args.sizes_mb:
            r = measure_one(stage, size)
            results.append({k: v for k, v in r.items() if k != "plan"} | {"plan": r["plan"]})
            print(f"| {stage} | {r['file_mb']} | {r['rows']} | {r['peak_rss_mb']:.0f} | {r['peak_anon_mb']:.0f} | "
                  f"{r['peak_file_mb']:.0f} | {r['seconds']} |", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
