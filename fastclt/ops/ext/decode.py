"""Sparse decode on the extension's kernels (impl "cpu" and "cuda"; docs/DESIGN.md §7).

Forward ``fastclt::sparse_decode`` (the gather-decode); backward ``fastclt::sparse_dot`` (dvalue)
and ``fastclt::feature_scatter`` (dW_dec, grouped by feature: deterministic), or on the CPU
``fastclt::feature_scatter_dot`` when both are needed (one sweep). Kernels: csrc/cpu/sparse_cpu.cpp,
csrc/cuda/sparse_kernels.cu.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch.autograd.function import once_differentiable

from fastclt.codes import SparseCodes
from fastclt.ops.ext._common import ops

__all__ = ["sparse_decode"]


class _SparseDecode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, row_ptr, index, value, weight, bias):
        ctx.save_for_backward(row_ptr, index, value, weight)
        ctx.has_bias = bias is not None
        return ops().sparse_decode(row_ptr, index, value, weight, bias)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y):
        row_ptr, index, value, weight = ctx.saved_tensors
        grad_value, grad_weight = decode_grads(row_ptr, index, value, weight, grad_y, *ctx.needs_input_grad[2:4])
        grad_bias = grad_y.sum(0) if ctx.has_bias and ctx.needs_input_grad[4] else None
        return None, None, grad_value, grad_weight, grad_bias


def decode_grads(row_ptr, index, value, weight, grad_y, need_value: bool, need_weight: bool):
    """The gradients of ``fastclt::sparse_decode`` (grad_y: [B, D], its rows contiguous; a CPU one may
    have a row stride) → (dvalue or None, dweight or None)."""
    value = value.to(grad_y.dtype)  # fp32 values of bf16 weights: the scatters take one dtype
    fastclt_ops = ops()
    grad_value = grad_weight = None
    if need_value and need_weight and grad_y.device.type == "cpu":
        # dW and dvalue in one sweep: each gathered grad_y row read once for both. Rows with a
        # stride are read in place (a CLT source's slice of the targets' gradient: no copy).
        if grad_y.stride(-1) != 1:
            grad_y = grad_y.contiguous()
        grad_weight, _, grad_value = fastclt_ops.feature_scatter_dot(row_ptr, index, value, grad_y, weight)
    else:
        grad_y = grad_y.contiguous()
        if need_value:
            grad_value = fastclt_ops.sparse_dot(row_ptr, index, grad_y, weight)
        if need_weight:
            grad_weight = fastclt_ops.feature_scatter(row_ptr, index, value, grad_y, weight.shape[0])[0]
    return grad_value, grad_weight


def sparse_decode(codes: SparseCodes, W_dec: torch.Tensor, b_dec: Optional[torch.Tensor] = None) -> torch.Tensor:
    """codes (B rows), W_dec: [F, D] or [F, T, d] fp32|bf16, b_dec: [D] / [T, d] or None
    -> y: [B, D] (or [B, T, d]) in W_dec's dtype.

    y[b] = sum_j value[j] * W_dec[index[j]] (+ b_dec), accumulated in fp32 (fp32 values are not
    rounded to a bf16 W_dec's dtype first; other values are cast to it). Differentiable in
    codes.value, W_dec and b_dec (dvalue = <g, W_dec[index]>, dW_dec grouped by feature,
    deterministic). A [F, T, d] decoder (a CLT source's untied block) decodes as D = T*d."""
    tail = W_dec.shape[1:]
    W = W_dec.reshape(W_dec.shape[0], -1).contiguous()
    bias = None if b_dec is None else b_dec.reshape(-1).to(W.dtype).contiguous()
    # fp32 values with bf16 weights go in as they are (summed in fp32, not rounded to bf16 first)
    value = codes.value if codes.value.dtype in (W.dtype, torch.float32) else codes.value.to(W.dtype)
    y = _SparseDecode.apply(codes.row_ptr.contiguous(), codes.index.contiguous(), value.contiguous(), W, bias)
    return y.view(codes.batch_size, *tail)
