"""``zephyr_kernels.LigerFusedLinearDPOLoss`` is a drop-in for Liger's: Liger's documented usage with
only the import swapped gives the same loss, gradients and auxiliary outputs."""

import pytest
import torch
from tests.kernels.helpers import assert_close

import zephyr_kernels


def _liger_usage(LigerFusedLinearDPOLoss, *, loss_type="sigmoid", **ctor):
    """Liger-Kernel's documented post-training usage (``loss = loss_fn(lm_head.weight, x, target)``),
    verbatim except for the class that is passed in: a policy LM head, a frozen reference head."""
    torch.manual_seed(0)
    B, T, H, V = 3, 11, 24, 131
    lm_head = torch.nn.Linear(H, V, bias=True)
    ref_lm_head = torch.nn.Linear(H, V, bias=True)
    x = torch.randn(2 * B, T, H, requires_grad=True)
    ref_x = x.detach() + 0.05 * torch.randn(2 * B, T, H)
    target = torch.randint(V, (2 * B, T))
    target[:, :4] = -100  # prompt tokens
    target[1, 9:] = -100  # padding
    dpo_loss = LigerFusedLinearDPOLoss(loss_type=loss_type, **ctor)
    loss, aux = dpo_loss(lm_head.weight, x, target, lm_head.bias, ref_input=ref_x,
                         ref_weight=ref_lm_head.weight, ref_bias=ref_lm_head.bias)
    loss.backward()
    return loss.detach(), aux, [x.grad, lm_head.weight.grad, lm_head.bias.grad]


def _assert_same(ctor, loss_type="sigmoid"):
    from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss

    liger = _liger_usage(LigerFusedLinearDPOLoss, loss_type=loss_type, **dict(ctor, compiled=False))
    ours = _liger_usage(zephyr_kernels.LigerFusedLinearDPOLoss, loss_type=loss_type, **ctor)
    assert_close(ours[0], liger[0], what="loss")
    names = ("chosen_logps", "rejected_logps", "chosen_logits_mean", "rejected_logits_mean", "nll_loss",
             "chosen_rewards", "rejected_rewards")
    assert len(ours[1]) == len(liger[1]) == len(names)
    for name, a, r in zip(names, ours[1], liger[1]):
        assert a.shape == torch.as_tensor(r).shape, name
        assert_close(a, torch.as_tensor(r), what=name)
    for name, a, r in zip(("x", "weight", "bias"), ours[2], liger[2]):
        assert r.abs().max() > 0
        assert_close(a, r, atol=2e-5, what=f"grad {name}")


@pytest.mark.parametrize("ctor", [
    {},
    {"beta": 0.5, "compute_nll_loss": True, "alpha": 0.7},
    {"average_log_prob": True},
    {"use_ref_model": False, "chunk_size": 2},
], ids=["defaults", "rpo", "average_log_prob", "no_ref_chunk2"])
def test_documented_usage_same_loss_and_grads(ctor):
    _assert_same(ctor)


@pytest.mark.parametrize("loss_type,ctor", [
    ("hinge", {}), ("robust", {"label_smoothing": 0.2}), ("exo_pair", {"label_smoothing": 1e-3}),
    ("nca_pair", {}), ("bco_pair", {}), ("sppo_hard", {}), ("apo_zero", {}), ("apo_down", {}),
    ("discopop", {"discopop_tau": 0.1}),
])
def test_every_liger_loss_type(loss_type, ctor):
    _assert_same(ctor, loss_type)


def test_liger_positional_constructor_order():
    from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss

    args = (-1, 0.3, 0.5, True, False, True, True, 4, "robust", 0.1, 0.07)
    liger, ours = LigerFusedLinearDPOLoss(*args), zephyr_kernels.LigerFusedLinearDPOLoss(*args)
    for attr in ("ignore_index", "beta", "alpha", "compute_nll_loss", "compiled", "use_ref_model",
                 "average_log_prob", "chunk_size", "loss_type", "label_smoothing", "discopop_tau"):
        assert getattr(ours, attr) == getattr(liger, attr), attr


def test_refusals_are_one_line():
    with pytest.raises(ValueError, match="label_smoothing"):
        zephyr_kernels.LigerFusedLinearDPOLoss(loss_type="exo_pair")
    with pytest.raises(ValueError, match="ref_input"):
        zephyr_kernels.LigerFusedLinearDPOLoss()(torch.randn(5, 4), torch.randn(2, 3, 4), torch.zeros(2, 3, dtype=torch.long))


def test_precomputed_reference_logps_equal_reference_hidden_states():
    """The zephyr extension: numbers from an offline reference pass give the same loss."""
    torch.manual_seed(1)
    w, x, ref_x = torch.randn(50, 8), torch.randn(4, 6, 8, requires_grad=True), torch.randn(4, 6, 8)
    t = torch.randint(50, (4, 6))
    t[:, :2] = -100
    mod = zephyr_kernels.LigerFusedLinearDPOLoss(impl="torch")
    loss, aux = mod(w, x, t, ref_input=ref_x)
    _, ref = zephyr_kernels.linear_logprobs(ref_x.reshape(-1, 8), w, t.reshape(-1),
                                            segment_ids=torch.tensor([0, 2, 1, 3]).repeat_interleave(6), num_segments=4)
    loss2, _ = mod(w, x, t, ref_chosen_logps=ref[0::2], ref_rejected_logps=ref[1::2])
    assert_close(loss, loss2)
