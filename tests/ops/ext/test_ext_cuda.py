"""fastclt._C CUDA kernels only: against the CPU kernels, at real sizes, run-to-run determinism, hot
features, concentrated radix digits, misaligned inputs, device mismatch. (Every case of
tests/ops/test_<op>.py and tests/ops/ext/test_ext_kernels.py also runs on CUDA there, as impl
"cuda" or through the ``ext_device`` fixture.)

Nothing here touches CUDA at import time: the skip conditions only ask whether CUDA is available.
"""
from __future__ import annotations

import pytest
import torch

from _encode_cases import compare_fp32, make_inputs
from _select_cases import assert_close_rel, brute_batch_topk_mask, brute_topk_mask, kept_mask, rel_err
from fastclt import _ext, ops
from fastclt.codes import SparseCodes


class _Ext:
    """``ext_ops.<op>(...)``: the op with the extension's implementation for the device of its first
    argument (impl "cpu" or "cuda")."""

    def __getattr__(self, op):
        def call(first, *args, **kwargs):
            t = first if isinstance(first, torch.Tensor) else first.value
            return getattr(ops, op)(first, *args, impl="cuda" if t.device.type == "cuda" else "cpu", **kwargs)
        return call


ext_ops = _Ext()

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
    pytest.mark.skipif(not _ext.has_cuda_ext(), reason=_ext.missing_message("cuda")),
    pytest.mark.usefixtures("poisoned"),
]

needs_cpu_kernels = pytest.mark.skipif(not _ext.has_cpu_ext(), reason=_ext.missing_message("cpu"))


@needs_cpu_kernels
def test_cuda_matches_cpu_kernels():
    """Same selection and (to fp32 rounding) the same decode on both devices."""
    h = torch.randn(64, 1001)
    for fn, k in ((ext_ops.topk, 17), (ext_ops.batch_topk, 17)):
        a, b = fn(h, k), fn(h.cuda(), k)
        assert torch.equal(a.to_dense(1001), b.to_dense(1001).cpu())
    codes = ext_ops.topk(h, 17)
    W = torch.randn(1001, 96)
    y_cpu = ext_ops.sparse_decode(codes, W)
    gpu_codes = SparseCodes(codes.row_ptr.cuda(), codes.index.cuda(), codes.value.cuda(), 1001, 17)
    y_gpu = ext_ops.sparse_decode(gpu_codes, W.cuda())
    assert rel_err(y_gpu.cpu(), y_cpu) < 1e-6


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
@pytest.mark.parametrize("B,F,k", [(4096, 16384, 64), (1031, 24576, 32)])
def test_topk_real_size(B, F, k, dtype):
    h = torch.randn(B, F, device="cuda").to(dtype)
    codes = ext_ops.topk(h, k)
    assert torch.equal(kept_mask(codes, B, F), brute_topk_mask(h, k))  # brute force on the GPU too


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
def test_batch_topk_real_size(dtype):
    B, F, k = 4096, 8192, 32
    h = torch.randn(B, F, device="cuda").to(dtype)
    codes = ext_ops.batch_topk(h, k)
    assert torch.equal(kept_mask(codes, B, F), brute_batch_topk_mask(h, k * B))


@needs_cpu_kernels
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
@pytest.mark.parametrize("kind", ["unit", "narrow", "zeros"])
def test_histogram_concentrated_digits(kind, dtype):
    """Real pre-activations put most keys in a few radix bins (warp-aggregated counting): every
    pass's histogram equals the CPU kernel's, and the selections are exact."""
    g = torch.Generator().manual_seed(3)
    if kind == "unit":  # all in [1, 2): one top digit
        h = 1 + torch.rand(512, 4099, generator=g)
    elif kind == "narrow":  # a few distinct values
        h = torch.randint(0, 3, (512, 4099), generator=g).float() * 0.5 + 1
    else:  # ±0 and a few positives
        h = torch.zeros(512, 4099)
        h[::3] = -0.0
        h[:, ::97] = torch.rand(512, 43, generator=g)
    h = h.to(dtype)
    hc = h.cuda()
    for prefix, bits, digit in ((0, 0, 8), (0, 0, 12)):
        assert torch.equal(torch.ops.fastclt.batch_topk_histogram(hc, prefix, bits, digit).cpu(),
                           torch.ops.fastclt.batch_topk_histogram(h, prefix, bits, digit))
    top = int(torch.ops.fastclt.batch_topk_histogram(h, 0, 0, 8)[:-1].nonzero()[-1])
    assert torch.equal(torch.ops.fastclt.batch_topk_histogram(hc, top, 8, 8).cpu(),
                       torch.ops.fastclt.batch_topk_histogram(h, top, 8, 8))
    assert torch.equal(kept_mask(ext_ops.batch_topk(hc, 7), 512, 4099), brute_batch_topk_mask(h, 7 * 512))
    assert torch.equal(kept_mask(ext_ops.topk(hc, 9), 512, 4099), brute_topk_mask(h, 9))


@needs_cpu_kernels
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
@pytest.mark.parametrize("offset", [1, 3, 5])
def test_misaligned_rows(offset, dtype):
    """Rows that do not start on a 16-byte boundary (odd F, a storage offset): the vector loads'
    scalar head and tail are counted too."""
    B, F = 37, 1001
    base = torch.randn(B * F + offset).to(dtype)
    h = base[offset:].view(B, F)
    hc = base.cuda()[offset:].view(B, F)
    assert hc.data_ptr() % 16 != 0
    assert torch.equal(torch.ops.fastclt.batch_topk_histogram(hc, 0, 0, 8).cpu(),
                       torch.ops.fastclt.batch_topk_histogram(h, 0, 0, 8))
    assert torch.equal(kept_mask(ext_ops.topk(hc, 13), B, F), brute_topk_mask(h, 13))


def test_topk_nan_is_an_error_and_counts_every_row():
    h = torch.randn(3000, 4096, device="cuda")
    h[2999, 4095] = float("nan")
    with pytest.raises(RuntimeError, match="NaN"):
        ext_ops.topk(h, 8)
    h[2999, 4095] = 0.0
    ext_ops.topk(h, 8)  # no NaN left: no error (the count starts at zero each call)


def _hot_codes(B, F, hot, device):
    """Every row holds the features 0..hot-1 (hot features with B entries each) and a few others."""
    g = torch.Generator().manual_seed(5)
    idx = torch.rand(B, F - hot, generator=g).argsort(1)[:, :6] + hot
    idx = torch.cat([torch.arange(hot).expand(B, hot), idx], 1).sort(1).values
    k = idx.shape[1]
    return SparseCodes.from_topk(idx.to(device), torch.randn(B, k, generator=g).to(device), F)


@needs_cpu_kernels
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
@pytest.mark.parametrize("B,F,D", [(3000, 777, 200), (4096, 16384, 768), (1500, 300, 13)])
def test_feature_scatter_hot_features(B, F, D, dtype):
    """Features with thousands of entries are split over several warps (csrc/scatter_plan.h): the
    result equals float64 math and the CPU kernel, bit-identically from run to run."""
    codes = _hot_codes(B, F, 3, "cuda")
    coef = codes.value.to(dtype)
    x = torch.randn(B, D, device="cuda").to(dtype)
    out, cs = torch.ops.fastclt.feature_scatter(codes.row_ptr, codes.index, coef, x, F)
    for _ in range(2):
        again = torch.ops.fastclt.feature_scatter(codes.row_ptr, codes.index, coef, x, F)
        assert torch.equal(again[0], out) and torch.equal(again[1], cs)
    rows = codes.row_ids().cpu()
    idx = codes.index.long().cpu()
    contrib = coef.double().cpu()[:, None] * x.double().cpu()[rows]
    want = torch.zeros(F, D, dtype=torch.float64).index_add_(0, idx, contrib)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert_close_rel(out.cpu(), want, tol, "out")
    want_sum = torch.zeros(F, dtype=torch.float64).index_add_(0, idx, coef.double().cpu())
    assert_close_rel(cs.cpu(), want_sum, 1e-5, "coef_sum")
    cpu = torch.ops.fastclt.feature_scatter(codes.row_ptr.cpu(), codes.index.cpu(), coef.cpu(), x.cpu(), F)
    assert_close_rel(out.cpu(), cpu[0].double(), tol, "out vs the CPU kernel")


def test_feature_scatter_deterministic():
    codes = ext_ops.batch_topk(torch.randn(512, 257, device="cuda"), 16)
    g = torch.randn(512, 64, device="cuda")
    first = torch.ops.fastclt.feature_scatter(codes.row_ptr, codes.index, codes.value, g, 257)[0]
    for _ in range(3):
        again = torch.ops.fastclt.feature_scatter(codes.row_ptr, codes.index, codes.value, g, 257)[0]
        assert torch.equal(first, again)


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
def test_decode_fwd_bwd_real_size(dtype):
    """An SAE-sized decode and its backward against float64 (dvalue, dW, db)."""
    B, F, D, k = 2048, 16384, 2304, 32
    codes = ext_ops.topk(torch.randn(B, F, device="cuda"), k)
    value = codes.value.to(dtype).requires_grad_()
    W = (torch.randn(F, D, device="cuda") / D ** 0.5).to(dtype).requires_grad_()
    b = torch.randn(D, device="cuda").to(dtype).requires_grad_()
    y = ext_ops.sparse_decode(SparseCodes(codes.row_ptr, codes.index, value, F, k), W, b)
    G = torch.randn(B, D, device="cuda").to(dtype)
    (y.float() * G.float()).sum().backward()
    rows, idx = codes.row_ids(), codes.index.long()
    v64, W64, G64 = value.detach().double(), W.detach().double(), G.double()
    y64 = torch.zeros(B, D, dtype=torch.float64, device="cuda").index_add_(0, rows, v64[:, None] * W64[idx])
    y64 += b.detach().double()
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert_close_rel(y.detach(), y64, tol, "y")
    assert_close_rel(value.grad, (G64[rows] * W64[idx]).sum(1), tol, "dvalue")
    dW64 = torch.zeros(F, D, dtype=torch.float64, device="cuda").index_add_(0, idx, v64[:, None] * G64[rows])
    assert_close_rel(W.grad, dW64, tol, "dW")


@pytest.mark.parametrize("act", ["relu", "jumprelu", "topk", "batchtopk"])
def test_encode_real_size(act):
    """The extension's encode (cuBLAS GEMM, CUDA select, sparse encoder backward) at an SAE size
    against the reference: kept set (a few near-tie flips allowed: GEMMs sum in other orders),
    codes and every gradient."""
    B, d, F = 4096, 768, 16384
    inputs = make_inputs(B, d, F, torch.float32, seed=30, pre_bias=True, device="cuda")
    upstream = torch.randn(B, F, dtype=torch.float64, generator=torch.Generator().manual_seed(31)).cuda()
    compare_fp32(ext_ops.encode, act, 32, inputs, upstream, allowed_flips=B * F // 10**5)


def test_large_batch_topk():
    h = torch.randn(2048, 4096, device="cuda")
    codes = ext_ops.batch_topk(h, 32)
    mask = brute_batch_topk_mask(h, 32 * 2048)
    assert torch.equal(kept_mask(codes, 2048, 4096), mask)


def test_device_mismatch():
    h = torch.randn(4, 37, device="cuda")
    codes = ext_ops.topk(h, 3)
    with pytest.raises(RuntimeError, match="weight is on"):
        torch.ops.fastclt.sparse_decode(codes.row_ptr, codes.index, codes.value, torch.randn(37, 8), None)
