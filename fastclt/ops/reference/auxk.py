"""Reference AuxK selection (docs/DESIGN.md §4): the top k_aux of the *dead* features' pre-activations.

    x: [B, d_in], W_enc: [F, d_in], b_enc: [F], dead_mask: [F] bool
    → SparseCodes over all F features (indices are global feature ids), k = min(k_aux, n_dead)

Only the dead rows of W_enc are multiplied. Decode the result WITHOUT b_dec (and without the skip
term) and compare with the detached residual (``losses.auxk_loss``): the gradient then reaches W_enc
and b_enc through the selected pre-activations, and W_dec through the dead rows, never b_dec.
With ``shards`` (features sharded over a process group) k = min(k_aux, n_dead over all shards) and
the codes hold this rank's share of the per-row top k, with this rank's feature ids.
"""
from __future__ import annotations

from typing import Optional

import torch

from fastclt.codes import SparseCodes
from fastclt.ops.reference.encode import preacts
from fastclt.ops.reference.select import topk

__all__ = ["auxk_select", "empty_codes", "dead_features"]


def empty_codes(x: torch.Tensor, F: int) -> SparseCodes:
    """Codes of x's B rows with no entry (no dead feature, or no row)."""
    B = x.shape[0]
    return SparseCodes(torch.zeros(B + 1, dtype=torch.int64, device=x.device),
                       torch.zeros(0, dtype=torch.int32, device=x.device), x.new_zeros(0), F)


def dead_features(dead_mask: torch.Tensor, n_dead: Optional[int] = None) -> torch.Tensor:
    """The indices of dead_mask's True entries (int64 [n]); ``n_dead``: their number when the caller
    knows it, so that nothing reads the device (``torch.nonzero_static``)."""
    if n_dead is None:
        return dead_mask.nonzero().squeeze(1)
    return torch.nonzero_static(dead_mask, size=n_dead).squeeze(1)


def auxk_select(x: torch.Tensor, W_enc: torch.Tensor, b_enc: Optional[torch.Tensor], dead_mask: torch.Tensor,
                k_aux: int, pre_bias: Optional[torch.Tensor] = None, n_dead: Optional[int] = None,
                shards=None) -> SparseCodes:
    """See the module docstring. Rows with no dead feature give empty codes."""
    F = W_enc.shape[0]
    dead = dead_features(dead_mask, n_dead)
    n_dead = dead.numel() if shards is None else int(shards.sum(dead_mask.sum()))
    if n_dead == 0 or x.shape[0] == 0:
        return empty_codes(x, F)
    h = preacts(x, W_enc[dead], None if b_enc is None else b_enc[dead], pre_bias)
    sel = topk(h, min(k_aux, n_dead), shards)
    return SparseCodes(sel.row_ptr, dead[sel.index.long()].to(torch.int32), sel.value, F, sel.k)
