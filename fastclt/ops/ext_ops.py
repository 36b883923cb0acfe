"""fastclt._C kernels (C++ on the CPU, CUDA on GPUs) as functional ops with autograd.

Same names, arguments and results as the reference ops (``fastclt.ops.select``,
``fastclt.ops.decode``, ``.encode``, ``.auxk``); ``register_ext_impls()`` registers them as impl "cpu"
and "cuda" of "topk", "batch_topk", "batch_topk_layers", "sparse_decode", "clt_decode", "encode",
"encode_layers" and "auxk_select". The extension is imported on first
use, so this module imports (and registers) fine when it is not built.

Kernel math and algorithms: csrc/README.md.
"""
from __future__ import annotations

import struct
from typing import Callable, NamedTuple, Optional

import torch
from torch.autograd.function import once_differentiable

from fastclt.codes import SparseCodes

__all__ = [
    "topk", "batch_topk", "batch_topk_layers", "sparse_decode", "clt_decode", "encode", "encode_layers",
    "auxk_select",
    "batch_topk_threshold", "batch_topk_compact", "batch_topk_radix", "BatchTopKThreshold", "key_to_float",
    "radix_threshold", "RadixCut", "ShardSelectionError", "register_ext_impls",
]

AllReduce = Callable[[torch.Tensor], torch.Tensor]


def _ops():
    """torch.ops.fastclt, after loading fastclt._C (a clear error when it is not built)."""
    from fastclt import _ext

    if not _ext.build_info()["loaded"]:
        raise RuntimeError(_ext.missing_message("cpu"))
    return torch.ops.fastclt


KERNEL_DTYPES = (torch.float32, torch.bfloat16)


def _check_h(h: torch.Tensor, rank: int, layout: str) -> None:
    if not isinstance(h, torch.Tensor) or not h.is_floating_point():
        raise TypeError(f"h: expected a floating-point tensor {layout}, got {type(h).__name__}"
                        + (f" of dtype {h.dtype}" if isinstance(h, torch.Tensor) else ""))
    if h.dim() != rank:
        raise ValueError(f"h: expected {layout}, got shape {tuple(h.shape)}")


def _reference(module: str, op: str):
    """The pure-PyTorch op, for dtypes the kernels do not take (fp64, fp16)."""
    import importlib

    return getattr(importlib.import_module(f"fastclt.ops.{module}"), op)


def _check_k(k: int, n_features: int) -> None:
    """The reference ops' rule and messages: TypeError unless an int, ValueError unless 1 <= k <= F."""
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"k: expected an int, got {type(k).__name__}")
    if not 1 <= k <= n_features:
        raise ValueError(f"k: expected 1 <= k <= n_features={n_features}, got {k}")


# --------------------------------------------------------------------------------------- TopK
class _TopK(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, k):
        index, value = _ops().topk(h, k)
        ctx.save_for_backward(index, value)
        ctx.n_features = h.shape[1]
        ctx.mark_non_differentiable(index)
        return index, value

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_index, grad_value):
        index, value = ctx.saved_tensors
        # value = relu(h) at kept entries: the gradient passes where h > 0, i.e. where value > 0.
        grad_h = grad_value.new_zeros(index.shape[0], ctx.n_features)
        grad_h.scatter_(1, index.long(), grad_value * (value > 0))
        return grad_h, None


def topk(h: torch.Tensor, k: int) -> SparseCodes:
    """h: [B, F] fp32|bf16, 1 <= k <= F -> SparseCodes (k per row, ascending feature index).

    Keeps the k largest entries of each row (ties: lowest feature index), value = relu(h) there.
    Differentiable in h: dh = dvalue at the kept entries where h > 0, zero elsewhere. NaN in h is
    an error. Other float dtypes go to the reference op."""
    _check_h(h, 2, "[B, F]")
    _check_k(k, h.shape[1])
    if h.dtype not in KERNEL_DTYPES:
        return _reference("select", "topk")(h, k)
    index, value = _TopK.apply(h.contiguous(), k)
    return SparseCodes.from_topk(index, value, h.shape[1])


# --------------------------------------------------------------------------------- BatchTopK
class BatchTopKThreshold(NamedTuple):
    """Where the k_total-th largest entry lies, found by radix select on the uint32 float keys.

    ``key``: the threshold key (the k_total-th largest entry's). ``n_greater`` entries have a larger
    key and ``n_take`` of the threshold-equal ones are kept, so n_greater + n_take = k_total (global
    counts, over all ranks when the histograms were all-reduced). ``n_greater_local`` /
    ``n_equal_local``: the counts of larger / equal keys in this rank's h."""
    key: int
    n_greater: int
    n_take: int
    n_greater_local: int
    n_equal_local: int


def key_to_float(key: int) -> float:
    """The float whose order-preserving uint32 key is ``key`` (e.g. the BatchTopK threshold value)."""
    bits = key ^ 0x80000000 if key & 0x80000000 else ~key & 0xFFFFFFFF
    return struct.unpack("<f", struct.pack("<I", bits))[0]


class RadixCut(NamedTuple):
    """One group's cut found by ``radix_threshold``, in the histogrammed key space: ``key`` (the
    k_total-th largest key, ``total_bits`` wide), the global ``n_greater`` / ``n_take`` (n_greater +
    n_take = k_total) and this rank's ``n_greater_local`` / ``n_equal_local``."""
    key: int
    n_greater: int
    n_take: int
    n_greater_local: int
    n_equal_local: int


class ShardSelectionError(RuntimeError):
    """A histogram of ``radix_threshold`` failed on some rank. Raised on every rank at the same
    collective (the failure travels in the all-reduced histogram), so ranks can switch paths together."""


Histogram = Callable[[list, int, int], torch.Tensor]


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


def batch_topk_threshold(h: torch.Tensor, k_total: int, all_reduce: Optional[AllReduce] = None,
                         digit_bits: Optional[int] = None) -> BatchTopKThreshold:
    """h: [...] fp32|bf16 (contiguous), k_total: entries to keep -> BatchTopKThreshold.

    Exact radix select (``radix_threshold``) over the extension's histogram op: each pass
    histograms the next ``digit_bits`` of the keys that match the prefix found so far (fp32: 32 key
    bits, bf16: the top 16, which decide its value), so fp32 takes 2 passes of 16 bits on the CPU
    and 4 of 8 bits on CUDA. ``all_reduce(counts int64) -> counts`` sums each histogram over
    tensor-parallel ranks (identity by default), so every rank finds the same global threshold
    without gathering data: one all-reduce per pass. NaN in h is an error.
    """
    ops = _ops()
    if digit_bits is None:
        digit_bits = 16 if h.device.type == "cpu" else 8
    if k_total == 0:
        return BatchTopKThreshold(0xFFFFFFFF, 0, 0, 0, 0)
    total_bits = key_bits(h.dtype)

    def histogram(prefixes, bits, step):
        return ops.batch_topk_histogram(h, prefixes[0], bits, step)[None]

    return to_threshold(radix_threshold(histogram, [k_total], total_bits, digit_bits, all_reduce, h.device)[0],
                        total_bits)


def key_bits(dtype: torch.dtype) -> int:
    """The key bits the extension's histograms walk: the top 16 for bf16 (they decide its value), 32 for fp32."""
    return 16 if dtype == torch.bfloat16 else 32


def to_threshold(cut: RadixCut, total_bits: int) -> BatchTopKThreshold:
    """A cut over the extension's top ``total_bits`` key bits → the full uint32 threshold key."""
    key = cut.key << (32 - total_bits)
    if total_bits == 16 and not key & 0x80000000:
        # A negative bf16's key has all 16 low bits set (the inverted zero bits of its fp32 form).
        key |= 0xFFFF
    return BatchTopKThreshold(key, cut.n_greater, cut.n_take, cut.n_greater_local, cut.n_equal_local)


def batch_topk_compact(h: torch.Tensor, threshold: BatchTopKThreshold, equal_offset: int = 0):
    """h: [..., F] -> (row_ptr int64 [R+1], index int32 [nnz], value [nnz]) over the R = numel/F rows.

    Keeps the entries with key > threshold.key and the threshold-equal ones of global rank
    < threshold.n_take; ``equal_offset`` is the global rank of this rank's first threshold-equal
    entry (0 on one device; with tensor parallelism, the sum of n_equal_local over earlier ranks:
    ties then go to the lowest rank, then the lowest flat index). value = relu(h)."""
    take = max(0, min(threshold.n_take - equal_offset, threshold.n_equal_local))
    return _ops().batch_topk_compact(h, threshold.key, 0, take, threshold.n_greater_local + take)


def batch_topk_radix(h: torch.Tensor, k_total: int):
    """``torch.ops.fastclt.batch_topk`` by radix select: ``batch_topk_threshold`` (histogram passes)
    then one ``batch_topk_compact`` — the op's CUDA kernel (registered by ``fastclt._ext``), which
    runs wherever the histogram and compact ops do. Same result as the CPU kernel's bound + filter."""
    if isinstance(k_total, bool) or not isinstance(k_total, int) or not 0 <= k_total <= h.numel():
        raise ValueError(f"batch_topk: k_total must be in [0, h.numel()={h.numel()}], got {k_total}")
    if h.dim() < 2:
        raise RuntimeError(f"fastclt::batch_topk: h must have at least 2 dims [..., F], got shape {tuple(h.shape)}")
    return batch_topk_compact(h, batch_topk_threshold(h, k_total))


class _BatchTopK(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, k_total):
        # CPU: block-maximum bound + filter (csrc/cpu/select_cpu.cpp); CUDA: batch_topk_radix
        row_ptr, index, value = _ops().batch_topk(h, k_total)
        ctx.save_for_backward(row_ptr, index, value)
        ctx.shape = h.shape
        ctx.mark_non_differentiable(row_ptr, index)
        return row_ptr, index, value

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_row_ptr, grad_index, grad_value):
        row_ptr, index, value = ctx.saved_tensors
        n_features = ctx.shape[-1]
        flat = SparseCodes.rows_of(row_ptr, index.shape[0]) * n_features + index.long()
        grad_h = grad_value.new_zeros(ctx.shape.numel())
        grad_h.index_put_((flat,), grad_value * (value > 0))
        return grad_h.view(ctx.shape), None


def batch_topk(h: torch.Tensor, k: int) -> SparseCodes:
    """h: [B, F] fp32|bf16, 1 <= k <= F -> SparseCodes with exactly k*B entries (CSR, rows by token).

    Keeps the k*B largest entries of the whole batch (ties: lowest flat index), value = relu(h).
    Differentiable in h like ``topk``. NaN in h is an error. Other float dtypes go to the
    reference op."""
    _check_h(h, 2, "[B, F]")
    B, F = h.shape
    _check_k(k, F)
    if h.dtype not in KERNEL_DTYPES:
        return _reference("select", "batch_topk")(h, k)
    row_ptr, index, value = _BatchTopK.apply(h.contiguous(), k * B)
    return SparseCodes(row_ptr, index, value, F)


def batch_topk_layers(h: torch.Tensor, k: int) -> list[SparseCodes]:
    """h: [L, B, F] fp32|bf16 -> L SparseCodes holding exactly k*B*L entries in all (across layers).

    One selection over all layers together (a CLT's "across layers" BatchTopK): the k*B*L largest
    entries of h (ties: lowest flat index in [L, B, F] order), value = relu(h). Layer l's codes are
    views into one CSR over the L*B rows. Other float dtypes go to the reference op."""
    _check_h(h, 3, "[L, B, F]")
    L, B, F = h.shape
    _check_k(k, F)
    if h.dtype not in KERNEL_DTYPES:
        return _reference("select", "batch_topk_layers")(h, k)
    row_ptr, index, value = _BatchTopK.apply(h.contiguous(), k * B * L)
    bounds = row_ptr[::B].tolist() if B else [0] * (L + 1)  # CSR offsets where each layer starts
    codes = []
    for layer in range(L):
        start, end = bounds[layer], bounds[layer + 1]
        layer_ptr = row_ptr[layer * B: (layer + 1) * B + 1] - start if B else row_ptr[:1]
        codes.append(SparseCodes(layer_ptr, index[start:end], value[start:end], F))
    return codes


# ------------------------------------------------------------------------------------ decode
class _SparseDecode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, row_ptr, index, value, weight, bias):
        ctx.save_for_backward(row_ptr, index, value, weight)
        ctx.has_bias = bias is not None
        return _ops().sparse_decode(row_ptr, index, value, weight, bias)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y):
        row_ptr, index, value, weight = ctx.saved_tensors
        grad_y = grad_y.contiguous()
        value = value.to(grad_y.dtype)  # fp32 values of bf16 weights: the scatters take one dtype
        ops = _ops()
        grad_value = grad_weight = grad_bias = None
        if ctx.needs_input_grad[2] and ctx.needs_input_grad[3] and grad_y.device.type == "cpu":
            # dW and dvalue in one sweep: each gathered grad_y row read once for both
            grad_weight, _, grad_value = ops.feature_scatter_dot(row_ptr, index, value, grad_y, weight)
        else:
            if ctx.needs_input_grad[2]:
                grad_value = ops.sparse_dot(row_ptr, index, grad_y, weight)
            if ctx.needs_input_grad[3]:
                grad_weight = ops.feature_scatter(row_ptr, index, value, grad_y, weight.shape[0])[0]
        if ctx.has_bias and ctx.needs_input_grad[4]:
            grad_bias = grad_y.sum(0)
        return None, None, grad_value, grad_weight, grad_bias


def sparse_decode(codes: SparseCodes, W_dec: torch.Tensor, b_dec: Optional[torch.Tensor] = None) -> torch.Tensor:
    """codes (B rows), W_dec: [F, D] or [F, T, d] fp32|bf16, b_dec: [D] / [T, d] or None
    -> y: [B, D] (or [B, T, d]) in W_dec's dtype.

    y[b] = sum_j value[j] * W_dec[index[j]] (+ b_dec), accumulated in fp32 (fp32 values are not
    rounded to a bf16 W_dec's dtype first; other values are cast to it). Differentiable in
    codes.value, W_dec and b_dec (dvalue = <g, W_dec[index]>, dW_dec grouped by feature,
    deterministic). A [F, T, d] decoder (a CLT source's untied block) decodes as D = T*d. Other
    float dtypes go to the reference op."""
    if not isinstance(codes, SparseCodes):
        raise TypeError(f"codes: expected SparseCodes, got {type(codes).__name__}")
    if W_dec.dim() < 2:
        raise ValueError(f"W_dec: expected [F, D] or [F, T, d], got shape {tuple(W_dec.shape)}")
    if codes.n_features is not None and codes.n_features != W_dec.shape[0]:
        raise ValueError(f"W_dec: codes have n_features={codes.n_features} but W_dec has {W_dec.shape[0]} rows")
    if codes.device != W_dec.device:
        raise ValueError(f"W_dec: on {W_dec.device}, but codes are on {codes.device}")
    if W_dec.dtype not in KERNEL_DTYPES:
        return _reference("decode", "sparse_decode")(codes, W_dec, b_dec)
    tail = W_dec.shape[1:]
    W = W_dec.reshape(W_dec.shape[0], -1).contiguous()
    bias = None
    if b_dec is not None:
        if b_dec.shape != (W.shape[1],) and b_dec.shape != tail:
            raise ValueError(f"b_dec: expected shape {tuple(tail)}, got {tuple(b_dec.shape)}")
        bias = b_dec.reshape(-1).to(W.dtype).contiguous()
    # fp32 values with bf16 weights go in as they are (summed in fp32, not rounded to bf16 first)
    value = codes.value if codes.value.dtype in (W.dtype, torch.float32) else codes.value.to(W.dtype)
    y = _SparseDecode.apply(codes.row_ptr.contiguous(), codes.index.contiguous(), value.contiguous(), W, bias)
    return y.view(codes.batch_size, *tail)


def clt_decode(codes, W_dec, tying: str, b_dec: Optional[torch.Tensor] = None,
               feature_offset: Optional[torch.Tensor] = None,
               feature_scale: Optional[torch.Tensor] = None) -> torch.Tensor:
    """CLT decode (``fastclt.ops.decode.clt_decode``: same arguments, same result) from this
    module's ``sparse_decode``: each source's codes gathered straight from its contiguous decoder
    block, no [nnz, d] intermediate; backward grouped by feature (deterministic)."""
    from fastclt.ops.decode import clt_decode_with

    return clt_decode_with(sparse_decode, codes, W_dec, tying, b_dec, feature_offset, feature_scale)


# ------------------------------------------------------------------------------------ encode
class _ExtKernels:
    """The sparse encoder backward's sums and gather as fastclt._C kernels (CPU or CUDA; see
    ``fastclt.ops.sparse_encode.SparseKernels``): ``feature_scatter`` groups entries by feature
    itself (counting sort, deterministic), so there is no reusable grouping."""

    @staticmethod
    def segments(col, n_features):
        return None

    @staticmethod
    def feature_sums(col, coef, n_features, segments):
        nnz = col.shape[0]
        per_entry = torch.arange(nnz + 1, dtype=torch.int64, device=col.device)  # each entry its own row
        ones = torch.ones(nnz, dtype=torch.float32, device=col.device)
        return _ops().feature_scatter(per_entry, col.contiguous(), ones, coef.float().contiguous(), n_features)[0]

    @staticmethod
    def feature_scatter(col, row, row_ptr, coef, G, n_features, segments):
        # G in fp32: the kernel takes coef in G's dtype, and dh must not be rounded to bf16 here
        return _ops().feature_scatter(row_ptr.contiguous(), col.contiguous(), coef.float().contiguous(),
                                      G.float().contiguous(), n_features)[0]

    @staticmethod
    def gather(row_ptr, col, coef, W, out_dtype):
        # coef (dh) stays fp32 with bf16 weights: the kernel sums it in fp32, one rounding at the end
        W = W.detach().contiguous()
        coef = coef.float() if W.dtype == torch.bfloat16 else coef.to(W.dtype)
        return _ops().sparse_decode(row_ptr.contiguous(), col.contiguous(), coef.contiguous(), W, None).to(out_dtype)


EXT_KERNELS = _ExtKernels()


def _h_out(x: torch.Tensor, *shape: int) -> Optional[torch.Tensor]:
    """Where a no-grad dense h goes: on the CPU a reused host-pool block (a fresh 128 MiB tensor
    costs ~30 ms of page faults per step there; csrc/host_pool.h), elsewhere None (the GEMM
    allocates it, bias fused)."""
    if x.device.type != "cpu":
        return None
    from fastclt import _ext

    return _ext.host_empty(shape, x.dtype, x.device)


def _check_encode_weights(x: torch.Tensor, W_enc: torch.Tensor, b_enc: Optional[torch.Tensor],
                          threshold: Optional[torch.Tensor], pre_bias: Optional[torch.Tensor]) -> None:
    for name, t in (("W_enc", W_enc), ("b_enc", b_enc), ("threshold", threshold), ("pre_bias", pre_bias)):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a tensor, got {type(t).__name__}")
        if t.device != x.device:
            raise ValueError(f"{name}: expected a tensor on {x.device} (x's device), got {t.device}")
    if W_enc.dtype != x.dtype:
        raise TypeError(f"W_enc: expected x's dtype {x.dtype}, got {W_enc.dtype}")


def _pattern(h: torch.Tensor, activation: str, k: Optional[int], threshold: Optional[torch.Tensor],
             bandwidth: float):
    """Dense h: [B, F] (no grad) → (row_ptr, row int64, col int32, h fp32 at the entries), sorted by (row, col)."""
    from fastclt.ops.activation import band_mask

    if activation in ("relu", "jumprelu") and h.device.type == "cpu":
        # one read of h, no dense mask (csrc/cpu/select_cpu.cpp); the band's half-width rounded to
        # h's dtype, as `band_mask`'s comparison does
        thr = None if activation == "relu" else threshold.to(h.dtype).contiguous()
        half = 0.0 if activation == "relu" else float(torch.tensor(0.5 * bandwidth, dtype=h.dtype))
        row_ptr, col, h_e = _ops().threshold_compact(h, thr, half)
        return row_ptr, SparseCodes.rows_of(row_ptr, col.shape[0]), col, h_e
    if activation in ("relu", "jumprelu"):
        mask = h > 0 if activation == "relu" else band_mask(h, threshold.to(h.dtype), bandwidth)
        row_ptr, row, col = SparseCodes.pattern_from_mask(mask)
    else:
        c = topk(h, k) if activation == "topk" else batch_topk(h, k)
        row_ptr, col, row = c.row_ptr, c.index.long(), c.row_ids()
    return row_ptr, row, col.to(torch.int32), h[row, col].float()


def encode(x: torch.Tensor, W_enc: torch.Tensor, b_enc: Optional[torch.Tensor], *, activation: str,
           k: Optional[int] = None, threshold: Optional[torch.Tensor] = None, bandwidth: float = 0.01,
           pre_bias: Optional[torch.Tensor] = None, return_preacts: bool = False):
    """x: [B, d_in], W_enc: [F, d_in], b_enc: [F] → SparseCodes of ``act(W_enc (x − pre_bias) + b_enc)``.

    The encoder GEMM is dense (cuBLAS / the CPU BLAS, outside autograd), the selection is the
    extension's (exact TopK / BatchTopK), and the backward is the sparse encoder backward
    (``fastclt.ops.sparse_encode``): no dense [B, F] gradient and no backward GEMM. The dense h is
    freed once the entries are found. ``return_preacts`` (a loss on h needs it) keeps h in autograd
    and returns it too. fp16/fp64 inputs go to the reference op. Same codes as the reference."""
    from fastclt.ops.encode import _check_encode_args, activate, preacts
    from fastclt.ops.sparse_encode import encode_codes

    _check_encode_args(x, W_enc, b_enc, activation, k, threshold)
    _check_encode_weights(x, W_enc, b_enc, threshold, pre_bias)
    if x.dtype not in KERNEL_DTYPES:
        return _reference("encode", "encode")(x, W_enc, b_enc, activation=activation, k=k, threshold=threshold,
                                              bandwidth=bandwidth, pre_bias=pre_bias, return_preacts=return_preacts)
    if activation == "jumprelu" and not bandwidth > 0:
        raise ValueError(f"bandwidth: expected a positive JumpReLU bandwidth ε, got {bandwidth}")
    if return_preacts:
        h = preacts(x, W_enc, b_enc, pre_bias)
        if activation in ("topk", "batchtopk"):
            codes = topk(h, k) if activation == "topk" else batch_topk(h, k)
        else:
            codes = activate(h, activation, threshold=threshold, bandwidth=bandwidth)
        return codes, h
    with torch.no_grad():
        # CPU fp32 TopK: the GEMM without its bias (no broadcast copy, beta = 0), the bias folded
        # into the select (fastclt::topk_bias); elsewhere the GEMM adds it
        fold = (activation == "topk" and x.device.type == "cpu" and x.dtype == torch.float32
                and b_enc is not None and b_enc.dtype == torch.float32)
        h = preacts(x.detach(), W_enc.detach(), None if b_enc is None or fold else b_enc.detach(),
                    None if pre_bias is None else pre_bias.detach(), out=_h_out(x, x.shape[0], W_enc.shape[0]))
        if fold:
            index, value = _ops().topk_bias(h, b_enc.detach().contiguous(), k)
            c = SparseCodes.from_topk(index, value, h.shape[1])
            row_ptr, row, col, h_e = c.row_ptr, c.row_ids(), c.index, c.value  # relu'd: the same codes and mask
        else:
            row_ptr, row, col, h_e = _pattern(h, activation, k, None if threshold is None else threshold.detach(),
                                              bandwidth)
        del h
    return encode_codes(x, W_enc, b_enc, threshold, pre_bias, row_ptr, row, col, h_e, activation, bandwidth,
                        EXT_KERNELS, k if activation == "topk" else None)


def encode_layers(x: torch.Tensor, W_enc: torch.Tensor, b_enc: Optional[torch.Tensor], k: int,
                  pre_bias: Optional[torch.Tensor] = None) -> list[SparseCodes]:
    """BatchTopK across layers: x: [B, L, d_in], W_enc: [L, F, d_in], b_enc: [L, F] → L SparseCodes
    with exactly k·B·L entries over all layers together; one exact radix select over the stacked
    h (no grad), then the sparse encoder backward per layer. Same codes as the reference."""
    from fastclt.ops.encode import _check_layers_args, encode_layers as reference, preacts_layers
    from fastclt.ops.sparse_encode import encode_codes

    L, F = _check_layers_args(x, W_enc, b_enc, k, pre_bias)
    _check_encode_weights(x, W_enc, b_enc, None, pre_bias)
    if x.dtype not in KERNEL_DTYPES:
        return reference(x, W_enc, b_enc, k, pre_bias)
    with torch.no_grad():
        h = preacts_layers(x.detach(), W_enc.detach(), None if b_enc is None else b_enc.detach(),
                           None if pre_bias is None else pre_bias.detach(), out=_h_out(x, L, x.shape[0], F))
        sel = batch_topk_layers(h, k)
        pats = []
        for l, c in enumerate(sel):
            col, row = c.index.long(), c.row_ids()
            pats.append((c.row_ptr, row, col.to(torch.int32), h[l][row, col].float()))
        del h, sel
    return [encode_codes(x[:, l], W_enc[l], None if b_enc is None else b_enc[l], None, pre_bias, *pats[l],
                         "batchtopk", 0.01, EXT_KERNELS) for l in range(L)]


def auxk_select(x: torch.Tensor, W_enc: torch.Tensor, b_enc: Optional[torch.Tensor], dead_mask: torch.Tensor,
                k_aux: int, pre_bias: Optional[torch.Tensor] = None) -> SparseCodes:
    """AuxK (SPEC §4): top min(k_aux, n_dead) of the dead features' pre-activations per row → SparseCodes
    with global feature ids. Only the dead rows of W_enc are multiplied (no grad); the values carry
    the sparse encoder backward, so dW_enc is non-zero on dead rows only. Same codes as the reference."""
    from fastclt.ops.auxk import _check_auxk_args, auxk_select as reference
    from fastclt.ops.encode import preacts
    from fastclt.ops.sparse_encode import encode_codes

    _check_auxk_args(x, W_enc, dead_mask, k_aux)
    _check_encode_weights(x, W_enc, b_enc, None, pre_bias)
    dead = dead_mask.nonzero().squeeze(1)
    if x.dtype not in KERNEL_DTYPES or dead.numel() == 0 or x.shape[0] == 0:
        return reference(x, W_enc, b_enc, dead_mask, k_aux, pre_bias)
    k = min(k_aux, dead.numel())
    with torch.no_grad():
        h = preacts(x.detach(), W_enc.detach()[dead], None if b_enc is None else b_enc.detach()[dead],
                    None if pre_bias is None else pre_bias.detach(), out=_h_out(x, x.shape[0], dead.numel()))
        c = topk(h, k)
        local, row = c.index.long(), c.row_ids()
        h_e = h[row, local].float()
        col = dead[local].to(torch.int32)
        del h
    return encode_codes(x, W_enc, b_enc, None, pre_bias, c.row_ptr, row, col, h_e, "topk", 0.01, EXT_KERNELS, k)


# ------------------------------------------------------------------------------ registration
def _cpu_available(device: torch.device) -> bool:
    from fastclt import _ext

    return device.type == "cpu" and _ext.has_cpu_ext()


def _cuda_available(device: torch.device) -> bool:
    from fastclt import _ext

    return device.type == "cuda" and _ext.has_cuda_ext()


def register_ext_impls() -> None:
    """Register this module's ops as impl "cpu" and "cuda" in fastclt.ops._dispatch."""
    from fastclt.ops._dispatch import register

    for op in ("topk", "batch_topk", "batch_topk_layers", "sparse_decode", "clt_decode", "encode", "encode_layers",
               "auxk_select"):
        register(op, "cpu", f"fastclt.ops.ext_ops:{op}", _cpu_available, KERNEL_DTYPES)
        register(op, "cuda", f"fastclt.ops.ext_ops:{op}", _cuda_available, KERNEL_DTYPES)
