"""Encode into dense codes (``fastclt.ops.encode(..., form="dense")``; docs/DESIGN.md §17).

    h = W_enc (x − pre_bias) + b_enc         one GEMM; its autograd backward is the dense encoder
                                             backward (dx = dH W_enc, dW_enc = dHᵀ (x − pre_bias))
    ReLU       a = max(h, 0)                 stored = 1[h > 0]
    JumpReLU   a = h · 1[h > θ]              stored = 1[h > θ] or |h − θ| < ε/2 (the band)

→ ``DenseCodes(a, stored)``: above the crossover density the codes go from the encoder GEMM to the
dense decodes and the losses without a CSR extraction or a scatter back into [B, F].

The JumpReLU is one autograd function that keeps two bool masks for its backward instead of h
(the straight-through estimator of fastclt/ops/reference/activation.py, θ's gradient summed over
the batch in fp32, fp64 for fp64):

    dh   = g · 1[h > θ]
    dθ_f = (−θ_f / ε) · Σ_b g[b, f] · 1[|h − θ_f| < ε/2]       (the band, as the stored entries')

Memory: the [B, F] codes, the [B, F] stored mask and two bool [B, F] masks for the backward (the C++
kernels: one uint8 code); h itself is freed after the forward unless ``return_preacts`` keeps it (the
pre-activation loss reads it). On the CPU with fastclt._C built the masked JumpReLU runs on its fused
kernels (csrc/cpu/dense_cpu.cpp: one pass over h forward, one over the gradient backward, ~10× / 7×
the PyTorch formulation at [1024, 4096]).
"""
from __future__ import annotations

from typing import Optional

import torch

from fastclt.codes import DenseCodes
from fastclt.ops.reference.encode import preacts

__all__ = ["encode", "jumprelu_masked"]


class _JumpReLUMasked(torch.autograd.Function):
    """(h [B, F], θ [F], ε) → (a [B, F], stored bool [B, F]); see the module docstring."""

    @staticmethod
    def forward(ctx, h, theta, eps):
        # (products with bool masks, not torch.where: ~3× faster on the CPU; u > 0 ⟺ h > θ for floats)
        u = h - theta
        active = u > 0
        band = u.abs_() < 0.5 * eps  # the reference's band_mask: |h − θ| < ε/2
        stored = active | band
        ctx.save_for_backward(active, band, theta)
        ctx.eps = eps
        ctx.mark_non_differentiable(stored)
        ctx.set_materialize_grads(False)  # no zero-filled [B, F] gradient for the mask
        return h * active, stored

    @staticmethod
    def backward(ctx, g, _):
        if g is None:
            return None, None, None
        active, band, theta = ctx.saved_tensors
        dh = dtheta = None
        if ctx.needs_input_grad[0]:
            dh = g * active
        if ctx.needs_input_grad[1]:
            acc = torch.float64 if g.dtype == torch.float64 else torch.float32
            s = (g * band).sum(0, dtype=acc)
            dtheta = (s * (-(theta.to(acc) / ctx.eps))).to(theta.dtype)
        return dh, dtheta, None


def jumprelu_masked(h: torch.Tensor, threshold: torch.Tensor, bandwidth: float) -> tuple[torch.Tensor, torch.Tensor]:
    """h: [B, F], threshold: [F] → (a: [B, F] JumpReLU with straight-through gradients to h and θ,
    stored: bool [B, F] the active and band entries). On the CPU (fp32, bf16) with fastclt._C built:
    its fused kernels (fastclt/ops/ext/dense.py, one pass each way, the same numbers); else the
    PyTorch formulation above."""
    from fastclt.ops.ext import dense as ext_dense

    if ext_dense.available(h) and h.dim() == 2:
        return ext_dense.jumprelu_masked(h, threshold.to(h.dtype), bandwidth)
    return _JumpReLUMasked.apply(h, threshold, bandwidth)


def encode(x: torch.Tensor, W_enc: torch.Tensor, b_enc: Optional[torch.Tensor], *, activation: str,
           threshold: Optional[torch.Tensor] = None, bandwidth: float = 0.01,
           pre_bias: Optional[torch.Tensor] = None, return_preacts: bool = False):
    """``fastclt.ops.encode``'s arguments (activation "relu" or "jumprelu") → DenseCodes (and h)."""
    h = preacts(x, W_enc, b_enc, pre_bias)
    if activation == "relu":
        a = torch.relu(h)
        stored = a.detach() > 0
    elif activation == "jumprelu":
        a, stored = jumprelu_masked(h, threshold, bandwidth)
    else:
        raise ValueError(f"activation: dense codes are for 'relu' and 'jumprelu', not {activation!r}")
    codes = DenseCodes(a, stored)
    return (codes, h) if return_preacts else codes
