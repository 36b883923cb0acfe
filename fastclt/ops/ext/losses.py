"""The C++ loss statistics of ``fastclt._C`` (csrc/cpu/losses_cpu.cpp) as ``total_variance`` and
``fvu_terms`` (impl "cpu"; the math: ``fastclt/ops/reference/losses.py``). ``total_variance``: two
reads of y and no temporary of its size, where the PyTorch formulation writes y − ȳ and its square.
``fvu_terms``: the squared error and the total variance in one read of y and ŷ; its backward to ŷ is
``fastclt::prefix_errors_backward`` with one block and no base (csrc/cpu/matryoshka_cpu.cpp).

The kernels take fp32 y (the op table sends other dtypes to the reference; ŷ is read as fp32) and
have no backward to y: a y that needs a gradient (a target computed with grad, e.g. through a
language model) is handed to the reference, which has one.
"""
from __future__ import annotations

import math

import torch
from torch.autograd.function import once_differentiable

from fastclt.ops.ext._common import ops
from fastclt.ops.reference import losses as reference

__all__ = ["total_variance", "fvu_terms"]


def total_variance(y: torch.Tensor) -> torch.Tensor:
    """``fastclt.ops.total_variance`` on the C++ kernel (CPU, fp32 y [B, ..., d] → fp32 [...])."""
    if y.dtype != torch.float32:
        raise TypeError(f"y: the C++ total variance takes fp32, got {y.dtype}")
    if y.requires_grad and torch.is_grad_enabled():
        return reference.total_variance(y)
    B, mid, d = y.shape[0], y.shape[1:-1], y.shape[-1]
    return ops().total_variance(y.reshape(B, math.prod(mid), d).contiguous()).view(mid)


class _FvuTerms(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, y_hat):
        sq, tv = ops().fvu_terms(y, y_hat)
        ctx.save_for_backward(y, y_hat)
        ctx.mark_non_differentiable(tv)
        return sq, tv

    @staticmethod
    @once_differentiable
    def backward(ctx, dsq, _):
        y, y_hat = ctx.saved_tensors
        if dsq is None or not ctx.needs_input_grad[1]:
            return None, None
        M, d = y.shape[1], y.shape[2]
        dsq = dsq.float().reshape(1, M).contiguous()
        dblocks = ops().prefix_errors_backward(y, y.new_zeros(M, d), y_hat[None], dsq, False, False, True)[2]
        return None, dblocks[0]


def fvu_terms(y: torch.Tensor, y_hat: torch.Tensor) -> tuple:
    """``fastclt.ops.fvu_terms`` on the C++ kernel (CPU, fp32 y [B, ..., d]; ŷ of another dtype, e.g. a
    bf16 decode under autocast, read as fp32) → (sq, tv) fp32 [...]; differentiable in ŷ."""
    if y.dtype != torch.float32:
        raise TypeError(f"y: the C++ loss statistics take fp32 targets, got {y.dtype}")
    if y.requires_grad and torch.is_grad_enabled():
        return reference.fvu_terms(y, y_hat)
    B, mid, d = y.shape[0], y.shape[1:-1], y.shape[-1]
    M = math.prod(mid)
    sq, tv = _FvuTerms.apply(y.reshape(B, M, d).contiguous(), y_hat.float().reshape(B, M, d).contiguous())
    return sq.view(mid), tv.view(mid)
