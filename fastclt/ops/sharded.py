"""Selections over features sharded across the ranks of a process group (docs/DESIGN.md §14).

With tensor parallelism each rank holds a contiguous block of every layer's features: rank r of n
holds features [r·F/n, (r+1)·F/n). The selection ops (``topk``, ``batch_topk``,
``batch_topk_layers``, ``encode``, ``encode_layers``, ``auxk_select``) take ``group=`` (the
process group of those ranks); they then select over all F features exactly as on one device and
return this rank's share of the result, with local feature indices. Every backend that takes a
group runs the same protocol below, with its own kernels for the local work, so ranks on different
backends still agree (the collectives have the same shapes and order):

    TopK        local candidates: each rank's k largest per row (fewer when it holds fewer than k
                features); one all-gather of their values [B, k] (indices stay local); the k largest
                of the n·k per row are kept, ties to the lowest rank, then the lowest index.
    BatchTopK   radix select (``fastclt.ops.radix``) over the key bits of h's dtype, DIGIT_BITS per
                pass, each pass's histograms of all G groups in one all-reduce; then one all-gather
                of the tie counts (ties at the cut go to the lowest rank, then the lowest flat
                index) and a compaction of this rank's kept entries. Extra memory O(kept entries):
                never keys or masks of all of h.
    AuxK        the global number of dead features in one all-reduce, then TopK over the dead
                features' pre-activations (k = min(k_aux, global dead count)).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.distributed as dist

from fastclt.codes import SparseCodes
from fastclt.ops.radix import RadixCut, key_bits, radix_threshold

__all__ = ["Shards", "as_shards", "DIGIT_BITS", "row_topk", "batch_topk", "batch_topk_entries", "split_layers",
           "codes_at"]

# Key bits per radix pass of a sharded BatchTopK: 4 passes for fp32, 2 for bf16, 8 for fp64.
DIGIT_BITS = 8


class Shards:
    """The ranks of ``group`` over which an op's features are sharded, and its collectives
    (on detached tensors: selections carry no gradient across ranks)."""

    def __init__(self, group) -> None:
        self.group = group
        self.size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        out = t.detach().clone()
        dist.all_reduce(out, group=self.group)
        return out

    def all_gather(self, t: torch.Tensor) -> torch.Tensor:
        """t: [...] → [size, ...] in rank order."""
        out = t.new_empty((self.size,) + tuple(t.shape))
        t = t.detach().contiguous()
        if hasattr(dist, "all_gather_into_tensor") and t.device.type == "cuda":
            dist.all_gather_into_tensor(out, t, group=self.group)
        else:
            dist.all_gather(list(out.unbind(0)), t, group=self.group)
        return out


def as_shards(group) -> Optional[Shards]:
    """``group`` (a torch.distributed process group, or None) → Shards (or None); a clear error
    when torch.distributed is not initialised."""
    if group is None:
        return None
    if isinstance(group, Shards):
        return group
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("group: a process group needs torch.distributed initialised "
                           "(torch.distributed.init_process_group, e.g. under torchrun)")
    return Shards(group)


# ------------------------------------------------------------------------------------- TopK
def row_topk(values: torch.Tensor, index: torch.Tensor, k: int, n_features: int,
             shards: Shards) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's candidates (values [B, kl] of h, index [B, kl] int64 local feature ids in
    [0, n_features), kl ≤ k: every entry of this shard that can be among the k largest of its row;
    its kl = min(k, n_features) largest per row) → (row_ptr int64 [B+1],
    local column int64 [nnz]) of the entries among the global k largest per row, ascending column
    within a row. Ties go to the lowest rank, then the lowest feature index."""
    B, kl = values.shape
    device = values.device
    index, order = index.sort(1)  # ascending index: the stable sort below then breaks ties by index
    values = values.detach().gather(1, order)
    pad = k - kl
    if pad:
        values = torch.cat([values, values.new_full((B, pad), float("-inf"))], 1)
        index = torch.cat([index, index.new_zeros(B, pad)], 1)
    every = shards.all_gather(values).permute(1, 0, 2).reshape(B, shards.size * k)  # [B, n·k], rank-major
    top = torch.sort(every, dim=1, descending=True, stable=True).indices[:, :k]
    mine = ((top // k) == shards.rank) & ((top % k) < kl)
    row_ptr = torch.zeros(B + 1, dtype=torch.int64, device=device)
    row_ptr[1:] = torch.cumsum(mine.sum(1), 0)
    cols = index.gather(1, top % k)[mine]
    rows = torch.arange(B, device=device)[:, None].expand(B, k)[mine]
    # within a row, ascending column (the CSR order of every selection)
    perm = torch.argsort(rows * max(n_features, 1) + cols)
    return row_ptr, cols[perm]


# -------------------------------------------------------------------------------- BatchTopK
# compact(group tensor [R, F_local], cut in the histogrammed key space, global rank of this rank's
# first tie, ties to take here) -> (row_ptr int64 [R + 1], col int32 [nnz])
Compact = Callable[[torch.Tensor, RadixCut, int, int], tuple]


def batch_topk(groups: list, k_total: int, histogram: Callable, compact: Compact,
               shards: Shards) -> list:
    """groups: G tensors [R, F_local] (one BatchTopK each, of k_total entries over all shards) →
    per group (row_ptr, col int32) of this rank's kept entries. ``histogram``: as
    ``radix.radix_threshold`` takes it, over the top ``key_bits(dtype)`` bits of the keys."""
    G, device = len(groups), groups[0].device
    cuts = radix_threshold(histogram, [k_total] * G, key_bits(groups[0].dtype), DIGIT_BITS, shards.sum, device)
    # ties: the lowest rank first; this rank's first tie has global rank Σ n_equal_local of lower ranks
    n_eq = shards.all_gather(torch.tensor([c.n_equal_local for c in cuts], dtype=torch.int64, device=device))
    before = n_eq[:shards.rank].sum(0).tolist() if shards.rank else [0] * G
    return [compact(g, c, b, max(0, min(c.n_take - b, c.n_equal_local))) for g, c, b in zip(groups, cuts, before)]


def batch_topk_entries(h: torch.Tensor, k: int, across_layers: bool, make_histogram: Callable, compact: Compact,
                       shards: Shards) -> list:
    """h: [L, B, F_local] → per layer (row_ptr, col int32) of this rank's kept entries of BatchTopK
    over all shards: k·B per layer, or k·B·L over all layers together when ``across_layers``.
    ``make_histogram(groups)``: the backend's histogram over the G group tensors [R, F_local]."""
    L, B, Fl = h.shape
    hd = h.detach().contiguous()
    groups = [hd.view(L * B, Fl)] if across_layers else list(hd.unbind(0))
    parts = batch_topk(groups, k * B * (L if across_layers else 1), make_histogram(groups), compact, shards)
    return split_layers(parts[0][0], L, B, parts[0][1]) if across_layers else parts


def codes_at(h: torch.Tensor, row_ptr: torch.Tensor, col: torch.Tensor) -> SparseCodes:
    """h [R, F] and kept entries (CSR row_ptr, col) → SparseCodes with value relu(h) there
    (differentiable in h)."""
    rows = SparseCodes.rows_of(row_ptr, col.shape[0])
    col = col.long()
    return SparseCodes(row_ptr, col.to(torch.int32), torch.relu(h[rows, col]), h.shape[1])


def split_layers(row_ptr: torch.Tensor, L: int, B: int, *entries: torch.Tensor, bounds: Optional[list] = None) -> list:
    """One CSR over L·B rows (layer-major) with per-entry tensors ``entries`` → per layer
    (row_ptr [B + 1], *entries of that layer) (views). ``bounds``: the L + 1 offsets where each layer
    starts, when the caller knows them (else read from row_ptr: a device sync)."""
    if bounds is None:
        bounds = row_ptr[::B].tolist() if B else [0] * (L + 1)
    return [(row_ptr[l * B:(l + 1) * B + 1] - bounds[l], *(e[bounds[l]:bounds[l + 1]] for e in entries))
            for l in range(L)]
