"""auxk_select (fastclt/ops/{reference,triton,ext}/auxk.py): the reference against dense float64
math and through the models' loss (AuxK never trains b_dec, reaches only dead encoder rows); every
kernel implementation against the reference — codes, every gradient, fp32 and bf16, fewer dead
features than k_aux, none or all dead, an empty batch, NaN-poisoned outputs, determinism, bad input.
The Triton AuxK's own behaviour (no state across calls, the sampled threshold's fallback):
tests/ops/triton/test_triton_auxk.py."""
import functools

import pytest
import torch

import fastclt
from _encode_cases import leaves, make_inputs, pattern
from _impls import GPU, impl_params
from _util import assert_close
from fastclt import ops
from fastclt.ops.reference.auxk import auxk_select as ref_auxk

KERNELS = impl_params("auxk_select")
SIZES = [(13, 19, 37)] + ([(4096, 768, 16384)] if GPU else [])


def randn(gen, *shape):
    return torch.randn(*shape, generator=gen, dtype=torch.float64)


# ------------------------------------------------------------------------- the reference
def test_reference_auxk_select_only_dead_and_exact(gen):
    B, d, F, k_aux = 8, 6, 20, 3
    x, W, b = randn(gen, B, d), randn(gen, F, d), randn(gen, F)
    dead = torch.zeros(F, dtype=torch.bool)
    dead[[1, 4, 5, 9, 17]] = True
    codes = ops.auxk_select(x, W, b, dead, k_aux)
    assert codes.k == k_aux and set(codes.index.tolist()) <= {1, 4, 5, 9, 17}
    h = x @ W.T + b
    h_dead = h.masked_fill(~dead, float("-inf"))
    top = h_dead.topk(k_aux, dim=1)
    ref = torch.zeros(B, F, dtype=torch.float64).scatter(1, top.indices, torch.relu(top.values))
    assert_close(codes.to_dense(F), ref, 1e-12)
    none = ops.auxk_select(x, W, b, torch.zeros(F, dtype=torch.bool), k_aux)
    assert none.nnz == 0 and none.batch_size == B


def test_auxk_never_trains_b_dec_and_reaches_the_encoder(gen):
    torch.manual_seed(1)
    for model, x, y, dead in [
        (fastclt.SparseAutoencoder(fastclt.SAEConfig(d_in=6, n_features=24, activation="topk", k=2)),
         torch.randn(16, 6), None, torch.rand(24) > 0.5),
        (fastclt.CrossLayerTranscoder(fastclt.CLTConfig(n_layers=3, d_in=6, d_out=5, n_features=24,
                                                        activation="batchtopk", k=2, skip_connection=True)),
         torch.randn(16, 3, 6), torch.randn(16, 3, 5), torch.rand(3, 24) > 0.5),
    ]:
        out = model.loss(x, y, dead_mask=dead)
        model.zero_grad()
        out.parts["auxk"].backward()
        assert float(out.parts["auxk"].detach()) > 0
        assert model.b_dec.grad is None or model.b_dec.grad.abs().max() == 0
        g_enc = model.W_enc.grad.reshape(-1, model.W_enc.shape[-1]).abs().sum(-1).reshape(dead.shape)
        assert (g_enc[dead] > 0).any(), "AuxK must reach the dead encoder rows"
        assert (g_enc[~dead] == 0).all(), "AuxK must touch only dead encoder rows"
        if hasattr(model, "W_skip"):
            assert model.W_skip.grad is None or model.W_skip.grad.abs().max() == 0


# ----------------------------------------------------------------- kernels vs the reference
def make_dead(F, n_dead, seed, device):
    dead = torch.zeros(F, dtype=torch.bool)
    dead[torch.randperm(F, generator=torch.Generator().manual_seed(seed))[:n_dead]] = True
    return dead.to(device)


def run(fn, inputs, dead, k_aux, upstream, pre_bias=True, dtype=None):
    t = {n: v.detach().clone().to(dtype or v.dtype).requires_grad_(True) for n, v in inputs.items()
         if v is not None and n != "threshold"}
    F = t["W_enc"].shape[0]
    codes = fn(t["x"], t["W_enc"], t["b_enc"], dead, k_aux, t["pre_bias"] if pre_bias else None)
    dense = codes.to_dense(F)
    (dense.double() * upstream).sum().backward()
    grads = {n: v.grad for n, v in t.items() if pre_bias or n != "pre_bias"}
    return codes, dense.detach(), grads


def rel_rmse(a, b):
    a, b = a.double(), b.double()
    return float((a - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt().clamp_min(1e-30))


def compare(impl, inputs, dead, k_aux, pre_bias=True, exact_sizes=True):
    """The kernel's codes and gradients equal the reference's (the same kept set; on a GPU at real
    sizes a few near-ties may swap, the GEMMs summing in another order)."""
    B, F = inputs["x"].shape[0], inputs["W_enc"].shape[0]
    up = torch.randn(B, F, dtype=torch.float64, generator=torch.Generator().manual_seed(B + F)).to(dead.device)
    tc, td, tg = run(functools.partial(ops.auxk_select, impl=impl), inputs, dead, k_aux, up, pre_bias)
    tg = {n: g.clone() for n, g in tg.items()}
    rc, rd, rg = run(ref_auxk, inputs, dead, k_aux, up, pre_bias)
    assert tc.k == rc.k and tc.nnz == rc.nnz and tc.n_features == F
    assert not torch.isnan(tc.value).any()
    assert bool(dead[tc.index.long()].all()), "AuxK codes may only hold dead features"
    key = tc.row_ids() * F + tc.index.long()
    assert bool((key[1:] > key[:-1]).all())
    flips = int((pattern(tc, F) != pattern(rc, F)).sum())
    assert flips <= (0 if exact_sizes else B * F // 10**5), f"{flips} entries differ from the reference's kept set"
    tol = 1e-4 if flips == 0 else 1e-2
    assert rel_rmse(td, rd) < tol / 10
    for n in rg:
        assert rel_rmse(tg[n], rg[n]) < tol, n
    alive = ~dead
    assert not tg["W_enc"][alive].any() and not tg["b_enc"][alive].any(), "live rows got an AuxK gradient"
    return tc


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("pre_bias", [False, True])
@pytest.mark.parametrize("k_aux", [1, 4])
@pytest.mark.parametrize("impl,device", KERNELS)
def test_auxk_fp32_matches_reference(impl, device, k_aux, pre_bias, size, poisoned):
    B, d, F = size
    inputs = make_inputs(B, d, F, torch.float32, seed=28, pre_bias=True, device=device)
    compare(impl, inputs, make_dead(F, F // 3, 0, device), k_aux, pre_bias, exact_sizes=size == SIZES[0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("impl,device", KERNELS)
def test_auxk_select_matches_reference(impl, device, dtype, poisoned):
    """25 of 37 features dead, k_aux = 5: the reference's kept set, codes and gradients."""
    B, d, F, k_aux = 13, 19, 37, 5
    inputs = make_inputs(B, d, F, dtype, seed=28, pre_bias=True, device=device)
    dead = torch.arange(F, device=device) % 3 != 1  # 25 dead features
    up = torch.randn(B, F, dtype=torch.float64, generator=torch.Generator().manual_seed(7)).to(device)
    out = []
    for fn in (functools.partial(ops.auxk_select, impl=impl), ref_auxk):
        t = leaves(inputs)
        codes = fn(t["x"], t["W_enc"], t["b_enc"], dead, k_aux, t["pre_bias"])
        (codes.to_dense(F).double() * up).sum().backward()
        out.append((codes, {n: t[n].grad for n in ("x", "W_enc", "b_enc", "pre_bias")}))
    (tc, tg), (rc, rg) = out
    assert tc.k == k_aux and tc.nnz == B * k_aux
    assert bool(dead[tc.index.long()].all()), "AuxK picked a live feature"
    assert torch.equal(pattern(tc, F), pattern(rc, F))
    # the extension's GEMM is eager's (bit-identical h); the Triton GEMM rounds its fp32 sums to bf16
    # once, eager bf16 may differ by an ulp (bounded against fp64 in test_bf16_error_vs_fp64)
    assert_close(tc.to_dense(F), rc.to_dense(F), 1e-6 if dtype == torch.float32 or impl != "triton" else 1e-2, "codes")
    assert not tg["W_enc"][~dead].any() and not tg["b_enc"][~dead].any(), "live rows got an AuxK gradient"
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for n in rg:
        assert_close(tg[n], rg[n], tol, f"d{n}")


@pytest.mark.parametrize("n_dead", [0, 3, 25, 37])
@pytest.mark.parametrize("impl,device", impl_params("auxk_select", reference=True))
def test_known_dead_count_gives_the_same_codes_and_gradients(impl, device, n_dead, poisoned):
    """n_dead given (the caller's count: the dead features listed without a device read) gives the codes
    and gradients of the call that counts them itself, bit for bit; none, some and all dead."""
    B, d, F, k_aux = 13, 19, 37, 5
    inputs = make_inputs(B, d, F, torch.float32, seed=31, pre_bias=True, device=device)
    dead = make_dead(F, n_dead, 3, device)
    up = torch.randn(B, F, dtype=torch.float64, generator=torch.Generator().manual_seed(8)).to(device)
    out = []
    for count in (None, n_dead):
        t = leaves(inputs)
        codes = ops.auxk_select(t["x"], t["W_enc"], t["b_enc"], dead, k_aux, t["pre_bias"], n_dead=count, impl=impl)
        if codes.nnz:
            (codes.to_dense(F).double() * up).sum().backward()
        out.append((codes, {n: t[n].grad for n in ("x", "W_enc", "b_enc", "pre_bias")}))
    (a, ga), (b, gb) = out
    assert a.k == b.k and torch.equal(a.row_ptr, b.row_ptr) and torch.equal(a.index, b.index)
    assert torch.equal(a.value.detach(), b.value.detach())
    for n in ga:
        assert (ga[n] is None) == (gb[n] is None) and (ga[n] is None or torch.equal(ga[n], gb[n])), n


@pytest.mark.parametrize("impl,device", KERNELS)
def test_fewer_dead_than_k_aux(impl, device):
    inputs = make_inputs(13, 19, 37, torch.float32, seed=1, pre_bias=True, device=device)
    codes = compare(impl, inputs, make_dead(37, 3, 1, device), 8)
    assert codes.k == 3
    few = torch.zeros(37, dtype=torch.bool, device=device)
    few[[3, 30]] = True
    codes = ops.auxk_select(inputs["x"], inputs["W_enc"], inputs["b_enc"], few, 4, impl=impl)
    assert codes.k == 2 and set(codes.index.tolist()) <= {3, 30}


@pytest.mark.parametrize("impl,device", KERNELS)
def test_all_dead_and_none_dead(impl, device):
    inputs = make_inputs(13, 19, 37, torch.float32, seed=2, pre_bias=True, device=device)
    compare(impl, inputs, make_dead(37, 37, 2, device), 5)
    none = ops.auxk_select(inputs["x"], inputs["W_enc"], inputs["b_enc"], make_dead(37, 0, 2, device), 5, impl=impl)
    assert none.nnz == 0 and none.batch_size == 13


@pytest.mark.parametrize("impl,device", KERNELS)
def test_empty_batch(impl, device):
    inputs = make_inputs(0, 19, 37, torch.float32, device=device)
    codes = ops.auxk_select(inputs["x"], inputs["W_enc"], inputs["b_enc"], make_dead(37, 12, 0, device), 4, impl=impl)
    assert codes.batch_size == 0 and codes.nnz == 0


@pytest.mark.parametrize("impl,device", KERNELS)
def test_bf16_error_vs_fp64(impl, device):
    inputs = make_inputs(13, 19, 37, torch.bfloat16, seed=7, pre_bias=True, device=device)
    dead = make_dead(37, 12, 7, device)
    B, F = 13, 37
    up = torch.randn(B, F, dtype=torch.float64, generator=torch.Generator().manual_seed(8)).to(device)
    tc, td, tg = run(functools.partial(ops.auxk_select, impl=impl), inputs, dead, 4, up)
    ec, ed, eg = run(ref_auxk, inputs, dead, 4, up)
    rc, rd, rg = run(ref_auxk, inputs, dead, 4, up, dtype=torch.float64)
    assert tc.value.dtype == torch.bfloat16 and tc.nnz == rc.nnz
    floor = 0.03  # ties at the bf16 cut can swap an entry
    assert rel_rmse(td, rd) <= 2 * rel_rmse(ed, rd) + floor
    for n in rg:
        assert rel_rmse(tg[n], rg[n]) <= 2 * rel_rmse(eg[n], rg[n]) + floor, n


@pytest.mark.parametrize("impl,device", KERNELS)
def test_deterministic(impl, device):
    inputs = make_inputs(13, 19, 37, torch.float32, seed=9, pre_bias=True, device=device)
    dead = make_dead(37, 12, 9, device)
    up = torch.randn(13, 37, dtype=torch.float64, generator=torch.Generator().manual_seed(9)).to(device)
    fn = functools.partial(ops.auxk_select, impl=impl)
    c1, _, g1 = run(fn, inputs, dead, 4, up)
    c2, _, g2 = run(fn, inputs, dead, 4, up)
    assert torch.equal(c1.index, c2.index) and torch.equal(c1.value, c2.value)
    for n in g1:
        assert torch.equal(g1[n], g2[n]), n


@pytest.mark.parametrize("impl,device", impl_params("auxk_select", reference=True))
def test_bad_input(impl, device):
    """Checked once by the entry point, the same for every implementation."""
    inputs = make_inputs(13, 19, 37, torch.float32, device=device)
    x, W, b = inputs["x"], inputs["W_enc"], inputs["b_enc"]
    dead = make_dead(37, 12, 0, device)
    sel = functools.partial(ops.auxk_select, impl=impl)
    with pytest.raises(ValueError, match="dead_mask:"):
        sel(x, W, b, dead.int(), 4)
    with pytest.raises(ValueError, match="dead_mask:"):
        sel(x, W, b, dead[:-1], 4)
    with pytest.raises(ValueError, match="k_aux:"):
        sel(x, W, b, dead, 0)
    with pytest.raises(TypeError, match="k_aux:"):
        sel(x, W, b, dead, 2.0)
    with pytest.raises(TypeError, match="W_enc: expected x's dtype"):
        sel(x.double(), W, b, dead, 4)
    with pytest.raises(ValueError, match="W_enc:"):
        sel(x, W[:, :-1], b, dead, 4)
    with pytest.raises(ValueError, match="pre_bias:"):
        sel(x, W, b, dead, 4, torch.zeros(3, device=device))
    with pytest.raises(ValueError, match="dead_mask:"):
        sel(x, W, b, torch.ones(36, dtype=torch.bool, device=device), 2)
    for bad in (-1, 38, 2.0, True):
        with pytest.raises(ValueError, match="n_dead:"):
            sel(x, W, b, dead, 4, n_dead=bad)
