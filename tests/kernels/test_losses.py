"""Every DPO loss type in zephyr_kernels.losses against TRL 1.16's own ``DPOTrainer._compute_loss``.

TRL's method is called unbound on a small stand-in trainer (the attributes it reads) and a stand-in
model whose ``log_probs`` are a leaf tensor of per-token log-probs, with precomputed reference
log-probs — so TRL's code, not a re-derivation, gives the loss, its gradient and the logged metrics.
"""

from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
from tests.kernels.helpers import assert_close, grads_of, make_inputs, params
from trl.trainer.dpo_trainer import DPOTrainer

from tests.kernels.helpers import impl  # noqa: F401  (parametrized fixture)
from zephyr_kernels import LOSS_TYPES, check_dpo_args, dpo_loss, fused_linear_dpo_loss
from zephyr_kernels.losses import REFUSED_LOSS_TYPES
from tests.kernels.oracle import reference_linear_logprobs

P, T = 6, 14
# (loss_type, label_smoothing); TRL 1.16's sigmoid has no smoothing (ours is cDPO for ε > 0)
CASES = [(t, 0.0) for t in LOSS_TYPES if t not in ("robust", "exo_pair")] + [
    ("robust", 0.2), ("exo_pair", 1e-3), ("exo_pair", 0.3), ("aot", 0.1), ("aot_unpaired", 0.25),
]
MPO = (("sigmoid", "bco_pair", "sft"), (0.8, 0.2, 1.0))  # TRL's MPO example


def _batch(seed=0):
    """Per-token log-probs ``(2P, T-1)`` (leaf, grad), completion mask ``(2P, T)``, ref logps ``(P,)``."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(2 * P, T, dtype=torch.long)
    for i in range(2 * P):
        start = int(torch.randint(1, 5, (1,), generator=g))
        end = start + int(torch.randint(1, T - start + 1, (1,), generator=g))
        mask[i, start:end] = 1
    tok = (-3 * torch.rand(2 * P, T - 1, generator=g)).requires_grad_()
    ref = -3 * mask[:, 1:].sum(1) * torch.rand(2 * P, generator=g) - torch.rand(2 * P, generator=g)
    return tok, mask, ref[:P], ref[P:]


def _trl(tok, mask, ref_c, ref_r, loss_type, beta, ls, weights=None, tau=0.05):
    """TRL 1.16 ``DPOTrainer._compute_loss`` on these numbers → (loss, logged metrics)."""
    shift = mask[:, 1:]
    outputs = SimpleNamespace(log_probs=tok * shift, entropy=torch.zeros_like(tok), mean_logits=torch.zeros_like(tok),
                              is_top1=torch.zeros_like(tok, dtype=torch.bool))
    types = [loss_type] if isinstance(loss_type, str) else list(loss_type)
    stub = SimpleNamespace(
        model=SimpleNamespace(training=True), aux_loss_enabled=False, ld_alpha=None, precompute_ref_logps=True,
        f_divergence_type="reverse_kl", loss_types=types, loss_weights=list(weights or [1.0] * len(types)),
        beta=beta, label_smoothing=ls, use_weighting=False, args=SimpleNamespace(discopop_tau=tau),
        accelerator=SimpleNamespace(device=torch.device("cpu"), gather=lambda x: x, gather_for_metrics=lambda x: x),
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)}, _total_train_tokens=0, _tp_size=1,
    )
    inputs = dict(input_ids=torch.ones(2 * P, T, dtype=torch.long), attention_mask=torch.ones(2 * P, T),
                  completion_mask=mask, ref_chosen_logps=ref_c, ref_rejected_logps=ref_r)
    loss = DPOTrainer._compute_loss(stub, lambda **kw: outputs, inputs, return_outputs=False)
    return loss, {k: v[0] for k, v in stub._metrics["train"].items()}


def _ours(tok, mask, ref_c, ref_r, loss_type, beta, ls, weights=None, tau=0.05, reduction="mean"):
    shift = mask[:, 1:]
    logps, lens = (tok * shift).sum(1), shift.sum(1)
    return dpo_loss(logps[:P], logps[P:], ref_c, ref_r, beta=beta, loss_type=loss_type, label_smoothing=ls,
                    chosen_lengths=lens[:P], rejected_lengths=lens[P:], loss_weights=weights,
                    discopop_tau=tau, reduction=reduction)


@pytest.mark.parametrize("loss_type,ls", CASES + [(MPO[0], 0.0)], ids=str)
@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_loss_matches_trl(loss_type, ls, beta):
    tok, mask, ref_c, ref_r = _batch(seed=int(beta * 10))
    weights = MPO[1] if loss_type == MPO[0] else None
    tau = 0.05 if beta == 0.1 else 0.3
    ours, og = grads_of(lambda: _ours(tok, mask, ref_c, ref_r, loss_type, beta, ls, weights, tau)[0], [tok])
    trl, tg = grads_of(lambda: _trl(tok, mask, ref_c, ref_r, loss_type, beta, ls, weights, tau)[0], [tok])
    assert torch.isfinite(trl) and og[0].abs().sum() > 0  # a loss with a gradient, not a constant
    assert_close(ours, trl, atol=1e-6, rtol=1e-5, what="loss")
    assert_close(og[0], tg[0], atol=1e-6, rtol=1e-5, what="grad")
    with torch.no_grad():
        _, metrics = _ours(tok, mask, ref_c, ref_r, loss_type, beta, ls, weights, tau)
        _, logged = _trl(tok, mask, ref_c, ref_r, loss_type, beta, ls, weights, tau)
        total, _ = _ours(tok, mask, ref_c, ref_r, loss_type, beta, ls, weights, tau, reduction="sum")
    for k, v in metrics.items():
        assert v.item() == pytest.approx(logged[k], rel=1e-5, abs=1e-6), k
    assert_close(total, ours * P, atol=1e-5, rtol=1e-5, what="sum = P × mean")


def test_aot_depends_on_the_batch_order_only_through_sorting():
    tok, mask, ref_c, ref_r = _batch(seed=3)
    perm = torch.randperm(P, generator=torch.Generator().manual_seed(0))
    full = torch.cat([perm, perm + P])
    for loss_type in ("aot", "aot_unpaired"):
        a, _ = _ours(tok, mask, ref_c, ref_r, loss_type, 0.1, 0.1)
        b, _ = _ours(tok[full], mask[full], ref_c[perm], ref_r[perm], loss_type, 0.1, 0.1)
        assert_close(a, b, atol=1e-6, rtol=1e-6, what=loss_type)


@pytest.mark.parametrize("kw,match", [
    (dict(loss_type="aot_pair"), "aot_unpaired"),
    (dict(loss_type="kto_pair"), "KTOTrainer"),
    (dict(loss_type="nope"), "one of"),
    (dict(loss_type="exo_pair", label_smoothing=0.0), r"\(0, 1\).*exo_pair"),
    (dict(loss_type="apo_zero", label_smoothing=0.1), "not used by loss_type='apo_zero'"),
    (dict(loss_type="robust", label_smoothing=0.5), r"\[0.0, 0.5\)"),
    (dict(loss_type="discopop", discopop_tau=0.0), "discopop_tau"),
    (dict(loss_type=("sigmoid", "sft"), loss_weights=(1.0,)), "one weight per loss_type"),
])
def test_refusals_are_one_line(kw, match):
    x = torch.zeros(2)
    with pytest.raises(ValueError, match=match) as e:
        dpo_loss(x, x, x, x, **kw)
    assert "\n" not in str(e.value)
    assert set(REFUSED_LOSS_TYPES).isdisjoint(LOSS_TYPES)


@pytest.mark.parametrize("loss_type", ["sigmoid_norm", "sft"])
def test_length_dependent_losses_need_lengths(loss_type):
    x = torch.zeros(2)
    with pytest.raises(ValueError, match="chosen_lengths"):
        dpo_loss(x, x, x, x, loss_type=loss_type)
    check_dpo_args(0.1, loss_type, 0.0, "sum")  # the arguments themselves are fine


def _fused_case(impl, loss_type, ls, bias, seed=7):
    """Fused DPO from packed hidden vs dpo_loss on naive reference log-probs: (ours, ref) values + grads."""
    N, V = 47, 123
    h, w, b, t = make_inputs(N, 31, V, ignore_frac=0.3, bias=bias, seed=seed)
    g = torch.Generator().manual_seed(seed)
    cuts = torch.sort(torch.randperm(N - 1, generator=g)[: 2 * P - 1] + 1).values
    seg = torch.zeros(N, dtype=torch.long)
    for c in cuts:
        seg[c:] += 1
    ref_c, ref_r = -20 * torch.rand(P, generator=g), -20 * torch.rand(P, generator=g)
    kw = dict(beta=0.3, loss_type=loss_type, label_smoothing=ls)

    def reference():
        _, s = reference_linear_logprobs(h, w, t, bias=b, segment_ids=seg, num_segments=2 * P)
        counts = torch.zeros(2 * P).index_add_(0, seg, (t != -100).float())
        return dpo_loss(s[0::2], s[1::2], ref_c, ref_r, chosen_lengths=counts[0::2],
                        rejected_lengths=counts[1::2], **kw)[0]

    ours = grads_of(lambda: fused_linear_dpo_loss(h, w, t, seg, ref_c, ref_r, b, impl=impl, **kw)[0] * 0.7,
                    params(h, w, b))
    return ours, grads_of(lambda: reference() * 0.7, params(h, w, b))


NEW = [(t, ls) for t, ls in CASES if t not in ("sigmoid", "hinge", "ipo", "robust")] + [(MPO[0], 0.0)]


@pytest.mark.parametrize("loss_type,ls", NEW, ids=str)
def test_fused_new_loss_types_match_reference(loss_type, ls):
    (ours, og), (ref, rg) = _fused_case("torch", loss_type, ls, bias=loss_type == "sft")
    assert_close(ours, ref, what="loss")
    for a, r in zip(og, rg):
        assert_close(a, r, what="grad")


def test_fused_apo_zero_every_impl(impl):
    (ours, og), (ref, rg) = _fused_case(impl, "apo_zero", 0.0, bias=True, seed=3)
    assert_close(ours, ref, what="loss")
    for a, r in zip(og, rg):
        assert_close(a, r, what="grad")
