"""What the dense formulations share: codes scattered into a dense [B, F] tensor."""
from __future__ import annotations

import torch

from fastclt.codes import SparseCodes

__all__ = ["dense_codes", "gemm_dtype", "zeros"]


def zeros(numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A zero-filled 1-D tensor; on the CPU from fastclt._C's host pool when it is built (a reused
    block: no first-touch page faults on a fresh [B, F] buffer every step; csrc/host_pool.h)."""
    if device.type == "cpu":
        from fastclt import _ext

        return _ext.host_empty((numel,), dtype, device).zero_()
    return torch.zeros(numel, dtype=dtype, device=device)


class _Densify(torch.autograd.Function):
    """value [nnz] → out [B·F] with out[flat[j]] += value[j]; backward: the gather dvalue = g[flat]."""

    @staticmethod
    def forward(ctx, value, flat, numel, dtype):
        ctx.save_for_backward(flat)
        ctx.value_dtype = value.dtype
        return zeros(numel, dtype, value.device).index_add_(0, flat, value.to(dtype))

    @staticmethod
    def backward(ctx, g):
        (flat,) = ctx.saved_tensors
        return g.index_select(0, flat).to(ctx.value_dtype), None, None, None


def dense_codes(codes: SparseCodes, n_features: int, dtype: torch.dtype) -> torch.Tensor:
    """codes over B rows → the dense [B, F] activations in ``dtype`` (entries of one (row, feature)
    summed), differentiable in ``codes.value``. Memory: one [B, F] tensor. Codes held dense
    (``DenseCodes``) give their [B, F] tensor as it is (cast to ``dtype``)."""
    if codes.is_dense:
        if codes.n_features != n_features:
            raise ValueError(f"n_features: the codes have F={codes.n_features}, the decoder {n_features}")
        return codes.dense.to(dtype)
    B = codes.batch_size
    flat = codes.flat_index(n_features)
    return _Densify.apply(codes.value, flat, B * n_features, dtype).view(B, n_features)


def gemm_dtype(value_dtype: torch.dtype, weight_dtype: torch.dtype) -> torch.dtype:
    """The dtype the dense GEMMs run in: the decoder's, except fp32 for fp32 values with a bf16/fp16
    decoder (the values are not rounded to it; the kernels sum them in fp32 too)."""
    if value_dtype == torch.float32 and weight_dtype in (torch.bfloat16, torch.float16):
        return torch.float32
    return weight_dtype
