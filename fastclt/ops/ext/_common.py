"""What the extension's ops share: loading fastclt._C, the sparse encoder backward's kernels
(``EXT_KERNELS``) and host-pool buffers for dense intermediates on the CPU."""
from __future__ import annotations

from typing import Optional

import torch

__all__ = ["ops", "EXT_KERNELS", "h_out"]


def ops():
    """torch.ops.fastclt, after loading fastclt._C (a clear error when it is not built)."""
    from fastclt import _ext

    if not _ext.build_info()["loaded"]:
        raise RuntimeError(_ext.missing_message("cpu"))
    return torch.ops.fastclt


class _ExtKernels:
    """The sparse encoder backward's sums and gather as fastclt._C kernels (CPU or CUDA; see
    ``fastclt.ops.encoder_backward.SparseKernels``): ``feature_scatter`` groups entries by feature
    itself (counting sort, deterministic), so there is no reusable grouping."""

    @staticmethod
    def segments(col, n_features):
        return None

    @staticmethod
    def feature_sums(col, coef, n_features, segments):
        coef = coef.float()
        if col.device.type == "cpu":
            # a column at a time, 1-D index_add_: one sequential pass over the entries in their order
            # (deterministic, and per feature the order feature_scatter's stable grouping would
            # take), ~10× faster at these widths (1 or 2 columns) than a feature_scatter of
            # one-entry rows (65536 entries into 16384 features: 0.9 → 0.1 ms on the 2-core Xeon)
            out = torch.zeros(n_features, coef.shape[1], dtype=torch.float32)
            for j in range(coef.shape[1]):
                out[:, j].index_add_(0, col, coef[:, j])
            return out
        nnz = col.shape[0]
        per_entry = torch.arange(nnz + 1, dtype=torch.int64, device=col.device)  # each entry its own row
        ones = torch.ones(nnz, dtype=torch.float32, device=col.device)
        return ops().feature_scatter(per_entry, col.contiguous(), ones, coef.contiguous(), n_features)[0]

    @staticmethod
    def feature_scatter(col, row, row_ptr, coef, G, n_features, segments):
        return _ExtKernels.feature_scatter_and_sums(col, row, row_ptr, coef, G, n_features)[0]

    @staticmethod
    def feature_scatter_and_sums(col, row, row_ptr, coef, G, n_features):
        # the kernel groups by row_ptr: ``row`` unused (may be None). G in fp32: the kernel takes coef
        # in G's dtype, and dh must not be rounded to bf16 here. The CPU kernel reads rows with a
        # stride (or [L, B, d] layer-major views) in place where few entries gather them
        # (``packed_rows``); the CUDA one takes contiguous [B, D]. The kernel's coef_sum is the
        # per-feature sum of coef: on the CPU in entry order, as feature_sums' index_add_ adds.
        G = G.float()
        if G.device.type != "cpu" or G.stride(-1) != 1:
            G = G.reshape(-1, G.shape[-1]).contiguous()
        else:
            G = packed_rows(G, col.shape[0])
        return ops().feature_scatter(row_ptr.contiguous(), col.contiguous(), coef.float().contiguous(), G,
                                     n_features)

    @staticmethod
    def gather(row_ptr, col, coef, W, out_dtype):
        # coef (dh) stays fp32 with bf16 weights: the kernel sums it in fp32, one rounding at the end
        W = W.detach().contiguous()
        coef = coef.float() if W.dtype == torch.bfloat16 else coef.to(W.dtype)
        return ops().sparse_decode(row_ptr.contiguous(), col.contiguous(), coef.contiguous(), W, None).to(out_dtype)


EXT_KERNELS = _ExtKernels()


def h_out(x: torch.Tensor, *shape: int) -> Optional[torch.Tensor]:
    """Where a no-grad dense h goes: on the CPU a reused host-pool block (a fresh 128 MiB tensor
    costs ~30 ms of page faults per step there; csrc/host_pool.h), elsewhere None (the GEMM
    allocates it, bias fused)."""
    if x.device.type != "cpu":
        return None
    from fastclt import _ext

    return _ext.host_empty(shape, x.dtype, x.device)


def packed_rows(G: torch.Tensor, n_entries: int) -> torch.Tensor:
    """G: [B, D] or [G', B', D] with contiguous rows, for ``fastclt::feature_scatter``, which gathers a
    row per entry → G itself, or its rows packed into a contiguous [B, D] copy (``host_empty``)
    where they lie apart (a joined encoder's x seen layer-major) and the entries read each row at
    least twice on average. At the cpu-clt shape (x [1024, 4, 256]: 1 KB rows at a 4 KB stride, 16
    entries a row) the joined encoder's dW_enc scatter took 2.58 ms on the strided rows and 2.00 ms
    packed, the copy 0.35 ms (in the encode's fwd+bwd, profiled; 2-core Xeon). An untied CLT
    decoder's backward reads its gradient's slices in place: packed, its step ran ~1 ms slower."""
    D = G.shape[-1]
    rows = G.numel() // max(D, 1)
    if G.is_contiguous() or G.device.type != "cpu" or n_entries < 2 * rows:
        return G
    from fastclt import _ext

    return _ext.host_empty(G.shape, G.dtype, G.device).copy_(G).view(rows, D)
