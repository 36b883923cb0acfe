"""What only the Triton kernels shared by the decodes and the encode backward
(fastclt/ops/triton/_common.py) do: feature_scatter / feature_sum / feature_scatter_dot and the raw
gather launchers against fp64 math, the hot-feature chunk path, the Triton decode's own checks, and
that importing the package does not import Triton. (What every sparse_decode must do:
tests/ops/test_decode.py.) Runs on a GPU at real sizes, or on the CPU under TRITON_INTERPRET=1 at
tiny sizes (set below, before Triton kernels are defined).
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import subprocess  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402

triton = pytest.importorskip("triton")

from _decode_cases import cases, check_close, dense64, run  # noqa: E402
from fastclt import ops  # noqa: E402
from fastclt.ops.reference.decode import sparse_decode as ref_decode  # noqa: E402
from fastclt.ops.triton import _common as tk  # noqa: E402
from fastclt.ops.triton import decode as tsd  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
GPU = DEVICE.type == "cuda"


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    """Every launcher output starts as NaN: an element a kernel forgets to write fails the test."""
    monkeypatch.setenv("FASTCLT_POISON", "1")


@pytest.mark.parametrize("chunk", [1, 4])
@pytest.mark.parametrize("kind", ["hot", "csr"])
def test_sparse_decode_hot_feature_chunks(monkeypatch, chunk, kind):
    """Features with more than SEGMENT_CHUNK entries are walked in chunks + an ordered reduction."""
    monkeypatch.setattr(tk, "SEGMENT_CHUNK", chunk)
    codes, W, b, g = cases(kind, 13, 11, 300, 6, torch.float32, torch.float32, chunk, DEVICE)
    got = run(tsd.sparse_decode, codes, W, b, g)
    again = run(tsd.sparse_decode, codes, W, b, g)
    exact = run(dense64, codes.with_value(codes.value.double()), W.double(), b.double(), g.double())
    for name, out, x, y in zip(("y", "dvalue", "dW", "db"), got, exact, again):
        check_close(name + " vs fp64", out, x, 1e-5)
        assert torch.equal(out, y), f"{name}: not deterministic"


def test_feature_scatter_and_sum():
    gen = torch.Generator().manual_seed(5)
    N, R, F, D = (20000, 3000, 700, 300) if GPU else (57, 13, 23, 37)
    index = torch.randint(F - 3, (N,), generator=gen).to(DEVICE)  # the last 3 features have no entry
    row = torch.randint(R, (N,), generator=gen).to(DEVICE, torch.int32)
    coef = torch.randn(N, generator=gen).to(DEVICE)
    G = torch.randn(R, 2 * D, generator=gen).to(DEVICE)[:, D:]  # a row-strided view
    want = torch.zeros(F, D, dtype=torch.float64, device=DEVICE).index_add_(
        0, index, coef.double()[:, None] * G.double()[row.long()])
    got = tk.feature_scatter(index, row, coef, G, F)
    assert got.dtype == torch.float32
    check_close("feature_scatter", got, want, 1e-6)
    assert torch.equal(got[-3:], torch.zeros(3, D, device=DEVICE))
    segs = tk.feature_segments(index.to(torch.int32), F)
    assert torch.equal(tk.feature_scatter(index.to(torch.int32), row, coef, G, F, segments=segs), got)
    for chunk in (2, 5):  # hot-feature chunks, bounds of the chunk tables
        tk.SEGMENT_CHUNK, default = chunk, tk.SEGMENT_CHUNK
        try:
            check_close(f"feature_scatter chunk={chunk}", tk.feature_scatter(index, row, coef, G, F), want, 1e-6)
        finally:
            tk.SEGMENT_CHUNK = default
    s = tk.feature_sum(index, coef, F, segments=segs)
    check_close("feature_sum", s,
                torch.zeros(F, dtype=torch.float64, device=DEVICE).index_add_(0, index, coef.double()), 1e-6)
    assert tk.feature_scatter(index[:0], row[:0], coef[:0], G, F).abs().sum() == 0


def test_feature_scatter_dot():
    gen = torch.Generator().manual_seed(12)
    N, R, F, D = (20000, 3000, 700, 300) if GPU else (41, 9, 17, 300)  # D spans several blocks
    index = torch.randint(F, (N,), generator=gen).to(DEVICE, torch.int32)
    row = torch.randint(R, (N,), generator=gen).to(DEVICE)
    coef = torch.randn(N, generator=gen).to(DEVICE, torch.bfloat16)
    G = torch.randn(R, D, generator=gen).to(DEVICE)
    W = torch.randn(F, D, generator=gen).to(DEVICE, torch.bfloat16)
    dW, dot = tk.feature_scatter_dot(index, row, coef, G, W)
    assert dW.dtype == dot.dtype == torch.float32
    assert torch.equal(dW, tk.feature_scatter(index, row, coef, G, F))
    dW16, dot16 = tk.feature_scatter_dot(index, row, coef, G, W, out_dtype=torch.bfloat16)
    assert dW16.dtype == torch.bfloat16 and torch.equal(dot16, dot)
    # one rounding of the fp32 sums (the Triton 3.9 interpreter truncates fp32 → bf16; GPUs round to nearest)
    assert ((dW16.float() - dW).abs() <= dW.abs() * 2**-7).all()
    want = (G.double()[row] * W.double()[index.long()]).sum(1)
    check_close("feature_scatter_dot", dot, want, 1e-6)
    tk.SEGMENT_CHUNK, default = 3, tk.SEGMENT_CHUNK  # hot features walked in chunks
    try:
        dW3, dot3 = tk.feature_scatter_dot(index, row, coef, G, W)
    finally:
        tk.SEGMENT_CHUNK = default
    check_close("feature_scatter_dot chunked dW", dW3, dW, 1e-6)
    assert torch.equal(dot3, dot)  # each dot is still one program's sum


def test_gather_decode_raw():
    gen = torch.Generator().manual_seed(6)
    codes, W, b, _ = cases("csr", 9, 21, 33, 5, torch.bfloat16, torch.float32, 6, DEVICE)
    y = tk.gather_decode(codes.row_ptr, codes.index, codes.value, W, out_dtype=torch.float32)
    check_close("gather_decode", y, ref_decode(codes, W), 1e-5)
    G = torch.randn(9, 33, generator=gen).to(DEVICE)
    dots = tk.gather_dot(codes.row_ptr, codes.index, W, G)
    want = (G[codes.row_ids()] * W[codes.index.long()]).sum(1)
    check_close("gather_dot", dots, want, 1e-5)


def test_the_triton_decode_own_checks():
    """Beyond the entry point's checks: the values' dtype and contiguous W rows (the kernels read
    rows with unit stride; a row-strided W is fine)."""
    codes, W, b, _ = cases("topk", 5, 8, 6, 2, torch.float32, torch.float32, 9, DEVICE)
    with pytest.raises(TypeError, match="codes.value"):
        ops.sparse_decode(codes.with_value(codes.value.double()), W, impl="triton")
    with pytest.raises(ValueError, match="W_dec"):
        ops.sparse_decode(codes, torch.randn(6, 8, device=DEVICE).t(), impl="triton")  # non-unit inner stride
    with pytest.raises(ValueError, match="W_dec"):  # [F, T, d] rows not contiguous
        ops.sparse_decode(codes, torch.randn(8, 3, 2, device=DEVICE).transpose(1, 2), impl="triton")
    Wwide = torch.randn(8, 12, device=DEVICE)
    check_close("row-strided W", tsd.sparse_decode(codes, Wwide[:, 3:9]), ref_decode(codes, Wwide[:, 3:9]), 1e-6)


def test_package_import_is_cheap():
    code = "import sys, fastclt.ops.triton; assert 'triton' not in sys.modules, 'triton imported'"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env,
                   cwd=os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "..")))
