"""Reference sparse decode (SPEC §2, §7).

SAE / PLT:   ``y[b] = Σ_j value[j] · W_dec[index[j]] + b_dec``  with ``W_dec: [F, D]``.
             A [F, T, d] decoder (a CLT source's untied block) decodes as D = T·d.
Backward:    ``dvalue[j] = ⟨g[row(j)], W_dec[index[j]]⟩``, ``dW_dec[f] = Σ_{index[j]=f} value[j]·g[row(j)]``,
             through autograd here; the kernels compute the same grouped by feature.

CLT (``clt_decode``), codes of source s decoding into every target t ≥ s:
    none        W_dec: list of L tensors [F, L−s, d_out]; one gather of a contiguous block per entry
    per_source  W_dec: [L, F, d_out];   ŷ_t = Σ_{s≤t} W_dec[s]ᵀ g_t(a_s)
    per_target  W_dec: [L, F, d_out];   ŷ_t = W_dec[t]ᵀ Σ_{s≤t} g_t(a_s)
with the optional affine ``g_t(a) = (a + offset_t·1[a > 0])·scale_t`` (offset, scale: [L, F],
tied decoders only); ``g_t`` is the identity when no affine is given.
Accumulation is in fp32 (or fp64 for fp64 inputs); the output has W_dec's dtype.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

from fastclt.codes import SparseCodes

__all__ = ["sparse_decode", "clt_decode", "clt_decode_with", "feature_affine", "TYINGS"]

TYINGS = ("none", "per_source", "per_target")


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def sparse_decode(codes: SparseCodes, W_dec: torch.Tensor, b_dec: Optional[torch.Tensor] = None) -> torch.Tensor:
    """codes: CSR over B rows, W_dec: [F, D] (or [F, T, d]) → y: [B, D] (or [B, T, d]) in W_dec's dtype."""
    if not isinstance(codes, SparseCodes):
        raise TypeError(f"codes: expected SparseCodes, got {type(codes).__name__}")
    if W_dec.dim() < 2:
        raise ValueError(f"W_dec: expected [F, D] or [F, T, d], got shape {tuple(W_dec.shape)}")
    if codes.n_features is not None and codes.n_features != W_dec.shape[0]:
        raise ValueError(f"W_dec: codes have n_features={codes.n_features} but W_dec has {W_dec.shape[0]} rows")
    if codes.device != W_dec.device:
        raise ValueError(f"W_dec: on {W_dec.device}, but codes are on {codes.device}")
    tail = W_dec.shape[1:]
    W = W_dec.reshape(W_dec.shape[0], -1)
    acc = _acc_dtype(W.dtype)
    rows = codes.row_ids()
    contrib = codes.value.to(acc).unsqueeze(1) * W.index_select(0, codes.index.long()).to(acc)
    y = torch.zeros(codes.batch_size, W.shape[1], dtype=acc, device=W.device).index_add(0, rows, contrib)
    if b_dec is not None:
        if b_dec.shape != (W.shape[1],) and b_dec.shape != tail:
            raise ValueError(f"b_dec: expected shape {tuple(tail)}, got {tuple(b_dec.shape)}")
        y = y + b_dec.reshape(-1).to(acc)
    return y.to(W.dtype).view(codes.batch_size, *tail)


def feature_affine(codes: SparseCodes, offset: Optional[torch.Tensor], scale: Optional[torch.Tensor]) -> SparseCodes:
    """g(a) = (a + offset·1[a > 0])·scale at the codes' entries; offset, scale: [F] (either may be None).
    Computed in fp32 (fp64 for fp64 values): the values come back in that dtype, not rounded to bf16."""
    if offset is None and scale is None:
        return codes
    idx = codes.index.long()
    v = codes.value.to(_acc_dtype(codes.value.dtype))
    if offset is not None:
        v = v + offset[idx].to(v.dtype) * (v.detach() > 0).to(v.dtype)
    if scale is not None:
        v = v * scale[idx].to(v.dtype)
    return codes.with_value(v)


def clt_decode(codes: Sequence[SparseCodes], W_dec: Union[torch.Tensor, Sequence[torch.Tensor]], tying: str,
               b_dec: Optional[torch.Tensor] = None, feature_offset: Optional[torch.Tensor] = None,
               feature_scale: Optional[torch.Tensor] = None) -> torch.Tensor:
    """codes: L SparseCodes (source layers) → ŷ: [B, L, d_out] (no skip term; add it outside).

    W_dec: list of L [F, L−s, d_out] (tying "none") or [L, F, d_out] (tied);
    b_dec: [L, d_out] or None (None for AuxK: never add b_dec there);
    feature_offset / feature_scale: [L, F] per target layer (tied only) or None.
    """
    return clt_decode_with(sparse_decode, codes, W_dec, tying, b_dec, feature_offset, feature_scale)


def clt_decode_with(decode, codes: Sequence[SparseCodes], W_dec: Union[torch.Tensor, Sequence[torch.Tensor]],
                    tying: str, b_dec: Optional[torch.Tensor] = None, feature_offset: Optional[torch.Tensor] = None,
                    feature_scale: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``clt_decode`` built from ``decode(codes, W [F, D] or [F, T, d]) -> [B, D] or [B, T, d]``
    (this module's reference ``sparse_decode``, or a kernel's): L decodes for untied and plain
    per_source decoders, L(L+1)/2 with the feature affine or per_target tying. The decodes' results
    are summed in fp32 (fp64 for fp64 decoders) and rounded to W_dec's dtype once; the feature
    affine's values are fp32 (``feature_affine``)."""
    if tying not in TYINGS:
        raise ValueError(f"tying: expected one of {TYINGS}, got {tying!r}")
    L = len(codes)
    if L == 0:
        raise ValueError("codes: expected one SparseCodes per layer, got none")
    B = codes[0].batch_size
    affine = feature_offset is not None or feature_scale is not None
    if tying == "none":
        if affine:
            raise ValueError("feature_offset/feature_scale: only tied decoders take a feature affine")
        if len(W_dec) != L:
            raise ValueError(f"W_dec: expected {L} per-source tensors, got {len(W_dec)}")
        d_out = W_dec[0].shape[-1]
        parts = []
        for s in range(L):
            if W_dec[s].dim() != 3 or W_dec[s].shape[1] != L - s:
                raise ValueError(f"W_dec[{s}]: expected [F, {L - s}, d_out], got {tuple(W_dec[s].shape)}")
            parts.append(decode(codes[s], W_dec[s]))  # [B, L−s, d]
        y = _sum_shifted(parts, B, L, d_out)
    else:
        if not isinstance(W_dec, torch.Tensor) or W_dec.dim() != 3 or W_dec.shape[0] != L:
            shape = tuple(W_dec.shape) if isinstance(W_dec, torch.Tensor) else type(W_dec).__name__
            raise ValueError(f"W_dec: expected [L={L}, F, d_out] for tying {tying!r}, got {shape}")
        d_out = W_dec.shape[-1]
        # Layer views by unbind, not W_dec[s]: each W_dec[s] in a graph backpropagates a zero-filled
        # full [L, F, d] gradient (L·(L+1)/2 of them for per_target); unbind's backward stacks the
        # per-layer gradients once.
        Wl = W_dec.unbind(0)
        off = (lambda t: None) if feature_offset is None else (lambda t: feature_offset[t])
        sc = (lambda t: None) if feature_scale is None else (lambda t: feature_scale[t])
        if tying == "per_source" and not affine:
            # every target t ≥ s receives the same W_dec[s]ᵀ a_s: a prefix sum over sources
            per_source = torch.stack([decode(codes[s], Wl[s]) for s in range(L)], 1)
            y = per_source.cumsum(1, dtype=_acc_dtype(per_source.dtype)).to(per_source.dtype)
        else:
            acc_dtype = _acc_dtype(W_dec.dtype)
            outs = []
            for t in range(L):
                acc = None
                for s in range(t + 1):
                    W = Wl[s] if tying == "per_source" else Wl[t]
                    part = decode(feature_affine(codes[s], off(t), sc(t)), W).to(acc_dtype)
                    acc = part if acc is None else acc + part
                outs.append(acc.to(W_dec.dtype))
            y = torch.stack(outs, 1)
    if b_dec is not None:
        if b_dec.shape != (L, d_out):
            raise ValueError(f"b_dec: expected [{L}, {d_out}], got {tuple(b_dec.shape)}")
        y = y + b_dec.to(y.dtype)
    return y


def _sum_shifted(parts: list[torch.Tensor], B: int, L: int, d: int) -> torch.Tensor:
    """parts[s]: [B, L−s, d] → [B, L, d] with parts[s] added at targets s..L−1."""
    acc = _acc_dtype(parts[0].dtype)
    y = torch.zeros(B, L, d, dtype=acc, device=parts[0].device)
    for s, p in enumerate(parts):
        y = y + torch.nn.functional.pad(p.to(acc), (0, 0, s, 0))
    return y.to(parts[0].dtype)
