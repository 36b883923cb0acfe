"""The sparse encoder backward (docs/DESIGN.md §7), shared by every kernel backend.

An encode kernel (the fused Triton GEMM, or a dense GEMM plus an extension select) finds the
pattern of its codes — entries (row, col) and their fp32 pre-activations h — without autograd.
``encode_codes`` turns that pattern into SparseCodes whose values are differentiable in x, W_enc,
b_enc, θ and the pre-bias, with the backward computed from the entries only (never a dense [B, F]):

    dh[j]        = dvalue[j] · act'(h[j])            (JumpReLU: 1[h > θ]; ReLU/TopK: 1[h > 0])
    dW_enc[f]    = Σ_{j: col=f} dh[j] · (x − pre_bias)[row j]
    db_enc[f]    = Σ_{j: col=f} dh[j]
    dθ[f]        = Σ_{j: col=f} dvalue[j] · (−θ_f/ε) · rect((h[j] − θ_f)/ε)
    dx[b]        = Σ_{j ∈ row b} dh[j] · W_enc[col j]
    d pre_bias   = −W_encᵀ db_enc                     (reduce over the batch first, then one mat-vec)

The grouped-by-feature sums and the gather come from a ``SparseKernels`` backend (Triton, or the
C++/CUDA extension), so every backend has the same math and the same tests.

At or above the crossover density of "encode_backward" (``fastclt.ops.density``, docs/DESIGN.md §17)
dx and dW_enc take the dense formulation instead: dh scattered into a dense dH: [B, F], then the GEMMs
``dx = dH W_enc`` and ``dW_enc = dHᵀ (x − pre_bias)`` (in fp32 for fp32 inputs, else in x's dtype with
the GEMM's fp32 accumulation); the per-feature sums of db_enc and dθ become column sums of dense
scatters, and the pre-bias gradient the same mat-vec.
"""
from __future__ import annotations

from typing import Optional, Protocol

import torch

from fastclt.codes import SparseCodes
from fastclt.ops import density
from fastclt.ops.dense._common import zeros

__all__ = ["SparseKernels", "encode_codes", "matvec_f32", "vecmat_f32", "folded_bias"]


class SparseKernels(Protocol):
    """What the encoder backward needs from a kernel backend (all sums in fp32, deterministic)."""

    def segments(self, col: torch.Tensor, n_features: int):
        """Any reusable grouping of the entries by feature (or None)."""

    def feature_sums(self, col: torch.Tensor, coef: torch.Tensor, n_features: int, segments) -> torch.Tensor:
        """coef: fp32 [nnz, m] → fp32 [F, m], out[f] = Σ_{j: col=f} coef[j]."""

    def feature_scatter(self, col: torch.Tensor, row: Optional[torch.Tensor], row_ptr: torch.Tensor, coef: torch.Tensor,
                        G: torch.Tensor, n_features: int, segments) -> torch.Tensor:
        """coef: fp32 [nnz], G: [B, D] → [F, D], out[f] = Σ_{j: col=f} coef[j] · G[row j] (``row``: the
        entries' rows, or None: a backend that needs them takes them from ``row_ptr``). G may also be
        [G', B', D], whose rows (g, b') are the B = G'·B' rows in that order."""

    def gather(self, row_ptr: torch.Tensor, col: torch.Tensor, coef: torch.Tensor, W: torch.Tensor,
               out_dtype: torch.dtype) -> torch.Tensor:
        """coef: fp32 [nnz], W: [F, D] → [B, D], out[b] = Σ_{j ∈ row b} coef[j] · W[col j]."""

    # optional: feature_scatter_and_sums(col, row, row_ptr, coef, G, n_features) → (feature_scatter's
    # result, fp32 [F] sums of coef per feature, the numbers feature_sums gives): where a backend has it,
    # dW_enc and db_enc come from one grouping of the entries


_CHUNK = 8192  # rows of W_enc converted to fp32 at a time (bounds the temporary to 8192·d_in floats)


def matvec_f32(W: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """W: [F, d] @ v: [d] → fp32 [F], without an fp32 copy of all of W."""
    v = v.detach().float()
    if W.shape[0] == 0:
        return v.new_zeros(0)
    return torch.cat([W[i:i + _CHUNK].detach().float() @ v for i in range(0, W.shape[0], _CHUNK)])


def vecmat_f32(s: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """s: [F] @ W: [F, d] → fp32 [d] (chunks summed in a fixed order: deterministic)."""
    out = torch.zeros(W.shape[1], dtype=torch.float32, device=W.device)
    for i in range(0, W.shape[0], _CHUNK):
        out += s[i:i + _CHUNK].float() @ W[i:i + _CHUNK].detach().float()
    return out


def folded_bias(W: torch.Tensor, b: Optional[torch.Tensor], pre_bias: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """b_enc − W_enc·pre_bias in fp32, once per call (None when both are absent)."""
    with torch.no_grad():
        bias = None if b is None else b.detach().float()
        if pre_bias is not None:
            wp = matvec_f32(W, pre_bias)
            bias = -wp if bias is None else bias - wp
        return None if bias is None else bias.contiguous()


class _SparseEncodeValue(torch.autograd.Function):
    """values = act(h) at fixed entries (row, col); the backward is the sparse encoder backward."""

    @staticmethod
    def forward(ctx, x, W, b, threshold, pre_bias, row_ptr, row, col, h, act, bandwidth, kernels, centered):
        if act == "jumprelu":
            value = torch.where(h > threshold.float().index_select(0, col), h, 0.0)
        elif act == "relu":
            value = h
        else:  # topk / batchtopk: ReLU applied to the kept values
            value = torch.relu(h)
        ctx.save_for_backward(x, W, threshold, pre_bias, row_ptr, row, col, h, centered)
        ctx.act, ctx.bandwidth, ctx.kernels = act, bandwidth, kernels
        ctx.b_dtype = None if b is None else b.dtype
        return value.to(x.dtype)

    @staticmethod
    def backward(ctx, dvalue):
        x, W, threshold, pre_bias, row_ptr, row, col, h, centered = ctx.saved_tensors
        need_x, need_W, need_b, need_t, need_p = ctx.needs_input_grad[:5]
        kern: SparseKernels = ctx.kernels
        F, B = W.shape[0], row_ptr.shape[0] - 1
        dv = dvalue.float()
        dx = dW = db = dt = dp = None
        dense = (need_x or need_W) and density.use_dense("encode_backward", density.of(col.shape[0], B, F),
                                                         x.device, x.dtype)
        if ctx.act == "jumprelu":
            theta = threshold.float().index_select(0, col)  # int32 col: no int64 copy
            dh = torch.where(h > theta, dv, 0.0)
        elif ctx.act == "relu":
            dh = dv
        else:
            dh = torch.where(h > 0, dv, 0.0)
        sums = []  # per-feature sums: [dh] and/or [dθ terms]
        if need_b or need_p:
            sums.append(dh)
        if need_t:
            eps = ctx.bandwidth
            sums.append(torch.where(((h - theta) / eps).abs() < 0.5, dv * (-(theta / eps)), 0.0))
        dH = None
        if dense:
            # the entries scattered into dense fp32 [B, F]; per-feature sums are column sums (O(B·F),
            # deterministic, no grouping of the entries)
            if row is None:
                row = SparseCodes.rows_of(row_ptr, col.shape[0])
            flat = row * F + col  # int64 (row) + int32: int64
            dH = zeros(B * F, torch.float32, x.device).index_put_((flat,), dh).view(B, F)
            cols = [dH.sum(0) if c is dh
                    else zeros(B * F, torch.float32, x.device).index_put_((flat,), c).view(B, F).sum(0) for c in sums]
            S = torch.stack(cols, 1) if cols else None
        elif sums and need_W and not need_t and hasattr(kern, "feature_scatter_and_sums"):
            # dW_enc and db_enc from one scatter: its per-feature sums of dh are feature_sums' numbers
            G = _scatter_rows(x, pre_bias, centered)
            dW, s_dh = kern.feature_scatter_and_sums(col, row, row_ptr, dh, G, F)
            dW, S = dW.to(W.dtype), s_dh[:, None]
        elif sums:
            seg = kern.segments(col, F)  # one grouping for the sums and dW
            S = kern.feature_sums(col, torch.stack(sums, 1).contiguous(), F, seg)  # fp32 [F, 1|2]
        else:
            seg = kern.segments(col, F) if need_W else None
        if sums:
            if need_t:
                dt = S[:, -1].to(threshold.dtype)
            if need_b or need_p:
                s_dh = S[:, 0].contiguous()
                if need_b:
                    db = s_dh.to(ctx.b_dtype)
                if need_p:
                    dp = (-vecmat_f32(s_dh, W)).to(pre_bias.dtype)
        if dense:
            gemm = torch.float32 if x.dtype == torch.float32 else x.dtype
            dH = dH.to(gemm)
            if need_x:
                dx = (dH @ W.detach().to(gemm)).to(x.dtype).view(x.shape)
            if need_W:
                G = x.detach() if pre_bias is None else \
                    centered if centered is not None else x.detach() - pre_bias.detach().to(x.dtype)
                dW = (dH.t() @ G.reshape(B, -1).to(gemm)).to(W.dtype)
            return dx, dW, db, dt, dp, None, None, None, None, None, None, None, None
        if need_x:
            dx = kern.gather(row_ptr, col, dh, W, x.dtype).view(x.shape)
        if need_W and dW is None:
            dW = kern.feature_scatter(col, row, row_ptr, dh, _scatter_rows(x, pre_bias, centered), F, seg).to(W.dtype)
        return dx, dW, db, dt, dp, None, None, None, None, None, None, None, None


def _scatter_rows(x: torch.Tensor, pre_bias: Optional[torch.Tensor], centered: Optional[torch.Tensor]) -> torch.Tensor:
    """The rows dW_enc gathers: x − pre_bias (the encode's own when it kept it), rows contiguous."""
    G = x if pre_bias is None else centered if centered is not None else x.float() - pre_bias.float()
    return G if G.stride(-1) == 1 else G.contiguous()


def encode_codes(x: torch.Tensor, W: torch.Tensor, b: Optional[torch.Tensor], threshold: Optional[torch.Tensor],
                 pre_bias: Optional[torch.Tensor], row_ptr: torch.Tensor, row: Optional[torch.Tensor],
                 col: torch.Tensor, h: torch.Tensor, act: str, bandwidth: float, kernels: SparseKernels,
                 k: Optional[int] = None, centered: Optional[torch.Tensor] = None) -> SparseCodes:
    """The pattern (row_ptr [B+1] int64, row int64 [nnz] or None, col int32 [nnz], h fp32 [nnz]; sorted
    by (row, col)) of ``act(W (x − pre_bias) + b)`` → SparseCodes over W's F features, values in x's
    dtype and differentiable through ``kernels`` (see the module docstring). k: fixed row length.
    ``row`` None: the backward takes the rows from row_ptr where it needs them (the dense form, a
    backend whose scatter reads them); the extension's kernels read row_ptr alone.
    x: [B, d_in], or a [G, B', d_in] view whose rows (g, b') are the codes' B = G·B' rows in that
    order (a joined encode's layers, layer-major, without a copy; no pre_bias).
    ``centered``: x − pre_bias as the encode computed it (fp32 x only: then the same numbers as the
    backward's own), kept for dW_enc instead of a second subtraction."""
    if centered is not None and (pre_bias is None or x.dtype != torch.float32 or centered.dtype != torch.float32
                                 or centered.shape != x.shape):
        raise ValueError(f"centered: expected fp32 x − pre_bias of x's shape {tuple(x.shape)} with a pre_bias and "
                         f"fp32 x, got {tuple(centered.shape)} {centered.dtype} for x {x.dtype}")
    value = _SparseEncodeValue.apply(x, W, b, threshold, pre_bias, row_ptr, row, col, h, act, bandwidth, kernels,
                                     None if centered is None else centered.detach())
    return SparseCodes(row_ptr, col, value, W.shape[0], k)
