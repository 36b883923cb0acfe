"""The dense JumpReLU kernels of fastclt._C (``torch.ops.fastclt.jumprelu_dense`` and
``jumprelu_dense_backward``, csrc/cpu/dense_cpu.cpp) and their autograd wrapper
``fastclt.ops.ext.dense.jumprelu_masked``, against the PyTorch formulation

    θ_h = θ.to(h.dtype);  active = h > θ_h;  band = |h − θ_h| < ε/2  (in h's dtype)
    a = h · active;  stored = active | band (= band_mask(h, θ_h, ε))
    dh = g · active;  dθ = (−θ/ε) · Σ_b g · band

on fresh random inputs with many entries in the band, some exactly at θ and on the band's edges,
odd sizes, float32 and bfloat16. Every kernel output starts NaN-poisoned (the ``poisoned``
fixture), so an element a kernel forgets to write fails the comparisons.
"""
from __future__ import annotations

import pytest
import torch

from fastclt import _ext
from fastclt.ops.reference.activation import band_mask, jumprelu_dense

pytestmark = [pytest.mark.skipif(not _ext.has_cpu_ext(), reason=_ext.missing_message("cpu")),
              pytest.mark.usefixtures("poisoned")]

if _ext.has_cpu_ext():
    from fastclt.ops.ext.dense import available, jumprelu_masked

DTYPES = (torch.float32, torch.bfloat16)
# (B, F): odd sizes, empty ones, and sizes over several of the backward's row chunks and column blocks
SIZES = [(37, 101), (1, 1), (0, 7), (5, 0), (1, 1000), (300, 1100), (4200, 37)]
ops = torch.ops.fastclt


def _case(B, F, dtype, eps, gen):
    """(h [B, F] in dtype, θ fp32 [F] ≥ 0 with some zeros): about half the entries inside the band,
    a share exactly at θ_h and exactly on the band's edges θ_h ± ε/2, the rest spread wider."""
    theta = torch.rand(F, generator=gen) * 0.6
    theta[torch.rand(F, generator=gen) < 0.1] = 0.0
    th = theta.to(dtype)
    half = torch.tensor(0.5 * eps, dtype=dtype)
    kind = torch.randint(0, 8, (B, F), generator=gen)
    near = (torch.rand(B, F, generator=gen) * 2 - 1) * eps  # within ±ε of θ: half of it in the band
    wide = torch.randn(B, F, generator=gen)
    h = torch.where(kind < 4, th.float() + near, th.float() + wide).to(dtype)
    h = torch.where(kind == 4, th.expand(B, F), h)  # exactly at θ_h
    h = torch.where(kind == 5, th + half, h)  # on the band's upper edge (rounded in dtype)
    h = torch.where(kind == 6, th - half, h)  # on its lower edge
    return h.contiguous(), theta


def _reference(h, theta, eps, g=None):
    """The PyTorch formulation: (a, stored, active, band) and, given g, (dh, dθ float64)."""
    th = theta.to(h.dtype)
    u = h - th
    active, band = u > 0, u.abs() < eps / 2
    out = (h * active, active | band, active, band)
    if g is None:
        return out
    dh = g * active
    dtheta = (g.double() * band).sum(0) * (-theta.double() / eps)
    return out + (dh, dtheta)


def _dtheta_tol(g, band, theta, eps):
    """fp32 sum of B terms: |error| ≤ B·2⁻²⁴·Σ|g·band|·|θ/ε| (bound per feature, with slack)."""
    B = g.shape[0]
    return (max(B, 1) * 2.0 ** -23) * (g.double().abs() * band).sum(0) * (theta.double() / eps).abs() + 1e-30


def _assert_dtheta(dtheta, want, g, band, theta, eps):
    assert dtheta.dtype == torch.float32 and dtheta.shape == want.shape
    err = (dtheta.double() - want).abs()
    assert bool((err <= _dtheta_tol(g, band, theta, eps)).all()), f"dθ: max error {err.max().item():.3g}"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,F", SIZES)
def test_forward_matches_the_reference(B, F, dtype, gen):
    eps = 0.1
    h, theta = _case(B, F, dtype, eps, gen)
    value, stored, code = ops.jumprelu_dense(h, theta, 0.5 * eps)
    a, st, active, band = _reference(h, theta, eps)
    assert value.dtype == dtype and stored.dtype == torch.bool and code.dtype == torch.uint8
    assert value.shape == stored.shape == code.shape == (B, F)
    assert torch.equal(value, a)
    assert torch.equal(stored, st)
    assert torch.equal(stored, band_mask(h, theta.to(dtype), eps))
    assert torch.equal(code, active.to(torch.uint8) | (band.to(torch.uint8) << 1))
    if B * F >= 1000:  # the inputs do exercise every case
        assert 0.2 < band.float().mean() < 0.8 and 0.2 < active.float().mean() < 0.8
        assert (band & ~active).any() and (band & active).any() and (h == theta.to(dtype)).any()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("eps", [0.1, 0.1001, 0.37])
def test_band_edges_compare_in_h_dtype(dtype, eps, gen):
    """ε/2 a little above a bf16 value (0.1001): an entry exactly at that value is outside the band
    in bf16 (PyTorch compares the scalar in h's dtype) though inside it in real numbers; θ not
    representable in bf16 is rounded first."""
    h, theta = _case(64, 257, dtype, eps, gen)
    value, stored, code = ops.jumprelu_dense(h, theta, 0.5 * eps)
    a, st, active, band = _reference(h, theta, eps)
    assert torch.equal(value, a) and torch.equal(stored, st)
    assert torch.equal(code, active.to(torch.uint8) | (band.to(torch.uint8) << 1))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,F", SIZES)
@pytest.mark.parametrize("need_h,need_threshold", [(True, True), (True, False), (False, True), (False, False)])
def test_backward_matches_the_reference(B, F, dtype, need_h, need_threshold, gen):
    eps = 0.1
    h, theta = _case(B, F, dtype, eps, gen)
    g = torch.randn(B, F, generator=gen).to(dtype)
    _, _, code = ops.jumprelu_dense(h, theta, 0.5 * eps)
    dh, dtheta = ops.jumprelu_dense_backward(g, code, theta, eps, need_h, need_threshold)
    _, _, _, band, want_dh, want_dtheta = _reference(h, theta, eps, g)
    if need_h:
        assert dh.dtype == dtype and torch.equal(dh, want_dh)
    else:
        assert dh.numel() == 0 and dh.dtype == dtype
    if need_threshold:
        _assert_dtheta(dtheta, want_dtheta, g, band, theta, eps)
        if dtype == torch.float32:  # the PyTorch formulation in fp32 agrees to fp32 rounding (both sums)
            torch_dtheta = (g * band).sum(0) * (-theta / eps)
            err = (dtheta.double() - torch_dtheta.double()).abs()
            assert bool((err <= 2 * _dtheta_tol(g, band, theta, eps)).all())
    else:
        assert dtheta.numel() == 0 and dtheta.dtype == torch.float32


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,F", [(37, 101), (1, 1), (0, 7), (300, 1100)])
def test_autograd_wrapper(B, F, dtype, gen):
    """jumprelu_masked: outputs as the op's; gradients to h (h's dtype) and θ (θ's dtype: fp32 here,
    bf16 below) as the reference formulation; stored is not differentiable."""
    eps = 0.1
    h, theta = _case(B, F, dtype, eps, gen)
    g = torch.randn(B, F, generator=gen).to(dtype)
    hh, tt = h.clone().requires_grad_(), theta.clone().requires_grad_()
    a, stored = jumprelu_masked(hh, tt, eps)
    ref_a, ref_st, _, band, want_dh, want_dtheta = _reference(h, theta, eps, g)
    assert torch.equal(a.detach(), ref_a) and torch.equal(stored, ref_st)
    assert a.requires_grad and not stored.requires_grad
    a.backward(g)
    assert hh.grad.dtype == dtype and torch.equal(hh.grad, want_dh)
    _assert_dtheta(tt.grad, want_dtheta, g, band, theta, eps)
    # a bf16 threshold: compared as is (already in bf16 for bf16 h), gradient back in bf16
    tb = theta.bfloat16().requires_grad_()
    a, _ = jumprelu_masked(h, tb, eps)
    (a.float() * g.float()).sum().backward()
    _, _, _, band_b, _, want_b = _reference(h, tb.detach().float(), eps, g)
    assert tb.grad.dtype == torch.bfloat16
    torch.testing.assert_close(tb.grad.double(), want_b, rtol=2 ** -7, atol=1e-6)


@pytest.mark.parametrize("need", ["h", "threshold", "neither"])
def test_autograd_wrapper_only_what_is_needed(need, gen):
    h, theta = _case(19, 33, torch.float32, 0.1, gen)
    hh = h.clone().requires_grad_(need == "h")
    tt = theta.clone().requires_grad_(need == "threshold")
    a, stored = jumprelu_masked(hh, tt, 0.1)
    assert a.requires_grad == (need != "neither")
    if need == "neither":
        return
    a.sum().backward()  # an expanded (stride-0) upstream gradient
    _, _, active, band = _reference(h, theta, 0.1)
    if need == "h":
        assert torch.equal(hh.grad, active.float()) and tt.grad is None
    else:
        assert hh.grad is None
        torch.testing.assert_close(tt.grad.double(), band.double().sum(0) * (-theta.double() / 0.1))


@pytest.mark.parametrize("B,F", [(37, 101), (200, 515), (1, 1)])
def test_gradients_match_the_reference_autograd(B, F, gen):
    """float32: value and both gradients of a loss through a against the reference JumpReLU
    (fastclt.ops.reference.activation.jumprelu_dense, its own autograd Function), for a loss using a
    twice (a non-trivial upstream gradient). Inputs are continuous (no entry placed on an edge), so
    the reference's rect((h − θ)/ε) and |h − θ| < ε/2 agree."""
    eps = 0.05
    theta = torch.rand(F, generator=gen) * 0.5
    h = theta + (torch.rand(B, F, generator=gen) * 2 - 1) * 2 * eps
    w = torch.randn(B, F, generator=gen)
    grads = []
    for fn in (jumprelu_masked, jumprelu_dense):
        hh, tt = h.clone().requires_grad_(), theta.clone().requires_grad_()
        out = fn(hh, tt, eps)
        a = out[0] if isinstance(out, tuple) else out
        loss = (a * w).sum() + (a * a).sum() * 0.5
        loss.backward()
        grads.append((a.detach(), hh.grad, tt.grad))
    (a, dh, dt), (ra, rdh, rdt) = grads
    assert torch.equal(a, ra)
    torch.testing.assert_close(dh, rdh, rtol=0, atol=0)
    torch.testing.assert_close(dt, rdt, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", DTYPES)
def test_nan_and_inf_as_the_pytorch_formulation(dtype, gen):
    """NaN and ±Inf in h and g give what `h * active` and `g * active`, `(g * band).sum(0)` give:
    NaN where the mask is 0 (Inf·0), never in the band or active."""
    eps = 0.1
    h, theta = _case(23, 41, dtype, eps, gen)
    h[0, :5] = float("nan")
    h[1, :5] = float("inf")
    h[2, :5] = float("-inf")
    g = torch.randn(23, 41, generator=gen).to(dtype)
    g[3, 5:10] = float("nan")
    g[4, 10:15] = float("inf")
    value, stored, code = ops.jumprelu_dense(h, theta, 0.5 * eps)
    a, st, active, band, want_dh, want_dtheta = _reference(h, theta, eps, g)
    torch.testing.assert_close(value, a, rtol=0, atol=0, equal_nan=True)
    assert torch.equal(stored, st)
    assert torch.equal(code, active.to(torch.uint8) | (band.to(torch.uint8) << 1))
    dh, dtheta = ops.jumprelu_dense_backward(g, code, theta, eps, True, True)
    torch.testing.assert_close(dh, want_dh, rtol=0, atol=0, equal_nan=True)
    assert torch.equal(dtheta.isnan(), want_dtheta.isnan()) and torch.equal(dtheta.isinf(), want_dtheta.isinf())
    finite = want_dtheta.isfinite()
    torch.testing.assert_close(dtheta.double()[finite], want_dtheta[finite], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
def test_deterministic_whatever_the_thread_count(dtype, gen):
    """Two runs are bit-identical, and so are runs on 1, 2 and 3 threads (dθ's sums are per row
    chunk, chunks fixed by B alone, added in chunk order)."""
    eps = 0.1
    h, theta = _case(1000, 1500, dtype, eps, gen)
    g = torch.randn(1000, 1500, generator=gen).to(dtype)
    before = torch.get_num_threads()
    results = []
    try:
        for n in (before, before, 1, 2, 3):
            torch.set_num_threads(n)
            value, stored, code = ops.jumprelu_dense(h, theta, 0.5 * eps)
            dh, dtheta = ops.jumprelu_dense_backward(g, code, theta, eps, True, True)
            _, dtheta_only = ops.jumprelu_dense_backward(g, code, theta, eps, False, True)
            results.append((value, stored, code, dh, dtheta, dtheta_only))
    finally:
        torch.set_num_threads(before)
    first = results[0]
    assert torch.equal(first[4], first[5])  # with or without dh, the same sums
    for other in results[1:]:
        for x, y in zip(first, other):
            assert torch.equal(x.view(torch.uint8) if x.dtype != torch.bool else x,
                               y.view(torch.uint8) if y.dtype != torch.bool else y)


def test_available():
    assert available(torch.zeros(2, 3)) and available(torch.zeros(2, 3, dtype=torch.bfloat16))
    assert not available(torch.zeros(2, 3, dtype=torch.float64))
    assert not available(torch.zeros(2, 3, dtype=torch.float16))
    assert not available(torch.zeros(2, 3, device="meta"))


def test_bad_arguments_name_the_argument():
    h, theta = torch.randn(4, 37), torch.rand(37)
    fwd, bwd = ops.jumprelu_dense, ops.jumprelu_dense_backward
    with pytest.raises(RuntimeError, match="jumprelu_dense: h must be float32 or bfloat16"):
        fwd(h.double(), theta, 0.05)
    with pytest.raises(RuntimeError, match="jumprelu_dense: h must be 2-D"):
        fwd(h.view(-1), theta, 0.05)
    with pytest.raises(RuntimeError, match="jumprelu_dense: h must be contiguous"):
        fwd(torch.randn(37, 4).t(), theta, 0.05)
    with pytest.raises(RuntimeError, match=r"jumprelu_dense: threshold must have shape \[F=37\]"):
        fwd(h, theta[:-1], 0.05)
    with pytest.raises(RuntimeError, match=r"jumprelu_dense: threshold must have shape \[F=37\]"):
        fwd(h, theta[None], 0.05)
    with pytest.raises(RuntimeError, match="jumprelu_dense: threshold must be float32"):
        fwd(h, theta.bfloat16(), 0.05)
    with pytest.raises(RuntimeError, match="jumprelu_dense: threshold must be contiguous"):
        fwd(h, torch.rand(74)[::2], 0.05)
    for bad in (-0.1, float("nan"), float("inf")):
        with pytest.raises(RuntimeError, match="jumprelu_dense: half_band must be a finite number >= 0"):
            fwd(h, theta, bad)
    _, _, code = fwd(h, theta, 0.05)
    with pytest.raises(RuntimeError, match="jumprelu_dense_backward: grad must be float32 or bfloat16"):
        bwd(h.half(), code, theta, 0.1, True, True)
    with pytest.raises(RuntimeError, match="jumprelu_dense_backward: grad must be contiguous"):
        bwd(torch.randn(37, 4).t(), code, theta, 0.1, True, True)
    with pytest.raises(RuntimeError, match="jumprelu_dense_backward: code must be uint8"):
        bwd(h, code.int(), theta, 0.1, True, True)
    with pytest.raises(RuntimeError, match="jumprelu_dense_backward: code must have grad's shape"):
        bwd(h, code[:-1], theta, 0.1, True, True)
    with pytest.raises(RuntimeError, match=r"jumprelu_dense_backward: threshold must have shape \[F=37\]"):
        bwd(h, code, theta[:5], 0.1, True, True)
    with pytest.raises(RuntimeError, match="jumprelu_dense_backward: threshold must be float32"):
        bwd(h, code, theta.double(), 0.1, True, True)
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(RuntimeError, match="jumprelu_dense_backward: bandwidth must be a finite number > 0"):
            bwd(h, code, theta, bad, True, True)
    # the Python wrapper
    with pytest.raises(RuntimeError, match="h: the JumpReLU kernel takes float32/bfloat16"):
        jumprelu_masked(h.double(), theta, 0.1)
    with pytest.raises(ValueError, match="h: expected"):
        jumprelu_masked(h.view(-1), theta, 0.1)
    with pytest.raises(ValueError, match="threshold: expected shape"):
        jumprelu_masked(h, theta[:-1], 0.1)
    with pytest.raises(ValueError, match="bandwidth"):
        jumprelu_masked(h, theta, 0.0)
    # a non-contiguous h through the wrapper is copied, not refused
    ht = torch.randn(37, 4).t()
    a, stored = jumprelu_masked(ht, theta, 0.1)
    assert torch.equal(a, _reference(ht.contiguous(), theta, 0.1)[0])


@pytest.mark.parametrize("dtype", DTYPES)
def test_opcheck(dtype, gen):
    """Schemas, fake (meta) impls and the CPU registrations agree (torch.compile-ready)."""
    h, theta = _case(9, 37, dtype, 0.1, gen)
    g = torch.randn(9, 37, generator=gen).to(dtype)
    _, _, code = ops.jumprelu_dense(h, theta, 0.05)
    torch.library.opcheck(ops.jumprelu_dense, (h, theta, 0.05))
    for need_h, need_threshold in ((True, True), (True, False), (False, True), (False, False)):
        torch.library.opcheck(ops.jumprelu_dense_backward, (g, code, theta, 0.1, need_h, need_threshold))
    assert {"jumprelu_dense", "jumprelu_dense_backward"} <= set(_ext.OPS)
