"""The C++ MOLT transforms of ``fastclt._C`` (csrc/cpu/molt_cpu.cpp) as ``molt_decode`` with autograd
(impl "cpu"; the math and layout: ``fastclt/ops/reference/molt.py``).

Only the active (token, transform) pairs are computed, grouped by transform. The forward keeps
h = V_i x_b of every active pair, fp32, for the backward; the backward computes only the gradients
autograd asks for (dx only when x requires one). fp32 or bf16 x, U, V (one dtype, checked by the
entry point); the op table sends other dtypes to the reference.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch.autograd.function import once_differentiable

from fastclt.codes import SparseCodes
from fastclt.ops.ext._common import ops
from fastclt.ops.reference.molt import rank_ptr

__all__ = ["molt_decode"]


class _MOLT(torch.autograd.Function):
    @staticmethod
    def forward(ctx, row_ptr, index, rank_ptr_, gate, x, U, V, bias):
        y, h = ops().molt_forward(row_ptr, index, gate, x, U, V, rank_ptr_, bias)
        ctx.save_for_backward(row_ptr, index, rank_ptr_, gate, x, U, V, h)
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y):
        row_ptr, index, rank_ptr_, gate, x, U, V, h = ctx.saved_tensors
        need = ctx.needs_input_grad
        d_gate = dx = dU = dV = db = None
        if any(need[3:7]):
            outs = ops().molt_backward(row_ptr, index, gate, x, U, V, rank_ptr_, h,
                                       grad_y.to(U.dtype).contiguous(), need[3], need[4], need[5], need[6])
            d_gate, dx, dU, dV = (o if n else None for o, n in zip(outs, need[3:7]))
        if ctx.has_bias and need[7]:
            db = grad_y.sum(0, dtype=torch.float32).to(grad_y.dtype)
        return None, None, None, d_gate, dx, dU, dV, db


def molt_decode(codes: SparseCodes, x: torch.Tensor, U: torch.Tensor, V: torch.Tensor, rank_groups: Sequence,
                b_dec: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``fastclt.ops.molt_decode`` on the C++ kernels (CPU; fp32 or bf16)."""
    gate = codes.value if codes.value.dtype in (U.dtype, torch.float32) else codes.value.to(U.dtype)
    bias = None if b_dec is None else b_dec.to(U.dtype).contiguous()
    return _MOLT.apply(codes.row_ptr.contiguous(), codes.index.contiguous(), rank_ptr(rank_groups, x.device),
                       gate.contiguous(), x.contiguous(), U.contiguous(), V.contiguous(), bias)
