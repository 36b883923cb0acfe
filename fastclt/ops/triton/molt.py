"""Triton MOLT transforms: ``molt_decode`` (math and layout: ``fastclt/ops/reference/molt.py``) on the GPU.

Only the active (token, transform) pairs are computed, as grouped GEMMs over the entries sorted by
transform (a stable argsort; tokens ascending within a transform). The work is cut into tiles of
BLOCK_M entries of one transform; the tile table (tile → transform, per-transform tile offsets) is
built on the device with cumulative sums and a ``searchsorted``, and the grid is the upper bound
⌈nnz / BLOCK_M⌉ + T tiles, so no launch waits for the host (spare tiles do no work).

Forward (g = gate values, rows of entry e: its token b_e and transform i_e):

    _rows_kernel   H[e, :r_i]  = V_i x_{b_e}                   fp32 [nnz, r_max], grouped order
    _apply_kernel  O[j_e, :]   = H[e, :r_i] · U_i               fp32 [nnz, d_out], flat (CSR) order
    gather_decode  y[b]        = Σ_{j ∈ row b} g_j · O[j] (+ b_dec)    (sparse_decode's kernel, fixed order)

Backward (dy):

    _rows_kernel   T[e]  = U_i dy_{b_e};  dgp[blk, e] = ⟨T[e], H[e]⟩ over rank block blk;  dH[e] = g_e · T[e]
    dg    = Σ_blk dgp (in order), scattered back to the entries' CSR positions
    _wgrad_kernel  dU_i = Σ_e g_e H[e] dy_{b_e}ᵀ,   dV_i = Σ_e dH[e] x_{b_e}ᵀ    (one program per
                   (transform, rank block, column block) walks the transform's entries in order)
    dx (when x needs a gradient): _apply_kernel with (dH, V), then gather_decode with unit weights.

Every output element has one writer and a fixed summation order (no atomics): deterministic. The
[nnz, d] product rows cost nnz·d·4 bytes of workspace (the price of a deterministic token sum).
fp32 inputs use TF32 where torch's matmul does (``torch.backends.cuda.matmul.allow_tf32``); bf16 /
fp16 inputs multiply in their dtype with fp32 accumulation (the fp32 intermediates H, dH are
rounded to the weights' dtype for the second product). Under TRITON_INTERPRET=1 everything is
upcast to fp32 (the interpreter's 16-bit dot is not exact). Outputs under FASTCLT_POISON=1 start
as NaN (tests).
"""
from __future__ import annotations

import os
from typing import Optional, Sequence

import torch
import triton
import triton.language as tl

from fastclt.codes import SparseCodes
from fastclt.ops.reference.molt import molt_sizes, rank_ptr
from fastclt.ops.triton._common import check_float, gather_decode, new_output

__all__ = ["molt_decode", "MOLTFunction", "BLOCK_M"]

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
BLOCK_M = 32  # entries of one transform per tile
BLOCK_R = 64  # rank rows per program
BLOCK_K = 32  # reduction chunk
BLOCK_D = 64  # output columns per program


def _precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32 and not _INTERPRET and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


@triton.jit
def _tile(pid, tile_tr, tile_ptr, seg, rank_ptr, T, BLOCK_M: tl.constexpr):
    """(transform, first entry of the tile in grouped order, entries in the tile, r_i, first rank row);
    a spare tile (past the last transform's) has 0 entries."""
    tr = tl.load(tile_tr + pid)
    valid = tr < T
    tr = tl.where(valid, tr, 0)
    seg0 = tl.load(seg + tr)
    n = tl.load(seg + tr + 1) - seg0
    m0 = (pid - tl.load(tile_ptr + tr)) * BLOCK_M
    n_tile = tl.where(valid, tl.minimum(n - m0, BLOCK_M), 0)
    r0 = tl.load(rank_ptr + tr)
    r = tl.load(rank_ptr + tr + 1) - r0
    return tr, seg0 + m0, n_tile, r, r0


@triton.jit
def _rows_kernel(A, stride_a, W, stride_w, OUT, stride_out, H, gate, dgp, ent_rows, tile_tr, tile_ptr, seg, rank_ptr,
                 T, K, nnz,
                 BACKWARD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
                 INPUT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """Per tile and rank block: P[e, k] = Σ_c A[b_e, c] · W[r0 + k, c] over c < K (A: x with W = V,
    or dy with W = U). Forward: OUT = H ← P. Backward: dgp[blk, e] = Σ_k P·H[e, k]; OUT = dH ← g_e·P."""
    pid = tl.program_id(0).to(tl.int64)
    blk = tl.program_id(1)
    tr, e0, n_tile, r, r0 = _tile(pid, tile_tr, tile_ptr, seg, rank_ptr, T, BLOCK_M)
    offs_m = tl.arange(0, BLOCK_M)
    mmask = offs_m < n_tile
    ent = e0 + offs_m
    tok = tl.load(ent_rows + ent, mask=mmask, other=0)
    offs_r = blk * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = offs_r < r
    k_end = tl.where((n_tile > 0) & (blk * BLOCK_R < r), K, 0)
    acc = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
    for k0 in range(0, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        kmask = offs_k < K
        a = tl.load(A + tok[:, None] * stride_a + offs_k[None, :], mask=mmask[:, None] & kmask[None, :], other=0.0)
        w = tl.load(W + (r0 + offs_r)[:, None] * stride_w + offs_k[None, :], mask=rmask[:, None] & kmask[None, :],
                    other=0.0)
        if UPCAST:
            a, w = a.to(tl.float32), w.to(tl.float32)
        else:
            a = a.to(w.dtype)
        acc = tl.dot(a, tl.trans(w), acc, input_precision=INPUT_PRECISION)
    mask = mmask[:, None] & rmask[None, :]
    if BACKWARD:
        h = tl.load(H + ent[:, None] * stride_out + offs_r[None, :], mask=mask, other=0.0)
        tl.store(dgp + blk.to(tl.int64) * nnz + ent, tl.sum(acc * h, axis=1), mask=mmask)
        g = tl.load(gate + ent, mask=mmask, other=0.0).to(tl.float32)
        acc = acc * g[:, None]
    tl.store(OUT + ent[:, None] * stride_out + offs_r[None, :], acc, mask=mask)


@triton.jit
def _apply_kernel(P, stride_p, W, stride_w, O, stride_o, order, tile_tr, tile_ptr, seg, rank_ptr, T, D,
                  BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
                  INPUT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """O[order[e], c] = Σ_{k < r_i} P[e, k] · W[r0 + k, c]: each entry's product row, at its CSR position."""
    pid = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = cols < D
    tr, e0, n_tile, r, r0 = _tile(pid, tile_tr, tile_ptr, seg, rank_ptr, T, BLOCK_M)
    offs_m = tl.arange(0, BLOCK_M)
    mmask = offs_m < n_tile
    ent = e0 + offs_m
    k_end = tl.where(n_tile > 0, r, 0)
    # the destination rows are read before the K loop: read after it, ptxas spilled (bf16, sm_90)
    dst = tl.load(order + ent, mask=mmask, other=0)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for k0 in range(0, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        kmask = offs_k < r
        p = tl.load(P + ent[:, None] * stride_p + offs_k[None, :], mask=mmask[:, None] & kmask[None, :], other=0.0)
        w = tl.load(W + (r0 + offs_k)[:, None] * stride_w + cols[None, :], mask=kmask[:, None] & dmask[None, :],
                    other=0.0)
        if UPCAST:
            w = w.to(tl.float32)
        else:
            p = p.to(w.dtype)
        acc = tl.dot(p, w, acc, input_precision=INPUT_PRECISION)
    tl.store(O + dst[:, None] * stride_o + cols[None, :], acc, mask=mmask[:, None] & dmask[None, :])


@triton.jit
def _wgrad_kernel(P, stride_p, Bm, stride_b, gate, ent_rows, seg, rank_ptr, OUT, stride_out, D,
                  SCALE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
                  INPUT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """OUT[r0 + k, c] = Σ_{e of transform i} P[e, k] · (g_e ·) Bm[b_e, c]: a weight gradient of
    transform i = program_id(0), rows k of rank block program_id(1), columns of block program_id(2);
    the transform's entries are walked in order (zeros for an unused transform)."""
    tr = tl.program_id(0).to(tl.int64)
    offs_r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = cols < D
    r0 = tl.load(rank_ptr + tr)
    r = tl.load(rank_ptr + tr + 1) - r0
    rmask = offs_r < r
    start = tl.load(seg + tr)
    end = tl.where(tl.program_id(1) * BLOCK_R < r, tl.load(seg + tr + 1), start)
    acc = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
    for e0 in range(start, end, BLOCK_K):
        ent = e0 + tl.arange(0, BLOCK_K)
        emask = ent < end
        tok = tl.load(ent_rows + ent, mask=emask, other=0)
        p = tl.load(P + ent[:, None] * stride_p + offs_r[None, :], mask=emask[:, None] & rmask[None, :], other=0.0)
        b = tl.load(Bm + tok[:, None] * stride_b + cols[None, :], mask=emask[:, None] & dmask[None, :], other=0.0)
        if SCALE:
            g = tl.load(gate + ent, mask=emask, other=0.0).to(tl.float32)
            b = b.to(tl.float32) * g[:, None]
        if UPCAST:
            b = b.to(tl.float32)
        else:
            b = b.to(OUT.dtype.element_ty)
            p = p.to(OUT.dtype.element_ty)
        acc = tl.dot(tl.trans(p), b, acc, input_precision=INPUT_PRECISION)
    tl.store(OUT + (r0 + offs_r)[:, None] * stride_out + cols[None, :], acc.to(OUT.dtype.element_ty),
             mask=rmask[:, None] & dmask[None, :])


class _Plan:
    """The grouping of the entries by transform, on the device: order (grouped position → CSR
    position), ent_rows (token of each grouped entry), seg [T + 1], the tile table."""

    def __init__(self, codes: SparseCodes, ptr: torch.Tensor, T: int, r_max: int) -> None:
        dev = codes.device
        index = codes.index.long()
        nnz = index.shape[0]
        self.nnz, self.T, self.r_max = nnz, T, r_max
        self.order = torch.sort(index, stable=True).indices
        self.ent_rows = codes.row_ids().index_select(0, self.order)
        counts = torch.zeros(T, dtype=torch.int64, device=dev).index_add_(0, index, torch.ones_like(index))
        self.seg = torch.zeros(T + 1, dtype=torch.int64, device=dev)
        torch.cumsum(counts, 0, out=self.seg[1:])
        tiles = (counts + BLOCK_M - 1) // BLOCK_M
        self.tile_ptr = torch.zeros(T + 1, dtype=torch.int64, device=dev)
        torch.cumsum(tiles, 0, out=self.tile_ptr[1:])
        self.n_tiles = (nnz + BLOCK_M - 1) // BLOCK_M + T  # upper bound of Σ_i ⌈n_i / BLOCK_M⌉
        pids = torch.arange(self.n_tiles, device=dev)
        self.tile_tr = torch.searchsorted(self.tile_ptr[1:], pids, right=True)  # T: a spare tile
        self.rank_ptr = ptr


def _rows(plan: _Plan, A, W, out, *, backward=False, H=None, gate=None, dgp=None):
    K = A.shape[1]
    grid = (plan.n_tiles, triton.cdiv(plan.r_max, BLOCK_R))
    dummy = out
    _rows_kernel[grid](A, A.stride(0), W, W.stride(0), out, out.stride(0),
                       H if H is not None else dummy, gate if gate is not None else dummy,
                       dgp if dgp is not None else dummy, plan.ent_rows, plan.tile_tr, plan.tile_ptr, plan.seg,
                       plan.rank_ptr, plan.T, K, plan.nnz,
                       BACKWARD=backward, BLOCK_M=BLOCK_M, BLOCK_R=BLOCK_R, BLOCK_K=BLOCK_K,
                       INPUT_PRECISION=_precision(W.dtype), UPCAST=_INTERPRET)


def _apply(plan: _Plan, P, W) -> torch.Tensor:
    """[nnz, D] fp32: entry j's row P[grouped e] · W_i, at CSR position j."""
    D = W.shape[1]
    O = new_output((plan.nnz, D), torch.float32, W.device)
    grid = (plan.n_tiles, triton.cdiv(D, BLOCK_D))
    _apply_kernel[grid](P, P.stride(0), W, W.stride(0), O, O.stride(0), plan.order, plan.tile_tr, plan.tile_ptr,
                        plan.seg, plan.rank_ptr, plan.T, D, BLOCK_M=BLOCK_M, BLOCK_D=BLOCK_D, BLOCK_K=BLOCK_K,
                        INPUT_PRECISION=_precision(W.dtype), UPCAST=_INTERPRET)
    return O


def _wgrad(plan: _Plan, P, Bm, gate, W) -> torch.Tensor:
    D = Bm.shape[1]
    out = new_output(W.shape, W.dtype, W.device)
    grid = (plan.T, triton.cdiv(plan.r_max, BLOCK_R), triton.cdiv(D, BLOCK_D))
    _wgrad_kernel[grid](P, P.stride(0), Bm, Bm.stride(0), gate if gate is not None else P, plan.ent_rows, plan.seg,
                        plan.rank_ptr, out, out.stride(0), D, SCALE=gate is not None, BLOCK_R=BLOCK_R,
                        BLOCK_D=BLOCK_D, BLOCK_K=BLOCK_K, INPUT_PRECISION=_precision(W.dtype), UPCAST=_INTERPRET)
    return out


class MOLTFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, plan, row_ptr, gate, x, U, V, bias):
        B, nnz = x.shape[0], plan.nnz
        H = new_output((nnz, plan.r_max), torch.float32, x.device)
        if nnz:
            _rows(plan, x, V, H)
            O = _apply(plan, H, U)
        else:
            O = torch.zeros(0, U.shape[1], dtype=torch.float32, device=x.device)
        flat = torch.arange(nnz, dtype=torch.int32, device=x.device)
        y = gather_decode(row_ptr, flat, gate, O, bias, out_dtype=U.dtype) if B else U.new_zeros(0, U.shape[1])
        ctx.plan = plan
        ctx.has_bias = bias is not None
        ctx.save_for_backward(row_ptr, gate, x, U, V, H)
        return y

    @staticmethod
    def backward(ctx, dy):
        plan = ctx.plan
        row_ptr, gate, x, U, V, H = ctx.saved_tensors
        need = ctx.needs_input_grad
        dy = dy.contiguous()
        d_gate = dx = dU = dV = db = None
        nnz = plan.nnz
        gate_g = gate.index_select(0, plan.order).contiguous()  # gates in grouped order
        dH = None
        if need[2] or need[3] or need[5]:
            n_blk = triton.cdiv(plan.r_max, BLOCK_R)
            dgp = new_output((n_blk, nnz), torch.float32, x.device)
            dH = new_output((nnz, plan.r_max), torch.float32, x.device)
            if nnz:
                _rows(plan, dy, U, dH, backward=True, H=H, gate=gate_g, dgp=dgp)
            if need[2]:
                dg = torch.empty(nnz, dtype=torch.float32, device=x.device)
                dg[plan.order] = dgp.sum(0)
                d_gate = dg.to(gate.dtype)
        if need[4]:
            dU = _wgrad(plan, H, dy, gate_g, U)
        if need[5]:
            dV = _wgrad(plan, dH, x, None, V)
        if need[3]:
            O = _apply(plan, dH, V) if nnz else torch.zeros(0, V.shape[1], dtype=torch.float32, device=x.device)
            ones = torch.ones(nnz, dtype=torch.float32, device=x.device)
            flat = torch.arange(nnz, dtype=torch.int32, device=x.device)
            dx = gather_decode(row_ptr, flat, ones, O, None, out_dtype=x.dtype)
        if ctx.has_bias and need[6]:
            db = dy.sum(0, dtype=torch.float32).to(dy.dtype)
        return None, None, d_gate, dx, dU, dV, db


def molt_decode(codes: SparseCodes, x: torch.Tensor, U: torch.Tensor, V: torch.Tensor, rank_groups: Sequence,
                b_dec: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``fastclt.ops.molt_decode`` on Triton kernels (fp32 / bf16 / fp16; x, U and V in one dtype,
    checked by the entry point)."""
    check_float("codes.value", codes.value)
    T, _, r_max = molt_sizes(tuple(rank_groups))
    plan = _Plan(codes, rank_ptr(rank_groups, x.device), T, r_max)
    bias = None if b_dec is None else b_dec.to(U.dtype).contiguous()
    return MOLTFunction.apply(plan, codes.row_ptr.contiguous(), codes.value.contiguous(), x.contiguous(),
                              U.contiguous(), V.contiguous(), bias)
