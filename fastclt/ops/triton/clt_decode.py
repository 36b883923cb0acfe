"""Triton CLT decode (docs/DESIGN.md §2.1, §7): codes of every source layer s decoded into every target t ≥ s.

    ŷ[b, t] = Σ_{s ≤ t} Σ_{j ∈ row b of source s} c_t(j) · W_{s→t}[i_j]  (+ b_dec[t])

with, per tying (W_dec shapes as in ``fastclt.ops.clt_decode``):

    none        W_{s→t}[i] = W_dec[s][i, t − s]          W_dec: L tensors [F, L − s, d]
    per_source  W_{s→t}[i] = W_dec[s, i]                 W_dec: [L, F, d]
    per_target  W_{s→t}[i] = W_dec[t, i]                 W_dec: [L, F, d]

and ``c_t(j) = (a_j + offset[t, i_j]·1[a_j > 0])·scale[t, i_j]`` (tied only; ``c_t(j) = a_j`` without
the affine). All sums in fp32; ŷ in W_dec's dtype, rounded once.

Program layout:
- none: source s is a plain sparse decode with D = (L − s)·d whose columns are the targets s..L−1.
  One launch per source, from s = L−1 down to 0, each adding its block into an fp32 [B, L·d]
  accumulator (the output itself when fp32); the s = 0 launch covers every column and writes ŷ
  with b_dec. No [B, L, d] tensor per source.
- per_source without affine: ŷ_t is a prefix sum over sources: one program per (token, d-block)
  walks s = 0..L−1, accumulating, and stores ŷ_t after source t.
- per_source with affine, per_target: one program per (token, d-block, target t) walks the entries
  of every source s ≤ t (through W_dec[t] for per_target: one pass over Σ_{s≤t} k_s rows).

Backward (g = ∂L/∂ŷ: [B, L, d]; dot_t(j) = ⟨g[b_j, t], W_{s→t}[i_j]⟩):
- ∂a_j         = Σ_{t ≥ s} scale[t, i_j] · dot_t(j)                  (1[a > 0] carries no gradient)
- ∂offset[t,f] = Σ_{j: i_j = f, s_j ≤ t} 1[a_j > 0] · scale[t, f] · dot_t(j)
- ∂scale[t,f]  = Σ_{j: i_j = f, s_j ≤ t} (a_j + offset[t, f]·1[a_j > 0]) · dot_t(j)
- ∂W: none: ∂W_dec[s][f] (as [L−s]·d) = Σ_{j ∈ s: i_j = f} a_j · g[b_j, s:];
  per_source: ∂W_dec[s][f] = Σ_{j ∈ s: i_j=f} Σ_{t≥s} c_t(j) g[b_j, t] (without affine: a_j·G_s[b_j]
  with the suffix sum G_s = Σ_{t ≥ s} g[:, t]); per_target: ∂W_dec[t][f] = Σ_{j: i_j = f, s_j ≤ t} c_t(j) g[b_j, t].
  Every weight/affine gradient is a ``feature_scatter`` (grouped by feature, deterministic, no atomics).
- ∂b_dec = Σ_b g[b].
When W_dec needs a gradient, every dot_t(j) comes out of the feature-grouped ∂W passes
(``feature_scatter_dot``: each W row read once per feature, no per-entry W gathers): one pass per
source (none; per_source without affine, through G_s; per_source with affine, over the expanded
entries) or per target (per_target, over the prefix of the sources' concatenation that reaches t,
whose sort the affine gradients of t reuse). With W frozen, one program per (token, source) loops
over its targets and gathers the W rows. The [nnz, L] dots are kept only when offset or scale
needs a gradient.
"""
from __future__ import annotations

import itertools
from typing import Optional, Sequence, Union

import torch
import triton
import triton.language as tl

from fastclt.codes import SparseCodes
from fastclt.ops.constants import on_device
from fastclt.ops.triton._common import (block_d, check_float, decode_grads, feature_scatter, feature_scatter_dot,
                                        feature_segments, gather_decode, new_output)

__all__ = ["clt_decode", "CLTDecodeFunction"]


# --------------------------------------------------------------------------------------- kernels
@triton.jit
def _tied_accumulate(acc, ptr, index, value, W, stride_wl, stride_wf, offset, scale, cols, dmask, b, s, t, w_layer,
                     Bp1, F, HAS_OFFSET: tl.constexpr, HAS_SCALE: tl.constexpr, BLOCK_K: tl.constexpr):
    """acc += Σ_{j ∈ row b of source s} c_t(j) · W[w_layer, i_j, cols]."""
    start = tl.load(ptr + s * Bp1 + b)
    end = tl.load(ptr + s * Bp1 + b + 1)
    W_layer = W + (b * 0 + w_layer) * stride_wl  # b is int64: L·F·d may exceed 2^31
    for k0 in range(start, end, BLOCK_K):
        offs = k0 + tl.arange(0, BLOCK_K)
        kmask = offs < end
        idx = tl.load(index + offs, mask=kmask, other=0).to(tl.int64)
        coef = tl.load(value + offs, mask=kmask, other=0.0).to(tl.float32)
        if HAS_OFFSET:
            off = tl.load(offset + t * F + idx, mask=kmask, other=0.0).to(tl.float32)
            coef = coef + tl.where(coef > 0, off, 0.0)
        if HAS_SCALE:
            coef = coef * tl.load(scale + t * F + idx, mask=kmask, other=0.0).to(tl.float32)
        w = tl.load(W_layer + idx[:, None] * stride_wf + cols[None, :], mask=kmask[:, None] & dmask[None, :], other=0.0)
        acc += tl.sum(w.to(tl.float32) * coef[:, None], axis=0)
    return acc


@triton.jit
def _clt_tied_decode_kernel(ptr, index, value, W, stride_wl, stride_wf, offset, scale, bias, out,
                            Bp1, F, D, L,
                            PER_SOURCE: tl.constexpr, PREFIX: tl.constexpr, HAS_OFFSET: tl.constexpr,
                            HAS_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr,
                            BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    """ptr: int64 [L, B+1] (offsets into the concatenated index/value), out: [B, L, D]."""
    b = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = cols < D
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    if PREFIX:  # per_source without affine: ŷ_t = Σ_{s ≤ t} W_sᵀ a_s
        for s in range(0, L):
            acc = _tied_accumulate(acc, ptr, index, value, W, stride_wl, stride_wf, offset, scale, cols, dmask,
                                   b, s, s, s, Bp1, F, False, False, BLOCK_K)
            res = acc
            if HAS_BIAS:
                res = res + tl.load(bias + s * D + cols, mask=dmask, other=0.0).to(tl.float32)
            tl.store(out + (b * L + s) * D + cols, res.to(out.dtype.element_ty), mask=dmask)
    else:
        t = tl.program_id(2).to(tl.int64)
        for s in range(0, t + 1):
            if PER_SOURCE:
                w_layer = s
            else:
                w_layer = t
            acc = _tied_accumulate(acc, ptr, index, value, W, stride_wl, stride_wf, offset, scale, cols, dmask,
                                   b, s, t, w_layer, Bp1, F, HAS_OFFSET, HAS_SCALE, BLOCK_K)
        if HAS_BIAS:
            acc += tl.load(bias + t * D + cols, mask=dmask, other=0.0).to(tl.float32)
        tl.store(out + (b * L + t) * D + cols, acc.to(out.dtype.element_ty), mask=dmask)


@triton.jit
def _clt_tied_dot_kernel(ptr, index, W, stride_wl, stride_wf, scale, G, dvalue, dots, Bp1, F, D, L,
                         PER_SOURCE: tl.constexpr, HAS_SCALE: tl.constexpr, STORE_DOTS: tl.constexpr,
                         BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    """Program (b, s): dot_t(j) = ⟨G[b, t], W_{s→t}[i_j]⟩ for the entries j of row b of source s and t ≥ s;
    dvalue[j] = Σ_t scale[t, i_j]·dot_t(j); dots[j, t] when STORE_DOTS (t < s: not written). G: [B, L, D] contiguous."""
    b = tl.program_id(0).to(tl.int64)
    s = tl.program_id(1).to(tl.int64)
    start = tl.load(ptr + s * Bp1 + b)
    end = tl.load(ptr + s * Bp1 + b + 1)
    for k0 in range(start, end, BLOCK_K):
        offs = k0 + tl.arange(0, BLOCK_K)
        kmask = offs < end
        idx = tl.load(index + offs, mask=kmask, other=0).to(tl.int64)
        dv = tl.zeros([BLOCK_K], dtype=tl.float32)
        for t in range(s, L):
            if PER_SOURCE:
                w_layer = s
            else:
                w_layer = t
            dot = tl.zeros([BLOCK_K], dtype=tl.float32)
            for d0 in range(0, D, BLOCK_D):
                cols = d0 + tl.arange(0, BLOCK_D)
                dmask = cols < D
                g = tl.load(G + (b * L + t) * D + cols, mask=dmask, other=0.0).to(tl.float32)
                w = tl.load(W + (b * 0 + w_layer) * stride_wl + idx[:, None] * stride_wf + cols[None, :],
                            mask=kmask[:, None] & dmask[None, :], other=0.0)
                dot += tl.sum(w.to(tl.float32) * g[None, :], axis=1)
            if STORE_DOTS:
                tl.store(dots + offs * L + t, dot, mask=kmask)
            if HAS_SCALE:
                dot = dot * tl.load(scale + t * F + idx, mask=kmask, other=0.0).to(tl.float32)
            dv += dot
        tl.store(dvalue + offs, dv, mask=kmask)


# -------------------------------------------------------------------------------------- autograd
class _Plan:
    """Static facts of one call, kept on the autograd context."""

    def __init__(self, tying: str, L: int, B: int, F: int, d: int, has_bias: bool, has_offset: bool,
                 has_scale: bool, value_dtypes, w_dtype, b_dtype, off_dtype, scale_dtype):
        self.tying, self.L, self.B, self.F, self.d = tying, L, B, F, d
        self.has_bias, self.has_offset, self.has_scale = has_bias, has_offset, has_scale
        self.value_dtypes, self.w_dtype = value_dtypes, w_dtype
        self.b_dtype, self.off_dtype, self.scale_dtype = b_dtype, off_dtype, scale_dtype
        self.prefix = tying == "per_source" and not (has_offset or has_scale)


def _stack_codes(row_ptrs, values, indices):
    """L CSRs → (ptr int64 [L, B+1] into the concatenation, index_all int32, value_all, sizes)."""
    sizes = [int(i.shape[0]) for i in indices]
    base = on_device(tuple(itertools.accumulate(sizes[:-1], initial=0)), torch.int64, row_ptrs[0].device)
    ptr = (torch.stack(row_ptrs, 0) + base[:, None]).contiguous()
    return ptr, torch.cat(indices).contiguous(), torch.cat(values).contiguous(), sizes


class CLTDecodeFunction(torch.autograd.Function):
    """(plan, row_ptrs, indices, b_dec, offset, scale, *values (L), *W (L for "none", else 1)) → ŷ [B, L, d]."""

    @staticmethod
    def forward(ctx, plan, row_ptrs, indices, b_dec, offset, scale, *tensors):
        L, B, F, d = plan.L, plan.B, plan.F, plan.d
        values, Ws = tensors[:L], tensors[L:]
        ctx.plan, ctx.row_ptrs, ctx.indices = plan, row_ptrs, indices
        ctx.save_for_backward(b_dec, offset, scale, *values, *Ws)
        device = Ws[0].device
        if plan.tying == "none":
            y = new_output((B, L * d), plan.w_dtype, device)
            scratch = y if plan.w_dtype == torch.float32 or L == 1 else new_output((B, L * d), torch.float32, device)
            bias = b_dec.reshape(-1) if b_dec is not None else None
            for s in reversed(range(L)):
                dst = (y if s == 0 else scratch)[:, s * d:]
                acc = scratch[:, s * d:] if s < L - 1 else None
                gather_decode(row_ptrs[s], indices[s], values[s], Ws[s].view(F, (L - s) * d),
                              bias if s == 0 else None, out=dst, acc=acc, acc_start=d)
            return y.view(B, L, d)
        W = Ws[0]
        y = new_output((B, L, d), plan.w_dtype, device)
        if B == 0 or d == 0:
            return y
        ptr, index_all, value_all, _ = _stack_codes(row_ptrs, values, indices)
        BLOCK_D = block_d(d)
        grid = (B, triton.cdiv(d, BLOCK_D), 1 if plan.prefix else L)
        _clt_tied_decode_kernel[grid](
            ptr, index_all, value_all, W, W.stride(0), W.stride(1),
            offset if offset is not None else W, scale if scale is not None else W,
            b_dec if b_dec is not None else W, y, B + 1, F, d, L,
            PER_SOURCE=plan.tying == "per_source", PREFIX=plan.prefix, HAS_OFFSET=offset is not None,
            HAS_SCALE=scale is not None, HAS_BIAS=b_dec is not None, BLOCK_K=16, BLOCK_D=BLOCK_D, num_warps=4)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        plan = ctx.plan
        L, B, F, d = plan.L, plan.B, plan.F, plan.d
        saved = ctx.saved_tensors
        b_dec, offset, scale = saved[:3]
        values, Ws = saved[3:3 + L], saved[3 + L:]
        row_ptrs, indices = ctx.row_ptrs, ctx.indices
        need = ctx.needs_input_grad
        need_b, need_off, need_scale = need[3], need[4], need[5]
        need_v = need[6:6 + L]
        need_w = need[6 + L:]
        g = g.contiguous()
        dvalues = [None] * L
        dWs = [None] * len(Ws)
        db = doff = dscale = None
        if plan.has_bias and need_b:
            db = g.sum(0, dtype=torch.float32).to(plan.b_dtype)
        if plan.tying == "none":
            gf = g.view(B, L * d)
            for s in range(L):
                dvalues[s], dW = decode_grads(row_ptrs[s], indices[s], values[s], Ws[s].view(F, (L - s) * d),
                                               gf[:, s * d:], need_v[s], need_w[s])
                dWs[s] = dW.view(F, L - s, d) if dW is not None else None
            return (None, None, None, db, None, None, *dvalues, *dWs)

        W = Ws[0]
        if plan.prefix:  # per_source, no affine: everything through the suffix sums G_s = Σ_{t ≥ s} g_t
            G = g.float().flip(1).cumsum(1).flip(1).contiguous()
            dW = torch.empty((L, F, d), dtype=plan.w_dtype, device=g.device) if need_w[0] else None
            for s in range(L):
                dvalues[s], dW_s = decode_grads(row_ptrs[s], indices[s], values[s], W[s], G[:, s], need_v[s], need_w[0])
                if dW is not None:
                    dW[s] = dW_s
            dWs[0] = dW
            return (None, None, None, db, None, None, *dvalues, *dWs)

        # General path (per_target, per_source with affine). Entries of source s reach targets t ≥ s,
        # so the entries reaching t are a prefix [:ends[t]] of the sources' concatenation.
        ptr, index_all, value_all, sizes = _stack_codes(row_ptrs, values, indices)
        nnz = index_all.shape[0]
        need_dots = (plan.has_offset and need_off) or (plan.has_scale and need_scale)
        idx = index_all.long()
        a = value_all.float()
        pos = (a > 0).float()
        ends = list(itertools.accumulate(sizes))

        def scale_at(t: int, lo: int, hi: int):
            return scale[t].float()[idx[lo:hi]] if scale is not None else None

        def shifted(t: int, lo: int, hi: int) -> torch.Tensor:  # a + offset[t]·1[a > 0] on entries lo:hi
            return a[lo:hi] + offset[t].float()[idx[lo:hi]] * pos[lo:hi] if offset is not None else a[lo:hi]

        def coef(t: int, lo: int, hi: int) -> torch.Tensor:  # c_t(j) on entries lo:hi
            c, sc = shifted(t, lo, hi), scale_at(t, lo, hi)
            return c * sc if sc is not None else c

        dv_all = dots = None
        segments = {}
        if need_w[0]:
            # ∂W grouped by feature; the same passes give dot_t(j) (feature_scatter_dot): no W gathers
            dv_all = torch.zeros(nnz, dtype=torch.float32, device=g.device) if any(need_v) else None
            dots = new_output((nnz, L), torch.float32, g.device) if need_dots else None

            def use_dots(t: int, lo: int, hi: int, dot: torch.Tensor) -> None:
                if dv_all is not None:
                    sc = scale_at(t, lo, hi)
                    dv_all[lo:hi] += dot * sc if sc is not None else dot
                if dots is not None:
                    dots[lo:hi, t] = dot

            dW = torch.empty((L, F, d), dtype=plan.w_dtype, device=g.device)
            if plan.tying == "per_target":  # ∂W_t: all entries of sources s ≤ t through g[:, t]
                rows_all = torch.cat([SparseCodes.rows_of(row_ptrs[s], sizes[s]) for s in range(L)])
                for t in range(L):
                    n = ends[t]
                    segments[t] = feature_segments(idx[:n], F)  # shared with the affine gradients of t
                    dW[t], dot = feature_scatter_dot(idx[:n], rows_all[:n], coef(t, 0, n), g[:, t], W[t],
                                                     segments=segments[t], out_dtype=plan.w_dtype)
                    use_dots(t, 0, n, dot)
            else:  # per_source with affine: entry j of s expanded over its targets t ≥ s
                gflat = g.view(B * L, d)
                for s in range(L):
                    lo, hi = ends[s] - sizes[s], ends[s]
                    rows = SparseCodes.rows_of(row_ptrs[s], sizes[s])
                    ts = torch.arange(s, L, device=g.device)
                    key = idx[lo:hi].repeat(L - s)                                # t-major, like grow and c
                    grow = (ts[:, None] + rows[None, :] * L).reshape(-1)          # row (b_j, t) of g as [B·L, d]
                    c = torch.cat([coef(t, lo, hi) for t in range(s, L)])
                    dW[s], dot = feature_scatter_dot(key, grow, c, gflat, W[s], out_dtype=plan.w_dtype)
                    for t, dot_t in zip(range(s, L), dot.view(L - s, hi - lo)):
                        use_dots(t, lo, hi, dot_t)
            dWs[0] = dW
        elif any(need_v) or need_dots:  # W frozen: one program per (token, source) gathers the W rows
            dv_all = new_output((nnz,), torch.float32, g.device)
            dots = new_output((nnz, L), torch.float32, g.device) if need_dots else None
            if nnz > 0 and B > 0:
                BLOCK_D = block_d(d, cap=128)
                _clt_tied_dot_kernel[(B, L)](
                    ptr, index_all, W, W.stride(0), W.stride(1), scale if scale is not None else W, g, dv_all,
                    dots if dots is not None else dv_all, B + 1, F, d, L, PER_SOURCE=plan.tying == "per_source",
                    HAS_SCALE=scale is not None, STORE_DOTS=need_dots, BLOCK_K=16, BLOCK_D=BLOCK_D, num_warps=4)
        if dv_all is not None:
            for s, part in enumerate(dv_all.split(sizes)):
                if need_v[s]:
                    dvalues[s] = part.to(plan.value_dtypes[s])

        if need_dots:  # (offset, scale) gradients of target t: a two-column feature_scatter over [:ends[t]]
            daff = torch.empty((L, F, int(plan.has_offset) + int(plan.has_scale)), dtype=torch.float32,
                               device=g.device)
            for t in range(L):
                n = ends[t]
                cols = []
                if plan.has_offset:
                    sc = scale_at(t, 0, n)
                    cols.append(pos[:n] * dots[:n, t] * sc if sc is not None else pos[:n] * dots[:n, t])
                if plan.has_scale:
                    cols.append(shifted(t, 0, n) * dots[:n, t])
                daff[t] = feature_scatter(idx[:n], torch.arange(n, device=g.device), torch.ones(n, device=g.device),
                                          torch.stack(cols, 1).contiguous(), F,
                                          segments=segments.get(t) or feature_segments(idx[:n], F))
            if plan.has_offset and need_off:
                doff = daff[:, :, 0].to(plan.off_dtype)
            if plan.has_scale and need_scale:
                dscale = daff[:, :, -1].to(plan.scale_dtype)
        return (None, None, None, db, doff, dscale, *dvalues, *dWs)


# ------------------------------------------------------------------------------------ entry point
def clt_decode(codes: Sequence[SparseCodes], W_dec: Union[torch.Tensor, Sequence[torch.Tensor]], tying: str,
               b_dec: Optional[torch.Tensor] = None, feature_offset: Optional[torch.Tensor] = None,
               feature_scale: Optional[torch.Tensor] = None, skip_empty: bool = False) -> torch.Tensor:
    """codes: L SparseCodes (source layers, B rows each) → ŷ: [B, L, d_out] in W_dec's dtype.

    W_dec: L tensors [F, L−s, d_out] (tying "none") or [L, F, d_out] (tied); b_dec: [L, d_out] or None;
    feature_offset / feature_scale: [L, F] per target layer (tied only) or None. Same semantics as
    ``fastclt.ops.clt_decode``; differentiable in every codes.value, W_dec, b_dec, offset, scale.
    ``skip_empty`` is a permission this kernel does not need: one launch decodes every source.
    """
    plan, W_list = _check_clt_args(codes, W_dec, tying, b_dec, feature_offset, feature_scale)
    row_ptrs = tuple(c.row_ptr.contiguous() for c in codes)
    indices = tuple(c.index.contiguous() for c in codes)
    values = [c.value.contiguous() for c in codes]
    b = b_dec.contiguous() if b_dec is not None else None
    off = feature_offset.contiguous() if feature_offset is not None else None
    sc = feature_scale.contiguous() if feature_scale is not None else None
    return CLTDecodeFunction.apply(plan, row_ptrs, indices, b, off, sc, *values, *W_list)


def _check_clt_args(codes, W_dec, tying, b_dec, offset, scale):
    """The plan of a CLT decode whose arguments ``fastclt.ops.clt_decode`` checked, and the weight
    list; what these kernels need beyond that: float values they take, contiguous untied blocks,
    unit inner stride of a tied W_dec."""
    for s, c in enumerate(codes):
        check_float(f"codes[{s}].value", c.value)
    L, B = len(codes), codes[0].batch_size
    if tying == "none":
        W_list = list(W_dec)
        F, d = W_list[0].shape[0], W_list[0].shape[-1]
        for s, W in enumerate(W_list):
            if F * d > 0 and not W.is_contiguous():
                raise ValueError(f"W_dec[{s}]: expected a contiguous [F, L − s, d_out] tensor "
                                 f"(got strides {W.stride()}); pass W_dec[{s}].contiguous()")
    else:
        F, d = W_dec.shape[1], W_dec.shape[2]
        if d > 1 and W_dec.stride(2) != 1:
            raise ValueError(f"W_dec: expected unit stride in the last dimension (got strides {W_dec.stride()}); "
                             "pass W_dec.contiguous()")
        W_list = [W_dec]
    plan = _Plan(tying, L, B, F, d, b_dec is not None, offset is not None, scale is not None,
                 tuple(c.value.dtype for c in codes), W_list[0].dtype,
                 b_dec.dtype if b_dec is not None else None, offset.dtype if offset is not None else None,
                 scale.dtype if scale is not None else None)
    return plan, W_list
