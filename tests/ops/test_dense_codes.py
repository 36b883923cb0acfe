"""Codes held dense (``DenseCodes``, fastclt/codes.py) and the ops that make and read them
(fastclt/ops/dense/encode.py ``encode(..., form="dense")`` and its masked JumpReLU; the dense sparsity
penalty of fastclt/ops/reference/losses.py; docs/DESIGN.md §17):

- DenseCodes is a SparseCodes: its CSR view (built on demand) holds exactly the stored entries, values
  differentiable from the [B, F] tensor; shape, density, L0 and feature statistics agree with CSR codes;
- the dense encode gives the reference encode's codes (active and band entries) and, through any
  upstream gradient, the same gradients to x, W_enc, b_enc, θ and the pre-bias — fp64, fp32, bf16,
  odd sizes, an empty batch;
- the masked JumpReLU's forward and backward against the reference JumpReLU's autograd;
- the dense sparsity penalty (tanh, l1) against the reference on the same codes as CSR, values and
  decoder norms differentiable;
- a model chooses the form from the previous batch's density; never for TopK/BatchTopK, a named
  implementation or a MOLT; its public ``encode`` stays CSR;
- bad arguments are named.
Whole-model agreement of the three paths at densities 0 … 100% is in tests/ops/test_density.py."""
import pytest
import torch

import fastclt
from _util import assert_close
from fastclt import ops
from fastclt.codes import DenseCodes, SparseCodes
from fastclt.ops import density
from fastclt.ops.dense.encode import _JumpReLUMasked, jumprelu_masked
from fastclt.ops.reference.activation import band_mask, jumprelu_dense

TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 2e-2}
DTYPES = [torch.float64, torch.float32, torch.bfloat16]
# the dense form is plain PyTorch: the same tests on a GPU when there is one (never run on one yet)
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU"))]


@pytest.fixture(autouse=True)
def _no_env(monkeypatch):
    monkeypatch.delenv(density.ENV, raising=False)
    monkeypatch.delenv("FASTCLT_IMPL", raising=False)
    density.set_crossover(None)
    yield
    density.set_crossover(None)


def _codes(gen, B=13, F=29, p=0.4, band=True) -> DenseCodes:
    a = torch.rand(B, F, generator=gen, dtype=torch.float64) + 0.1
    active = torch.rand(B, F, generator=gen) < p
    zeros = (torch.rand(B, F, generator=gen) < 0.1) & ~active if band else torch.zeros(B, F, dtype=torch.bool)
    return DenseCodes((a * active).requires_grad_(), active | zeros)


# ---------------------------------------------------------------------------- DenseCodes
def test_dense_codes_is_sparse_codes_with_a_csr_view(gen):
    c = _codes(gen)
    B, F = c.dense.shape
    assert isinstance(c, SparseCodes) and c.is_dense and not SparseCodes.is_dense
    assert (c.batch_size, c.n_features, c.k, c.dtype) == (B, F, None, torch.float64)
    ref = SparseCodes.from_mask(c.dense, c.stored)
    assert torch.equal(c.row_ptr, ref.row_ptr) and torch.equal(c.index, ref.index)
    assert torch.equal(c.value, ref.value) and c.to_sparse() is c.to_sparse()  # built once
    assert c.nnz == int(c.stored.sum()) and c.density() == pytest.approx(c.nnz / (B * F))
    assert torch.equal(c.row_lengths(), ref.row_lengths()) and torch.equal(c.row_ids(), ref.row_ids())
    assert torch.equal(c.flat_index(), ref.flat_index())
    assert c.l0() == ref.l0() and torch.equal(c.active_features(), ref.active_features())
    assert c.to_dense() is c.dense and torch.equal(ref.to_dense(), c.dense)
    # the CSR values are differentiable in the dense tensor
    (c.value * torch.arange(c.nnz, dtype=torch.float64)).sum().backward()
    expect = torch.zeros(B * F, dtype=torch.float64)
    expect[ref.flat_index()] = torch.arange(c.nnz, dtype=torch.float64)
    assert torch.equal(c.dense.grad.flatten(), expect)
    d = c.detach()
    assert isinstance(d, DenseCodes) and not d.dense.requires_grad and d.stored is c.stored
    w = c.with_value(c.dense * 2)
    assert isinstance(w, DenseCodes) and torch.equal(w.dense, c.dense * 2)
    assert "DenseCodes(batch_size=13" in repr(c)
    with pytest.raises(ValueError, match="topk_view"):
        c.topk_view()


def test_dense_codes_nnz_without_a_csr(gen):
    c = _codes(gen)
    n = int(c.stored.sum())
    given = DenseCodes(c.dense, c.stored, nnz=n)
    assert given.nnz == n and given._csr is None  # no CSR built to count
    assert c.nnz == n and c._csr is None


def test_dense_codes_bad_arguments(gen):
    a = torch.rand(4, 5, generator=gen)
    with pytest.raises(TypeError, match="dense: expected a floating"):
        DenseCodes(a.long(), a > 0)
    with pytest.raises(TypeError, match="dense: expected a floating"):
        DenseCodes(a[0], a[0] > 0)
    with pytest.raises(TypeError, match="stored: expected a bool"):
        DenseCodes(a, (a > 0).float())
    with pytest.raises(TypeError, match="stored: expected a bool"):
        DenseCodes(a, (a > 0)[:3])
    c = DenseCodes(a, a > 0)
    with pytest.raises(ValueError, match="n_features: these codes have F=5"):
        c.to_dense(6)
    with pytest.raises(ValueError, match="value: expected the dense shape"):
        c.with_value(a[:2])


# -------------------------------------------------------------------- the masked JumpReLU
@pytest.mark.parametrize("impl", ["dispatch", "pytorch"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,F", [(37, 101), (1, 1), (0, 7)])
def test_masked_jumprelu_against_the_reference(gen, dtype, B, F, impl):
    """Both the dispatching entry (the C++ kernels on the CPU for fp32/bf16 when built: their own
    tests are tests/ops/test_jumprelu_dense_ext.py) and the PyTorch formulation."""
    fn = jumprelu_masked if impl == "dispatch" else _JumpReLUMasked.apply
    eps = 0.05
    theta = (0.3 * torch.rand(F, generator=gen, dtype=torch.float64)).to(dtype)
    # values around θ: many inside the band, some exactly at θ (inactive), the rest far either side
    h = theta.double() + eps * (2 * torch.rand(B, F, generator=gen, dtype=torch.float64) - 1)
    far = torch.rand(B, F, generator=gen) < 0.3
    h = torch.where(far, torch.randn(B, F, generator=gen, dtype=torch.float64), h).to(dtype)
    if B * F:
        h.view(-1)[:: 5] = theta.expand(B, F).reshape(-1)[:: 5]
    g = torch.randn(B, F, generator=gen, dtype=torch.float64).to(dtype)
    h1, t1 = h.clone().requires_grad_(), theta.clone().requires_grad_()
    a, stored = fn(h1, t1, eps)
    (a * g).sum().backward()
    h2, t2 = h.clone().requires_grad_(), theta.clone().requires_grad_()
    a_ref = jumprelu_dense(h2, t2, eps)
    (a_ref * g).sum().backward()
    assert a.dtype == dtype and stored.dtype == torch.bool and not stored.requires_grad
    assert torch.equal(a, a_ref.detach())
    assert torch.equal(stored, band_mask(h, theta, eps))
    assert torch.equal(h1.grad, h2.grad)
    assert t1.grad.dtype == dtype
    assert_close(t1.grad, t2.grad, TOL[dtype], "dθ")
    if B * F > 100:  # the test reaches every case: active, band below θ, band above θ, exactly θ, outside
        inside = (h.double() - theta.double()).abs() < eps / 2
        assert (inside & (h > theta)).any() and (inside & (h <= theta)).any() and (~stored).any()


def test_masked_jumprelu_gradient_only_where_asked(gen):
    h = torch.randn(9, 11, generator=gen, requires_grad=True)
    theta = 0.1 * torch.rand(11, generator=gen)
    a, _ = jumprelu_masked(h, theta, 0.2)
    a.sum().backward()
    assert torch.equal(h.grad, (h > theta).float())
    t = theta.clone().requires_grad_()
    a, _ = jumprelu_masked(h.detach(), t, 0.2)
    a.sum().backward()
    band = (h.detach() - theta).abs() < 0.1
    assert_close(t.grad, -(theta / 0.2) * band.sum(0), 1e-6, "dθ alone")


# -------------------------------------------------------------------------- the dense encode
def _encode_inputs(gen, B, F, d, dtype):
    x = torch.randn(B, d, generator=gen, dtype=torch.float64)
    W = torch.randn(F, d, generator=gen, dtype=torch.float64) / d ** 0.5
    b = 0.3 * torch.randn(F, generator=gen, dtype=torch.float64)
    theta = 0.3 * torch.rand(F, generator=gen, dtype=torch.float64)
    pre = 0.1 * torch.randn(d, generator=gen, dtype=torch.float64)
    return [t.to(dtype) for t in (x, W, b, theta, pre)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", ["jumprelu", "relu"])
@pytest.mark.parametrize("B,F,d", [(37, 101, 13), (5, 3, 1), (0, 9, 4)])
def test_dense_encode_equals_the_reference(gen, dtype, activation, B, F, d, device):
    """form="dense" against the reference encode: the same entries and values, and through an upstream
    gradient on every entry (band entries included) the same gradients to every input."""
    inputs = [t.to(device) for t in _encode_inputs(gen, B, F, d, dtype)]
    up = torch.randn(B, F, generator=gen, dtype=torch.float64).to(device)
    results = []
    for form, impl in (("dense", "auto"), ("sparse", "reference")):
        leaves = [t.clone().requires_grad_() for t in inputs]
        x, W, b, theta, pre = leaves
        codes, h = ops.encode(x, W, b, activation=activation, threshold=theta if activation == "jumprelu" else None,
                              bandwidth=0.4, pre_bias=pre, return_preacts=True, impl=impl, form=form)
        assert isinstance(codes, DenseCodes) == (form == "dense")
        dense = codes.dense if form == "dense" else codes.to_dense(F)
        (dense.double() * up).sum().backward()
        mask = codes.stored if form == "dense" else codes.to_dense(F).ne(0) | (
            torch.zeros(B * F, dtype=torch.bool, device=device).index_fill_(0, codes.flat_index(F), True).view(B, F))
        results.append((dense.detach(), mask, h.detach(), [t.grad for t in leaves]))
    (dd, md, hd, gd), (ds, ms, hs, gs) = results
    assert torch.equal(md, ms), "stored entries"
    assert_close(dd, ds, TOL[dtype], "values")
    assert_close(hd, hs, TOL[dtype], "preacts")
    names = ["dx", "dW_enc", "db_enc", "dθ", "d pre_bias"]
    for name, a, r in zip(names, gd, gs):
        if name == "dθ" and activation == "relu":
            assert a is None and r is None
            continue
        assert a is not None and a.dtype == dtype, name
        assert_close(a, r, TOL[dtype] if dtype != torch.bfloat16 else 5e-2, name)


def test_dense_encode_bad_arguments(gen):
    x, W, b, theta, _ = _encode_inputs(gen, 4, 6, 3, torch.float32)
    with pytest.raises(ValueError, match="form: 'dense' codes are for 'relu' and 'jumprelu'"):
        ops.encode(x, W, b, activation="topk", k=2, form="dense")
    with pytest.raises(ValueError, match="form: expected 'sparse' or 'dense'"):
        ops.encode(x, W, b, activation="relu", form="csr")
    with pytest.raises(ValueError, match="impl: form='dense'"):
        ops.encode(x, W, b, activation="relu", form="dense", impl="reference")
    with pytest.raises(ValueError, match="threshold: expected"):  # the usual checks still run first
        ops.encode(x, W, b, activation="jumprelu", threshold=theta[:2], form="dense")


# ------------------------------------------------------------------- the dense sparsity penalty
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["tanh", "l1"])
def test_dense_penalty_equals_the_reference(gen, dtype, kind, device):
    L, B, F = 3, 17, 23
    codes = [_codes(gen, B, F) for _ in range(L)]
    codes = [DenseCodes(c.dense.detach().to(device), c.stored.to(device)) for c in codes]
    norms = (torch.rand(L, F, generator=gen, dtype=torch.float64) + 0.5).to(device)
    out = []
    for dense in (True, False):
        vals = [c.dense.detach().to(dtype).requires_grad_() for c in codes]
        n = norms.to(torch.float64 if dtype == torch.float64 else torch.float32).requires_grad_()
        cs = [DenseCodes(v, c.stored) if dense else SparseCodes.from_mask(v, c.stored) for v, c in zip(vals, codes)]
        loss = ops.sparsity_loss(cs, n, kind, c=2.5)
        loss.backward()
        out.append((loss.detach(), [v.grad for v in vals], n.grad))
    (ld, gd, nd), (ls, gs, ns) = out
    tol = TOL[dtype] if dtype != torch.bfloat16 else 1e-3  # bf16 values, fp32 sums: the same numbers
    assert_close(ld, ls, tol, "penalty")
    assert_close(nd, ns, tol, "d norms")
    for l in range(L):
        # the reference's gradient lives on the stored entries; the dense one is c·n·(1−p²) at every
        # entry (the encoder's masks drop it where nothing is stored)
        assert_close(gd[l][codes[l].stored], gs[l][codes[l].stored], tol, f"d values {l}")


# ------------------------------------------------------------------------ the model's choice
def _jumprelu_clt(**kw):
    torch.manual_seed(0)
    cfg = dict(n_layers=2, d_in=8, d_out=8, n_features=32, activation="jumprelu", threshold_init=0.0,
               init_fire_rate=None, sparsity_coef=0.1)
    cfg.update(kw)
    return fastclt.CrossLayerTranscoder(fastclt.CLTConfig(**cfg))


@pytest.mark.parametrize("device", DEVICES)
def test_the_model_holds_codes_dense_after_a_dense_batch(gen, device):
    m = _jumprelu_clt().to(device)
    x, y = torch.randn(16, 2, 8, generator=gen).to(device), torch.randn(16, 2, 8, generator=gen).to(device)
    with density.crossover(0.2, "codes"):
        first = m.loss(x, y)  # no history: CSR
        d1 = m._last_density
        assert not first.codes[0].is_dense and d1 == sum(c.nnz for c in first.codes) / (2 * 16 * 32) > 0.2
        second = m.loss(x, y)
        assert all(c.is_dense for c in second.codes)
        assert m._last_density == d1  # the same batch: the same stored entries, counted without a CSR
        assert all(c._csr is None for c in second.codes)
        assert torch.equal(first.fired, second.fired)
        assert_close(second.per_layer["l0"], first.per_layer["l0"], 0, "l0")
        assert_close(second.loss, first.loss, 1e-5, "loss")
        assert all(not c.is_dense for c in (m.encode(x)))  # the public encode stays CSR
        assert m(x).shape == y.shape  # forward takes the dense form too
    with density.crossover("never", "codes"):
        assert not m.loss(x, y).codes[0].is_dense


@pytest.mark.parametrize("case", ["topk", "impl", "molt"])
def test_the_model_keeps_csr_codes_where_dense_ones_do_not_apply(gen, case):
    if case == "topk":
        m = _jumprelu_clt(activation="batchtopk", k=4)
    elif case == "impl":
        m = _jumprelu_clt()
        m.impl = "reference"
    else:
        torch.manual_seed(0)
        m = fastclt.MOLT(fastclt.MOLTConfig(n_layers=2, d_in=8, d_out=8, n_features=6, ranks=[2], rank_counts=[6],
                                            activation="relu", sparsity_coef=0.1, init_fire_rate=None))
    x, y = torch.randn(16, 2, 8, generator=gen), torch.randn(16, 2, 8, generator=gen)
    with density.crossover("always"):
        for _ in range(2):
            out = m.loss(x, y)
            assert not any(c.is_dense for c in out.codes)
