"""The losses (fastclt/ops/reference/losses.py; reference only): MSE and FVU, the sparsity penalty
with the concatenated decoder norm, the pre-activation loss, the AuxK loss — against dense float64;
and the dispatched total variance that normalises them (``ops.total_variance``, and with the squared
error in one pass ``ops.fvu_terms``: the reference and the C++ kernels of csrc/cpu/losses_cpu.cpp)
on every implementation, with NaN-poisoned outputs."""
import pytest
import torch

import fastclt
from _impls import impl_params, takes
from _util import assert_close
from fastclt import ops
from fastclt.codes import SparseCodes


def randn(gen, *shape, dtype=torch.float64):
    return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)


def test_mse_fvu(gen):
    y, y_hat = randn(gen, 10, 3, 4), randn(gen, 10, 3, 4)
    sq = ((y - y_hat) ** 2).sum(-1).sum(0)
    tv = ((y - y.mean(0)) ** 2).sum(-1).sum(0)
    assert_close(ops.mse(y, y_hat), sq / 10, 1e-6)
    assert_close(ops.fvu(y, y_hat), sq / tv, 1e-6)


@pytest.mark.parametrize("kind", ["tanh", "l1"])
def test_sparsity_loss_uses_concatenated_decoder_norm(gen, kind):
    torch.manual_seed(0)
    L, F = 3, 8
    cfg = fastclt.CLTConfig(n_layers=L, d_in=4, d_out=5, n_features=F, activation="relu", dtype="float64")
    model = fastclt.CrossLayerTranscoder(cfg)
    norms = model.decoder_norms()
    for s in range(L):
        manual = torch.sqrt(sum(model.decoder_weight(s)[:, t].double().pow(2).sum(1) for t in range(L - s)))
        assert_close(norms[s], manual, 1e-6, f"norm[{s}]")
    a_list = [torch.relu(randn(gen, 6, F)) for _ in range(L)]
    codes = [SparseCodes.from_dense(a) for a in a_list]
    c = 2.5
    got = ops.sparsity_loss(codes, norms, kind, c)
    pen = (lambda z: torch.tanh(c * z)) if kind == "tanh" else (lambda z: z)
    ref = sum(pen(a_list[s] * norms[s].double()).sum(1).mean() for s in range(L))
    assert_close(got, ref, 1e-6)


def test_preact_loss(gen):
    h = randn(gen, 7, 9).requires_grad_()
    theta = randn(gen, 9).abs().requires_grad_()
    n = randn(gen, 9).abs()
    got = ops.preact_loss(h, theta, n)
    ref = (torch.relu(theta.detach() - h.detach()) * n).sum(1).mean()
    assert_close(got, ref, 1e-12)
    got.backward()
    assert_close(h.grad, -(h.detach() < theta.detach()).double() * n / 7, 1e-6, "dh")


def test_auxk_loss_formula(gen):
    B, d, k_aux = 10, 4, 3
    y = randn(gen, B, d)
    resid = randn(gen, B, d)
    e_hat = randn(gen, B, d)
    got = ops.auxk_loss(e_hat, resid, y, n_dead=2, k_aux=k_aux)
    ref = min(2 / k_aux, 1) * ((e_hat - resid) ** 2).sum() / ((y - y.mean(0)) ** 2).sum()
    assert_close(got, ref, 1e-6)


def test_auxk_loss_takes_the_callers_total_variance():
    """auxk_loss(..., total_var=total_variance(y)) is bit for bit the loss that computes it, in value
    and gradient (the model passes the reconstruction loss's own)."""
    from fastclt.ops.reference.losses import auxk_loss, total_variance
    g = torch.Generator().manual_seed(5)
    y = torch.randn(17, 3, 11, generator=g) * 2 + 1
    res = torch.randn(17, 3, 11, generator=g)
    outs = []
    for tv in (None, total_variance(y)):
        e = torch.randn(17, 3, 11, generator=torch.Generator().manual_seed(6)).requires_grad_(True)
        loss = auxk_loss(e, res, y, 5, 8, total_var=tv)
        loss.backward()
        outs.append((loss.detach(), e.grad))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])


# ------------------------------------------------------------------------- total_variance
def _tv64(y: torch.Tensor) -> torch.Tensor:
    y = y.double()
    return ((y - y.mean(0)) ** 2).sum(-1).sum(0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("shape", [(1024, 4, 256), (2048, 768), (5, 3, 7), (1, 2, 3), (0, 3, 5), (131, 2, 3, 33),
                                   (70, 1, 1)])
@pytest.mark.parametrize("impl,device", impl_params("total_variance", reference=True))
def test_total_variance_every_impl_against_float64(impl, device, shape, dtype, poisoned):
    """Σ_b ‖y − ȳ‖² per middle index against float64, on fresh data far from zero mean (the case a
    one-pass Σy² − Bȳ² would lose: mean 40× the spread), odd sizes (d below and above a vector, a chunk
    of 64 rows plus 3), one token (zero), no tokens (zero), [B, d] (a scalar), several middle dims."""
    takes("total_variance", impl, dtype)
    g = torch.Generator().manual_seed(31)
    y = (torch.randn(shape, generator=g, dtype=torch.float64) * 0.5 + 20.0).to(dtype).to(device)
    tv = ops.total_variance(y, impl=impl)
    want = _tv64(y.cpu()) if shape[0] else torch.zeros(shape[1:-1], dtype=torch.float64)
    assert tv.shape == shape[1:-1] and tv.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert torch.allclose(tv.cpu().double(), want, rtol=tol, atol=tol), (tv, want)


@pytest.mark.parametrize("impl,device", impl_params("total_variance", reference=True))
def test_total_variance_gradient_and_layouts(impl, device, poisoned):
    """A y that needs a gradient gets the reference's gradient 2 (y − ȳ) · g whatever the impl; a
    non-contiguous y (a transposed view) gives the contiguous result; NaN in y gives NaN for its
    layer only; the same input gives the same bits on every call."""
    g = torch.Generator().manual_seed(32)
    y = torch.randn(67, 3, 45, generator=g).to(device)
    w = torch.rand(3).to(device)
    yg = y.clone().requires_grad_()
    (ops.total_variance(yg, impl=impl) * w).sum().backward()
    want = 2 * (y - y.mean(0)) * w[None, :, None]
    assert torch.allclose(yg.grad, want, rtol=1e-5, atol=1e-6)
    yt = y.transpose(0, 1).contiguous().transpose(0, 1)
    assert not yt.is_contiguous() and torch.equal(ops.total_variance(yt, impl=impl), ops.total_variance(y, impl=impl))
    assert torch.equal(ops.total_variance(y, impl=impl), ops.total_variance(y, impl=impl))
    bad = y.clone()
    bad[5, 1, 7] = float("nan")
    tv = ops.total_variance(bad, impl=impl)
    assert bool(tv[1].isnan()) and not bool(tv[[0, 2]].isnan().any())


def test_total_variance_bad_input_and_kernel_opcheck():
    """A non-float or 1-D y is refused naming y; the kernel's own checks and its fake agree with it."""
    with pytest.raises(TypeError, match="y: expected a floating-point tensor"):
        ops.total_variance(torch.ones(4, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"y: expected \[B, \.\.\., d\]"):
        ops.total_variance(torch.ones(4))
    if "cpu" not in ops.implementations("total_variance") or not fastclt._ext.has_cpu_ext():
        pytest.skip("no C++ extension here")
    op = torch.ops.fastclt.total_variance
    with pytest.raises(RuntimeError, match="y must be float32"):
        op(torch.ones(2, 3, 4, dtype=torch.float64))
    with pytest.raises(RuntimeError, match=r"y must be \[B, M, d\]"):
        op(torch.ones(2, 3))
    with pytest.raises(RuntimeError, match="y must be contiguous"):
        op(torch.ones(3, 2, 4).transpose(0, 2))
    torch.library.opcheck(op, (torch.randn(9, 2, 5),))


# ------------------------------------------------------------------------------ fvu_terms
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("shape", [(1024, 4, 256), (2048, 768), (5, 3, 7), (1, 2, 3), (0, 3, 5), (131, 2, 3, 33),
                                   (70, 1, 1), (200, 2, 17)])
@pytest.mark.parametrize("impl,device", impl_params("fvu_terms", reference=True))
def test_fvu_terms_every_impl_against_float64(impl, device, shape, dtype, poisoned):
    """(Σ_b ‖y − ŷ‖², Σ_b ‖y − ȳ‖²) per middle index against float64 on fresh data far from zero
    mean (mean 40× the spread, and chunks of rows whose means differ: the kernel's per-chunk variances
    must combine), odd sizes, one token, no tokens, [B, d] (scalars), several middle dims; ŷ in
    bf16 with fp32 y too (read as fp32)."""
    takes("fvu_terms", impl, dtype)
    g = torch.Generator().manual_seed(33)
    y = torch.randn(shape, generator=g, dtype=torch.float64) * 0.5 + 20.0
    if shape[0] > 64:
        y[64:] += 3.0  # the second chunk of rows elsewhere
    y_hat = y + torch.randn(shape, generator=g, dtype=torch.float64) * 0.3
    y, y_hat = y.to(dtype).to(device), y_hat.to(dtype).to(device)
    for yh in (y_hat, y_hat.bfloat16()) if dtype == torch.float32 else (y_hat,):
        sq, tv = ops.fvu_terms(y, yh, impl=impl)
        out = torch.float64 if dtype == torch.float64 else torch.float32
        assert sq.shape == tv.shape == shape[1:-1] and sq.dtype == tv.dtype == out
        y64, h64 = y.cpu().double(), yh.cpu().double()
        want_sq = ((y64 - h64) ** 2).sum(-1).sum(0)
        want_tv = _tv64(y64) if shape[0] else torch.zeros(shape[1:-1], dtype=torch.float64)
        tol = 1e-12 if dtype == torch.float64 else 1e-5
        assert torch.allclose(sq.cpu().double(), want_sq, rtol=tol, atol=tol), (sq, want_sq)
        assert torch.allclose(tv.cpu().double(), want_tv, rtol=tol, atol=tol), (tv, want_tv)


@pytest.mark.parametrize("impl,device", impl_params("fvu_terms", reference=True))
def test_fvu_terms_gradients_and_layouts(impl, device, poisoned):
    """The squared error's gradient to ŷ is 2 (ŷ − y) · g; a y that needs a gradient gets the
    reference's gradients of both terms whatever the impl; non-contiguous inputs give the contiguous
    results; NaN in y or ŷ gives NaN for its layer only; the same input gives the same bits."""
    g = torch.Generator().manual_seed(34)
    y = torch.randn(67, 3, 45, generator=g).to(device)
    y_hat = (y + torch.randn(67, 3, 45, generator=g) * 0.2).to(device)
    w_sq, w_tv = torch.rand(3).to(device), torch.rand(3).to(device)
    hg = y_hat.clone().requires_grad_()
    sq, tv = ops.fvu_terms(y, hg, impl=impl)
    (sq * w_sq).sum().backward()
    assert torch.allclose(hg.grad, 2 * (y_hat - y) * w_sq[:, None], rtol=1e-5, atol=1e-6)
    yg, hg = y.clone().requires_grad_(), y_hat.clone().requires_grad_()
    sq, tv = ops.fvu_terms(yg, hg, impl=impl)
    ((sq * w_sq).sum() + (tv * w_tv).sum()).backward()
    want_dy = 2 * (y - y_hat) * w_sq[:, None] + 2 * (y - y.mean(0)) * w_tv[:, None]
    assert torch.allclose(yg.grad, want_dy, rtol=1e-5, atol=1e-5)
    assert torch.allclose(hg.grad, 2 * (y_hat - y) * w_sq[:, None], rtol=1e-5, atol=1e-6)
    yt = y.transpose(0, 1).contiguous().transpose(0, 1)
    ht = y_hat.transpose(0, 1).contiguous().transpose(0, 1)
    got, want = ops.fvu_terms(yt, ht, impl=impl), ops.fvu_terms(y, y_hat, impl=impl)
    assert not yt.is_contiguous() and all(torch.equal(a, b) for a, b in zip(got, want))
    assert all(torch.equal(a, b) for a, b in zip(want, ops.fvu_terms(y, y_hat, impl=impl)))
    for bad_y in (True, False):
        y2, h2 = y.clone(), y_hat.clone()
        (y2 if bad_y else h2)[5, 1, 7] = float("nan")
        sq, tv = ops.fvu_terms(y2, h2, impl=impl)
        assert bool(sq[1].isnan()) and not bool(sq[[0, 2]].isnan().any())
        assert bool(tv[1].isnan()) == bad_y and not bool(tv[[0, 2]].isnan().any())


def test_fvu_terms_bad_input_and_kernel_opcheck():
    """Bad arguments are refused naming them; the kernel's own checks and its fake agree."""
    with pytest.raises(TypeError, match="y: expected a floating-point tensor"):
        ops.fvu_terms(torch.ones(4, 3, dtype=torch.int64), torch.ones(4, 3))
    with pytest.raises(TypeError, match="y_hat: expected a floating-point tensor"):
        ops.fvu_terms(torch.ones(4, 3), torch.ones(4, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"y_hat: expected y's shape \(4, 3\)"):
        ops.fvu_terms(torch.ones(4, 3), torch.ones(4, 2))
    if "cpu" not in ops.implementations("fvu_terms") or not fastclt._ext.has_cpu_ext():
        pytest.skip("no C++ extension here")
    op = torch.ops.fastclt.fvu_terms
    with pytest.raises(RuntimeError, match="y_hat must be float32"):
        op(torch.ones(2, 3, 4), torch.ones(2, 3, 4, dtype=torch.float64))
    with pytest.raises(RuntimeError, match=r"y must be \[B, M, d\]"):
        op(torch.ones(2, 3), torch.ones(2, 3))
    with pytest.raises(RuntimeError, match="y_hat must have y's shape"):
        op(torch.ones(2, 3, 4), torch.ones(2, 3, 5))
    with pytest.raises(RuntimeError, match="y must be contiguous"):
        op(torch.ones(3, 2, 4).transpose(0, 2), torch.ones(4, 2, 3))
    torch.library.opcheck(op, (torch.randn(9, 2, 5), torch.randn(9, 2, 5)))
