"""encode and encode_layers (fastclt/ops/{reference,triton,ext}/encode.py): every kernel
implementation against the reference encode — codes, every gradient (x, W_enc, b_enc, θ,
pre_bias), fp32 and bf16, odd sizes, k = 1 and k = F, an empty row, a feature active in every row,
NaN-poisoned kernel outputs, determinism, return_preacts, bad input; then BatchTopK across layers.
On the CPU: the extension's kernels, and the Triton kernels under the interpreter at tiny sizes;
on a GPU also real sizes. Backend-only behaviour (the Triton encode's speculative thresholds and
autotuning): tests/ops/triton/test_triton_encode.py."""
import functools

import pytest
import torch

from _encode_cases import (check_bf16_vs_fp64, check_csr, check_deterministic, check_return_preacts, compare_fp32,
                           kwargs_for, leaves, make_inputs, pattern, rel_rmse)
from _encode_cases import assert_close as assert_close_named
from _impls import GPU, impl_params
from _util import assert_close
from fastclt import _ext, ops
from fastclt.ops.reference.encode import encode as ref_encode
from fastclt.ops.reference.encode import encode_layers as ref_encode_layers
from fastclt.ops.reference.select import batch_topk_layers

ACTS = ["relu", "jumprelu", "topk", "batchtopk"]
ODD = (13, 19, 37)  # B, d_in, F: no multiple of anything
SIZES = [ODD] + ([(4096, 768, 16384)] if GPU else [])
KERNELS = impl_params("encode")
# the tolerance of return_preacts (h, gradients): the Triton GEMM sums in its own order
PREACTS_TOL = {"triton": (1e-5, 1e-4), "cpu": (1e-6, 1e-5), "cuda": (1e-6, 1e-5)}


def encode_with(impl):
    return functools.partial(ops.encode, impl=impl)


def upstream_for(B, F, device, seed=0):
    return torch.randn(B, F, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)).to(device)


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("pre_bias", [False, True])
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("impl,device", KERNELS)
def test_encode_fp32_matches_reference(impl, device, act, pre_bias, size, poisoned):
    B, d, F = size
    inputs = make_inputs(B, d, F, torch.float32, seed=20, pre_bias=pre_bias, device=device)
    codes = compare_fp32(encode_with(impl), act, 4, inputs, upstream_for(B, F, device, 1),
                         allowed_flips=0 if size == ODD else B * F // 10**5)
    if act == "topk":
        assert codes.k == 4


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("impl,device", KERNELS)
def test_encode_even_k(impl, device, act):
    """d_in a multiple of the GEMM's BLOCK_K (the Triton kernel's unmasked main loop)."""
    B, d, F = 13, 32, 37
    inputs = make_inputs(B, d, F, torch.float32, seed=18, pre_bias=True, device=device)
    compare_fp32(encode_with(impl), act, 4, inputs, upstream_for(B, F, device, 9))


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("impl,device", KERNELS)
def test_encode_bf16_error_vs_fp64(impl, device, act, size):
    """bf16: the kept set is right up to bf16 rounding, and the error against fp64 on its own kept
    set is ≤ 2× eager bf16's error on eager's kept set + a floor (codes and every gradient)."""
    B, d, F = size
    inputs = make_inputs(B, d, F, torch.bfloat16, seed=21, pre_bias=True, device=device)
    check_bf16_vs_fp64(encode_with(impl), act, 4, inputs, upstream_for(B, F, device, 2))


@pytest.mark.parametrize("act", ["topk", "batchtopk"])
@pytest.mark.parametrize("k", [1, ODD[2]])
@pytest.mark.parametrize("impl,device", KERNELS)
def test_k_extremes(impl, device, act, k):
    B, d, F = ODD
    inputs = make_inputs(B, d, F, torch.float32, seed=22, device=device)
    compare_fp32(encode_with(impl), act, k, inputs, upstream_for(B, F, device, 3))


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("impl,device", KERNELS)
def test_empty_row_and_always_active_feature(impl, device, act):
    """Row 0 has no active feature (x = 0, b < θ − ε/2), feature 5 is active in every row."""
    B, d, F = ODD
    inputs = make_inputs(B, d, F, torch.float32, seed=23, device=device)
    inputs["b_enc"] = -torch.rand(F, device=device) - 2.0
    inputs["x"][0] = 0
    inputs["W_enc"][5] = 0
    inputs["b_enc"][5] = 3.0
    k = 2
    if act == "batchtopk":  # make the batch's top k·B land in the other rows (some get many)
        inputs["x"][1:] *= 4.0
    codes = compare_fp32(encode_with(impl), act, k, inputs, upstream_for(B, F, device, 4))
    if act != "batchtopk":
        assert bool(pattern(codes, F)[:, 5].all())
    if act in ("relu", "jumprelu"):
        assert codes.row_lengths()[0] == 1  # only the always-active feature
    if act == "batchtopk":
        assert codes.row_lengths()[0] <= 1


@pytest.mark.parametrize("act", ["jumprelu", "topk", "batchtopk"])
@pytest.mark.parametrize("impl,device", KERNELS)
def test_deterministic(impl, device, act):
    B, d, F = ODD
    inputs = make_inputs(B, d, F, torch.float32, seed=24, pre_bias=True, device=device)
    check_deterministic(encode_with(impl), act, inputs, upstream_for(B, F, device, 5))


@pytest.mark.parametrize("act", ["jumprelu", "topk"])
@pytest.mark.parametrize("impl,device", KERNELS)
def test_return_preacts(impl, device, act):
    B, d, F = ODD
    inputs = make_inputs(B, d, F, torch.float32, seed=25, pre_bias=True, device=device)
    check_return_preacts(encode_with(impl), act, inputs, *PREACTS_TOL[impl])


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("impl,device", KERNELS)
def test_empty_batch(impl, device, act):
    _, d, F = ODD
    t = leaves(make_inputs(0, d, F, torch.float32, device=device))
    codes = ops.encode(t["x"], t["W_enc"], t["b_enc"], **kwargs_for(act, 2, t), impl=impl)
    assert codes.batch_size == 0 and codes.nnz == 0 and codes.row_ptr.tolist() == [0]
    codes.value.sum().backward()
    assert t["W_enc"].grad is None or not t["W_enc"].grad.any()


@pytest.mark.parametrize("impl,device", KERNELS)
def test_non_contiguous_weight_is_converted(impl, device):
    B, d, F = ODD
    inputs = make_inputs(B, d, F, torch.float32, seed=15, device=device)
    inputs["W_enc"] = inputs["W_enc"].t().contiguous().t()  # column-major [F, d]
    compare_fp32(encode_with(impl), "relu", None, inputs, upstream_for(B, F, device, 6))


@pytest.mark.parametrize("impl,device", KERNELS)
def test_fp64_runs_the_reference(impl, device):
    """A dtype the kernels do not take runs the reference (the op table's routing), same codes."""
    B, d, F = ODD
    i = make_inputs(B, d, F, torch.float64, seed=26, device=device)
    assert ops.resolve("encode", impl, torch.device(device), torch.float64)[0] == "reference"
    got = ops.encode(i["x"], i["W_enc"], i["b_enc"], activation="topk", k=3, impl=impl)
    want = ref_encode(i["x"], i["W_enc"], i["b_enc"], activation="topk", k=3)
    assert got.value.dtype == torch.float64
    assert torch.equal(got.to_dense(F), want.to_dense(F))


@pytest.mark.parametrize("impl,device", impl_params("encode", reference=True))
def test_bad_input(impl, device):
    """Checked once by the entry point, the same for every implementation."""
    B, d, F = ODD
    i = make_inputs(B, d, F, torch.float32, device=device)
    x, W, b, thr = i["x"], i["W_enc"], i["b_enc"], i["threshold"]
    enc = encode_with(impl)
    with pytest.raises(TypeError, match="W_enc: expected x's dtype"):
        enc(x.double(), W, b, activation="relu")
    with pytest.raises(TypeError, match="W_enc:"):
        enc(x, W.bfloat16(), b, activation="relu")
    with pytest.raises(ValueError, match="W_enc:"):
        enc(x, W[:, :-1], b, activation="relu")
    with pytest.raises(ValueError, match="x:"):
        enc(x[None], W, b, activation="relu")
    with pytest.raises(ValueError, match="b_enc:"):
        enc(x, W, b[:-1], activation="relu")
    with pytest.raises(ValueError, match="threshold:"):
        enc(x, W, b, activation="jumprelu", threshold=thr[:-1])
    with pytest.raises(ValueError, match="threshold:"):
        enc(x, W, b, activation="jumprelu")
    with pytest.raises(ValueError, match="pre_bias:"):
        enc(x, W, b, activation="relu", pre_bias=torch.zeros(d + 1, device=device))
    with pytest.raises(ValueError, match="activation:"):
        enc(x, W, b, activation="gelu")
    with pytest.raises(ValueError, match="k:"):
        enc(x, W, b, activation="topk", k=F + 1)
    with pytest.raises(ValueError, match="k:"):
        enc(x, W, b, activation="batchtopk")
    with pytest.raises(ValueError, match="bandwidth:"):
        enc(x, W, b, activation="jumprelu", threshold=thr, bandwidth=0.0)
    with pytest.raises(ValueError, match="W_enc:"):
        ops.encode_layers(x[:, None].expand(B, 2, d), W[None], b[None], 2, impl=impl)
    if impl in ("cpu", "cuda"):  # the extension's selections reject NaN
        with pytest.raises(ValueError, match=r"h( \+ bias)? contains NaN"):
            enc(x.clone().fill_(float("nan")), W, b, activation="batchtopk", k=2)


# ------------------------------------------------------------------- BatchTopK across layers
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
@pytest.mark.parametrize("impl,device", impl_params("encode_layers"))
def test_encode_layers_matches_reference(impl, device, dtype, pre_bias, poisoned):
    B, d, F, L, k = 11, 19, 37, 3, 3
    g = torch.Generator().manual_seed(27)
    x = torch.randn(B, L, d, generator=g).to(device, dtype)
    W = (torch.randn(L, F, d, generator=g) * torch.tensor([0.5, 1.0, 2.0])[:, None, None] / d ** 0.5).to(device, dtype)
    b = (torch.randn(L, F, generator=g) * 0.1).to(device, dtype)
    p = (torch.randn(d, generator=g) * 0.3).to(device, dtype) if pre_bias else None
    up = [torch.randn(B, F, dtype=torch.float64, generator=g).to(device) for _ in range(L)]
    results = []
    for fn in (functools.partial(ops.encode_layers, impl=impl), ref_encode_layers):
        leaves_ = ([t.clone().requires_grad_(True) for t in (x, W, b)]
                   + [None if p is None else p.clone().requires_grad_(True)])
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
        if dtype == torch.float32:  # fp32: no ties here, the reference's exact set and values
            assert torch.equal(t_sets[l], r_sets[l]), f"layer {l}: kept set differs"
            assert_close_named(f"layer {l} codes", tc[l].to_dense(F), rc[l].to_dense(F), 1e-5)
    for l in range(L):
        err_t, err_r = rel_rmse(tc[l].to_dense(F), od_t[l]), rel_rmse(rc[l].to_dense(F), od_r[l])
        assert err_t <= 2 * err_r + (1e-6 if dtype == torch.float32 else 0.01), f"layer {l} codes"
    for name, a, o, ro, r in zip(("x", "W_enc", "b_enc", "pre_bias"), tg, og_t, og_r, rg):
        assert a.dtype == r.dtype
        err_t, err_r = rel_rmse(a, o), rel_rmse(r, ro)
        assert err_t <= 2 * err_r + (1e-5 if dtype == torch.float32 else 0.01), f"d{name}: {err_t} vs eager {err_r}"
        if dtype == torch.float32:
            assert_close_named(f"d{name}", a, r, 1e-4)


@pytest.mark.parametrize("bias,one_call", [(True, True), (True, False), (False, True)])
@pytest.mark.parametrize("impl,device", impl_params("encode_layers", reference=True))
def test_encode_layers_per_layer_is_one_encode_per_layer(impl, device, bias, one_call, poisoned, monkeypatch):
    """Not across layers: each layer's own BatchTopK of k·B, as ``encode`` gives it, gradients too
    (with a bias, on the CPU kernels: small layers in one selection for all, the bias folded in;
    ``one_call`` False makes these layers count as large, each selected after its own GEMM)."""
    if not one_call:
        from fastclt.ops.ext import encode as ext_encode
        monkeypatch.setattr(ext_encode, "_SMALL_LAYER", 0)
    B, d, F, L, k = 11, 19, 37, 3, 3
    g = torch.Generator().manual_seed(28)
    x = torch.randn(B, L, d, generator=g).to(device)
    W = (torch.randn(L, F, d, generator=g) / d ** 0.5).to(device)
    b = (torch.randn(L, F, generator=g) * 0.1).to(device)
    up = torch.randn(L, B, F, dtype=torch.float64, generator=g).to(device)
    (xa, Wa, ba), (xb, Wb, bb) = [[t.clone().requires_grad_() for t in (x, W, b)] for _ in range(2)]
    got = ops.encode_layers(xa, Wa, ba if bias else None, k, across_layers=False, impl=impl)
    want = [ref_encode(xb[:, l], Wb[l], bb[l] if bias else None, activation="batchtopk", k=k) for l in range(L)]
    for l in range(L):
        assert got[l].nnz == k * B and torch.equal(pattern(got[l], F), pattern(want[l], F))
        assert_close(got[l].to_dense(F), want[l].to_dense(F), 1e-5, f"layer {l}")
    sum((c.to_dense(F).double() * up[l]).sum() for l, c in enumerate(got)).backward()
    sum((c.to_dense(F).double() * up[l]).sum() for l, c in enumerate(want)).backward()
    for name, a, r in (("dW_enc", Wa, Wb), ("db_enc", ba, bb), ("dx", xa, xb)):
        if name != "db_enc" or bias:
            assert_close(a.grad, r.grad, 1e-4, name)


@pytest.mark.parametrize("impl,device", impl_params("encode_layers"))
def test_encode_layers_equals_the_stacked_selection(impl, device):
    """The fused across-layers encode keeps what ``batch_topk_layers`` keeps on the stacked h."""
    B, d, F, L, k = 11, 19, 37, 3, 3
    g = torch.Generator().manual_seed(14)
    x = torch.randn(B, L, d, generator=g).to(device)
    W = (torch.randn(L, F, d, generator=g) * torch.tensor([0.5, 1.0, 2.0])[:, None, None] / d ** 0.5).to(device)
    b = (torch.randn(L, F, generator=g) * 0.1).to(device)
    up = [torch.randn(B, F, dtype=torch.float64, generator=g).to(device) for _ in range(L)]
    results = []
    for fn in (impl, "reference"):
        xt, Wt, bt = (t.clone().requires_grad_(True) for t in (x, W, b))
        if fn == "reference":
            h = torch.einsum("bld,lfd->lbf", xt, Wt) + bt[:, None, :]
            codes = batch_topk_layers(h, k)
        else:
            codes = ops.encode_layers(xt, Wt, bt, k, impl=impl)
        sum((c.to_dense(F).double() * u).sum() for c, u in zip(codes, up)).backward()
        results.append((codes, xt.grad, Wt.grad, bt.grad))
    (tc, *tg), (rc, *rg) = results
    assert sum(c.nnz for c in tc) == k * B * L
    for l in range(L):
        check_csr(tc[l], F)
        assert torch.equal(pattern(tc[l], F), pattern(rc[l], F))
        assert_close_named(f"layer {l} codes", tc[l].to_dense(F), rc[l].to_dense(F), 1e-5)
    for name, a, r in zip(("x", "W_enc", "b_enc"), tg, rg):
        assert_close_named(f"d{name}", a, r, 1e-4)


@pytest.mark.parametrize("dense", [False, True])
def test_encode_codes_centered_input_gives_the_same_gradients(dense):
    """encode_codes with ``centered`` (x − pre_bias kept from the forward, fp32) gives bit-for-bit the
    gradients of its own subtraction, on the sparse and the dense encoder backward; a centered
    tensor that does not fit is refused by name."""
    from fastclt.ops import density
    from fastclt.ops.encoder_backward import encode_codes
    from fastclt.ops.ext._common import EXT_KERNELS
    from fastclt.ops.reference.select import topk
    if not _ext.has_cpu_ext():
        pytest.skip(_ext.missing_message("cpu"))
    g = torch.Generator().manual_seed(31)
    B, d, F, k = 13, 19, 41, 5
    x = torch.randn(B, d, generator=g)
    W = torch.randn(F, d, generator=g, requires_grad=True)
    b = torch.randn(F, generator=g, requires_grad=True)
    p = torch.randn(d, generator=g, requires_grad=True)
    xc = x - p.detach()
    c = topk(torch.nn.functional.linear(xc, W.detach(), b.detach()), k)
    row = c.row_ids()
    h_e = torch.nn.functional.linear(xc, W.detach(), b.detach())[row, c.index.long()]
    up = torch.randn(c.nnz, generator=g)
    grads = []
    with density.crossover("always" if dense else "never", "encode_backward"):
        for centered in (None, xc):
            out = encode_codes(x, W, b, None, p, c.row_ptr, row, c.index, h_e, "topk", 0.01, EXT_KERNELS, k, centered)
            grads.append(torch.autograd.grad((out.value * up).sum(), (W, b, p)))
    for a, b_ in zip(*grads):
        assert torch.equal(a, b_)
    with pytest.raises(ValueError, match="centered: expected fp32"):
        encode_codes(x, W, b, None, p, c.row_ptr, row, c.index, h_e, "topk", 0.01, EXT_KERNELS, k, xc[:, :-1])
    with pytest.raises(ValueError, match="centered: expected fp32"):
        encode_codes(x, W, b, None, None, c.row_ptr, row, c.index, h_e, "topk", 0.01, EXT_KERNELS, k, xc)
