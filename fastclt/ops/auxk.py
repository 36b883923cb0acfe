"""Reference AuxK selection (SPEC §4): the top k_aux of the *dead* features' pre-activations.

    x: [B, d_in], W_enc: [F, d_in], b_enc: [F], dead_mask: [F] bool
    → SparseCodes over all F features (indices are global feature ids), k = min(k_aux, n_dead)

Only the dead rows of W_enc are multiplied. Decode the result WITHOUT b_dec (and without the skip
term) and compare with the detached residual (``losses.auxk_loss``): the gradient then reaches W_enc
and b_enc through the selected pre-activations, and W_dec through the dead rows, never b_dec.
"""
from __future__ import annotations

from typing import Optional

import torch

from fastclt.codes import SparseCodes
from fastclt.ops.encode import preacts
from fastclt.ops.select import topk

__all__ = ["auxk_select"]


def _check_auxk_args(x: torch.Tensor, W_enc: torch.Tensor, dead_mask: torch.Tensor, k_aux: int) -> None:
    F = W_enc.shape[0]
    if not isinstance(dead_mask, torch.Tensor) or dead_mask.shape != (F,) or dead_mask.dtype != torch.bool:
        got = (f"{dead_mask.dtype} {tuple(dead_mask.shape)}" if isinstance(dead_mask, torch.Tensor)
               else type(dead_mask).__name__)
        raise ValueError(f"dead_mask: expected a bool [{F}] tensor, got {got}")
    if dead_mask.device != x.device:
        raise ValueError(f"dead_mask: expected a tensor on {x.device} (x's device), got {dead_mask.device}")
    if isinstance(k_aux, bool) or not isinstance(k_aux, int):
        raise TypeError(f"k_aux: expected an int, got {type(k_aux).__name__}")
    if k_aux < 1:
        raise ValueError(f"k_aux: expected >= 1, got {k_aux}")


def auxk_select(x: torch.Tensor, W_enc: torch.Tensor, b_enc: Optional[torch.Tensor], dead_mask: torch.Tensor,
                k_aux: int, pre_bias: Optional[torch.Tensor] = None) -> SparseCodes:
    """See the module docstring. Rows with no dead feature give empty codes."""
    _check_auxk_args(x, W_enc, dead_mask, k_aux)
    F = W_enc.shape[0]
    dead = dead_mask.nonzero().squeeze(1)
    B = x.shape[0]
    if dead.numel() == 0 or B == 0:
        return SparseCodes(torch.zeros(B + 1, dtype=torch.int64, device=x.device),
                           torch.zeros(0, dtype=torch.int32, device=x.device), x.new_zeros(0), F)
    h = preacts(x, W_enc[dead], None if b_enc is None else b_enc[dead], pre_bias)
    sel = topk(h, min(k_aux, dead.numel()))
    return SparseCodes(sel.row_ptr, dead[sel.index.long()].to(torch.int32), sel.value, F, sel.k)
