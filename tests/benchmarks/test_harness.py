"""The benchmark harness: realistic inputs, equal work across providers, memory probe, GPU-check logic."""

import pathlib
import sys
import time

import pytest
import torch

REPO = pathlib.Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks import gpu_check, harness, inputs  # noqa: E402
from benchmarks.lm_head import LMHeadCase, Unavailable  # noqa: E402


def _target_prob(kind):
    h, w, t = inputs.lm_head_inputs(512, 64, 2000, kind=kind, seed=3, requires_grad=False)
    p = torch.softmax(h @ w.t(), -1)
    return p.gather(1, t[:, None]).mean().item(), p.max(-1).values.mean().item()


def test_peaked_inputs_look_trained_and_normal_are_flat():
    pk_target, pk_top = _target_prob("peaked")
    nm_target, nm_top = _target_prob("normal")
    assert pk_top > 0.3 and pk_target > 0.2          # a trained LM puts real mass on its top token
    assert nm_top < 0.02 and nm_target < 0.005       # random normal: nearly uniform over 2000 tokens
    _, _, t = inputs.lm_head_inputs(4096, 8, 2000, kind="peaked", requires_grad=False)
    counts = torch.bincount(t, minlength=2000).sort(descending=True).values
    assert counts[:20].sum() > 0.25 * t.numel()      # Zipf: a few tokens dominate


def test_dpo_layout_matches_liger_halves():
    t, seg, mask = inputs.dpo_layout(24, 3, prompt_frac=0.25)
    assert t == 4
    assert seg.tolist() == [0] * 4 + [2] * 4 + [4] * 4 + [1] * 4 + [3] * 4 + [5] * 4
    assert mask.view(6, 4).tolist() == [[False, True, True, False]] * 6
    with pytest.raises(ValueError, match="2 \\* pairs"):
        inputs.dpo_layout(25, 3)


def test_real_lengths_from_bundled_sample():
    lens = inputs.dpo_lengths(8)
    assert len(lens) == 8 and all(p > 0 and c > 1 and r > 1 for p, c, r in lens)
    assert all(p + c <= 512 and p + r <= 512 for p, c, r in lens)
    assert len(set(inputs.sequence_lengths(8))) > 4  # varied, real lengths


@pytest.mark.parametrize("task", ["dpo", "dpo_ref", "ce"])
def test_naive_anchor_does_the_same_work_as_zephyr(task):
    """Same loss and gradients (fp32) — the timing tables compare equal computations."""
    spec = dict(task=task, n=48, d=31, v=123, dtype="float32", kind="peaked", pairs=2, device="cpu", seed=0)
    try:
        z = LMHeadCase(dict(spec, provider="zephyr_fast"))
    except Unavailable as exc:
        pytest.fail(f"zephyr_kernels must be importable in CI: {exc}")
    n = LMHeadCase(dict(spec, provider="naive_torch"))
    lz, ln = z.full(), n.full()
    torch.testing.assert_close(lz, ln, atol=1e-5, rtol=5e-4)
    torch.testing.assert_close(z.hidden.grad, n.hidden.grad, atol=1e-5, rtol=5e-4)
    torch.testing.assert_close(z.weight.grad, n.weight.grad, atol=1e-5, rtol=5e-4)
    assert z.grad_floor_bytes() == (48 * 31 + 123 * 31) * 4


def test_unavailable_provider_is_skipped_not_faked():
    with pytest.raises(Unavailable, match="CUDA only"):
        LMHeadCase(dict(task="ce", provider="liger", n=8, d=4, v=16, dtype="float32", device="cpu"))
    with pytest.raises(Unavailable, match="no DPO"):
        LMHeadCase(dict(task="dpo_ref", provider="cce", n=8, d=4, v=16, dtype="float32", pairs=2, device="cpu"))
    assert harness.provider_unavailable("zephyr_fast") is None


def test_memprobe_separates_logits_from_fused():
    """Peak-RSS growth in a fresh process: ≥ the gradient floor, and the naive path's logits show."""
    base = dict(task="ce", n=1024, d=32, v=8000, dtype="float32", kind="peaked", device="cpu", seed=0)
    fused = harness.cpu_peak_growth_subprocess(dict(base, provider="zephyr_fast", warmup=0))
    naive = harness.cpu_peak_growth_subprocess(dict(base, provider="naive_torch", warmup=0))
    floor = (1024 * 32 + 8000 * 32) * 4
    assert fused["floor"] == naive["floor"] == floor
    logits = 1024 * 8000 * 4  # 32 MiB
    assert naive["peak_rss_growth"] > logits
    assert fused["peak_rss_growth"] < naive["peak_rss_growth"] - logits // 2


def test_mini_benchmark_median_and_setup():
    b = gpu_check.MiniBenchmark("x")
    calls = []
    b.pedantic(lambda v: calls.append(v), setup=lambda: ((len(calls),), {}), rounds=3, warmup_rounds=1)
    assert calls == [0, 1, 2, 3] and b.stats.rounds == 3 and b.stats.median >= 0
    assert b.as_json()["stats"]["rounds"] == 3


def test_gpu_check_correctness_rows_detect_errors():
    """The bf16 judgement (vs a bf16 torch run's own error) runs the Triton kernels (interpreter here)."""
    rows = gpu_check.correctness_case("ce", 47, 31, 123, torch.device("cpu"))
    assert {r["output"] for r in rows} == {"loss", "grad_hidden", "grad_weight"}
    assert all(r["bf16_pass"] and r["fp32_pass"] for r in rows), rows
    filtered = gpu_check.correctness_case("ce", 47, 31, 123, torch.device("cpu"), filtered=True)
    assert {r["kernel"] for r in filtered} == {"ce (filtered)"}
    assert all(r["bf16_pass"] and r["fp32_pass"] for r in filtered), filtered
    ref = torch.randn(100)
    assert gpu_check.rel_err(ref, ref) == 0.0
    assert gpu_check.rel_err(ref * 1.01, ref) == pytest.approx(0.01, rel=1e-3)
    assert "**FAIL**" in gpu_check.correctness_table([dict(rows[0], bf16_pass=False)])


@pytest.mark.parametrize("mode", ["fwd", "bwd", "full"])
def test_bench_lm_head_every_mode_records(mode):
    """The suite's driver in each mode (fwd: forward only, bwd: backward of an untimed forward)."""
    from benchmarks.test_lm_head import _spec, bench_lm_head

    b = gpu_check.MiniBenchmark("m")
    bench_lm_head(b, _spec("dpo", "zephyr_fast", 16, 8, 32, pairs=2), mode=mode, rounds=2, memory=False)
    info = b.extra_info
    assert info["mode"] == mode and info["provider"] == "zephyr_fast" and info["device"] == "cpu"
    assert b.stats.rounds == 2 and b.stats.median > 0 and info["tokens_per_s"] > 0
    assert ("tflops" in info) == (mode == "full")


def test_gpu_check_plan_covers_issue_9_table_in_priority_order():
    """Every (task, V, inputs, N) cell of issue 9's table has zephyr_fast and each anchor; the N=8192
    table comes first (its torch.compile rows, whose compile time is the most expensive, after the
    other anchors), then the N=16384 table."""
    plan = gpu_check.lm_head_plan(smoke=False)
    for n in (8192, 16384):
        for task in ("ce", "dpo"):
            for v in (32000, 128256):
                for kind in ("peaked", "normal"):
                    have = {p for t, p, _, vv, nn, k in plan if (t, vv, nn, k) == (task, v, n, kind)}
                    assert have == {"zephyr_fast", "naive_torch", "liger", "cce", "torch_compile"}, (task, v, n, kind)
    small = [row for row in plan if row[4] == 8192]
    assert plan[:len(small)] == small  # the N=8192 table first
    providers = [p for _, p, *_ in small]
    first_compile = providers.index("torch_compile")
    assert all(p == "torch_compile" for p in providers[first_compile:])
    assert len(plan) == len(set(plan)) == 2 * 2 * 2 * 2 * 5


def test_gpu_check_section_fails_when_a_benchmark_raises(tmp_path):
    c = gpu_check.Check(tmp_path, budget_s=time.time() - gpu_check.T0 + 60, smoke=True)  # T0: module import

    def boom(b):
        raise RuntimeError("kernel exploded")

    c.section("lm_head", lambda: c.bench("lm_head[x]", boom), need_s=0)
    assert c.sections["lm_head"].startswith("FAILED") and c.errors == 1
