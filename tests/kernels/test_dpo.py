"""dpo_loss (hand-derived values, TRL 1.16 and Liger formulas) and the fused DPO modules."""

import math

import pytest
import torch
import torch.nn.functional as F
from tests.kernels.helpers import assert_close, grads_of, make_inputs, params

from tests.kernels.helpers import impl  # noqa: F401  (parametrized fixture)
from zephyr_kernels import FusedLinearDPOLoss, dpo_loss, fused_linear_dpo_loss
from tests.kernels.oracle import reference_linear_logprobs

# two pairs: Δ = (pc - rc) - (pr - rr) = 4 and -1
PC, PR, RC, RR = [-10.0, -20.0], [-15.0, -21.0], [-12.0, -19.0], [-13.0, -21.0]
BETA = 0.1


def sp(x):  # softplus = -log σ(-x)
    return math.log1p(math.exp(x))


def _t(x):
    return torch.tensor(x)


HAND = {  # per-pair loss for βΔ = 0.4 and -0.1, written out by hand
    ("sigmoid", 0.0): [sp(-0.4), sp(0.1)],
    ("sigmoid", 0.1): [0.9 * sp(-0.4) + 0.1 * sp(0.4), 0.9 * sp(0.1) + 0.1 * sp(-0.1)],
    ("hinge", 0.0): [0.6, 1.1],
    ("ipo", 0.0): [(4 - 5) ** 2, (-1 - 5) ** 2],
    ("robust", 0.1): [(0.9 * sp(-0.4) - 0.1 * sp(0.4)) / 0.8, (0.9 * sp(0.1) - 0.1 * sp(-0.1)) / 0.8],
}


@pytest.mark.parametrize("loss_type,ls", list(HAND))
def test_dpo_loss_hand_derived(loss_type, ls):
    loss, m = dpo_loss(_t(PC), _t(PR), _t(RC), _t(RR), beta=BETA, loss_type=loss_type, label_smoothing=ls)
    assert loss.item() == pytest.approx(sum(HAND[loss_type, ls]) / 2, rel=1e-5)
    s, ms = dpo_loss(_t(PC), _t(PR), _t(RC), _t(RR), beta=BETA, loss_type=loss_type, label_smoothing=ls,
                     reduction="sum")
    assert s.item() == pytest.approx(sum(HAND[loss_type, ls]), rel=1e-5)
    assert m["rewards/chosen"].item() == pytest.approx(BETA * (2 - 1) / 2)
    assert m["rewards/rejected"].item() == pytest.approx(BETA * (-2 + 0) / 2)
    assert m["rewards/margins"].item() == pytest.approx(BETA * (4 - 1) / 2)
    assert m["rewards/accuracies"].item() == 0.5 and ms["rewards/accuracies"].item() == 1.0
    assert m["logps/chosen"].item() == -15.0 and m["logps/rejected"].item() == -18.0
    assert ms["logps/chosen"].item() == -30.0
    assert all(v.dim() == 0 and not v.requires_grad for v in m.values())


def test_rpo_and_ipo_length_normalisation():
    nll = torch.tensor(2.5)
    loss, _ = dpo_loss(_t(PC), _t(PR), _t(RC), _t(RR), beta=BETA, rpo_alpha=0.5, chosen_nll=nll)
    assert loss.item() == pytest.approx(sum(HAND["sigmoid", 0.0]) / 2 + 0.5 * 2.5, rel=1e-6)
    s, _ = dpo_loss(_t(PC), _t(PR), _t(RC), _t(RR), beta=BETA, rpo_alpha=0.5, chosen_nll=nll, reduction="sum")
    assert s.item() == pytest.approx(sum(HAND["sigmoid", 0.0]) + 2 * 0.5 * 2.5, rel=1e-6)
    # IPO with lengths (TRL): ratios per token; pair 0: 2/4 - (-2)/2 = 1.5 → (1.5 - 5)²
    lens_c, lens_r = torch.tensor([4.0, 1.0]), torch.tensor([2.0, 1.0])
    ipo, _ = dpo_loss(_t(PC), _t(PR), _t(RC), _t(RR), beta=BETA, loss_type="ipo",
                      chosen_lengths=lens_c, rejected_lengths=lens_r)
    assert ipo.item() == pytest.approx(((1.5 - 5) ** 2 + (-1 - 5) ** 2) / 2, rel=1e-6)


def _trl_1_16(pc, pr, rc, rr, beta, loss_type, ls):
    """TRL 1.16 DPOTrainer._compute_loss formulas (reverse-KL scores), re-derived from its source."""
    delta = (pc - rc) - (pr - rr)
    if loss_type == "sigmoid":  # TRL 1.16 sigmoid has no label smoothing; cDPO lives in 'robust'/'aot'
        return -F.logsigmoid(beta * delta).mean()
    if loss_type == "hinge":
        return torch.relu(1 - beta * delta).mean()
    if loss_type == "robust":
        clean, flipped = -(1 - ls) * F.logsigmoid(beta * delta), -ls * F.logsigmoid(-beta * delta)
        return ((clean - flipped) / (1 - 2 * ls)).mean()
    raise AssertionError(loss_type)


@pytest.mark.parametrize("loss_type,ls", [("sigmoid", 0.0), ("hinge", 0.0), ("robust", 0.2)])
def test_dpo_loss_matches_trl_and_liger_formulas(loss_type, ls):
    from liger_kernel.chunked_loss.dpo_loss import LigerFusedLinearDPOFunction

    g = torch.Generator().manual_seed(0)
    pc, pr, rc, rr = (-50 * torch.rand(16, generator=g) for _ in range(4))
    pcg, prg = pc.clone().requires_grad_(), pr.clone().requires_grad_()
    ours, gs = grads_of(lambda: dpo_loss(pcg, prg, rc, rr, beta=0.1, loss_type=loss_type, label_smoothing=ls)[0],
                        [pcg, prg])
    trl, tg = grads_of(lambda: _trl_1_16(pcg, prg, rc, rr, 0.1, loss_type, ls), [pcg, prg])
    liger = LigerFusedLinearDPOFunction.preference_loss_fn(
        pc, pr, torch.zeros(32, 1), rc, rr, beta=0.1, loss_type=loss_type, label_smoothing=ls
    )[0]
    assert_close(ours, trl)
    assert_close(ours, liger)
    for a, b in zip(gs, tg):
        assert_close(a, b)


def test_dpo_loss_rejects_bad_arguments():
    x = torch.zeros(2)
    with pytest.raises(ValueError, match="loss_type"):
        dpo_loss(x, x, x, x, loss_type="nope")
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(x, x, x, x, loss_type="robust", label_smoothing=0.5)
    with pytest.raises(ValueError, match=r"\(P,\)"):
        dpo_loss(x, torch.zeros(3), x, x)
    with pytest.raises(ValueError, match="chosen_nll"):
        dpo_loss(x, x, x, x, rpo_alpha=1.0)


def _packed_dpo_batch(P=3, N=47, seed=0):
    """Contiguous [prompt | chosen] [prompt | rejected] runs; prompt rows ignored; pair 2 rejected empty."""
    g = torch.Generator().manual_seed(seed)
    cuts = torch.sort(torch.randperm(N - 1, generator=g)[: 2 * P - 1] + 1).values
    seg = torch.zeros(N, dtype=torch.long)
    for c in cuts:
        seg[c:] += 1
    return seg


@pytest.mark.parametrize(
    "loss_type,ls,rpo,reduction,bias,head",
    [
        ("sigmoid", 0.0, None, "mean", False, {}),
        ("sigmoid", 0.1, 0.5, "sum", True, {}),
        ("hinge", 0.0, None, "mean", False, {}),
        ("ipo", 0.0, None, "mean", True, {}),
        ("robust", 0.2, 1.0, "mean", False, {}),
        ("sigmoid", 0.0, 0.5, "mean", True, {"softcap": 3.0, "temperature": 0.8}),  # Gemma-2 head
    ],
)
def test_fused_dpo_matches_reference(impl, loss_type, ls, rpo, reduction, bias, head):
    P, N = 3, 47
    h, w, b, t = make_inputs(N, 31, 123, ignore_frac=0.3, bias=bias, seed=7)
    seg = _packed_dpo_batch(P, N)
    t[seg == 5] = -100  # an empty (all-ignored) rejected segment
    g = torch.Generator().manual_seed(2)
    ref_c, ref_r = -20 * torch.rand(P, generator=g), -20 * torch.rand(P, generator=g)
    kw = dict(beta=0.5, loss_type=loss_type, label_smoothing=ls, rpo_alpha=rpo, reduction=reduction)
    up = torch.tensor(0.7)  # non-unit upstream gradient

    def reference():
        tok, s = reference_linear_logprobs(h, w, t, bias=b, segment_ids=seg, num_segments=2 * P, **head)
        valid = (t != -100).float()
        counts = torch.zeros(2 * P).index_add_(0, seg, valid)
        nll = -s[0::2].sum() / counts[0::2].sum()
        return dpo_loss(s[0::2], s[1::2], ref_c, ref_r, chosen_nll=nll, chosen_lengths=counts[0::2],
                        rejected_lengths=counts[1::2], **kw)

    loss_fn = FusedLinearDPOLoss(impl=impl, **kw, **head)
    ours, og = grads_of(lambda: loss_fn(h, w, t, seg, ref_c, ref_r, b)[0] * up, params(h, w, b))
    ref, rg = grads_of(lambda: reference()[0] * up, params(h, w, b))
    assert_close(ours, ref, what="loss")
    for name, a, r in zip(("hidden", "weight", "bias"), og, rg):
        assert_close(a, r, what=f"grad {name}")
    with torch.no_grad():  # eval: no gradient pass, same loss and metrics
        ev, m = fused_linear_dpo_loss(h, w, t, seg, ref_c, ref_r, b, impl=impl, **kw, **head)
        _, rm = reference()
    assert_close(ev * up, ref, what="eval loss")
    for k, v in rm.items():
        assert_close(m[k], v, what=k)


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_fused_dpo_average_log_prob_is_the_loss_of_mean_token_logps(impl, loss_type):
    """``average_log_prob``: policy and reference enter the loss as per-token means (Liger / SimPO);
    an empty segment counts one token (no division by zero)."""
    P, N = 3, 47
    h, w, b, t = make_inputs(N, 31, 123, ignore_frac=0.3, bias=True, seed=11)
    seg = _packed_dpo_batch(P, N, seed=1)
    t[seg == 5] = -100
    g = torch.Generator().manual_seed(3)
    ref_c, ref_r = -3 * torch.rand(P, generator=g), -3 * torch.rand(P, generator=g)  # already means
    kw = dict(beta=0.5, loss_type=loss_type)

    def reference():
        _, s = reference_linear_logprobs(h, w, t, bias=b, segment_ids=seg, num_segments=2 * P)
        counts = torch.zeros(2 * P).index_add_(0, seg, (t != -100).float()).clamp(min=1.0)
        mean = s / counts
        return dpo_loss(mean[0::2], mean[1::2], ref_c, ref_r, chosen_lengths=counts[0::2],
                        rejected_lengths=counts[1::2], **kw)

    loss_fn = FusedLinearDPOLoss(impl=impl, average_log_prob=True, **kw)
    ours, og = grads_of(lambda: loss_fn(h, w, t, seg, ref_c, ref_r, b)[0], params(h, w, b))
    ref, rg = grads_of(lambda: reference()[0], params(h, w, b))
    assert_close(ours, ref, what="loss")
    for name, a, r in zip(("hidden", "weight", "bias"), og, rg):
        assert_close(a, r, what=f"grad {name}")
    summed, _ = FusedLinearDPOLoss(impl=impl, **kw)(h, w, t, seg, ref_c, ref_r, b)
    assert not torch.allclose(summed, ours)  # the option changes the loss
