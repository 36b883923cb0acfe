"""Reference Matryoshka prefix errors (docs/DESIGN.md §15).

With G block decodes ``blocks[g]`` (the features m_{g-1} ≤ i < m_g decoded alone, see
``fastclt.ops.prefix_decode``) and ``base`` (b_dec, plus a skip term), prefix g reconstructs
ŷ_g = base + blocks[0] + … + blocks[g]. ``prefix_errors(y, base, blocks)`` gives the training loss
what it needs — sq[g] = Σ_b ‖y_b − ŷ_{g,b}‖² for every g (per middle index of y [B, ..., d]) — from
one running error tensor e_g = e_{g-1} − blocks[g]: G subtractions forward, G scaled adds backward
(∂sq[g]/∂e_g = 2 e_g; the gradient of blocks[g] is −Σ_{g' ≥ g} 2 dsq[g'] e_{g'}), without storing
the prefixes. Accumulated in fp32 (fp64 for fp64 y); also returns ŷ_{G-1}, the full
reconstruction, detached. A custom autograd Function in PyTorch ops (any device and dtype).
"""
from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from fastclt.ops.reference.decode import acc_dtype

__all__ = ["prefix_errors"]


def _sq_norms(e: torch.Tensor) -> torch.Tensor:
    """e: [B, ..., d] → Σ_b ‖e_b‖² per middle index, one pass (no squared temporary)."""
    return torch.linalg.vector_norm(e, dim=-1).square().sum(0)


class _PrefixErrors(torch.autograd.Function):
    """Squared errors of every prefix without forming the prefixes (see ``prefix_errors``)."""

    @staticmethod
    def forward(ctx, y, base, blocks):
        acc = acc_dtype(y.dtype)
        e = y.to(acc) - base.to(acc)  # the error of the empty prefix (a new tensor, updated in place)
        sq = []
        for g in range(blocks.shape[0]):
            e.sub_(blocks[g])
            sq.append(_sq_norms(e))
        ctx.save_for_backward(y, base, blocks)
        y_hat = y.to(acc) - e
        ctx.mark_non_differentiable(y_hat)
        ctx.set_materialize_grads(False)  # no zero-filled gradient for ŷ
        return torch.stack(sq), y_hat.to(blocks.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, dsq, _):
        if dsq is None:
            return None, None, None
        y, base, blocks = ctx.saved_tensors
        acc = acc_dtype(y.dtype)
        e = y.to(acc) - base.to(acc) - blocks.sum(0, dtype=acc)  # the last prefix's error
        grad = torch.zeros_like(e)  # after step g: Σ_{g' ≥ g} ∂L/∂e_{g'} = −∂L/∂blocks[g]
        dblocks = torch.empty_like(blocks) if ctx.needs_input_grad[2] else None
        for g in range(blocks.shape[0] - 1, -1, -1):
            grad.addcmul_(e, 2 * dsq[g].to(acc).unsqueeze(-1))
            if dblocks is not None and dblocks.dtype == acc:
                torch.neg(grad, out=dblocks[g])
            elif dblocks is not None:
                dblocks[g].copy_(grad).neg_()
            if g:
                e.add_(blocks[g])  # e_{g-1} = e_g + blocks[g]
        dy = grad.to(y.dtype) if ctx.needs_input_grad[0] else None
        dbase = (-grad).sum_to_size(base.shape).to(base.dtype) if ctx.needs_input_grad[1] else None
        return dy, dbase, dblocks


def prefix_errors(y: torch.Tensor, base: torch.Tensor, blocks: torch.Tensor):
    """y: [B, ..., d], base: broadcastable to y, blocks: [G, B, ..., d] → (sq [G, ...], ŷ_{G-1} detached)."""
    return _PrefixErrors.apply(y, base, blocks)
