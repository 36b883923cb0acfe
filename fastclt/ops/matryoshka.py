"""Matryoshka decodes: every prefix reconstruction for the cost of one decode (docs/DESIGN.md §15).

With prefix ends m_1 < … < m_G = F (``prefixes``) and m_0 = 0, prefix g reconstructs from the
features i < m_g alone:

    ŷ_g = b_dec + Σ_{i < m_g} a_i · W_dec[i]                              (SAE / PLT)
    ŷ_{g,t} = b_dec[t] + Σ_{s ≤ t} D^{s→t}(a_s restricted to i < m_g)     (CLT, every tying)

Nothing is decoded twice. The codes are split by feature block into G row blocks
(``split_codes``: row g·B + b holds token b's features in [m_{g-1}, m_g)), and one call of the
backend's own ``sparse_decode`` / ``clt_decode`` decodes all of them with the whole decoder:
``blocks[g] = Σ_{m_{g-1} ≤ i < m_g} a_i · W_dec[i]``, [G, B, ...] (``matryoshka_blocks``,
``matryoshka_clt_blocks``). Its backward is one decode backward (every decoder-gradient row
written once). Prefix g is base + blocks[0] + … + blocks[g]:

``prefix_sums(blocks, bias)`` forms the G reconstructions (a cumulative sum, fp32 accumulation);
``prefix_errors(y, base, blocks)`` gives the training loss what it needs — Σ_b ‖y − ŷ_g‖² for every
g — from one running error tensor (e_g = e_{g-1} − blocks[g]: G subtractions forward, G scaled adds
backward), without storing the prefixes.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch.autograd.function import once_differentiable

from fastclt.codes import SparseCodes
from fastclt.ops.split_codes import check_bounds, split_codes

__all__ = ["prefix_bounds", "prefix_sums", "prefix_errors", "reference_prefix_errors", "check_prefix_errors_args",
           "matryoshka_blocks", "matryoshka_decode", "matryoshka_clt_blocks", "matryoshka_clt_decode"]


def prefix_bounds(prefixes: Sequence[int], n_features: int) -> list:
    """[0, m_1, …, m_G] from the prefix ends (checked: increasing, ending at ``n_features``)."""
    return check_bounds([0, *prefixes], n_features)


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def prefix_sums(blocks: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """blocks: [G, ...] → [G, ...] with entry g = bias + Σ_{g' ≤ g} blocks[g'] (bias broadcast to
    blocks[0]), summed in fp32 (fp64 for fp64 blocks) and rounded to the blocks' dtype once."""
    y = blocks.cumsum(0, dtype=_acc(blocks.dtype))
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y.to(blocks.dtype)


def matryoshka_blocks(codes: SparseCodes, W_dec: torch.Tensor, prefixes: Sequence[int], *,
                      impl: str = "auto") -> torch.Tensor:
    """codes (B rows, F features), W_dec: [F, D] (or [F, T, d]) → [G, B, D] (or [G, B, T, d]), block g
    = Σ_{m_{g-1} ≤ i < m_g} a_i · W_dec[i] (no bias): one ``ops.sparse_decode`` of backend ``impl``."""
    from fastclt import ops

    if not isinstance(codes, SparseCodes):
        raise TypeError(f"codes: expected SparseCodes, got {type(codes).__name__}")
    bounds = prefix_bounds(prefixes, W_dec.shape[0])
    y = ops.sparse_decode(split_codes(codes, bounds), W_dec, impl=impl)
    return y.view(len(bounds) - 1, codes.batch_size, *y.shape[1:])


def matryoshka_decode(codes: SparseCodes, W_dec: torch.Tensor, prefixes: Sequence[int],
                      b_dec: Optional[torch.Tensor] = None, *, impl: str = "auto") -> torch.Tensor:
    """codes, W_dec: [F, D] → [G, B, D]: every prefix reconstruction (b_dec: [D] or None)."""
    return prefix_sums(matryoshka_blocks(codes, W_dec, prefixes, impl=impl), b_dec)


def matryoshka_clt_blocks(codes: Sequence[SparseCodes], W_dec: Union[torch.Tensor, Sequence[torch.Tensor]],
                          tying: str, prefixes: Sequence[int], feature_offset: Optional[torch.Tensor] = None,
                          feature_scale: Optional[torch.Tensor] = None, *, impl: str = "auto") -> torch.Tensor:
    """L codes (one per source layer) → [G, B, L, d_out], block g decoding the features
    m_{g-1} ≤ i < m_g of every source layer (no bias): one ``ops.clt_decode`` of backend ``impl``.
    Arguments as ``fastclt.ops.decode.clt_decode``."""
    from fastclt import ops

    if isinstance(codes, SparseCodes) or not len(codes):
        raise TypeError("codes: expected a list of one SparseCodes per source layer")
    F = W_dec.shape[1] if isinstance(W_dec, torch.Tensor) else W_dec[0].shape[0]
    bounds = prefix_bounds(prefixes, F)
    y = ops.clt_decode([split_codes(c, bounds) for c in codes], W_dec, tying, None, feature_offset, feature_scale,
                       impl=impl)
    return y.view(len(bounds) - 1, codes[0].batch_size, *y.shape[1:])


def matryoshka_clt_decode(codes: Sequence[SparseCodes], W_dec: Union[torch.Tensor, Sequence[torch.Tensor]],
                          tying: str, prefixes: Sequence[int], b_dec: Optional[torch.Tensor] = None,
                          feature_offset: Optional[torch.Tensor] = None,
                          feature_scale: Optional[torch.Tensor] = None, *, impl: str = "auto") -> torch.Tensor:
    """L codes → [G, B, L, d_out]: every prefix reconstruction of a CLT (b_dec: [L, d_out] or None)."""
    return prefix_sums(matryoshka_clt_blocks(codes, W_dec, tying, prefixes, feature_offset, feature_scale,
                                             impl=impl), b_dec)


def _sq_norms(e: torch.Tensor) -> torch.Tensor:
    """e: [B, ..., d] → Σ_b ‖e_b‖² per middle index, one pass (no squared temporary)."""
    return torch.linalg.vector_norm(e, dim=-1).square().sum(0)


class _PrefixErrors(torch.autograd.Function):
    """Squared errors of every prefix without forming the prefixes (see ``prefix_errors``)."""

    @staticmethod
    def forward(ctx, y, base, blocks):
        acc = _acc(y.dtype)
        e = y.to(acc) - base.to(acc)  # the error of the empty prefix (a new tensor, updated in place)
        sq = []
        for g in range(blocks.shape[0]):
            e.sub_(blocks[g])
            sq.append(_sq_norms(e))
        ctx.save_for_backward(y, base, blocks)
        y_hat = y.to(acc) - e
        ctx.mark_non_differentiable(y_hat)
        return torch.stack(sq), y_hat.to(blocks.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, dsq, _):
        y, base, blocks = ctx.saved_tensors
        acc = _acc(y.dtype)
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


def check_prefix_errors_args(y: torch.Tensor, base: torch.Tensor, blocks: torch.Tensor) -> None:
    """The shapes ``prefix_errors`` takes (every implementation runs this first), or a ValueError."""
    for name, t in (("y", y), ("base", base), ("blocks", blocks)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise TypeError(f"{name}: expected a floating-point tensor, got "
                            f"{t.dtype if isinstance(t, torch.Tensor) else type(t).__name__}")
    if y.dim() < 2:
        raise ValueError(f"y: expected [B, ..., d], got {tuple(y.shape)}")
    if blocks.dim() != y.dim() + 1 or blocks.shape[1:] != y.shape:
        raise ValueError(f"blocks: expected [G, *y.shape] = [G, {', '.join(map(str, y.shape))}], got "
                         f"{tuple(blocks.shape)}")
    try:
        torch.broadcast_shapes(base.shape, y.shape)
        ok = base.dim() <= y.dim()
    except RuntimeError:
        ok = False
    if not ok:
        raise ValueError(f"base: expected a shape that broadcasts to y {tuple(y.shape)}, got {tuple(base.shape)}")


def reference_prefix_errors(y: torch.Tensor, base: torch.Tensor, blocks: torch.Tensor):
    """``prefix_errors`` in PyTorch: one running error tensor, G subtractions forward, G scaled adds
    backward (any device and dtype)."""
    check_prefix_errors_args(y, base, blocks)
    return _PrefixErrors.apply(y, base, blocks)


def prefix_errors(y: torch.Tensor, base: torch.Tensor, blocks: torch.Tensor, *, impl: str = "auto"):
    """y: [B, ..., d] targets, base: broadcastable to y (b_dec, plus a skip term), blocks: [G, B, ..., d]
    → (sq [G, ...]: Σ_b ‖y − ŷ_g‖² per middle index for ŷ_g = base + Σ_{g' ≤ g} blocks[g'],
    differentiable in y, base and blocks; ŷ_{G-1}, the full reconstruction, detached). Accumulated
    in fp32 (fp64 for fp64 y); the prefix reconstructions are never stored. Implementations:
    "reference" (PyTorch ops) and "cpu" (``fastclt.ops.ext_matryoshka``: one pass each way, fp32)."""
    from fastclt.ops import _call

    return _call("prefix_errors", impl, y, y, base, blocks)
