"""Reference losses (docs/DESIGN.md §4). Per layer l, over a batch of B tokens:

    MSE_l      = mean_b ‖y_l − ŷ_l‖²
    FVU_l      = Σ_b ‖y_l − ŷ_l‖² / Σ_b ‖y_l − ȳ_l‖²          (ȳ_l: the batch mean)
    sparsity   = Σ_s mean_b Σ_i tanh(c · a_{s,i} · ‖W_dec,i^s‖)   ("tanh")  or  Σ_s mean_b Σ_i a·‖W‖  ("l1")
    pre-act    = Σ_s mean_b Σ_i ReLU(θ_i − h_{s,i}) · ‖W_dec,i^s‖
    AuxK       = min(n_dead / k_aux, 1) · Σ_b ‖ê − e‖² / Σ_b ‖y − ȳ‖²   (ê decoded WITHOUT b_dec, e detached)

‖W_dec,i^s‖ is the concatenated norm of feature (s, i) over all its targets (``decoder_norms``).
Codes held dense (``DenseCodes``) take the sparsity penalty over their [B, F] tensor (zeros add
nothing): ``_DensePenalty``, one autograd function that keeps no [B, F] temporary for its backward.
The weighting coefficients (λ, λ_p, the AuxK coefficient) are applied by the caller.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from fastclt.codes import SparseCodes
from fastclt.names import SPARSITY_KINDS

__all__ = ["squared_error", "total_variance", "fvu_terms", "mse", "fvu", "sparsity_loss", "preact_loss", "auxk_loss",
           "SPARSITY_KINDS"]


def _acc(t: torch.Tensor) -> torch.Tensor:
    """Accumulate in fp32, or fp64 for fp64 inputs (the oracle's precision)."""
    return t if t.dtype == torch.float64 else t.float()


def squared_error(y: torch.Tensor, y_hat: torch.Tensor) -> torch.Tensor:
    """y, y_hat: [B, ..., d] → Σ_b ‖y − ŷ‖² per middle index: [...] in fp32."""
    if y.shape != y_hat.shape:
        raise ValueError(f"y_hat: expected the shape of y {tuple(y.shape)}, got {tuple(y_hat.shape)}")
    diff = _acc(y) - _acc(y_hat)
    return diff.pow(2).sum(-1).sum(0)


def total_variance(y: torch.Tensor) -> torch.Tensor:
    """y: [B, ..., d] → Σ_b ‖y − ȳ‖² per middle index: [...] in fp32 (ȳ: the batch mean); B · the
    population variance, by two passes (the mean, then the squares of y − ȳ in one temporary of y's
    size): as accurate as a Welford pass and ~6× faster on a CPU (4.6 vs 0.7 ms at [2048, 1, 768])."""
    yf = _acc(y)
    if y.shape[0] == 0:
        return yf.new_zeros(y.shape[1:-1])
    c = yf - yf.mean(0)
    sq = c * c if c.requires_grad else c.mul_(c)  # (in place unless autograd needs c)
    return sq.sum(0).sum(-1)


def fvu_terms(y: torch.Tensor, y_hat: torch.Tensor) -> tuple:
    """y, y_hat: [B, ..., d] → (``squared_error(y, y_hat)``, ``total_variance(y)``): the FVU's
    numerator and denominator per middle index."""
    return squared_error(y, y_hat), total_variance(y)


def mse(y: torch.Tensor, y_hat: torch.Tensor) -> torch.Tensor:
    """y, y_hat: [B, L, d] (or [B, d]) → MSE per layer [L] (or a scalar): mean_b ‖y − ŷ‖²."""
    return squared_error(y, y_hat) / max(y.shape[0], 1)


def fvu(y: torch.Tensor, y_hat: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """y, y_hat: [B, L, d] (or [B, d]) → FVU per layer [L] (or a scalar)."""
    return squared_error(y, y_hat) / total_variance(y).clamp_min(eps)


def sparsity_loss(codes: Sequence[SparseCodes], decoder_norms: torch.Tensor, kind: str = "tanh",
                  c: float = 1.0) -> torch.Tensor:
    """codes: L SparseCodes over B rows; decoder_norms: [L, F] → scalar Σ_s mean_b Σ_i penalty(a·‖W‖)."""
    if kind not in SPARSITY_KINDS:
        raise ValueError(f"sparsity: expected one of {SPARSITY_KINDS}, got {kind!r}")
    total = _acc(decoder_norms).new_zeros(())
    for s, cs in enumerate(codes):
        if cs.batch_size == 0:
            continue
        if cs.is_dense:
            total = total + _DensePenalty.apply(cs.dense, decoder_norms[s], kind, c) / cs.batch_size
            continue
        scaled = _acc(cs.value) * _acc(decoder_norms[s])[cs.index.long()]
        pen = torch.tanh(c * scaled) if kind == "tanh" else scaled
        total = total + pen.sum() / cs.batch_size
    return total


class _DensePenalty(torch.autograd.Function):
    """(a [B, F], n [F], kind, c) → Σ_{b,i} penalty(a_{b,i} · n_i), accumulated in fp32 (fp64 for fp64).

    tanh: p = tanh(c·a·n),   ∂/∂a = c·n·(1 − p²),   ∂/∂n_i = Σ_b c·a_{b,i}·(1 − p²)
    l1:   p = a·n,           ∂/∂a = n,              ∂/∂n_i = Σ_b a_{b,i}
    The backward recomputes p from a (which the decoder keeps anyway) instead of saving it."""

    @staticmethod
    def forward(ctx, a, n, kind, c):
        ctx.save_for_backward(a, n)
        ctx.kind, ctx.c = kind, c
        af, nf = _acc(a), _acc(n)
        if kind == "l1":
            return (af.sum(0) * nf).sum()
        return torch.tanh(c * (af * nf)).sum()

    @staticmethod
    def backward(ctx, g):
        a, n = ctx.saved_tensors
        af, nf = _acc(a), _acc(n)
        if ctx.kind == "l1":
            da = (g * nf).expand_as(af) if ctx.needs_input_grad[0] else None
            dn = g * af.sum(0) if ctx.needs_input_grad[1] else None
        else:
            p = (af * nf).mul_(ctx.c).tanh_()
            cg = ctx.c * g
            slope = torch.addcmul(cg, p, p, value=-cg)  # c·g·(1 − p²), one pass
            da = slope * nf if ctx.needs_input_grad[0] else None
            dn = slope.mul_(af).sum(0) if ctx.needs_input_grad[1] else None
        return (None if da is None else da.to(a.dtype)), (None if dn is None else dn.to(n.dtype)), None, None


def preact_loss(h: torch.Tensor, threshold: torch.Tensor, decoder_norms: torch.Tensor) -> torch.Tensor:
    """h: [B, F] (one layer), threshold: [F], decoder_norms: [F] → scalar mean_b Σ_i ReLU(θ − h)·‖W‖."""
    if h.shape[0] == 0:
        return h.new_zeros((), dtype=torch.float32)
    gap = torch.relu(_acc(threshold) - _acc(h))
    return (gap * _acc(decoder_norms)).sum() / h.shape[0]


def auxk_loss(aux_recon: torch.Tensor, residual: torch.Tensor, y: torch.Tensor, n_dead: int, k_aux: int,
              eps: float = 1e-12, total_var: Optional[torch.Tensor] = None) -> torch.Tensor:
    """aux_recon ê, residual e = y − ŷ, y: [B, L, d] (or [B, d]) → scalar
    min(n_dead/k_aux, 1) · Σ_l Σ_b‖ê_l − e_l‖² / Σ_b‖y_l − ȳ_l‖².  ``residual`` is detached here.
    ``total_var``: ``total_variance(y)`` when the caller has it already (clamped to eps here)."""
    if n_dead <= 0:
        return aux_recon.new_zeros((), dtype=torch.float32)
    scale = min(n_dead / k_aux, 1.0)
    tv = total_variance(y) if total_var is None else total_var
    ratio = squared_error(residual.detach(), aux_recon) / tv.clamp_min(eps)
    return scale * ratio.sum()
