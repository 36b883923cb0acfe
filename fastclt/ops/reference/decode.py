"""Reference sparse decode (docs/DESIGN.md §2, §7).

SAE / PLT:   ``y[b] = Σ_j value[j] · W_dec[index[j]] + b_dec``  with ``W_dec: [F, D]``.
             A [F, T, d] decoder (a CLT source's untied block) decodes as D = T·d.
Backward:    ``dvalue[j] = ⟨g[row(j)], W_dec[index[j]]⟩``, ``dW_dec[f] = Σ_{index[j]=f} value[j]·g[row(j)]``,
             through autograd here; the kernels compute the same grouped by feature.
Accumulation is in fp32 (or fp64 for fp64 inputs); the output has W_dec's dtype.
"""
from __future__ import annotations

from typing import Optional

import torch

from fastclt.codes import SparseCodes

__all__ = ["sparse_decode", "acc_dtype"]


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulation dtype of a decode: fp64 for fp64 inputs, fp32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def sparse_decode(codes: SparseCodes, W_dec: torch.Tensor, b_dec: Optional[torch.Tensor] = None) -> torch.Tensor:
    """codes: CSR over B rows, W_dec: [F, D] (or [F, T, d]) → y: [B, D] (or [B, T, d]) in W_dec's dtype."""
    tail = W_dec.shape[1:]
    W = W_dec.reshape(W_dec.shape[0], -1)
    acc = acc_dtype(W.dtype)
    rows = codes.row_ids()
    contrib = codes.value.to(acc).unsqueeze(1) * W.index_select(0, codes.index.long()).to(acc)
    y = torch.zeros(codes.batch_size, W.shape[1], dtype=acc, device=W.device).index_add(0, rows, contrib)
    if b_dec is not None:
        y = y + b_dec.reshape(-1).to(acc)
    return y.to(W.dtype).view(codes.batch_size, *tail)
