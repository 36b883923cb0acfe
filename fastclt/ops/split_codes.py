"""Split sparse codes by feature ranges into row blocks: the Matryoshka prefix blocks (docs/DESIGN.md §15).

    split_codes(codes, bounds) -> SparseCodes over G·B rows

with ``bounds = [0 = m_0 < m_1 < … < m_G = F]``: row g·B + b holds the entries of token b whose
feature i lies in [m_g, m_{g+1}), in their original order, with their global index i (so the codes
decode through the whole W_dec: one ``sparse_decode`` / ``clt_decode`` call gives all G block
decodes, [G·B, D] = [G, B, D], and its backward writes every decoder gradient row once). Values
are gathered differentiably (the backward scatters the value gradients back to the entries).

Plain PyTorch on any device: a bucketize of the indices, a counting sort of the entries by block
(positions from per-block running counts, O(nnz·G); no comparison sort) and per-(block, row)
counts; the rows stay token-major, so the result is a valid CSR. No host sync.
"""
from __future__ import annotations

from typing import Sequence, Union

import torch

from fastclt.codes import SparseCodes

__all__ = ["split_codes", "check_bounds"]


def check_bounds(bounds: Sequence[int], n_features: int) -> list:
    """``bounds`` as a list of ints 0 = m_0 < m_1 < … < m_G = n_features, or a ValueError naming it."""
    b = list(bounds)
    if (len(b) < 2 or any(isinstance(v, bool) or not isinstance(v, int) for v in b) or b[0] != 0
            or b[-1] != n_features or any(y <= x for x, y in zip(b, b[1:]))):
        raise ValueError(f"bounds: expected increasing ints 0 = m_0 < ... < m_G = n_features={n_features}, got {b}")
    return b


def split_codes(codes: SparseCodes, bounds: Sequence[int]) -> SparseCodes:
    """codes over B rows and F features, bounds [0, m_1, …, F] → SparseCodes over G·B rows (row
    g·B + b: token b's entries with m_g ≤ index < m_{g+1}), F features, global indices."""
    if not isinstance(codes, SparseCodes):
        raise TypeError(f"codes: expected SparseCodes, got {type(codes).__name__}")
    F = bounds[-1] if len(bounds) else 0
    if codes.n_features is not None and codes.n_features != F:
        raise ValueError(f"bounds: end at {F} but the codes have n_features={codes.n_features}")
    b = check_bounds(bounds, F)
    G, B, nnz, device = len(b) - 1, codes.batch_size, codes.nnz, codes.device
    if G == 1:
        return SparseCodes(codes.row_ptr, codes.index, codes.value, F)
    edges = torch.tensor(b[1:-1], dtype=codes.index.dtype, device=device)
    block = torch.bucketize(codes.index, edges, right=True)  # int64 [nnz]: m_g <= i < m_{g+1}
    onehot = torch.zeros(nnz, G, dtype=torch.int64, device=device)
    onehot.scatter_(1, block[:, None], 1)
    running = onehot.cumsum(0)  # running[j, g]: entries of block g up to and including j
    block_size = running[-1] if nnz else torch.zeros(G, dtype=torch.int64, device=device)
    block_start = torch.cumsum(block_size, 0) - block_size
    dest = block_start[block] + running.gather(1, block[:, None]).squeeze(1) - 1
    order = torch.empty_like(dest).scatter_(0, dest, torch.arange(nnz, device=device))
    per_row = torch.zeros(G * B, dtype=torch.int64, device=device).index_add_(
        0, block * B + codes.row_ids(), torch.ones_like(block))
    row_ptr = torch.zeros(G * B + 1, dtype=torch.int64, device=device)
    torch.cumsum(per_row, 0, out=row_ptr[1:])
    return SparseCodes(row_ptr, codes.index.index_select(0, order), codes.value.index_select(0, order), F)
