"""Triton clt_decode (tyings none / per_source / per_target, feature affine) vs the reference op and
independent fp64 dense math, forward and every gradient.

Runs on a GPU at real sizes, or on the CPU under TRITON_INTERPRET=1 at tiny sizes (set below,
before Triton kernels are defined).
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import zlib

import pytest

triton = pytest.importorskip("triton")

from fastclt.codes import SparseCodes  # noqa: E402
from fastclt.ops import decode as ref  # noqa: E402
from fastclt.ops.triton import clt_decode as tcd  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
GPU = DEVICE.type == "cuda"
# (B, L, F, d, k): odd sizes
SIZE = (1031, 6, 4099, 771, 32) if GPU else (7, 3, 13, 13, 4)
AFFINES = [None, "both", "offset", "scale"]


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    """Every launcher output starts as NaN: an element a kernel forgets to write fails the test."""
    monkeypatch.setenv("FASTCLT_POISON", "1")


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


def make_codes(B, F, k, gen, dtype, layer):
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
    return SparseCodes(row_ptr.to(DEVICE), index.to(DEVICE), value.to(DEVICE, dtype), F)


def make_inputs(tying, affine, dtype, size, seed):
    B, L, F, d, k = size
    gen = torch.Generator().manual_seed(seed)
    codes = [make_codes(B, F, k, gen, dtype, s) for s in range(L)]
    if tying == "none":
        W = [torch.randn(F, L - s, d, generator=gen).to(DEVICE, dtype) for s in range(L)]
    else:
        W = torch.randn(L, F, d, generator=gen).to(DEVICE, dtype)
    b = torch.randn(L, d, generator=gen).to(DEVICE, dtype)
    off = sc = None
    if affine in ("both", "offset"):
        off = (0.5 * torch.randn(L, F, generator=gen)).to(DEVICE, dtype)
    if affine in ("both", "scale"):
        sc = (1 + 0.3 * torch.randn(L, F, generator=gen)).to(DEVICE, dtype)
    g = torch.randn(B, L, d, generator=gen).to(DEVICE, dtype)  # upstream gradient in ŷ's dtype
    return codes, W, b, off, sc, g


def run(fn, codes, W, tying, b, off, sc, g, dtype=None):
    """Forward and the gradients of ⟨ŷ, g⟩ wrt every value, W, b, offset, scale (inputs cast to dtype)."""
    def leaf(t):
        return None if t is None else t.detach().to(dtype or t.dtype).clone().requires_grad_()
    codes = [c.with_value(leaf(c.value)) for c in codes]
    W = [leaf(w) for w in W] if isinstance(W, list) else leaf(W)
    b, off, sc = leaf(b), leaf(off), leaf(sc)
    y = fn(codes, W, tying, b, off, sc)
    leaves = [c.value for c in codes] + (W if isinstance(W, list) else [W]) + [t for t in (b, off, sc) if t is not None]
    return (y, *torch.autograd.grad(y, leaves, g.to(y.dtype)))


def dense64(codes, W, tying, b, off, sc):
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


def grad_names(tying, L, affine):
    names = ["y"] + [f"dvalue[{s}]" for s in range(L)] + ([f"dW[{s}]" for s in range(L)] if tying == "none" else ["dW"])
    return names + ["db"] + (["doffset"] if affine in ("both", "offset") else []) + (["dscale"] if affine in ("both", "scale") else [])


CASES = [("none", None)] + [(t, a) for t in ("per_source", "per_target") for a in AFFINES]
# bf16: every tying, with no affine and with both parts (one-sided affines are covered in fp32)
PARAMS = [(t, a, torch.float32) for t, a in CASES] + [(t, a, torch.bfloat16) for t, a in CASES if a in (None, "both")]


@pytest.mark.parametrize("tying,affine,dtype", PARAMS)
def test_clt_decode_forward_backward(tying, affine, dtype):
    inputs = make_inputs(tying, affine, dtype, SIZE, seed=zlib.crc32(repr((tying, affine, dtype)).encode()))
    got = run(tcd.clt_decode, *inputs[:1], inputs[1], tying, *inputs[2:])
    eager = run(ref.clt_decode, *inputs[:1], inputs[1], tying, *inputs[2:])
    exact = run(dense64, *inputs[:1], inputs[1], tying, *inputs[2:], dtype=torch.float64)
    names = grad_names(tying, SIZE[1], affine)
    assert len(names) == len(got)
    for name, out, e, x in zip(names, got, eager, exact):
        assert out.dtype == e.dtype, f"{name}: dtype {out.dtype} != reference {e.dtype}"
        if dtype == torch.float32:
            check_close(name + " vs fp64", out, x, 1e-5)
            check_close(name + " vs reference", out, e, 1e-5)
        else:  # kernel error vs fp64 at most ~2x the eager bf16 error, plus a floor of one bf16 ulp
            check_close(name + " vs fp64", out, x, 2 * rel_err(e, x) + 2**-8)


@pytest.mark.parametrize("tying,affine", [("none", None), ("per_source", None), ("per_target", "both")])
def test_clt_decode_wide(tying, affine):
    """d = 137: several column blocks per program (and a (L−s)·d = 411 wide untied block)."""
    size = (3, 3, 11, 137, 3)
    inputs = make_inputs(tying, affine, torch.float32, size, seed=zlib.crc32(repr((tying, "wide")).encode()))
    got = run(tcd.clt_decode, inputs[0], inputs[1], tying, *inputs[2:])
    want = run(dense64, inputs[0], inputs[1], tying, *inputs[2:], dtype=torch.float64)
    for name, out, x in zip(grad_names(tying, size[1], affine), got, want):
        check_close(name + " vs fp64", out, x, 1e-5)


@pytest.mark.parametrize("tying,affine", [("none", None), ("per_source", "both"), ("per_target", "both")])
def test_clt_decode_hot_feature_chunks(monkeypatch, tying, affine):
    """Weight/affine gradients with every feature above the hot-feature chunk size."""
    from fastclt.ops.triton import sparse_decode as tsd
    monkeypatch.setattr(tsd, "SEGMENT_CHUNK", 2)
    inputs = make_inputs(tying, affine, torch.float32, SIZE, seed=zlib.crc32(repr((tying, "hot")).encode()))
    got = run(tcd.clt_decode, inputs[0], inputs[1], tying, *inputs[2:])
    want = run(dense64, inputs[0], inputs[1], tying, *inputs[2:], dtype=torch.float64)
    for name, out, x in zip(grad_names(tying, SIZE[1], affine), got, want):
        check_close(name + " vs fp64", out, x, 1e-5)


@pytest.mark.parametrize("tying", ["none", "per_source", "per_target"])
@pytest.mark.parametrize("frozen", ["W", "value"])
def test_clt_decode_partial_grads(tying, frozen):
    """Only the values (W frozen) or only W (values frozen) need a gradient."""
    codes, W, b, _, _, g = make_inputs(tying, None, torch.float32, SIZE, seed=zlib.crc32(repr((tying, frozen)).encode()))

    def grads(fn):
        cs = [c.with_value(c.value.detach().clone().requires_grad_(frozen == "W")) for c in codes]
        Wl = ([w.clone().requires_grad_(frozen == "value") for w in W] if isinstance(W, list)
              else W.clone().requires_grad_(frozen == "value"))
        leaves = [c.value for c in cs] if frozen == "W" else (Wl if isinstance(Wl, list) else [Wl])
        return torch.autograd.grad(fn(cs, Wl, tying, b), leaves, g)

    for i, (out, want) in enumerate(zip(grads(tcd.clt_decode), grads(ref.clt_decode))):
        check_close(f"grad {i}", out, want, 1e-5)


@pytest.mark.parametrize("tying", ["per_source", "per_target"])
def test_clt_decode_frozen_weights_affine(tying):
    """W frozen, affine trained: dvalue and the per-(entry, target) dots come from the dot kernel."""
    codes, W, b, off, sc, g = make_inputs(tying, "both", torch.float32, SIZE, seed=zlib.crc32(tying.encode()))

    def grads(fn, dtype):
        cs = [c.with_value(c.value.detach().to(dtype).requires_grad_()) for c in codes]
        o, s = off.detach().to(dtype).requires_grad_(), sc.detach().to(dtype).requires_grad_()
        y = fn(cs, W.to(dtype), tying, b.to(dtype), o, s)
        return torch.autograd.grad(y, [c.value for c in cs] + [o, s], g.to(dtype))

    names = [f"dvalue[{s}]" for s in range(SIZE[1])] + ["doffset", "dscale"]
    for name, out, want in zip(names, grads(tcd.clt_decode, torch.float32), grads(dense64, torch.float64)):
        check_close(name, out, want, 1e-5)


@pytest.mark.parametrize("tying", ["none", "per_source", "per_target"])
def test_clt_decode_single_layer_no_bias(tying):
    B, _, F, d, k = SIZE
    inputs = make_inputs(tying, None, torch.float32, (B, 1, F, d, k), seed=21)
    codes, W, _, _, _, g = inputs
    got = run(tcd.clt_decode, codes, W, tying, None, None, None, g)
    want = run(ref.clt_decode, codes, W, tying, None, None, None, g)
    for name, out, e in zip(grad_names(tying, 1, None), got, want):
        check_close(name, out, e, 1e-5)


@pytest.mark.parametrize("tying,affine", [("none", None), ("per_source", None), ("per_target", "both")])
def test_clt_decode_deterministic(tying, affine):
    inputs = make_inputs(tying, affine, torch.float32, SIZE, seed=33)
    first = run(tcd.clt_decode, inputs[0], inputs[1], tying, *inputs[2:])
    second = run(tcd.clt_decode, inputs[0], inputs[1], tying, *inputs[2:])
    for x, y in zip(first, second):
        assert torch.equal(x, y)


@pytest.mark.parametrize("tying", ["none", "per_target"])
@pytest.mark.parametrize("B", [0, 4])
def test_clt_decode_empty(tying, B):
    L, F, d = 3, 7, 5
    gen = torch.Generator().manual_seed(4)
    codes = [SparseCodes(torch.zeros(B + 1, dtype=torch.int64, device=DEVICE),
                         torch.zeros(0, dtype=torch.int32, device=DEVICE), torch.zeros(0, device=DEVICE), F)
             for _ in range(L)]
    W = ([torch.randn(F, L - s, d, generator=gen).to(DEVICE) for s in range(L)] if tying == "none"
         else torch.randn(L, F, d, generator=gen).to(DEVICE))
    b = torch.randn(L, d, generator=gen).to(DEVICE)
    sc = torch.randn(L, F, generator=gen).to(DEVICE) if tying != "none" else None
    g = torch.randn(B, L, d, generator=gen).to(DEVICE)
    got = run(tcd.clt_decode, codes, W, tying, b, None, sc, g)
    assert torch.equal(got[0], b.expand(B, L, d))
    for out in got[1 + L:]:
        assert torch.isfinite(out).all()
    assert torch.allclose(got[-2 if sc is not None else -1], g.sum(0))


def test_clt_decode_bad_inputs():
    codes, W, b, off, sc, _ = make_inputs("per_source", "both", torch.float32, (5, 3, 8, 6, 2), seed=8)
    Wn = make_inputs("none", None, torch.float32, (5, 3, 8, 6, 2), seed=8)[1]
    with pytest.raises(ValueError, match="tying"):
        tcd.clt_decode(codes, W, "tied")
    with pytest.raises(ValueError, match="W_dec"):
        tcd.clt_decode(codes, W[:2], "per_source")
    with pytest.raises(ValueError, match="W_dec"):
        tcd.clt_decode(codes, Wn[:2], "none")
    with pytest.raises(ValueError, match=r"W_dec\[1\]"):
        tcd.clt_decode(codes, [Wn[0], Wn[0][:, :2], Wn[2].transpose(0, 1)], "none")
    with pytest.raises(ValueError, match=r"W_dec\[2\]"):
        tcd.clt_decode(codes, [Wn[0], Wn[1], torch.randn(6, 1, 8, device=DEVICE).permute(2, 1, 0)], "none")
    with pytest.raises(ValueError, match="feature_offset"):
        tcd.clt_decode(codes, Wn, "none", feature_offset=off)
    with pytest.raises(TypeError, match="W_dec"):
        tcd.clt_decode(codes, W.double(), "per_target")
    with pytest.raises(ValueError, match="W_dec"):
        tcd.clt_decode(codes, W.to("meta"), "per_target")
    with pytest.raises(ValueError, match="W_dec"):
        tcd.clt_decode(codes, W.transpose(1, 2).contiguous().transpose(1, 2), "per_target")
    with pytest.raises(ValueError, match="b_dec"):
        tcd.clt_decode(codes, W, "per_target", b_dec=b[:2])
    with pytest.raises(ValueError, match="feature_scale"):
        tcd.clt_decode(codes, W, "per_target", feature_scale=sc[:, :5])
    with pytest.raises(ValueError, match=r"codes\[1\]"):
        tcd.clt_decode([codes[0], SparseCodes.from_topk(codes[0].index[:4].view(2, 2), codes[0].value[:4].view(2, 2), 8),
                        codes[2]], W, "per_target")
