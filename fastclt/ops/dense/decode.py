"""Sparse decode in its dense formulation (impl "dense"; docs/DESIGN.md §17).

    y = A W_dec + b_dec          A: the codes as a dense [B, F] tensor (``dense_codes``)
    dA = G W_decᵀ → dvalue = dA at the entries;   dW_dec = Aᵀ G;   db_dec = Σ_b G

Three GEMMs of B·F·D instead of gathers of nnz rows: faster above the crossover density. The GEMM
runs in W_dec's dtype (fp32 accumulation for bf16/fp16, as cuBLAS and the CPU BLAS do), so a bf16
decoder takes bf16 values (fp32 values with a bf16 decoder: the GEMM in fp32); the output has W_dec's
dtype. Memory: A and dA, [B, F] each.

``sparse_decode_blocks`` is the dense form of a decode by feature blocks (the Matryoshka prefix
decodes, fastclt/ops/prefix_decode.py): with block edges 0 = m_0 < m_1 < … < m_G = F,

    blocks[g] = A[:, m_{g-1}:m_g] W_dec[m_{g-1}:m_g]          [G, B, D]

G GEMMs on column slices of the one A (together the FLOPs and memory of one full decode); the
backward gathers the slices' gradients into one dA (``split``, not G zero-filled copies).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from fastclt.codes import SparseCodes
from fastclt.ops.dense._common import dense_codes, gemm_dtype

__all__ = ["sparse_decode", "sparse_decode_blocks"]


def sparse_decode(codes: SparseCodes, W_dec: torch.Tensor, b_dec: Optional[torch.Tensor] = None) -> torch.Tensor:
    """codes: CSR over B rows, W_dec: [F, D] (or [F, T, d]) → y: [B, D] (or [B, T, d]) in W_dec's dtype."""
    tail = W_dec.shape[1:]
    F = W_dec.shape[0]
    W = W_dec.reshape(F, -1)
    dt = gemm_dtype(codes.dtype, W.dtype)
    A = dense_codes(codes, F, dt)
    W = W.to(dt)
    y = A @ W if b_dec is None else torch.addmm(b_dec.reshape(-1).to(dt), A, W)
    return y.to(W_dec.dtype).view(codes.batch_size, *tail)


def sparse_decode_blocks(codes: SparseCodes, W_dec: torch.Tensor, bounds: Sequence[int]) -> torch.Tensor:
    """codes over B rows, W_dec: [F, D] (or [F, T, d]), block edges ``bounds`` [0, m_1, …, F] →
    [G, B, D] (or [G, B, T, d]) in W_dec's dtype: block g decodes the features m_{g-1} ≤ i < m_g."""
    tail = W_dec.shape[1:]
    F = W_dec.shape[0]
    sizes = [hi - lo for lo, hi in zip(bounds[:-1], bounds[1:])]
    dt = gemm_dtype(codes.dtype, W_dec.dtype)
    A = dense_codes(codes, F, dt).split(sizes, 1)
    W = W_dec.reshape(F, -1).to(dt).split(sizes, 0)
    y = torch.stack([a @ w for a, w in zip(A, W)])
    return y.to(W_dec.dtype).view(len(sizes), codes.batch_size, *tail)
