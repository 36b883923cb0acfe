"""Reference selections (docs/DESIGN.md §3, §8): TopK per token and BatchTopK per batch, ReLU applied.

    topk(h [B, F], k)                 → codes with exactly k entries per row
    batch_topk(h [B, F], k)           → codes with exactly k·B entries over the whole batch
    batch_topk_layers(h [L, B, F], k) → L codes with exactly k·B·L entries over all layers together

Kept values are ``relu(h)`` at the kept entries; gradients reach h at those entries only.
Ties at the cut are broken by ``torch.topk`` (arbitrarily: any consistent rule is correct); the
count is exact.

With ``shards`` (features sharded over the ranks of a process group, ``fastclt.ops.sharded``),
h holds this rank's features and the codes this rank's share of the global selection: TopK from
``torch.topk`` candidates, BatchTopK by radix select over torch histograms and a chunked
compaction (``torch_histogram``, ``compact_chunked``: extra memory O(CHUNK + kept entries)). This
path takes every float dtype.
"""
from __future__ import annotations

from typing import Optional

import torch

from fastclt.codes import SparseCodes
from fastclt.ops import sharded
from fastclt.ops.radix import float_keys, key_bits, unsigned_keys

__all__ = ["topk", "batch_topk", "batch_topk_layers", "batch_topk_per_layer", "torch_histogram", "compact_chunked",
           "CHUNK"]

# Elements of h whose keys the sharded path makes at a time (its temporaries: ~20 bytes each).
CHUNK = 1 << 22


def topk(h: torch.Tensor, k: int, shards: Optional[sharded.Shards] = None) -> SparseCodes:
    """h: [B, F] → SparseCodes with k entries per row (``codes.k == k``)."""
    if shards is not None:
        kl = min(k, h.shape[1])
        values, idx = torch.topk(h.detach(), kl, dim=1)  # every global winner of this shard is among them
        return sharded.codes_at(h, *sharded.row_topk(values, idx, k, h.shape[1], shards))
    _, idx = torch.topk(h.detach(), k, dim=1, sorted=False)
    return SparseCodes.from_topk(idx, torch.relu(h.gather(1, idx)), h.shape[1])


def _flat_topk_to_codes(flat: torch.Tensor, keep: int, B: int, F: int, n_layers: int) -> list[SparseCodes]:
    _, idx = torch.topk(flat.detach(), keep, sorted=False)
    idx, _ = torch.sort(idx)  # layer-major, then row-major: CSR order
    value = torch.relu(flat[idx])
    col = (idx % F).to(torch.int32)
    # each row's first entry by binary search in the sorted flat indices: nothing is read back from the
    # device (a single layer's selection can be captured in a CUDA graph, fastclt.ops.capturable)
    bounds = torch.searchsorted(idx, torch.arange(n_layers * B + 1, device=flat.device, dtype=torch.int64) * F)
    if n_layers == 1:
        return [SparseCodes(bounds, col, value, F)]
    layer_ends = bounds[::B].tolist()  # across layers, a layer's share varies: its bounds are read
    return [SparseCodes(bounds[l * B:(l + 1) * B + 1] - layer_ends[l], col[layer_ends[l]:layer_ends[l + 1]],
                        value[layer_ends[l]:layer_ends[l + 1]], F) for l in range(n_layers)]


def batch_topk(h: torch.Tensor, k: int, shards: Optional[sharded.Shards] = None) -> SparseCodes:
    """h: [B, F] → SparseCodes with exactly k·B entries, the largest of the whole batch."""
    if shards is not None:
        return _sharded_batch_topk(h[None], k, False, shards)[0]
    B, F = h.shape
    if B == 0:
        return SparseCodes(torch.zeros(1, dtype=torch.int64, device=h.device),
                           torch.zeros(0, dtype=torch.int32, device=h.device), h.new_zeros(0), F)
    return _flat_topk_to_codes(h.reshape(-1), k * B, B, F, 1)[0]


def batch_topk_layers(h: torch.Tensor, k: int, shards: Optional[sharded.Shards] = None) -> list[SparseCodes]:
    """h: [L, B, F] → L SparseCodes holding exactly k·B·L entries over all layers together
    (BatchTopK "across layers"); a layer may keep more or fewer than k·B."""
    if shards is not None:
        return _sharded_batch_topk(h, k, True, shards)
    L, B, F = h.shape
    if B == 0:
        return [batch_topk(h[l], k) for l in range(L)]
    return _flat_topk_to_codes(h.reshape(-1), k * B * L, B, F, L)


# ------------------------------------------------------------------------------------ sharded
def batch_topk_per_layer(h: torch.Tensor, k: int, shards: sharded.Shards) -> list[SparseCodes]:
    """h: [L, B, F/n] → L codes, BatchTopK of k·B per layer over all shards (one radix select for
    all layers: each pass one all-reduce)."""
    return _sharded_batch_topk(h, k, False, shards)


def _sharded_batch_topk(h: torch.Tensor, k: int, across: bool, shards: sharded.Shards) -> list[SparseCodes]:
    def make_histogram(groups):
        return torch_histogram([g.reshape(-1) for g in groups], key_bits(h.dtype))
    parts = sharded.batch_topk_entries(h, k, across, make_histogram, compact_chunked, shards)
    return [sharded.codes_at(h_l, row_ptr, col) for h_l, (row_ptr, col) in zip(h.unbind(0), parts)]


def _chunks(flat: torch.Tensor):
    for i in range(0, flat.shape[0], CHUNK):
        yield flat[i:i + CHUNK]


def _top_bits(u: torch.Tensor, total_bits: int) -> torch.Tensor:
    """Unsigned keys → their top ``total_bits`` (16 for bf16, whose low 16 key bits follow from the top)."""
    return u >> (32 - total_bits) & ((1 << total_bits) - 1) if total_bits < 32 else u


def torch_histogram(groups: list, total_bits: int):
    """``radix_threshold``'s histogram over 1-D tensors ``groups`` by torch ops, CHUNK elements at
    a time (memory O(CHUNK), not O(h)): the top ``total_bits`` of the unsigned order keys."""
    def histogram(prefixes, bits, step):
        nb = 1 << step
        out = torch.zeros(len(groups), nb + 1, dtype=torch.int64, device=groups[0].device)
        for g, flat in enumerate(groups):
            for part in _chunks(flat):
                nan = torch.isnan(part)
                u = _top_bits(unsigned_keys(part), total_bits)
                match = ~nan
                if bits > 0:
                    match &= ((u >> (total_bits - bits)) & ((1 << bits) - 1)) == prefixes[g]
                digit = (u >> (total_bits - bits - step)) & (nb - 1)
                out[g, :nb] += torch.bincount(digit[match], minlength=nb)
                out[g, nb] += nan.sum()
        return out
    return histogram


def compact_chunked(h2d: torch.Tensor, cut, equal_offset: int, take: int):
    """Rows of h2d [R, F] → (row_ptr int64 [R+1], col int32 [nnz]) of the entries above ``cut`` (a
    RadixCut over the top ``key_bits`` of the keys) and the first ``take`` cut-equal ones in flat
    order, rows of CHUNK elements at a time."""
    bits = key_bits(h2d.dtype)
    R, F = h2d.shape
    rows_per = max(1, CHUNK // max(F, 1))
    counts, cols = [], []
    equal_seen = 0
    for r0 in range(0, R, rows_per):
        part = h2d[r0:r0 + rows_per]
        if bits == 16:  # bf16: compare the top 16 key bits (they decide the value)
            keys, key = _top_bits(unsigned_keys(part), 16), cut.key
        else:
            keys, key = float_keys(part), cut.key - (1 << (bits - 1))
        keep = keys > key
        equal = keys == key
        if take > equal_seen:
            rank = equal.view(-1).cumsum(0).view(equal.shape) + equal_seen  # 1-based flat rank among equal keys
            keep |= equal & (rank <= take)
        equal_seen += int(equal.sum())
        counts.append(keep.sum(1))
        cols.append(keep.nonzero()[:, 1].to(torch.int32))
    row_ptr = torch.zeros(R + 1, dtype=torch.int64, device=h2d.device)
    if R:
        row_ptr[1:] = torch.cat(counts).cumsum(0)
    col = torch.cat(cols) if cols else torch.zeros(0, dtype=torch.int32, device=h2d.device)
    return row_ptr, col
