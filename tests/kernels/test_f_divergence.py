"""TRL's ``f_divergence_type`` (f-DPO, Wang et al. 2023): the f-scores of the policy/reference ratio in
place of the log-ratios, checked against the formulas written out here, through ``dpo_loss`` and the
fused head (forward and gradients against a plain PyTorch head, fp32)."""

import math

import pytest
import torch
import torch.nn.functional as F

import zephyr_kernels as zk
from zephyr_kernels.losses import F_DIVERGENCE_LOSS_TYPES

from .helpers import make_inputs


def _scores(t_log, kind, alpha):
    """f'(t) of the ratio t = exp(t_log), as TRL 1.16 writes them."""
    if kind == "forward_kl":
        return 1 - torch.exp(-t_log)
    if kind == "js_divergence":
        return math.log(2) + F.logsigmoid(t_log)
    if kind == "alpha_divergence":
        return (torch.exp(torch.clamp((alpha - 1) * t_log, max=80.0)) - 1) / (alpha - 1)
    return t_log


def _reference(pc, pr, rc, rr, kind, alpha, loss_type, beta, lens):
    sc, sr = _scores(pc - rc, kind, alpha), _scores(pr - rr, kind, alpha)
    delta = sc - sr
    if loss_type == "sigmoid":
        return -F.logsigmoid(beta * delta)
    if loss_type == "hinge":
        return torch.relu(1 - beta * delta)
    if loss_type == "ipo":
        return (sc / lens[0] - sr / lens[1] - 1 / (2 * beta)) ** 2
    if loss_type == "sigmoid_norm":
        return -F.logsigmoid(beta * (sc / lens[0] - sr / lens[1]))
    raise AssertionError(loss_type)


KINDS = [("forward_kl", 0.5), ("js_divergence", 0.5), ("alpha_divergence", 0.3), ("alpha_divergence", 1.7)]


@pytest.mark.parametrize("kind,alpha", KINDS)
@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge", "ipo", "sigmoid_norm"])
def test_f_scores_follow_trls_formulas(kind, alpha, loss_type):
    g = torch.Generator().manual_seed(1)
    pc, pr = -torch.rand(5, generator=g) * 40, -torch.rand(5, generator=g) * 40
    rc, rr = pc + torch.randn(5, generator=g), pr + torch.randn(5, generator=g)
    lens = (torch.tensor([3.0, 7, 1, 9, 4]), torch.tensor([5.0, 2, 8, 6, 1]))
    got, _ = zk.dpo_loss(pc, pr, rc, rr, beta=0.2, loss_type=loss_type, f_divergence_type=kind,
                         f_alpha_divergence_coef=alpha, chosen_lengths=lens[0], rejected_lengths=lens[1])
    want = _reference(pc, pr, rc, rr, kind, alpha, loss_type, 0.2, lens).mean()
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


def test_reverse_kl_and_alpha_one_are_plain_dpo():
    pc, pr, rc, rr = torch.tensor([-3.0, -5]), torch.tensor([-4.0, -2]), torch.tensor([-3.5, -4]), torch.tensor([-3.0, -3])
    plain, _ = zk.dpo_loss(pc, pr, rc, rr)
    for kind, alpha in (("reverse_kl", 0.5), ("alpha_divergence", 1.0)):
        got, _ = zk.dpo_loss(pc, pr, rc, rr, f_divergence_type=kind, f_alpha_divergence_coef=alpha)
        assert torch.equal(got, plain)


def test_other_losses_and_unknown_kinds_are_refused_as_trl_does():
    assert "bco_pair" not in F_DIVERGENCE_LOSS_TYPES
    x = torch.zeros(2)
    with pytest.raises(ValueError, match="only supported for the loss types"):
        zk.dpo_loss(x, x, x, x, loss_type="bco_pair", f_divergence_type="js_divergence")
    with pytest.raises(ValueError, match="f_divergence_type must be one of"):
        zk.dpo_loss(x, x, x, x, f_divergence_type="chi2")


@pytest.mark.parametrize("kind,alpha", KINDS)
def test_fused_head_with_f_divergence_matches_a_plain_head(kind, alpha):
    """Forward and gradients of the fused DPO head against plain PyTorch (full logits, fp32), V > 64k."""
    N, D, V, P = 41, 16, 65_601, 2
    h, w, _, t = make_inputs(N, D, V, seed=4, ignore_frac=0.25)
    seg = torch.arange(N) * (2 * P) // N
    with torch.no_grad():  # a reference near the policy: log-ratios of O(1), where f' is well conditioned
        logp0 = torch.log_softmax(h @ w.t(), -1).gather(1, t.clamp(min=0)[:, None]).squeeze(1) * (t != -100)
        segs0 = torch.zeros(2 * P).index_add(0, seg, logp0)
    ref_c, ref_r = segs0[0::2] + torch.tensor([0.3, -0.2]), segs0[1::2] + torch.tensor([-0.4, 0.5])
    got = zk.fused_linear_dpo_loss(h, w, t, seg, ref_c, ref_r, beta=0.1, f_divergence_type=kind,
                                   f_alpha_divergence_coef=alpha, impl="torch")[0]
    got.backward()
    g_h, g_w = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    logp = torch.log_softmax(h @ w.t(), -1).gather(1, t.clamp(min=0)[:, None]).squeeze(1) * (t != -100)
    segs = torch.zeros(2 * P).index_add(0, seg, logp)
    want = _reference(segs[0::2], segs[1::2], ref_c, ref_r, kind, alpha, "sigmoid", 0.1, None).mean()
    want.backward()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_h, h.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(g_w, w.grad, rtol=1e-4, atol=1e-7)
