"""LM-head cases — fused log-probs / cross-entropy / DPO from hidden states — for every provider.

A case is described by a plain dict (``spec``) so the very same case can be rebuilt in a fresh
subprocess for the CPU peak-RSS measurement (``memprobe.py``):

``{"task": "dpo"|"dpo_ref"|"ce", "provider": ..., "n", "d", "v", "dtype", "kind": "peaked"|"normal",
"pairs", "device", "seed"}``, optionally ``"impl"`` (the zephyr backend of a configuration sweep;
default: :func:`benchmarks.harness.zephyr_impl`).

Tasks (all from hidden states ``(N, D)`` and the LM-head weight ``(V, D)``, loss → scalar):

* ``dpo``: sigmoid DPO (β 0.1) over ``pairs`` pairs laid out first half chosen / second half
  rejected, reference log-probs *precomputed* (numbers).  Liger cannot take precomputed reference
  log-probs, so its anchor runs ``use_ref_model=False`` — strictly less work than the others.
* ``dpo_ref``: the same loss where the anchor needs the *reference hidden states* (Liger's
  ``ref_input``/``ref_weight`` path; naive torch computes the reference logits too) while
  zephyr_fast still takes precomputed numbers — what each design costs at the LM head.
* ``ce``: mean token cross-entropy (SFT), 20 % of the rows ignored.

Provider ``gemm_floor`` is a yardstick, not a loss: the four GEMMs a logits-free DPO head must run
when a pair's logits cannot be kept (forward ``h Wᵀ``; backward recomputes it, then ``dX = Z W`` and
``dW = Zᵀ h``), over the loss rows, as single BLAS calls with nothing else — no softmax, no chunking.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from .harness import provider_unavailable, tensor_bytes, zephyr_impl
from .inputs import IGNORE_INDEX, dpo_layout, lm_head_inputs

TASKS = ("dpo", "dpo_ref", "ce")
BETA = 0.1

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class Unavailable(RuntimeError):
    """The provider cannot run this case here; the message is the skip reason."""


def flops(spec: dict) -> float:
    """6·N·D·V: forward logits, dX and dW (recomputation is not credited)."""
    return 6.0 * spec["n"] * spec["d"] * spec["v"]


# ----------------------------------------------------------------------------------------------
# naive torch anchors (plain PyTorch, materialise the logits)
# ----------------------------------------------------------------------------------------------

def naive_token_logps(hidden, weight, labels):
    logits = (hidden @ weight.t()).float()
    logp = torch.log_softmax(logits, dim=-1)
    valid = labels != IGNORE_INDEX
    tok = logp.gather(1, labels.clamp(min=0).unsqueeze(1)).squeeze(1)
    return torch.where(valid, tok, torch.zeros_like(tok))


def _dpo_from_segments(seg, ref_c, ref_r):
    chosen, rejected = seg[0::2], seg[1::2]
    margin = (chosen - ref_c) - (rejected - ref_r)
    return -F.logsigmoid(BETA * margin).mean()


def naive_dpo(hidden, weight, labels, segment_ids, num_segments, ref_c, ref_r):
    tok = naive_token_logps(hidden, weight, labels)
    seg = torch.zeros(num_segments, dtype=torch.float32, device=tok.device).index_add(0, segment_ids, tok)
    return _dpo_from_segments(seg, ref_c, ref_r)


def naive_dpo_with_ref_hidden(hidden, weight, labels, segment_ids, num_segments, ref_hidden, ref_weight):
    with torch.no_grad():
        ref_tok = naive_token_logps(ref_hidden, ref_weight, labels)
        ref = torch.zeros(num_segments, device=ref_tok.device).index_add(0, segment_ids, ref_tok)
    return naive_dpo(hidden, weight, labels, segment_ids, num_segments, ref[0::2], ref[1::2])


def naive_ce(hidden, weight, labels):
    return F.cross_entropy((hidden @ weight.t()).float(), labels, ignore_index=IGNORE_INDEX)


# ----------------------------------------------------------------------------------------------
# the case
# ----------------------------------------------------------------------------------------------

class LMHeadCase:
    """Inputs + the provider's loss closure.  ``loss()`` runs the forward; grads land on leaves."""

    def __init__(self, spec: dict):
        self.spec = spec = dict(spec)
        task, provider = spec["task"], spec["provider"]
        if task not in TASKS:
            raise ValueError(f"unknown task {task!r}")
        dev = torch.device(spec.get("device", "cpu"))
        reason = provider_unavailable(provider, dev)
        if reason:
            raise Unavailable(reason)
        dtype = DTYPES[spec.get("dtype", "float32")]
        n, d, v = spec["n"], spec["d"], spec["v"]
        self.device = dev
        self.hidden, self.weight, targets = lm_head_inputs(
            n, d, v, dtype=dtype, device=dev, kind=spec.get("kind", "peaked"), seed=spec.get("seed", 0))
        self.leaves = [self.hidden, self.weight]
        gen = torch.Generator().manual_seed(spec.get("seed", 0) + 1)
        if task == "ce":
            ignored = torch.rand(n, generator=gen) < 0.2
            self.labels = torch.where(ignored.to(dev), torch.full_like(targets, IGNORE_INDEX), targets)
        else:
            pairs = spec["pairs"]
            self.seq_len, self.segment_ids, mask = dpo_layout(n, pairs, device=dev)
            self.labels = torch.where(mask, targets, torch.full_like(targets, IGNORE_INDEX))
            self.num_segments = 2 * pairs
            # plausible sequence log-probs of a reference model: about -1.5 nats per target token
            tokens_per_seq = int(mask.sum()) // (2 * pairs)
            ref = -1.5 * tokens_per_seq + 5.0 * torch.randn(2, pairs, generator=gen)
            self.ref_c, self.ref_r = ref[0].to(dev), ref[1].to(dev)
            if task == "dpo_ref":
                noise = 0.05 * torch.randn(self.hidden.shape, generator=gen)
                self.ref_hidden = (self.hidden.detach().float().cpu() + noise).to(dev, dtype)
                self.ref_weight = self.weight.detach().clone()
                # the numbers an offline reference pass over these hidden states would have stored,
                # so every provider computes the same loss
                with torch.no_grad():
                    ref_tok = naive_token_logps(self.ref_hidden, self.ref_weight, self.labels)
                    ref = torch.zeros(2 * pairs, device=dev).index_add(0, self.segment_ids, ref_tok)
                self.ref_c, self.ref_r = ref[0::2].contiguous(), ref[1::2].contiguous()
        self.loss_fn = self._build(task, provider)

    # -- providers -------------------------------------------------------------------------
    def _build(self, task: str, provider: str) -> Callable[[], torch.Tensor]:
        builders = {"zephyr_fast": self._zephyr, "naive_torch": self._torch, "torch_compile": self._torch,
                    "liger": self._liger, "gemm_floor": self._gemm_floor, "cce": self._cce}
        if provider not in builders:
            raise Unavailable(f"{provider}: no {task} case")
        return builders[provider](task, provider)

    def _zephyr(self, task: str, provider: str):
        import zephyr_kernels as zk

        impl = self.spec.get("impl") or zephyr_impl(self.device)
        if task == "ce":
            return lambda: zk.linear_cross_entropy(self.hidden, self.weight, self.labels, impl=impl)
        module = zk.FusedLinearDPOLoss(beta=BETA, impl=impl)
        return lambda: module(self.hidden, self.weight, self.labels, self.segment_ids, self.ref_c, self.ref_r)[0]

    def _torch(self, task: str, provider: str):
        wrap = torch.compile if provider == "torch_compile" else (lambda f: f)
        if task == "ce":
            fn = wrap(naive_ce)
            return lambda: fn(self.hidden, self.weight, self.labels)
        if task == "dpo":
            fn = wrap(naive_dpo)
            return lambda: fn(self.hidden, self.weight, self.labels, self.segment_ids,
                              self.num_segments, self.ref_c, self.ref_r)
        fn = wrap(naive_dpo_with_ref_hidden)
        return lambda: fn(self.hidden, self.weight, self.labels, self.segment_ids,
                          self.num_segments, self.ref_hidden, self.ref_weight)

    def _liger(self, task: str, provider: str):
        if task == "ce":
            if self.device.type != "cuda":
                raise Unavailable("liger: LigerFusedLinearCrossEntropyLoss is a Triton kernel (CUDA only)")
            from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

            module = LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE_INDEX)
            return lambda: _first(module(self.weight, self.hidden, self.labels))
        from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss

        use_ref = task == "dpo_ref"
        module = LigerFusedLinearDPOLoss(beta=BETA, use_ref_model=use_ref, compiled=True)
        rows, t = 2 * self.spec["pairs"], self.seq_len
        h3 = lambda x: x.view(rows, t, -1)  # noqa: E731  (Liger wants (2B, T, D))
        if use_ref:
            return lambda: _first(module(self.weight, h3(self.hidden), self.labels.view(rows, t),
                                         ref_input=h3(self.ref_hidden), ref_weight=self.ref_weight))
        return lambda: _first(module(self.weight, h3(self.hidden), self.labels.view(rows, t)))

    def _gemm_floor(self, task: str, provider: str):
        if task != "dpo":
            raise Unavailable(f"gemm_floor: measured for task=dpo only, not {task}")
        rows = (self.labels != IGNORE_INDEX).nonzero().squeeze(1)  # untimed: built once
        return lambda: _GemmFloor.apply(self.hidden, self.weight, rows)

    def _cce(self, task: str, provider: str):
        from cut_cross_entropy import linear_cross_entropy

        impl = "cce" if self.device.type == "cuda" else "torch_compile"
        if task == "ce":
            return lambda: linear_cross_entropy(self.hidden, self.weight, self.labels, impl=impl)
        if task == "dpo_ref":
            raise Unavailable("cce: has no DPO / reference path (cross-entropy only)")

        def cce_dpo():
            tok = -linear_cross_entropy(self.hidden, self.weight, self.labels, impl=impl, reduction="none").float()
            seg = torch.zeros(self.num_segments, device=self.device).index_add(0, self.segment_ids, tok)
            return _dpo_from_segments(seg, self.ref_c, self.ref_r)

        return cce_dpo

    # -- helpers the harness uses --------------------------------------------------------------
    def loss(self) -> torch.Tensor:
        return self.loss_fn()

    def zero_grad(self) -> None:
        for t in self.leaves:
            t.grad = None

    def full(self) -> torch.Tensor:
        self.zero_grad()
        loss = self.loss_fn()
        loss.backward()
        return loss

    def grad_floor_bytes(self) -> int:
        """dX + dW: the gradient buffers every provider must produce (the memory floor)."""
        return tensor_bytes(*self.leaves)


class _GemmFloor(torch.autograd.Function):
    """The 4 GEMMs of a logits-free head over ``rows``; the logits stand in for their gradient."""

    @staticmethod
    def forward(ctx, hidden, weight, rows):
        h = hidden.index_select(0, rows)
        ctx.save_for_backward(h, weight, rows)
        ctx.n = hidden.shape[0]
        return (h @ weight.t())[0, 0]  # a scalar to call backward on; the logits die here

    @staticmethod
    def backward(ctx, g):
        h, weight, rows = ctx.saved_tensors
        z = h @ weight.t()  # recomputed, as a head that keeps no logits must
        dh = z @ weight
        dw = z.t() @ h
        dx = torch.zeros(ctx.n, h.shape[1], dtype=h.dtype, device=h.device).index_copy_(0, rows, dh)
        return dx, dw, None


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out
