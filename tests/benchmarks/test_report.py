"""benchmarks/report.py: ratio tables, target verdicts and the chart from pytest-benchmark JSON."""

import json
import pathlib
import sys

REPO = pathlib.Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks import report  # noqa: E402

MiB = 2**20


def _bench(name, median, **info):
    return {"name": name, "group": None, "stats": {"median": median}, "extra_info": info}


def _lm(provider, median, mem, floor=70 * MiB, **kw):
    info = dict(suite="lm_head", task="dpo", shape="tiny-cpu", n=4096, d=512, v=32000, dtype="float32",
                device="cpu", mode="full", inputs="peaked", provider=provider, peak_mem_bytes=mem,
                floor_bytes=floor, tflops=0.1)
    info.update(kw)
    return _bench(f"test_dpo_cpu[{provider}]", median, **info)


def _whole(provider, whole, *, model="tiny", stage="dpo", epochs=1, epoch_whole=None, **info):
    """A record of the e2e tier: one whole training process (launch → exit = ``whole`` seconds)."""
    return _bench(f"whole[{provider}]", whole, suite=f"e2e_whole_{stage}", provider=provider, mode="full",
                  device="cpu", dtype="float32", shape=f"{model}-shape", model=model, rows=8, epochs=epochs,
                  whole_s=whole, epoch_whole_s=epoch_whole or [whole], **info)


def _doc(benchmarks, **meta):
    return {"benchmarks": benchmarks, "machine_info": {"node": "n"}, "datetime": "2026-11-28T00:00:00",
            "zephyr_fast": {"suite_wall_s": 300.0, "device_name": "CPU test", "versions": {"torch": "x"},
                            "full_run": True, "threads": 2, **meta}}


def _write(tmp_path, doc, name="latest.json"):
    p = tmp_path / name
    p.write_text(json.dumps(doc))
    return p


def test_ratios_and_targets(tmp_path):
    doc = _doc([
        _lm("zephyr_fast", 1.0, 84 * MiB),                      # 1.2 × floor → met
        _lm("naive_torch", 3.0, 1680 * MiB),
        _lm("cce", 2.0, 420 * MiB),
        _whole("zephyr_fast", 50.0, tokens_per_s=900.0, ref_tokens_per_s=2000.0),   # ref 2.2× training → met
        _whole("trl", 80.0, tokens_per_s=400.0),                                      # 2.25× < 3× → not met
    ])
    out = tmp_path / "RESULTS.md"
    report.write_report([_write(tmp_path, doc)], out)
    md = out.read_text()
    # anchor ÷ zephyr: naive 3 s / 1 s, memory 1680 / 84
    assert "| naive_torch | 3.00 s | 0.100 | 1680 MiB | 3.00× | 20.00× |" in md
    assert "| cce | 2.00 s | 0.100 | 420 MiB | 2.00× | 5.00× |" in md
    targets = {t["target"]: t for t in report.evaluate_targets(*report.load([tmp_path / "latest.json"]))}
    dpo = targets["CPU DPO N4096 D512 V32000 fp32 peaked: time ≤ 0.8 × CCE torch_compile at ≤ 1.3 × (dW + dX)"]
    assert dpo["status"] == "**met**" and "0.50 × CCE" in dpo["measured"] and "1.20 × floor" in dpo["measured"]
    normal = targets["CPU DPO N4096 D512 V32000 fp32 normal: time ≤ 0.8 × CCE torch_compile at ≤ 1.3 × (dW + dX)"]
    assert normal["status"] == "not measured"
    step = targets["e2e DPO step tokens/s ≥ 3 × TRL DPOTrainer (tiny model)"]
    assert step["status"] == "**not met**" and "2.25×" in step["measured"]
    assert targets["reference log-prob pass tokens/s ≥ 2 × DPO training tokens/s"]["status"] == "**met**"
    gpu = [t for k, t in targets.items() if k.startswith("GPU")]
    assert gpu and all(t["status"] == "not measured" for t in gpu)
    assert "CPU test" in md and "torch x" in md
    wall = next(t for k, t in targets.items() if "CPU suite" in k)
    assert wall["status"] == "**met**"


def test_dpo_normal_inputs_gap_names_the_measured_gemm_floor(tmp_path):
    normal = dict(inputs="normal")
    doc = _doc([_lm("zephyr_fast", 4.2, 84 * MiB, **normal), _lm("cce", 3.6, 420 * MiB, **normal),
                _lm("gemm_floor", 3.24, None, **normal)])
    rows = report.evaluate_targets(*report.load([_write(tmp_path, doc)]))
    t = next(t for t in rows if t["target"].startswith("CPU DPO N4096 D512 V32000 fp32 normal"))
    assert t["status"] == "**not met**" and "1.17 × CCE" in t["measured"]
    assert "3.24 s = 0.90 × CCE's whole loss, so 0.8 × is out of reach" in t["note"]
    # a floor that leaves room is reported as such, not as a proof
    doc = _doc([_lm("zephyr_fast", 4.2, 84 * MiB, **normal), _lm("cce", 3.6, 420 * MiB, **normal),
                _lm("gemm_floor", 1.8, None, **normal)])
    rows = report.evaluate_targets(*report.load([_write(tmp_path, doc)]))
    t = next(t for t in rows if t["target"].startswith("CPU DPO N4096 D512 V32000 fp32 normal"))
    assert "leaves 0.30 × CCE's time" in t["note"] and "out of reach" not in t["note"]


def test_not_met_memory_and_gpu_json_merge(tmp_path):
    cpu = _write(tmp_path, _doc([_lm("zephyr_fast", 1.0, 140 * MiB), _lm("cce", 0.5, 400 * MiB)]))
    gpu_rec = _bench("g", 0.012, suite="lm_head", task="ce", shape="mistral-7b", n=8192, d=4096, v=32000,
                     dtype="bfloat16", device="cuda", mode="full", inputs="peaked", provider="zephyr_fast",
                     workspace_bytes=300 * MiB, peak_mem_bytes=600 * MiB, device_name="NVIDIA H100")
    gpu = _write(tmp_path, _doc([gpu_rec], gpu_check=True, suite_wall_s=400.0), "gpu.json")
    targets = report.evaluate_targets(*report.load([cpu, gpu]))
    by = {t["target"]: t["status"] for t in targets}
    # 0.5 s ≤ 0.8 × CCE fails (2.0 ×), and 140 MiB is 2.0 × the floor
    assert by["CPU DPO N4096 D512 V32000 fp32 peaked: time ≤ 0.8 × CCE torch_compile at ≤ 1.3 × (dW + dX)"] == "**not met**"
    # a zephyr GPU row without anchors in the same run is not a verdict
    assert by["GPU bf16 CE N8192 D4096 V32000 peaked: time ≤ 0.9 × fastest anchor, memory ≤ CCE"] == "not measured"
    assert by["gpu_check.sh finishes in < 6 minutes"] == "**not met**"                   # 400 s


def _gpu(provider, median, mem, kind="peaked", v=32000, task="ce"):
    return _bench(f"g-{provider}", median, suite="lm_head", task=task, shape="s", n=8192, d=4096, v=v,
                  dtype="bfloat16", device="cuda", mode="full", inputs=kind, provider=provider,
                  peak_mem_bytes=mem * MiB, device_name="NVIDIA H200")


def test_gpu_verdicts_against_the_fastest_anchor_and_cce_memory(tmp_path):
    gpu = _write(tmp_path, _doc([
        _gpu("zephyr_fast", 0.0075, 300), _gpu("cce", 0.0110, 314), _gpu("torch_compile", 0.0088, 814),
        _gpu("zephyr_fast", 0.0090, 300, kind="normal"), _gpu("cce", 0.0089, 314, kind="normal"),
        _gpu("zephyr_fast", 0.030, 1200, v=128256), _gpu("cce", 0.040, 1068, v=128256),
    ], gpu_check=True), "gpu.json")
    by = {t["target"]: t for t in report.evaluate_targets(*report.load([gpu]))}
    peaked = by["GPU bf16 CE N8192 D4096 V32000 peaked: time ≤ 0.9 × fastest anchor, memory ≤ CCE"]
    assert peaked["status"] == "**met**" and "torch_compile 8.80 ms (0.85×)" in peaked["measured"]
    assert "2026-11-28" in peaked["measured"] and "NVIDIA H200" in peaked["measured"]
    normal = by["GPU bf16 CE N8192 D4096 V32000 normal: time ≤ 1.0 × fastest anchor, memory ≤ CCE"]
    assert normal["status"] == "**not met**"                                           # 9.0 vs 8.9 ms
    big = by["GPU bf16 CE N8192 D4096 V128256 peaked: time ≤ 0.9 × fastest anchor, memory ≤ CCE"]
    assert big["status"] == "**not met**" and "1200 MiB vs CCE 1068 MiB" in big["measured"]   # faster, fatter


def test_chart_written_for_sweeps(tmp_path):
    recs = []
    for v, (tz, tn) in {8000: (0.1, 0.2), 32000: (0.3, 0.9), 128256: (1.0, 4.0)}.items():
        for prov, t in (("zephyr_fast", tz), ("naive_torch", tn)):
            recs.append(_bench(f"s{v}{prov}", t, suite="ce_sweep_vocab", task="ce", n=1024, d=256, v=v,
                               dtype="float32", device="cpu", mode="full", provider=prov,
                               peak_mem_bytes=int(t * 100 * MiB)))
    out = tmp_path / "R.md"
    report.write_report([_write(tmp_path, _doc(recs))], out)
    png = tmp_path / "R_chart.png"  # named after its report: a partial report never draws over chart.png
    assert png.exists() and png.read_bytes()[:4] == b"\x89PNG" and not (tmp_path / "chart.png").exists()
    assert "![time and memory vs vocab and tokens](R_chart.png)" in out.read_text()


def test_foreign_benchmarks_ignored_and_empty_report(tmp_path):
    doc = _doc([_bench("other", 1.0, something=1)],
               skipped=[{"test": "test_ce_cuda[liger]", "reason": "needs a CUDA device"}])
    records, metas = report.load([_write(tmp_path, doc)])
    assert records == [] and len(metas) == 1
    md = report.render(records, metas)
    assert "No benchmark results" in md
    assert "- `test_ce_cuda[liger]`: needs a CUDA device" in md   # skipped anchors are listed, with why


def test_a_later_json_replaces_whole_groups(tmp_path):
    """A re-measured group comes from the later run only (both providers), others stay."""
    first = _write(tmp_path, _doc([_lm("zephyr_fast", 1.0, 84 * MiB), _lm("cce", 2.0, 420 * MiB),
                                   _lm("zephyr_fast", 5.0, 84 * MiB, inputs="normal")]), "a.json")
    second = _write(tmp_path, _doc([_lm("zephyr_fast", 0.5, 80 * MiB), _lm("cce", 2.5, 420 * MiB)]), "b.json")
    records, _ = report.load([first, second])
    peaked = [r for r in records if r["inputs"] == "peaked"]
    assert sorted(r["median_s"] for r in peaked) == [0.5, 2.5] and {r["source"] for r in peaked} == {str(second)}
    assert [r["median_s"] for r in records if r["inputs"] == "normal"] == [5.0]


def test_issue13_whole_process_targets_and_tables(tmp_path):
    doc = _doc([
        _whole("zephyr_fast", 50.0, tokens_per_s=900.0, ref_tokens_per_s=3000.0,
               phases={"start-up": 3.0, "data": 2.0, "model": 1.0, "reference": 10.0, "epoch 1": 33.0, "exit": 1.0}),
        _whole("trl", 210.0, tokens_per_s=150.0, phases={"start-up": 3.0, "data + model": 7.0, "epoch 1": 199.0,
                                                          "exit": 1.0}),                       # 4.2× ≥ 4× → met
        # 3 epochs: zephyr 30 s to the end of epoch 1 and 90 s in all, TRL 45 s and 170 s
        _whole("zephyr_fast", 90.0, model="mid", epochs=3, epoch_whole=[30.0, 60.0, 90.0], tokens_per_s=200.0),
        _whole("trl", 170.0, model="mid", epochs=3, epoch_whole=[45.0, 107.0, 169.0], tokens_per_s=60.0),
    ], tier="e2e", suite_wall_s=900.0)
    out = tmp_path / "RESULTS.md"
    report.write_report([_write(tmp_path, doc, "e2e.json")], out)
    by = {t["target"]: t for t in report.evaluate_targets(*report.load([tmp_path / "e2e.json"]))}
    tiny = by["CPU tiny DPO (D256, 4 layers, 64 pairs): whole process ≥ 4 × TRL"]
    assert tiny["status"] == "**met**" and "(4.20×)" in tiny["measured"]
    one = by["CPU D768 DPO (6 layers, 8 pairs): whole process ≥ 1.6 × TRL at 1 epoch"]
    assert one["status"] == "**not met**" and "(1.50×)" in one["measured"]          # 45 / 30 s
    three = by["CPU D768 DPO (6 layers, 8 pairs): whole process ≥ 2 × TRL at 3 epochs"]
    assert three["status"] == "**not met**" and "(1.89×)" in three["measured"]      # 170 / 90 s
    assert by["CPU D768 SFT (6 layers, bfd packing): whole process ≥ 1.5 × TRL"]["status"] == "not measured"
    assert by["the e2e tier `pytest benchmarks/ --e2e` (recorded)"]["measured"].startswith("15.0 min")
    assert not any("CPU suite" in k for k in by)  # the e2e tier's wall time is not the kernel tier's
    md = out.read_text()
    assert "| trl | 8 | 170.00 s | 1.89× | 45.00 s | 1.50× | 60 | 3.33× |" in md
    assert "| reference | 10.00 s | – |" in md and "| **whole process** | **50.00 s** | **210.00 s** |" in md
    # phases in launch order, TRL's "data + model" beside zephyr_fast's data and model
    order = [md.index(f"| {p} |") for p in ("start-up", "data", "model", "data + model", "reference", "epoch 1", "exit")]
    assert order == sorted(order)


def test_step_profile_section_rendered_from_its_json(tmp_path, monkeypatch):
    cats = ("attention", "body_linear", "lm_head", "reference", "optimizer", "other")
    secs = {c: 1.0 for c in cats}
    trainer = {"seconds": {**secs, "total": 6.0}, "flops": {"total": 6e12}, "processed_tokens": 10, "real_tokens": 8,
               "executed_flops_per_s": 1e12, "useful_flops_per_s": 5e11, "useful_flops": 3e12}
    prof = {"model": "mid", "pairs": 8, "max_length": 512, "threads": 2, "datetime": "2026-11-29 15:00 UTC",
            "zephyr_fast": {**trainer, "offline_reference": {"seconds": 2.0, "tokens": 8, "seconds_per_pair": 0.25}},
            "trl": trainer}
    monkeypatch.setattr(report, "RESULTS_DIR", tmp_path)
    (tmp_path / report.STEP_PROFILE).write_text(json.dumps(prof))
    out = report.write_report([_write(tmp_path, _doc([_lm("zephyr_fast", 1.0, 84 * MiB)]))], tmp_path / "R.md")
    md = out.read_text()
    assert "## Where one DPO step's seconds go" in md and "run 2026-11-29 15:00 UTC" in md
    assert "| lm_head | 1.000 | 16.7 | 1.000 | 16.7 |" in md


def test_results_header_command_runs_from_the_repo_root(tmp_path):
    """The command RESULTS.md's header names regenerates a report when pasted at the repository root."""
    import re
    import shlex
    import subprocess

    header = (REPO / "benchmarks" / "RESULTS.md").read_text().splitlines()[2]
    cmd = shlex.split(re.search(r"`(python -m benchmarks\.report[^`]*)`", header).group(1))
    assert len(cmd) > 3 and all((REPO / p).is_file() for p in cmd[3:]), cmd
    out = tmp_path / "RESULTS.md"
    proc = subprocess.run([sys.executable, *cmd[1:], "--out", str(out)], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    regenerated = out.read_text().splitlines()[2]
    assert regenerated.split(" by ", 1)[1] == header.split(" by ", 1)[1]  # the same command, from the same JSON
