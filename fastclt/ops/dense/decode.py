"""Sparse decode in its dense formulation (impl "dense"; docs/DESIGN.md §15).

    y = A W_dec + b_dec          A: the codes as a dense [B, F] tensor (``dense_codes``)
    dA = G W_decᵀ → dvalue = dA at the entries;   dW_dec = Aᵀ G;   db_dec = Σ_b G

Three GEMMs of B·F·D instead of gathers of nnz rows: faster above the crossover density. The GEMM
runs in W_dec's dtype (fp32 accumulation for bf16/fp16, as cuBLAS and the CPU BLAS do), so a bf16
decoder takes bf16 values (fp32 values with a bf16 decoder: the GEMM in fp32); the output has W_dec's
dtype. Memory: A and dA, [B, F] each.
"""
from __future__ import annotations

from typing import Optional

import torch

from fastclt.codes import SparseCodes
from fastclt.ops.dense._common import dense_codes, gemm_dtype

__all__ = ["sparse_decode"]


def sparse_decode(codes: SparseCodes, W_dec: torch.Tensor, b_dec: Optional[torch.Tensor] = None) -> torch.Tensor:
    """codes: CSR over B rows, W_dec: [F, D] (or [F, T, d]) → y: [B, D] (or [B, T, d]) in W_dec's dtype."""
    tail = W_dec.shape[1:]
    F = W_dec.shape[0]
    W = W_dec.reshape(F, -1)
    dt = gemm_dtype(codes.value.dtype, W.dtype)
    A = dense_codes(codes, F, dt)
    W = W.to(dt)
    y = A @ W if b_dec is None else torch.addmm(b_dec.reshape(-1).to(dt), A, W)
    return y.to(W_dec.dtype).view(codes.batch_size, *tail)
