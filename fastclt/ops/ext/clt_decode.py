"""CLT decode on the extension's kernels (impl "cpu" and "cuda"; docs/DESIGN.md §2.1, §7): the
reference's composition (``fastclt.ops.reference.clt_decode.clt_decode_with``) over this backend's
``sparse_decode`` — each source's codes gathered straight from its contiguous decoder block, no
[nnz, d] intermediate; the backward grouped by feature (deterministic)."""
from __future__ import annotations

from typing import Optional

import torch
from torch.autograd.function import once_differentiable

from fastclt.codes import SparseCodes
from fastclt.ops.ext._common import ops
from fastclt.ops.ext.decode import decode_grads, sparse_decode
from fastclt.ops.reference.clt_decode import clt_decode_with, prefix_sum

__all__ = ["clt_decode"]


def clt_decode(codes, W_dec, tying: str, b_dec: Optional[torch.Tensor] = None,
               feature_offset: Optional[torch.Tensor] = None,
               feature_scale: Optional[torch.Tensor] = None, skip_empty: bool = False) -> torch.Tensor:
    """Same arguments and result as ``fastclt.ops.clt_decode``."""
    plain = feature_offset is None and feature_scale is None and not any(c.is_dense for c in codes)
    if plain and tying == "none" and _untied_fused(codes, W_dec, b_dec):
        return _untied(codes, W_dec, b_dec, skip_empty)
    if plain and tying != "none":
        if tying == "per_source":
            return _per_source_joined(codes, W_dec, b_dec)
        return _per_target_joined(codes, W_dec, b_dec)
    return clt_decode_with(sparse_decode, codes, W_dec, tying, b_dec, feature_offset, feature_scale, skip_empty)


def _untied_fused(codes, W_dec, b_dec) -> bool:
    """Whether an untied decode runs as one ``fastclt::clt_decode_untied`` (CPU, fp32 or bf16 decoders
    of one dtype, the bias in it)."""
    dt = W_dec[0].dtype
    return (codes[0].row_ptr.device.type == "cpu" and dt in (torch.float32, torch.bfloat16)
            and all(W.dtype == dt and W.device.type == "cpu" for W in W_dec)
            and (b_dec is None or b_dec.dtype == dt))


def _untied(codes, W_dec: list, b_dec: Optional[torch.Tensor], skip_empty: bool) -> torch.Tensor:
    """Untied tying on the CPU: every source s gathered from its block W_dec[s] [F, L − s, d] straight
    into ŷ [B, L, d] (``fastclt::clt_decode_untied``, csrc/cpu/sparse_cpu.cpp): one fp32 accumulator
    per token, from b_dec, the sources added in order, rounded once — instead of L decodes of
    [B, (L − s)·d] each and a sum of their shifted outputs (the composition of
    ``fastclt.ops.reference.clt_decode``, whose numbers these match up to fp32 rounding). The backward is
    the sparse decode's, per source, on its slice of ŷ's gradient, read in place. ``skip_empty``: the
    sources without entries are left out (no gradient for their blocks), at least one kept."""
    L = len(codes)
    sources = list(range(L))
    if skip_empty:
        sources = [s for s in sources if codes[s].index.shape[0] > 0] or [0]
    flat = []
    for s in sources:
        W = W_dec[s]
        c = codes[s]
        value = c.value if c.value.dtype in (W.dtype, torch.float32) else c.value.to(W.dtype)
        flat += [c.row_ptr.contiguous(), c.index.contiguous(), value.contiguous(),
                 W.reshape(W.shape[0], -1).contiguous()]
    # one dtype for all values (fp32 values with bf16 decoders stay fp32 only when every source's are)
    if len({flat[i].dtype for i in range(2, len(flat), 4)}) > 1:
        flat[2::4] = [v.to(W_dec[0].dtype) for v in flat[2::4]]
    d = W_dec[sources[0]].shape[-1]
    y = _UntiedDecode.apply(tuple(sources), L, None if b_dec is None else b_dec.contiguous(), *flat)
    return y.view(codes[0].batch_size, L, d)


class _UntiedDecode(torch.autograd.Function):
    """sources, L, bias [L, d] or None, then (row_ptr, index, value, W [F, (L − s)·d]) of each source →
    ŷ [B, L·d] (``_untied``)."""

    @staticmethod
    def forward(ctx, sources, L, bias, *flat):
        ctx.sources, ctx.L, ctx.d, ctx.has_bias = sources, L, flat[3].shape[1] // (L - sources[0]), bias is not None
        ctx.save_for_backward(*flat)
        return ops().clt_decode_untied(list(flat[0::4]), list(flat[1::4]), list(flat[2::4]), list(flat[3::4]),
                                       list(sources), L, bias)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        flat, need = ctx.saved_tensors, ctx.needs_input_grad  # need: (sources, L, bias, *flat)
        grad = grad if grad.stride(-1) == 1 else grad.contiguous()
        grads = []
        for i in range(len(ctx.sources)):
            row_ptr, index, value, W = flat[4 * i:4 * i + 4]
            need_v, need_W = need[5 + 4 * i], need[6 + 4 * i]
            g = grad[:, grad.shape[1] - W.shape[1]:]  # targets s..L−1: the last (L − s)·d columns
            dv, dW = decode_grads(row_ptr, index, value, W, g, need_v, need_W) if need_v or need_W else (None, None)
            grads += [None, None, dv, dW]
        db = None
        if ctx.has_bias and need[2]:
            db = grad.view(grad.shape[0], ctx.L, ctx.d).sum(0)
        return (None, None, db, *grads)


def _joined(blocks: list, n_features: int) -> SparseCodes:
    """(codes, feature offset) blocks → one CSR over their rows, one block after another, each
    block's features shifted by its offset (the decode of a tied CLT's sources in one call against
    W_dec viewed [L·F, d_out]). The values are concatenated, so their gradients flow back to each
    block's codes (summed where codes appear in several blocks)."""
    row_ptr = SparseCodes.join_row_ptrs([c.row_ptr for c, _ in blocks], [c.nnz for c, _ in blocks])
    index = torch.cat([c.index if off == 0 else c.index + off for c, off in blocks])
    return SparseCodes(row_ptr, index, torch.cat([c.value for c, _ in blocks]), n_features)


def _per_source_joined(codes, W_dec: torch.Tensor, b_dec: Optional[torch.Tensor]) -> torch.Tensor:
    """Plain per_source tying (no feature affine): every target t ≥ s receives W_dec[s]ᵀ a_s. The L
    source decodes as one: the sources' CSRs one after another over L·B rows, with features s·F + f of
    W_dec viewed [L·F, d_out], then the prefix sum over the sources plus b_dec, written token-major
    (``prefix_sum``, as the reference's; on the CPU its C++ kernels, ``_PrefixSum``). Each row holds
    the entries of its source in their order, so the decodes and the sum are the reference's, bit for
    bit; dW_dec comes out in W_dec's own [L, F, d_out] layout (L per-source gradients stacked by
    autograd cost a copy of the whole decoder per step: 16 MB at the cpu-clt shape)."""
    L, F, d = W_dec.shape
    B = codes[0].batch_size
    per_source = sparse_decode(_joined([(c, s * F) for s, c in enumerate(codes)], L * F),
                               W_dec.reshape(L * F, d)).view(L, B, d)
    if per_source.device.type == "cpu" and per_source.dtype in (torch.float32, torch.bfloat16):
        return _PrefixSum.apply(per_source, b_dec, True)
    return prefix_sum(per_source, b_dec)


class _PrefixSum(torch.autograd.Function):
    """parts [L, B, d] (fp32 or bf16, CPU), bias [L, d] or None → [B, L, d] on the C++ kernels
    ``fastclt::prefix_sum`` and ``fastclt::prefix_sum_backward`` (csrc/cpu/prefix_cpu.cpp), one pass
    each way. cumulative: ``prefix_sum`` (fastclt/ops/reference/clt_decode.py), its numbers (the bias's
    gradient summed in another fixed order); not cumulative: ``parts.transpose(0, 1) + bias`` with the
    bias rounded to the parts' dtype first, as that expression rounds it."""

    @staticmethod
    def forward(ctx, parts, bias, cumulative):
        ctx.b_dtype, ctx.cumulative = None if bias is None else bias.dtype, cumulative
        b = None if bias is None else (bias.detach() if cumulative else bias.detach().to(parts.dtype))
        return ops().prefix_sum(parts.contiguous(), None if b is None else b.float().contiguous(), cumulative)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        need_bias = ctx.needs_input_grad[1]
        dparts, dbias = ops().prefix_sum_backward(grad.contiguous(), need_bias, ctx.cumulative)
        return dparts, dbias.to(ctx.b_dtype) if need_bias else None, None


def _per_target_joined(codes, W_dec: torch.Tensor, b_dec: Optional[torch.Tensor]) -> torch.Tensor:
    """Plain per_target tying: target t receives W_dec[t]ᵀ Σ_{s≤t} a_s (+ b_dec[t]). One decode over L·B
    rows, row (t, b) holding token b's entries of sources 0..t (source after source) with features
    t·F + f of W_dec viewed [L·F, d_out] (``_by_target``): each target's sum over its sources is the
    decode's own fp32 accumulation, rounded once, and ŷ is its output viewed [B, L, d_out] (rows
    target-major: a target's rows gather from one W_dec[t], which stays in cache; token-major rows,
    touching all L, ran slower). No per-pair outputs to sum and stack forward, none to concatenate
    backward; dW_dec comes out in W_dec's own layout, as for per_source. With b_dec on the CPU (fp32 or
    bf16) ``_PrefixSum`` not cumulative writes ŷ + b_dec token-major in one pass (the reference's
    numbers: b_dec rounded to ŷ's dtype first), and its backward hands the decode a contiguous gradient
    and b_dec its sum over tokens in the same pass."""
    L, F, d = W_dec.shape
    B = codes[0].batch_size
    y = sparse_decode(_by_target(codes, F), W_dec.reshape(L * F, d)).view(L, B, d)
    if b_dec is None:
        return y.transpose(0, 1)
    if y.device.type == "cpu" and y.dtype in (torch.float32, torch.bfloat16):
        return _PrefixSum.apply(y, b_dec, False)
    return y.transpose(0, 1) + b_dec.to(y.dtype)


def _by_target(codes, F: int, *, device_ops: bool = False) -> SparseCodes:
    """L sources' codes (B rows each) → one CSR over the L·B rows (t, b): row (t, b) holds the entries
    of row b of every source s ≤ t, source after source, each in its order, with feature t·F + f.

    On the CPU one pass of ``fastclt::clt_by_target`` (csrc/cpu/sparse_cpu.cpp), which copies the values
    too (``_ByTarget``: their backward sums each entry's L − s gradients in target order, in fp32,
    deterministic). Elsewhere (or ``device_ops``), device ops whose sizes are known on the host (no
    sync): an entry of source s lands at one position per target t ≥ s — the start of row (t, b),
    plus row b's entries in the sources before s, plus its place in its own row — and the values
    go through ``_Spread`` (its backward gathers each entry's L − s gradients and sums them, no atomics)."""
    L, B = len(codes), codes[0].batch_size
    if codes[0].row_ptr.device.type == "cpu" and not device_ops:
        rps = torch.stack([c.row_ptr for c in codes])
        row_ptr, index, value = _ByTarget.apply(rps, torch.cat([c.index for c in codes]), F,
                                                torch.cat([c.value for c in codes]))
        return SparseCodes(row_ptr, index, value, L * F)
    dev = codes[0].row_ptr.device
    nnzs = [c.nnz for c in codes]
    rps = torch.stack([c.row_ptr for c in codes])  # [L, B + 1]
    lens = rps.diff(dim=1)  # [L, B]
    before = torch.cat([lens.new_zeros(1, B), lens.cumsum(0)])  # [L + 1, B]: row b's entries in sources < s
    row_ptr = torch.cat([lens.new_zeros(1), before[1:].reshape(-1).cumsum(0)])
    total = sum(n * (L - s) for s, n in enumerate(nnzs))
    # entry j of source s, row b, goes to row_ptr[(t, b)] + before[s, b] + (j - row_ptr_s[b]), t ≥ s
    starts, shift = row_ptr[:-1].view(L, B).t().contiguous(), before[:L] - rps[:, :-1]  # [B, L], [L, B]
    pos, index = [], []
    for s, (c, n) in enumerate(zip(codes, nnzs)):
        p = torch.repeat_interleave(starts[:, s:] + shift[s, :, None], lens[s], dim=0, output_size=n)
        pos.append(p.add_(torch.arange(n, device=dev)[:, None]))
        index.append(c.index[:, None] + torch.arange(s * F, L * F, F, device=dev, dtype=torch.int32))
    flat = torch.cat([p.view(-1) for p in pos])
    index = torch.cat([i.view(-1) for i in index])
    index = torch.empty(total, device=dev, dtype=torch.int32).scatter_(0, flat, index)
    return SparseCodes(row_ptr, index, _Spread.apply(flat, pos, *(c.value for c in codes)), L * F)


class _ByTarget(torch.autograd.Function):
    """(row_ptrs [L, B + 1], the sources' indices and values concatenated, F) → the by-target CSR
    (row_ptr, index, value) of ``fastclt::clt_by_target``; differentiable in the values: the backward
    sums each entry's L − s copies in fp32, target after target, one task per token
    (``fastclt::clt_by_target_backward``)."""

    @staticmethod
    def forward(ctx, row_ptrs, index, F, values):
        row_ptr, out_index, out_value = ops().clt_by_target(row_ptrs, index, values.contiguous(), F)
        ctx.save_for_backward(row_ptrs)
        ctx.n = values.shape[0]
        ctx.mark_non_differentiable(row_ptr, out_index)
        return row_ptr, out_index, out_value

    @staticmethod
    @once_differentiable
    def backward(ctx, _, __, grad):
        (row_ptrs,) = ctx.saved_tensors
        return None, None, None, ops().clt_by_target_backward(row_ptrs, grad.contiguous(), ctx.n)


class _Spread(torch.autograd.Function):
    """The L sources' values → [total] with value_s[j] at pos[s][j, i] (pos[s]: [nnz_s, L − s]; ``flat``
    all of them, flattened, source after source); the backward gathers each entry's L − s gradients
    and sums them."""

    @staticmethod
    def forward(ctx, flat, pos, *values):
        ctx.pos = pos
        spread = torch.cat([v[:, None].expand(p.shape).reshape(-1) for p, v in zip(pos, values)])
        return torch.empty_like(spread).scatter_(0, flat, spread)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        return (None, None, *(grad[p].sum(1) for p in ctx.pos))
