"""Reference activations (docs/DESIGN.md §3): ReLU and JumpReLU with straight-through threshold gradients.

JumpReLU with per-feature threshold θ ≥ 0 and bandwidth ε, ``rect(u) = 1[|u| < 1/2]``:

    a        = h · 1[h > θ]                      (strict >)
    ∂a/∂h    = 1[h > θ]
    ∂a/∂θ    = −(θ/ε) · rect((h − θ)/ε)
    step     = 1[h > θ]       (an L0 term);   ∂step/∂θ = −(1/ε) · rect((h − θ)/ε),  ∂step/∂h = 0

The rectangle is non-zero just *below* θ, where the entry is inactive: sparse JumpReLU codes keep
those band entries as explicit zeros so that a sparse backward visits them.
"""
from __future__ import annotations

import torch

from fastclt.codes import SparseCodes
from fastclt.ops._checks import check_bandwidth

__all__ = ["jumprelu_dense", "jumprelu_step", "jumprelu", "relu", "band_mask"]


def _rect(u: torch.Tensor) -> torch.Tensor:
    return (u.abs() < 0.5).to(u.dtype)


class _JumpReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: torch.Tensor, theta: torch.Tensor, bandwidth: float) -> torch.Tensor:
        ctx.save_for_backward(h, theta)
        ctx.bandwidth = bandwidth
        return h * (h > theta).to(h.dtype)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        h, theta = ctx.saved_tensors
        eps = ctx.bandwidth
        dh = g * (h > theta).to(g.dtype) if ctx.needs_input_grad[0] else None
        dtheta = None
        if ctx.needs_input_grad[1]:
            dtheta = g * (-(theta / eps) * _rect((h - theta) / eps)).to(g.dtype)
        return dh, dtheta, None


class _JumpReLUStep(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: torch.Tensor, theta: torch.Tensor, bandwidth: float) -> torch.Tensor:
        ctx.save_for_backward(h, theta)
        ctx.bandwidth = bandwidth
        return (h > theta).to(h.dtype)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        h, theta = ctx.saved_tensors
        eps = ctx.bandwidth
        dtheta = None
        if ctx.needs_input_grad[1]:
            dtheta = g * (-(1.0 / eps) * _rect((h - theta) / eps)).to(g.dtype)
        return None, dtheta, None


def jumprelu_dense(h: torch.Tensor, threshold: torch.Tensor, bandwidth: float) -> torch.Tensor:
    """h: [..., F], threshold: [F] (or broadcastable to h) → a: h's shape, JumpReLU with the
    straight-through gradients of the module docstring for both h and θ."""
    check_bandwidth(bandwidth)
    return _JumpReLU.apply(h, threshold.expand_as(h), bandwidth)


def jumprelu_step(h: torch.Tensor, threshold: torch.Tensor, bandwidth: float) -> torch.Tensor:
    """h: [..., F], threshold: broadcastable → 1[h > θ] with ∂/∂θ = −(1/ε)·rect((h−θ)/ε), ∂/∂h = 0."""
    check_bandwidth(bandwidth)
    return _JumpReLUStep.apply(h, threshold.expand_as(h), bandwidth)


def band_mask(h: torch.Tensor, threshold: torch.Tensor, bandwidth: float) -> torch.Tensor:
    """bool, h's shape: entries the JumpReLU backward visits (active, or inside the θ band)."""
    return (h > threshold) | ((h - threshold).abs() < 0.5 * bandwidth)


def jumprelu(h: torch.Tensor, threshold: torch.Tensor, bandwidth: float) -> SparseCodes:
    """h: [B, F], threshold: [F] → SparseCodes of the active entries plus the band entries just
    below θ (stored as zeros), values carrying the straight-through gradients to h and θ."""
    mask = band_mask(h, threshold, bandwidth)
    row_ptr, rows, cols = SparseCodes.pattern_from_mask(mask)
    value = _JumpReLU.apply(h[rows, cols], threshold[cols], bandwidth)
    return SparseCodes(row_ptr, cols.to(torch.int32), value, h.shape[1])


def relu(h: torch.Tensor) -> SparseCodes:
    """h: [B, F] → SparseCodes of the positive entries (value = h there)."""
    return SparseCodes.from_mask(h, h > 0)

