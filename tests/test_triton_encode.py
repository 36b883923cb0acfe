"""Fused Triton encode (fastclt/ops/triton/encode.py) against the reference encode: codes, every
gradient, fp32 and bf16, odd sizes, the speculative-threshold fallbacks, NaN-poisoned outputs,
determinism and bad input. Runs under TRITON_INTERPRET=1 without a GPU (tiny sizes)."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import fastclt.ops.triton.encode as tenc  # noqa: E402
from fastclt.ops.activation import jumprelu_dense  # noqa: E402
from fastclt.ops.encode import encode as ref_encode  # noqa: E402
from fastclt.ops.encode import preacts  # noqa: E402
from fastclt.ops.select import batch_topk_layers  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ON_GPU = DEVICE == "cuda"
ODD = (13, 19, 37)  # B, d_in, F
SIZES = [ODD] + ([(4096, 768, 16384)] if ON_GPU else [])
ACTS = ["relu", "jumprelu", "topk", "batchtopk"]
BW = 0.5  # a wide JumpReLU band, so that the tiny tests hold band entries


@pytest.fixture(autouse=True)
def _fresh_caches():
    tenc.clear_caches()
    yield
    tenc.clear_caches()


def make_inputs(B, d, F, dtype, seed=0, pre_bias=False, scale=1.0, shift=0.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, d, generator=g) * scale + shift
    W = torch.randn(F, d, generator=g) / d ** 0.5
    b = torch.randn(F, generator=g) * 0.1
    thr = torch.rand(F, generator=g) * 0.8 + 0.1
    p = torch.randn(d, generator=g) * 0.5 if pre_bias else None
    out = dict(x=x, W_enc=W, b_enc=b, threshold=thr, pre_bias=p)
    return {n: (None if t is None else t.to(DEVICE, dtype)) for n, t in out.items()}


def leaves(inputs, dtype=None, keep=()):
    """Fresh leaf copies of the inputs; the names in ``keep`` are used as they are (persistent
    leaves, grads reset: the speculative τ is cached by W_enc's address, as for a parameter)."""
    out = {}
    for n, t in inputs.items():
        if n in keep:
            t.grad = None
        elif t is not None:
            t = t.detach().clone()
            t = t.to(dtype) if dtype is not None else t
            t.requires_grad_(True)
        out[n] = t
    return out


def kwargs_for(act, k, inputs):
    kw = dict(activation=act, pre_bias=inputs["pre_bias"])
    if act == "jumprelu":
        kw.update(threshold=inputs["threshold"], bandwidth=BW)
    if act in ("topk", "batchtopk"):
        kw.update(k=k)
    return kw


def run(fn, act, k, inputs, upstream):
    F = inputs["W_enc"].shape[0]
    codes = fn(inputs["x"], inputs["W_enc"], inputs["b_enc"], **kwargs_for(act, k, inputs))
    dense = codes.to_dense(F)
    (dense.double() * upstream).sum().backward()
    grads = {n: t.grad for n, t in inputs.items() if t is not None and (n != "threshold" or act == "jumprelu")}
    return codes, dense.detach(), grads


def pattern(codes, F):
    """bool [B, F]: stored entries (band entries included)."""
    m = torch.zeros(codes.batch_size, F, dtype=torch.bool, device=codes.device)
    m[codes.row_ids(), codes.index.long()] = True
    return m


def check_csr(codes, F):
    assert codes.row_ptr[0] == 0 and codes.row_ptr[-1] == codes.nnz
    assert bool((codes.row_ptr[1:] >= codes.row_ptr[:-1]).all())
    key = codes.row_ids() * F + codes.index.long()
    assert bool((key[1:] > key[:-1]).all()), "entries must be sorted by (row, feature), without duplicates"
    assert not torch.isnan(codes.value).any()


def rel_rmse(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt().clamp_min(1e-30))


def assert_close(name, got, want, tol):
    err = rel_rmse(got, want)
    if err > tol:
        diff = (got.double() - want.double()).abs()
        worst = diff.flatten().topk(min(5, diff.numel())).indices
        raise AssertionError(f"{name}: relative RMSE {err:.3g} > {tol:.3g}; worst flat indices {worst.tolist()} "
                             f"got {got.flatten()[worst].tolist()} want {want.flatten()[worst].tolist()}")


def compare_fp32(act, k, inputs, upstream, allowed_flips=0, keep=()):
    """fp32: the reference's kept set exactly, its values and every gradient. With ``allowed_flips``
    (real sizes on a GPU, where the GEMMs sum in different orders), a few entries within rounding of
    a cut may differ; the kernel is then checked against the fp64 reference on its own kept set."""
    F = inputs["W_enc"].shape[0]
    tc, td, tg = run(tenc.encode, act, k, leaves(inputs, keep=keep), upstream)
    tg = {n: g.clone() for n, g in tg.items()}
    rc, rd, rg = run(ref_encode, act, k, leaves(inputs), upstream)
    check_csr(tc, F)
    assert tc.value.dtype == rc.value.dtype
    if act == "topk":
        assert tc.k == k
    assert set(tg) == set(rg)
    for n in rg:
        assert tg[n] is not None, f"{n}: no gradient"
        assert tg[n].dtype == rg[n].dtype and tg[n].shape == rg[n].shape
    t_set = pattern(tc, F)
    flips = int((t_set != pattern(rc, F)).sum())
    assert flips <= allowed_flips, f"{act}: {flips} entries differ from the reference's kept set"
    if flips > 0:
        rd, rg, h64 = oracle_on_set(act, inputs, t_set, upstream)
        check_kept_set(act, k, t_set, h64, inputs["threshold"].double(), 1e-5 * float(h64.abs().max()))
    assert tc.nnz == int(t_set.sum())
    assert_close(f"{act} codes", td, rd, 1e-5)
    for n in rg:
        assert_close(f"{act} d{n}", tg[n], rg[n], 1e-4)
    return tc


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("pre_bias", [False, True])
@pytest.mark.parametrize("act", ACTS)
def test_encode_fp32_matches_reference(act, pre_bias, size):
    B, d, F = size
    inputs = make_inputs(B, d, F, torch.float32, pre_bias=pre_bias)
    upstream = torch.randn(B, F, dtype=torch.float64, device=DEVICE)
    compare_fp32(act, 4, inputs, upstream, allowed_flips=0 if not ON_GPU else B * F // 10**5)


def oracle_on_set(act, inputs, mask, upstream):
    """The reference's values and gradients in fp64 on a given kept set ``mask: [B, F]`` (the set
    itself is checked by ``check_kept_set``): separates rounding error from ties at the cut."""
    t = leaves(inputs, torch.float64)
    h = preacts(t["x"], t["W_enc"], t["b_enc"], t["pre_bias"])
    rows, cols = mask.nonzero(as_tuple=True)
    hv = h[rows, cols]
    if act == "jumprelu":
        v = jumprelu_dense(hv, t["threshold"][cols], BW)
    else:
        v = torch.relu(hv)
    dense = torch.zeros_like(h).index_put((rows, cols), v)
    (dense * upstream).sum().backward()
    grads = {n: g.grad for n, g in t.items() if g is not None and (n != "threshold" or act == "jumprelu")}
    return dense.detach(), grads, h.detach()


def check_kept_set(act, k, mask, h, threshold, tol):
    """mask is a valid kept set of ``act`` for the exact pre-activations h (fp64), up to ``tol``."""
    B, F = h.shape
    if act == "relu":
        assert bool((h[mask] > -tol).all()) and bool((h[~mask] <= tol).all())
    elif act == "jumprelu":
        lo = (threshold - BW / 2).expand_as(h)
        assert bool((h[mask] > lo[mask] - tol).all()) and bool((h[~mask] <= lo[~mask] + tol).all())
    elif act == "topk":
        assert bool((mask.sum(1) == k).all())
        kept_min = h.masked_fill(~mask, float("inf")).min(1).values
        rest_max = h.masked_fill(mask, float("-inf")).max(1).values
        assert bool((kept_min >= rest_max - tol).all())
    else:
        assert int(mask.sum()) == k * B
        if k * B < B * F:
            assert float(h[mask].min()) >= float(h[~mask].max()) - tol


@pytest.mark.parametrize("act", ACTS)
def test_encode_even_k(act):
    """d_in a multiple of BLOCK_K: the unmasked main loop (EVEN_K)."""
    B, d, F = 13, 32, 37
    inputs = make_inputs(B, d, F, torch.float32, seed=18, pre_bias=True)
    compare_fp32(act, 4, inputs, torch.randn(B, F, dtype=torch.float64, device=DEVICE))


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("act", ACTS)
def test_encode_bf16_error_vs_fp64(act, size):
    """bf16: the kept set is right up to bf16 rounding, and the kernel's error against fp64 on its
    own kept set is ≤ 2× eager bf16's error on eager's kept set + a floor (codes and grads)."""
    B, d, F = size
    k = 4
    inputs = make_inputs(B, d, F, torch.bfloat16, seed=1, pre_bias=True)
    upstream = torch.randn(B, F, dtype=torch.float64, device=DEVICE)
    tc, td, tg = run(tenc.encode, act, k, leaves(inputs), upstream)
    ec, ed, eg = run(ref_encode, act, k, leaves(inputs), upstream)
    check_csr(tc, F)
    assert tc.value.dtype == torch.bfloat16
    t_set, e_set = pattern(tc, F), pattern(ec, F)
    rd_t, rg_t, h64 = oracle_on_set(act, inputs, t_set, upstream)
    rd_e, rg_e, _ = oracle_on_set(act, inputs, e_set, upstream)
    tol = 2.0 ** -6 * float(h64.abs().max())
    check_kept_set(act, k, t_set, h64, inputs["threshold"].double(), tol)
    floor = 0.01
    assert rel_rmse(td, rd_t) <= 2 * rel_rmse(ed, rd_e) + floor
    for n in rg_t:
        assert tg[n].dtype == torch.bfloat16
        assert rel_rmse(tg[n], rg_t[n]) <= 2 * rel_rmse(eg[n], rg_e[n]) + floor, n


@pytest.mark.parametrize("act", ["topk", "batchtopk"])
@pytest.mark.parametrize("k", [1, ODD[2]])
def test_k_extremes(act, k):
    B, d, F = ODD
    inputs = make_inputs(B, d, F, torch.float32, seed=2)
    compare_fp32(act, k, inputs, torch.randn(B, F, dtype=torch.float64, device=DEVICE))


@pytest.mark.parametrize("act", ["relu", "jumprelu"])
def test_empty_row_and_always_active_feature(act):
    B, d, F = ODD
    inputs = make_inputs(B, d, F, torch.float32, seed=3)
    inputs["b_enc"] = -torch.rand(F, device=DEVICE) - 2.0  # row 0 (x = 0) has h = b < θ − ε/2
    inputs["x"][0] = 0
    inputs["W_enc"][5] = 0
    inputs["b_enc"][5] = 3.0  # feature 5: h = 3 > θ in every row
    codes = compare_fp32(act, None, inputs, torch.randn(B, F, dtype=torch.float64, device=DEVICE))
    assert codes.row_lengths()[0] == 1  # only the always-active feature
    assert bool(pattern(codes, F)[:, 5].all())


@pytest.mark.parametrize("act", ["topk", "batchtopk"])
def test_speculative_threshold_fallbacks(act):
    """Calls on very different data, so that the cached τ is too low, then too high: every call must
    still equal the reference, and the fallback paths must have run."""
    B, d, F = ODD
    tenc.STATS.clear()
    upstream = torch.randn(B, F, dtype=torch.float64, device=DEVICE)
    W_inputs = make_inputs(B, d, F, torch.float32, seed=4)
    W_inputs["W_enc"].requires_grad_(True)
    for scale, shift, seed in [(1.0, 0.0, 4), (0.05, 0.0, 6), (20.0, 0.0, 7), (1.0, -3.0, 8)]:
        inputs = dict(W_inputs)
        inputs["x"] = make_inputs(B, d, F, torch.float32, seed=seed, scale=scale, shift=shift)["x"]
        compare_fp32(act, 3, inputs, upstream, keep=("W_enc",))
    assert tenc.STATS["overflow_rerun"] > 0  # τ too low: more candidates than the buffer held
    if act == "topk":
        assert tenc.STATS["topk_dense_rows"] > 0  # τ too high: rows with < k candidates
    else:
        assert tenc.STATS["batchtopk_retry"] > 0


def test_batchtopk_dense_fallback(monkeypatch):
    """Every speculative τ (cached and sampled) too high: the last resort is the exact dense path."""
    B, d, F = ODD
    inputs = make_inputs(B, d, F, torch.float32, seed=17, pre_bias=True)
    monkeypatch.setattr(tenc, "_kth_largest", lambda v, m: 1e30)
    tenc.STATS.clear()
    compare_fp32("batchtopk", 3, inputs, torch.randn(B, F, dtype=torch.float64, device=DEVICE))
    assert tenc.STATS["batchtopk_dense"] == 1


@pytest.mark.parametrize("act", ["topk", "batchtopk"])
@pytest.mark.parametrize("tau", [-1e30, 1e30])
def test_forced_speculative_threshold(act, tau):
    """A cached τ far below (every entry a candidate: above the candidate limit) or far above (no
    candidate) the cut: the exact fallbacks give the reference's codes."""
    B, d, F = ODD
    inputs = make_inputs(B, d, F, torch.float32, seed=16)
    inputs["W_enc"].requires_grad_(True)
    upstream = torch.randn(B, F, dtype=torch.float64, device=DEVICE)
    compare_fp32(act, 1, inputs, upstream, keep=("W_enc",))
    assert len(tenc._TAU) == 1
    for key in list(tenc._TAU):
        tenc._TAU[key] = tau
    tenc.STATS.clear()
    compare_fp32(act, 1, inputs, upstream, keep=("W_enc",))
    if act == "topk":
        assert tenc.STATS["topk_tau_too_low"] == (tau < 0)  # then a retry with a sampled τ
        if tau > 0:
            assert tenc.STATS["topk_dense_rows"] == B
    else:
        assert tenc.STATS["batchtopk_retry"] == 1


def test_capacity_overflow_reruns():
    """A capacity estimate far too small (after a sparse call) must rerun, never truncate."""
    B, d, F = ODD
    inputs = make_inputs(B, d, F, torch.float32, seed=10)
    upstream = torch.randn(B, F, dtype=torch.float64, device=DEVICE)
    inputs["W_enc"].requires_grad_(True)
    sparse = dict(inputs, b_enc=inputs["b_enc"] - 5.0)  # almost nothing active
    compare_fp32("relu", None, sparse, upstream, keep=("W_enc",))
    tenc.STATS.clear()
    dense = dict(inputs, b_enc=inputs["b_enc"] + 5.0)  # almost everything active
    compare_fp32("relu", None, dense, upstream, keep=("W_enc",))
    assert tenc.STATS["overflow_rerun"] > 0


@pytest.mark.parametrize("act", ACTS)
def test_poisoned_outputs(act, monkeypatch):
    monkeypatch.setenv("FASTCLT_POISON", "1")
    B, d, F = ODD
    inputs = make_inputs(B, d, F, torch.float32, seed=11, pre_bias=True)
    compare_fp32(act, 4, inputs, torch.randn(B, F, dtype=torch.float64, device=DEVICE))


@pytest.mark.parametrize("act", ["jumprelu", "topk", "batchtopk"])
def test_deterministic(act):
    B, d, F = ODD
    inputs = make_inputs(B, d, F, torch.float32, seed=12, pre_bias=True)
    upstream = torch.randn(B, F, dtype=torch.float64, device=DEVICE)
    c1, _, g1 = run(tenc.encode, act, 4, leaves(inputs), upstream)
    c2, _, g2 = run(tenc.encode, act, 4, leaves(inputs), upstream)
    assert torch.equal(c1.row_ptr, c2.row_ptr) and torch.equal(c1.index, c2.index)
    assert torch.equal(c1.value, c2.value)
    for n in g1:
        assert torch.equal(g1[n], g2[n]), n


@pytest.mark.parametrize("act", ["jumprelu", "topk"])
def test_return_preacts(act):
    B, d, F = ODD
    inputs = make_inputs(B, d, F, torch.float32, seed=13, pre_bias=True)
    t, r = leaves(inputs), leaves(inputs)
    kw_t, kw_r = kwargs_for(act, 3, t), kwargs_for(act, 3, r)
    tc, th = tenc.encode(t["x"], t["W_enc"], t["b_enc"], return_preacts=True, **kw_t)
    rc, rh = ref_encode(r["x"], r["W_enc"], r["b_enc"], return_preacts=True, **kw_r)
    assert torch.equal(pattern(tc, F), pattern(rc, F))
    assert_close("h", th, rh, 1e-5)
    up = torch.randn(B, F, device=DEVICE)
    ((tc.to_dense(F) * up).sum() + th.pow(2).sum()).backward()
    ((rc.to_dense(F) * up).sum() + rh.pow(2).sum()).backward()
    for n in ("x", "W_enc", "b_enc", "pre_bias"):
        assert_close(f"d{n}", t[n].grad, r[n].grad, 1e-4)


def test_encode_layers_matches_reference():
    B, d, F, L, k = 11, 19, 37, 3, 3
    g = torch.Generator().manual_seed(14)
    x = torch.randn(B, L, d, generator=g).to(DEVICE)
    W = (torch.randn(L, F, d, generator=g) * torch.tensor([0.5, 1.0, 2.0])[:, None, None] / d ** 0.5).to(DEVICE)
    b = (torch.randn(L, F, generator=g) * 0.1).to(DEVICE)
    up = [torch.randn(B, F, dtype=torch.float64, device=DEVICE) for _ in range(L)]
    results = []
    for fn in ("triton", "reference"):
        xt, Wt, bt = (t.clone().requires_grad_(True) for t in (x, W, b))
        if fn == "triton":
            codes = tenc.encode_layers(xt, Wt, bt, k)
        else:
            h = torch.einsum("bld,lfd->lbf", xt, Wt) + bt[:, None, :]
            codes = batch_topk_layers(h, k)
        sum((c.to_dense(F).double() * u).sum() for c, u in zip(codes, up)).backward()
        results.append((codes, xt.grad, Wt.grad, bt.grad))
    (tc, *tg), (rc, *rg) = results
    assert sum(c.nnz for c in tc) == k * B * L
    for l in range(L):
        check_csr(tc[l], F)
        assert torch.equal(pattern(tc[l], F), pattern(rc[l], F))
        assert_close(f"layer {l} codes", tc[l].to_dense(F), rc[l].to_dense(F), 1e-5)
    for name, a, r in zip(("x", "W_enc", "b_enc"), tg, rg):
        assert_close(f"d{name}", a, r, 1e-4)


@pytest.mark.parametrize("act", ACTS)
def test_empty_batch(act):
    _, d, F = ODD
    inputs = make_inputs(0, d, F, torch.float32)
    t = leaves(inputs)
    codes = tenc.encode(t["x"], t["W_enc"], t["b_enc"], **kwargs_for(act, 2, t))
    assert codes.batch_size == 0 and codes.nnz == 0 and codes.row_ptr.tolist() == [0]
    codes.value.sum().backward()
    assert t["W_enc"].grad is None or not t["W_enc"].grad.any()


def test_non_contiguous_weight_is_converted():
    B, d, F = ODD
    inputs = make_inputs(B, d, F, torch.float32, seed=15)
    inputs["W_enc"] = inputs["W_enc"].t().contiguous().t()  # column-major [F, d]
    compare_fp32("relu", None, inputs, torch.randn(B, F, dtype=torch.float64, device=DEVICE))


def test_bad_input():
    B, d, F = ODD
    i = make_inputs(B, d, F, torch.float32)
    x, W, b, thr = i["x"], i["W_enc"], i["b_enc"], i["threshold"]
    with pytest.raises(TypeError, match="x:"):
        tenc.encode(x.double(), W, b, activation="relu")
    with pytest.raises(TypeError, match="W_enc:"):
        tenc.encode(x, W.bfloat16(), b, activation="relu")
    with pytest.raises(ValueError, match="W_enc:"):
        tenc.encode(x, W[:, :-1], b, activation="relu")
    with pytest.raises(ValueError, match="x:"):
        tenc.encode(x[None], W, b, activation="relu")
    with pytest.raises(ValueError, match="b_enc:"):
        tenc.encode(x, W, b[:-1], activation="relu")
    with pytest.raises(ValueError, match="threshold:"):
        tenc.encode(x, W, b, activation="jumprelu", threshold=thr[:-1])
    with pytest.raises(ValueError, match="threshold:"):
        tenc.encode(x, W, b, activation="jumprelu")
    with pytest.raises(ValueError, match="pre_bias:"):
        tenc.encode(x, W, b, activation="relu", pre_bias=torch.zeros(d + 1, device=DEVICE))
    with pytest.raises(ValueError, match="activation:"):
        tenc.encode(x, W, b, activation="gelu")
    with pytest.raises(ValueError, match="k:"):
        tenc.encode(x, W, b, activation="topk", k=F + 1)
    with pytest.raises(ValueError, match="k:"):
        tenc.encode(x, W, b, activation="batchtopk")
    with pytest.raises(ValueError, match="bandwidth:"):
        tenc.encode(x, W, b, activation="jumprelu", threshold=thr, bandwidth=0.0)
    with pytest.raises(ValueError, match="W_enc:"):
        tenc.encode_layers(x[:, None].expand(B, 2, d), W[None], b[None], 2)


def test_dispatch():
    """The (op, target) pairs to register as impl "triton" resolve and run through fastclt.ops."""
    import fastclt.ops as ops
    from fastclt.ops import _dispatch

    for op, target in [("encode", "fastclt.ops.triton.encode:encode"),
                       ("auxk_select", "fastclt.ops.triton.auxk:auxk_select")]:
        if "triton" not in _dispatch.implementations(op):
            _dispatch.register(op, "triton", target, available=tenc.available)
    B, d, F = ODD
    i = make_inputs(B, d, F, torch.float32, seed=19)
    codes = ops.encode(i["x"], i["W_enc"], i["b_enc"], activation="topk", k=3, impl="triton")
    ref = ops.encode(i["x"], i["W_enc"], i["b_enc"], activation="topk", k=3, impl="reference")
    assert torch.equal(pattern(codes, F), pattern(ref, F))
    dead = torch.arange(F, device=DEVICE) % 3 == 0
    aux = ops.auxk_select(i["x"], i["W_enc"], i["b_enc"], dead, 2, impl="triton")
    assert aux.k == 2 and bool(dead[aux.index.long()].all())


def test_available():
    assert tenc.available(torch.device(DEVICE))
    if not ON_GPU:
        assert tenc.available(torch.device("cpu")) == (os.environ.get("TRITON_INTERPRET") == "1")
