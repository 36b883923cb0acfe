"""Cases shared by the decode tests (tests/ops/test_decode.py, test_clt_decode.py and the backends'
own): random codes of several shapes, a run that returns the output and every gradient, and the
independent fp64 oracles (dense codes @ W)."""
from __future__ import annotations

import torch

from fastclt.codes import SparseCodes


def rel_err(out: torch.Tensor, want: torch.Tensor) -> float:
    out, want = out.detach().double(), want.detach().double()
    return float((out - want).norm() / want.norm().clamp_min(1e-12))


def check_close(name, out, want, tol):
    assert out.shape == want.shape, f"{name}: shape {tuple(out.shape)} != {tuple(want.shape)}"
    assert torch.isfinite(out).all(), f"{name}: non-finite elements at {(~torch.isfinite(out)).nonzero()[:10].tolist()}"
    err = rel_err(out, want)
    if err > tol:
        diff = (out.detach().double() - want.detach().double()).abs()
        worst = diff.flatten().topk(min(5, diff.numel())).indices
        raise AssertionError(f"{name}: relative RMSE {err:.3g} > {tol:.3g}; worst flat indices {worst.tolist()}")


# ----------------------------------------------------------------------------- sparse_decode
def make_codes(kind: str, B: int, F: int, k: int, gen: torch.Generator, dtype, device) -> SparseCodes:
    """Random duplicate-free codes. 'topk': k per row; 'csr': row lengths 0..k, row 0 empty and
    feature F−1 in every other row; 'hot': k=1 and every row on the same feature."""
    if kind == "topk":
        idx = torch.rand(B, F, generator=gen).argsort(1)[:, :k]
        val = torch.randn(B, k, generator=gen)
        return SparseCodes.from_topk(idx.to(device), val.to(device, dtype), F)
    if kind == "hot":
        idx = torch.full((B, 1), int(torch.randint(F, (1,), generator=gen)))
        val = torch.randn(B, 1, generator=gen)
        return SparseCodes.from_topk(idx.to(device), val.to(device, dtype), F)
    lengths = torch.randint(1, k + 1, (B,), generator=gen)
    lengths[0] = 0
    rows, cols = [], []
    for b in range(B):
        n = int(lengths[b])
        if n == 0:
            continue
        others = torch.randperm(F - 1, generator=gen)[: n - 1]
        cols.append(torch.cat([others, torch.tensor([F - 1])]))
        rows.append(torch.full((n,), b))
    row_ptr = torch.zeros(B + 1, dtype=torch.int64)
    row_ptr[1:] = lengths.cumsum(0)
    index = torch.cat(cols).to(torch.int32)
    value = torch.randn(index.shape[0], generator=gen)
    return SparseCodes(row_ptr.to(device), index.to(device), value.to(device, dtype), F)


def with_leaf(codes: SparseCodes, dtype=None) -> SparseCodes:
    v = codes.value.detach().to(dtype or codes.value.dtype).clone().requires_grad_()
    return codes.with_value(v)


def run(fn, codes, W, b, g):
    """Forward, then the gradients of ⟨y, g⟩ wrt (value, W, b)."""
    codes, W = with_leaf(codes), W.detach().clone().requires_grad_()
    b = b.detach().clone().requires_grad_() if b is not None else None
    y = fn(codes, W, b)
    leaves = [codes.value, W] + ([b] if b is not None else [])
    return (y, *torch.autograd.grad(y, leaves, g.to(y.dtype)))


def dense64(codes, W, b):
    """Independent oracle: codes.to_dense(F) @ W (+ b) in fp64."""
    y = codes.to_dense(W.shape[0]) @ W.reshape(W.shape[0], -1)
    if b is not None:
        y = y + b.reshape(-1)
    return y.view(codes.batch_size, *W.shape[1:])


def cases(kind, B, F, D, k, vdt, wdt, seed, device):
    gen = torch.Generator().manual_seed(seed)
    codes = make_codes(kind, B, F, k, gen, vdt, device)
    W = torch.randn(F, D, generator=gen).to(device, wdt)
    b = torch.randn(D, generator=gen).to(device, wdt)
    g = torch.randn(B, D, generator=gen).to(device, wdt)  # the upstream gradient comes in y's dtype
    return codes, W, b, g


# -------------------------------------------------------------------------------- clt_decode
AFFINES = [None, "both", "offset", "scale"]


def make_clt_codes(B, F, k, gen, dtype, layer, device):
    """Duplicate-free codes with row lengths 1..k (row 0 empty on layer 1, feature 0 in every row of
    layer 0), about a third of the values ≤ 0 (inactive band entries for the affine's 1[a > 0])."""
    lengths = torch.randint(1, k + 1, (B,), generator=gen)
    if layer == 1:
        lengths[0] = 0
    cols = []
    for b in range(B):
        n = int(lengths[b])
        if layer == 0:
            cols.append(torch.cat([torch.tensor([0]), 1 + torch.randperm(F - 1, generator=gen)[: n - 1]]))
        else:
            cols.append(torch.randperm(F, generator=gen)[:n])
    row_ptr = torch.zeros(B + 1, dtype=torch.int64)
    row_ptr[1:] = lengths.cumsum(0)
    index = torch.cat(cols).to(torch.int32)
    value = torch.randn(index.shape[0], generator=gen) + 0.4
    value[value.abs() < 0.2] = 0.0 if layer == 2 else 0.5  # explicit zero entries on one layer
    return SparseCodes(row_ptr.to(device), index.to(device), value.to(device, dtype), F)


def make_clt_inputs(tying, affine, dtype, size, seed, device):
    B, L, F, d, k = size
    gen = torch.Generator().manual_seed(seed)
    codes = [make_clt_codes(B, F, k, gen, dtype, s, device) for s in range(L)]
    if tying == "none":
        W = [torch.randn(F, L - s, d, generator=gen).to(device, dtype) for s in range(L)]
    else:
        W = torch.randn(L, F, d, generator=gen).to(device, dtype)
    b = torch.randn(L, d, generator=gen).to(device, dtype)
    off = sc = None
    if affine in ("both", "offset"):
        off = (0.5 * torch.randn(L, F, generator=gen)).to(device, dtype)
    if affine in ("both", "scale"):
        sc = (1 + 0.3 * torch.randn(L, F, generator=gen)).to(device, dtype)
    g = torch.randn(B, L, d, generator=gen).to(device, dtype)  # upstream gradient in ŷ's dtype
    return codes, W, b, off, sc, g


def run_clt(fn, codes, W, tying, b, off, sc, g, dtype=None):
    """Forward and the gradients of ⟨ŷ, g⟩ wrt every value, W, b, offset, scale (inputs cast to dtype)."""
    def leaf(t):
        return None if t is None else t.detach().to(dtype or t.dtype).clone().requires_grad_()
    codes = [c.with_value(leaf(c.value)) for c in codes]
    W = [leaf(w) for w in W] if isinstance(W, list) else leaf(W)
    b, off, sc = leaf(b), leaf(off), leaf(sc)
    y = fn(codes, W, tying, b, off, sc)
    leaves = [c.value for c in codes] + (W if isinstance(W, list) else [W]) + [t for t in (b, off, sc) if t is not None]
    return (y, *torch.autograd.grad(y, leaves, g.to(y.dtype)))


def clt_dense64(codes, W, tying, b, off, sc):
    """Independent oracle: ŷ_t = Σ_{s≤t} g_t(A_s) @ W_{s→t} + b_t with dense A_s = codes[s].to_dense(F)."""
    L = len(codes)
    F = W[0].shape[0] if tying == "none" else W.shape[1]
    A = [c.to_dense(F) for c in codes]
    outs = []
    for t in range(L):
        acc = 0
        for s in range(t + 1):
            a = A[s]
            if off is not None:
                a = a + off[t] * (a.detach() > 0)
            if sc is not None:
                a = a * sc[t]
            Wst = W[s][:, t - s] if tying == "none" else (W[s] if tying == "per_source" else W[t])
            acc = acc + a @ Wst
        outs.append(acc + (b[t] if b is not None else 0))
    return torch.stack(outs, 1)


def clt_grad_names(tying, L, affine):
    names = ["y"] + [f"dvalue[{s}]" for s in range(L)] + ([f"dW[{s}]" for s in range(L)] if tying == "none" else ["dW"])
    return (names + ["db"] + (["doffset"] if affine in ("both", "offset") else [])
            + (["dscale"] if affine in ("both", "scale") else []))
