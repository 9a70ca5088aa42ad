"""DPO-family pair losses on sequence log-probs: ``dpo_loss`` (used by every fused DPO entry point).

Every loss here is a differentiable function of four ``(P,)`` summed sequence log-probs (policy and
reference, chosen ``w`` and rejected ``l``) plus the completion token counts, so each one fits the
fused LM-head path (:mod:`zephyr_kernels.dpo`), which takes the gradient on those ``2P`` numbers.
Names and formulas are TRL 1.16's (``DPOTrainer._compute_loss``, reverse-KL scores). With the
log-ratios ``c = log π(y_w) - log π_ref(y_w)``, ``r = log π(y_l) - log π_ref(y_l)``, the margin
``Δ = c - r``, ``σ`` the logistic function and ``ε`` = ``label_smoothing``, per pair:

* ``sigmoid`` — DPO (Rafailov et al. 2023, arXiv:2305.18290): ``-log σ(βΔ)``; with ε > 0 it is
  conservative DPO (cDPO, Mitchell 2023): ``-(1-ε) log σ(βΔ) - ε log σ(-βΔ)`` (TRL 1.16's sigmoid
  has no ε; it equals ours at ε = 0).
* ``hinge`` — SLiC-HF (Zhao et al. 2023, arXiv:2305.10425): ``max(0, 1 - βΔ)``.
* ``ipo`` — IPO (Azar et al. 2023, arXiv:2310.12036, eq. 17): ``(Δ - 1/(2β))²``; as in TRL, when
  completion lengths are given each log-ratio is divided by its sequence's token count first.
* ``robust`` — rDPO (Chowdhury et al. 2024, arXiv:2403.00409):
  ``(-(1-ε) log σ(βΔ) + ε log σ(-βΔ)) / (1 - 2ε)``, ε in [0, 0.5).
* ``exo_pair`` — EXO-pref (Ji et al. 2024, arXiv:2402.00856, eq. 16), KL(q ‖ p) over {w, l} with
  ``q = (σ(βΔ), σ(-βΔ))`` and ``p = (1-ε, ε)``:
  ``σ(βΔ)(log σ(βΔ) - log(1-ε)) + σ(-βΔ)(log σ(-βΔ) - log ε)``, ε in (0, 1) (paper: 1e-3).
* ``nca_pair`` — NCA (Chen et al. 2024, arXiv:2402.05369):
  ``-log σ(βc) - ½ log σ(-βc) - ½ log σ(-βr)``.
* ``bco_pair`` — BCO (Jung et al. 2024, arXiv:2404.04656), paired: ``-log σ(βc) - log σ(-βr)``.
  Stateless, as in TRL 1.16: the paper's reward shift δ (a running mean of the rewards that older
  TRL kept in a ``RunningMoments`` object) is not part of TRL 1.16's formula, so there is no state.
* ``sppo_hard`` — SPPO with hard labels (Wu et al. 2024, arXiv:2405.00675, eq. 4.7 with P = 1 / 0):
  ``(c - 1/(2β))² + (r + 1/(2β))²``.
* ``aot`` — AOT paired (Melnyk et al. 2024, arXiv:2406.05882): the cDPO loss on
  ``sort(log π(y_w) - log π(y_l)) - sort(log π_ref(y_w) - log π_ref(y_l))`` (each sorted over the
  call's pairs); ``aot_unpaired``: on ``sort(c) - sort(r)``. Both depend on which pairs share a call
  (TRL: the per-device batch; here: the micro-batch given to the fused loss). TRL's older name
  ``aot_pair`` is refused with a pointer (see ``REFUSED_LOSS_TYPES``).
* ``apo_zero`` / ``apo_down`` — APO (D'Oosterlinck et al. 2024, arXiv:2408.06266, eqs. 7 / 8):
  ``1 - σ(βc) + σ(βr)``  /  ``σ(βc) + 1 - σ(β(c - r))``.
* ``discopop`` — DiscoPOP (Lu et al. 2024, arXiv:2406.08414, eq. 5), ``z = βΔ``, ``m = σ(z/τ)``:
  ``(1 - m)·(-log σ(z)) + m·exp(-z)`` with τ = ``discopop_tau`` (default 0.05, as TRL).
* ``sigmoid_norm`` — length-normalised DPO: ``-log σ(β(c/|y_w| - r/|y_l|))`` (needs the lengths).
* ``sft`` — the mean NLL per chosen completion token, ``-Σ log π(y_w) / Σ|y_w|``, counted once per
  pair (needs the chosen lengths).
* ``rpo_alpha`` — RPO (Pang et al. 2024, arXiv:2404.19733) adds ``α · NLL(chosen)``, the mean
  negative log-likelihood per chosen token.

``loss_type`` may also be a sequence of names, combined as ``Σ_k w_k · loss_k`` with
``loss_weights`` (default all 1), as TRL's list-valued ``loss_type`` — e.g. MPO (Wang et al. 2024,
arXiv:2411.10442): ``("sigmoid", "bco_pair", "sft")`` with ``(0.8, 0.2, 1.0)``.

``f_divergence_type`` (TRL's, from f-DPO, Wang et al. 2023, arXiv:2309.16240) replaces the log-ratios
``c``, ``r`` by the scores ``f'(t)`` of the ratio ``t = π/π_ref`` in the losses built on the margin
(``sigmoid``, ``hinge``, ``ipo``, ``exo_pair``, ``robust``, ``discopop``, ``sigmoid_norm``; ``sft`` takes
none): ``reverse_kl`` ``log t`` (DPO), ``forward_kl`` ``1 - 1/t``, ``js_divergence``
``log 2 + log σ(log t)``, ``alpha_divergence`` ``(t^(α-1) - 1)/(α-1)`` with α =
``f_alpha_divergence_coef`` (its exponent clamped at 80, as TRL; α = 1 is ``reverse_kl``). The
``rewards/*`` metrics stay ``β·c``, ``β·r``.

``use_weighting`` (WPO, Zhou et al. 2024, arXiv:2406.11827, eq. 2-3, as TRL 1.16) multiplies each pair's
loss by ``w(y_w)·w(y_l)``, ``w(y) = exp(mean_t [log p(y_t) - log Σ_v p(v)²])`` over the completion's
tokens, taken as constants (:mod:`zephyr_kernels.dpo` computes them: ``log p_t - log Σ_v p_v²`` is the
token's log-prob at half the temperature minus its log-prob, one more no-gradient statistics pass).

``reduction="mean"`` averages over pairs; ``"sum"`` sums (and scales the per-batch ``sft`` and RPO
terms by P) so a caller can divide by the global pair count across micro-batches and ranks.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

LOSS_TYPES = (
    "sigmoid", "hinge", "ipo", "robust", "exo_pair", "nca_pair", "bco_pair", "sppo_hard", "aot",
    "aot_unpaired", "apo_zero", "apo_down", "discopop", "sigmoid_norm", "sft",
)
# names TRL accepts or once accepted that this module does not take, with the reason (one line each)
REFUSED_LOSS_TYPES = {
    "aot_pair": "TRL renamed it 'aot_unpaired' (sorted chosen vs. sorted rejected log-ratios); use that name",
    "kto_pair": "removed from TRL: KTO needs unpaired examples and a batch KL estimate, not (P,) pair "
                "log-probs; use TRL's KTOTrainer",
}
F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
# the losses built on the (f-)scores; TRL refuses another f-divergence with the others
F_DIVERGENCE_LOSS_TYPES = ("sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop", "sft")
# label_smoothing range [lo, hi) per loss type; exo_pair needs ε > 0 (log ε); others take no ε
_EPS_RANGE = {"sigmoid": (0.0, 1.0), "robust": (0.0, 0.5), "aot": (0.0, 1.0), "aot_unpaired": (0.0, 1.0)}
METRIC_KEYS = (
    "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
    "logps/chosen", "logps/rejected",
)


def loss_types_of(loss_type) -> tuple:
    """``loss_type`` (a name or a sequence of names) as a tuple of names."""
    return (loss_type,) if isinstance(loss_type, str) else tuple(loss_type)


def _check_eps(name, eps):
    if name == "exo_pair":
        if not 0.0 < eps < 1.0:
            raise ValueError(f"label_smoothing must lie in (0, 1) for loss_type='exo_pair' (EXO takes log ε; "
                             f"the paper uses 1e-3), got {eps}")
        return
    if name not in _EPS_RANGE:
        if eps != 0.0:
            raise ValueError(f"label_smoothing is not used by loss_type={name!r}; set it to 0, got {eps}")
        return
    lo, hi = _EPS_RANGE[name]
    if not lo <= eps < hi:
        raise ValueError(f"label_smoothing must lie in [{lo}, {hi}) for loss_type={name!r}, got {eps}")


def check_dpo_args(beta, loss_type, label_smoothing, reduction, loss_weights=None, discopop_tau=0.05,
                   f_divergence_type="reverse_kl", use_weighting=False):
    """Refuse, with one line, any argument the DPO losses cannot honour (ranges per loss type)."""
    names = loss_types_of(loss_type)
    if use_weighting and {"aot", "aot_unpaired"} & set(names):
        raise ValueError("use_weighting is not supported with loss_type 'aot' / 'aot_unpaired' (as TRL)")
    if f_divergence_type not in F_DIVERGENCES:
        raise ValueError(f"f_divergence_type must be one of {F_DIVERGENCES}, got {f_divergence_type!r}")
    if f_divergence_type != "reverse_kl" and not set(names) <= set(F_DIVERGENCE_LOSS_TYPES):
        raise ValueError(f"f_divergence_type={f_divergence_type!r} is only supported for the loss types "
                         f"{sorted(F_DIVERGENCE_LOSS_TYPES)}, got {list(names)}; use f_divergence_type='reverse_kl'")
    if not names:
        raise ValueError("loss_type must name at least one loss")
    for name in names:
        if name in REFUSED_LOSS_TYPES:
            raise ValueError(f"loss_type={name!r} is not supported: {REFUSED_LOSS_TYPES[name]}")
        if name not in LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {name!r}")
        _check_eps(name, label_smoothing)
    if loss_weights is not None and len(loss_weights) != len(names):
        raise ValueError(f"loss_weights needs one weight per loss_type: {len(loss_weights)} for {names}")
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if "discopop" in names and not discopop_tau > 0:
        raise ValueError(f"discopop_tau must be > 0, got {discopop_tau}")


class _Pairs(NamedTuple):
    """fp32 ``(P,)`` inputs of one call: log-probs, log-ratios, optional lengths, hyperparameters."""
    pc: torch.Tensor
    pr: torch.Tensor
    rc: torch.Tensor
    rr: torch.Tensor
    c: torch.Tensor  # pc - rc
    r: torch.Tensor  # pr - rr
    lc: Optional[torch.Tensor]  # chosen completion token counts
    lr: Optional[torch.Tensor]
    beta: float
    eps: float
    tau: float
    sc: torch.Tensor  # f-divergence score of the chosen ratio (c for reverse_kl)
    sr: torch.Tensor  # ... of the rejected one


def _smoothed_sigmoid(z, eps):
    """cDPO: ``-(1-ε) log σ(z) - ε log σ(-z)``."""
    out = -F.logsigmoid(z) * (1.0 - eps)
    return out - F.logsigmoid(-z) * eps if eps else out


def f_scores(c: torch.Tensor, r: torch.Tensor, f_divergence_type: str, alpha: float) -> tuple:
    """``(f'(t_w), f'(t_l))`` from the log-ratios ``c = log t_w``, ``r = log t_l`` (module docstring)."""
    if f_divergence_type == "reverse_kl" or (f_divergence_type == "alpha_divergence" and abs(alpha - 1.0) < 1e-6):
        return c, r
    if f_divergence_type == "forward_kl":
        return 1.0 - torch.exp(-c), 1.0 - torch.exp(-r)
    if f_divergence_type == "js_divergence":
        return math.log(2.0) + F.logsigmoid(c), math.log(2.0) + F.logsigmoid(r)
    k = alpha - 1.0
    return (torch.exp(torch.clamp(k * c, max=80.0)) - 1.0) / k, (torch.exp(torch.clamp(k * r, max=80.0)) - 1.0) / k


def _per_token(x: _Pairs, name):
    if x.lc is None or x.lr is None:
        raise ValueError(f"loss_type={name!r} needs chosen_lengths and rejected_lengths (completion token counts)")
    return x.sc / x.lc.float().clamp(min=1.0), x.sr / x.lr.float().clamp(min=1.0)


def _ipo(x):
    c, r = (x.sc, x.sr) if x.lc is None else _per_token(x, "ipo")
    return (c - r - 1.0 / (2.0 * x.beta)) ** 2


def _robust(x):
    z = x.beta * (x.sc - x.sr)
    return (-(1.0 - x.eps) * F.logsigmoid(z) + x.eps * F.logsigmoid(-z)) / (1.0 - 2.0 * x.eps)


def _exo_pair(x):
    z = x.beta * (x.sc - x.sr)
    log_pw, log_pl = math.log1p(-x.eps), math.log(x.eps)
    return torch.sigmoid(z) * (F.logsigmoid(z) - log_pw) + torch.sigmoid(-z) * (F.logsigmoid(-z) - log_pl)


def _nca_pair(x):
    bc, br = x.beta * x.c, x.beta * x.r
    return -F.logsigmoid(bc) - 0.5 * F.logsigmoid(-bc) - 0.5 * F.logsigmoid(-br)


def _sppo_hard(x):
    return (x.c - 0.5 / x.beta) ** 2 + (x.r + 0.5 / x.beta) ** 2


def _aot(x):
    delta = torch.sort(x.pc - x.pr).values - torch.sort(x.rc - x.rr).values
    return _smoothed_sigmoid(x.beta * delta, x.eps)


def _aot_unpaired(x):
    return _smoothed_sigmoid(x.beta * (torch.sort(x.c).values - torch.sort(x.r).values), x.eps)


def _discopop(x):
    z = x.beta * (x.sc - x.sr)
    m = torch.sigmoid(z / x.tau)
    return -F.logsigmoid(z) * (1.0 - m) + torch.exp(-z) * m


def _sigmoid_norm(x):
    c, r = _per_token(x, "sigmoid_norm")
    return -F.logsigmoid(x.beta * (c - r))


def _sft(x):
    if x.lc is None:
        raise ValueError("loss_type='sft' needs chosen_lengths (completion token counts)")
    nll = -x.pc.sum() / x.lc.float().sum().clamp(min=1.0)
    # `+ 0·pr` keeps the rejected log-probs in the graph: the fused path asks autograd for both grads
    return nll.expand_as(x.pc) + 0.0 * x.pr


_LOSSES = {
    "sigmoid": lambda x: _smoothed_sigmoid(x.beta * (x.sc - x.sr), x.eps),
    "hinge": lambda x: torch.relu(1.0 - x.beta * (x.sc - x.sr)),
    "ipo": _ipo,
    "robust": _robust,
    "exo_pair": _exo_pair,
    "nca_pair": _nca_pair,
    "bco_pair": lambda x: -F.logsigmoid(x.beta * x.c) - F.logsigmoid(-x.beta * x.r),
    "sppo_hard": _sppo_hard,
    "aot": _aot,
    "aot_unpaired": _aot_unpaired,
    "apo_zero": lambda x: 1.0 - torch.sigmoid(x.beta * x.c) + torch.sigmoid(x.beta * x.r),
    "apo_down": lambda x: torch.sigmoid(x.beta * x.c) + 1.0 - torch.sigmoid(x.beta * (x.c - x.r)),
    "discopop": _discopop,
    "sigmoid_norm": _sigmoid_norm,
    "sft": _sft,
}
assert set(_LOSSES) == set(LOSS_TYPES)


def pair_losses(x: _Pairs, loss_type: str) -> torch.Tensor:
    """``(P,)`` fp32 per-pair losses of one loss type (formulas in the module docstring)."""
    return _LOSSES[loss_type](x)


def _metrics(x: _Pairs, reduce):
    with torch.no_grad():
        chosen_rewards, rejected_rewards = x.beta * x.c, x.beta * x.r
        metrics = {
            "rewards/chosen": reduce(chosen_rewards),
            "rewards/rejected": reduce(rejected_rewards),
            "rewards/accuracies": reduce((chosen_rewards > rejected_rewards).float()),
            "rewards/margins": reduce(chosen_rewards - rejected_rewards),
            "logps/chosen": reduce(x.pc),
            "logps/rejected": reduce(x.pr),
        }
    return {k: v.detach() for k, v in metrics.items()}


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float = 0.1,
    loss_type="sigmoid",
    label_smoothing: float = 0.0,
    rpo_alpha: Optional[float] = None,
    chosen_nll: Optional[torch.Tensor] = None,
    reduction: str = "mean",
    chosen_lengths: Optional[torch.Tensor] = None,
    rejected_lengths: Optional[torch.Tensor] = None,
    loss_weights=None,
    discopop_tau: float = 0.05,
    f_divergence_type: str = "reverse_kl",
    f_alpha_divergence_coef: float = 0.5,
    pair_weights: Optional[torch.Tensor] = None,
):
    """DPO-family loss of ``P`` pairs (formulas and papers in the module docstring).

    Args:
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps: ``(P,)``
            summed sequence log-probs (any float dtype; computed in fp32).
        loss_type: a name in ``LOSS_TYPES`` or a sequence of names (summed with ``loss_weights``).
        rpo_alpha: weight of the RPO NLL term; requires ``chosen_nll`` (0-d, mean NLL per chosen token).
        chosen_lengths, rejected_lengths: optional ``(P,)`` completion token counts; used by ``ipo``
            (TRL's per-token normalisation) and required by ``sigmoid_norm`` and ``sft``.
        discopop_tau: τ of ``discopop``.
        f_divergence_type, f_alpha_divergence_coef: TRL's f-divergence scores (module docstring).
        pair_weights: optional ``(P,)`` factors of each pair's loss (WPO's weights; treated as constants).
    Returns:
        ``(loss, metrics)``: fp32 0-d loss and a dict of detached 0-d tensors named as TRL logs them
        (means over pairs, or sums with ``reduction="sum"``).
    """
    check_dpo_args(beta, loss_type, label_smoothing, reduction, loss_weights, discopop_tau, f_divergence_type)
    pc, pr = policy_chosen_logps.float(), policy_rejected_logps.float()
    rc, rr = ref_chosen_logps.float(), ref_rejected_logps.float()
    if not (pc.shape == pr.shape == rc.shape == rr.shape) or pc.dim() != 1:
        raise ValueError(
            "policy/ref chosen/rejected logps must all be (P,); got "
            f"{[tuple(t.shape) for t in (pc, pr, rc, rr)]}"
        )
    c, r = pc - rc, pr - rr
    x = _Pairs(pc, pr, rc, rr, c, r, chosen_lengths, rejected_lengths, float(beta), float(label_smoothing),
               float(discopop_tau), *f_scores(c, r, f_divergence_type, float(f_alpha_divergence_coef)))
    names = loss_types_of(loss_type)
    weights = [1.0] * len(names) if loss_weights is None else [float(w) for w in loss_weights]
    reduce = torch.mean if reduction == "mean" else torch.sum
    pw = 1.0 if pair_weights is None else pair_weights.detach().float()
    loss = sum(w * reduce(pair_losses(x, name) * pw) for name, w in zip(names, weights))
    if rpo_alpha is not None:
        if chosen_nll is None:
            raise ValueError("rpo_alpha needs chosen_nll (mean NLL per chosen token)")
        scale = 1.0 if reduction == "mean" else pc.numel()
        loss = loss + rpo_alpha * scale * chosen_nll.float()
    return loss, _metrics(x, reduce)
