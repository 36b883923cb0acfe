"""sparse_decode (fastclt/ops/{reference,triton,ext}/decode.py): the reference against dense float64
math, and every kernel implementation against the reference and independent fp64 dense math —
forward and every gradient (value, W_dec, b_dec), fp32, bf16, fp32 values with bf16 weights, fp16
where taken, [F, T, d] decoders, odd sizes (several column blocks), an empty row, a feature in
every row, explicit zeros, partial gradients, B = 0, NaN-poisoned outputs, determinism, bad input.
On a GPU also real sizes. Backend-only behaviour: tests/ops/triton/test_triton_kernels.py,
tests/ops/ext/."""
import functools
import zlib

import pytest
import torch

from _decode_cases import cases, check_close, dense64, make_codes, rel_err, run, with_leaf
from _impls import GPU, impl_params, takes
from _select_cases import assert_close_rel, brute_topk_mask
from _util import assert_close
from fastclt import ops
from fastclt.codes import SparseCodes
from fastclt.ops import _registry
from fastclt.ops.reference.decode import sparse_decode as ref_decode

KERNELS = impl_params("sparse_decode")
# (B, F, D, k): odd sizes, not multiples of any block size; D = 300: several 256-column blocks
SIZES = [(13, 37, 45, 5), (3, 7, 1, 1), (4, 9, 300, 3)] + ([(1031, 4099, 771, 32), (4096, 16384, 2304, 64)]
                                                           if GPU else [])
DTYPES = [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.float32, torch.bfloat16)]


def decode_with(impl):
    return functools.partial(ops.sparse_decode, impl=impl)


def randn(gen, *shape):
    return torch.randn(*shape, generator=gen, dtype=torch.float64)


# ------------------------------------------------------------------------- the reference
@pytest.mark.parametrize("D_shape", [(13,), (3, 5)])
def test_reference_against_dense(gen, D_shape):
    B, F = 9, 31
    a = torch.relu(randn(gen, B, F)) * (randn(gen, B, F) > 0.8)
    a[4] = 0  # a row with no active feature
    a[:, 7] = randn(gen, B).abs() + 0.1  # a feature active in every row
    codes = SparseCodes.from_dense(a)
    value = codes.value.clone().requires_grad_()
    codes = codes.with_value(value)
    W = randn(gen, F, *D_shape).requires_grad_()
    b = randn(gen, *D_shape).requires_grad_()
    y = ops.sparse_decode(codes, W, b, impl="reference")
    ref = (a @ W.detach().reshape(F, -1)).reshape(B, *D_shape) + b.detach()
    assert_close(y, ref, 1e-12, "y")
    g = randn(gen, B, *D_shape)
    y.backward(g)
    gf = g.reshape(B, -1)
    rows, cols = codes.row_ids(), codes.index.long()
    assert_close(value.grad, (gf[rows] * W.detach().reshape(F, -1)[cols]).sum(1), 1e-12, "dvalue")
    assert_close(W.grad.reshape(F, -1), a.T @ gf, 1e-12, "dW")
    assert_close(b.grad, g.sum(0), 1e-12, "db")


# ----------------------------------------------------------------- kernels vs the reference
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("kind", ["topk", "csr", "hot"])
@pytest.mark.parametrize("vdt,wdt", DTYPES)
@pytest.mark.parametrize("impl,device", KERNELS)
def test_forward_backward(impl, device, size, kind, vdt, wdt, poisoned):
    B, F, D, k = size
    codes, W, b, g = cases(kind, B, F, D, k, vdt, wdt, zlib.crc32(repr((size, kind, vdt, wdt)).encode()), device)
    got = run(decode_with(impl), codes, W, b, g)
    eager = run(ref_decode, codes, W, b, g)
    exact = run(dense64, codes.with_value(codes.value.double()), W.double(), b.double(), g.double())
    # a kernel may round fp32 values to a bf16 decoder's dtype in its backward scatter (the extension's
    # does): the error that rounding alone makes is within its budget too
    rounded = run(dense64, codes.with_value(codes.value.to(wdt).double()), W.double(), b.double(), g.double())
    names = ("y", "dvalue", "dW", "db")
    for name, out, e, x, xr in zip(names, got, eager, exact, rounded):
        assert out.dtype == e.dtype, f"{name}: dtype {out.dtype} != reference {e.dtype}"
        if wdt == torch.float32 and vdt == torch.float32:
            check_close(name + " vs fp64", out, x, 1e-5)
            check_close(name + " vs reference", out, e, 1e-5)
        else:  # kernel error vs fp64 at most ~2x the eager bf16 error, plus a floor of one bf16 ulp
            check_close(name + " vs fp64", out, x, 2 * max(rel_err(e, x), rel_err(xr, x)) + 2**-8)


@pytest.mark.parametrize("impl,device", KERNELS)
def test_fp16(impl, device, poisoned):
    takes("sparse_decode", impl, torch.float16)
    codes, W, b, g = cases("csr", 13, 37, 45, 5, torch.float16, torch.float16, 16, device)
    got = run(decode_with(impl), codes, W, b, g)
    eager = run(ref_decode, codes, W, b, g)
    exact = run(dense64, codes.with_value(codes.value.double()), W.double(), b.double(), g.double())
    for name, out, e, x in zip(("y", "dvalue", "dW", "db"), got, eager, exact):
        assert out.dtype == torch.float16
        check_close(name + " vs fp64", out, x, 2 * rel_err(e, x) + 2**-11)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B,F,D,bias", [(9, 37, 24, True), (13, 101, 7, False), (0, 11, 5, True), (6, 5, 33, True)])
@pytest.mark.parametrize("impl,device", KERNELS)
def test_random_csr_against_float64(impl, device, B, F, D, bias, dtype, poisoned):
    """Random row lengths (an empty row, a feature repeated within a row or across rows, a zero
    weight row): forward and gradients against float64 autograd from the same rounded inputs; rows of
    unused features get a zero gradient."""
    g = torch.Generator().manual_seed(1)
    lengths = torch.randint(0, 6, (B,), generator=g)
    lengths[: min(B, 1)] = 0  # an empty row
    row_ptr = torch.zeros(B + 1, dtype=torch.int64)
    row_ptr[1:] = lengths.cumsum(0)
    nnz = int(row_ptr[-1])
    index = torch.randint(0, F, (nnz,), generator=g, dtype=torch.int32)
    if nnz > 3:
        index[1] = index[0]  # a repeated feature, within a row or across rows
    value = torch.randn(nnz, generator=g)
    W = torch.randn(F, D, generator=g)
    W[F // 2] = 0.0  # (irrelevant values stay finite)
    b = torch.randn(D, generator=g) if bias else None
    G = torch.randn(B, D, generator=g)

    value_t = value.to(dtype).to(device).requires_grad_()
    W_t = W.to(dtype).to(device).requires_grad_()
    b_t = b.to(dtype).to(device).requires_grad_() if bias else None
    codes = SparseCodes(row_ptr.to(device), index.to(device), value_t, F)
    y = ops.sparse_decode(codes, W_t, b_t, impl=impl)
    assert y.shape == (B, D) and y.dtype == dtype and not bool(y.isnan().any())
    (y * G.to(dtype).to(device)).sum().backward()

    # float64 reference through autograd, from the same (rounded) inputs
    v64 = value_t.detach().double().cpu().requires_grad_()
    W64 = W_t.detach().double().cpu().requires_grad_()
    b64 = b_t.detach().double().cpu().requires_grad_() if bias else None
    rows = torch.repeat_interleave(torch.arange(B), lengths)
    dense = torch.zeros(B, F, dtype=torch.float64).index_put((rows, index.long()), v64, accumulate=True)
    y64 = dense @ W64 + (b64 if bias else 0)
    (y64 * G.to(dtype).double()).sum().backward()

    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert_close_rel(y.detach().cpu(), y64.detach(), tol, "y")
    assert_close_rel(value_t.grad.cpu(), v64.grad, tol, "dvalue")
    assert_close_rel(W_t.grad.cpu(), W64.grad, tol, "dW")
    untouched = torch.ones(F, dtype=torch.bool)
    untouched[index.long()] = False
    assert bool((W_t.grad.cpu()[untouched] == 0).all()), "rows of unused features must be zero"
    if bias:
        assert_close_rel(b_t.grad.cpu(), b64.grad, tol, "db")


@pytest.mark.parametrize("impl,device", KERNELS)
def test_matches_the_reference_op(impl, device):
    h = torch.randn(24, 77, device=device)
    codes = ops.topk(h, 5)
    W, b = torch.randn(77, 19, device=device), torch.randn(19, device=device)
    assert_close_rel(ops.sparse_decode(codes, W, b, impl=impl), ref_decode(codes, W, b), 1e-5, "y")


@pytest.mark.parametrize("impl,device", KERNELS)
def test_topk_decode_end_to_end_grad(impl, device):
    """TopK -> decode: gradients reach h, W_dec, b_dec as in dense float64 math."""
    B, F, D, k = 10, 64, 12, 6
    h = torch.randn(B, F, dtype=torch.float64)
    W = torch.randn(F, D, dtype=torch.float64)
    b = torch.randn(D, dtype=torch.float64)
    G = torch.randn(B, D, dtype=torch.float64)
    hs, Ws, bs = (t.float().to(device).requires_grad_() for t in (h, W, b))
    (ops.sparse_decode(ops.topk(hs, k), Ws, bs, impl=impl) * G.float().to(device)).sum().backward()
    hr, Wr, br = (t.clone().requires_grad_() for t in (h, W, b))
    a = torch.where(brute_topk_mask(h, k), hr.clamp_min(0), torch.zeros((), dtype=torch.float64))
    ((a @ Wr + br) * G).sum().backward()
    for got, ref, name in ((hs.grad, hr.grad, "dh"), (Ws.grad, Wr.grad, "dW"), (bs.grad, br.grad, "db")):
        assert_close_rel(got.cpu(), ref, 1e-5, name)


@pytest.mark.parametrize("impl,device", KERNELS)
def test_3d_decoder(impl, device):
    """A [F, T, d] decoder decodes as [F, T*d] and returns [B, T, d]; b_dec may be [T, d] or absent."""
    codes = ops.topk(torch.randn(7, 30, device=device), 4)
    W = torch.randn(30, 3, 5, device=device)
    b = torch.randn(3, 5, device=device)
    y = ops.sparse_decode(codes, W, b, impl=impl)
    assert y.shape == (7, 3, 5)
    ref = (codes.to_dense(30).double() @ W.double().reshape(30, 15) + b.double().reshape(15)).view(7, 3, 5)
    assert_close_rel(y.cpu(), ref.cpu(), 1e-6, "y")
    gen = torch.Generator().manual_seed(1)
    B, F, T, d, k = 11, 29, 3, 7, 4
    codes = make_codes("csr", B, F, k, gen, torch.float32, device)
    W = torch.randn(F, T, d, generator=gen).to(device)
    b = torch.randn(T, d, generator=gen).to(device)
    g = torch.randn(B, T, d, generator=gen).to(device)
    for bias in (None, b):
        got = run(decode_with(impl), codes, W, bias, g)
        want = run(ref_decode, codes, W, bias, g)
        for name, out, e in zip(("y", "dvalue", "dW", "db"), got, want):
            check_close(name, out, e, 1e-5)


@pytest.mark.parametrize("impl,device", KERNELS)
def test_deterministic(impl, device):
    B, F, D, k = (2048, 512, 640, 32) if GPU else (13, 11, 45, 6)  # few features: long segments per feature
    codes, W, b, g = cases("topk", B, F, D, k, torch.float32, torch.float32, 7, device)
    first = run(decode_with(impl), codes, W, b, g)
    second = run(decode_with(impl), codes, W, b, g)
    for x, y in zip(first, second):
        assert torch.equal(x, y)


@pytest.mark.parametrize("B", [0, 5])
@pytest.mark.parametrize("impl,device", KERNELS)
def test_empty(impl, device, B, poisoned):
    gen = torch.Generator().manual_seed(3)
    F, D = 9, 17
    codes = SparseCodes(torch.zeros(B + 1, dtype=torch.int64, device=device),
                        torch.zeros(0, dtype=torch.int32, device=device), torch.zeros(0, device=device), F)
    W = torch.randn(F, D, generator=gen).to(device)
    b = torch.randn(D, generator=gen).to(device)
    g = torch.randn(B, D, generator=gen).to(device)
    y, dv, dW, db = run(decode_with(impl), codes, W, b, g)
    assert torch.equal(y, b.expand(B, D))
    assert dv.shape == (0,) and torch.equal(dW, torch.zeros_like(W))
    assert torch.allclose(db, g.sum(0))
    assert ops.sparse_decode(codes, W, impl=impl).shape == (B, D)


@pytest.mark.parametrize("need", ["value", "W"])
@pytest.mark.parametrize("impl,device", KERNELS)
def test_partial_grads(impl, device, need):
    codes, W, b, g = cases("csr", 13, 37, 45, 5, torch.float32, torch.float32, 13, device)

    def grad(fn):
        c = with_leaf(codes) if need == "value" else codes
        Wl = W.clone().requires_grad_() if need == "W" else W
        return torch.autograd.grad(fn(c, Wl, b), c.value if need == "value" else Wl, g)[0]

    check_close("d" + need, grad(decode_with(impl)), grad(ref_decode), 1e-5)


@pytest.mark.parametrize("impl,device", KERNELS)
def test_fp64_runs_the_reference(impl, device):
    if {e.impl: e for e in _registry.entries("sparse_decode")}[impl].takes(torch.float64):
        pytest.skip(f"impl {impl!r} takes fp64 itself (tests/ops/test_density.py checks it in fp64)")
    h = torch.randn(5, 21, dtype=torch.float64, device=device)
    codes = ops.topk(h.float(), 3)
    W = torch.randn(21, 4, dtype=torch.float64, device=device)
    assert ops.resolve("sparse_decode", impl, torch.device(device), torch.float64)[0] == "reference"
    assert ops.sparse_decode(codes, W, impl=impl).dtype == torch.float64


@pytest.mark.parametrize("impl,device", impl_params("sparse_decode", reference=True))
def test_bad_input(impl, device):
    """Checked once by the entry point, the same for every implementation."""
    codes, W, b, _ = cases("topk", 5, 8, 6, 2, torch.float32, torch.float32, 9, device)
    dec = decode_with(impl)
    with pytest.raises(ValueError, match="W_dec"):
        dec(codes, W[:, 0])
    with pytest.raises(ValueError, match="W_dec"):
        dec(codes, W[None, None])
    with pytest.raises(ValueError, match="W_dec"):
        dec(codes, W.to("meta"))  # device mismatch
    with pytest.raises(ValueError, match="W_dec: codes have n_features=8 but W_dec has 7 rows"):
        dec(codes, W[:7])  # n_features mismatch
    with pytest.raises(ValueError, match="b_dec"):
        dec(codes, W, b[:5])
    with pytest.raises(TypeError, match="codes"):
        dec((codes.index, codes.value), W)
    # a row-strided (non-contiguous) W with contiguous rows is accepted
    Wwide = torch.randn(8, 12, device=device)
    check_close("row-strided W", dec(codes, Wwide[:, 3:9]), ref_decode(codes, Wwide[:, 3:9]), 1e-6)
