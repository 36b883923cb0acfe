"""fastclt._C kernels (C++ on the CPU, CUDA on GPUs) as functional ops with autograd.

Same names, arguments and results as the reference ops (``fastclt.ops.select``,
``fastclt.ops.decode``); ``register_ext_impls()`` registers them as impl "cpu" and "cuda" of
"topk", "batch_topk", "batch_topk_layers" and "sparse_decode". The extension is imported on first
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
    "topk", "batch_topk", "batch_topk_layers", "sparse_decode", "sparse_encode_backward",
    "batch_topk_threshold", "batch_topk_compact", "BatchTopKThreshold", "key_to_float", "register_ext_impls",
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


def _row_ids(row_ptr: torch.Tensor, nnz: int) -> torch.Tensor:
    """int64 [nnz]: the row of every CSR entry."""
    rows = torch.arange(row_ptr.shape[0] - 1, device=row_ptr.device)
    return torch.repeat_interleave(rows, row_ptr.diff(), output_size=nnz)


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


def batch_topk_threshold(h: torch.Tensor, k_total: int, all_reduce: Optional[AllReduce] = None,
                         digit_bits: Optional[int] = None) -> BatchTopKThreshold:
    """h: [...] fp32|bf16 (contiguous), k_total: entries to keep -> BatchTopKThreshold.

    Exact radix select: each pass histograms the next ``digit_bits`` of the keys that match the
    prefix found so far (fp32: 32 key bits, bf16: the top 16, which decide its value), so fp32 takes
    2 passes of 16 bits on the CPU and 4 of 8 bits on CUDA. ``all_reduce(counts int64) -> counts``
    sums each histogram over tensor-parallel ranks (identity by default), so every rank finds the
    same global threshold without gathering data: one all-reduce per pass. NaN in h is an error.
    """
    ops = _ops()
    if digit_bits is None:
        digit_bits = 16 if h.device.type == "cpu" else 8
    total_bits = 16 if h.dtype == torch.bfloat16 else 32
    if k_total == 0:
        return BatchTopKThreshold(0xFFFFFFFF, 0, 0, 0, 0)
    prefix = bits = 0
    remaining = k_total
    n_greater = n_greater_local = 0
    while bits < total_bits:
        step = min(digit_bits, total_bits - bits)
        local = ops.batch_topk_histogram(h, prefix, bits, step)
        counts = (all_reduce(local.clone()) if all_reduce is not None else local).cpu()
        local = local.cpu()
        if bits == 0:
            if counts[-1] > 0:
                raise ValueError(f"batch_topk: h contains NaN ({int(counts[-1])} entries)")
            if counts[:-1].sum() < k_total:
                raise ValueError(f"batch_topk: k_total={k_total} exceeds the {int(counts[:-1].sum())} entries of h")
        # at_least[t] = entries whose digit is >= t; the threshold digit is the last t with
        # at_least[t] >= remaining (at_least is non-increasing).
        at_least = counts[:-1].flip(0).cumsum(0).flip(0)
        t = int((at_least >= remaining).nonzero()[-1])
        above = int(at_least[t + 1]) if t + 1 < at_least.shape[0] else 0
        local_at_least = local[:-1].flip(0).cumsum(0).flip(0)
        n_greater_local += int(local_at_least[t + 1]) if t + 1 < local_at_least.shape[0] else 0
        n_greater += above
        remaining -= above
        prefix = (prefix << step) | t
        bits += step
    key = prefix << (32 - total_bits)
    if total_bits == 16 and not key & 0x80000000:
        # A negative bf16's key has all 16 low bits set (the inverted zero bits of its fp32 form).
        key |= 0xFFFF
    return BatchTopKThreshold(key, n_greater, remaining, n_greater_local, int(local[t]))


def batch_topk_compact(h: torch.Tensor, threshold: BatchTopKThreshold, equal_offset: int = 0):
    """h: [..., F] -> (row_ptr int64 [R+1], index int32 [nnz], value [nnz]) over the R = numel/F rows.

    Keeps the entries with key > threshold.key and the threshold-equal ones of global rank
    < threshold.n_take; ``equal_offset`` is the global rank of this rank's first threshold-equal
    entry (0 on one device; with tensor parallelism, the sum of n_equal_local over earlier ranks:
    ties then go to the lowest rank, then the lowest flat index). value = relu(h)."""
    take = max(0, min(threshold.n_take - equal_offset, threshold.n_equal_local))
    return _ops().batch_topk_compact(h, threshold.key, 0, take, threshold.n_greater_local + take)


class _BatchTopK(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, k_total):
        row_ptr, index, value = batch_topk_compact(h, batch_topk_threshold(h, k_total))
        ctx.save_for_backward(row_ptr, index, value)
        ctx.shape = h.shape
        ctx.mark_non_differentiable(row_ptr, index)
        return row_ptr, index, value

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_row_ptr, grad_index, grad_value):
        row_ptr, index, value = ctx.saved_tensors
        n_features = ctx.shape[-1]
        flat = _row_ids(row_ptr, index.shape[0]) * n_features + index.long()
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
        ops = _ops()
        grad_value = grad_weight = grad_bias = None
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

    y[b] = sum_j value[j] * W_dec[index[j]] (+ b_dec), accumulated in fp32. Differentiable in
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
    y = _SparseDecode.apply(codes.row_ptr.contiguous(), codes.index.contiguous(),
                            codes.value.to(W.dtype).contiguous(), W, bias)
    return y.view(codes.batch_size, *tail)


def sparse_encode_backward(codes: SparseCodes, grad_value: torch.Tensor, x: torch.Tensor, W_enc: torch.Tensor,
                           need_dx: bool = True):
    """Encoder backward from sparse upstream gradients, with no dense [B, F] tensor.

    codes (B rows, pattern of h = x W_encᵀ + b_enc), grad_value: [nnz] dL/dh at the codes' entries,
    x: [B, d_in], W_enc: [F, d_in] (fp32|bf16) -> (dx [B, d_in] or None, dW_enc [F, d_in], db_enc [F]):
    dW_enc[f] = sum_{j: index=f} dh[j] x[row(j)], db_enc[f] = sum_{j: index=f} dh[j],
    dx[b] = sum_j dh[j] W_enc[index[j]]; dW_enc and db_enc in W_enc's dtype, dx in x's."""
    ops = _ops()
    row_ptr, index = codes.row_ptr.contiguous(), codes.index.contiguous()
    x = x.contiguous()
    grad_w, grad_b = ops.feature_scatter(row_ptr, index, grad_value.to(x.dtype).contiguous(), x, W_enc.shape[0])
    grad_x = None
    if need_dx:
        W = W_enc.contiguous()
        grad_x = ops.sparse_decode(row_ptr, index, grad_value.to(W.dtype).contiguous(), W, None).to(x.dtype)
    return grad_x, grad_w.to(W_enc.dtype), grad_b.to(W_enc.dtype)


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

    for op in ("topk", "batch_topk", "batch_topk_layers", "sparse_decode"):
        register(op, "cpu", f"fastclt.ops.ext_ops:{op}", _cpu_available)
        register(op, "cuda", f"fastclt.ops.ext_ops:{op}", _cuda_available)
