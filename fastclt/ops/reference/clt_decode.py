"""Reference CLT decode (docs/DESIGN.md §2.1, §7): codes of source s decoding into every target t ≥ s.

    none        W_dec: list of L tensors [F, L−s, d_out]; one gather of a contiguous block per entry
    per_source  W_dec: [L, F, d_out];   ŷ_t = Σ_{s≤t} W_dec[s]ᵀ g_t(a_s)
    per_target  W_dec: [L, F, d_out];   ŷ_t = W_dec[t]ᵀ Σ_{s≤t} g_t(a_s)

with the optional affine ``g_t(a) = (a + offset_t·1[a > 0])·scale_t`` (offset, scale: [L, F],
tied decoders only); ``g_t`` is the identity when no affine is given. Accumulation is in fp32 (or
fp64 for fp64 inputs); the output has W_dec's dtype. ``clt_decode_with`` builds the same from any
backend's ``sparse_decode`` (the extension's CLT decode is that).
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

from fastclt._ext import host_empty
from fastclt.codes import SparseCodes
from fastclt.ops.reference.decode import acc_dtype, sparse_decode

__all__ = ["clt_decode", "clt_decode_with", "feature_affine", "prefix_sum"]


def feature_affine(codes: SparseCodes, offset: Optional[torch.Tensor], scale: Optional[torch.Tensor]) -> SparseCodes:
    """g(a) = (a + offset·1[a > 0])·scale at the codes' entries; offset, scale: [F] (either may be None).
    Computed in fp32 (fp64 for fp64 values): the values come back in that dtype, not rounded to bf16."""
    if offset is None and scale is None:
        return codes
    idx = codes.index.long()
    v = codes.value.to(acc_dtype(codes.value.dtype))
    if offset is not None:
        v = v + offset[idx].to(v.dtype) * (v.detach() > 0).to(v.dtype)
    if scale is not None:
        v = v * scale[idx].to(v.dtype)
    return codes.with_value(v)


def clt_decode(codes: Sequence[SparseCodes], W_dec: Union[torch.Tensor, Sequence[torch.Tensor]], tying: str,
               b_dec: Optional[torch.Tensor] = None, feature_offset: Optional[torch.Tensor] = None,
               feature_scale: Optional[torch.Tensor] = None, skip_empty: bool = False) -> torch.Tensor:
    """codes: L SparseCodes (source layers) → ŷ: [B, L, d_out] (no skip term; add it outside).

    W_dec: list of L [F, L−s, d_out] (tying "none") or [L, F, d_out] (tied);
    b_dec: [L, d_out] or None (None for AuxK: never add b_dec there);
    feature_offset / feature_scale: [L, F] per target layer (tied only) or None;
    skip_empty: leave out untied sources without entries (``fastclt.ops.clt_decode``).
    """
    return clt_decode_with(sparse_decode, codes, W_dec, tying, b_dec, feature_offset, feature_scale, skip_empty)


def clt_decode_with(decode, codes: Sequence[SparseCodes], W_dec: Union[torch.Tensor, Sequence[torch.Tensor]],
                    tying: str, b_dec: Optional[torch.Tensor] = None, feature_offset: Optional[torch.Tensor] = None,
                    feature_scale: Optional[torch.Tensor] = None, skip_empty: bool = False) -> torch.Tensor:
    """``clt_decode`` built from ``decode(codes, W [F, D] or [F, T, d]) -> [..., B, D] or [..., B, T, d]``
    (this module's reference ``sparse_decode``, or a kernel's, which for untied decoders in their
    accumulation dtype also takes the bias [T, d] as a third argument; the leading dimensions, if any, are
    carried through: [..., B, L, d_out]): L decodes for untied and plain per_source decoders,
    L(L+1)/2 with the feature affine or per_target tying. The decodes' results are summed in fp32
    (fp64 for fp64 decoders) and rounded to W_dec's dtype once; the feature affine's values are fp32
    (``feature_affine``). Arguments as checked by ``fastclt.ops.clt_decode``; ``skip_empty`` leaves out
    the untied sources whose codes hold no entry (tied decoders decode every source)."""
    L = len(codes)
    affine = feature_offset is not None or feature_scale is not None
    if tying == "none":
        # every source decoded, even one without entries (its zero gradient keeps W_dec[s]'s gradient
        # defined on every data-parallel rank), unless skip_empty (then at least one, for ŷ's shape)
        sources = range(L)
        if skip_empty:
            sources = [s for s in range(L) if not _empty(codes[s])] or [0]
        # b_dec, where source 0 decodes in the accumulation dtype, is that decode's bias: its output
        # [B, L, d] is the sum's accumulator, so no separate pass adds it
        fold = b_dec is not None and sources[0] == 0 and W_dec[0].dtype == acc_dtype(W_dec[0].dtype)
        y = _sum_shifted([(s, decode(codes[s], W_dec[s], b_dec) if fold and s == 0 else decode(codes[s], W_dec[s]))
                          for s in sources])  # [B, L−s, d] each
        if fold:
            b_dec = None
    else:
        # Layer views by unbind, not W_dec[s]: each W_dec[s] in a graph backpropagates a zero-filled
        # full [L, F, d] gradient (L·(L+1)/2 of them for per_target); unbind's backward stacks the
        # per-layer gradients once.
        Wl = W_dec.unbind(0)
        off = (lambda t: None) if feature_offset is None else (lambda t: feature_offset[t])
        sc = (lambda t: None) if feature_scale is None else (lambda t: feature_scale[t])
        if tying == "per_source" and not affine:
            # every target t ≥ s receives the same W_dec[s]ᵀ a_s: a prefix sum over sources
            y = prefix_sum(torch.stack([decode(codes[s], Wl[s]) for s in range(L)]), b_dec)
            b_dec = None
        else:
            acc_type = acc_dtype(W_dec.dtype)
            outs = []
            for t in range(L):
                acc = None
                for s in range(t + 1):
                    W = Wl[s] if tying == "per_source" else Wl[t]
                    part = decode(feature_affine(codes[s], off(t), sc(t)), W).to(acc_type)
                    acc = part if acc is None else acc + part
                outs.append(acc.to(W_dec.dtype))
            y = torch.stack(outs, -2)
    if b_dec is not None:
        y = y + b_dec.to(y.dtype)
    return y


def prefix_sum(parts: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """parts [L, ..., d] (part i of layer i) → [..., L, d] whose layer i is Σ_{j≤i} part j (+ bias[i]),
    accumulated one part after another in fp32 (fp64 for fp64 parts), the bias [L, d] added last, and
    rounded once to the parts' dtype: the per_source tying's sum over sources, written straight into
    ŷ's token-major layout. The backward gives each part the suffix sum of the gradient, accumulated
    the same way, and the bias the gradient's sum over the tokens.

    ``torch.cumsum`` on a CPU accumulates fp32 in fp64 and its backward is two flips around a second
    cumsum; stacking the parts along -2 first is one more copy. Here: L − 1 adds each way, into
    blocks of the host pool on a CPU (a fresh [B, L, d] output's first-touch page faults cost about
    as much as the adds, 2-core Xeon; csrc/host_pool.h)."""
    return _PrefixSum.apply(parts, bias).to(parts.dtype)


class _PrefixSum(torch.autograd.Function):

    @staticmethod
    def forward(ctx, parts, bias):
        ctx.dtype, ctx.b_dtype = parts.dtype, None if bias is None else bias.dtype
        L, d = parts.shape[0], parts.shape[-1]
        y = host_empty((*parts.shape[1:-1], L, d), acc_dtype(parts.dtype), parts.device)
        ys, ps = y.unbind(-2), parts.unbind(0)
        ys[0].copy_(ps[0])
        for i in range(1, L):
            torch.add(ys[i - 1], ps[i], out=ys[i])
        if bias is not None:
            y.add_(bias.to(y.dtype))
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        L = grad.shape[-2]
        out = host_empty((L, *grad.shape[:-2], grad.shape[-1]), acc_dtype(ctx.dtype), grad.device)
        g, o = grad.unbind(-2), out.unbind(0)
        o[-1].copy_(g[-1])
        for i in range(L - 2, -1, -1):
            torch.add(o[i + 1], g[i], out=o[i])
        db = None
        if ctx.needs_input_grad[1]:
            db = grad.sum(tuple(range(grad.dim() - 2)), dtype=acc_dtype(ctx.b_dtype)).to(ctx.b_dtype)
        return out.to(ctx.dtype), db


def _empty(c) -> bool:
    """Codes with no stored entry, known without a device sync (CSR codes; dense codes never count)."""
    return not c.is_dense and c.index.shape[0] == 0


def _sum_shifted(parts: list[tuple[int, torch.Tensor]]) -> torch.Tensor:
    """parts: (s, [..., B, L−s, d]) in increasing s → [..., B, L, d] with each part added at targets
    s..L−1 (``_ShiftedSum``), summed in fp32 (fp64 for fp64 parts) and rounded to the parts' dtype.
    The parts must be fresh tensors that nothing else reads afterwards (the decodes' outputs): the
    first one's memory may become the sum's."""
    shifts = tuple(s for s, _ in parts)
    L = shifts[0] + parts[0][1].shape[-2]
    return _ShiftedSum.apply(shifts, L, *(p for _, p in parts)).to(parts[0][1].dtype)


class _ShiftedSum(torch.autograd.Function):
    """Σ_s (part s placed at targets s..L−1): the first part's memory is the accumulator when it
    starts at target 0 and is already in the accumulation dtype (a decode's fresh output, which
    nothing else reads: ``_sum_shifted``), else a new one; the others are added in place, one slice
    at a time, in increasing s (the same sums in the same order as adding them all zero-padded). The
    backward hands each part its slice of the output's gradient, as a view: no zero-padded copies
    forward, no copies of the whole gradient per in-place add backward. The accumulator is a detached
    alias of the part, not the part marked dirty: a decode's output is a view (of its [B, T·d]
    result), and autograd replays an in-place change of a view on its base in the backward (a zero
    [B, L, d], its copies and a clone: ~1.5 ms per step at the cpu-clt shape)."""

    @staticmethod
    def forward(ctx, shifts, L, *parts):
        p0 = parts[0]
        acc = acc_dtype(p0.dtype)
        ctx.shifts, ctx.dtypes = shifts, [p.dtype for p in parts]
        if shifts[0] == 0 and p0.dtype == acc:
            y = p0.detach()
        else:
            y = p0.new_zeros((*p0.shape[:-2], L, p0.shape[-1]), dtype=acc)
            y[..., shifts[0]:, :] = p0
        for s, p in zip(shifts[1:], parts[1:]):
            y[..., s:, :].add_(p.to(acc))
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        return (None, None, *(grad[..., s:, :].to(dt) for s, dt in zip(ctx.shifts, ctx.dtypes)))
