"""What only the Triton CLT decode (fastclt/ops/triton/clt_decode.py) does: weight and affine
gradients through the hot-feature chunk path, and its own layout checks. (What every clt_decode
must do: tests/ops/test_clt_decode.py.) Runs on a GPU at real sizes, or on the CPU under
TRITON_INTERPRET=1 at tiny sizes (set below, before Triton kernels are defined).
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import zlib  # noqa: E402

import pytest  # noqa: E402

triton = pytest.importorskip("triton")

from _decode_cases import check_close, clt_dense64, clt_grad_names, make_clt_inputs, run_clt  # noqa: E402
from fastclt import ops  # noqa: E402
from fastclt.ops.triton import _common as tk  # noqa: E402
from fastclt.ops.triton import clt_decode as tcd  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
GPU = DEVICE.type == "cuda"
# (B, L, F, d, k): odd sizes
SIZE = (1031, 6, 4099, 771, 32) if GPU else (7, 3, 13, 13, 4)


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    """Every launcher output starts as NaN: an element a kernel forgets to write fails the test."""
    monkeypatch.setenv("FASTCLT_POISON", "1")


@pytest.mark.parametrize("tying,affine", [("none", None), ("per_source", "both"), ("per_target", "both")])
def test_clt_decode_hot_feature_chunks(monkeypatch, tying, affine):
    """Weight/affine gradients with every feature above the hot-feature chunk size."""
    monkeypatch.setattr(tk, "SEGMENT_CHUNK", 2)
    inputs = make_clt_inputs(tying, affine, torch.float32, SIZE, zlib.crc32(repr((tying, "hot")).encode()), DEVICE)
    got = run_clt(tcd.clt_decode, inputs[0], inputs[1], tying, *inputs[2:])
    want = run_clt(clt_dense64, inputs[0], inputs[1], tying, *inputs[2:], dtype=torch.float64)
    for name, out, x in zip(clt_grad_names(tying, SIZE[1], affine), got, want):
        check_close(name + " vs fp64", out, x, 1e-5)


def test_the_triton_clt_decode_own_checks():
    """Beyond the entry point's checks: contiguous untied blocks, unit inner stride of a tied W_dec."""
    codes, W, b, off, sc, _ = make_clt_inputs("per_source", "both", torch.float32, (5, 3, 8, 6, 2), 8, DEVICE)
    Wn = make_clt_inputs("none", None, torch.float32, (5, 3, 8, 6, 2), 8, DEVICE)[1]
    with pytest.raises(ValueError, match=r"W_dec\[1\]"):  # a non-contiguous block of the right shape
        ops.clt_decode(codes, [Wn[0], Wn[0][:, :2], Wn[2]], "none", impl="triton")
    with pytest.raises(ValueError, match=r"W_dec\[2\]"):
        ops.clt_decode(codes, [Wn[0], Wn[1], torch.randn(6, 1, 8, device=DEVICE).permute(2, 1, 0)], "none",
                       impl="triton")
    with pytest.raises(ValueError, match="W_dec"):
        ops.clt_decode(codes, W.transpose(1, 2).contiguous().transpose(1, 2), "per_target", impl="triton")
    with pytest.raises(TypeError, match=r"codes\[0\].value"):
        ops.clt_decode([c.with_value(c.value.double()) for c in codes], W, "per_target", impl="triton")
