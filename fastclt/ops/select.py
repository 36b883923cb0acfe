"""Reference selections (SPEC §3): TopK per token and BatchTopK per batch, ReLU applied.

    topk(h [B, F], k)                 → codes with exactly k entries per row
    batch_topk(h [B, F], k)           → codes with exactly k·B entries over the whole batch
    batch_topk_layers(h [L, B, F], k) → L codes with exactly k·B·L entries over all layers together

Kept values are ``relu(h)`` at the kept entries; gradients reach h at those entries only.
Ties at the cut are broken by ``torch.topk`` (arbitrarily, as SPEC allows); the count is exact.
"""
from __future__ import annotations

import torch

from fastclt.codes import SparseCodes

__all__ = ["topk", "batch_topk", "batch_topk_layers", "check_k"]


def check_k(k: int, n_features: int, name: str = "k") -> None:
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"{name}: expected an int, got {type(k).__name__}")
    if not 1 <= k <= n_features:
        raise ValueError(f"{name}: expected 1 <= {name} <= n_features={n_features}, got {k}")


def _check_h(h: torch.Tensor, rank: int, layout: str) -> None:
    if not isinstance(h, torch.Tensor) or not h.is_floating_point():
        raise TypeError(f"h: expected a floating-point tensor {layout}, got {type(h).__name__}"
                        + (f" of dtype {h.dtype}" if isinstance(h, torch.Tensor) else ""))
    if h.dim() != rank:
        raise ValueError(f"h: expected {layout}, got shape {tuple(h.shape)}")


def topk(h: torch.Tensor, k: int) -> SparseCodes:
    """h: [B, F] fp32|bf16 → SparseCodes with k entries per row (``codes.k == k``)."""
    _check_h(h, 2, "[B, F]")
    check_k(k, h.shape[1])
    _, idx = torch.topk(h.detach(), k, dim=1, sorted=False)
    return SparseCodes.from_topk(idx, torch.relu(h.gather(1, idx)), h.shape[1])


def _flat_topk_to_codes(flat: torch.Tensor, keep: int, B: int, F: int, n_layers: int) -> list[SparseCodes]:
    _, idx = torch.topk(flat.detach(), keep, sorted=False)
    idx, _ = torch.sort(idx)  # layer-major, then row-major: CSR order
    value = torch.relu(flat[idx])
    per_layer = B * F
    layer = torch.div(idx, per_layer, rounding_mode="floor")
    within = idx - layer * per_layer
    row = torch.div(within, F, rounding_mode="floor")
    col = (within - row * F).to(torch.int32)
    counts = torch.bincount(layer * B + row, minlength=n_layers * B).view(n_layers, B)
    layer_sizes = counts.sum(1).tolist()
    out = []
    start = 0
    for l in range(n_layers):
        n = layer_sizes[l]
        row_ptr = torch.zeros(B + 1, dtype=torch.int64, device=flat.device)
        row_ptr[1:] = torch.cumsum(counts[l], 0)
        out.append(SparseCodes(row_ptr, col[start:start + n], value[start:start + n], F))
        start += n
    return out


def batch_topk(h: torch.Tensor, k: int) -> SparseCodes:
    """h: [B, F] → SparseCodes with exactly k·B entries, the largest of the whole batch."""
    _check_h(h, 2, "[B, F]")
    check_k(k, h.shape[1])
    B, F = h.shape
    if B == 0:
        return SparseCodes(torch.zeros(1, dtype=torch.int64, device=h.device),
                           torch.zeros(0, dtype=torch.int32, device=h.device), h.new_zeros(0), F)
    return _flat_topk_to_codes(h.reshape(-1), k * B, B, F, 1)[0]


def batch_topk_layers(h: torch.Tensor, k: int) -> list[SparseCodes]:
    """h: [L, B, F] → L SparseCodes holding exactly k·B·L entries over all layers together
    (BatchTopK "across layers"); a layer may keep more or fewer than k·B."""
    _check_h(h, 3, "[L, B, F]")
    L, B, F = h.shape
    check_k(k, F)
    if B == 0:
        return [batch_topk(h[l], k) for l in range(L)]
    return _flat_topk_to_codes(h.reshape(-1), k * B * L, B, F, L)
