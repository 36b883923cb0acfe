"""Triton sparse decode (docs/DESIGN.md §7): one program per (token row b, D-block); fp32
accumulation; output in W's dtype.

    y[b] = Σ_{j ∈ row b} value[j] · W[index[j]]  (+ b_dec)            W: [F, D] (or [F, T, d] as D = T·d)

Backward (g = ∂L/∂y):

    dvalue[j] = ⟨g[row(j)], W[index[j]]⟩
    dW[f]     = Σ_{j: index[j]=f} value[j]·g[row(j)]
    db_dec    = Σ_b g[b]

dvalue and dW together are one feature-grouped pass (``feature_scatter_dot``): the program of
feature f reads W[f] once and the g rows of its entries, accumulates dW[f] and the entries' dots
(per D-block fp32 partials, summed in order). When only dvalue is needed: one program per row
gathers the row's W rows and dots them with g (``gather_dot``); only dW: ``feature_scatter``. The
kernels are in ``_common.py`` (shared with the CLT decode and the encode backward). Besides the
checks of ``fastclt.ops.sparse_decode``, W_dec must have contiguous rows (unit inner stride).
"""
from __future__ import annotations

from typing import Optional

import torch

from fastclt.codes import SparseCodes
from fastclt.ops.triton._common import check_float, decode_grads, gather_decode

__all__ = ["sparse_decode", "SparseDecodeFunction"]


# -------------------------------------------------------------------------------------- autograd
class SparseDecodeFunction(torch.autograd.Function):
    """(row_ptr, index, value [nnz], W [F, D], b [D] | None) → y [B, D]; differentiable in value, W, b."""

    @staticmethod
    def forward(ctx, row_ptr, index, value, W, b):
        ctx.save_for_backward(row_ptr, index, value, W)
        ctx.has_bias = b is not None
        ctx.b_dtype = b.dtype if b is not None else None
        return gather_decode(row_ptr, index, value, W, b)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        row_ptr, index, value, W = ctx.saved_tensors
        g = g.contiguous()
        dvalue, dW = decode_grads(row_ptr, index, value, W, g, ctx.needs_input_grad[2], ctx.needs_input_grad[3])
        db = None
        if ctx.has_bias and ctx.needs_input_grad[4]:
            db = g.sum(0, dtype=torch.float32).to(ctx.b_dtype)
        return None, None, dvalue, dW, db


def sparse_decode(codes: SparseCodes, W_dec: torch.Tensor, b_dec: Optional[torch.Tensor] = None) -> torch.Tensor:
    """codes: CSR over B rows, W_dec: [F, D] (or [F, T, d]) fp32|bf16|fp16, b_dec: [D] (or [T, d]) or None
    → y: [B, D] (or [B, T, d]) in W_dec's dtype. Same semantics as ``fastclt.ops.sparse_decode``;
    differentiable in ``codes.value``, ``W_dec`` and ``b_dec``."""
    W2 = _rows(W_dec)
    check_float("codes.value", codes.value)
    tail = W_dec.shape[1:]
    b2 = None if b_dec is None else b_dec.contiguous().view(W2.shape[1])
    y = SparseDecodeFunction.apply(codes.row_ptr.contiguous(), codes.index.contiguous(), codes.value.contiguous(),
                                   W2, b2)
    return y.view(codes.batch_size, *tail)


def _rows(W_dec: torch.Tensor) -> torch.Tensor:
    """W_dec as [F, D] without a copy: its rows must be contiguous (the kernels read them so)."""
    F = W_dec.shape[0]
    D = W_dec[0].numel() if F > 0 else int(torch.tensor(W_dec.shape[1:]).prod())
    try:
        W2 = W_dec.view(F, D)
    except RuntimeError:
        W2 = None
    if W2 is None or (D > 1 and W2.stride(1) != 1):
        raise ValueError(f"W_dec: each row must be contiguous (got strides {W_dec.stride()}); pass W_dec.contiguous()")
    return W2
