"""What only the fastclt._C extension does (the ops ``torch.ops.fastclt.*`` beneath
fastclt/ops/ext/), on every device it runs on here (the ``ext_device`` fixture of tests/conftest.py:
the CPU kernels, and CUDA when built and a GPU is present): op schemas and fake impls (opcheck), a
kernel for every shared op on every device, the CUDA BatchTopK's radix driver against the CPU
kernel, the ops' own argument checks, fp32 sums of bf16 decodes, and the CPU-only ops
(threshold_compact, feature_scatter_dot, topk_bias, clt_by_target, prefix_sum, the CUDA scatter plan
replayed). What every implementation of an op must do: tests/ops/test_<op>.py. CUDA-only cases:
tests/ops/ext/test_ext_cuda.py. Outputs are NaN-poisoned (fastclt._C.set_poison_outputs) so that an
element a kernel forgot to write fails the test.
"""
from __future__ import annotations


import pytest
import torch

from _select_cases import DTYPES, assert_close_rel, make_h
from fastclt import _ext, ops
from fastclt.codes import SparseCodes
from fastclt.ops import _registry
from fastclt.ops.ext import _common as ext_common
from fastclt.ops.ext import select as ext_select

pytestmark = pytest.mark.usefixtures("poisoned")


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
    # through the op with autograd: fp32 values keep an fp32 gradient
    v = value.to(dev).requires_grad_()
    Wt = W.to(dev).requires_grad_()
    codes = SparseCodes(row_ptr.to(dev), index.to(dev), v, 300)
    out = ops.sparse_decode(codes, Wt, impl="cpu" if dev == "cpu" else "cuda")
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
    dx = ext_common.EXT_KERNELS.gather(row_ptr.to(dev), index.to(dev), dh.to(dev), W.to(dev), torch.bfloat16)
    exact = _exact_decode(row_ptr, index, dh, W).to(torch.bfloat16)
    assert (dx.cpu() == exact).float().mean() > 0.99


@pytest.mark.parametrize("per_row", [1, 3])
def test_encoder_scatter_packs_strided_rows(gen, per_row):
    """The CPU dW_enc scatter of a joined encode reads x [B, L, d] layer-major: packed into a contiguous
    copy where entries gather each row at least twice on average (``packed_rows``), in place below. Either
    way dW equals the float64 scatter, and x is left as it was."""
    B, L, d, F = 37, 3, 21, 50
    x = torch.randn(B, L, d, generator=gen)
    view = x.transpose(0, 1)  # rows (l, b): 21 floats at a stride of 63
    row_ptr, index, dh = _round_trip_codes(B * L, F, per_row, gen)
    packed = ext_common.packed_rows(view, index.shape[0])
    if per_row >= 2:
        assert packed.is_contiguous() and packed.shape == (B * L, d) and torch.equal(packed, view.reshape(B * L, d))
    else:
        assert packed is view
    assert ext_common.packed_rows(x.reshape(B * L, d), 10 ** 6).data_ptr() == x.data_ptr()  # contiguous: itself
    before = x.clone()
    dW = ext_common.EXT_KERNELS.feature_scatter(index, None, row_ptr, dh, view, F, None)
    rows = torch.repeat_interleave(torch.arange(B * L), row_ptr.diff())
    want = torch.zeros(F, d, dtype=torch.float64).index_add_(
        0, index.long(), dh.double()[:, None] * view.reshape(B * L, d).double()[rows])
    assert_close_rel(dW, want, 1e-5, "dW")
    assert torch.equal(x, before)


@pytest.mark.parametrize("pre_bias", [False, True])
def test_encoder_bias_grad_from_the_scatter(gen, pre_bias):
    """The extension's encoder backward takes db_enc (and the pre-bias gradient) from the dW_enc scatter's
    per-feature sums (``feature_scatter_and_sums``): on the CPU the same numbers, bit for bit, as the
    separate ``feature_sums`` pass of a backend without it; dx and dW_enc unchanged."""
    from fastclt.ops.encoder_backward import encode_codes

    class WithoutSums:  # EXT_KERNELS without the combined scatter
        segments = staticmethod(ext_common.EXT_KERNELS.segments)
        feature_sums = staticmethod(ext_common.EXT_KERNELS.feature_sums)
        feature_scatter = staticmethod(ext_common.EXT_KERNELS.feature_scatter)
        gather = staticmethod(ext_common.EXT_KERNELS.gather)

    B, F, d, k = 45, 300, 19, 7
    x = torch.randn(B, d, generator=gen)
    W, b = torch.randn(F, d, generator=gen), torch.randn(F, generator=gen)
    p = torch.randn(d, generator=gen) if pre_bias else None
    h = (x - (p if pre_bias else 0)) @ W.t() + b
    codes = ext_select.topk(h, k)
    row = SparseCodes.rows_of(codes.row_ptr, codes.nnz)
    h_e = h[row, codes.index.long()]
    dvalue = torch.randn(codes.nnz, generator=gen)
    grads = []
    for kern in (ext_common.EXT_KERNELS, WithoutSums()):
        leaves = [t.clone().requires_grad_() for t in (x, W, b)] + ([p.clone().requires_grad_()] if pre_bias else [])
        out = encode_codes(leaves[0], leaves[1], leaves[2], None, leaves[3] if pre_bias else None, codes.row_ptr, None,
                           codes.index, h_e, "topk", 0.01, kern, k)
        out.value.backward(dvalue)
        grads.append([t.grad for t in leaves])
    for name, a, c in zip(("dx", "dW_enc", "db_enc", "d pre_bias"), *grads):
        assert torch.equal(a, c), name
    assert grads[0][2].abs().sum() > 0


# ------------------------------------------------------------------- torch.library
def _shared_op_cases(device):
    """(op name, args) of every op the tests above run on each device (opcheck runs each one)."""
    h = torch.randn(8, 37, device=device)
    codes = ext_select.topk(h, 4)
    W, G = torch.randn(37, 6, device=device), torch.randn(8, 6, device=device)
    thr = ext_select.batch_topk_threshold(h, 32)
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

    src = (pathlib.Path(__file__).resolve().parents[3] / "csrc" / "cuda" / "ops_cuda.cpp").read_text()
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
    got = ext_select.batch_topk_radix(h, k_total)
    want = torch.ops.fastclt.batch_topk(h, k_total)
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match=r"k_total must be in \[0, h.numel\(\)"):
        ext_select.batch_topk_radix(h, h.numel() + 1)


# ----------------------------------------------------------------------- bad input
def test_bad_input_messages(ext_device):
    """The extension's ops check their own arguments (the Python entry points' checks:
    tests/ops/test_<op>.py::test_bad_input)."""
    dev = ext_device
    ops = torch.ops.fastclt
    h = torch.randn(4, 37, device=dev)
    for k in (0, 38, -1):
        with pytest.raises(RuntimeError, match="k must be"):
            ops.topk(h, k)
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

    codes = ext_select.topk(h, 3)
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
    assert _registry.available("cpu", torch.device("cpu")) == _ext.has_cpu_ext()
    assert not _registry.available("cuda", torch.device("cpu"))


# ------------------------------------------------------------- threshold_compact (CPU only)
def _band_reference(h, threshold, half):
    """The pattern and fp32 values the extension encode's mask path gives (its CUDA path)."""
    from fastclt.ops.reference.activation import band_mask

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
@pytest.mark.parametrize("B,F,D,k", [(13, 37, 19, 5), (64, 300, 130, 9), (5, 11, 3, 11), (0, 7, 4, 1),
                                     (512, 1000, 96, 12)])
def test_feature_scatter_dot_matches_float64(B, F, D, k, dtype):
    """dW = Aᵀ X and dvalue[j] = <X[row(j)], W[index[j]]> in one sweep, against float64; a hot
    feature (entries in every row: 4-row sweeps and a tail), unused features (zero rows); above the
    parallel size (the last case), the dots put back in entry order after the threads' sweep and the
    same bits on one thread."""
    g = torch.Generator().manual_seed(B * 100 + F)
    h = torch.randn(B, F, generator=g)
    if B:
        h[:, 3] += 10.0  # feature 3 in every row
        h[:, -1] -= 10.0  # the last feature in none
    codes = ext_select.topk(h.to(dtype), k)
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
    if codes.nnz * D > 1 << 17:  # the kernel's parallel size
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            one = torch.ops.fastclt.feature_scatter_dot(codes.row_ptr, codes.index, coef, X, W)
        finally:
            torch.set_num_threads(threads)
        assert all(torch.equal(a, b) for a, b in zip(one, (out, coef_sum, dot)))


@pytest.mark.skipif(not _ext.has_cpu_ext(), reason=_ext.missing_message("cpu"))
@pytest.mark.parametrize("layout", ["joined", "random"])
@pytest.mark.parametrize("op", ["feature_scatter", "feature_scatter_dot"])
def test_feature_scatters_sort_on_threads_as_on_one(op, layout, gen):
    """Above its parallel size the CPU scatters' counting sort counts on the threads, and fills on
    them where rows split into ranges of disjoint features ("joined": three layers' CSRs one after
    another, layer l's rows holding features l·F + f, rows of unequal lengths and empty ones) or on
    one thread where they do not ("random"): the outputs are those of one thread bit for bit, and the
    float64 sums."""
    L, B, F, D = 3, 1500, 700, 24
    lens = torch.randint(0, 21, (L * B,), generator=gen)
    lens[::7] = 0
    row_ptr = torch.cat([torch.zeros(1, dtype=torch.int64), lens.cumsum(0)])
    nnz = int(row_ptr[-1])
    assert nnz >= 1 << 15  # the kernels' parallel sort size
    index = torch.randint(0, F, (nnz,), generator=gen, dtype=torch.int32)
    if layout == "joined":
        rows = torch.repeat_interleave(torch.arange(L * B), lens)
        index = index + (rows // B * F).to(torch.int32)
    coef = torch.randn(nnz, generator=gen)
    X = torch.randn(L * B, D, generator=gen)
    W = torch.randn(L * F, D, generator=gen)
    extra = (W,) if op == "feature_scatter_dot" else (L * F,)
    fn = getattr(torch.ops.fastclt, op)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = fn(row_ptr, index, coef, X, *extra)
        torch.set_num_threads(4)
        many = fn(row_ptr, index, coef, X, *extra)
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(one, many))
    rows, cols = torch.repeat_interleave(torch.arange(L * B), lens), index.long()
    want = torch.zeros(L * F, D, dtype=torch.float64).index_add_(0, cols, coef.double()[:, None] * X.double()[rows])
    assert_close_rel(many[0], want, 1e-6, "out")
    if op == "feature_scatter_dot":
        assert_close_rel(many[2], (X.double()[rows] * W.double()[cols]).sum(1), 1e-6, "dot")


@pytest.mark.skipif(not _ext.has_cpu_ext(), reason=_ext.missing_message("cpu"))
@pytest.mark.parametrize("op", ["feature_scatter", "feature_scatter_dot"])
def test_feature_scatters_large_output_streamed(op):
    """An fp32 [F, D] output above 32 MiB is written with streaming stores (csrc/cpu/sparse_cpu.cpp):
    every row written (outputs poisoned with NaN first), the same numbers as float64, unused rows zero."""
    g = torch.Generator().manual_seed(5)
    B, F, D, k = 17, 33001, 257, 5
    assert F * D * 4 > 32 << 20
    codes = ext_select.topk(torch.randn(B, F, generator=g), k)
    coef = torch.rand(codes.nnz, generator=g) + 0.1
    X = torch.randn(B, D, generator=g)
    W = torch.randn(F, D, generator=g)
    extra = (W,) if op == "feature_scatter_dot" else (F,)
    _ext._C.set_poison_outputs(True)
    try:
        got = getattr(torch.ops.fastclt, op)(codes.row_ptr, codes.index, coef, X, *extra)
    finally:
        _ext._C.set_poison_outputs(False)
    rows, cols = codes.row_ids(), codes.index.long()
    want = torch.zeros(F, D, dtype=torch.float64)
    want.index_add_(0, cols, coef.double()[:, None] * X.double()[rows])
    assert_close_rel(got[0], want, 1e-6, "out")
    unused = torch.ones(F, dtype=torch.bool)
    unused[cols] = False
    assert not got[0][unused].any(), "an unused feature's row must be zero"
    if op == "feature_scatter_dot":
        assert_close_rel(got[2], (X.double()[rows] * W.double()[cols]).sum(1), 1e-6, "dot")


@pytest.mark.skipif(not _ext.has_cpu_ext(), reason=_ext.missing_message("cpu"))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("op", ["feature_scatter", "feature_scatter_dot"])
def test_feature_scatters_read_row_strided_x_in_place(op, dtype, poisoned):
    """x a slice of columns of a wider matrix (rows contiguous, row stride > D: a CLT source's part of
    the targets' gradient) gives the results of its contiguous copy, bit for bit; x whose rows are
    not contiguous is refused by name."""
    g = torch.Generator().manual_seed(77)
    B, F, D, k = 29, 41, 23, 6
    codes = ext_select.topk(torch.randn(B, F, generator=g).to(dtype), k)
    coef = (torch.rand(codes.nnz, generator=g) + 0.1).to(dtype)
    wide = torch.randn(B, 3 * D + 5, generator=g).to(dtype)
    X = wide[:, D + 2:2 * D + 2]
    assert not X.is_contiguous() and X.stride() == (3 * D + 5, 1)
    fn = getattr(torch.ops.fastclt, op)
    extra = (torch.randn(F, D, generator=g).to(dtype),) if op == "feature_scatter_dot" else (F,)
    got = fn(codes.row_ptr, codes.index, coef, X, *extra)
    want = fn(codes.row_ptr, codes.index, coef, X.contiguous(), *extra)
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    with pytest.raises(RuntimeError, match="x's rows must be contiguous"):
        fn(codes.row_ptr, codes.index, coef, wide[:, ::2][:, :D], *extra)


@pytest.mark.skipif(not _ext.has_cpu_ext(), reason=_ext.missing_message("cpu"))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("op", ["feature_scatter", "feature_scatter_dot"])
def test_feature_scatters_read_layer_major_views_in_place(op, dtype, poisoned):
    """x given as [G, B', D] (here [L, B, d] activations seen layer-major: a transposed view, no copy)
    gives the results of its contiguous [G·B', D] copy, bit for bit; other shapes are refused by name."""
    g = torch.Generator().manual_seed(78)
    B, L, F, D, k = 13, 3, 41, 23, 5
    codes = ext_select.topk(torch.randn(L * B, F, generator=g).to(dtype), k)
    coef = (torch.rand(codes.nnz, generator=g) + 0.1).to(dtype)
    acts = torch.randn(B, L, D, generator=g).to(dtype)
    X = acts.transpose(0, 1)  # [L, B, D], row (l, b) = acts[b, l]
    assert not X.is_contiguous()
    fn = getattr(torch.ops.fastclt, op)
    extra = (torch.randn(F, D, generator=g).to(dtype),) if op == "feature_scatter_dot" else (F,)
    got = fn(codes.row_ptr, codes.index, coef, X, *extra)
    want = fn(codes.row_ptr, codes.index, coef, X.reshape(L * B, D), *extra)
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    with pytest.raises(RuntimeError, match=r"x must be 2-D \[B, D\] or 3-D"):
        fn(codes.row_ptr, codes.index, coef, X[None], *extra)
    with pytest.raises(RuntimeError, match="x must have B=39 rows, got 36"):
        fn(codes.row_ptr, codes.index, coef, X[:, :12], *extra)
    with pytest.raises(RuntimeError, match="x's rows must be contiguous"):
        fn(codes.row_ptr, codes.index, coef, torch.randn(L, B, 2 * D, generator=g).to(dtype)[:, :, ::2], *extra)
    torch.library.opcheck(fn, (codes.row_ptr, codes.index, coef, X, *extra))


@pytest.mark.skipif(not _ext.has_cpu_ext(), reason=_ext.missing_message("cpu"))
def test_feature_scatter_dot_bad_input_and_opcheck():
    ops = torch.ops.fastclt
    codes = ext_select.topk(torch.randn(4, 37), 3)
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


# ---------------------------------------------------------------------- clt_by_target (CPU only)
def _by_target_sources(B, F, lens, gen):
    """L sources' CSR codes over B rows: source s's row b holds lens[s][b] distinct features."""
    codes = []
    for row_lens in lens:
        idx = [torch.randperm(F, generator=gen)[:n].sort().values for n in row_lens]
        rp = torch.tensor([0] + list(row_lens), dtype=torch.int64).cumsum(0)
        index = torch.cat(idx).to(torch.int32) if idx else torch.zeros(0, dtype=torch.int32)
        codes.append(SparseCodes(rp, index, torch.randn(index.shape[0], generator=gen), F))
    return codes


@pytest.mark.skipif(not _ext.has_cpu_ext(), reason=_ext.missing_message("cpu"))
@pytest.mark.parametrize("case", ["random", "empty_source", "empty_rows", "no_rows", "one_source"])
def test_clt_by_target_matches_its_definition_and_the_device_ops(case, gen):
    """fastclt::clt_by_target: row (t, b) holds row b's entries of sources 0..t, source after source,
    features shifted by t·F, each with its value; the same CSR and values as the
    device-op builder of fastclt/ops/ext/clt_decode.py (CUDA's), and value gradients that sum each
    entry's L − s gradients. Outputs NaN/-1-poisoned."""
    from fastclt.ops.ext import clt_decode as ext_clt

    B, F = {"no_rows": 0}.get(case, 7), 29
    L = 1 if case == "one_source" else 4
    lens = [[int(n) for n in torch.randint(0, 6, (B,), generator=gen)] for _ in range(L)]
    if case == "empty_source":
        lens[2] = [0] * B
    if case == "empty_rows":
        for s in range(L):
            lens[s][3] = 0
    codes = _by_target_sources(B, F, lens, gen)
    rps = torch.stack([c.row_ptr for c in codes])
    values = torch.cat([c.value for c in codes])
    row_ptr, index, value = torch.ops.fastclt.clt_by_target(rps, torch.cat([c.index for c in codes]), values, F)
    offs = [0]
    for c in codes:
        offs.append(offs[-1] + c.nnz)
    want_rp, want_idx, want_src = [0], [], []
    for t in range(L):
        for b in range(B):
            for s in range(t + 1):
                for j in range(int(codes[s].row_ptr[b]), int(codes[s].row_ptr[b + 1])):
                    want_idx.append(int(codes[s].index[j]) + t * F)
                    want_src.append(offs[s] + j)
            want_rp.append(len(want_idx))
    assert row_ptr.tolist() == want_rp
    assert index.dtype == torch.int32 and index.tolist() == want_idx
    src = torch.tensor(want_src, dtype=torch.int64)
    assert torch.equal(value, values[src])
    grads = []
    for device_ops in (False, True):
        vals = [c.value.clone().requires_grad_(True) for c in codes]
        merged = ext_clt._by_target([c.with_value(v) for c, v in zip(codes, vals)], F, device_ops=device_ops)
        assert torch.equal(merged.row_ptr, row_ptr) and torch.equal(merged.index, index), device_ops
        assert torch.equal(merged.value.detach(), torch.cat([c.value for c in codes])[src]), device_ops
        g = torch.randn(merged.nnz, generator=gen)
        merged.value.backward(g)
        grads.append(torch.cat([v.grad for v in vals]))
        want = torch.zeros(offs[-1], dtype=torch.float64).index_add_(0, src, g.double())
        assert torch.allclose(grads[-1].double(), want, rtol=1e-6, atol=1e-6), device_ops


@pytest.mark.skipif(not _ext.has_cpu_ext(), reason=_ext.missing_message("cpu"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B,L,F,max_len", [(9, 4, 29, 5), (1, 1, 5, 3), (0, 3, 7, 2), (700, 4, 300, 40)])
def test_clt_by_target_backward_sums_the_copies(gen, dtype, B, L, F, max_len):
    """fastclt::clt_by_target_backward: each source entry's L − s copies (in clt_by_target's CSR) summed in
    fp32, target after target, rounded once — bit for bit that sum written out in Python; the largest case
    above the parallel size, the same on one thread; every output written (poisoned outputs)."""
    lens = [[int(n) for n in torch.randint(0, max_len + 1, (B,), generator=gen)] for _ in range(L)]
    codes = _by_target_sources(B, F, lens, gen)
    rps = torch.stack([c.row_ptr for c in codes])
    positions = torch.arange(sum(c.nnz for c in codes), dtype=torch.float32)  # each entry's own position
    _, _, src = torch.ops.fastclt.clt_by_target(rps, torch.cat([c.index for c in codes]), positions, F)
    src = src.long()
    n = sum(c.nnz for c in codes)
    g = torch.randn(src.shape[0], generator=gen).to(dtype)
    dv = torch.ops.fastclt.clt_by_target_backward(rps, g, n)
    assert dv.dtype == dtype and dv.shape == (n,)
    copies = [[] for _ in range(n)]  # src lists the copies target after target (rows (t, b) in t order)
    for q, j in enumerate(src.tolist()):
        copies[j].append(q)
    want = torch.zeros(n, dtype=torch.float32)
    for j, qs in enumerate(copies):
        acc = torch.zeros((), dtype=torch.float32)
        for q in qs:
            acc = acc + g[q].float()
        want[j] = acc
    assert torch.equal(dv, want.to(dtype))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert torch.equal(torch.ops.fastclt.clt_by_target_backward(rps, g, n), dv)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.skipif(not _ext.has_cpu_ext(), reason=_ext.missing_message("cpu"))
def test_clt_by_target_bad_input_and_opcheck(gen):
    op = torch.ops.fastclt.clt_by_target
    codes = _by_target_sources(5, 11, [[1, 2, 0, 3, 1], [2, 2, 2, 0, 1]], gen)
    rps, index = torch.stack([c.row_ptr for c in codes]), torch.cat([c.index for c in codes])
    value = torch.cat([c.value for c in codes])
    with pytest.raises(RuntimeError, match="row_ptrs must be a contiguous"):
        op(rps.int(), index, value, 11)
    with pytest.raises(RuntimeError, match="index must be a contiguous 1-D int32"):
        op(rps, index.long(), value, 11)
    with pytest.raises(RuntimeError, match="value must be a 1-D CPU tensor of index's length 14"):
        op(rps, index, value[:-1], 11)
    with pytest.raises(RuntimeError, match="value must be float32 or bfloat16"):
        op(rps, index, value.double(), 11)
    with pytest.raises(RuntimeError, match="index must lie in"):
        op(rps, index, value, 5)
    with pytest.raises(RuntimeError, match="index must hold the sources' 14 entries"):
        op(rps, index[:-1].contiguous(), value[:-1].contiguous(), 11)
    bad = rps.clone()
    bad[1, 2] = 1
    with pytest.raises(RuntimeError, match=r"row_ptrs\[1\] must be non-decreasing"):
        op(bad, index, value, 11)
    bad = rps.clone()
    bad[0, 0] = 1
    with pytest.raises(RuntimeError, match=r"row_ptrs\[0\] must start at 0"):
        op(bad, index, value, 11)
    with pytest.raises(RuntimeError, match="n_features must be in"):
        op(rps, index, value, 2 ** 31)
    torch.library.opcheck(op, (rps, index, value, 11))
    torch.library.opcheck(op, (rps, index, value.bfloat16(), 11))
    bwd = torch.ops.fastclt.clt_by_target_backward
    g = torch.randn(21, generator=gen)  # source 0's 7 entries twice (targets 0 and 1), source 1's once
    assert bwd(rps, g, 14).shape == (14,)
    with pytest.raises(RuntimeError, match="n_entries must be the sources' 14 entries"):
        bwd(rps, g, 13)
    with pytest.raises(RuntimeError, match="grad must hold the 21 copies"):
        bwd(rps, g[:20], 14)
    with pytest.raises(RuntimeError, match="grad must be float32 or bfloat16"):
        bwd(rps, g.double(), 14)
    bad = rps.clone()
    bad[1, 2] = 1
    with pytest.raises(RuntimeError, match=r"row_ptrs\[1\] must be non-decreasing"):
        bwd(bad, g, 14)
    torch.library.opcheck(bwd, (rps, g, 14))
    torch.library.opcheck(bwd, (rps, g.bfloat16(), 14))


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
    ref = ext_select.topk(h + bias, k)
    assert torch.equal(index.view(-1), ref.index) and torch.equal(value.view(-1), ref.value)


# ---------------------------------------------------------------------- batch_topk_bias (CPU only)
@pytest.mark.skipif(not _ext.has_cpu_ext(), reason=_ext.missing_message("cpu"))
@pytest.mark.parametrize("B,F,k,kind", [(7, 37, 5, "randn"), (16, 1001, 8, "randn"), (4, 600, 8, "ties"),
                                        (10, 321, 3, "ascending"), (12, 250, 5, "hotrow"), (6, 45, 12, "inf"),
                                        (0, 37, 3, "randn"), (3, 40, 40, "randn"), (64, 129, 4, "ties"),
                                        (64, 128, 4, "randn"), (9, 333, 2, "negties")])
def test_batch_topk_bias_is_batch_topk_of_the_sum(B, F, k, kind, poisoned):
    """batch_topk_bias(h, b, k·B) == batch_topk(h + b, k·B) exactly (one fp32 rounding of the sum either
    way; blocks that divide F, one per row span), at F prime, odd and a power of two, on ties."""
    h = make_h(B, F, torch.float32, "cpu", kind, seed=13)
    bias = torch.randn(F, generator=torch.Generator().manual_seed(14))
    if kind in ("ties", "negties"):
        bias = (bias * 2).round() / 2  # sums with ties
    if kind == "signed_zeros":
        bias = torch.where(torch.rand(F, generator=torch.Generator().manual_seed(25)) < 0.5, 0.0, -0.0)
    got = torch.ops.fastclt.batch_topk_bias(h, bias, k * B)
    want = torch.ops.fastclt.batch_topk((h + bias).contiguous(), k * B)
    for a, b in zip(got, want):
        assert torch.equal(a, b)


@pytest.mark.skipif(not _ext.has_cpu_ext(), reason=_ext.missing_message("cpu"))
@pytest.mark.parametrize("L,B,F,k,kind", [(3, 7, 37, 5, "randn"), (4, 64, 128, 4, "randn"), (2, 4, 600, 8, "ties"),
                                          (5, 10, 321, 3, "ascending"), (3, 12, 250, 5, "hotrow"),
                                          (2, 6, 45, 12, "inf"), (3, 0, 37, 3, "randn"), (2, 3, 40, 40, "randn"),
                                          (1, 9, 333, 2, "negties"), (3, 300, 1001, 2, "randn")])
def test_batch_topk_bias_layers_is_each_layers_batch_topk_bias(L, B, F, k, kind, poisoned):
    """batch_topk_bias_layers(h, bias, k·B) == the layers' batch_topk_bias(h[l], bias[l], k·B) one after
    another as a CSR over the L·B rows, exactly: small layers (selected in parallel, one per thread)
    and layers above the parallel size ([300, 1001], one after another), ties, ±inf, an empty batch,
    k = F (every entry)."""
    g = torch.Generator().manual_seed(15)
    h = torch.stack([make_h(B, F, torch.float32, "cpu", kind, seed=16 + l) for l in range(L)])
    bias = torch.randn(L, F, generator=g)
    if kind in ("ties", "negties"):
        bias = (bias * 2).round() / 2
    row_ptr, index, value = torch.ops.fastclt.batch_topk_bias_layers(h, bias, k * B)
    assert row_ptr.shape == (L * B + 1,) and index.shape == value.shape == (L * k * B,)
    for l in range(L):
        want = torch.ops.fastclt.batch_topk_bias(h[l], bias[l], k * B)
        rp = row_ptr[l * B:(l + 1) * B + 1]
        assert torch.equal(rp - l * k * B, want[0]), f"layer {l}: row_ptr"
        entries = slice(l * k * B, (l + 1) * k * B)
        assert torch.equal(index[entries], want[1]) and torch.equal(value[entries], want[2]), f"layer {l}"


def _sampled_rows(B: int, k_total: int) -> list:
    """The rows of h that select_cpu.cpp's sampled_bound reads: (256 · B / k_total, rounded up)
    evenly spaced rows, the middle one of each stride (white box: only for picking inputs that
    steer BatchTopK's one-pass path into its fallback; results must not depend on it)."""
    rows = -(-256 * B // k_total)
    stride = B // rows
    return [i * stride + stride // 2 for i in range(rows)]


def _brute_batch_topk(h: torch.Tensor, k_total: int):
    """(row_ptr, index, value) of BatchTopK by a stable float64 sort: ties to the lowest flat index."""
    B, F = h.shape
    keep = torch.sort(h.double().flatten(), descending=True, stable=True).indices[:k_total].sort().values
    rows = keep // F
    row_ptr = torch.zeros(B + 1, dtype=torch.int64)
    row_ptr[1:] = torch.bincount(rows, minlength=B).cumsum(0)
    return row_ptr, (keep % F).to(torch.int32), h.flatten()[keep].clamp_min(0)


# h above 2^18 entries: the one-pass path under a sampled bound (fp32, CPUs with AVX-512F), its
# fallbacks (too many candidates: the bound lands in a large tie group; too few: the sampled rows
# hold the batch's largest entries), and the two passes (bf16, and CPUs without AVX-512F)
@pytest.mark.skipif(not _ext.has_cpu_ext(), reason=_ext.missing_message("cpu"))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,F,k,kind", [(320, 1031, 16, "randn"), (320, 1031, 16, "ties"), (300, 1024, 9, "hotrow"),
                                        (257, 1100, 20, "inf"), (320, 1031, 16, "negties"),
                                        (300, 1024, 4, "descending"), (280, 1031, 16, "ascending"),
                                        (320, 1031, 16, "sampled_hot"), (320, 1031, 16, "signed_zeros")])
@pytest.mark.parametrize("with_bias", [False, True])
def test_batch_topk_above_the_parallel_size_is_exact(B, F, k, kind, dtype, with_bias, poisoned):
    """batch_topk and batch_topk_bias on h of more than 2^18 entries equal a stable float64 sort of h
    (+ bias), bit for bit, whichever path selected them."""
    if with_bias and dtype != torch.float32:
        pytest.skip("batch_topk_bias takes fp32 h")
    if kind == "sampled_hot":
        h = make_h(B, F, torch.float32, "cpu", "randn", seed=21)
        h[_sampled_rows(B, k * B)] += 6.0  # the sample sees only these: its bound is far too high
    elif kind == "signed_zeros":
        # 0.5% positive, 1.5% +0 or -0, the rest negative: the k_total-th largest (1.55% of h) and the
        # sampled bound are zeros, +0 and -0 rank alike (ties to the lowest flat index)
        g = torch.Generator().manual_seed(24)
        h = -make_h(B, F, torch.float32, "cpu", "randn", seed=21).abs() - 1e-3
        u = torch.rand(B, F, generator=g)
        h = torch.where(u < 0.005, -h, h)
        h = torch.where((u >= 0.005) & (u < 0.02), torch.where(torch.rand(B, F, generator=g) < 0.5, 0.0, -0.0), h)
    else:
        h = make_h(B, F, torch.float32, "cpu", kind, seed=21)
    h = h.to(dtype)
    bias = torch.randn(F, generator=torch.Generator().manual_seed(22))
    if kind in ("ties", "negties"):
        bias = (bias * 2).round() / 2  # sums with ties
    if kind == "signed_zeros":
        bias = torch.where(torch.rand(F, generator=torch.Generator().manual_seed(25)) < 0.5, 0.0, -0.0)
    if with_bias:
        got = torch.ops.fastclt.batch_topk_bias(h, bias, k * B)
        want = _brute_batch_topk(h + bias, k * B)
    else:
        got = torch.ops.fastclt.batch_topk(h, k * B)
        want = _brute_batch_topk(h.float(), k * B)
    assert torch.equal(got[0], want[0]), "row_ptr"
    assert torch.equal(got[1], want[1]), "index"
    assert torch.equal(got[2].float(), want[2].float().to(dtype).float()), "value"


@pytest.mark.skipif(not _ext.has_cpu_ext(), reason=_ext.missing_message("cpu"))
@pytest.mark.parametrize("where", ["sampled", "unsampled", "last"])
@pytest.mark.parametrize("with_bias", [False, True])
def test_batch_topk_above_the_parallel_size_refuses_nan(where, with_bias):
    """A NaN anywhere in a large h (+ bias) is refused: in a row the bound is sampled from (the two
    passes then find it), in one it is not (the one pass finds it), in the last entry (the scan's
    tail)."""
    B, F, k = 320, 1031, 16
    h = make_h(B, F, torch.float32, "cpu", "randn", seed=23)
    row = {"sampled": _sampled_rows(B, k * B)[3], "unsampled": 0, "last": B - 1}[where]
    h[row, F - 1 if where == "last" else 17] = float("nan")
    op = (lambda t: torch.ops.fastclt.batch_topk_bias(t, torch.zeros(F), k * B)) if with_bias else \
        (lambda t: torch.ops.fastclt.batch_topk(t, k * B))
    with pytest.raises(ValueError, match="contains NaN"):
        op(h)


@pytest.mark.skipif(not _ext.has_cpu_ext(), reason=_ext.missing_message("cpu"))
def test_batch_topk_bias_layers_bad_input_and_opcheck():
    """Shapes, dtypes and k are named; a NaN in one layer's h + bias is refused, whichever thread
    selects that layer; the registered fake agrees with the kernel."""
    op = torch.ops.fastclt.batch_topk_bias_layers
    h, b = torch.randn(3, 4, 100), torch.randn(3, 100)
    with pytest.raises(RuntimeError, match=r"bias must have shape \[L=3, F=100\]"):
        op(h, b[:2], 3)
    with pytest.raises(RuntimeError, match="h must be 3-D"):
        op(h[0], b, 3)
    with pytest.raises(RuntimeError, match="h must be float32"):
        op(h.bfloat16(), b, 3)
    with pytest.raises(RuntimeError, match="same dtype"):
        op(h, b.bfloat16(), 3)
    with pytest.raises(RuntimeError, match="h must be contiguous"):
        op(h.transpose(0, 1), b, 3)
    with pytest.raises(ValueError, match=r"k_total must be in \[0, B·F=400\]"):
        op(h, b, 401)
    nan_h = h.clone()
    nan_h[2, 1, 7] = float("nan")
    with pytest.raises(ValueError, match="h \\+ bias contains NaN"):
        op(nan_h, b, 3)
    row_ptr, index, value = op(h, b, 0)
    assert index.numel() == 0 and torch.equal(row_ptr, torch.zeros(13, dtype=torch.long))
    torch.library.opcheck(op, (torch.randn(2, 5, 37), torch.randn(2, 37), 6))


@pytest.mark.skipif(not _ext.has_cpu_ext(), reason=_ext.missing_message("cpu"))
@pytest.mark.parametrize("name,k_over,k_error,nan_error,k_ok", [
    ("topk_bias", 1001, (RuntimeError, "k must be in"), RuntimeError, 3),
    ("batch_topk_bias", 4001, (ValueError, r"k_total must be in \[0, h.numel\(\)=4000\]"), ValueError, 12),
])
def test_bias_selections_bad_input_and_opcheck(name, k_over, k_error, nan_error, k_ok):
    """topk_bias and batch_topk_bias share their checks of h and bias; each names its own k bound."""
    op = getattr(torch.ops.fastclt, name)
    h, b = torch.randn(4, 1000), torch.randn(1000)
    with pytest.raises(RuntimeError, match=r"bias must have shape \[F=1000\]"):
        op(h, b[:-1], 3)
    with pytest.raises(RuntimeError, match="h must be float32"):
        op(h.bfloat16(), b.bfloat16(), 3)
    with pytest.raises(RuntimeError, match="same dtype"):
        op(h, b.bfloat16(), 3)
    with pytest.raises(RuntimeError, match="h must be 2-D"):
        op(h.view(2, 2, 1000), b, 3)
    with pytest.raises(k_error[0], match=k_error[1]):
        op(h, b, k_over)
    nan_sum = b.clone()
    nan_sum[999], h[3, 999] = float("inf"), float("-inf")  # inf + -inf: a NaN in the sum only
    with pytest.raises(nan_error, match="h \\+ bias contains NaN"):
        op(h, nan_sum, 3)
    torch.library.opcheck(op, (torch.randn(4, 37), torch.randn(37), k_ok))


@pytest.mark.skipif(not _ext.has_cpu_ext(), reason=_ext.missing_message("cpu"))
@pytest.mark.parametrize("wdtype", [torch.float32, torch.bfloat16])
def test_sparse_decode_blocked_by_feature_slices(gen, wdtype):
    """Long rows over a decoder larger than L2 take the CPU decode's blocked path (rows by blocks, each
    in passes over ~1 MB slices of W): the result is the exact sum to fp32 accumulation, with the bias;
    a block whose rows are too short for the passes keeps the plain decode's order, bit for bit; and
    the gradients are unchanged."""
    F, D, long_rows, short_rows = 12000, 64, 2048, 300  # W: 3 slices of 4096 features; blocks of 2048 rows
    lens = torch.cat([torch.randint(44, 53, (long_rows,), generator=gen), torch.randint(12, 21, (short_rows,),
                                                                                          generator=gen)])
    row_ptr = torch.cat([torch.zeros(1, dtype=torch.int64), lens.cumsum(0)])
    nnz = int(row_ptr[-1])
    index = torch.randint(0, F, (nnz,), generator=gen, dtype=torch.int32)
    value = torch.randn(nnz, generator=gen).to(wdtype)
    W = torch.randn(F, D, generator=gen).to(wdtype)
    bias = torch.randn(D, generator=gen).to(wdtype)
    y = torch.ops.fastclt.sparse_decode(row_ptr, index, value, W, bias)
    exact = _exact_decode(row_ptr, index, value, W) + bias.double()
    assert y.dtype == wdtype and not y.isnan().any()
    assert_close_rel(y, exact, 1e-6 if wdtype == torch.float32 else 1e-2, "blocked decode")
    # the short block alone (a plain decode: too few entries per row) equals its rows in the blocked call
    s0 = int(row_ptr[long_rows])
    short = torch.ops.fastclt.sparse_decode(row_ptr[long_rows:] - s0, index[s0:], value[s0:], W, bias)
    assert torch.equal(y[long_rows:], short)
    v, Wt = value.clone().requires_grad_(), W.clone().requires_grad_()
    out = ops.sparse_decode(SparseCodes(row_ptr, index, v, F), Wt, impl="cpu")
    assert torch.equal(out.detach(), torch.ops.fastclt.sparse_decode(row_ptr, index, value, W, None))
    G = torch.randn(out.shape, generator=gen).to(wdtype)
    (out.float() * G.float()).sum().backward()
    rows = torch.repeat_interleave(torch.arange(long_rows + short_rows), lens)
    tol = 1e-5 if wdtype == torch.float32 else 1e-2
    assert_close_rel(v.grad, (G.double()[rows] * W.double()[index.long()]).sum(1), tol, "dvalue")
    dW = torch.zeros(F, D, dtype=torch.float64).index_add_(0, index.long(), value.double()[:, None] * G.double()[rows])
    assert_close_rel(Wt.grad, dW, tol, "dW")


@pytest.mark.skipif(not _ext.has_cpu_ext(), reason=_ext.missing_message("cpu"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("L,B,d", [(4, 1024, 256), (3, 131, 33), (1, 5, 7), (5, 0, 3)])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("cumulative", [True, False])
def test_prefix_sum_kernels_match_the_reference(L, B, d, dtype, with_bias, cumulative, gen):
    """fastclt::prefix_sum and fastclt::prefix_sum_backward through the CPU clt_decode's autograd
    wrapper: cumulative (the per_source tying's sum over sources), the output and the parts' gradient
    are the reference's prefix_sum bit for bit (the same fp32 sums in the same order, rounded once);
    not cumulative (the per_target tying's bias), those of parts.transpose(0, 1) + bias (the bias
    rounded to the parts' dtype, as that expression rounds it); both from a non-contiguous gradient.
    The bias's gradient is the float64 sum over tokens to fp32 rounding and has the same bits on one
    thread as on two; every output element is written (outputs poisoned)."""
    from fastclt.ops.ext.clt_decode import _PrefixSum
    from fastclt.ops.reference.clt_decode import prefix_sum
    parts = torch.randn(L, B, d, generator=gen).to(dtype).requires_grad_()
    if B:
        parts.data[0, 0, 0] = -0.0  # stays -0.0 without a bias (the reference's first term is a copy)
    bias = torch.randn(L, d, generator=gen).requires_grad_() if with_bias else None
    g = torch.randn(d, L, B, generator=gen).to(dtype).permute(2, 1, 0)  # [B, L, d], non-contiguous
    grads = {}
    reference = prefix_sum if cumulative else \
        (lambda p, b: p.transpose(0, 1) if b is None else p.transpose(0, 1) + b.to(p.dtype))
    for name, fn in (("reference", reference), ("kernel", lambda p, b: _PrefixSum.apply(p, b, cumulative))):
        y = fn(parts * 1, bias)  # a non-leaf, as a decode's output
        y.backward(g)
        grads[name] = (y.detach(), parts.grad, None if bias is None else bias.grad)
        parts.grad = None
        if bias is not None:
            bias.grad = None
    (y_ref, dp_ref, _), (y, dp, db) = grads["reference"], grads["kernel"]
    assert y.dtype == dtype and y.shape == (B, L, d) and y.is_contiguous()
    assert torch.equal(y, y_ref) and torch.equal(dp, dp_ref)
    assert torch.equal(y.signbit(), y_ref.signbit())
    if with_bias:
        want = g.double().sum(0)
        assert db.dtype == torch.float32 and torch.allclose(db.double(), want, rtol=1e-6, atol=1e-6 * max(B, 1) ** 0.5)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            one = torch.ops.fastclt.prefix_sum_backward(g.contiguous(), True, cumulative)
        finally:
            torch.set_num_threads(threads)
        assert torch.equal(one[1], db) and torch.equal(one[0], dp)


@pytest.mark.skipif(not _ext.has_cpu_ext(), reason=_ext.missing_message("cpu"))
def test_prefix_sum_kernels_bad_input_and_opcheck():
    """The kernels refuse what they do not take, naming the argument; schemas and fakes agree (opcheck)."""
    op, bwd = torch.ops.fastclt.prefix_sum, torch.ops.fastclt.prefix_sum_backward
    parts, bias = torch.randn(3, 5, 4), torch.randn(3, 4)
    with pytest.raises(RuntimeError, match=r"parts must be 3-D \[L, R, d\]"):
        op(parts[0], None)
    with pytest.raises(RuntimeError, match="parts must be float32 or bfloat16"):
        op(parts.double(), None)
    with pytest.raises(RuntimeError, match="parts must be contiguous"):
        op(parts.transpose(1, 2), None)
    with pytest.raises(RuntimeError, match=r"bias must have shape \[L=3, d=4\]"):
        op(parts, bias[:2])
    with pytest.raises(RuntimeError, match="bias must be float32"):
        op(parts, bias.bfloat16())
    with pytest.raises(RuntimeError, match=r"grad must be 3-D \[R, L, d\]"):
        bwd(parts[0], True)
    with pytest.raises(RuntimeError, match="grad must be float32 or bfloat16"):
        bwd(parts.double(), False)
    torch.library.opcheck(op, (parts, bias))
    torch.library.opcheck(op, (parts.bfloat16(), None))
    torch.library.opcheck(bwd, (torch.randn(5, 3, 4), True))
    torch.library.opcheck(bwd, (torch.randn(5, 3, 4).bfloat16(), False))


# ------------------------------------------------------------------- clt_decode_untied (CPU)
def _untied_inputs(B, L, F, d, dtype, value_dtype, gen, sources=None, per_row=3):
    """Codes of each source in ``sources`` (ragged rows, some empty) and its block [F, (L − s)·d]."""
    sources = list(range(L)) if sources is None else sources
    flat = []
    for s in sources:
        c = _by_target_sources(B, F, [[int(n) for n in torch.randint(0, per_row + 1, (B,), generator=gen)]], gen)[0]
        value = (torch.rand(c.nnz, generator=gen) + 0.1).to(value_dtype)
        flat.append((c.row_ptr, c.index, value, torch.randn(F, (L - s) * d, generator=gen).to(dtype)))
    return sources, flat


def _untied_exact(sources, flat, L, d, bias, B):
    y = torch.zeros(B, L * d, dtype=torch.float64)
    if bias is not None:
        y += bias.double().reshape(-1)
    for s, (row_ptr, index, value, W) in zip(sources, flat):
        y[:, s * d:] += _exact_decode(row_ptr, index, value, W)
    return y


@pytest.mark.parametrize("dtype,value_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                               (torch.bfloat16, torch.float32)])
@pytest.mark.parametrize("B,L,F,d,sources", [(37, 3, 29, 5, None), (1, 1, 7, 3, None), (0, 2, 5, 4, None),
                                             (53, 4, 41, 7, [1, 3]), (600, 4, 300, 96, None)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_clt_decode_untied_kernel(gen, dtype, value_dtype, B, L, F, d, sources, with_bias):
    """fastclt::clt_decode_untied: each source's decode added into its targets' columns, all in one fp32
    sum per token and rounded once — the float64 sum to within fp32 accumulation (fp32) or one bf16
    rounding; every output written (poisoned outputs), the sources in any increasing subset, odd and
    empty sizes, and the largest case above the parallel size on the threads as on one."""
    sources, flat = _untied_inputs(B, L, F, d, dtype, value_dtype, gen, sources)
    bias = torch.randn(L, d, generator=gen).to(dtype) if with_bias else None
    args = ([f[0] for f in flat], [f[1] for f in flat], [f[2] for f in flat], [f[3] for f in flat], sources, L, bias)
    y = torch.ops.fastclt.clt_decode_untied(*args)
    assert y.dtype == dtype and y.shape == (B, L * d)
    want = _untied_exact(sources, flat, L, d, bias, B)
    if dtype == torch.float32:
        assert torch.allclose(y.double(), want, rtol=1e-5, atol=1e-5)
    else:  # one rounding of the fp32 sum: within a bf16 ulp of the exact value
        assert ((y.double() - want).abs() <= want.abs() * 2 ** -8 + 1e-6).all()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one = torch.ops.fastclt.clt_decode_untied(*args)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, y)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("skip_empty", [False, True])
def test_untied_clt_decode_matches_the_reference(gen, dtype, skip_empty):
    """The CPU untied CLT decode on the fused kernel (``fastclt.ops.ext.clt_decode._untied``): ŷ and every
    gradient (values, each W_dec block, b_dec) against the reference composition in float64; with
    skip_empty a source without entries gets no gradient, on both sides."""
    from fastclt.ops.ext.clt_decode import clt_decode as ext_clt_decode
    from fastclt.ops.reference.clt_decode import clt_decode as ref_clt_decode

    B, L, F, d = 45, 4, 31, 9
    _, flat = _untied_inputs(B, L, F, d, dtype, dtype, gen)
    flat[2] = (torch.zeros(B + 1, dtype=torch.int64), torch.zeros(0, dtype=torch.int32), torch.zeros(0, dtype=dtype),
               flat[2][3])  # source 2 without entries
    b = torch.randn(L, d, generator=gen).to(dtype)
    g = torch.randn(B, L, d, generator=gen).to(dtype)
    outs = {}
    for name, fn, cast in (("kernel", ext_clt_decode, dtype), ("reference", ref_clt_decode, torch.float64)):
        values = [f[2].to(cast, copy=True).requires_grad_() for f in flat]
        Ws = [f[3].to(cast, copy=True).view(F, L - s, d).requires_grad_() for s, f in enumerate(flat)]
        bias = b.to(cast, copy=True).requires_grad_()
        codes = [SparseCodes(f[0], f[1], v, F) for f, v in zip(flat, values)]
        y = fn(codes, Ws, "none", bias, skip_empty=skip_empty)
        y.backward(g.to(cast))
        outs[name] = [y.detach()] + [v.grad for v in values] + [W.grad for W in Ws] + [bias.grad]
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for i, (got, want) in enumerate(zip(outs["kernel"], outs["reference"])):
        if want is None:
            assert got is None, i
            continue
        assert got is not None and got.dtype == dtype, i
        assert_close_rel(got, want, tol, f"output {i}")
    assert (outs["kernel"][1 + L + 2] is None) == skip_empty  # W_dec[2]'s gradient


def test_clt_decode_untied_bad_input_and_opcheck(gen):
    """The kernel refuses what it does not take, naming the argument; schema and fake agree (opcheck)."""
    op = torch.ops.fastclt.clt_decode_untied
    sources, flat = _untied_inputs(6, 3, 11, 4, torch.float32, torch.float32, gen)
    rp, idx, val, W = ([f[i] for f in flat] for i in range(4))
    bias = torch.randn(3, 4, generator=gen)
    with pytest.raises(RuntimeError, match="one entry per source"):
        op(rp, idx, val[:2], W, sources, 3, None)
    with pytest.raises(RuntimeError, match="sources must increase"):
        op(rp, idx, val, W, [0, 2, 1], 3, None)
    with pytest.raises(RuntimeError, match=r"weight\[1\] must have"):
        op(rp, idx, val, [W[0], W[2], W[2]], sources, 3, None)
    with pytest.raises(RuntimeError, match=r"bias must have shape \[n_layers=3, d=4\]"):
        op(rp, idx, val, W, sources, 3, bias[:2])
    with pytest.raises(RuntimeError, match="must have the same dtype"):
        op(rp, idx, val, W, sources, 3, bias.bfloat16())
    with pytest.raises(RuntimeError, match="every source must have B=6 rows"):
        op([rp[0], rp[1][:-1], rp[2]], idx, val, W, sources, 3, None)
    bad = idx[1].clone()
    bad[0] = 11
    with pytest.raises(RuntimeError, match=r"index must lie in \[0, weight.size\(0\)=11\)"):
        op(rp, [idx[0], bad, idx[2]], val, W, sources, 3, None)
    torch.library.opcheck(op, (rp, idx, val, W, sources, 3, bias))
    torch.library.opcheck(op, (rp[1:], idx[1:], [v.float() for v in val[1:]], [w.bfloat16() for w in W[1:]], [1, 2],
                               3, None))
