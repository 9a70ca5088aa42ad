"""benchmarks/gpu_e2e.py: issue 13's GPU target verdicts on hand-made records, the step-window and
ZeRO-3 comparison helpers, and (slow) the --cpu-smoke logic of the prefix_shared and e2e_dpo sections."""

import pytest

from benchmarks import gpu_e2e as G
from benchmarks import targets as T

GIB = 2 ** 30


def _row(suite, provider, variant, device="cuda", **kw):
    return {"suite": suite, "provider": provider, "variant": variant, "device": device,
            "device_name": "NVIDIA H200" if device == "cuda" else "CPU", **kw}


def _records(dpo=(20.0, 8.0), mem=(10 * GIB, 20 * GIB), sft=(30000.0, 20000.0), prefix=(22.0, 20.0),
             loss_equal=True, device="cuda"):
    return [
        _row("gpu_e2e_dpo", "zephyr_fast", "separate", device, pairs_per_s=dpo[0], peak_mem_bytes=mem[0], mfu=0.4),
        _row("gpu_e2e_dpo", "trl", "precompute_ref", device, pairs_per_s=dpo[1], peak_mem_bytes=mem[1], mfu=0.2),
        _row("gpu_e2e_sft", "zephyr_fast", "packed", device, tokens_per_s=sft[0], mfu=0.5),
        _row("gpu_e2e_sft", "trl", "bfd+padding_free", device, tokens_per_s=sft[1], mfu=0.3),
        _row("gpu_prefix_shared", "zephyr_fast", "separate", device, pairs_per_s=prefix[1], tokens_per_s=9000.0),
        _row("gpu_prefix_shared", "zephyr_fast", "prefix_shared", device, pairs_per_s=prefix[0], tokens_per_s=8000.0),
        _row("gpu_zero3", "zephyr_fast", "zero3", device, loss=0.6931, plain_loss=0.6931, loss_rel_diff=1e-5,
             loss_rtol=1e-3, loss_equal=loss_equal, tokens_per_s=7000.0),
    ]


def _verdicts(records):
    out = []
    T.gpu_targets(records, lambda issue, label, measured, ok, note="": out.append((issue, label, measured, ok, note)))
    assert [o[1] for o in out] == list(T.GPU_LABELS.values()) and {o[0] for o in out} == {13}
    return {key: o for key, o in zip(T.GPU_LABELS, out)}


def test_targets_met():
    v = _verdicts(_records())
    assert all(o[3] is True for o in v.values()), v
    assert "2.50×" in v["dpo"][2] and "0.50×" in v["dpo"][2] and "MFU 40 % vs 20 %" in v["dpo"][2]
    assert "1.50×" in v["sft"][2] and "1.10× gain" in v["prefix"][2] and "default" in v["prefix"][4]
    assert "rtol 0.001" in v["zero3"][2]


@pytest.mark.parametrize("kw,key", [(dict(dpo=(15.0, 8.0)), "dpo"), (dict(mem=(13 * GIB, 20 * GIB)), "dpo"),
                                    (dict(sft=(25000.0, 20000.0)), "sft"), (dict(loss_equal=False), "zero3")])
def test_targets_not_met(kw, key):
    v = _verdicts(_records(**kw))
    assert v[key][3] is False
    assert all(o[3] is True for k, o in v.items() if k != key)


def test_prefix_shared_that_loses_is_recorded_and_keeps_separate():
    v = _verdicts(_records(prefix=(18.0, 20.0)))
    assert v["prefix"][3] is True and "0.90× gain" in v["prefix"][2] and "separate stays" in v["prefix"][4]


def test_targets_not_measured():
    for records in ([], _records(device="cpu"), [r for r in _records() if r["provider"] != "trl"]):
        v = _verdicts(records)
        assert v["dpo"][3] is None and v["sft"][3] is None and v["dpo"][4].startswith("no GPU was lent")
    v = _verdicts([r for r in _records() if "zero3" not in r["suite"]])
    assert v["zero3"][3] is None and v["dpo"][3] is True
    v = _verdicts(_records(mem=(None, 20 * GIB)))  # throughput measured, memory missing: not judged
    assert v["dpo"][3] is None and "not recorded" in v["dpo"][2]


def test_timed_figures_exclude_the_warmup_step():
    f = G.timed_figures([10.0, 11.0, 13.0], [500, 100, 300], [8, 2, 2])
    assert (f["timed_steps"], f["timed_s"], f["timed_tokens"]) == (2, 3.0, 400)
    assert f["tokens_per_s"] == pytest.approx(400 / 3) and f["pairs_per_s"] == pytest.approx(4 / 3)
    assert G.timed_figures([0.0, 1.0], [5, 5], [0, 0])["pairs_per_s"] is None
    two = G.timed_figures([10.0, 30.0, 31.0, 33.0], [500, 500, 100, 300], [8, 8, 2, 2], warmup=2)
    assert (two["timed_steps"], two["timed_s"], two["timed_tokens"], two["step_s"]) == (2, 3.0, 400, [1.0, 2.0])
    with pytest.raises(RuntimeError, match="warm-up"):
        G.timed_figures([1.0], [5], [1])


def test_compare_steps():
    plain = [{"loss": 0.70, "logps/chosen": -300.0, "logps/rejected": -310.0, "grad_norm": 2.0}]
    same = G.compare_steps([dict(plain[0], **{"logps/chosen": -300.1})], plain)
    assert same["loss_equal"] and same["loss_rel_diff"] == pytest.approx(0.1 / 300)
    assert same["compared"] == "loss,logps/chosen,logps/rejected" and same["grad_norm_rel_diff"] == 0.0
    assert not G.compare_steps([dict(plain[0], loss=0.71)], plain)["loss_equal"]


def _smoke_check(tmp_path):
    from benchmarks.gpu_check import Check

    return Check(tmp_path, budget_s=1e9, smoke=True)


def _rows(c, suite):
    return {b["extra_info"]["provider"] + ":" + b["extra_info"]["variant"]: b for b in c.benchmarks
            if b["extra_info"].get("suite") == suite}


@pytest.mark.slow
def test_cpu_smoke_prefix_shared(tmp_path):
    """Both layouts train 3 steps of 2 pairs on the same rows: pairs/s over 2 timed steps each."""
    c = _smoke_check(tmp_path)
    G.section_prefix_shared(c)
    rows = _rows(c, "gpu_prefix_shared")
    assert set(rows) == {"zephyr_fast:separate", "zephyr_fast:prefix_shared"} and c.errors == 0
    sep, pre = (rows[f"zephyr_fast:{k}"]["extra_info"] for k in ("separate", "prefix_shared"))
    assert sep["timed_steps"] == pre["timed_steps"] == 2 and sep["pairs_per_s"] > 0 and pre["pairs_per_s"] > 0
    assert pre["timed_tokens"] < sep["timed_tokens"]  # each prompt once per pair
    assert sep["smoke"] is True and sep["device"] == "cpu" and sep["mfu"] is None and "peak_mem_bytes" in sep


@pytest.mark.slow
def test_cpu_smoke_e2e_dpo(tmp_path):
    """zephyr_fast and TRL DPOTrainer (precomputed reference) rows; the verdicts ignore smoke rows."""
    pytest.importorskip("trl")
    c = _smoke_check(tmp_path)
    G.section_e2e_dpo(c)
    rows = _rows(c, "gpu_e2e_dpo")
    assert set(rows) == {"zephyr_fast:separate", "trl:precompute_ref"} and c.errors == 0
    for r in rows.values():
        e = r["extra_info"]
        assert e["pairs_per_s"] > 0 and e["ref_pass_s"] > 0 and e["timed_steps"] == 2 and r["stats"]["median"] > 0
    trl = rows["trl:precompute_ref"]["extra_info"]["settings"]
    assert trl["precompute_ref_log_probs"] and not trl["use_liger_kernel"] and trl["notes"]
    records = [dict(r["extra_info"]) for r in rows.values()]
    assert _verdicts(records)["dpo"][3] is None
