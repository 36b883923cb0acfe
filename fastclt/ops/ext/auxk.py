"""AuxK selection on the extension's kernels (impl "cpu" and "cuda"; docs/DESIGN.md §4): the top
min(k_aux, n_dead) of the dead features' pre-activations per row → SparseCodes with global feature
ids. Only the dead rows of W_enc are multiplied (no grad) and selected by ``fastclt::topk``; the
values carry the sparse encoder backward, so dW_enc is non-zero on dead rows only. Same codes as
the reference."""
from __future__ import annotations

from typing import Optional

import torch

from fastclt.codes import SparseCodes
from fastclt.ops import sharded
from fastclt.ops.encoder_backward import encode_codes
from fastclt.ops.ext import select as ext_select
from fastclt.ops.ext._common import EXT_KERNELS, h_out
from fastclt.ops.reference.auxk import dead_features, empty_codes
from fastclt.ops.reference.encode import preacts

__all__ = ["auxk_select"]


def auxk_select(x: torch.Tensor, W_enc: torch.Tensor, b_enc: Optional[torch.Tensor], dead_mask: torch.Tensor,
                k_aux: int, pre_bias: Optional[torch.Tensor] = None, n_dead: Optional[int] = None,
                shards: Optional[sharded.Shards] = None) -> SparseCodes:
    """See the module docstring; with ``shards``, k = min(k_aux, n_dead over all shards)."""
    dead = dead_features(dead_mask, n_dead)
    n_dead = dead.numel() if shards is None else int(shards.sum(dead_mask.sum()))
    if n_dead == 0 or x.shape[0] == 0:
        return empty_codes(x, W_enc.shape[0])
    k = min(k_aux, n_dead)
    with torch.no_grad():
        out = h_out(x, x.shape[0], dead.numel()) if dead.numel() else None
        h = preacts(x.detach(), W_enc.detach()[dead], None if b_enc is None else b_enc.detach()[dead],
                    None if pre_bias is None else pre_bias.detach(), out=out)
        if shards is None:
            c = ext_select.topk(h, k)
            row_ptr, local, row = c.row_ptr, c.index.long(), c.row_ids()
        else:
            row_ptr, local = ext_select.topk_entries(h, k, shards)
            row = SparseCodes.rows_of(row_ptr, local.shape[0])
        h_e = h[row, local].float()
        col = dead[local].to(torch.int32)
        del h
    return encode_codes(x, W_enc, b_enc, None, pre_bias, row_ptr, row, col, h_e, "topk", 0.01, EXT_KERNELS,
                        k if shards is None else None)
