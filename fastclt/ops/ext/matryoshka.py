"""The C++ Matryoshka prefix errors of ``fastclt._C`` (csrc/cpu/matryoshka_cpu.cpp) as ``prefix_errors``
with autograd (impl "cpu"; the math: ``fastclt/ops/reference/matryoshka.py``): one pass each way,
each token's running error kept in cache.

The kernels take fp32 (the op table sends other dtypes of y to the reference; base and blocks are
read as fp32).
y [B, ..., d] is viewed as [B, M, d]; base as [M, d] when it is the same for every token (b_dec),
else as [B, M, d].
"""
from __future__ import annotations

import math

import torch
from torch.autograd.function import once_differentiable

from fastclt.ops.ext._common import ops

__all__ = ["prefix_errors"]


class _PrefixErrors(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, base, blocks):
        sq, y_hat = ops().prefix_errors_forward(y, base, blocks)
        ctx.save_for_backward(y, base, blocks)
        ctx.mark_non_differentiable(y_hat)
        ctx.set_materialize_grads(False)  # no zero-filled [B, ..., d] gradient for ŷ
        return sq, y_hat

    @staticmethod
    @once_differentiable
    def backward(ctx, dsq, _):
        y, base, blocks = ctx.saved_tensors
        need = ctx.needs_input_grad
        if not any(need) or dsq is None:
            return None, None, None
        dy, dbase, dblocks = ops().prefix_errors_backward(y, base, blocks, dsq.float().contiguous(), need[0], need[1],
                                                          need[2])
        return dy if need[0] else None, dbase if need[1] else None, dblocks if need[2] else None


def prefix_errors(y: torch.Tensor, base: torch.Tensor, blocks: torch.Tensor):
    """``fastclt.ops.prefix_errors`` on the C++ kernels (CPU; fp32 y, the op table's choice; base and
    blocks of another dtype, e.g. bf16 decodes under autocast, are read as fp32 like the reference
    does, and ŷ comes back in blocks' dtype as the reference's)."""
    if y.dtype != torch.float32:
        raise TypeError(f"y: the C++ prefix errors take fp32 targets, got {y.dtype}")
    out_dtype = blocks.dtype
    base, blocks = base.float(), blocks.float()
    B, d, mid = y.shape[0], y.shape[-1], y.shape[1:-1]
    M, G = math.prod(mid), blocks.shape[0]
    per_token = base.dim() == y.dim() and base.shape[0] != 1
    if per_token:
        base_v = base.expand(y.shape).reshape(B, M, d)
    else:
        base_v = (base[0] if base.dim() == y.dim() else base).expand(y.shape[1:]).reshape(M, d)
    sq, y_hat = _PrefixErrors.apply(y.reshape(B, M, d).contiguous(), base_v.contiguous(),
                                    blocks.reshape(G, B, M, d).contiguous())
    return sq.view(G, *mid), y_hat.view(y.shape).to(out_dtype)
