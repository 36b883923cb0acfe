"""Triton sparse_decode and feature_scatter vs the reference op and fp64 dense math.

Runs on a GPU at real sizes, or on the CPU under TRITON_INTERPRET=1 at tiny sizes (set below,
before Triton kernels are defined).
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import subprocess
import sys
import zlib

import pytest

triton = pytest.importorskip("triton")

from fastclt.codes import SparseCodes  # noqa: E402
from fastclt.ops import decode as ref  # noqa: E402
from fastclt.ops.triton import sparse_decode as tsd  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
GPU = DEVICE.type == "cuda"
# (B, F, D, k): odd sizes, not multiples of any block size
# D = 300: several 256-column blocks; on a GPU also real sizes
SIZES = [(13, 37, 45, 5), (3, 7, 1, 1), (4, 9, 300, 3)] + ([(1031, 4099, 771, 32), (4096, 16384, 2304, 64)] if GPU else [])
DTYPES = [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.float32, torch.bfloat16)]


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


def make_codes(kind: str, B: int, F: int, k: int, gen: torch.Generator, dtype) -> SparseCodes:
    """Random duplicate-free codes. 'topk': k per row; 'csr': row lengths 0..k, row 0 empty and
    feature F−1 in every other row; 'hot': k=1 and every row on the same feature."""
    if kind == "topk":
        idx = torch.rand(B, F, generator=gen).argsort(1)[:, :k]
        val = torch.randn(B, k, generator=gen)
        return SparseCodes.from_topk(idx.to(DEVICE), val.to(DEVICE, dtype), F)
    if kind == "hot":
        idx = torch.full((B, 1), int(torch.randint(F, (1,), generator=gen)))
        val = torch.randn(B, 1, generator=gen)
        return SparseCodes.from_topk(idx.to(DEVICE), val.to(DEVICE, dtype), F)
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
    return SparseCodes(row_ptr.to(DEVICE), index.to(DEVICE), value.to(DEVICE, dtype), F)


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


def cases(kind, B, F, D, k, vdt, wdt, seed):
    gen = torch.Generator().manual_seed(seed)
    codes = make_codes(kind, B, F, k, gen, vdt)
    W = torch.randn(F, D, generator=gen).to(DEVICE, wdt)
    b = torch.randn(D, generator=gen).to(DEVICE, wdt)
    g = torch.randn(B, D, generator=gen).to(DEVICE, wdt)  # the upstream gradient comes in y's dtype
    return codes, W, b, g


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("kind", ["topk", "csr", "hot"])
@pytest.mark.parametrize("vdt,wdt", DTYPES)
def test_sparse_decode_forward_backward(size, kind, vdt, wdt):
    B, F, D, k = size
    codes, W, b, g = cases(kind, B, F, D, k, vdt, wdt, seed=zlib.crc32(repr((size, kind, vdt, wdt)).encode()))
    got = run(tsd.sparse_decode, codes, W, b, g)
    eager = run(ref.sparse_decode, codes, W, b, g)
    exact = run(dense64, codes.with_value(codes.value.double()), W.double(), b.double(), g.double())
    names = ("y", "dvalue", "dW", "db")
    for name, out, e, x in zip(names, got, eager, exact):
        assert out.dtype == e.dtype, f"{name}: dtype {out.dtype} != reference {e.dtype}"
        if wdt == torch.float32 and vdt == torch.float32:
            check_close(name + " vs fp64", out, x, 1e-5)
            check_close(name + " vs reference", out, e, 1e-5)
        else:  # kernel error vs fp64 at most ~2x the eager bf16 error, plus a floor of one bf16 ulp
            check_close(name + " vs fp64", out, x, 2 * rel_err(e, x) + 2**-8)


def test_sparse_decode_fp16():
    codes, W, b, g = cases("csr", 13, 37, 45, 5, torch.float16, torch.float16, seed=16)
    got = run(tsd.sparse_decode, codes, W, b, g)
    eager = run(ref.sparse_decode, codes, W, b, g)
    exact = run(dense64, codes.with_value(codes.value.double()), W.double(), b.double(), g.double())
    for name, out, e, x in zip(("y", "dvalue", "dW", "db"), got, eager, exact):
        assert out.dtype == torch.float16
        check_close(name + " vs fp64", out, x, 2 * rel_err(e, x) + 2**-11)


def test_sparse_decode_3d_weight_no_bias():
    gen = torch.Generator().manual_seed(1)
    B, F, T, d, k = 11, 29, 3, 7, 4
    codes = make_codes("csr", B, F, k, gen, torch.float32)
    W = torch.randn(F, T, d, generator=gen).to(DEVICE)
    b = torch.randn(T, d, generator=gen).to(DEVICE)
    g = torch.randn(B, T, d, generator=gen).to(DEVICE)
    for bias in (None, b):
        got = run(tsd.sparse_decode, codes, W, bias, g)
        want = run(ref.sparse_decode, codes, W, bias, g)
        for name, out, e in zip(("y", "dvalue", "dW", "db"), got, want):
            check_close(name, out, e, 1e-5)


def test_sparse_decode_deterministic():
    B, F, D, k = (2048, 512, 640, 32) if GPU else (13, 11, 45, 6)  # few features: long segments per feature
    codes, W, b, g = cases("topk", B, F, D, k, torch.float32, torch.float32, seed=7)
    first = run(tsd.sparse_decode, codes, W, b, g)
    second = run(tsd.sparse_decode, codes, W, b, g)
    for x, y in zip(first, second):
        assert torch.equal(x, y)


@pytest.mark.parametrize("chunk", [1, 4])
@pytest.mark.parametrize("kind", ["hot", "csr"])
def test_sparse_decode_hot_feature_chunks(monkeypatch, chunk, kind):
    """Features with more than SEGMENT_CHUNK entries are walked in chunks + an ordered reduction."""
    monkeypatch.setattr(tsd, "SEGMENT_CHUNK", chunk)
    codes, W, b, g = cases(kind, 13, 11, 300, 6, torch.float32, torch.float32, seed=chunk)
    got = run(tsd.sparse_decode, codes, W, b, g)
    again = run(tsd.sparse_decode, codes, W, b, g)
    exact = run(dense64, codes.with_value(codes.value.double()), W.double(), b.double(), g.double())
    for name, out, x, y in zip(("y", "dvalue", "dW", "db"), got, exact, again):
        check_close(name + " vs fp64", out, x, 1e-5)
        assert torch.equal(out, y), f"{name}: not deterministic"


@pytest.mark.parametrize("B", [0, 5])
def test_sparse_decode_empty(B):
    gen = torch.Generator().manual_seed(3)
    F, D = 9, 17
    codes = SparseCodes(torch.zeros(B + 1, dtype=torch.int64, device=DEVICE),
                        torch.zeros(0, dtype=torch.int32, device=DEVICE), torch.zeros(0, device=DEVICE), F)
    W = torch.randn(F, D, generator=gen).to(DEVICE)
    b = torch.randn(D, generator=gen).to(DEVICE)
    g = torch.randn(B, D, generator=gen).to(DEVICE)
    y, dv, dW, db = run(tsd.sparse_decode, codes, W, b, g)
    assert torch.equal(y, b.expand(B, D))
    assert dv.shape == (0,) and torch.equal(dW, torch.zeros_like(W))
    assert torch.allclose(db, g.sum(0))
    assert tsd.sparse_decode(codes, W).shape == (B, D)


def test_feature_scatter_and_sum():
    gen = torch.Generator().manual_seed(5)
    N, R, F, D = (20000, 3000, 700, 300) if GPU else (57, 13, 23, 37)
    index = torch.randint(F - 3, (N,), generator=gen).to(DEVICE)  # the last 3 features have no entry
    row = torch.randint(R, (N,), generator=gen).to(DEVICE, torch.int32)
    coef = torch.randn(N, generator=gen).to(DEVICE)
    G = torch.randn(R, 2 * D, generator=gen).to(DEVICE)[:, D:]  # a row-strided view
    want = torch.zeros(F, D, dtype=torch.float64, device=DEVICE).index_add_(
        0, index, coef.double()[:, None] * G.double()[row.long()])
    got = tsd.feature_scatter(index, row, coef, G, F)
    assert got.dtype == torch.float32
    check_close("feature_scatter", got, want, 1e-6)
    assert torch.equal(got[-3:], torch.zeros(3, D, device=DEVICE))
    segs = tsd.feature_segments(index.to(torch.int32), F)
    assert torch.equal(tsd.feature_scatter(index.to(torch.int32), row, coef, G, F, segments=segs), got)
    for chunk in (2, 5):  # hot-feature chunks, bounds of the chunk tables
        tsd.SEGMENT_CHUNK, default = chunk, tsd.SEGMENT_CHUNK
        try:
            check_close(f"feature_scatter chunk={chunk}", tsd.feature_scatter(index, row, coef, G, F), want, 1e-6)
        finally:
            tsd.SEGMENT_CHUNK = default
    s = tsd.feature_sum(index, coef, F, segments=segs)
    check_close("feature_sum", s, torch.zeros(F, dtype=torch.float64, device=DEVICE).index_add_(0, index, coef.double()), 1e-6)
    assert tsd.feature_scatter(index[:0], row[:0], coef[:0], G, F).abs().sum() == 0


def test_feature_scatter_dot():
    gen = torch.Generator().manual_seed(12)
    N, R, F, D = (20000, 3000, 700, 300) if GPU else (41, 9, 17, 300)  # D spans several blocks
    index = torch.randint(F, (N,), generator=gen).to(DEVICE, torch.int32)
    row = torch.randint(R, (N,), generator=gen).to(DEVICE)
    coef = torch.randn(N, generator=gen).to(DEVICE, torch.bfloat16)
    G = torch.randn(R, D, generator=gen).to(DEVICE)
    W = torch.randn(F, D, generator=gen).to(DEVICE, torch.bfloat16)
    dW, dot = tsd.feature_scatter_dot(index, row, coef, G, W)
    assert dW.dtype == dot.dtype == torch.float32
    assert torch.equal(dW, tsd.feature_scatter(index, row, coef, G, F))
    dW16, dot16 = tsd.feature_scatter_dot(index, row, coef, G, W, out_dtype=torch.bfloat16)
    assert dW16.dtype == torch.bfloat16 and torch.equal(dot16, dot)
    # one rounding of the fp32 sums (the Triton 3.9 interpreter truncates fp32 → bf16; GPUs round to nearest)
    assert ((dW16.float() - dW).abs() <= dW.abs() * 2**-7).all()
    want = (G.double()[row] * W.double()[index.long()]).sum(1)
    check_close("feature_scatter_dot", dot, want, 1e-6)
    tsd.SEGMENT_CHUNK, default = 3, tsd.SEGMENT_CHUNK  # hot features walked in chunks
    try:
        dW3, dot3 = tsd.feature_scatter_dot(index, row, coef, G, W)
    finally:
        tsd.SEGMENT_CHUNK = default
    check_close("feature_scatter_dot chunked dW", dW3, dW, 1e-6)
    assert torch.equal(dot3, dot)  # each dot is still one program's sum


@pytest.mark.parametrize("need", ["value", "W"])
def test_sparse_decode_partial_grads(need):
    codes, W, b, g = cases("csr", 13, 37, 45, 5, torch.float32, torch.float32, seed=13)

    def grad(fn):
        c = with_leaf(codes) if need == "value" else codes
        Wl = W.clone().requires_grad_() if need == "W" else W
        return torch.autograd.grad(fn(c, Wl, b), c.value if need == "value" else Wl, g)[0]

    check_close("d" + need, grad(tsd.sparse_decode), grad(ref.sparse_decode), 1e-5)


def test_gather_decode_raw():
    gen = torch.Generator().manual_seed(6)
    codes, W, b, _ = cases("csr", 9, 21, 33, 5, torch.bfloat16, torch.float32, seed=6)
    y = tsd.gather_decode(codes.row_ptr, codes.index, codes.value, W, out_dtype=torch.float32)
    check_close("gather_decode", y, ref.sparse_decode(codes, W), 1e-5)
    G = torch.randn(9, 33, generator=gen).to(DEVICE)
    dots = tsd.gather_dot(codes.row_ptr, codes.index, W, G)
    want = (G[codes.row_ids()] * W[codes.index.long()]).sum(1)
    check_close("gather_dot", dots, want, 1e-5)


def test_sparse_decode_bad_inputs():
    codes, W, b, _ = cases("topk", 5, 8, 6, 2, torch.float32, torch.float32, seed=9)
    with pytest.raises(ValueError, match="W_dec"):
        tsd.sparse_decode(codes, W[:, 0])
    with pytest.raises(ValueError, match="W_dec"):
        tsd.sparse_decode(codes, W[None, None])
    with pytest.raises(TypeError, match="W_dec"):
        tsd.sparse_decode(codes, W.double())
    with pytest.raises(TypeError, match="codes.value"):
        tsd.sparse_decode(codes.with_value(codes.value.double()), W)
    with pytest.raises(ValueError, match="W_dec"):
        tsd.sparse_decode(codes, torch.randn(6, 8, device=DEVICE).t())  # non-unit inner stride
    with pytest.raises(ValueError, match="W_dec"):
        tsd.sparse_decode(codes, torch.randn(8, 3, 2, device=DEVICE).transpose(1, 2))  # [F, T, d] rows not contiguous
    with pytest.raises(ValueError, match="W_dec"):
        tsd.sparse_decode(codes, W.to("meta"))  # device mismatch
    with pytest.raises(ValueError, match="W_dec"):
        tsd.sparse_decode(codes, W[:7])  # n_features mismatch
    with pytest.raises(ValueError, match="b_dec"):
        tsd.sparse_decode(codes, W, b[:5])
    with pytest.raises(TypeError, match="codes"):
        tsd.sparse_decode((codes.index, codes.value), W)
    # a row-strided (non-contiguous) W with contiguous rows is accepted
    Wwide = torch.randn(8, 12, device=DEVICE)
    check_close("row-strided W", tsd.sparse_decode(codes, Wwide[:, 3:9]), ref.sparse_decode(codes, Wwide[:, 3:9]), 1e-6)


def test_registration_and_dispatch():
    from fastclt import ops
    from fastclt.ops import _dispatch
    from fastclt.ops.triton import available, register_triton_impls

    register_triton_impls()
    assert available(DEVICE)
    assert available(torch.device("meta")) is False or os.environ.get("TRITON_INTERPRET") == "1"
    name, fn = _dispatch.resolve("sparse_decode", "triton", DEVICE)
    assert name == "triton" and fn is tsd.sparse_decode
    codes, W, b, _ = cases("topk", 4, 8, 6, 2, torch.float32, torch.float32, seed=11)
    check_close("dispatch", ops.sparse_decode(codes, W, b, impl="triton"), ref.sparse_decode(codes, W, b), 1e-6)


def test_package_import_is_cheap():
    code = "import sys, fastclt.ops.triton; assert 'triton' not in sys.modules, 'triton imported'"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env,
                   cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
