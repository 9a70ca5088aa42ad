"""WPO (``use_weighting``, Zhou et al. 2024, as TRL 1.16): each pair's loss times w(y_w)·w(y_l),
w(y) = exp(mean_t [log p_t - log Σ_v p_v²]) as constants -- the fused head (every impl) against a plain
PyTorch head written as TRL writes it (fp32: forward and gradients; odd shapes, V > 64k)."""

import pytest
import torch
import torch.nn.functional as F

import zephyr_kernels as zk

from .helpers import make_inputs


def _plain(h, w, t, seg, P, ref_c, ref_r, beta, loss_type):
    logprobs = F.log_softmax(h @ w.t(), -1)
    mask = (t != -100).float()
    tok = logprobs.gather(1, t.clamp(min=0)[:, None]).squeeze(1) * mask
    with torch.no_grad():  # TRL: per_token_logps - logsumexp(2 * logprobs), averaged over the completion
        aligned = (tok - torch.logsumexp(2 * logprobs, -1)) * mask
        counts = torch.zeros(2 * P).index_add(0, seg, mask).clamp(min=1)
        weights = torch.exp(torch.zeros(2 * P).index_add(0, seg, aligned) / counts)
    segs = torch.zeros(2 * P).index_add(0, seg, tok)
    n = torch.zeros(2 * P).index_add(0, seg, mask)  # completion lengths (ipo normalises by them, as TRL)

    def loss(i):
        return zk.dpo_loss(segs[0::2][i], segs[1::2][i], ref_c[i], ref_r[i], beta=beta, loss_type=loss_type,
                           reduction="sum", chosen_lengths=n[0::2][i], rejected_lengths=n[1::2][i])[0]

    losses = loss(slice(None))
    per_pair = torch.stack([loss(slice(i, i + 1)) for i in range(P)])
    return (per_pair * weights[0::2] * weights[1::2]).mean(), losses


# the weights come from the statistics pass every backend shares; the loss types are pair-level math
@pytest.mark.parametrize("impl,loss_type", [("torch", "sigmoid"), ("triton", "sigmoid"), ("triton_tiled", "sigmoid"),
                                            ("torch", "ipo"), ("torch", "bco_pair")])
def test_wpo_weights_match_trls(impl, loss_type):
    N, D, V, P = 29, 8, 65_603, 3
    h, w, _, t = make_inputs(N, D, V, seed=11, ignore_frac=0.3)
    seg = torch.arange(N) * (2 * P) // N
    ref_c, ref_r = -torch.rand(P) * 50 - 30, -torch.rand(P) * 50 - 30
    got = zk.fused_linear_dpo_loss(h, w, t, seg, ref_c, ref_r, beta=0.2, loss_type=loss_type, use_weighting=True,
                                   impl=impl)[0]
    got.backward()
    g_h, g_w = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    want, unweighted = _plain(h, w, t, seg, P, ref_c, ref_r, 0.2, loss_type)
    want.backward()
    torch.testing.assert_close(got, want, rtol=2e-5, atol=1e-7)
    torch.testing.assert_close(g_h, h.grad, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(g_w, w.grad, rtol=1e-4, atol=1e-8)
    assert not torch.allclose(got, unweighted / P)  # the weights are not all 1


def test_wpo_refuses_aot_as_trl():
    with pytest.raises(ValueError, match="use_weighting is not supported with loss_type 'aot'"):
        zk.FusedLinearDPOLoss(loss_type="aot", use_weighting=True)
