"""fastclt._C kernels against brute force (float64) and, when present, the reference ops, on every
device the extension runs on here (the ``ext_device`` fixture of tests/conftest.py: the CPU kernels,
and CUDA when built and a GPU is present); then the CPU-only ops. CUDA-only cases (against the CPU
kernels, real sizes, determinism) are in tests/test_ext_cuda.py. Outputs are NaN-poisoned
(fastclt._C.set_poison_outputs) so that an element a kernel forgot to write fails the test.
"""
from __future__ import annotations

import threading

import pytest
import torch

from _ext_util import (DTYPES, assert_close_rel, brute_batch_topk_mask, brute_topk_mask, check_codes_wellformed,
                       kept_mask, make_h)
from fastclt import _ext
from fastclt.codes import SparseCodes
from fastclt.ops import decode, ext_ops, select

pytestmark = pytest.mark.usefixtures("poisoned")


# ------------------------------------------------------------------------------- topk
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,F,k,kind", [
    (7, 37, 5, "randn"), (5, 1001, 32, "randn"), (4, 37, 1, "randn"), (4, 37, 37, "randn"),
    (6, 40, 9, "ties"), (3, 16, 4, "equal"), (5, 23, 6, "negative"), (6, 45, 12, "inf"),
    (0, 37, 3, "randn"), (3, 300, 100, "randn"), (5, 64, 10, "negties"),
    # k * 16 <= F: the block-maximum bound and filter (csrc/cpu/select_cpu.cpp topk_row)
    (4, 600, 8, "ties"), (3, 512, 4, "equal"), (4, 777, 6, "inf"), (5, 640, 10, "negties"),
    (3, 1003, 7, "ascending"), (3, 999, 5, "descending"), (6, 500, 3, "hotrow"), (2, 4099, 256, "randn"),
])
def test_topk_forward(ext_device, B, F, k, kind, dtype):
    h = make_h(B, F, dtype, ext_device, kind)
    codes = ext_ops.topk(h, k)
    check_codes_wellformed(codes, B, F)
    assert codes.k == k and codes.nnz == B * k
    idx = codes.index.view(B, k).cpu()
    assert bool((idx[:, 1:] > idx[:, :-1]).all()), "indices must be ascending and distinct per row"
    mask = brute_topk_mask(h.cpu(), k)
    assert torch.equal(kept_mask(codes, B, F), mask)
    expected = torch.where(mask, h.cpu().float().clamp_min(0), torch.zeros(()))
    assert torch.equal(codes.to_dense(F).cpu().float(), expected)
    assert codes.value.dtype == dtype


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("op", ["topk", "batch_topk"])
def test_select_backward(ext_device, op, dtype):
    """dh = dvalue at the kept entries where h > 0, zero elsewhere (ties in h)."""
    B, F, k = (9, 101, 7) if op == "topk" else (12, 53, 4)
    h = make_h(B, F, dtype, ext_device, "ties", seed=3).requires_grad_()
    G = torch.randn(B, F).to(dtype).to(ext_device)
    (getattr(ext_ops, op)(h, k).to_dense(F) * G).sum().backward()
    kept = brute_topk_mask(h.detach().cpu(), k) if op == "topk" else brute_batch_topk_mask(h.detach().cpu(), k * B)
    mask = kept & (h.detach().cpu() > 0)
    assert torch.equal(h.grad.cpu(), torch.where(mask, G.cpu(), torch.zeros((), dtype=dtype)))


def test_topk_matches_reference_op(ext_device):
    h = make_h(16, 257, torch.float32, ext_device)
    assert torch.equal(ext_ops.topk(h, 11).to_dense(257), select.topk(h, 11).to_dense(257))


# -------------------------------------------------------------------------- batch_topk
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,F,k,kind", [
    (8, 37, 5, "randn"), (16, 1001, 8, "randn"), (4, 37, 1, "randn"), (4, 37, 37, "randn"),
    (6, 40, 9, "ties"), (3, 16, 4, "equal"), (5, 23, 6, "negative"), (6, 45, 12, "inf"), (0, 37, 3, "randn"),
    (7, 50, 9, "negties"),
    # k*B * 16 <= numel: the block-maximum bound and filter (csrc/cpu/select_cpu.cpp batch_topk)
    (8, 400, 3, "ties"), (6, 160, 1, "equal"), (9, 333, 2, "inf"), (7, 500, 4, "negties"),
    (10, 321, 3, "ascending"), (10, 321, 3, "descending"), (12, 250, 5, "hotrow"), (64, 2053, 32, "randn"),
    (4, 37, 12, "ties"), (5, 200, 20, "negties"),  # blocks of 3 and 10 entries
])
def test_batch_topk_forward(ext_device, B, F, k, kind, dtype):
    h = make_h(B, F, dtype, ext_device, kind)
    codes = ext_ops.batch_topk(h, k)
    check_codes_wellformed(codes, B, F)
    assert codes.nnz == k * B and codes.n_features == F
    mask = brute_batch_topk_mask(h.cpu(), k * B)
    assert torch.equal(kept_mask(codes, B, F), mask)
    expected = torch.where(mask, h.cpu().float().clamp_min(0), torch.zeros(()))
    assert torch.equal(codes.to_dense(F).cpu().float(), expected)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("L,B,F,k,kind", [(3, 8, 37, 5, "randn"), (2, 5, 40, 7, "ties"), (4, 0, 11, 2, "randn"),
                                          (3, 9, 400, 4, "hotrow"), (2, 6, 513, 3, "ties")])
def test_batch_topk_layers(ext_device, L, B, F, k, kind, dtype):
    h = torch.stack([make_h(B, F, dtype, ext_device, kind, seed=s) for s in range(L)])
    h.requires_grad_()
    codes = ext_ops.batch_topk_layers(h, k)
    assert len(codes) == L and sum(c.nnz for c in codes) == k * B * L
    for c in codes:
        check_codes_wellformed(c, B, F)
    mask = brute_batch_topk_mask(h.detach().cpu(), k * B * L)
    got = torch.stack([kept_mask(c, B, F) for c in codes])
    assert torch.equal(got, mask)
    G = torch.randn(L, B, F).to(dtype).to(ext_device)
    sum((c.to_dense(F) * G[i]).sum() for i, c in enumerate(codes)).backward()
    live = mask & (h.detach().cpu() > 0)
    assert torch.equal(h.grad.cpu(), torch.where(live, G.cpu(), torch.zeros((), dtype=dtype)))


def test_batch_topk_matches_reference_op(ext_device):
    h = make_h(32, 129, torch.float32, ext_device)
    assert torch.equal(ext_ops.batch_topk(h, 6).to_dense(129), select.batch_topk(h, 6).to_dense(129))
    hl = torch.randn(3, 16, 129, device=ext_device)
    ours = ext_ops.batch_topk_layers(hl, 6)
    ref = select.batch_topk_layers(hl, 6)
    for a, b in zip(ours, ref):
        assert torch.equal(a.to_dense(129), b.to_dense(129))


def test_batch_topk_threshold_sharded(ext_device):
    """Feature shards that all-reduce their histograms find the single-device threshold exactly.

    Two threads stand in for two tensor-parallel ranks; the all-reduce is a barrier + sum."""
    h = make_h(16, 90, torch.float32, ext_device, "ties", seed=7)
    k_total = 16 * 5
    full = ext_ops.batch_topk_threshold(h, k_total)
    shards = [h[:, :40].contiguous(), h[:, 40:].contiguous()]
    slots, barrier = [None, None], threading.Barrier(2)

    def run(rank, out):
        def all_reduce(counts):
            slots[rank] = counts
            barrier.wait()
            total = slots[0] + slots[1]
            barrier.wait()
            return total
        out[rank] = ext_ops.batch_topk_threshold(shards[rank], k_total, all_reduce=all_reduce)

    found = [None, None]
    threads = [threading.Thread(target=run, args=(r, found)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    for t in found:
        assert (t.key, t.n_greater, t.n_take) == (full.key, full.n_greater, full.n_take)
    offset, kept = 0, []
    for shard, t in zip(shards, found):
        row_ptr, index, value = ext_ops.batch_topk_compact(shard, t, equal_offset=offset)
        offset += t.n_equal_local
        kept.append(torch.zeros(shard.shape, dtype=torch.bool))
        kept[-1][torch.repeat_interleave(torch.arange(16), row_ptr.diff().cpu()), index.long().cpu()] = True
    assert int(torch.cat(kept, 1).sum()) == k_total
    # Ties go to the lower rank first, so the union is the single-device top-k up to tie order.
    full_mask = brute_batch_topk_mask(h.cpu(), k_total)
    key_value = ext_ops.key_to_float(full.key)
    strict = h.cpu() > key_value
    assert torch.equal(torch.cat(kept, 1) & strict, full_mask & strict)


# ------------------------------------------------------------------------ sparse_decode
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,F,D,bias", [(9, 37, 24, True), (13, 101, 7, False), (0, 11, 5, True), (6, 5, 33, True)])
def test_sparse_decode(ext_device, B, F, D, bias, dtype):
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

    dev = ext_device
    value_t = value.to(dtype).to(dev).requires_grad_()
    W_t = W.to(dtype).to(dev).requires_grad_()
    b_t = b.to(dtype).to(dev).requires_grad_() if bias else None
    codes = SparseCodes(row_ptr.to(dev), index.to(dev), value_t, F)
    y = ext_ops.sparse_decode(codes, W_t, b_t)
    assert y.shape == (B, D) and y.dtype == dtype and not bool(y.isnan().any())
    (y * G.to(dtype).to(dev)).sum().backward()

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


def test_sparse_decode_matches_reference_op(ext_device):
    h = torch.randn(24, 77, device=ext_device)
    codes = ext_ops.topk(h, 5)
    W, b = torch.randn(77, 19, device=ext_device), torch.randn(19, device=ext_device)
    assert_close_rel(ext_ops.sparse_decode(codes, W, b), decode.sparse_decode(codes, W, b), 1e-5, "y")


def test_topk_decode_end_to_end_grad(ext_device):
    """TopK -> decode: gradients reach h, W_dec, b_dec as in dense float64 math."""
    B, F, D, k = 10, 64, 12, 6
    h = torch.randn(B, F, dtype=torch.float64)
    W = torch.randn(F, D, dtype=torch.float64)
    b = torch.randn(D, dtype=torch.float64)
    G = torch.randn(B, D, dtype=torch.float64)
    hs, Ws, bs = (t.float().to(ext_device).requires_grad_() for t in (h, W, b))
    (ext_ops.sparse_decode(ext_ops.topk(hs, k), Ws, bs) * G.float().to(ext_device)).sum().backward()
    hr, Wr, br = (t.clone().requires_grad_() for t in (h, W, b))
    a = torch.where(brute_topk_mask(h, k), hr.clamp_min(0), torch.zeros((), dtype=torch.float64))
    ((a @ Wr + br) * G).sum().backward()
    for got, ref, name in ((hs.grad, hr.grad, "dh"), (Ws.grad, Wr.grad, "dW"), (bs.grad, br.grad, "db")):
        assert_close_rel(got.cpu(), ref, 1e-5, name)


def test_sparse_decode_3d_decoder(ext_device):
    """A [F, T, d] decoder decodes as [F, T*d] and returns [B, T, d]; b_dec may be [T, d]."""
    codes = ext_ops.topk(torch.randn(7, 30, device=ext_device), 4)
    W = torch.randn(30, 3, 5, device=ext_device)
    b = torch.randn(3, 5, device=ext_device)
    y = ext_ops.sparse_decode(codes, W, b)
    assert y.shape == (7, 3, 5)
    ref = (codes.to_dense(30).double() @ W.double().reshape(30, 15) + b.double().reshape(15)).view(7, 3, 5)
    assert_close_rel(y.cpu(), ref.cpu(), 1e-6, "y")


def _round_trip_codes(B, F, per_row, gen):
    """CSR codes with per_row distinct features in each row, and fp32 values that bf16 cannot hold."""
    index = torch.rand(B, F, generator=gen).argsort(1)[:, :per_row].sort(1).values.to(torch.int32).flatten()
    row_ptr = torch.arange(B + 1, dtype=torch.int64) * per_row
    value = torch.randn(B * per_row, generator=gen) * (1 + torch.rand(B * per_row, generator=gen) / 64)
    return row_ptr, index, value


def _exact_decode(row_ptr, index, value, W):
    dense = torch.zeros(row_ptr.shape[0] - 1, W.shape[0], dtype=torch.float64)
    rows = torch.repeat_interleave(torch.arange(row_ptr.shape[0] - 1), row_ptr.diff())
    dense.index_put_((rows, index.long()), value.double(), accumulate=True)
    return dense @ W.double()


def test_sparse_decode_fp32_values_with_bf16_weights(ext_device, gen):
    """fp32 values with bf16 weights are summed in fp32 and rounded once: y equals the exact sum
    rounded to bf16 (up to fp32 accumulation at rounding ties); rounding the values to bf16 first
    (what the decode did before) misses that on a large share of the outputs."""
    row_ptr, index, value = _round_trip_codes(64, 300, 24, gen)
    W = torch.randn(300, 40, generator=gen).bfloat16()
    exact = _exact_decode(row_ptr, index, value, W).to(torch.bfloat16)
    dev = ext_device
    y = torch.ops.fastclt.sparse_decode(row_ptr.to(dev), index.to(dev), value.to(dev), W.to(dev), None)
    assert y.dtype == torch.bfloat16
    assert (y.cpu() == exact).float().mean() > 0.99
    rounded = torch.ops.fastclt.sparse_decode(row_ptr.to(dev), index.to(dev), value.bfloat16().to(dev), W.to(dev), None)
    assert (rounded.cpu() == exact).float().mean() < 0.9  # the test can tell the two apart
    # through ext_ops.sparse_decode with autograd: fp32 values keep an fp32 gradient
    v = value.to(dev).requires_grad_()
    Wt = W.to(dev).requires_grad_()
    codes = SparseCodes(row_ptr.to(dev), index.to(dev), v, 300)
    out = ext_ops.sparse_decode(codes, Wt)
    assert torch.equal(out, y)
    G = torch.randn(64, 40, generator=gen)
    (out.float() * G.to(dev)).sum().backward()
    assert v.grad.dtype == torch.float32 and Wt.grad.dtype == torch.bfloat16
    rows = torch.repeat_interleave(torch.arange(64), row_ptr.diff())
    want_dv = (G.bfloat16().double()[rows] * W.double()[index.long()]).sum(1)
    assert_close_rel(v.grad.cpu(), want_dv, 1e-2, "dvalue")


def test_encoder_gather_keeps_dh_in_fp32(ext_device, gen):
    """The extension's dx gather of the sparse encoder backward takes dh in fp32 with bf16 weights."""
    row_ptr, index, dh = _round_trip_codes(64, 300, 24, gen)
    W = torch.randn(300, 40, generator=gen).bfloat16()
    dev = ext_device
    dx = ext_ops.EXT_KERNELS.gather(row_ptr.to(dev), index.to(dev), dh.to(dev), W.to(dev), torch.bfloat16)
    exact = _exact_decode(row_ptr, index, dh, W).to(torch.bfloat16)
    assert (dx.cpu() == exact).float().mean() > 0.99


def test_other_dtypes_use_the_reference(ext_device):
    h = torch.randn(5, 21, dtype=torch.float64, device=ext_device)
    assert ext_ops.topk(h, 3).value.dtype == torch.float64
    assert ext_ops.batch_topk(h, 3).nnz == 15
    codes = ext_ops.topk(h.float(), 3)
    W = torch.randn(21, 4, dtype=torch.float64, device=ext_device)
    assert ext_ops.sparse_decode(codes, W).dtype == torch.float64


# ------------------------------------------------------------------- torch.library
def _shared_op_cases(device):
    """(op name, args) of every op the tests above run on each device (opcheck runs each one)."""
    h = torch.randn(8, 37, device=device)
    codes = ext_ops.topk(h, 4)
    W, G = torch.randn(37, 6, device=device), torch.randn(8, 6, device=device)
    thr = ext_ops.batch_topk_threshold(h, 32)
    value = codes.value.detach()
    return [
        ("topk", (h, 4)),
        ("batch_topk_histogram", (h, 0, 0, 8)),
        ("batch_topk_compact", (h, thr.key, 0, thr.n_take, 32)),
        ("batch_topk", (h, 32)),
        ("batch_topk", (torch.randn(3, 5, 200, device=device), 20)),
        ("sparse_decode", (codes.row_ptr, codes.index, value, W, None)),
        ("sparse_decode", (codes.row_ptr, codes.index, value, W.bfloat16(), None)),  # fp32 values, bf16 W
        ("sparse_dot", (codes.row_ptr, codes.index, G, W)),
        ("feature_scatter", (codes.row_ptr, codes.index, value, G, 37)),
    ]


SHARED_OPS = ("topk", "batch_topk_histogram", "batch_topk_compact", "batch_topk", "sparse_decode", "sparse_dot",
              "feature_scatter")


def test_opcheck(ext_device):
    """Schemas, fake (meta) impls and dispatch registrations are consistent (torch.compile-ready)."""
    cases = _shared_op_cases(ext_device)
    assert {name for name, _ in cases} == set(SHARED_OPS)
    for name, args in cases:
        torch.library.opcheck(getattr(torch.ops.fastclt, name), args)


def _cuda_kernels_in_source() -> set:
    """The ops csrc/cuda/ops_cuda.cpp registers for CUDA (that file does not build here)."""
    import pathlib
    import re

    src = (pathlib.Path(__file__).resolve().parents[1] / "csrc" / "cuda" / "ops_cuda.cpp").read_text()
    block = src[src.index("TORCH_LIBRARY_IMPL(fastclt, CUDA, m)"):]
    return set(re.findall(r'm\.impl\("(\w+)"', block[:block.index("}")]))


@pytest.mark.skipif(not _ext.build_info()["loaded"], reason=_ext.missing_message("cpu"))
def test_every_shared_op_has_a_kernel_on_every_device():
    """The ops the tests above run on every device have a kernel there: on CUDA a C++ one
    (csrc/cuda/ops_cuda.cpp, read as source when it is not built) or a Python one (fastclt._ext)."""
    def has(op, key):
        return torch._C._dispatch_has_kernel_for_dispatch_key(f"fastclt::{op}", key)

    cuda = _cuda_kernels_in_source() | {op for op in SHARED_OPS if has(op, "CUDA")}
    assert sorted(set(SHARED_OPS) - cuda) == []
    if _ext.has_cpu_ext():
        assert sorted(op for op in SHARED_OPS if not has(op, "CPU")) == []


@pytest.mark.skipif(not _ext.has_cpu_ext(), reason=_ext.missing_message("cpu"))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,k_total,kind", [
    ((8, 37), 40, "randn"), ((6, 40), 54, "ties"), ((3, 16), 12, "equal"), ((7, 50), 63, "negties"),
    ((6, 45), 72, "inf"), ((12, 250), 60, "hotrow"), ((0, 37), 0, "randn"), ((4, 37), 148, "randn"),
    ((3, 5, 200), 20, "randn"), ((2, 4, 90), 33, "ties"),
])
def test_batch_topk_radix_equals_the_cpu_kernel(shape, k_total, kind, dtype):
    """batch_topk_radix — the CUDA kernel of fastclt::batch_topk, histogram passes + compaction —
    gives exactly the CPU kernel's CSR (bound + filter) on the CPU ops."""
    h = make_h(shape[-2] if len(shape) == 2 else shape[0] * shape[1], shape[-1], dtype, "cpu", kind).view(shape)
    got = ext_ops.batch_topk_radix(h, k_total)
    want = torch.ops.fastclt.batch_topk(h, k_total)
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match=r"k_total must be in \[0, h.numel\(\)"):
        ext_ops.batch_topk_radix(h, h.numel() + 1)


# ----------------------------------------------------------------------- bad input
def test_nan_input_is_an_error(ext_device):
    h = torch.randn(4, 37, device=ext_device)
    h[2, 5] = float("nan")
    with pytest.raises((RuntimeError, ValueError), match="NaN"):
        ext_ops.topk(h, 3)
    with pytest.raises((RuntimeError, ValueError), match="NaN"):
        ext_ops.batch_topk(h, 3)
    with pytest.raises((RuntimeError, ValueError), match="NaN"):
        ext_ops.batch_topk_layers(h.view(1, 4, 37), 3)
    # the filter paths (k * 16 <= F), a NaN of either sign, last entry of a partial block
    for nan in (float("nan"), -float("nan")):
        big = torch.randn(5, 1001, device=ext_device)
        big[4, 1000] = nan
        for dtype in DTYPES:
            with pytest.raises(ValueError, match="h contains NaN"):
                ext_ops.batch_topk(big.to(dtype), 3)
            with pytest.raises((RuntimeError, ValueError), match="NaN"):
                ext_ops.topk(big.to(dtype), 3)


def test_bad_input_messages(ext_device):
    dev = ext_device
    ops = torch.ops.fastclt
    h = torch.randn(4, 37, device=dev)
    for k in (0, 38, -1):
        with pytest.raises(RuntimeError, match="k must be"):
            ops.topk(h, k)
        with pytest.raises(ValueError, match="k: expected"):
            ext_ops.batch_topk(h, k)
    with pytest.raises(TypeError, match="k: expected an int"):
        ext_ops.topk(h, 2.0)
    with pytest.raises(RuntimeError, match="h must be float32 or bfloat16"):
        ops.topk(h.double(), 3)
    with pytest.raises(RuntimeError, match="h must be 2-D"):
        ops.topk(h.view(-1), 3)
    with pytest.raises(RuntimeError, match="h must be contiguous"):
        ops.topk(h.t(), 3)
    with pytest.raises(RuntimeError, match="digit_bits"):
        ops.batch_topk_histogram(h, 0, 0, 17)
    with pytest.raises(RuntimeError, match="prefix"):
        ops.batch_topk_histogram(h, 5, 2, 8)
    with pytest.raises(RuntimeError, match="nnz"):
        ops.batch_topk_compact(h, 0x80000000, 0, 0, 3)
    with pytest.raises(ValueError, match=r"h: expected \[B, F\]"):
        ext_ops.topk(h.view(2, 2, 37), 3)
    with pytest.raises(TypeError, match="h: expected a floating-point"):
        ext_ops.batch_topk(h.int(), 3)
    for k_total in (-1, h.numel() + 1):
        with pytest.raises(ValueError, match=r"k_total must be in \[0, h.numel\(\)=148\]"):
            ops.batch_topk(h, k_total)
    with pytest.raises(RuntimeError, match="at least 2 dims"):
        ops.batch_topk(h.view(-1), 3)
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        ops.batch_topk(h.double(), 3)
    with pytest.raises(RuntimeError, match="contiguous"):
        ops.batch_topk(h.t(), 3)
    empty = ops.batch_topk(h, 0)
    assert empty[0].tolist() == [0] * 5 and empty[1].numel() == 0

    codes = ext_ops.topk(h, 3)
    W = torch.randn(37, 8, device=dev)
    rp, idx, val = codes.row_ptr, codes.index, codes.value
    with pytest.raises(RuntimeError, match="index must be a 1-D int32"):
        ops.sparse_decode(rp, idx.long(), val, W, None)
    with pytest.raises(RuntimeError, match="row_ptr must be a 1-D int64"):
        ops.sparse_decode(rp.int(), idx, val, W, None)
    with pytest.raises(RuntimeError, match="weight must be 2-D"):
        ops.sparse_decode(rp, idx, val, W.view(-1), None)
    with pytest.raises(RuntimeError, match="weight must be contiguous"):
        ops.sparse_decode(rp, idx, val, torch.randn(8, 37, device=dev).t(), None)
    with pytest.raises(RuntimeError, match="must have weight's dtype"):
        ops.sparse_decode(rp, idx, val.bfloat16(), W, None)
    with pytest.raises(RuntimeError, match="bias must have shape"):
        ops.sparse_decode(rp, idx, val, W, torch.zeros(9, device=dev))
    with pytest.raises(RuntimeError, match="value must be 1-D"):
        ops.sparse_decode(rp, idx, val[:-1], W, None)
    with pytest.raises(RuntimeError, match="grad must have shape"):
        ops.sparse_dot(rp, idx, torch.zeros(3, 8, device=dev), W)
    with pytest.raises(RuntimeError, match="x must have B="):
        ops.feature_scatter(rp, idx, val, torch.zeros(3, 8, device=dev), 37)
    with pytest.raises(ValueError, match="W_dec: expected"):
        ext_ops.sparse_decode(codes, W.view(-1))
    with pytest.raises(ValueError, match="n_features=37"):
        ext_ops.sparse_decode(codes, W[:10])
    if dev == "cpu":  # content checks (the CUDA path does not scan codes on the host)
        with pytest.raises(RuntimeError, match="index must lie in"):
            ops.sparse_decode(rp, idx, val, W[:10].contiguous(), None)
        with pytest.raises(RuntimeError, match="row_ptr must start at 0"):
            ops.sparse_decode(rp + 1, idx, val, W, None)
        with pytest.raises(RuntimeError, match="index must lie in"):
            ops.feature_scatter(rp, idx, val, torch.zeros(4, 8, device=dev), 10)


def test_build_info_and_availability():
    """build_info() has its documented keys, and availability follows what was built."""
    info = _ext.build_info()
    assert set(info) >= {"loaded", "cpu", "cuda", "openmp", "cuda_arch_list", "torch_version", "import_error"}
    assert ext_ops._cpu_available(torch.device("cpu")) == _ext.has_cpu_ext()
    assert not ext_ops._cuda_available(torch.device("cpu"))


# ------------------------------------------------------------- threshold_compact (CPU only)
def _band_reference(h, threshold, half):
    """The pattern and fp32 values ext_ops._pattern's mask path gives (fastclt.ops.activation)."""
    from fastclt.ops.activation import band_mask

    mask = h > 0 if threshold is None else band_mask(h, threshold, 2 * half)
    rows, cols = mask.nonzero(as_tuple=True)
    return mask.sum(1), cols, h[rows, cols].float()


@pytest.mark.skipif(not _ext.has_cpu_ext(), reason=_ext.missing_message("cpu"))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,F,mode", [(9, 37, "relu"), (7, 1003, "relu"), (9, 37, "jumprelu"), (6, 517, "jumprelu"),
                                      (0, 37, "jumprelu"), (5, 16, "relu")])
def test_threshold_compact_matches_the_mask(B, F, mode, dtype):
    g = torch.Generator().manual_seed(B * 1000 + F)
    h = torch.randn(B, F, generator=g).to(dtype)
    threshold = half = None
    if mode == "jumprelu":
        threshold = (torch.rand(F, generator=g) * 2 - 0.5).to(dtype)  # some negative thresholds
        half = float(torch.tensor(0.05, dtype=dtype))
        if B:
            # entries on and next to the band's edges, and at θ itself
            t = threshold.float()
            for j, off in enumerate((0.0, half, -half, half * (1 + 2 ** -7), -half * (1 + 2 ** -7),
                                     -half * (1 - 2 ** -7), 2 * half, -2 * half)):
                h[j % B, j::9] = (t[j::9] + off).to(dtype)
    if B:
        h[0, 1], h[-1, 2], h[B // 2, 3] = float("nan"), float("inf"), float("-inf")  # NaN never kept
        h[B // 2, 5:] = -5.0  # a row with few or no entries
    _ext._C.set_poison_outputs(True)
    try:
        row_ptr, index, value = torch.ops.fastclt.threshold_compact(h, threshold, half or 0.0)
    finally:
        _ext._C.set_poison_outputs(False)
    counts, cols, vals = _band_reference(h, threshold, half or 0.0)
    assert row_ptr.dtype == torch.int64 and index.dtype == torch.int32 and value.dtype == torch.float32
    assert row_ptr[0] == 0 and torch.equal(row_ptr.diff(), counts)
    assert torch.equal(index.long(), cols)
    assert torch.equal(value, vals)


@pytest.mark.skipif(not _ext.has_cpu_ext(), reason=_ext.missing_message("cpu"))
def test_threshold_compact_bad_input_and_opcheck():
    ops = torch.ops.fastclt
    h, thr = torch.randn(4, 37), torch.rand(37)
    with pytest.raises(RuntimeError, match="h must be 2-D"):
        ops.threshold_compact(h.view(-1), None, 0.0)
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        ops.threshold_compact(h.double(), None, 0.0)
    with pytest.raises(RuntimeError, match="contiguous"):
        ops.threshold_compact(h.t(), None, 0.0)
    with pytest.raises(RuntimeError, match=r"threshold must have shape \[F=37\]"):
        ops.threshold_compact(h, thr[:-1], 0.1)
    with pytest.raises(RuntimeError, match="same dtype"):
        ops.threshold_compact(h, thr.bfloat16(), 0.1)
    with pytest.raises(RuntimeError, match="half_band must be a finite number >= 0"):
        ops.threshold_compact(h, thr, -0.1)
    with pytest.raises(RuntimeError, match="half_band must be a finite number >= 0"):
        ops.threshold_compact(h, thr, float("nan"))
    with pytest.raises(RuntimeError, match="half_band needs a threshold"):
        ops.threshold_compact(h, None, 0.1)
    torch.library.opcheck(ops.threshold_compact, (h, thr, 0.1))
    torch.library.opcheck(ops.threshold_compact, (h, None, 0.0))


# ----------------------------------------------------------- feature_scatter_dot (CPU only)
# ------------------------------------------- the CUDA feature_scatter's work split, replayed on the CPU
def _scatter_case(B, F, D, hot, gen, dtype):
    """Codes of B rows with a few random features each; the first `hot` features in every row."""
    rows = []
    for b in range(B):
        extra = torch.randperm(F - hot, generator=gen)[: int(torch.randint(0, 4, (1,), generator=gen))] + hot
        rows.append(torch.cat([torch.arange(hot), extra.sort().values]))
    row_ptr = torch.zeros(B + 1, dtype=torch.int64)
    row_ptr[1:] = torch.tensor([len(r) for r in rows]).cumsum(0)
    index = torch.cat(rows + [torch.zeros(0, dtype=torch.int64)]).to(torch.int32)
    coef = torch.randn(index.shape[0], generator=gen).to(dtype)
    x = torch.randn(B, D, generator=gen).to(dtype)
    return row_ptr, index, coef, x


@pytest.mark.skipif(not _ext.has_cpu_ext(), reason=_ext.missing_message("cpu"))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,F,D,hot,chunk", [(40, 23, 9, 2, 7), (40, 23, 9, 2, 40), (33, 11, 5, 3, 1),
                                             (17, 50, 0, 1, 4), (0, 6, 4, 0, 3), (25, 8, 33, 8, 512)])
def test_scatter_plan_replay_matches_float64(B, F, D, hot, chunk, dtype, gen):
    """The CUDA feature_scatter splits a feature's entries into chunks of `chunk` (hot features over
    several warps, summed from fp32 partial rows in order; csrc/scatter_plan.h). Its work split —
    plan tables, work item → (feature, entries, partial slot), the second pass — replayed on the CPU
    equals float64 math and the CPU kernel, uses exactly the expected work items and partial rows,
    and writes every output element (poisoned outputs)."""
    row_ptr, index, coef, x = _scatter_case(B, F, D, hot, gen, dtype)
    out, coef_sum, n_work, n_partials = _ext._C._feature_scatter_replay(row_ptr, index, coef, x, F, chunk)
    counts = torch.bincount(index.long(), minlength=F)
    chunks = ((counts + chunk - 1) // chunk).clamp_min(1)
    assert n_work == int(chunks.sum())
    assert n_partials == int(chunks[counts > chunk].sum())
    rows = torch.repeat_interleave(torch.arange(B), row_ptr.diff())
    want = torch.zeros(F, D, dtype=torch.float64).index_add_(0, index.long(), coef.double()[:, None] * x.double()[rows])
    want_sum = torch.zeros(F, dtype=torch.float64).index_add_(0, index.long(), coef.double())
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert out.dtype == dtype and coef_sum.dtype == torch.float32
    assert_close_rel(out, want, tol, "out")
    assert_close_rel(coef_sum, want_sum, 1e-5, "coef_sum")
    cpu_out, cpu_sum = torch.ops.fastclt.feature_scatter(row_ptr, index, coef, x, F)
    assert_close_rel(out, cpu_out.double(), tol, "out vs the CPU kernel")
    again = _ext._C._feature_scatter_replay(row_ptr, index, coef, x, F, chunk)
    assert torch.equal(again[0], out) and torch.equal(again[1], coef_sum)


@pytest.mark.skipif(not _ext.has_cpu_ext(), reason=_ext.missing_message("cpu"))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,F,D,k", [(13, 37, 19, 5), (64, 300, 130, 9), (5, 11, 3, 11), (0, 7, 4, 1)])
def test_feature_scatter_dot_matches_float64(B, F, D, k, dtype):
    """dW = Aᵀ X and dvalue[j] = <X[row(j)], W[index[j]]> in one sweep, against float64; a hot
    feature (entries in every row: 4-row sweeps and a tail), unused features (zero rows)."""
    g = torch.Generator().manual_seed(B * 100 + F)
    h = torch.randn(B, F, generator=g)
    if B:
        h[:, 3] += 10.0  # feature 3 in every row
        h[:, -1] -= 10.0  # the last feature in none
    codes = ext_ops.topk(h.to(dtype), k)
    coef = (torch.rand(codes.nnz, generator=g) + 0.1).to(dtype)
    X = torch.randn(B, D, generator=g).to(dtype)
    W = torch.randn(F, D, generator=g).to(dtype)
    _ext._C.set_poison_outputs(True)
    try:
        out, coef_sum, dot = torch.ops.fastclt.feature_scatter_dot(codes.row_ptr, codes.index, coef, X, W)
    finally:
        _ext._C.set_poison_outputs(False)
    rows, cols = codes.row_ids(), codes.index.long()
    A = torch.zeros(B, F, dtype=torch.float64)
    A[rows, cols] = coef.double()
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    assert out.dtype == dtype and dot.dtype == dtype and coef_sum.dtype == torch.float32
    assert_close_rel(out, A.t() @ X.double(), tol, "out")
    assert_close_rel(dot, (X.double()[rows] * W.double()[cols]).sum(1), tol, "dot")
    assert_close_rel(coef_sum, A.sum(0), 1e-6, "coef_sum")
    if B and k < F:
        assert not out[-1].any(), "an unused feature's row must be zero"
    ref_out = torch.ops.fastclt.feature_scatter(codes.row_ptr, codes.index, coef, X, F)[0]
    assert_close_rel(out, ref_out, 1e-6 if dtype == torch.float32 else 1e-2, "out vs feature_scatter")


@pytest.mark.skipif(not _ext.has_cpu_ext(), reason=_ext.missing_message("cpu"))
def test_feature_scatter_dot_bad_input_and_opcheck():
    ops = torch.ops.fastclt
    codes = ext_ops.topk(torch.randn(4, 37), 3)
    rp, idx = codes.row_ptr, codes.index
    coef, X, W = torch.rand(12), torch.randn(4, 8), torch.randn(37, 8)
    with pytest.raises(RuntimeError, match="weight must have D=8"):
        ops.feature_scatter_dot(rp, idx, coef, X, W[:, :5].contiguous())
    with pytest.raises(RuntimeError, match="same dtype"):
        ops.feature_scatter_dot(rp, idx, coef, X, W.bfloat16())
    with pytest.raises(RuntimeError, match="x must have B=4"):
        ops.feature_scatter_dot(rp, idx, coef, X[:3], W)
    with pytest.raises(RuntimeError, match="index must lie in"):
        ops.feature_scatter_dot(rp, idx, coef, X, W[:10].contiguous())
    with pytest.raises(RuntimeError, match="weight must be 2-D"):
        ops.feature_scatter_dot(rp, idx, coef, X, W.view(-1))
    torch.library.opcheck(ops.feature_scatter_dot, (rp, idx, coef, X, W))


# ---------------------------------------------------------------------- topk_bias (CPU only)
@pytest.mark.skipif(not _ext.has_cpu_ext(), reason=_ext.missing_message("cpu"))
@pytest.mark.parametrize("B,F,k,kind", [(7, 37, 5, "randn"), (5, 1001, 32, "randn"), (4, 600, 8, "ties"),
                                        (3, 1003, 7, "ascending"), (6, 500, 3, "hotrow"), (4, 45, 12, "inf"),
                                        (0, 37, 3, "randn"), (3, 300, 300, "randn")])
def test_topk_bias_is_topk_of_the_sum(B, F, k, kind):
    """topk_bias(h, b, k) == topk(h + b, k) exactly (one fp32 rounding of the sum either way),
    on both of topk_row's paths, without forming h + b."""
    h = make_h(B, F, torch.float32, "cpu", kind, seed=11)
    bias = torch.randn(F, generator=torch.Generator().manual_seed(12))
    if kind == "ties":
        bias = (bias * 2).round() / 2  # sums with ties
    index, value = torch.ops.fastclt.topk_bias(h, bias, k)
    ref = ext_ops.topk(h + bias, k)
    assert torch.equal(index.view(-1), ref.index) and torch.equal(value.view(-1), ref.value)


@pytest.mark.skipif(not _ext.has_cpu_ext(), reason=_ext.missing_message("cpu"))
def test_topk_bias_bad_input_and_opcheck():
    ops = torch.ops.fastclt
    h, b = torch.randn(4, 1000), torch.randn(1000)
    with pytest.raises(RuntimeError, match=r"bias must have shape \[F=1000\]"):
        ops.topk_bias(h, b[:-1], 3)
    with pytest.raises(RuntimeError, match="h must be float32"):
        ops.topk_bias(h.bfloat16(), b.bfloat16(), 3)
    with pytest.raises(RuntimeError, match="same dtype"):
        ops.topk_bias(h, b.bfloat16(), 3)
    with pytest.raises(RuntimeError, match="k must be in"):
        ops.topk_bias(h, b, 1001)
    nan_sum = b.clone()
    nan_sum[999], h[3, 999] = float("inf"), float("-inf")  # inf + -inf: a NaN in the sum only
    with pytest.raises(RuntimeError, match="h \\+ bias contains NaN"):
        ops.topk_bias(h, nan_sum, 3)
    torch.library.opcheck(ops.topk_bias, (torch.randn(4, 37), torch.randn(37), 3))
