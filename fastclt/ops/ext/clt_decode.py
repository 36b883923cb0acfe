"""CLT decode on the extension's kernels (impl "cpu" and "cuda"; docs/DESIGN.md §2.1, §7): the
reference's composition (``fastclt.ops.reference.clt_decode.clt_decode_with``) over this backend's
``sparse_decode`` — each source's codes gathered straight from its contiguous decoder block, no
[nnz, d] intermediate; the backward grouped by feature (deterministic)."""
from __future__ import annotations

from typing import Optional

import torch

from fastclt.codes import SparseCodes
from fastclt.ops.ext.decode import sparse_decode
from fastclt.ops.reference.clt_decode import clt_decode_with
from fastclt.ops.reference.decode import acc_dtype

__all__ = ["clt_decode"]


def clt_decode(codes, W_dec, tying: str, b_dec: Optional[torch.Tensor] = None,
               feature_offset: Optional[torch.Tensor] = None,
               feature_scale: Optional[torch.Tensor] = None, skip_empty: bool = False) -> torch.Tensor:
    """Same arguments and result as ``fastclt.ops.clt_decode``."""
    if tying != "none" and feature_offset is None and feature_scale is None and not any(c.is_dense for c in codes):
        y = (_per_source_joined if tying == "per_source" else _per_target_joined)(codes, W_dec)
        return y if b_dec is None else y + b_dec.to(y.dtype)
    return clt_decode_with(sparse_decode, codes, W_dec, tying, b_dec, feature_offset, feature_scale, skip_empty)


def _joined(blocks: list, n_features: int) -> SparseCodes:
    """(codes, feature offset) blocks → one CSR over their rows, one block after another, each
    block's features shifted by its offset (the decode of a tied CLT's sources in one call against
    W_dec viewed [L·F, d_out]). The values are concatenated, so their gradients flow back to each
    block's codes (summed where codes appear in several blocks)."""
    row_ptr = SparseCodes.join_row_ptrs([c.row_ptr for c, _ in blocks], [c.nnz for c, _ in blocks])
    index = torch.cat([c.index if off == 0 else c.index + off for c, off in blocks])
    return SparseCodes(row_ptr, index, torch.cat([c.value for c, _ in blocks]), n_features)


def _per_source_joined(codes, W_dec: torch.Tensor) -> torch.Tensor:
    """Plain per_source tying, no bias: every target t ≥ s receives W_dec[s]ᵀ a_s. The L source decodes
    as one: the sources' CSRs one after another over L·B rows, with features s·F + f of W_dec viewed
    [L·F, d_out], then a prefix sum over the sources (in fp32, as the reference's). Each row holds the
    entries of its source in their order, so the decodes and the sum are the reference's, bit for
    bit; dW_dec comes out in W_dec's own [L, F, d_out] layout (L per-source gradients stacked by
    autograd cost a copy of the whole decoder per step: 16 MB at the cpu-clt shape)."""
    L, F, d = W_dec.shape
    B = codes[0].batch_size
    per_source = sparse_decode(_joined([(c, s * F) for s, c in enumerate(codes)], L * F),
                               W_dec.reshape(L * F, d)).view(L, B, d)
    return per_source.cumsum(0, dtype=acc_dtype(per_source.dtype)).to(per_source.dtype).transpose(0, 1)


def _per_target_joined(codes, W_dec: torch.Tensor) -> torch.Tensor:
    """Plain per_target tying, no bias: target t receives Σ_{s≤t} W_dec[t]ᵀ a_s. The L(L+1)/2 pair
    decodes as one (rows: target, then source, then token; features t·F + f of W_dec viewed
    [L·F, d_out]), then each target's sum over its sources in fp32. dW_dec comes out in W_dec's own
    layout, as for per_source."""
    L, F, d = W_dec.shape
    B = codes[0].batch_size
    pairs = sparse_decode(_joined([(codes[s], t * F) for t in range(L) for s in range(t + 1)], L * F),
                          W_dec.reshape(L * F, d)).view(-1, B, d)
    acc = acc_dtype(pairs.dtype)
    return torch.stack([p.sum(0, dtype=acc) for p in pairs.split(list(range(1, L + 1)))], 1).to(pairs.dtype)
