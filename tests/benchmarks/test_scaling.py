"""benchmarks/scaling/ (issue 13): docs/SCALING.md is exactly what the inputs JSON gives, and the
model's pieces (benchmarks/scaling/model.py) check out on cases small enough to work by hand."""

import copy
import os

import pytest

from benchmarks import scaling as S
from benchmarks.scaling import model as SM
from zephyr_fast.training.metrics import train_flops

TINY = {"num_hidden_layers": 2, "hidden_size": 8, "intermediate_size": 16, "num_attention_heads": 2,
        "num_key_value_heads": 1, "vocab_size": 10, "tie_word_embeddings": False}


@pytest.fixture(scope="module")
def inputs():
    return SM.load_inputs()


def _with_model(inputs, shape):
    out = copy.deepcopy(inputs)
    for k, v in shape.items():
        out["model"][k] = {"value": v, "source": "test"}
    return out


def test_doc_regenerates_byte_for_byte(inputs):
    with open(S.DOC, encoding="utf-8") as f:
        committed = f.read()
    assert S.render(inputs) == committed, "docs/SCALING.md is stale: run python -m benchmarks.scaling"


def test_check_flag(tmp_path, inputs):
    out = tmp_path / "SCALING.md"
    assert S.main(["--out", str(out)]) == 0
    assert S.main(["--out", str(out), "--check"]) == 0
    out.write_text(out.read_text() + "edited by hand\n")
    assert S.main(["--out", str(out), "--check"]) == 1


def test_every_input_has_a_source(inputs):
    for sec, body in inputs.items():
        if sec == "about":
            continue
        leaves = [body] if "value" in body else body.values()
        for node in leaves:
            assert set(node) >= {"value", "source"} and node["source"], (sec, node)


def test_param_counts_by_hand():
    # per layer: q 8x8, k,v 8x4 each, o 8x8 = 192; gate/up/down 3x8x16 = 384; 2 norms 16 -> 592
    # body 2x592 + final norm 8 = 1192; head 10x8 = 80; embedding 80 (excluded from the matmul N)
    assert SM.param_counts(TINY) == (1192 + 80 + 80, 1192 + 80)
    assert SM.param_counts({**TINY, "tie_word_embeddings": True}) == (1192 + 80, 1192 + 80)


def test_mistral_7b_parameter_count(inputs):
    total, mm = SM.param_counts(SM.shape(inputs))
    assert total == 7_241_732_096  # Mistral-7B-v0.1's published 7.24B
    assert total - mm == 32000 * 4096  # the input embedding table


def test_flops_equal_train_flops_on_a_tiny_case(inputs):
    m = SM.Model(_with_model(inputs, TINY))
    # 6 * 1272 * 5 + 12 * 2 * 8 * 13 = 38160 + 2496
    assert m.flops(5, 13) == train_flops(1272, 2, 8, 5, 13) == 40656


def test_zero_comm_bytes_by_hand():
    c = SM.zero3_comm_bytes(1000, 4, micro_steps=2)
    # each collective: 2 bytes x 1000 x 3/4 = 1500 per micro-step
    assert c == {"forward_all_gather": 3000, "backward_all_gather": 3000, "reduce_scatter": 3000, "total": 9000}
    assert SM.zero3_comm_bytes(1000, 1)["total"] == 0
    z2 = SM.zero2_comm_bytes(1000, 4, micro_steps=2)
    assert z2["total"] == 1500 * 3  # reduce-scatter per micro-step + one parameter all-gather


def test_comm_time_uses_nvlink_in_a_node_and_nics_across(inputs):
    m = SM.Model(inputs)
    fab = m.fabrics[0]
    bytes8 = SM.zero3_comm_bytes(m.n_total, 8)["total"]
    assert m.comm_time(8, fab) == pytest.approx(bytes8 / (SM.val(inputs, "hardware.nccl_busbw_intra_node_gbs") * 1e9))
    frac = SM.val(inputs, "hardware.inter_node_achieved_fraction")
    bytes16 = SM.zero3_comm_bytes(m.n_total, 16)["total"]
    assert m.comm_time(16, fab) == pytest.approx(bytes16 / (fab["node_link_gbs"] * frac * 1e9))
    assert m.comm_time(64, fab, 1, "zero++") < m.comm_time(64, fab)


def test_memory_decreases_with_world_size(inputs):
    m = SM.Model(inputs)
    for stage in ("sft", "dpo"):
        totals = [m.memory(w, 4096, stage)["total"] for w in (1, 2, 4, 8, 16, 64)]
        assert all(a > b for a, b in zip(totals, totals[1:])), totals
        fits = [m.max_micro_tokens(w, stage) for w in (2, 4, 8, 16, 64)]
        assert all(a < b for a, b in zip(fits, fits[1:])), fits
    # materialised logits cost memory per token, the fused head does not
    assert m.max_micro_tokens(8, "sft", head="logits") < m.max_micro_tokens(8, "sft")


def test_model_states_by_hand():
    assert SM.model_state_bytes(100, 4, 12) == (2 + 2 + 12) * 100 / 4
    assert SM.model_state_bytes(100, 4, 8, stage=2) == 2 * 100 + (2 + 8) * 100 / 4


def test_threshold_balances_compute_and_comm(inputs):
    m = SM.Model(inputs)
    lo, hi = m.mfu_range()
    t = m.threshold_tokens(16, hi, m.fabrics[1])
    assert m.compute_time(m.flops(t, 0), hi) == pytest.approx(m.comm_time(16, m.fabrics[1]))
    assert 0 < lo < hi < 1


def test_micro_steps_follow_the_recipe(inputs):
    m = SM.Model(inputs)
    assert m.micro("sft", 8)["ga"] == SM.val(inputs, "recipe.sft_gradient_accumulation_8gpu")
    assert m.micro("dpo", 8)["examples"] == SM.val(inputs, "recipe.dpo_pairs_per_micro_batch")
    assert not m.micro("dpo", 64)["feasible"]  # 32 pairs cannot be spread over 64 ranks


def test_doc_path_is_in_docs():
    assert os.path.basename(os.path.dirname(S.DOC)) == "docs"
