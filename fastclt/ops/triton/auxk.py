"""Fused AuxK selection (docs/DESIGN.md §4): the top k_aux of the *dead* features' pre-activations per token.

    x: [B, d_in] fp32|bf16|fp16, W_enc: [F, d_in] (x's dtype), b_enc: [F] or None,
    dead_mask: [F] bool, pre_bias: [d_in] or None
    → SparseCodes over all F features (global feature ids), k = min(k_aux, n_dead) per row, ReLU applied

Only the dead rows of W_enc are multiplied: they are gathered into a compact [n_dead, d_in] matrix,
and the fused encode GEMM (``fastclt.ops.triton.encode``) runs over it in its TopK candidate mode
(speculative threshold, exact per-row selection, dense recompute of the rows it missed). The dense
[B, n_dead] pre-activations are never written. Identical to ``fastclt.ops.auxk.auxk_select`` up to
ties at the cut.

Backward: the sparse encoder backward of ``encode`` at the selected entries, with global ids, so
``dW_enc`` is non-zero on dead rows only; gradients also reach b_enc, x and pre_bias. Decode the
result WITHOUT b_dec (the caller's job, with the decode op).
"""
from __future__ import annotations

from typing import Optional

import torch

from fastclt.codes import SparseCodes
from fastclt.ops.encoder_backward import folded_bias
from fastclt.ops.reference.auxk import dead_features, empty_codes
from fastclt.ops.triton.encode import _codes, _inner_contiguous, _Pattern, _topk_pattern

__all__ = ["auxk_select"]


def auxk_select(x: torch.Tensor, W_enc: torch.Tensor, b_enc: Optional[torch.Tensor], dead_mask: torch.Tensor,
                k_aux: int, pre_bias: Optional[torch.Tensor] = None, n_dead: Optional[int] = None) -> SparseCodes:
    """See the module docstring. Rows with no dead feature (or B = 0) give empty codes."""
    dead = dead_features(dead_mask, n_dead)
    n_dead = dead.numel()
    if n_dead == 0 or x.shape[0] == 0:
        return empty_codes(x, W_enc.shape[0])
    k = min(k_aux, n_dead)
    x, W_enc = _inner_contiguous(x), _inner_contiguous(W_enc)
    with torch.no_grad():
        W_dead = W_enc.detach().index_select(0, dead)  # compact [n_dead, d_in]
        b_dead = None if b_enc is None else b_enc.detach().index_select(0, dead)
        bias = folded_bias(W_dead, b_dead, pre_bias)
        # no state across calls (key None): the inputs are per-step casts and gathers with nothing
        # stable to key a cache on (a model casts each layer's W_enc separately), and n_dead drifts
        local = _topk_pattern(x.detach(), W_dead, bias, k, None)
        pattern = _Pattern(local.row, dead[local.col.long()].to(torch.int32), local.h)  # global ids, sorted
    return _codes(x, W_enc, b_enc, None, pre_bias, pattern, "topk", 0.01, k)
