"""pytest-benchmark entry points for a few ops at the tiny shape (CUDA when present, else the CPU):

    python -m pytest benchmarks/test_benchmarks.py --benchmark-only [--benchmark-json=out.json]

Every registered implementation that is available on the device is a parameter. The full suites,
with roofline and goal tables, are ``python -m benchmarks.run``.
"""
from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("pytest_benchmark")

import fastclt.ops as ops  # noqa: E402
from benchmarks.bench_ops import random_codes  # noqa: E402
from benchmarks.shapes import SHAPES  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPE = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
S = SHAPES["tiny"]


def _impls(op: str) -> list[str]:
    out = []
    for impl in ops.implementations(op):
        if impl == "triton" and DEVICE.type != "cuda":
            continue  # the interpreter is for correctness tests, not timing
        try:
            ops.resolve(op, impl, DEVICE)
            out.append(impl)
        except Exception:
            pass
    return out


def _sync(fn):
    def run():
        out = fn()
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()
        return out
    return run


def _g(seed: int = 0) -> torch.Generator:
    return torch.Generator(device=DEVICE).manual_seed(seed)


@pytest.mark.parametrize("impl", _impls("sparse_decode"))
def test_sparse_decode_fwd(benchmark, impl):
    codes = random_codes(S.B, S.F, S.k, DEVICE, DTYPE, 0)
    W = (torch.randn(S.F, S.d, device=DEVICE, generator=_g()) / math.sqrt(S.d)).to(DTYPE)
    y = benchmark(_sync(lambda: ops.sparse_decode(codes, W, impl=impl)))
    assert y.shape == (S.B, S.d)


@pytest.mark.parametrize("impl", _impls("sparse_decode"))
def test_sparse_decode_fwd_bwd(benchmark, impl):
    codes = random_codes(S.B, S.F, S.k, DEVICE, DTYPE, 0)
    codes.value.requires_grad_(True)
    W = (torch.randn(S.F, S.d, device=DEVICE, generator=_g()) / math.sqrt(S.d)).to(DTYPE).requires_grad_(True)
    g = torch.randn(S.B, S.d, device=DEVICE, generator=_g(1)).to(DTYPE)

    def step():
        W.grad = codes.value.grad = None
        ops.sparse_decode(codes, W, impl=impl).backward(g)
    benchmark(_sync(step))
    assert W.grad is not None


@pytest.mark.parametrize("impl", _impls("batch_topk"))
def test_batch_topk(benchmark, impl):
    h = torch.randn(S.B, S.F, device=DEVICE, generator=_g()).to(DTYPE)
    codes = benchmark(_sync(lambda: ops.batch_topk(h, S.k, impl=impl)))
    assert codes.nnz == S.k * S.B


@pytest.mark.parametrize("impl", _impls("encode"))
def test_encode_topk_fwd(benchmark, impl):
    x = torch.randn(S.B, S.d, device=DEVICE, generator=_g()).to(DTYPE)
    W = (torch.randn(S.F, S.d, device=DEVICE, generator=_g(1)) / math.sqrt(S.d)).to(DTYPE)
    b = torch.zeros(S.F, device=DEVICE, dtype=DTYPE)
    with torch.no_grad():
        codes = benchmark(_sync(lambda: ops.encode(x, W, b, activation="topk", k=S.k, impl=impl)))
    assert codes.nnz == S.k * S.B


def test_torch_topk_flat_baseline(benchmark):
    h = torch.randn(S.B, S.F, device=DEVICE, generator=_g()).to(DTYPE)
    vals, _ = benchmark(_sync(lambda: torch.topk(h.reshape(-1), S.k * S.B, sorted=False)))
    assert vals.numel() == S.k * S.B
