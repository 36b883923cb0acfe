"""The extension's encode (dense GEMM + exact fastclt._C select + sparse encoder backward;
``fastclt.ops.ext_ops.encode``, ``encode_layers``, ``auxk_select``) against the reference ops:
codes, every gradient (x, W_enc, b_enc, θ, pre_bias), fp32 and bf16, odd sizes, k = 1 and k = F,
an empty row, a feature active in every row, NaN-poisoned kernel outputs, determinism, bad input.
Runs on the CPU kernels, and on the CUDA kernels when they are built and a GPU is present."""
import pytest
import torch

from _encode_cases import (check_bf16_vs_fp64, check_csr, check_deterministic, check_return_preacts, compare_fp32,
                           kwargs_for, leaves, make_inputs, pattern, rel_rmse)
from _util import assert_close
from fastclt.ops import ext_ops
from fastclt.ops.auxk import auxk_select as ref_auxk
from fastclt.ops.encode import encode as ref_encode
from fastclt.ops.encode import encode_layers as ref_encode_layers

ACTS = ["relu", "jumprelu", "topk", "batchtopk"]
ODD = (13, 19, 37)  # B, d_in, F: no multiple of anything




def upstream_for(B, F, device, seed=0):
    return torch.randn(B, F, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)).to(device)


@pytest.mark.parametrize("pre_bias", [False, True])
@pytest.mark.parametrize("act", ACTS)
def test_encode_fp32_matches_reference(ext_device, act, pre_bias, poisoned):
    B, d, F = ODD
    inputs = make_inputs(B, d, F, torch.float32, seed=20, pre_bias=pre_bias, device=ext_device)
    codes = compare_fp32(ext_ops.encode, act, 4, inputs, upstream_for(B, F, ext_device, 1))
    if act == "topk":
        assert codes.k == 4


@pytest.mark.parametrize("act", ACTS)
def test_encode_bf16_error_vs_fp64(ext_device, act):
    """bf16: the kept set is right up to bf16 rounding, and the error against fp64 on its own kept
    set is ≤ 2× eager bf16's error on eager's kept set + a floor (codes and every gradient)."""
    B, d, F = ODD
    inputs = make_inputs(B, d, F, torch.bfloat16, seed=21, pre_bias=True, device=ext_device)
    check_bf16_vs_fp64(ext_ops.encode, act, 4, inputs, upstream_for(B, F, ext_device, 2))


@pytest.mark.parametrize("act", ["topk", "batchtopk"])
@pytest.mark.parametrize("k", [1, ODD[2]])
def test_k_extremes(ext_device, act, k):
    B, d, F = ODD
    inputs = make_inputs(B, d, F, torch.float32, seed=22, device=ext_device)
    compare_fp32(ext_ops.encode, act, k, inputs, upstream_for(B, F, ext_device, 3))


@pytest.mark.parametrize("act", ACTS)
def test_empty_row_and_always_active_feature(ext_device, act):
    """Row 0 has no active feature (x = 0, b < θ − ε/2), feature 5 is active in every row."""
    B, d, F = ODD
    inputs = make_inputs(B, d, F, torch.float32, seed=23, device=ext_device)
    inputs["b_enc"] = -torch.rand(F, device=ext_device) - 2.0
    inputs["x"][0] = 0
    inputs["W_enc"][5] = 0
    inputs["b_enc"][5] = 3.0
    k = 2
    if act == "batchtopk":  # make the batch's top k·B land in the other rows (some get many)
        inputs["x"][1:] *= 4.0
    codes = compare_fp32(ext_ops.encode, act, k, inputs, upstream_for(B, F, ext_device, 4))
    if act != "batchtopk":
        assert bool(pattern(codes, F)[:, 5].all())
    if act in ("relu", "jumprelu"):
        assert codes.row_lengths()[0] == 1  # only the always-active feature
    if act == "batchtopk":
        assert codes.row_lengths()[0] <= 1


@pytest.mark.parametrize("act", ["jumprelu", "batchtopk"])
def test_deterministic(ext_device, act):
    B, d, F = ODD
    inputs = make_inputs(B, d, F, torch.float32, seed=24, pre_bias=True, device=ext_device)
    check_deterministic(ext_ops.encode, act, inputs, upstream_for(B, F, ext_device, 5))


@pytest.mark.parametrize("act", ["jumprelu", "topk"])
def test_return_preacts(ext_device, act):
    B, d, F = ODD
    inputs = make_inputs(B, d, F, torch.float32, seed=25, pre_bias=True, device=ext_device)
    check_return_preacts(ext_ops.encode, act, inputs, 1e-6, 1e-5)


def test_empty_batch(ext_device):
    _, d, F = ODD
    t = leaves(make_inputs(0, d, F, torch.float32, device=ext_device))
    for act in ACTS:
        codes = ext_ops.encode(t["x"], t["W_enc"], t["b_enc"], **kwargs_for(act, 2, t))
        assert codes.batch_size == 0 and codes.nnz == 0 and codes.row_ptr.tolist() == [0]


def test_fp64_goes_to_the_reference(ext_device):
    B, d, F = ODD
    i = make_inputs(B, d, F, torch.float64, seed=26, device=ext_device)
    got = ext_ops.encode(i["x"], i["W_enc"], i["b_enc"], activation="topk", k=3)
    want = ref_encode(i["x"], i["W_enc"], i["b_enc"], activation="topk", k=3)
    assert got.value.dtype == torch.float64
    assert torch.equal(got.to_dense(F), want.to_dense(F))


def layers_oracle(x, W, b, p, masks, up):
    """fp64 values and gradients of BatchTopK-across-layers codes on given kept sets ``masks``."""
    t = [v.detach().double().requires_grad_(True) if v is not None else None for v in (x, W, b, p)]
    xs = t[0] if t[3] is None else t[0] - t[3]
    h = torch.einsum("bld,lfd->lbf", xs, t[1]) + t[2][:, None, :]
    dense = [torch.relu(h[l]) * m for l, m in enumerate(masks)]
    sum((dl * u).sum() for dl, u in zip(dense, up)).backward()
    return [dl.detach() for dl in dense], [v.grad for v in t if v is not None], h.detach()


@pytest.mark.parametrize("pre_bias", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_encode_layers_matches_reference(ext_device, dtype, pre_bias, poisoned):
    B, d, F, L, k = 11, 19, 37, 3, 3
    g = torch.Generator().manual_seed(27)
    x = torch.randn(B, L, d, generator=g).to(ext_device, dtype)
    W = (torch.randn(L, F, d, generator=g) * torch.tensor([0.5, 1.0, 2.0])[:, None, None] / d ** 0.5).to(ext_device, dtype)
    b = (torch.randn(L, F, generator=g) * 0.1).to(ext_device, dtype)
    p = (torch.randn(d, generator=g) * 0.3).to(ext_device, dtype) if pre_bias else None
    up = [torch.randn(B, F, dtype=torch.float64, generator=g).to(ext_device) for _ in range(L)]
    results = []
    for fn in (ext_ops.encode_layers, ref_encode_layers):
        leaves_ = [t.clone().requires_grad_(True) for t in (x, W, b)] + [None if p is None else p.clone().requires_grad_(True)]
        codes = fn(*leaves_[:3], k, leaves_[3])
        sum((c.to_dense(F).double() * u).sum() for c, u in zip(codes, up)).backward()
        results.append((codes, [t.grad for t in leaves_ if t is not None]))
    (tc, tg), (rc, rg) = results
    assert sum(c.nnz for c in tc) == k * B * L
    t_sets, r_sets = [pattern(c, F) for c in tc], [pattern(c, F) for c in rc]
    od_t, og_t, h64 = layers_oracle(x, W, b, p, t_sets, up)
    od_r, og_r, _ = layers_oracle(x, W, b, p, r_sets, up)
    kept = torch.stack(t_sets)
    tol_cut = 0.0 if dtype == torch.float32 else 2.0 ** -7 * float(h64.abs().max())
    assert float(h64[kept].min()) >= float(h64[~kept].max()) - tol_cut - 1e-9, "not the largest k·B·L entries"
    for l in range(L):
        check_csr(tc[l], F)
        if dtype == torch.float32:  # fp32: no ties here, the reference's exact set
            assert torch.equal(t_sets[l], r_sets[l]), f"layer {l}: kept set differs"
    for l in range(L):
        err_t, err_r = rel_rmse(tc[l].to_dense(F), od_t[l]), rel_rmse(rc[l].to_dense(F), od_r[l])
        assert err_t <= 2 * err_r + (1e-6 if dtype == torch.float32 else 0.01), f"layer {l} codes"
    for name, a, o, ro, r in zip(("x", "W_enc", "b_enc", "pre_bias"), tg, og_t, og_r, rg):
        assert a.dtype == r.dtype
        err_t, err_r = rel_rmse(a, o), rel_rmse(r, ro)
        assert err_t <= 2 * err_r + (1e-5 if dtype == torch.float32 else 0.01), f"d{name}: {err_t} vs eager {err_r}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_auxk_select_matches_reference(ext_device, dtype, poisoned):
    B, d, F, k_aux = 13, 19, 37, 5
    inputs = make_inputs(B, d, F, dtype, seed=28, pre_bias=True, device=ext_device)
    dead = torch.arange(F, device=ext_device) % 3 != 1  # 25 dead features
    up = upstream_for(B, F, ext_device, 7)
    out = []
    for fn in (ext_ops.auxk_select, ref_auxk):
        t = leaves(inputs)
        codes = fn(t["x"], t["W_enc"], t["b_enc"], dead, k_aux, t["pre_bias"])
        (codes.to_dense(F).double() * up).sum().backward()
        out.append((codes, {n: t[n].grad for n in ("x", "W_enc", "b_enc", "pre_bias")}))
    (tc, tg), (rc, rg) = out
    assert tc.k == k_aux and tc.nnz == B * k_aux
    check_csr(tc, F)
    assert bool(dead[tc.index.long()].all()), "AuxK picked a live feature"
    assert torch.equal(pattern(tc, F), pattern(rc, F))
    assert_close(tc.to_dense(F), rc.to_dense(F), 1e-6, "codes")
    assert not tg["W_enc"][~dead].any() and not tg["b_enc"][~dead].any(), "live rows got an AuxK gradient"
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for n in rg:
        assert_close(tg[n], rg[n], tol, f"d{n}")


def test_auxk_select_no_dead_and_k_above_n_dead(ext_device):
    B, d, F = ODD
    i = make_inputs(B, d, F, torch.float32, seed=29, device=ext_device)
    none = ext_ops.auxk_select(i["x"], i["W_enc"], i["b_enc"], torch.zeros(F, dtype=torch.bool, device=ext_device), 4)
    assert none.nnz == 0 and none.batch_size == B
    few = torch.zeros(F, dtype=torch.bool, device=ext_device)
    few[[3, 30]] = True
    codes = ext_ops.auxk_select(i["x"], i["W_enc"], i["b_enc"], few, 4)
    assert codes.k == 2 and set(codes.index.tolist()) <= {3, 30}


def test_bad_input(ext_device):
    B, d, F = ODD
    i = make_inputs(B, d, F, torch.float32, device=ext_device)
    x, W, b, thr = i["x"], i["W_enc"], i["b_enc"], i["threshold"]
    with pytest.raises(TypeError, match="W_enc:"):
        ext_ops.encode(x, W.bfloat16(), b, activation="relu")
    with pytest.raises(ValueError, match="W_enc:"):
        ext_ops.encode(x, W[:, :-1], b, activation="relu")
    with pytest.raises(ValueError, match="b_enc:"):
        ext_ops.encode(x, W, b[:-1], activation="relu")
    with pytest.raises(ValueError, match="threshold:"):
        ext_ops.encode(x, W, b, activation="jumprelu")
    with pytest.raises(ValueError, match="k:"):
        ext_ops.encode(x, W, b, activation="topk", k=F + 1)
    with pytest.raises(ValueError, match="activation:"):
        ext_ops.encode(x, W, b, activation="gelu")
    with pytest.raises(ValueError, match="bandwidth:"):
        ext_ops.encode(x, W, b, activation="jumprelu", threshold=thr, bandwidth=0.0)
    with pytest.raises(ValueError, match="h contains NaN"):
        ext_ops.encode(x.clone().fill_(float("nan")), W, b, activation="batchtopk", k=2)
    with pytest.raises(ValueError, match="W_enc:"):
        ext_ops.encode_layers(x[:, None].expand(B, 2, d), W[None], b[None], 2)
    with pytest.raises(ValueError, match="dead_mask:"):
        ext_ops.auxk_select(x, W, b, torch.ones(F - 1, dtype=torch.bool, device=ext_device), 2)
    with pytest.raises(ValueError, match="k_aux:"):
        ext_ops.auxk_select(x, W, b, torch.ones(F, dtype=torch.bool, device=ext_device), 0)


def test_dispatch_prefers_the_extension(ext_device):
    """impl="auto" takes the extension's encode on this ext_device (the models' default path)."""
    import fastclt.ops as ops

    for op in ("encode", "encode_layers", "auxk_select", "topk", "batch_topk", "sparse_decode"):
        name, _ = ops.resolve(op, "auto", torch.device(ext_device))
        if ext_device == "cpu":
            assert name == "cpu", (op, name)
        else:  # on CUDA the Triton kernels come first where there are some
            assert name == ("triton" if "triton" in ops.implementations(op) else "cuda"), (op, name)
