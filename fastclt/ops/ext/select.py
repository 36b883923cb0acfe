"""TopK and BatchTopK on the extension's kernels (impl "cpu" and "cuda"; docs/DESIGN.md §8).

    topk(h [B, F], k)                 fastclt::topk (csrc/cpu/select_cpu.cpp topk; csrc/cuda/select_kernels.cu)
    batch_topk(h [B, F], k)           fastclt::batch_topk (CPU: block-maximum bound + filter; CUDA:
    batch_topk_layers(h [L, B, F], k)   ``batch_topk_radix``, histogram passes + one compaction)

Same results as the reference (``fastclt.ops.reference.select``) with ties broken by the lowest
(flat) index. With ``shards`` (features sharded over a process group) the local work is the same
kernels: per-row candidates from ``fastclt::topk``, histograms from ``fastclt::batch_topk_histogram``
and the compaction from ``fastclt::batch_topk_compact`` (``fastclt.ops.sharded`` runs the protocol).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch.autograd.function import once_differentiable

from fastclt.codes import SparseCodes
from fastclt.ops import sharded
from fastclt.ops.ext._common import ops
from fastclt.ops.radix import AllReduce, BatchTopKThreshold, key_bits, radix_threshold, to_threshold

__all__ = ["topk", "batch_topk", "batch_topk_layers", "batch_topk_per_layer", "topk_entries", "batch_topk_threshold",
           "batch_topk_compact", "batch_topk_radix", "sharded_batch_topk_entries"]


# --------------------------------------------------------------------------------------- TopK
class _TopK(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, k):
        index, value = ops().topk(h, k)
        ctx.save_for_backward(index, value)
        ctx.n_features = h.shape[1]
        ctx.mark_non_differentiable(index)
        ctx.set_materialize_grads(False)  # no zero-filled gradient for the indices
        return index, value

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_index, grad_value):
        if grad_value is None:
            return None, None
        index, value = ctx.saved_tensors
        # value = relu(h) at kept entries: the gradient passes where h > 0, i.e. where value > 0.
        grad_h = grad_value.new_zeros(index.shape[0], ctx.n_features)
        grad_h.scatter_(1, index.long(), grad_value * (value > 0))
        return grad_h, None


def topk(h: torch.Tensor, k: int, shards: Optional[sharded.Shards] = None) -> SparseCodes:
    """h: [B, F] fp32|bf16, 1 <= k <= F (over all shards) -> SparseCodes (ascending feature index).

    Keeps the k largest entries of each row (ties: lowest feature index), value = relu(h) there.
    Differentiable in h: dh = dvalue at the kept entries where h > 0, zero elsewhere. NaN in h is
    an error."""
    if shards is not None:
        return sharded.codes_at(h, *topk_entries(h.detach(), k, shards))
    index, value = _TopK.apply(h.contiguous(), k)
    return SparseCodes.from_topk(index, value, h.shape[1])


def topk_entries(h: torch.Tensor, k: int, shards: sharded.Shards) -> tuple[torch.Tensor, torch.Tensor]:
    """h: [B, F_local] (no grad) → (row_ptr, local column int64) of this rank's share of the per-row
    top k over all shards: candidates from the kernel, merged by ``sharded.row_topk``."""
    B, Fl = h.shape
    kl = min(k, Fl)
    if kl > 0 and B > 0:
        index = ops().topk(h.contiguous(), kl)[0].long()
        values = h.gather(1, index)  # h itself, not relu(h): the order of negative entries matters
    else:
        index = torch.zeros(B, kl, dtype=torch.int64, device=h.device)
        values = h.new_zeros(B, kl)
    return sharded.row_topk(values, index, k, Fl, shards)


# ---------------------------------------------------------------------------------- BatchTopK
def batch_topk_threshold(h: torch.Tensor, k_total: int, all_reduce: Optional[AllReduce] = None,
                         digit_bits: Optional[int] = None) -> BatchTopKThreshold:
    """h: [...] fp32|bf16 (contiguous), k_total: entries to keep -> BatchTopKThreshold.

    Exact radix select (``radix.radix_threshold``) over the extension's histogram op: each pass
    histograms the next ``digit_bits`` of the keys that match the prefix found so far (fp32: 32 key
    bits, bf16: the top 16, which decide its value), so fp32 takes 2 passes of 16 bits on the CPU
    and 4 of 8 bits on CUDA. ``all_reduce(counts int64) -> counts`` sums each histogram over
    tensor-parallel ranks (identity by default), so every rank finds the same global threshold
    without gathering data: one all-reduce per pass. NaN in h is an error.
    """
    if digit_bits is None:
        digit_bits = 16 if h.device.type == "cpu" else 8
    if k_total == 0:
        return BatchTopKThreshold(0xFFFFFFFF, 0, 0, 0, 0)
    total_bits = key_bits(h.dtype)
    cut = radix_threshold(histogram_of([h]), [k_total], total_bits, digit_bits, all_reduce, h.device)[0]
    return to_threshold(cut, total_bits)


def histogram_of(groups: list):
    """``radix_threshold``'s histogram from the extension's op, one call per group tensor."""
    fastclt_ops = ops()

    def histogram(prefixes, bits, step):
        return torch.stack([fastclt_ops.batch_topk_histogram(g, p, bits, step) for g, p in zip(groups, prefixes)])
    return histogram


def batch_topk_compact(h: torch.Tensor, threshold: BatchTopKThreshold, equal_offset: int = 0):
    """h: [..., F] -> (row_ptr int64 [R+1], index int32 [nnz], value [nnz]) over the R = numel/F rows.

    Keeps the entries with key > threshold.key and the threshold-equal ones of global rank
    < threshold.n_take; ``equal_offset`` is the global rank of this rank's first threshold-equal
    entry (0 on one device; with tensor parallelism, the sum of n_equal_local over earlier ranks:
    ties then go to the lowest rank, then the lowest flat index). value = relu(h)."""
    take = max(0, min(threshold.n_take - equal_offset, threshold.n_equal_local))
    return ops().batch_topk_compact(h, threshold.key, 0, take, threshold.n_greater_local + take)


def batch_topk_radix(h: torch.Tensor, k_total: int):
    """``torch.ops.fastclt.batch_topk`` by radix select: ``batch_topk_threshold`` (histogram passes)
    then one ``batch_topk_compact`` — the op's CUDA kernel (registered by ``fastclt._ext``), which
    runs wherever the histogram and compact ops do. Same result as the CPU kernel's bound + filter."""
    if isinstance(k_total, bool) or not isinstance(k_total, int) or not 0 <= k_total <= h.numel():
        raise ValueError(f"batch_topk: k_total must be in [0, h.numel()={h.numel()}], got {k_total}")
    if h.dim() < 2:
        raise RuntimeError(f"fastclt::batch_topk: h must have at least 2 dims [..., F], got shape {tuple(h.shape)}")
    return batch_topk_compact(h, batch_topk_threshold(h, k_total))


def _compact_cut(g: torch.Tensor, cut, equal_offset: int, take: int):
    """``sharded.batch_topk``'s compaction: the extension's, at a cut over ``key_bits`` of g's dtype."""
    return batch_topk_compact(g, to_threshold(cut, key_bits(g.dtype)), equal_offset)[:2]


def sharded_batch_topk_entries(h: torch.Tensor, k: int, across_layers: bool, shards: sharded.Shards) -> list:
    """h: [L, B, F_local] (no grad) → per layer (row_ptr, col int32) of this rank's kept entries
    (``sharded.batch_topk_entries`` on the extension's histogram and compaction)."""
    return sharded.batch_topk_entries(h, k, across_layers, histogram_of, _compact_cut, shards)


class _BatchTopK(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, k_total):
        # CPU: block-maximum bound + filter (csrc/cpu/select_cpu.cpp); CUDA: batch_topk_radix
        row_ptr, index, value = ops().batch_topk(h, k_total)
        ctx.save_for_backward(row_ptr, index, value)
        ctx.shape = h.shape
        ctx.mark_non_differentiable(row_ptr, index)
        ctx.set_materialize_grads(False)  # no zero-filled gradients for row_ptr and index
        return row_ptr, index, value

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_row_ptr, grad_index, grad_value):
        if grad_value is None:
            return None, None
        row_ptr, index, value = ctx.saved_tensors
        n_features = ctx.shape[-1]
        flat = SparseCodes.rows_of(row_ptr, index.shape[0]) * n_features + index.long()
        grad_h = grad_value.new_zeros(ctx.shape.numel())
        grad_h.index_put_((flat,), grad_value * (value > 0))
        return grad_h.view(ctx.shape), None


def _sharded_codes(h: torch.Tensor, k: int, across_layers: bool, shards: sharded.Shards) -> list:
    parts = sharded_batch_topk_entries(h.detach(), k, across_layers, shards)
    return [sharded.codes_at(h_l, row_ptr, col) for h_l, (row_ptr, col) in zip(h.unbind(0), parts)]


def batch_topk(h: torch.Tensor, k: int, shards: Optional[sharded.Shards] = None) -> SparseCodes:
    """h: [B, F] fp32|bf16, 1 <= k <= F -> SparseCodes with exactly k*B entries (CSR, rows by token).

    Keeps the k*B largest entries of the whole batch (ties: lowest flat index), value = relu(h).
    Differentiable in h like ``topk``. NaN in h is an error."""
    if shards is not None:
        return _sharded_codes(h[None], k, False, shards)[0]
    B, F = h.shape
    row_ptr, index, value = _BatchTopK.apply(h.contiguous(), k * B)
    return SparseCodes(row_ptr, index, value, F)


def batch_topk_layers(h: torch.Tensor, k: int, shards: Optional[sharded.Shards] = None) -> list[SparseCodes]:
    """h: [L, B, F] fp32|bf16 -> L SparseCodes holding exactly k*B*L entries in all (across layers).

    One selection over all layers together (a CLT's "across layers" BatchTopK): the k*B*L largest
    entries of h (ties: lowest flat index in [L, B, F] order), value = relu(h). Layer l's codes are
    views into one CSR over the L*B rows."""
    if shards is not None:
        return _sharded_codes(h, k, True, shards)
    L, B, F = h.shape
    row_ptr, index, value = _BatchTopK.apply(h.contiguous(), k * B * L)
    return [SparseCodes(*layer, F) for layer in sharded.split_layers(row_ptr, L, B, index, value)]


def batch_topk_per_layer(h: torch.Tensor, k: int, shards: sharded.Shards) -> list[SparseCodes]:
    """h: [L, B, F/n] → L codes, BatchTopK of k·B per layer over all shards (one radix select)."""
    return _sharded_codes(h, k, False, shards)
