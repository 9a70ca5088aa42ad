"""Whole-process training runs for the e2e tier: zephyr_fast's trainer vs TRL's DPOTrainer / SFTTrainer.

Each run is one fresh process, launched the way a user launches it, and timed from launch to exit:

* zephyr_fast: ``python -m zephyr_fast.train RECIPE.yaml`` (the recipe this module writes);
* TRL: ``python -m benchmarks.e2e trl {dpo|sft} MODEL DATA OUT EPOCHS``: a script that builds
  ``DPOTrainer`` / ``SFTTrainer`` from the same folder and rows and calls ``train()``.

Same random-init Mistral saved to one folder both trainers load (``MODELS``: the tiny one of
``recipes/tiny`` and issue 13's compute-dominated D768 × 6 layers), same real Mistral tokenizer with
the Zephyr chat template, same real rows (UltraFeedback pairs of
``assets/data/ultrafeedback_binarized/flat1k.jsonl`` in conversational form; SFT uses prompt + chosen
as one conversation, loss on every token as TRL's default), max_length 512 (prompts ≤ 200 tokens, so
no trainer cuts a prompt), batch 8 pairs (DPO) or 8 packed sequences of 512 tokens (SFT, TRL's
``packing_strategy="bfd"`` with ``padding_free``), fp32, one process.

What each run reports (``whole_process``):

* ``whole_s``: launch → exit; ``epoch_whole_s[k]``: launch → end of epoch ``k+1`` of the same run,
  i.e. what a run of ``k+1`` epochs costs before its exit (neither trainer saves a model here);
* ``phases``: where the seconds went — start-up (interpreter and imports: zephyr_fast's up to its
  config, TRL's script up to its first line), data (tokenising, packing), model (loading), TRL's
  "data + model" (its own imports, then data, model and reference model in its constructor),
  reference (zephyr_fast's offline reference pass), one entry per epoch, exit;
* ``tokens_per_s``: the training loop's real (non-padding) tokens per second — zephyr_fast's own
  ``train_tokens_per_second``, TRL's tokenised rows after its truncation over ``on_train_begin`` →
  ``on_train_end`` (including the reference-model forwards its default runs every step).
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import time

import torch
import yaml

from .harness import REPO, TOKENIZER_DIR
from .inputs import preference_rows, tokenizer

MAX_LENGTH = 512
MAX_PROMPT_LENGTH = 256
BATCH = 8  # pairs (DPO) or packed sequences (SFT) per optimiser step, both trainers
LR = {"dpo": 5.0e-7, "sft": 2.0e-5}
OPTIM = {"dpo": "rmsprop", "sft": "adamw_torch"}
TINY = dict(arch="mistral", vocab_size=32000, hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, intermediate_size=512)
# issue 13's compute-dominated CPU model: Mistral's shape ratios (head dim 64, 3:1 GQA, MLP 3.5 x D)
MID = dict(arch="mistral", vocab_size=32000, hidden_size=768, num_hidden_layers=6, num_attention_heads=12,
           num_key_value_heads=4, intermediate_size=2688)
MODELS = {"tiny": TINY, "mid": MID}


def shape_name(model: str) -> str:
    c = MODELS[model]
    return f"{model}-mistral-h{c['hidden_size']}-l{c['num_hidden_layers']}-v{c['vocab_size']}"


def make_model_dir(root: pathlib.Path, seed: int = 0, model: str = "tiny") -> pathlib.Path:
    """Save a random ``MODELS[model]`` Mistral + the Mistral tokenizer (Zephyr chat template) under ``root``."""
    from transformers import AutoModelForCausalLM

    from zephyr_fast.data.chat import load_tokenizer
    from zephyr_fast.model.load import tiny_config

    out = root / f"{model}-mistral"
    torch.manual_seed(seed)
    cfg = tiny_config(**MODELS[model])
    net = AutoModelForCausalLM.from_config(cfg)
    net.save_pretrained(out, safe_serialization=True)
    tok = load_tokenizer(str(TOKENIZER_DIR))
    tok.save_pretrained(out)
    return out


def write_rows(root: pathlib.Path, pairs: int) -> dict:
    """The same real rows in the two shapes the trainers read: preference pairs and SFT conversations."""
    # rows whose prompt fits max_prompt_length with room for the template, so that no trainer drops
    # or cuts a prompt differently: both see exactly these rows
    tok = tokenizer()
    rows = [r for r in preference_rows(4 * pairs) if len(tok(r["prompt"]).input_ids) <= MAX_PROMPT_LENGTH - 56]
    rows = rows[:pairs]
    pref = root / f"pairs{len(rows)}.jsonl"
    sft = root / f"sft{len(rows)}.jsonl"
    with open(pref, "w") as f:
        for r in rows:
            f.write(json.dumps({"prompt": [{"role": "user", "content": r["prompt"]}],
                                "chosen": [{"role": "assistant", "content": r["chosen"]}],
                                "rejected": [{"role": "assistant", "content": r["rejected"]}]}) + "\n")
    with open(sft, "w") as f:
        for r in rows:
            f.write(json.dumps({"messages": [{"role": "user", "content": r["prompt"]},
                                             {"role": "assistant", "content": r["chosen"]}]}) + "\n")
    return {"pairs": pref, "sft": sft, "n": len(rows)}


# ----------------------------------------------------------------------------------------------
# zephyr_fast
# ----------------------------------------------------------------------------------------------

def prompt_length(max_length: int) -> int:
    """``MAX_PROMPT_LENGTH`` at ``MAX_LENGTH``; half of a shorter (test) length."""
    return MAX_PROMPT_LENGTH if max_length >= MAX_LENGTH else max_length // 2


def zephyr_recipe(stage: str, model_dir: pathlib.Path, data_file: pathlib.Path, out_dir: pathlib.Path,
                  epochs: int = 1, *, batch: int = BATCH, max_length: int = MAX_LENGTH) -> dict:
    """The recipe of a run equivalent to :func:`trl_trainer`'s (same batch, optimiser and LR)."""
    columns = ["messages"] if stage == "sft" else ["prompt", "chosen", "rejected"]
    raw = {
        "stage": stage, "model_name_or_path": str(model_dir), "torch_dtype": "float32",
        "dataset_mixture": {"datasets": [{"id": str(data_file), "split": "train", "columns": columns}], "seed": 0},
        "max_length": max_length, "per_device_train_batch_size": batch, "gradient_accumulation_steps": 1,
        "num_train_epochs": epochs, "learning_rate": LR[stage], "optim": OPTIM[stage], "lr_scheduler_type": "linear",
        "logging_steps": 1, "eval_strategy": "no", "save_strategy": "no", "save_final_model": False,
        "report_to": [], "output_dir": str(out_dir), "seed": 42,
    }
    if stage == "dpo":
        raw.update(beta=0.1, loss_type="sigmoid", max_prompt_length=prompt_length(max_length))
    else:  # TRL's SFTTrainer default on a messages dataset: loss on every token
        raw.update(packing=True, assistant_only_loss=False)
    return raw


def zephyr_process(stage: str, model_dir, data_file, out_dir: pathlib.Path, epochs: int, *,
                   batch: int = BATCH) -> dict:
    """One whole ``python -m zephyr_fast.train`` process; its phases from ``summary.json``'s timeline."""
    out_dir.mkdir(parents=True, exist_ok=True)
    recipe = out_dir / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(zephyr_recipe(stage, model_dir, data_file, out_dir / "run", epochs, batch=batch)))
    launch, exited = _launch([sys.executable, "-m", "zephyr_fast.train", str(recipe)], out_dir)
    s = json.loads((out_dir / "run" / "summary.json").read_text())
    tl = s["timeline"]
    marks = [("start-up", tl["start"]), ("data", tl["data"]), ("model", tl["model"])]
    if "reference" in tl:
        marks.append(("reference", tl["reference"]))
    out = _phases(launch, exited, marks, tl["epochs"])
    out.update(tokens=s["train_tokens"], tokens_per_s=s["train_tokens_per_second"], loop_s=s["train_runtime"],
               ref_tokens_per_s=s.get("ref_logps_train_tokens_per_second"), loss=s.get("train_loss"))
    return out


# ----------------------------------------------------------------------------------------------
# TRL
# ----------------------------------------------------------------------------------------------

def trl_process(stage: str, model_dir, data_file, out_dir: pathlib.Path, epochs: int, *,
                batch: int = BATCH) -> dict:
    """One whole TRL process (this module's ``main``); its phases from the callback's timeline."""
    out_dir.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, "-m", "benchmarks.e2e", "trl", stage, str(model_dir), str(data_file), str(out_dir),
            str(epochs), str(batch)]
    launch, exited = _launch(argv, out_dir)
    s = json.loads((out_dir / "trl_summary.json").read_text())
    tl = s["timeline"]
    out = _phases(launch, exited, [("start-up", tl["start"]), ("data + model", tl["begin"])], tl["epochs"])
    out.update(tokens=s["train_tokens"], tokens_per_s=s["train_tokens_per_second"], loop_s=s["train_runtime"],
               loss=s.get("train_loss"))
    return out


def _launch(argv: list, out_dir: pathlib.Path) -> tuple:
    """Run ``argv`` from the repo root; ``(launch, exit)`` wall times.  Output goes to ``out_dir/log.txt``."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
           "TQDM_DISABLE": "1"}
    with open(out_dir / "log.txt", "w") as log:
        launch = time.time()
        proc = subprocess.run(argv, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        exited = time.time()
    if proc.returncode != 0:
        tail = (out_dir / "log.txt").read_text()[-3000:]
        raise RuntimeError(f"{' '.join(argv[:4])} exited {proc.returncode}:\n{tail}")
    return launch, exited


def _phases(launch: float, exited: float, marks: list, epochs: list) -> dict:
    """Seconds per phase from wall-time marks: each mark ends its phase; epochs, then exit."""
    phases, t = {}, launch
    for name, when in marks:
        phases[name], t = when - t, when
    for k, when in enumerate(epochs):
        phases[f"epoch {k + 1}"], t = when - t, when
    phases["exit"] = exited - t
    return {"whole_s": exited - launch, "epoch_whole_s": [e - launch for e in epochs], "phases": phases,
            "epochs": len(epochs)}


def _loop_timer():
    from transformers import TrainerCallback

    class LoopTimer(TrainerCallback):
        begin = end = None
        epochs: list = []

        def on_train_begin(self, args, state, control, **kw):
            self.begin, self.epochs = time.time(), []

        def on_epoch_end(self, args, state, control, **kw):
            self.epochs.append(time.time())

        def on_train_end(self, args, state, control, **kw):
            self.end = time.time()

    return LoopTimer()


def _trl_args(stage: str, out_dir: pathlib.Path, epochs: int, batch: int, max_length: int) -> dict:
    return dict(output_dir=str(out_dir), per_device_train_batch_size=batch, num_train_epochs=epochs,
                max_length=max_length, logging_steps=1, save_strategy="no", report_to="none",
                dataloader_num_workers=0, seed=42, bf16=False, use_cpu=not torch.cuda.is_available(),
                learning_rate=LR[stage], optim=OPTIM[stage], lr_scheduler_type="linear")


def trl_inputs(model_dir, data_file, cache_dir=None) -> tuple:
    """``(tokenizer, dataset)`` as TRL's scripts load them: the model folder's tokenizer (EOS as pad when it
    has none) and the JSON rows through ``datasets``."""
    import datasets
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    ds = datasets.load_dataset("json", data_files=str(data_file), split="train",
                               cache_dir=None if cache_dir is None else str(cache_dir))
    return tok, ds


def trl_trainer(stage: str, model_dir: pathlib.Path, data_file: pathlib.Path, out_dir: pathlib.Path,
                epochs: int = 1, *, batch: int = BATCH, max_length: int = MAX_LENGTH, callbacks=()):
    """TRL's DPOTrainer (reference model in memory, its default) or SFTTrainer (bfd packing, padding-free)
    on ``data_file``, as the e2e tier runs it."""
    tok, ds = trl_inputs(model_dir, data_file)
    common = _trl_args(stage, out_dir, epochs, batch, max_length)
    if stage == "dpo":
        from trl import DPOConfig, DPOTrainer

        return DPOTrainer(model=str(model_dir), args=DPOConfig(**common, beta=0.1), train_dataset=ds,
                          processing_class=tok, callbacks=list(callbacks))
    from trl import SFTConfig, SFTTrainer

    args = SFTConfig(**common, packing=True, packing_strategy="bfd", padding_free=True)
    return SFTTrainer(model=str(model_dir), args=args, train_dataset=ds, processing_class=tok, callbacks=list(callbacks))


def run_trl(stage: str, model_dir: pathlib.Path, data_file: pathlib.Path, out_dir: pathlib.Path,
            epochs: int = 1, *, batch: int = BATCH) -> dict:
    """``epochs`` of :func:`trl_trainer`; the loop's tokens, seconds and epoch wall times."""
    timer = _loop_timer()
    trainer = trl_trainer(stage, model_dir, data_file, out_dir, epochs, batch=batch, callbacks=[timer])
    result = trainer.train()
    if timer.begin is None or timer.end is None:
        raise RuntimeError("TRL training loop did not report begin/end")
    keys = ("chosen_ids", "rejected_ids") if stage == "dpo" else ("input_ids",)
    tokens = _dataset_tokens(trainer.train_dataset, keys, prompt_key="prompt_ids" if stage == "dpo" else None)
    secs = timer.end - timer.begin
    return {"train_runtime": secs, "train_tokens": tokens * epochs, "train_tokens_per_second": tokens * epochs / secs,
            "train_loss": result.training_loss, "begin": timer.begin, "end": timer.end, "epochs": timer.epochs}


def _dataset_tokens(ds, keys, prompt_key=None) -> int:
    """Real tokens one epoch feeds the model (prompt counted once per completion, cut at max_length)."""
    total = 0
    for row in ds:
        p = len(row[prompt_key]) if prompt_key else 0
        for k in keys:
            total += min(p + len(row[k]), MAX_LENGTH)
    return total


def main(argv=None) -> int:
    """``python -m benchmarks.e2e trl {dpo|sft} MODEL DATA OUT EPOCHS [BATCH]``: one whole TRL run."""
    start = time.time()  # after the interpreter and this module's imports; TRL's own imports come next
    args = list(argv or sys.argv[1:])
    if len(args) not in (6, 7) or args[0] != "trl" or args[1] not in ("dpo", "sft"):
        print(f"usage: python -m benchmarks.e2e trl dpo|sft MODEL DATA OUT EPOCHS [BATCH] (got {' '.join(args)})",
              file=sys.stderr)
        return 2
    _, stage, model_dir, data_file, out_dir, epochs, *batch = args
    out = pathlib.Path(out_dir)
    s = run_trl(stage, pathlib.Path(model_dir), pathlib.Path(data_file), out / "run", int(epochs),
                batch=int(batch[0]) if batch else BATCH)
    s["timeline"] = {"start": start, "begin": s.pop("begin"), "epochs": s.pop("epochs"), "end": time.time()}
    (out / "trl_summary.json").write_text(json.dumps(s))
    return 0


if __name__ == "__main__":
    sys.exit(main())
