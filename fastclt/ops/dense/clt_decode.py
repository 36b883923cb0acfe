"""CLT decode in its dense formulation (impl "dense"; docs/DESIGN.md §2.1, §17).

Each source's codes become one dense A_s: [B, F] (``dense_codes``), then GEMMs:

    none        ŷ_t = Σ_{s≤t} A_s W_dec^s[:, t−s]       one GEMM per source: A_s @ W_dec^s viewed [F, (L−s)·d]
    per_source  ŷ_t = Σ_{s≤t} g_t(A_s) W_dec[s]          without the affine: one GEMM per source and a prefix sum
    per_target  ŷ_t = (Σ_{s≤t} g_t(A_s)) W_dec[t]        one GEMM per target

with ``g_t(A) = (A + offset_t·1[A > 0])·scale_t`` (zero where there is no entry, as the sparse affine)
folded into the decoder rows instead of the [B, F] codes: ``g_t(A) W = A (scale_t ⊙ W) + 1[A > 0]
((offset_t·scale_t) ⊙ W)``, and for per_target the sums over sources are prefix sums of A_s and of
1[A_s > 0]. Results are summed in fp32 (fp64 for fp64 decoders) and rounded to W_dec's dtype once,
as the reference's. Memory: O(L) dense [B, F] tensors (codes, masks, prefix sums) and their gradients.

``clt_decode_blocks`` decodes by feature blocks (the Matryoshka prefix decodes, fastclt/ops/prefix_decode.py):
with block edges 0 = m_0 < … < m_G = F, block g is the decode of the features m_{g-1} ≤ i < m_g of every
source, [G, B, L, d_out]: every GEMM above split into G GEMMs on column slices of the same dense
tensors and row slices of the decoder (together the FLOPs and memory of one decode).
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

from fastclt.codes import SparseCodes
from fastclt.ops.dense._common import dense_codes, gemm_dtype
from fastclt.ops.dense.decode import sparse_decode, sparse_decode_blocks
from fastclt.ops.reference.clt_decode import clt_decode_with
from fastclt.ops.reference.decode import acc_dtype

__all__ = ["clt_decode", "clt_decode_blocks"]


def clt_decode(codes: Sequence[SparseCodes], W_dec: Union[torch.Tensor, Sequence[torch.Tensor]], tying: str,
               b_dec: Optional[torch.Tensor] = None, feature_offset: Optional[torch.Tensor] = None,
               feature_scale: Optional[torch.Tensor] = None, skip_empty: bool = False) -> torch.Tensor:
    """Same arguments and result as ``fastclt.ops.clt_decode`` (``skip_empty`` is a permission this
    implementation does not use: its sources' GEMMs run whatever their codes hold)."""
    return _decode(codes, W_dec, tying, b_dec, feature_offset, feature_scale, None)


def clt_decode_blocks(codes: Sequence[SparseCodes], W_dec: Union[torch.Tensor, Sequence[torch.Tensor]], tying: str,
                      bounds: Sequence[int], feature_offset: Optional[torch.Tensor] = None,
                      feature_scale: Optional[torch.Tensor] = None) -> torch.Tensor:
    """As ``clt_decode`` without a bias, by the feature blocks of the edges ``bounds`` [0, m_1, …, F]:
    [G, B, L, d_out], block g decoding the features m_{g-1} ≤ i < m_g of every source."""
    return _decode(codes, W_dec, tying, None, feature_offset, feature_scale, bounds)


def _decode(codes, W_dec, tying, b_dec, feature_offset, feature_scale, bounds) -> torch.Tensor:
    """The decode ([B, L, d_out]), or by feature blocks when ``bounds`` is given ([G, B, L, d_out])."""
    affine = feature_offset is not None or feature_scale is not None
    if tying == "none" or (tying == "per_source" and not affine):
        # one dense decode per source
        decode = sparse_decode if bounds is None else (lambda c, W: sparse_decode_blocks(c, W, bounds))
        return clt_decode_with(decode, codes, W_dec, tying, b_dec)
    sizes = None if bounds is None else [hi - lo for lo, hi in zip(bounds[:-1], bounds[1:])]

    def gemm(a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """a [B, F] @ w [F, d] → [B, d], or [G, B, d] over the feature blocks."""
        if sizes is None:
            return a @ w
        return torch.stack([x @ v for x, v in zip(a.split(sizes, 1), w.split(sizes, 0))])

    L, F = len(codes), W_dec.shape[1]
    acc = acc_dtype(W_dec.dtype)
    dt = gemm_dtype(codes[0].dtype, W_dec.dtype)
    A = [dense_codes(c, F, dt) for c in codes]
    # 1[a > 0] as GEMM operands (no gradient): the offset's codes
    M = [(a.detach() > 0).to(dt) for a in A] if feature_offset is not None else None
    Wl = W_dec.unbind(0)  # layer views: one stacked gradient in the backward, not L zero-filled ones

    def scaled(W: torch.Tensor, t: int):
        """(scale_t ⊙ W, (offset_t·scale_t) ⊙ W or None): g_t folded into the decoder rows."""
        sc = None if feature_scale is None else feature_scale[t].to(acc)[:, None]
        Wa = W.to(acc)
        Ws = Wa if sc is None else Wa * sc
        Wo = None
        if feature_offset is not None:
            off = feature_offset[t].to(acc)[:, None]
            Wo = Wa * (off if sc is None else off * sc)
        return Ws.to(dt), None if Wo is None else Wo.to(dt)

    outs = []
    P = N = None  # per_target: Σ_{s≤t} A_s and Σ_{s≤t} 1[A_s > 0]
    for t in range(L):
        if tying == "per_target":
            P = A[t] if P is None else P + A[t]
            if M is not None:
                N = M[t] if N is None else N + M[t]
            Ws, Wo = scaled(Wl[t], t)
            y_t = gemm(P, Ws).to(acc)
            if Wo is not None:
                y_t = y_t + gemm(N, Wo).to(acc)
        else:  # per_source with the affine: g_t folded into each source's rows
            y_t = None
            for s in range(t + 1):
                Ws, Wo = scaled(Wl[s], t)
                part = gemm(A[s], Ws).to(acc)
                if Wo is not None:
                    part = part + gemm(M[s], Wo).to(acc)
                y_t = part if y_t is None else y_t + part
        outs.append(y_t.to(W_dec.dtype))
    y = torch.stack(outs, -2)
    if b_dec is not None:
        y = y + b_dec.to(y.dtype)
    return y
