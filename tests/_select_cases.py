"""Shared helpers of the selection tests (tests/ops/test_select.py, tests/ops/ext/): brute-force
float64 selections (ties to the lowest index), CSR checks and input makers with adversarial kinds
(ties, ±Inf, sorted data)."""
from __future__ import annotations

import torch

from fastclt.codes import SparseCodes

DTYPES = (torch.float32, torch.bfloat16)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """RMSE over the reference's RMS (absolute floor 1e-6): robust for long reductions."""
    out, ref = out.double(), ref.double()
    if ref.numel() == 0:
        return 0.0
    return ((out - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt().clamp_min(1e-6)).item()


def assert_close_rel(out, ref, tol, what):
    err = rel_err(out, ref)
    if err > tol:
        diff = (out.double() - ref.double()).abs()
        worst = diff.flatten().topk(min(5, diff.numel())).indices.tolist()
        raise AssertionError(f"{what}: relative error {err:.3g} > {tol:.3g}; worst flat positions {worst}: "
                             f"{out.flatten()[worst].tolist()} vs {ref.flatten()[worst].tolist()}")


def brute_topk_mask(h: torch.Tensor, k: int) -> torch.Tensor:
    """bool [B, F]: the k largest per row, ties to the lowest index (stable descending sort)."""
    order = torch.sort(h.double(), dim=1, descending=True, stable=True).indices[:, :k]
    return torch.zeros(h.shape, dtype=torch.bool).scatter_(1, order.cpu(), True)


def brute_batch_topk_mask(h: torch.Tensor, n: int) -> torch.Tensor:
    """bool [h.shape]: the n largest of the whole tensor, ties to the lowest flat index."""
    order = torch.sort(h.double().flatten(), descending=True, stable=True).indices[:n]
    return torch.zeros(h.numel(), dtype=torch.bool).scatter_(0, order.cpu(), True).view(h.shape)


def check_codes_wellformed(codes: SparseCodes, B: int, F: int):
    rp, idx = codes.row_ptr.cpu(), codes.index.cpu()
    assert rp.shape == (B + 1,) and rp[0] == 0 and rp[-1] == codes.nnz and bool((rp.diff() >= 0).all())
    assert bool(((idx >= 0) & (idx < F)).all()), "index out of range (unwritten output?)"
    assert not bool(codes.value.isnan().any()), "NaN in value (unwritten output?)"


def kept_mask(codes: SparseCodes, B: int, F: int) -> torch.Tensor:
    """bool [B, F]: the stored entries (including stored zeros)."""
    mask = torch.zeros(B, F, dtype=torch.bool)
    mask[codes.row_ids().cpu(), codes.index.long().cpu()] = True
    return mask


def make_h(B, F, dtype, device, kind="randn", seed=0):
    g = torch.Generator().manual_seed(seed)
    if kind == "randn":
        h = torch.randn(B, F, generator=g)
    elif kind == "ties":  # few distinct values: many ties, zeros and negatives
        h = torch.randint(-3, 4, (B, F), generator=g).float() / 2
    elif kind == "equal":
        h = torch.full((B, F), 0.75)
    elif kind == "negties":  # all negative, few distinct values: the cut falls inside a tie group
        h = -torch.randint(1, 5, (B, F), generator=g).float() / 2
    elif kind == "negative":
        h = -torch.rand(B, F, generator=g) - 0.1
    elif kind == "ascending":  # increasing along the flat order: every block's maximum at its end
        h = torch.linspace(-2.0, 3.0, B * F).view(B, F)
    elif kind == "descending":
        h = torch.linspace(3.0, -2.0, B * F).view(B, F)
    elif kind == "hotrow":  # the largest entries of the batch all in one row (and one column)
        h = torch.randn(B, F, generator=g)
        if B:
            h[B // 2] += 4.0
            h[:, F // 3] += 6.0
    elif kind == "inf":
        h = torch.randn(B, F, generator=g)
        h[:, ::5] = float("inf")
        h[:, 1::7] = float("-inf")
        h[:, 2::9] = 0.0
        h[:, 3::9] = -0.0
    else:
        raise ValueError(kind)
    return h.to(dtype).to(device)
