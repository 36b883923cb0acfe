"""The bf16-screened encoder selection (fastclt/ops/ext/screen.py; csrc/cpu/select_cpu.cpp):
``fastclt::bf16_split``, ``fastclt::screened_topk`` and ``fastclt::screened_batch_topk`` against the
selections of the float64 product, on odd sizes, hostile scales, ties and non-finite inputs; their
argument checks and opcheck; and the encoders of a TopK SAE and a BatchTopK CLT with the screen
forced on against the fp32 path, forward and backward. Outputs are NaN-poisoned."""
from __future__ import annotations

import warnings

import pytest
import torch

import fastclt
from fastclt.ops.ext import screen

pytestmark = pytest.mark.usefixtures("poisoned")

ops = torch.ops.fastclt


def _operands(B, d, F, gen, *, scale=None):
    x = torch.randn(B, d, generator=gen)
    if scale is not None:
        x = x * scale
    W = torch.randn(F, d, generator=gen)
    W = W / W.norm(dim=1, keepdim=True)
    bias = 0.1 * torch.randn(F, generator=gen)
    return x, W, bias


def _screen(x, W, bias, k, batch):
    x_hi, x_norms = ops.bf16_split(x)
    W_hi, W_norms = ops.bf16_split(W)
    A = torch.mm(x_hi, W_hi.t())
    if batch:
        return ops.screened_batch_topk(A, x, W, bias, x_norms, W_norms, k * x.shape[0])
    return ops.screened_topk(A, x, W, bias, x_norms, W_norms, k)


def _exact(x, W, bias):
    h = x.double() @ W.double().t()
    return h if bias is None else h + bias.double()


def _assert_topk(x, W, bias, k, out):
    index, value, status = out
    assert int(status) == 0
    h = _exact(x, W, bias)
    ref = h.topk(k, dim=1).indices.sort(1).values
    assert torch.equal(index.long(), ref)
    torch.testing.assert_close(value.double(), h.gather(1, ref).clamp_min(0), rtol=1e-5, atol=1e-5)


def _assert_batch(x, W, bias, k, out):
    row_ptr, index, value, status = out
    assert int(status) == 0
    B, F = x.shape[0], W.shape[0]
    h = _exact(x, W, bias)
    flat = h.flatten().topk(k * B).indices.sort().values
    rows = torch.repeat_interleave(torch.arange(B), row_ptr.diff())
    assert torch.equal(rows * F + index.long(), flat)
    torch.testing.assert_close(value.double(), h.flatten()[flat].clamp_min(0), rtol=1e-5, atol=1e-5)


def test_bf16_split(gen):
    """hi is the value rounded to nearest even (PyTorch's bf16 cast, bit for bit); the norms of hi and of
    the remainder are rounded up, never below the float64 norms (tiny ones included: squares below
    fp32's normal range); NaN stays NaN, and squares past fp32's range give an Inf norm."""
    a = torch.randn(37, 67, generator=gen) * torch.logspace(-30, 15, 67)
    a[3, 5] = float("nan")
    hi, norms = ops.bf16_split(a)
    assert hi.dtype == torch.bfloat16 and norms.shape == (2, 37)
    ok = torch.ones(37, dtype=torch.bool)
    ok[3] = False
    torch.testing.assert_close(hi[ok], a[ok].bfloat16(), rtol=0, atol=0)
    assert hi[3, 5].isnan() and norms[:, 3].isnan().all()
    exact_hi = hi.double().norm(dim=1)
    exact_lo = (a.double() - hi.double()).norm(dim=1)
    for got, exact in ((norms[0], exact_hi), (norms[1], exact_lo)):
        assert (got.double()[ok] >= exact[ok]).all()
        assert (got.double()[ok] <= exact[ok] * (1 + 1e-4) + 1e-16).all()
    assert ops.bf16_split(torch.full((2, 3), 1e20))[1][0].isinf().all()


@pytest.mark.parametrize("batch", [False, True])
@pytest.mark.parametrize("B,d,F,k", [(37, 67, 1000, 5), (64, 256, 2048, 16), (5, 3, 40, 1), (130, 33, 97, 12)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_screened_selection_is_the_float64_selection(gen, batch, B, d, F, k, with_bias):
    x, W, bias = _operands(B, d, F, gen)
    bias = bias if with_bias else None
    out = _screen(x, W, bias, k, batch)
    (_assert_batch if batch else _assert_topk)(x, W, bias, k, out)


@pytest.mark.parametrize("batch", [False, True])
def test_screened_selection_under_hostile_scales(gen, batch):
    """Columns of x spread over 2^±30 (the bf16 parts then carry most of the error in few coordinates),
    and rows of tiny and huge norm: the bound holds and the selection is the float64 one."""
    x, W, bias = _operands(48, 80, 600, gen, scale=torch.logspace(-9, 9, 80))
    x[0] *= 1e-25
    x[1] *= 1e5  # (past ~1e19 a square overflows fp32: the norm is Inf and the screen hands back)
    _ = (_assert_batch if batch else _assert_topk)(x, W, bias * 1e3, 6, _screen(x, W, bias * 1e3, 6, batch))


@pytest.mark.parametrize("batch", [False, True])
def test_screened_ties_go_to_the_lowest_index(gen, batch):
    """Features with identical rows of W and equal biases tie exactly; the lowest index wins, as in
    the fp32 path's selections."""
    x, W, bias = _operands(20, 24, 64, gen)
    W[40:] = W[8]
    bias[40:] = bias[8] = 5.0  # far above the rest: every row's top entries are the tied ones
    k = 4
    out = _screen(x, W, bias, k, batch)
    h = torch.mm(x, W.t())
    ref = ops.batch_topk_bias(h, bias, k * 20) if batch else ops.topk_bias(h, bias, k)
    assert int(out[-1]) == 0
    for got, want in zip(out[:-1], ref):
        assert torch.equal(got, want) if got.dtype != torch.float32 else torch.allclose(got, want, rtol=1e-5)


@pytest.mark.parametrize("batch", [False, True])
def test_screen_reads_row_strided_x_in_place(gen, batch):
    """x a layer of [B, L, d] activations (rows L·d apart, as a per-layer CLT encodes them): bf16_split
    and the screened selections read it in place, with the results of a contiguous copy."""
    xs = torch.randn(40, 3, 48, generator=gen)
    _, W, bias = _operands(40, 48, 512, gen)
    x = xs[:, 1]
    assert not x.is_contiguous()
    for got, want in zip(ops.bf16_split(x), ops.bf16_split(x.contiguous())):
        assert torch.equal(got, want)
    got, want = _screen(x, W, bias, 4, batch), _screen(x.contiguous(), W, bias, 4, batch)
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    (_assert_batch if batch else _assert_topk)(x, W, bias, 4, got)
    col = xs[:, :, 5]  # [B, L] with one-element rows apart: still read in place
    assert torch.equal(ops.bf16_split(col[:, :1])[1], ops.bf16_split(col[:, :1].contiguous())[1])


@pytest.mark.parametrize("batch", [False, True])
def test_screen_hands_back_on_nonfinite_and_broken_bounds(gen, batch):
    x, W, bias = _operands(16, 32, 256, gen)
    x_hi, x_norms = ops.bf16_split(x)
    W_hi, W_norms = ops.bf16_split(W)
    A = torch.mm(x_hi, W_hi.t())
    run = ops.screened_batch_topk if batch else ops.screened_topk
    k = 3 * 16 if batch else 3
    bad = A.clone()
    bad[2, 7] = float("nan")
    assert int(run(bad, x, W, bias, x_norms, W_norms, k)[-1]) == 1
    inf_x = x.clone()
    inf_x[1, 0] = float("inf")
    xi_hi, xi_norms = ops.bf16_split(inf_x)
    assert int(run(torch.mm(xi_hi, W_hi.t()), inf_x, W, bias, xi_norms, W_norms, k)[-1]) == 1
    shifted = A.clone()
    shifted[:, 0] += 100.0  # feature 0 screened far above its fp32 value: rescored outside its bounds
    assert int(run(shifted, x, W, bias, x_norms, W_norms, k)[-1]) == 2


def test_screen_bad_input_and_opcheck(gen):
    x, W, bias = _operands(8, 16, 64, gen)
    x_hi, x_norms = ops.bf16_split(x)
    W_hi, W_norms = ops.bf16_split(W)
    A = torch.mm(x_hi, W_hi.t())
    with pytest.raises(RuntimeError, match="A must be a contiguous bfloat16"):
        ops.screened_topk(A.float(), x, W, bias, x_norms, W_norms, 2)
    with pytest.raises(RuntimeError, match=r"W must be a contiguous float32 \[F=64, d=16\]"):
        ops.screened_topk(A, x, W[:, :8].contiguous(), bias, x_norms, W_norms, 2)
    with pytest.raises(RuntimeError, match="x_norms must be"):
        ops.screened_batch_topk(A, x, W, bias, x_norms.t().contiguous(), W_norms, 4)
    with pytest.raises(RuntimeError, match="bias must be"):
        ops.screened_batch_topk(A, x, W, bias[:3], x_norms, W_norms, 4)
    with pytest.raises(RuntimeError, match="k must be in"):
        ops.screened_topk(A, x, W, bias, x_norms, W_norms, 65)
    with pytest.raises(ValueError, match="k_total must be in"):
        ops.screened_batch_topk(A, x, W, bias, x_norms, W_norms, 8 * 64 + 1)
    with pytest.raises(RuntimeError, match="a must be float32"):
        ops.bf16_split(x.double())
    torch.library.opcheck(ops.bf16_split, (x,))
    torch.library.opcheck(ops.screened_topk, (A, x, W, bias, x_norms, W_norms, 2))
    torch.library.opcheck(ops.screened_batch_topk, (A, x, W, None, x_norms, W_norms, 5))


def test_applies_follows_the_switch(monkeypatch):
    x, W = torch.randn(4, 8), torch.randn(64, 8)
    monkeypatch.setenv(screen.ENV, "1")
    assert screen.applies(x, W, None, "topk", 2)
    assert not screen.applies(x, W, None, "topk", 3)  # k > F / 32
    assert not screen.applies(x, W, None, "relu", 2)
    assert not screen.applies(x.double(), W.double(), None, "topk", 2)
    monkeypatch.setenv(screen.ENV, "0")
    assert not screen.applies(x, W, None, "batchtopk", 2)
    monkeypatch.setenv(screen.ENV, "auto")
    assert not screen.applies(x, W, None, "topk", 2)  # far below MIN_WORK
    monkeypatch.setenv(screen.ENV, "yes")
    with pytest.raises(ValueError, match="FASTCLT_SCREEN: expected 0, 1 or auto"):
        screen.applies(x, W, None, "topk", 2)


def _model_run(model, x, y, monkeypatch, mode):
    monkeypatch.setenv(screen.ENV, mode)
    model.zero_grad(set_to_none=True)
    out = model.loss(x, y)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, grads


@pytest.mark.parametrize("family", ["sae-topk", "clt-batchtopk"])
def test_screened_encoders_match_the_fp32_path(family, monkeypatch, gen):
    """A TopK SAE and a per-layer BatchTopK CLT (layers screened one by one) with the screen forced on:
    the same codes as the fp32 path and as the pure-PyTorch reference, values, loss and every
    gradient within fp32 summation order."""
    torch.manual_seed(0)
    if family == "sae-topk":
        model = fastclt.SparseAutoencoder(fastclt.SAEConfig(d_in=48, n_features=512, activation="topk", k=6))
        x = torch.randn(97, 48, generator=gen)
        y = None
    else:
        model = fastclt.CrossLayerTranscoder(fastclt.CLTConfig(n_layers=3, d_in=40, d_out=40, n_features=300,
                                                               activation="batchtopk", k=5))
        x = torch.randn(61, 3, 40, generator=gen)
        y = torch.randn(61, 3, 40, generator=gen)
    model.impl = "reference"
    oracle, oracle_g = _model_run(model, x, y, monkeypatch, "1")
    model.impl = "cpu"
    ref, ref_g = _model_run(model, x, y, monkeypatch, "0")
    screened = []
    real = screen.select
    monkeypatch.setattr(screen, "select", lambda *a: screened.append(real(*a)) or screened[-1])
    got, got_g = _model_run(model, x, y, monkeypatch, "1")
    assert len(screened) == (1 if family == "sae-topk" else 3) and all(s is not None for s in screened)
    for a, b in zip(ref.codes if isinstance(ref.codes, list) else [ref.codes],
                    got.codes if isinstance(got.codes, list) else [got.codes]):
        assert torch.equal(a.row_ptr, b.row_ptr) and torch.equal(a.index, b.index)
        torch.testing.assert_close(a.value, b.value, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ref.loss, got.loss, rtol=1e-5, atol=1e-6)
    assert ref_g.keys() == got_g.keys()
    for n in ref_g:
        torch.testing.assert_close(ref_g[n], got_g[n], rtol=1e-4, atol=1e-6, msg=n)
    for a, b in zip(oracle.codes if isinstance(oracle.codes, list) else [oracle.codes],
                    got.codes if isinstance(got.codes, list) else [got.codes]):
        # the reference's TopK lists a row's entries by value: compare the codes as [B, F]
        assert torch.equal(a.to_dense() != 0, b.to_dense() != 0)
        torch.testing.assert_close(a.to_dense(), b.to_dense(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(oracle.loss, got.loss, rtol=1e-5, atol=1e-6)
    assert oracle_g.keys() == got_g.keys()
    for n in oracle_g:
        torch.testing.assert_close(oracle_g[n], got_g[n], rtol=1e-4, atol=1e-6, msg=n)


def test_broken_bound_turns_screening_off(monkeypatch, gen):
    """A kernel reporting a rescored value outside its bounds: the encode warns once, turns screening
    off for the process and returns the fp32 path's codes."""
    model = fastclt.SparseAutoencoder(fastclt.SAEConfig(d_in=32, n_features=256, activation="topk", k=4))
    x = torch.randn(50, 32, generator=gen)
    model.impl = "cpu"
    monkeypatch.setenv(screen.ENV, "0")
    ref = model.loss(x).codes
    real = ops.screened_topk

    def shifted(A, *args):
        A = A.clone()
        A[:, 0] += 100.0
        return real(A, *args)

    monkeypatch.setattr(screen, "_broken", False)
    monkeypatch.setattr(screen, "ops", lambda: type("O", (), {"screened_topk": staticmethod(shifted),
                                                               "bf16_split": ops.bf16_split})())
    monkeypatch.setenv(screen.ENV, "1")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = model.loss(x).codes
    assert screen._broken
    assert any("screening is off" in str(w.message) for w in caught)
    ref, got = (c[0] if isinstance(c, list) else c for c in (ref, got))
    assert torch.equal(ref.index, got.index) and torch.equal(ref.value, got.value)
    assert not screen.applies(x, model.W_enc, model.b_enc, "topk", 4)
