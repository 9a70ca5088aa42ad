"""Training metrics with TRL's names, throughput, MFU, metrics.jsonl / TensorBoard / wandb, and the plot.

Names follow TRL's DPOTrainer / SFTTrainer logs (``loss``, ``grad_norm``, ``learning_rate``,
``rewards/chosen``, ``rewards/rejected``, ``rewards/accuracies``, ``rewards/margins``,
``logps/chosen``, ``logps/rejected``; ``eval_`` prefixed for evaluation) so dashboards and
comparison scripts work unchanged; zephyr_fast adds ``train_tokens_per_second``,
``train_pairs_per_second``, ``mfu`` and ``peak_memory_gb``.

MFU follows PaLM (Chowdhery et al. 2022, appendix B): training FLOPs per token
``6·N + 12·L·d·T`` (N non-embedding... here all matmul parameters incl. the LM head, L layers,
d model width, T attention context). For padding-free packed batches every token attends within
its own sequence, so the attention term sums ``len²`` over the packed sequences instead of
``tokens·T``.

``report_to`` (HF's key): ``tensorboard`` | ``wandb`` | ``none`` | ``all``. wandb receives the same
scalars under HF Trainer's names (``train/loss``, ``eval/loss``, ``train/global_step`` as the step
metric), the resolved config as the run config; a resumed run continues the same wandb run (its id
is kept in ``{output_dir}/wandb_run_id``).
"""

from __future__ import annotations

import importlib.util
import json
import os
import resource
import sys
import time
from typing import Optional

import torch

from zephyr_fast.config import ConfigError, TrainingConfig
from zephyr_fast.fileio import atomic_open, first_line
from zephyr_fast.training.hub import redact_secrets

REPORTERS = ("tensorboard", "wandb")
WANDB_ID_FILE = "wandb_run_id"

# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity) from the vendors' data sheets.
PEAK_TFLOPS = {
    "H200": 989.0, "H100": 989.0, "GH200": 989.0, "A100": 312.0, "A800": 312.0, "L40S": 362.0,
    "L40": 181.0, "A10G": 125.0, "A10": 125.0, "L4": 121.0, "RTX 4090": 165.0, "RTX 3090": 71.0,
    "V100": 125.0, "T4": 65.0, "B200": 2250.0,
}


def detect_peak_tflops(device: torch.device) -> Optional[float]:
    """Peak bf16 TFLOP/s of the CUDA card by name, or None (CPU / unknown card: no MFU)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key in sorted(PEAK_TFLOPS, key=len, reverse=True):  # "H100" before "H10"-like prefixes
        if key in name:
            return PEAK_TFLOPS[key]
    return None


def count_matmul_params(model) -> int:
    """Parameters that cost 2 FLOPs per token forward: everything but the input embedding table."""
    emb = model.get_input_embeddings().weight if hasattr(model, "get_input_embeddings") else None
    total = 0
    for p in model.parameters():
        n = p.ds_numel if hasattr(p, "ds_numel") else p.numel()  # ZeRO-3 partitions report 0 locally
        if emb is not None and p is emb:
            continue
        total += n
    tied = getattr(getattr(model, "config", None), "tie_word_embeddings", False)
    if tied and emb is not None:  # the tied table is still the LM-head matmul
        total += emb.ds_numel if hasattr(emb, "ds_numel") else emb.numel()
    return total


def train_flops(n_params: int, n_layers: int, d_model: int, tokens: int, attn_sq: int) -> float:
    """PaLM training FLOPs (forward + backward) of a packed batch: 6·N·tokens + 12·L·d·Σ len²."""
    return 6.0 * n_params * tokens + 12.0 * n_layers * d_model * attn_sq


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 30
    # CPU: the process's resident-set high-water mark (Linux reports KiB)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20


def check_report_to(report_to) -> tuple:
    """The reporters ``report_to`` asks for (``tensorboard`` / ``wandb``), refused in one line when a
    name is unknown or wandb is asked for but not installed -- call it at start, before any data work."""
    names = [report_to] if isinstance(report_to, str) else list(report_to or ())
    out: list = []
    for name in (str(n).lower() for n in names):
        if name == "all":  # HF: every installed integration
            out += [r for r in REPORTERS if _installed(r)]
        elif name in REPORTERS:
            out.append(name)
        elif name != "none":
            raise ConfigError(f"report_to: {name!r} is not supported; use tensorboard, wandb, none or all")
    for name in out:
        if not _installed(name):
            raise ConfigError(f"report_to: {name} is requested but not installed; pip install {name}, or drop "
                              f"{name} from report_to (report_to: none keeps metrics.jsonl only)")
    return tuple(dict.fromkeys(out))


def _installed(reporter: str) -> bool:
    return importlib.util.find_spec(reporter) is not None


def wandb_settings(t: TrainingConfig) -> dict:
    """``wandb.init``'s project / entity / name / group from the recipe (defaults: $WANDB_PROJECT or
    ``zephyr_fast``, $WANDB_ENTITY, the output_dir's name)."""
    return {"project": t.wandb_project or os.environ.get("WANDB_PROJECT") or "zephyr_fast",
            "entity": t.wandb_entity or os.environ.get("WANDB_ENTITY") or None,
            "name": t.run_name or os.path.basename(os.path.abspath(t.output_dir)),
            "group": t.wandb_run_group}


def wandb_keys(metrics: dict) -> dict:
    """HF Trainer's wandb and TensorBoard names (``rewrite_logs``): ``eval_x`` -> ``eval/x``, ``test_x`` -> ``test/x``,
    anything else -> ``train/x``; only numeric scalars."""
    out = {}
    for k, v in metrics.items():
        if k == "step" or isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        prefix = next((p for p in ("eval", "test") if k.startswith(p + "_")), None)
        out[f"{prefix}/{k[len(prefix) + 1:]}" if prefix else f"train/{k}"] = v
    return out


def metrics_path(output_dir: str) -> str:
    """The run's metrics.jsonl: one JSON row per logging / eval step (``{"step": N, ...}``)."""
    return os.path.join(output_dir, "metrics.jsonl")


class MetricLogger:
    """metrics.jsonl (+ TensorBoard / wandb as ``report_to`` asks) on rank 0; no-op elsewhere.

    ``wandb``: :func:`wandb_settings` (project, entity, name, group); ``run_config``: the resolved
    config, logged as the wandb run config. ``resume`` appends to metrics.jsonl and continues the
    wandb run whose id ``{output_dir}/wandb_run_id`` holds.
    """

    def __init__(self, output_dir: str, *, enabled: bool, report_to=("tensorboard",), resume: bool = False,
                 wandb: Optional[dict] = None, run_config: Optional[dict] = None):
        self.enabled = enabled
        self.output_dir = output_dir
        self.path = metrics_path(output_dir)
        self.history: list = []
        self._tb = self._wandb = None
        self._t0 = time.time()
        if not enabled:
            return
        reporters = check_report_to(report_to)
        os.makedirs(output_dir, exist_ok=True)
        if not resume and os.path.exists(self.path):
            os.remove(self.path)
        if "tensorboard" in reporters:
            from torch.utils.tensorboard import SummaryWriter  # installed: checked by check_report_to

            self._tb = SummaryWriter(os.path.join(output_dir, "runs"))
        if "wandb" in reporters:
            self._wandb = self._start_wandb(wandb or {}, run_config or {}, resume)

    def _start_wandb(self, settings: dict, run_config: dict, resume: bool):
        """A wandb run (resumed by id when ``resume``), stepped by ``train/global_step`` as in HF."""
        import wandb  # optional dependency: only when report_to has wandb (checked by check_report_to)

        id_path = os.path.join(self.output_dir, WANDB_ID_FILE)
        run_id = os.environ.get("WANDB_RUN_ID")
        if not run_id and resume and os.path.exists(id_path):
            with open(id_path) as f:
                run_id = f.read().strip()
        try:  # no id: wandb picks a fresh one
            run = wandb.init(id=run_id or None, resume="allow", config=redact_secrets(run_config), **settings)
        except wandb.errors.Error as e:
            first = first_line(e)
            raise ConfigError(f"report_to: wandb.init failed: {first} (WANDB_MODE=offline logs locally)") from None
        with atomic_open(id_path) as f:
            f.write(run.id + "\n")
        run.define_metric("train/global_step")
        run.define_metric("*", step_metric="train/global_step", step_sync=True)
        return run

    def log(self, step: int, metrics: dict) -> None:
        row = {"step": step, **{k: _num(v) for k, v in metrics.items()}}
        self.history.append(row)
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self._tb is not None:  # HF Trainer's tags (train/loss, eval/loss, ...), as wandb gets them
            for k, v in wandb_keys(row).items():
                self._tb.add_scalar(k, v, step)
        if self._wandb is not None:
            self._wandb.log({**wandb_keys(row), "train/global_step": step})

    @property
    def wandb_run(self):
        """The live wandb run, or None."""
        return self._wandb

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def _num(v):
    if torch.is_tensor(v):
        return float(v)
    return v


def read_jsonl(path: str) -> list:
    """Every row of a metrics.jsonl; a line that is not JSON is one line naming the file and line."""
    rows, torn = read_metrics(path)
    if torn is not None:
        raise ConfigError(f"{path}: last line is torn (not JSON): {torn[:80]!r}")
    return rows


def read_metrics(path: str) -> tuple:
    """``(rows, torn)``: a last line cut short by a kill (not JSON) is returned as ``torn`` (else None),
    not parsed; any other bad line is one line naming the file and line number (:class:`ConfigError`)."""
    with open(path, "rb") as f:
        lines = f.read().decode("utf-8", errors="replace").split("\n")
    while lines and not lines[-1].strip():
        lines.pop()
    rows = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except ValueError as e:
            if i == len(lines) - 1:
                return rows, line
            raise ConfigError(f"{path}: line {i + 1} is not JSON ({e}); fix or delete that line") from None
    return rows, None


def write_jsonl(path: str, rows: list) -> None:
    """Replace ``path`` with ``rows`` atomically (:func:`~zephyr_fast.fileio.atomic_open`)."""
    with atomic_open(path) as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


def plot_runs(runs: dict, out_png: str) -> str:
    """One PNG: loss of every run (``{label: metrics.jsonl path}``) and DPO reward margins/accuracy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_margin) = plt.subplots(1, 2, figsize=(11, 4))
    for label, path in runs.items():
        rows = read_jsonl(path)
        for key, style in (("loss", "-"), ("eval_loss", "--")):
            pts = [(r["step"], r[key]) for r in rows if key in r]
            if pts:
                ax_loss.plot(*zip(*pts), style, marker=".", label=f"{label} {key}")
        for key, style in (("rewards/margins", "-"), ("rewards/accuracies", ":"), ("eval_rewards/margins", "--")):
            pts = [(r["step"], r[key]) for r in rows if key in r]
            if pts:
                ax_margin.plot(*zip(*pts), style, marker=".", label=f"{label} {key}")
    ax_loss.set(title="loss", xlabel="optimiser step")
    ax_margin.set(title="DPO reward margins / accuracy", xlabel="optimiser step")
    for ax in (ax_loss, ax_margin):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out_png)), exist_ok=True)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png


def plot_main(argv) -> int:
    """``zephyr-fast plot OUT.png LABEL=metrics.jsonl [...]``: :func:`plot_runs` from the command line."""
    if len(argv) < 2 or any("=" not in a for a in argv[1:]):
        print("usage: zephyr-fast plot OUT.png LABEL=metrics.jsonl [LABEL=metrics.jsonl ...]", file=sys.stderr)
        return 2
    print(plot_runs(dict(a.split("=", 1) for a in argv[1:]), argv[0]))
    return 0
