"""What the Triton kernels share (docs/DESIGN.md §7): the three kernel shapes as launchers, the
autotune limit, availability-independent helpers and the test hook for poisoned outputs.

Reusable launchers (no autograd; contracts the decode, CLT decode and encode backward rely on):
``feature_scatter(index, row, coef, G, n_features, *, segments=None, out_dtype=fp32) -> dW [n_features, D]``
    ``dW[f] = Σ_{j: index[j] = f} coef[j] · G[row[j]]``, accumulated in fp32 and stored in ``out_dtype``
    (fp32 by default; W's dtype saves a separate cast pass over dW).
    index: int32|int64 [N] in [0, n_features) (out-of-range is the caller's contract: not checked);
    row: int32|int64 [N] in [0, G.shape[0]); coef: float [N] (fp32|bf16|fp16);
    G: [R, D] fp32|bf16|fp16 with unit stride in the last dim (any row stride, e.g. a slice g[:, t]).
    Method: stable argsort of index → per-feature segment offsets (``feature_segments``) → one program
    per (feature, D-block) walks its segment in a fixed order and writes its row. A "hot" feature
    with more than ``SEGMENT_CHUNK`` (1024) entries is walked in chunks by several programs that write
    fp32 partial rows, summed in chunk order by a second kernel (work tables built on the device,
    no host sync). Deterministic (bit-identical across runs), no atomics; every row is written, rows
    of features with no entry are zeros. Pass ``segments=feature_segments(index, n_features)`` to reuse
    one sort across several calls with the same index (e.g. dW_enc and db_enc of an encoder backward).
    ``feature_sum(index, coef, n_features) -> fp32 [n_features]`` is the D = 1 case (Σ coef per
    feature, e.g. db_enc = feature_sum(index, dh, F)).
    ``feature_scatter_dot(index, row, coef, G, W, *, segments=None, out_dtype=fp32) -> (dW [F, D], dot fp32 [N])``
    adds, in the same pass, ``dot[j] = ⟨G[row[j]], W[index[j]]⟩`` (W: [F, D]), reading each W row once
    per feature: the decode backward's dvalue and dW together.

``gather_decode(row_ptr, index, value, W, bias=None, *, out_dtype=None) -> [B, D]``
    the forward kernel on raw CSR (e.g. an encoder's ``dx[b] = Σ_j dh[j]·W_enc[index[j]]``).

``gather_dot(row_ptr, index, W, G, *, out_dtype=torch.float32) -> [nnz]``
    ``out[j] = ⟨G[row(j)], W[index[j]]⟩`` (the dvalue kernel).

Validation happens before any launch: device mismatch, W not 2-D/3-D, dtypes outside
{fp32, bf16, fp16}, W without unit stride in its last dim(s) are errors naming the argument;
small tensors (codes, biases) are made contiguous. Index values outside [0, F) are the caller's
contract (not checked: a check would cost a device sync). B = 0, nnz = 0 and D = 0 work without
launching an empty grid.

Test hook: ``FASTCLT_POISON=1`` makes the launchers allocate their outputs filled with NaN instead of
uninitialised, so an element a kernel forgets to write fails a test.
"""
from __future__ import annotations

import os
from typing import Optional, Sequence

import torch
import triton
import triton.language as tl

from fastclt.codes import SparseCodes

__all__ = ["feature_scatter", "feature_scatter_dot", "feature_segments", "feature_sum", "gather_decode", "gather_dot",
           "decode_grads", "new_output", "check_float", "check_device", "check_rows", "block_d", "SEGMENT_CHUNK",
           "AUTOTUNE_CONFIGS_ENV", "autotune_limit", "first_configs"]

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# feature_scatter walks a feature with more than SEGMENT_CHUNK entries (a "hot" feature, active in
# many tokens) in chunks of this many entries, with fp32 partial rows summed in order by a second
# kernel: one long segment would otherwise serialise on one program. Tests lower it.
SEGMENT_CHUNK = 1024


# --------------------------------------------------------------------------------------- helpers
# Environment variable: keep only the first N configs of every Triton autotune space (after the
# configs that do not fit the device are dropped); unset or empty = all. For runs that must bound
# autotuning time (GPU tests); the configs are listed best-guess first.
AUTOTUNE_CONFIGS_ENV = "FASTCLT_AUTOTUNE_CONFIGS"

def autotune_limit() -> Optional[int]:
    """N from ``FASTCLT_AUTOTUNE_CONFIGS`` (a positive integer), None when unset or empty; any other
    value raises ValueError naming the variable."""
    raw = os.environ.get(AUTOTUNE_CONFIGS_ENV, "").strip()
    if not raw:
        return None
    try:
        n = int(raw)
    except ValueError:
        n = 0
    if n < 1:
        raise ValueError(f"{AUTOTUNE_CONFIGS_ENV}: expected a positive integer (how many autotune configs to "
                         f"keep), or unset for all; got {raw!r}")
    return n


def first_configs(configs: Sequence) -> list:
    """``configs`` cut to the first ``autotune_limit()`` (all when unset)."""
    n = autotune_limit()
    return list(configs) if n is None else list(configs)[:n]


def new_output(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Uninitialised output, or NaN-filled under the test hook ``FASTCLT_POISON=1``."""
    if os.environ.get("FASTCLT_POISON") == "1":
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def check_float(name: str, t: torch.Tensor) -> None:
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name}: expected fp32, bf16 or fp16 for the Triton kernels, got {t.dtype}")


def check_device(name: str, t: torch.Tensor, device: torch.device) -> None:
    if t.device != device:
        raise ValueError(f"{name}: on {t.device}, but the other inputs are on {device}")


def check_rows(name: str, W: torch.Tensor) -> None:
    """W: 2-D with unit stride in the last dim (any row stride)."""
    if W.dim() != 2:
        raise ValueError(f"{name}: expected a 2-D tensor, got shape {tuple(W.shape)}")
    if W.shape[1] > 1 and W.stride(1) != 1:
        raise ValueError(f"{name}: expected unit stride in the last dimension (rows read contiguously), got "
                         f"strides {W.stride()}; pass {name}.contiguous()")


def block_d(D: int, cap: int = 256) -> int:
    """Columns per program (or per loop step): a power of two in [16, cap]; the same under the
    interpreter as on a GPU, so tests with D > cap cover the multi-block paths."""
    return max(16, min(triton.next_power_of_2(max(D, 1)), cap))


# --------------------------------------------------------------------------------------- kernels
@triton.jit
def _gather_decode_kernel(row_ptr, index, value, W, stride_w, bias, acc_in, stride_acc, out, stride_out,
                          D, acc_start,
                          HAS_BIAS: tl.constexpr, HAS_ACC: tl.constexpr,
                          BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    """out[b, c] = Σ_{j ∈ row b} value[j]·W[index[j], c] (+ acc_in[b, c] for c ≥ acc_start) (+ bias[c])."""
    b = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = cols < D
    start = tl.load(row_ptr + b)
    end = tl.load(row_ptr + b + 1)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for k0 in range(start, end, BLOCK_K):
        offs = k0 + tl.arange(0, BLOCK_K)
        kmask = offs < end
        idx = tl.load(index + offs, mask=kmask, other=0).to(tl.int64)
        v = tl.load(value + offs, mask=kmask, other=0.0).to(tl.float32)
        w = tl.load(W + idx[:, None] * stride_w + cols[None, :], mask=kmask[:, None] & dmask[None, :], other=0.0)
        acc += tl.sum(w.to(tl.float32) * v[:, None], axis=0)
    if HAS_ACC:
        acc += tl.load(acc_in + b * stride_acc + cols, mask=dmask & (cols >= acc_start), other=0.0).to(tl.float32)
    if HAS_BIAS:
        acc += tl.load(bias + cols, mask=dmask, other=0.0).to(tl.float32)
    tl.store(out + b * stride_out + cols, acc.to(out.dtype.element_ty), mask=dmask)


@triton.jit
def _gather_dot_kernel(row_ptr, index, W, stride_w, G, stride_g, out, D,
                       BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    """out[j] = ⟨G[b], W[index[j]]⟩ for the entries j of row b = program_id(0)."""
    b = tl.program_id(0).to(tl.int64)
    start = tl.load(row_ptr + b)
    end = tl.load(row_ptr + b + 1)
    for k0 in range(start, end, BLOCK_K):
        offs = k0 + tl.arange(0, BLOCK_K)
        kmask = offs < end
        idx = tl.load(index + offs, mask=kmask, other=0).to(tl.int64)
        acc = tl.zeros([BLOCK_K], dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            cols = d0 + tl.arange(0, BLOCK_D)
            dmask = cols < D
            g = tl.load(G + b * stride_g + cols, mask=dmask, other=0.0).to(tl.float32)
            w = tl.load(W + idx[:, None] * stride_w + cols[None, :], mask=kmask[:, None] & dmask[None, :], other=0.0)
            acc += tl.sum(w.to(tl.float32) * g[None, :], axis=1)
        tl.store(out + offs, acc.to(out.dtype.element_ty), mask=kmask)


@triton.jit
def _feature_scatter_kernel(starts, ends, feats, rows, coef, G, stride_g, out, D, W, stride_w, order, dots, N,
                            HAS_FEATS: tl.constexpr, HAS_DOT: tl.constexpr,
                            BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr):
    """Program p walks the sorted entries starts[p]:ends[p] (all of feature f = feats[p], or f = p):
    out[p, c] = Σ_j coef[j]·G[rows[j], c] in a fixed order.
    HAS_DOT: also dots[blk, order[j]] = Σ_{c in block blk} G[rows[j], c]·W[f, c] (partial dots)."""
    p = tl.program_id(0).to(tl.int64)
    blk = tl.program_id(1)
    cols = blk * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = cols < D
    start = tl.load(starts + p)
    end = tl.load(ends + p)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    if HAS_DOT:
        if HAS_FEATS:
            f = tl.load(feats + p)
        else:
            f = p
        w = tl.load(W + f * stride_w + cols, mask=dmask, other=0.0).to(tl.float32)
    for j0 in range(start, end, BLOCK_J):
        offs = j0 + tl.arange(0, BLOCK_J)
        jmask = offs < end
        r = tl.load(rows + offs, mask=jmask, other=0).to(tl.int64)
        c = tl.load(coef + offs, mask=jmask, other=0.0).to(tl.float32)
        g = tl.load(G + r[:, None] * stride_g + cols[None, :], mask=jmask[:, None] & dmask[None, :], other=0.0)
        g = g.to(tl.float32)
        acc += tl.sum(g * c[:, None], axis=0)
        if HAS_DOT:
            dst = tl.load(order + offs, mask=jmask, other=0)
            tl.store(dots + blk.to(tl.int64) * N + dst, tl.sum(g * w[None, :], axis=1), mask=jmask)
    tl.store(out + p * D + cols, acc.to(out.dtype.element_ty), mask=dmask)


@triton.jit
def _chunk_reduce_kernel(hot_feat, chunk_lo, chunk_hi, partials, out, D, F, BLOCK_D: tl.constexpr):
    """out[f] = Σ_{c = chunk_lo[p]}^{chunk_hi[p] − 1} partials[c] in order, f = hot_feat[p] (f = F: unused slot)."""
    p = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = cols < D
    f = tl.load(hot_feat + p)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for c in range(tl.load(chunk_lo + p), tl.load(chunk_hi + p)):
        acc += tl.load(partials + c * D + cols, mask=dmask, other=0.0)
    fmask = (tl.zeros([BLOCK_D], dtype=tl.int64) + f) < F
    tl.store(out + f * D + cols, acc.to(out.dtype.element_ty), mask=dmask & fmask)


# ------------------------------------------------------------------------------------- launchers
def gather_decode(row_ptr: torch.Tensor, index: torch.Tensor, value: torch.Tensor, W: torch.Tensor,
                  bias: Optional[torch.Tensor] = None, *, out_dtype: Optional[torch.dtype] = None,
                  out: Optional[torch.Tensor] = None, acc: Optional[torch.Tensor] = None,
                  acc_start: int = 0) -> torch.Tensor:
    """row_ptr: int64 [B+1], index: int [nnz], value: float [nnz], W: [F, D] (unit inner stride),
    bias: [D] or None → out: [B, D] in ``out_dtype`` (default W's dtype), fp32 accumulation.

    ``out`` (a [B, D] view with unit inner stride) receives the result in place; ``acc`` ([B, D], may
    alias ``out``) is added at columns ≥ ``acc_start`` (used to chain per-source CLT decodes).
    """
    check_rows("W", W)
    row_ptr, index, value = row_ptr.contiguous(), index.contiguous(), value.contiguous()
    bias = bias.contiguous() if bias is not None else None
    B, D = row_ptr.shape[0] - 1, W.shape[1]
    if out is None:
        out = new_output((B, D), out_dtype or W.dtype, W.device)
    if B == 0 or D == 0:
        return out
    BLOCK_D = block_d(D)
    grid = (B, triton.cdiv(D, BLOCK_D))
    _gather_decode_kernel[grid](
        row_ptr, index, value, W, W.stride(0),
        bias if bias is not None else W, acc if acc is not None else out,
        acc.stride(0) if acc is not None else 0, out, out.stride(0), D, acc_start,
        HAS_BIAS=bias is not None, HAS_ACC=acc is not None, BLOCK_K=16, BLOCK_D=BLOCK_D, num_warps=4)
    return out


def gather_dot(row_ptr: torch.Tensor, index: torch.Tensor, W: torch.Tensor, G: torch.Tensor, *,
               out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """row_ptr: int64 [B+1], index: int [nnz], W: [F, D], G: [B, D] (any row stride)
    → out: [nnz], ``out[j] = ⟨G[row(j)], W[index[j]]⟩`` (fp32 accumulation)."""
    check_rows("W", W)
    check_rows("G", G)
    row_ptr, index = row_ptr.contiguous(), index.contiguous()
    B, D = row_ptr.shape[0] - 1, W.shape[1]
    nnz = index.shape[0]
    if G.shape != (B, D):
        raise ValueError(f"G: expected [{B}, {D}], got {tuple(G.shape)}")
    if nnz == 0 or B == 0:
        return torch.empty(nnz, dtype=out_dtype, device=W.device)
    if D == 0:
        return torch.zeros(nnz, dtype=out_dtype, device=W.device)
    out = new_output((nnz,), out_dtype, W.device)
    BLOCK_D = block_d(D, cap=128)
    _gather_dot_kernel[(B,)](row_ptr, index, W, W.stride(0), G, G.stride(0), out, D,
                             BLOCK_K=16, BLOCK_D=BLOCK_D, num_warps=4)
    return out


def feature_segments(index: torch.Tensor, n_features: int) -> tuple[torch.Tensor, torch.Tensor]:
    """index: int [N] in [0, n_features) → (order int64 [N], seg_ptr int64 [n_features + 1]):
    ``index[order]`` is sorted (stable), feature f owns ``order[seg_ptr[f]:seg_ptr[f+1]]``."""
    sorted_index, order = torch.sort(index.long(), stable=True)
    seg_ptr = torch.searchsorted(sorted_index, torch.arange(n_features + 1, device=index.device))
    return order, seg_ptr


def feature_scatter(index: torch.Tensor, row: torch.Tensor, coef: torch.Tensor, G: torch.Tensor,
                    n_features: int, *, segments: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
                    out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``dW[f] = Σ_{j: index[j] = f} coef[j] · G[row[j]]`` → [n_features, D], fp32 unless ``out_dtype``
    (fp32 accumulation either way; one rounding at the store); see the module docstring."""
    return _feature_scatter(index, row, coef, G, n_features, None, segments, out_dtype)[0]


def feature_scatter_dot(index: torch.Tensor, row: torch.Tensor, coef: torch.Tensor, G: torch.Tensor,
                        W: torch.Tensor, *, segments: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
                        out_dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """``feature_scatter`` fused with the dots at the same entries, in one feature-grouped pass:
    → (dW [F, D] in ``out_dtype``, dot fp32 [N]) with ``dot[j] = ⟨G[row[j]], W[index[j]]⟩``, W: [F, D].
    Each W row is read once per feature instead of once per entry; the dots are summed over D-blocks
    from fp32 partials [D-blocks, N] (deterministic)."""
    check_float("W", W)
    check_rows("W", W)
    check_device("W", W, G.device)
    if W.shape[1] != G.shape[1]:
        raise ValueError(f"W: expected {G.shape[1]} columns like G, got {tuple(W.shape)}")
    return _feature_scatter(index, row, coef, G, W.shape[0], W, segments, out_dtype)


def _feature_scatter(index, row, coef, G, n_features, W, segments, out_dtype):
    if index.dim() != 1 or row.shape != index.shape or coef.shape != index.shape:
        raise ValueError(f"index/row/coef: expected three [N] tensors, got {tuple(index.shape)}, "
                         f"{tuple(row.shape)}, {tuple(coef.shape)}")
    if index.dtype not in (torch.int32, torch.int64) or row.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"index/row: expected int32 or int64, got {index.dtype} and {row.dtype}")
    check_float("coef", coef)
    check_float("G", G)
    check_rows("G", G)
    for name, t in (("index", index), ("row", row), ("coef", coef)):
        check_device(name, t, G.device)
    N, D = index.shape[0], G.shape[1]
    if out_dtype not in FLOAT_DTYPES:
        raise TypeError(f"out_dtype: expected fp32, bf16 or fp16, got {out_dtype}")
    out = new_output((n_features, D), out_dtype, G.device)
    if n_features == 0 or D == 0:
        return out, (torch.zeros(N, dtype=torch.float32, device=G.device) if W is not None else None)
    order, seg_ptr = segments if segments is not None else feature_segments(index, n_features)
    rows = row[order].contiguous()
    coefs = coef[order].contiguous()
    order, seg_ptr = order.contiguous(), seg_ptr.contiguous()
    BLOCK_D = block_d(D)
    n_blocks = triton.cdiv(D, BLOCK_D)
    dots = new_output((n_blocks, N), torch.float32, G.device) if W is not None else out
    Wp, stride_w = (W, W.stride(0)) if W is not None else (G, 0)
    common = dict(HAS_DOT=W is not None, BLOCK_J=16, BLOCK_D=BLOCK_D, num_warps=4)
    C = SEGMENT_CHUNK
    starts, ends = seg_ptr[:-1], seg_ptr[1:]
    split = N > C  # else no feature can be hot: skip the chunk pass without a device sync
    if split:  # hot features (more than C entries) are walked in chunks of C by the second pass
        ends = torch.where(ends - starts > C, starts, ends)
    _feature_scatter_kernel[(n_features, n_blocks)](starts, ends, starts, rows, coefs, G, G.stride(0), out, D,
                                                    Wp, stride_w, order, dots, N, HAS_FEATS=False, **common)
    if split:
        chunk_feat, chunk_start, chunk_end, hot_feat, chunk_lo, chunk_hi = _chunk_tables(seg_ptr, N, C)
        partials = new_output((chunk_feat.shape[0], D), torch.float32, G.device)
        _feature_scatter_kernel[(chunk_feat.shape[0], n_blocks)](
            chunk_start, chunk_end, chunk_feat, rows, coefs, G, G.stride(0), partials, D,
            Wp, stride_w, order, dots, N, HAS_FEATS=True, **common)
        _chunk_reduce_kernel[(hot_feat.shape[0], n_blocks)](hot_feat, chunk_lo, chunk_hi, partials, out, D,
                                                            n_features, BLOCK_D=BLOCK_D, num_warps=4)
    if W is None:
        return out, None
    return out, (dots[0] if n_blocks == 1 else dots.sum(0))


def _chunk_tables(seg_ptr: torch.Tensor, N: int, C: int):
    """Work tables for the features with more than C entries ("hot"), built on the device without a
    sync, padded to host-known bounds (≤ 2·N/C chunks, ≤ N/(C+1) hot features):
    chunk_feat/chunk_start/chunk_end [n_chunks] (padding: empty chunks of feature 0), and per hot
    slot hot_feat (padding: F) with its chunks chunk_lo:chunk_hi."""
    F = seg_ptr.shape[0] - 1
    device = seg_ptr.device
    counts = seg_ptr[1:] - seg_ptr[:-1]
    hot = counts > C
    n_chunks = torch.where(hot, (counts + C - 1) // C, torch.zeros_like(counts))
    # chunks of feature f: [end_ptr[f] − n_chunks[f], end_ptr[f])
    chunk_end_ptr = n_chunks.cumsum(0)
    cid = torch.arange(2 * triton.cdiv(N, C), device=device)
    f = torch.searchsorted(chunk_end_ptr, cid, right=True)  # feature owning chunk cid (F: padding)
    valid = f < F
    fc = f.clamp(max=F - 1)
    first = seg_ptr[fc] + (cid - (chunk_end_ptr[fc] - n_chunks[fc])) * C
    chunk_start = torch.where(valid, first, 0)
    chunk_end = torch.where(valid, torch.minimum(first + C, seg_ptr[fc + 1]), 0)
    hid = torch.arange(max(N // (C + 1), 1), device=device)
    hf = torch.searchsorted(hot.long().cumsum(0), hid, right=True)  # the hid-th hot feature (F: padding)
    hfc = hf.clamp(max=F - 1)
    hvalid = hf < F
    chunk_lo = torch.where(hvalid, chunk_end_ptr[hfc] - n_chunks[hfc], 0)
    chunk_hi = torch.where(hvalid, chunk_end_ptr[hfc], 0)
    return torch.where(valid, f, 0), chunk_start, chunk_end, hf, chunk_lo, chunk_hi


def feature_sum(index: torch.Tensor, coef: torch.Tensor, n_features: int, *,
                segments: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> torch.Tensor:
    """``out[f] = Σ_{j: index[j] = f} coef[j]`` → fp32 [n_features] (deterministic, no atomics)."""
    ones = torch.ones(1, 1, dtype=torch.float32, device=coef.device)
    zeros = torch.zeros_like(index)
    return feature_scatter(index, zeros, coef, ones, n_features, segments=segments)[:, 0]


def decode_grads(row_ptr, index, value, W, G, need_v: bool, need_w: bool):
    """Gradients of y = decode(codes, W) given G = ∂L/∂y: (dvalue in value's dtype, dW in W's dtype)."""
    dvalue = dW = None
    if need_v and need_w:  # one feature-grouped pass: each W row read once
        dW, dvalue = feature_scatter_dot(index, SparseCodes.rows_of(row_ptr, index.shape[0]), value, G, W,
                                         out_dtype=W.dtype)
        dvalue = dvalue.to(value.dtype)
    elif need_v:
        dvalue = gather_dot(row_ptr, index, W, G, out_dtype=value.dtype)
    elif need_w:
        dW = feature_scatter(index, SparseCodes.rows_of(row_ptr, index.shape[0]), value, G, W.shape[0],
                             out_dtype=W.dtype)
    return dvalue, dW
