"""CLT decode on the extension's kernels (impl "cpu" and "cuda"; docs/DESIGN.md §2.1, §7): the
reference's composition (``fastclt.ops.reference.clt_decode.clt_decode_with``) over this backend's
``sparse_decode`` — each source's codes gathered straight from its contiguous decoder block, no
[nnz, d] intermediate; the backward grouped by feature (deterministic)."""
from __future__ import annotations

from typing import Optional

import torch

from fastclt.ops.ext.decode import sparse_decode
from fastclt.ops.reference.clt_decode import clt_decode_with

__all__ = ["clt_decode"]


def clt_decode(codes, W_dec, tying: str, b_dec: Optional[torch.Tensor] = None,
               feature_offset: Optional[torch.Tensor] = None,
               feature_scale: Optional[torch.Tensor] = None, skip_empty: bool = False) -> torch.Tensor:
    """Same arguments and result as ``fastclt.ops.clt_decode``."""
    return clt_decode_with(sparse_decode, codes, W_dec, tying, b_dec, feature_offset, feature_scale, skip_empty)
