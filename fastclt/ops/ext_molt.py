"""The C++ MOLT transforms of ``fastclt._C`` (csrc/cpu/molt_cpu.cpp) as ``molt_decode`` with autograd.

Same arguments and result as the reference ``fastclt.ops.molt.molt_decode``; registered as impl
"cpu" of "molt_decode" by ``register_ext_molt()`` (the extension is imported on first use). The
forward keeps h = V_i x_b of every active (token, transform) pair, fp32, for the backward; the
backward computes only the gradients autograd asks for (dx only when x requires one).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch.autograd.function import once_differentiable

from fastclt.codes import SparseCodes
from fastclt.ops.molt import check_molt_args, rank_ptr

__all__ = ["molt_decode", "register_ext_molt", "KERNEL_DTYPES"]

KERNEL_DTYPES = (torch.float32, torch.bfloat16)


def _ops():
    from fastclt import _ext

    if not _ext.has_cpu_ext():
        raise RuntimeError(_ext.missing_message("cpu"))
    return torch.ops.fastclt


class _MOLT(torch.autograd.Function):
    @staticmethod
    def forward(ctx, row_ptr, index, rank_ptr_, gate, x, U, V, bias):
        y, h = _ops().molt_forward(row_ptr, index, gate, x, U, V, rank_ptr_, bias)
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
            outs = _ops().molt_backward(row_ptr, index, gate, x, U, V, rank_ptr_, h,
                                        grad_y.to(U.dtype).contiguous(), need[3], need[4], need[5], need[6])
            d_gate, dx, dU, dV = (o if n else None for o, n in zip(outs, need[3:7]))
        if ctx.has_bias and need[7]:
            db = grad_y.sum(0, dtype=torch.float32).to(grad_y.dtype)
        return None, None, None, d_gate, dx, dU, dV, db


def molt_decode(codes: SparseCodes, x: torch.Tensor, U: torch.Tensor, V: torch.Tensor, rank_groups: Sequence,
                b_dec: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``fastclt.ops.molt.molt_decode`` on the C++ kernels (CPU; fp32 or bf16 with x, U, V in one
    dtype; other dtypes go to the reference)."""
    groups, T, R = check_molt_args(codes, x, U, V, rank_groups, b_dec)
    if U.dtype not in KERNEL_DTYPES or x.dtype != U.dtype or V.dtype != U.dtype:
        from fastclt.ops.molt import reference_molt_decode
        return reference_molt_decode(codes, x, U, V, groups, b_dec)
    gate = codes.value if codes.value.dtype in (U.dtype, torch.float32) else codes.value.to(U.dtype)
    bias = None if b_dec is None else b_dec.to(U.dtype).contiguous()
    return _MOLT.apply(codes.row_ptr.contiguous(), codes.index.contiguous(), rank_ptr(groups, x.device),
                       gate.contiguous(), x.contiguous(), U.contiguous(), V.contiguous(), bias)


def _cpu_available(device: torch.device) -> bool:
    from fastclt import _ext

    return device.type == "cpu" and _ext.has_cpu_ext()


def _register_fakes() -> None:
    """Shape functions of the two ops (torch.compile / opcheck); h's length depends on the data."""

    @torch.library.register_fake("fastclt::molt_forward")
    def _(row_ptr, index, gate, x, U, V, rank_ptr, bias):
        n = torch.library.get_ctx().new_dynamic_size()
        return U.new_empty(x.shape[0], U.shape[1]), x.new_empty(n, dtype=torch.float32)

    @torch.library.register_fake("fastclt::molt_backward")
    def _(row_ptr, index, gate, x, U, V, rank_ptr, h, grad_y, need_gate, need_x, need_U, need_V):
        pick = lambda want, t: t if want else x.new_empty(0)  # noqa: E731
        return (pick(need_gate, gate.new_empty(index.shape[0])), pick(need_x, torch.empty_like(x)),
                pick(need_U, torch.empty_like(U)), pick(need_V, torch.empty_like(V)))


_FAKES = []


def register_ext_molt() -> None:
    """Register ``molt_decode`` here as impl "cpu" of the op "molt_decode" (and, when the extension is
    loaded, the ops' fake impls)."""
    from fastclt import _ext
    from fastclt.ops._dispatch import register

    register("molt_decode", "cpu", "fastclt.ops.ext_molt:molt_decode", _cpu_available, KERNEL_DTYPES)
    if _ext.has_cpu_ext() and not _FAKES:
        _register_fakes()
        _FAKES.append(True)
