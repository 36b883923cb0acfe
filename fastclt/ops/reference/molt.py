"""Reference MOLT transforms (a sparse mixture of low-rank linear transforms; docs/DESIGN.md §16).

Layout. T transforms in rank groups ``rank_groups = ((n_1, r_1), (n_2, r_2), …)``: the first n_1
transforms have rank r_1, the next n_2 rank r_2, and so on. Transform i owns the r_i consecutive
rows ``rank_ptr[i] : rank_ptr[i+1]`` of the packed factors

    V: [R, d_in]    (the rows of V_i: V_i x projects x onto r_i directions)
    U: [R, d_out]   (the rows of U_iᵀ: U_i h writes h back to d_out)

with R = Σ_i r_i, so that A_i = U_i V_i = U[rows_i]ᵀ V[rows_i] (d_out × d_in, never formed).

``molt_decode(codes, x, U, V, rank_groups, b_dec)``: the gates g (``codes``, CSR over T) applied:

    y[b] = Σ_{j ∈ row b} g_j · U_{i_j} (V_{i_j} x[b])  (+ b_dec)

Gradients: dg_j = ⟨U_iᵀ dy_b, V_i x_b⟩, dU_i = Σ_j g_j (V_i x_b) dy_bᵀ, dV_i = Σ_j g_j (U_iᵀ dy_b) x_bᵀ,
dx_b = Σ_j g_j V_iᵀ U_iᵀ dy_b, db_dec = Σ_b dy_b. Accumulation is fp32 (fp64 for fp64 inputs);
y has U's dtype. The reference is the dense formulation, every transform on every token (h = x Vᵀ:
[B, R], gated per rank row, y = h U: two dense GEMMs; the eager baseline of the benchmarks); the
kernels (``ext/molt.py``, ``triton/molt.py``) touch only the active (token, transform) pairs,
grouped by transform.

``molt_norms(U, V, rank_groups)``: ‖A_i‖_F for every transform from r_i × r_i Gram matrices,
‖U_i V_i‖_F² = ⟨U_iᵀU_i, V_i V_iᵀ⟩ (batched per rank group; O(Σ r_i² d) instead of O(Σ r_i d²)),
differentiable, in fp32 (fp64 for fp64 factors). Not dispatched: batched matmuls.
"""
from __future__ import annotations

import itertools
from functools import lru_cache
from typing import Optional, Sequence

import torch

from fastclt.codes import SparseCodes
from fastclt.ops._checks import check_rank_groups
from fastclt.ops.constants import on_device
from fastclt.ops.reference.decode import acc_dtype

__all__ = ["molt_decode", "molt_norms", "rank_ptr", "transform_of_rank_row", "molt_sizes"]


def molt_sizes(groups: tuple) -> tuple[int, int, int]:
    """(T transforms, R packed rank rows, the largest rank) of checked rank groups."""
    return sum(n for n, _ in groups), sum(n * r for n, r in groups), max(r for n, r in groups if n)


def rank_ptr(rank_groups: Sequence, device: torch.device) -> torch.Tensor:
    """int64 [T + 1] on ``device``: transform i owns the packed rows rank_ptr[i] : rank_ptr[i+1]
    (made once per layout and device, ``fastclt.ops.constants``: no host-to-device copy per call)."""
    return on_device(_rank_ends(check_rank_groups(rank_groups)), torch.int64, device)


@lru_cache(maxsize=64)
def _rank_ends(groups: tuple) -> tuple:
    """(0, r_0, r_0 + r_1, …): the packed rows' transform boundaries of checked rank groups."""
    return tuple(itertools.accumulate((r for n, r in groups for _ in range(n)), initial=0))


def transform_of_rank_row(rank_groups: Sequence, device: torch.device) -> torch.Tensor:
    """int64 [R]: the transform that owns each packed row (from ``rank_ptr``: no host-to-device copy)."""
    groups = check_rank_groups(rank_groups)
    T, R, _ = molt_sizes(groups)
    return torch.repeat_interleave(torch.arange(T, device=device), rank_ptr(groups, device).diff(), output_size=R)


def molt_decode(codes: SparseCodes, x: torch.Tensor, U: torch.Tensor, V: torch.Tensor, rank_groups: Sequence,
                b_dec: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The dense formulation (every transform on every token): h = x Vᵀ [B, R], each rank row
    scaled by its transform's gate (zero where inactive), y = h U (+ b_dec). Autograd gives every
    gradient. O(B · R · (d_in + d_out)) work and an [B, R] activation."""
    groups = check_rank_groups(rank_groups)
    T = molt_sizes(groups)[0]
    acc = acc_dtype(U.dtype)
    g = codes.to_dense(T).to(acc)  # [B, T]
    row_gate = g.index_select(1, transform_of_rank_row(groups, x.device))  # [B, R]
    h = x.to(acc) @ V.to(acc).T
    y = (h * row_gate) @ U.to(acc)
    if b_dec is not None:
        y = y + b_dec.to(acc)
    return y.to(U.dtype)


def _sqrt0(x: torch.Tensor) -> torch.Tensor:
    """sqrt(x) for x ≥ 0 with a zero (not NaN) gradient where x = 0."""
    pos = x > 0
    return torch.where(pos, x, torch.ones_like(x)).sqrt() * pos


def molt_norms(U: torch.Tensor, V: torch.Tensor, rank_groups: Sequence) -> torch.Tensor:
    """U: [R, d_out], V: [R, d_in] → ‖U_i V_i‖_F for the T transforms, [T] in fp32 (fp64 for fp64
    factors), from the Gram matrices of each rank group (batched matmuls; autocast off: the norms
    of bf16-autocast training are computed from the fp32 weights)."""
    groups = check_rank_groups(rank_groups)
    R = molt_sizes(groups)[1]
    if U.dim() != 2 or V.dim() != 2 or U.shape[0] != R or V.shape[0] != R:
        raise ValueError(f"U, V: expected [R={R}, d] each, got {tuple(U.shape)} and {tuple(V.shape)}")
    acc = acc_dtype(U.dtype)
    groups = tuple(g for g in groups if g[0])
    sizes = [n * r for n, r in groups]
    with torch.autocast(U.device.type, enabled=False):
        out = []
        # split, not slices: the backward concatenates the groups' gradients once
        for (n, r), Ug, Vg in zip(groups, U.split(sizes, 0), V.split(sizes, 0)):
            Ug, Vg = Ug.to(acc).view(n, r, -1), Vg.to(acc).view(n, r, -1)
            gram_u = Ug @ Ug.transpose(1, 2)  # [n, r, r] = U_iᵀ U_i
            gram_v = Vg @ Vg.transpose(1, 2)  # V_i V_iᵀ
            out.append((gram_u * gram_v).sum((1, 2)))
        return _sqrt0(torch.cat(out).clamp_min(0))
