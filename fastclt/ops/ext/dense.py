"""Dense JumpReLU on the C++ kernels of ``fastclt._C`` (csrc/cpu/dense_cpu.cpp; the math:
``fastclt/ops/reference/activation.py``): activations and the band mask in one pass over h, both
gradients in one pass over the upstream gradient.

With θ_h = θ rounded to h's dtype and ε the bandwidth (``jumprelu_masked``):

    a       = h · 1[h > θ_h]                                    (h's dtype)
    stored  = 1[h > θ_h] | 1[|h − θ_h| < ε/2]                   (bool; = band_mask(h, θ_h, ε))
    ∂a/∂h   = 1[h > θ_h]
    ∂L/∂θ_f = (−θ_f/ε) · Σ_b g[b, f] · 1[|h − θ_h| < ε/2]       (summed in fp32, cast to θ's dtype)

exactly as the PyTorch ``u = h − θ.to(h.dtype); active = u > 0; band = u.abs() < ε/2;
stored = active | band; a = h * active`` (bfloat16: the difference rounded to bf16 once, ε/2
compared in bf16, as PyTorch compares a Python scalar), with its backward ``dh = g * active``,
``dθ = (g * band).sum(0) * (−θ/ε)``. The forward saves the uint8 code (bit0 active, bit1 band) and
θ for the backward, not h.
"""
from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from fastclt.ops.ext._common import ops

__all__ = ["jumprelu_masked", "available"]

_DTYPES = (torch.float32, torch.bfloat16)


def available(h: torch.Tensor) -> bool:
    """True when ``jumprelu_masked`` runs on the kernels for this h: a CPU tensor of float32 or
    bfloat16 and fastclt._C built with its CPU kernels."""
    from fastclt import _ext

    return h.device.type == "cpu" and h.dtype in _DTYPES and _ext.has_cpu_ext()


class _JumpReLUMasked(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, threshold, bandwidth):
        theta = threshold.detach().float().contiguous()
        value, stored, code = ops().jumprelu_dense(h.detach().contiguous(), theta, 0.5 * bandwidth)
        ctx.save_for_backward(code, theta)
        ctx.bandwidth = bandwidth
        ctx.threshold_dtype = threshold.dtype
        ctx.mark_non_differentiable(stored)
        ctx.set_materialize_grads(False)  # no zero-filled [B, F] gradient for the mask
        return value, stored

    @staticmethod
    @once_differentiable
    def backward(ctx, g, _):
        code, theta = ctx.saved_tensors
        need_h, need_threshold = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if not (need_h or need_threshold) or g is None:
            return None, None, None
        dh, dtheta = ops().jumprelu_dense_backward(g.contiguous(), code, theta, ctx.bandwidth, need_h,
                                                   need_threshold)
        return (dh if need_h else None, dtheta.to(ctx.threshold_dtype) if need_threshold else None, None)


def jumprelu_masked(h: torch.Tensor, threshold: torch.Tensor, bandwidth: float):
    """h: [B, F] float32 or bfloat16 on the CPU, threshold: [F] (any float dtype; compared in h's
    dtype), bandwidth ε > 0 → (a [B, F] in h's dtype, stored bool [B, F]), with the straight-through
    gradients of the module docstring to h and θ (computed only for those that need them);
    ``stored`` is not differentiable. Needs ``available(h)``."""
    if not available(h):
        raise RuntimeError(f"h: the JumpReLU kernel takes float32/bfloat16 CPU tensors with fastclt._C's CPU "
                           f"kernels built, got {h.dtype} on {h.device}")
    if h.dim() != 2:
        raise ValueError(f"h: expected [B, F], got shape {tuple(h.shape)}")
    if threshold.shape != (h.shape[1],):
        raise ValueError(f"threshold: expected shape [F={h.shape[1]}], got {tuple(threshold.shape)}")
    if not bandwidth > 0:
        raise ValueError(f"bandwidth: expected a positive JumpReLU bandwidth ε, got {bandwidth}")
    return _JumpReLUMasked.apply(h, threshold, float(bandwidth))
