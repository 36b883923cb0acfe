"""Matryoshka prefix decodes composed of the dispatched decodes (docs/DESIGN.md §15).

With prefix ends m_1 < … < m_G = F (``prefixes``) and m_0 = 0, prefix g reconstructs from the
features i < m_g alone:

    ŷ_g = b_dec + Σ_{i < m_g} a_i · W_dec[i]                              (SAE / PLT)
    ŷ_{g,t} = b_dec[t] + Σ_{s ≤ t} D^{s→t}(a_s restricted to i < m_g)     (CLT, every tying)

Nothing is decoded twice. ``split_codes(codes, bounds)`` splits the codes by feature block into G
row blocks (row g·B + b holds token b's entries with m_g ≤ i < m_{g+1}, in their original order,
with their global index, so the codes decode through the whole W_dec), and one call of the chosen
backend's ``sparse_decode`` / ``clt_decode`` decodes all of them with the whole decoder:
``blocks[g] = Σ_{m_{g-1} ≤ i < m_g} a_i · W_dec[i]``, [G, B, ...] (``matryoshka_blocks``,
``matryoshka_clt_blocks``). Its backward is one decode backward (every decoder-gradient row
written once). ``prefix_sums(blocks, bias)`` forms the G reconstructions (a cumulative sum, fp32
accumulation); the training loss takes the squared errors of every prefix from the op
``prefix_errors`` without forming them.

Where the codes are dense (at or above the decode's crossover density, ``fastclt.ops.density``, when
``impl`` is "auto"; or ``impl="dense"``) the blocks come from the dense formulation instead
(``fastclt.ops.dense``: G GEMMs on column slices of the one dense [B, F] codes; the same FLOPs and
memory as one dense decode). The density is that of the codes before the split: the G·B split rows
are G times sparser, and a dense decode of them would hold a [G·B, F] tensor.

``split_codes`` is plain PyTorch on any device: a bucketize of the indices, a counting sort of the
entries by block (positions from per-block running counts, O(nnz·G); no comparison sort) and
per-(block, row) counts; the rows stay token-major, so the result is a valid CSR; values are
gathered differentiably. No host sync.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

from fastclt.codes import SparseCodes
from fastclt.ops._checks import check_bounds, check_clt_decode, check_sparse_decode
from fastclt.ops.constants import on_device
from fastclt.ops.density import of_codes
from fastclt.ops.reference.decode import acc_dtype

__all__ = ["split_codes", "prefix_bounds", "prefix_sums", "matryoshka_blocks", "matryoshka_decode",
           "matryoshka_clt_blocks", "matryoshka_clt_decode"]


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
    edges = on_device(tuple(b[1:-1]), codes.index.dtype, device)
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


def prefix_bounds(prefixes: Sequence[int], n_features: int) -> list:
    """[0, m_1, …, m_G] from the prefix ends (checked: increasing, ending at ``n_features``)."""
    return check_bounds([0, *prefixes], n_features)


def prefix_sums(blocks: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """blocks: [G, ...] → [G, ...] with entry g = bias + Σ_{g' ≤ g} blocks[g'] (bias broadcast to
    blocks[0]), summed in fp32 (fp64 for fp64 blocks) and rounded to the blocks' dtype once."""
    y = blocks.cumsum(0, dtype=acc_dtype(blocks.dtype))
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y.to(blocks.dtype)


def _backend(op: str, impl: str, like: torch.Tensor, density: float) -> str:
    """The backend ``impl`` resolves to for ``op`` at the codes' ``density`` (before any split)."""
    from fastclt.ops._registry import resolve

    return resolve(op, impl, like.device, like.dtype, density=density)[0]


def matryoshka_blocks(codes: SparseCodes, W_dec: torch.Tensor, prefixes: Sequence[int], *,
                      impl: str = "auto") -> torch.Tensor:
    """codes (B rows, F features), W_dec: [F, D] (or [F, T, d]) → [G, B, D] (or [G, B, T, d]), block g
    = Σ_{m_{g-1} ≤ i < m_g} a_i · W_dec[i] (no bias): one ``ops.sparse_decode`` of backend ``impl``, or
    the dense formulation's block GEMMs where that backend is "dense"."""
    from fastclt import ops

    if not isinstance(codes, SparseCodes):
        raise TypeError(f"codes: expected SparseCodes, got {type(codes).__name__}")
    check_sparse_decode(codes, W_dec, None)
    bounds = prefix_bounds(prefixes, W_dec.shape[0])
    backend = _backend("sparse_decode", impl, W_dec, of_codes([codes], W_dec.shape[0]))
    if backend == "dense":
        from fastclt.ops.dense.decode import sparse_decode_blocks

        return sparse_decode_blocks(codes, W_dec, bounds)
    y = ops.sparse_decode(split_codes(codes, bounds), W_dec, impl=backend)
    return y.view(len(bounds) - 1, codes.batch_size, *y.shape[1:])


def matryoshka_decode(codes: SparseCodes, W_dec: torch.Tensor, prefixes: Sequence[int],
                      b_dec: Optional[torch.Tensor] = None, *, impl: str = "auto") -> torch.Tensor:
    """codes, W_dec: [F, D] → [G, B, D]: every prefix reconstruction (b_dec: [D] or None)."""
    return prefix_sums(matryoshka_blocks(codes, W_dec, prefixes, impl=impl), b_dec)


def matryoshka_clt_blocks(codes: Sequence[SparseCodes], W_dec: Union[torch.Tensor, Sequence[torch.Tensor]],
                          tying: str, prefixes: Sequence[int], feature_offset: Optional[torch.Tensor] = None,
                          feature_scale: Optional[torch.Tensor] = None, *, impl: str = "auto") -> torch.Tensor:
    """L codes (one per source layer) → [G, B, L, d_out], block g decoding the features
    m_{g-1} ≤ i < m_g of every source layer (no bias): one ``ops.clt_decode`` of backend ``impl``, or
    the dense formulation's block GEMMs where that backend is "dense". Arguments as ``fastclt.ops.clt_decode``."""
    from fastclt import ops

    if isinstance(codes, SparseCodes) or not len(codes):
        raise TypeError("codes: expected a list of one SparseCodes per source layer")
    check_clt_decode(codes, W_dec, tying, None, feature_offset, feature_scale)
    like = W_dec if isinstance(W_dec, torch.Tensor) else W_dec[0]
    F = W_dec.shape[1] if isinstance(W_dec, torch.Tensor) else W_dec[0].shape[0]
    bounds = prefix_bounds(prefixes, F)
    backend = _backend("clt_decode", impl, like, of_codes(codes, F))
    if backend == "dense":
        from fastclt.ops.dense.clt_decode import clt_decode_blocks

        return clt_decode_blocks(codes, W_dec, tying, bounds, feature_offset, feature_scale)
    y = ops.clt_decode([split_codes(c, bounds) for c in codes], W_dec, tying, None, feature_offset, feature_scale,
                       impl=backend)
    return y.view(len(bounds) - 1, codes[0].batch_size, *y.shape[1:])


def matryoshka_clt_decode(codes: Sequence[SparseCodes], W_dec: Union[torch.Tensor, Sequence[torch.Tensor]],
                          tying: str, prefixes: Sequence[int], b_dec: Optional[torch.Tensor] = None,
                          feature_offset: Optional[torch.Tensor] = None,
                          feature_scale: Optional[torch.Tensor] = None, *, impl: str = "auto") -> torch.Tensor:
    """L codes → [G, B, L, d_out]: every prefix reconstruction of a CLT (b_dec: [L, d_out] or None)."""
    return prefix_sums(matryoshka_clt_blocks(codes, W_dec, tying, prefixes, feature_offset, feature_scale,
                                             impl=impl), b_dec)
