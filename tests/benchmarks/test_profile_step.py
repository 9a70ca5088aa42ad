"""benchmarks/profile_step.py: one profiled DPO step of each trainer, on the tiny model (2 pairs, max_length 64)."""

import pathlib
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks import profile_step as ps  # noqa: E402


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    return ps.profile_both(tmp_path_factory.mktemp("profile"), pairs=2, model="tiny", max_length=64)


@pytest.mark.parametrize("trainer", ["zephyr_fast", "trl"])
def test_categories_partition_the_step(result, trainer):
    secs = result[trainer]["seconds"]
    assert set(secs) == set(ps.CATEGORIES) | {"total"}
    assert all(secs[c] >= 0 for c in ps.CATEGORIES)
    assert sum(secs[c] for c in ps.CATEGORIES) == pytest.approx(secs["total"], rel=0.01)
    assert secs["lm_head"] > 0 and secs["attention"] > 0 and secs["body_linear"] > 0 and secs["optimizer"] > 0


def test_reference_only_in_trls_step(result):
    assert result["trl"]["seconds"]["reference"] > 0
    assert result["zephyr_fast"]["seconds"]["reference"] == 0
    assert result["zephyr_fast"]["offline_reference"]["seconds"] > 0
    assert result["trl"]["flops"]["reference"] > 0 and result["zephyr_fast"]["flops"]["reference"] == 0


def test_flops_share_the_useful_numerator(result):
    z, t = result["zephyr_fast"], result["trl"]
    assert z["useful_flops"] == t["useful_flops"] > 0
    assert t["processed_tokens"] >= t["real_tokens"] > 0  # TRL pads
    assert z["processed_tokens"] == z["real_tokens"] > 0  # zephyr packs
    for r in (z, t):
        assert r["flops"]["total"] == pytest.approx(sum(v for k, v in r["flops"].items() if k != "total"))
        assert r["executed_flops_per_s"] > 0


def test_render_has_both_trainers(result):
    text = "\n".join(ps.render(result))
    assert "zephyr_fast" in text and "TRL" in text
    for cat in ps.CATEGORIES:
        assert f"| {cat} |" in text


def test_aggregate_self_time_sums_to_total():
    import torch
    from torch.profiler import record_function

    tagger = ps.Tagger()
    lin = torch.nn.Linear(16, 16)
    x = torch.randn(8, 16, requires_grad=True)

    def step():
        y = tagger.wrap("body_linear", lin)(x.relu())
        y.square().sum().backward()
        with record_function(ps.PREFIX + "optimizer"):
            lin.zero_grad()

    out = ps.profile_step(step, tagger)["seconds"]
    assert out["body_linear"] > 0 and out["optimizer"] > 0 and out["other"] > 0
    assert sum(out[c] for c in ps.CATEGORIES) == pytest.approx(out["total"], rel=1e-6)
