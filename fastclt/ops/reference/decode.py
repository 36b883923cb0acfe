"""Reference sparse decode (docs/DESIGN.md §2, §7).

SAE / PLT:   ``y[b] = Σ_j value[j] · W_dec[index[j]] + b_dec``  with ``W_dec: [F, D]``.
             A [F, T, d] decoder (a CLT source's untied block) decodes as D = T·d.
Backward:    ``dvalue[j] = ⟨g[row(j)], W_dec[index[j]]⟩``, ``dW_dec[f] = Σ_{index[j]=f} value[j]·g[row(j)]``,
             through autograd here; the kernels compute the same grouped by feature.
Accumulation is in fp32 (or fp64 for fp64 inputs); the output has W_dec's dtype.

The sum is PyTorch's ``embedding_bag`` (mode "sum", the values as per-sample weights): one bag per
row, no [nnz, D] tensor of gathered rows forward or backward, so the reference's memory stays
O(nnz + B·D + F·D) at any density — below the dense formulation's [B, F] (docs/DESIGN.md §17).
A bf16/fp16 decoder is widened to fp32 first (one [F, D] copy).
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
    B = codes.batch_size
    if B == 0 or codes.nnz == 0 or W.shape[1] == 0:
        # nothing to sum: an exact zero that keeps the graph to value and W (zero gradients)
        zero = W.reshape(-1)[:0].to(acc).sum() + codes.value[:0].to(acc).sum()
        y = W.new_zeros(B, W.shape[1], dtype=acc) + zero
    else:
        y = torch.nn.functional.embedding_bag(codes.index.long(), W.to(acc), codes.row_ptr, mode="sum",
                                              per_sample_weights=codes.value.to(acc), include_last_offset=True)
    if b_dec is not None:
        y = y + b_dec.reshape(-1).to(acc)
    return y.to(W.dtype).view(B, *tail)
