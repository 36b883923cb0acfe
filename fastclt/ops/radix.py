"""Exact selection by radix select on order-preserving integer keys (docs/DESIGN.md §8).

The **key** of a float is an integer with the same order: for fp32 the bits, with every bit of a
negative float inverted and the sign bit of a non-negative one set (as unsigned numbers), −0.0
folded onto +0.0 so that the two zeros tie. bf16 and fp16 are widened to fp32 exactly; a bf16
value is decided by the top 16 bits of its fp32 key, so its selections walk 16 key bits. fp64 has
64-bit keys. The C++/CUDA kernels compute the same key (csrc/cpu/checks.h, csrc/cuda/common.cuh);
``float_keys`` is its torch form.

``radix_threshold`` finds the k-th largest key of each of G groups from histograms of key digits,
top digit first: a pass histograms the next ``digit_bits`` of the keys that match the prefix found
so far, and the cut's digit is where the count of larger keys reaches k. The histograms come from a
backend (the extension's op, or torch ops over chunks); with tensor parallelism each pass's
histograms are summed over the ranks (one all-reduce per pass for all groups), so every rank finds
the same global cut without gathering data.
"""
from __future__ import annotations

import struct
from typing import Callable, NamedTuple, Optional

import torch

__all__ = ["float_keys", "unsigned_keys", "key_bits", "key_to_float", "RadixCut", "BatchTopKThreshold",
           "radix_threshold", "to_threshold", "ShardSelectionError", "AllReduce", "Histogram"]

AllReduce = Callable[[torch.Tensor], torch.Tensor]
# histogram(prefixes, prefix_bits, step) -> int64 [G, 2^step + 1] (the last column counts NaNs)
Histogram = Callable[[list, int, int], torch.Tensor]


# ---------------------------------------------------------------------------------------- keys
def float_keys(h: torch.Tensor) -> torch.Tensor:
    """h: float tensor → signed integer keys with the same order: int32 for fp32, bf16 and fp16
    (through fp32, exact), int64 for fp64. −0.0 is folded onto +0.0 (the two zeros tie, as in the
    extension's key), so every path counts the same entries at a cut of 0."""
    wide = h.dtype == torch.float64
    b = (h + 0.0 if wide else h.float() + 0.0).view(torch.int64 if wide else torch.int32)
    sign = b >> (63 if wide else 31)  # −1 for negative floats, else 0: flip their other bits
    sign &= 0x7FFFFFFFFFFFFFFF if wide else 0x7FFFFFFF
    b ^= sign
    return b


def unsigned_keys(h: torch.Tensor) -> torch.Tensor:
    """The keys with the sign bit flipped: as unsigned numbers (their bits), ordered like the values
    (for fp32: the extension's uint32 key, bit for bit)."""
    k = float_keys(h)
    k ^= torch.iinfo(k.dtype).min
    return k


def key_bits(dtype: torch.dtype) -> int:
    """The key bits a selection walks: the top 16 for bf16 (they decide its value), 64 for fp64,
    32 otherwise. Every backend walks the same bits, so shards on different backends agree."""
    if dtype == torch.bfloat16:
        return 16
    return 64 if dtype == torch.float64 else 32


def key_to_float(key: int) -> float:
    """The float whose order-preserving uint32 key is ``key`` (e.g. the BatchTopK threshold value)."""
    bits = key ^ 0x80000000 if key & 0x80000000 else ~key & 0xFFFFFFFF
    return struct.unpack("<f", struct.pack("<I", bits))[0]


# ------------------------------------------------------------------------------------ the cut
class RadixCut(NamedTuple):
    """One group's cut found by ``radix_threshold``, in the histogrammed key space: ``key`` (the
    k_total-th largest key, ``total_bits`` wide), the global ``n_greater`` / ``n_take`` (n_greater +
    n_take = k_total) and this rank's ``n_greater_local`` / ``n_equal_local``."""
    key: int
    n_greater: int
    n_take: int
    n_greater_local: int
    n_equal_local: int


class BatchTopKThreshold(NamedTuple):
    """Where the k_total-th largest entry lies, as the extension's uint32 key.

    ``key``: the threshold key (the k_total-th largest entry's). ``n_greater`` entries have a larger
    key and ``n_take`` of the threshold-equal ones are kept, so n_greater + n_take = k_total (global
    counts, over all ranks when the histograms were all-reduced). ``n_greater_local`` /
    ``n_equal_local``: the counts of larger / equal keys in this rank's h."""
    key: int
    n_greater: int
    n_take: int
    n_greater_local: int
    n_equal_local: int


def to_threshold(cut: RadixCut, total_bits: int) -> BatchTopKThreshold:
    """A cut over the top ``total_bits`` (16 or 32) bits of the uint32 key → the full uint32 key."""
    key = cut.key << (32 - total_bits)
    if total_bits == 16 and not key & 0x80000000:
        # A negative bf16's key has all 16 low bits set (the inverted zero bits of its fp32 form).
        key |= 0xFFFF
    return BatchTopKThreshold(key, cut.n_greater, cut.n_take, cut.n_greater_local, cut.n_equal_local)


class ShardSelectionError(RuntimeError):
    """A histogram of ``radix_threshold`` failed on some rank. Raised on every rank at the same
    collective (the failure travels in the all-reduced histogram), so no rank is left waiting."""


def radix_threshold(histogram: Histogram, k_totals: list, total_bits: int, digit_bits: int,
                    all_reduce: Optional[AllReduce] = None, device=None) -> list:
    """Exact k-th largest key of each of G groups by radix select, from the top digit down → G RadixCuts.

    ``histogram(prefixes, prefix_bits, step) -> int64 [G, 2^step + 1]``: per group g, the counts of
    the next ``step`` bits of the unsigned order keys whose top ``prefix_bits`` equal
    ``prefixes[g]``; the last column counts NaNs. ``all_reduce(counts) -> counts`` sums one int64
    tensor over the ranks holding the other shards of the same groups (None: one shard): one call
    per pass for all groups, the histograms plus a failure flag — a histogram that raises on one rank
    makes every rank raise ``ShardSelectionError`` at that pass instead of leaving the others
    waiting in a collective. ``device``: where the failure flag is made (the collective's device).
    NaN anywhere, or k_total above a group's entries, is a ValueError on every rank."""
    G = len(k_totals)
    prefixes = [0] * G
    remaining = torch.tensor(k_totals, dtype=torch.int64)
    n_greater = torch.zeros(G, dtype=torch.int64)
    n_greater_local = torch.zeros(G, dtype=torch.int64)
    rows = torch.arange(G)
    bits = 0
    local = counts = t = None
    while bits < total_bits:
        step = min(digit_bits, total_bits - bits)
        local, counts = _reduced_histogram(histogram, prefixes, bits, step, G, all_reduce, device)
        if bits == 0:
            if counts[:, -1].sum() > 0:
                raise ValueError(f"batch_topk: h contains NaN ({int(counts[:, -1].sum())} entries)")
            have = counts[:, :-1].sum(1)
            if bool((have < remaining).any()):
                g = int((have < remaining).nonzero()[0])
                raise ValueError(f"batch_topk: k_total={k_totals[g]} exceeds the {int(have[g])} entries of h"
                                 + (f" (group {g})" if G > 1 else ""))
        # at_least[g, t] = entries whose digit is >= t; the cut digit is the last t with
        # at_least[t] >= remaining (at_least is non-increasing)
        pad = torch.zeros(G, 1, dtype=torch.int64)
        at_least = torch.cat([counts[:, :-1].flip(1).cumsum(1).flip(1), pad], 1)
        local_at_least = torch.cat([local[:, :-1].flip(1).cumsum(1).flip(1), pad], 1)
        t = ((at_least[:, :-1] >= remaining[:, None]).sum(1) - 1).clamp_min(0)
        above = at_least[rows, t + 1]
        n_greater_local += local_at_least[rows, t + 1]
        n_greater += above
        remaining -= above
        prefixes = [(p << step) | int(d) for p, d in zip(prefixes, t)]
        bits += step
    n_equal_local = local[rows, t]
    return [RadixCut(prefixes[g], int(n_greater[g]), int(remaining[g]), int(n_greater_local[g]), int(n_equal_local[g]))
            for g in range(G)]


def _reduced_histogram(histogram, prefixes, bits, step, G, all_reduce, device):
    """(local, summed over ranks) histograms [G, 2^step + 1] on the CPU, failures agreed (above)."""
    if all_reduce is None:
        local = histogram(prefixes, bits, step).cpu()
        return local, local
    error = None
    try:
        local = histogram(prefixes, bits, step)
    except Exception as e:  # noqa: BLE001 — reported to every rank below, then raised
        error = e
        local = torch.zeros(G, (1 << step) + 1, dtype=torch.int64, device=device)
    flag = torch.full((1,), 0 if error is None else 1, dtype=torch.int64, device=local.device)
    summed = all_reduce(torch.cat([local.reshape(-1), flag])).cpu()
    if summed[-1] > 0:
        raise ShardSelectionError(f"batch_topk: a histogram failed on {int(summed[-1])} rank(s)"
                                  + (f": {type(error).__name__}: {error}" if error is not None else "")) from error
    return local.cpu(), summed[:-1].view(G, -1)
