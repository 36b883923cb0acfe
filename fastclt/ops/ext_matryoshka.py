"""The C++ Matryoshka prefix errors of ``fastclt._C`` (csrc/cpu/matryoshka_cpu.cpp) as ``prefix_errors``
with autograd.

Same arguments and result as ``fastclt.ops.matryoshka.prefix_errors``; registered as impl "cpu" of
"prefix_errors" by ``register_ext_matryoshka()`` (the extension is imported on first use). The
kernels take fp32 y, base and blocks; other dtypes go to the reference. y [B, ..., d] is viewed as
[B, M, d]; base as [M, d] when it is the same for every token (b_dec), else as [B, M, d].
"""
from __future__ import annotations

import math

import torch
from torch.autograd.function import once_differentiable

from fastclt.ops.matryoshka import check_prefix_errors_args, reference_prefix_errors

__all__ = ["prefix_errors", "register_ext_matryoshka"]


def _ops():
    from fastclt import _ext

    if not _ext.has_cpu_ext():
        raise RuntimeError(_ext.missing_message("cpu"))
    return torch.ops.fastclt


class _PrefixErrors(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, base, blocks):
        sq, y_hat = _ops().prefix_errors_forward(y, base, blocks)
        ctx.save_for_backward(y, base, blocks)
        ctx.mark_non_differentiable(y_hat)
        return sq, y_hat

    @staticmethod
    @once_differentiable
    def backward(ctx, dsq, _):
        y, base, blocks = ctx.saved_tensors
        need = ctx.needs_input_grad
        if not any(need):
            return None, None, None
        dy, dbase, dblocks = _ops().prefix_errors_backward(y, base, blocks, dsq.float().contiguous(), need[0], need[1],
                                                           need[2])
        return dy if need[0] else None, dbase if need[1] else None, dblocks if need[2] else None


def prefix_errors(y: torch.Tensor, base: torch.Tensor, blocks: torch.Tensor):
    """``fastclt.ops.matryoshka.prefix_errors`` on the C++ kernels (CPU, fp32)."""
    check_prefix_errors_args(y, base, blocks)
    if not (y.dtype == base.dtype == blocks.dtype == torch.float32) or y.device.type != "cpu":
        return reference_prefix_errors(y, base, blocks)
    B, d, mid = y.shape[0], y.shape[-1], y.shape[1:-1]
    M, G = math.prod(mid), blocks.shape[0]
    per_token = base.dim() == y.dim() and base.shape[0] != 1
    if per_token:
        base_v = base.expand(y.shape).reshape(B, M, d)
    else:
        base_v = (base[0] if base.dim() == y.dim() else base).expand(y.shape[1:]).reshape(M, d)
    sq, y_hat = _PrefixErrors.apply(y.reshape(B, M, d).contiguous(), base_v.contiguous(),
                                    blocks.reshape(G, B, M, d).contiguous())
    return sq.view(G, *mid), y_hat.view(y.shape)


def _cpu_available(device: torch.device) -> bool:
    from fastclt import _ext

    return device.type == "cpu" and _ext.has_cpu_ext()


_FAKES = []


def register_ext_matryoshka() -> None:
    """Register ``prefix_errors`` here as impl "cpu" of the op "prefix_errors" (and, when the
    extension is loaded, the ops' fake impls)."""
    from fastclt import _ext
    from fastclt.ops._dispatch import register

    register("prefix_errors", "cpu", "fastclt.ops.ext_matryoshka:prefix_errors", _cpu_available, (torch.float32,))
    if _ext.has_cpu_ext() and not _FAKES:
        @torch.library.register_fake("fastclt::prefix_errors_forward")
        def _(y, base, blocks):
            return y.new_empty(blocks.shape[0], y.shape[1]), torch.empty_like(y)

        @torch.library.register_fake("fastclt::prefix_errors_backward")
        def _(y, base, blocks, dsq, need_y, need_base, need_blocks):
            pick = lambda want, t: torch.empty_like(t) if want else y.new_empty(0)  # noqa: E731
            return pick(need_y, y), pick(need_base, base), pick(need_blocks, blocks)
        _FAKES.append(True)
