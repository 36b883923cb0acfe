"""The training statistics of a batch's codes (``code_stats``), in PyTorch: the reference of the op.

For L layers' codes (one SparseCodes per layer, features 0..F−1 each) it returns

    fmin    fp32 [L, F]  each feature's smallest active (> 0) value in the batch, +inf where the
                         feature has no active entry (a NaN value is not active)
    active  int64 [L]    the active entries of each layer

from which a model reads which features fired (``isfinite(fmin)``), its L0 (``active / B``) and
the cut statistics of a TopK/BatchTopK → JumpReLU conversion. Not differentiable (bookkeeping).
A fixed number of ops whatever L and no device synchronisation: the layers' entries are
concatenated with layer offsets and reduced by feature in one scatter.
"""
from __future__ import annotations

import torch

__all__ = ["code_stats"]


@torch.no_grad()
def code_stats(codes: list, n_features: int) -> tuple[torch.Tensor, torch.Tensor]:
    """codes: L SparseCodes (one device), n_features: F → (fmin fp32 [L, F], active int64 [L])."""
    L, F = len(codes), n_features
    v = torch.cat([c.value.detach() for c in codes]).float()
    idx = torch.cat([c.index.long() + l * F if l else c.index.long() for l, c in enumerate(codes)])
    active = v > 0
    fmin = torch.full((L * F,), float("inf"), device=v.device)
    fmin.scatter_reduce_(0, idx, torch.where(active, v, float("inf")), reduce="amin")
    counts = torch.stack([a.sum() for a in active.split([c.nnz for c in codes])])
    return fmin.view(L, F), counts
