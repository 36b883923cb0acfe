"""The reference ops against independent computations: dense float64 math, brute-force top-k,
and finite differences for the JumpReLU threshold gradient."""
import math

import pytest
import torch

import fastclt
from fastclt import ops
from fastclt.codes import SparseCodes
from _util import assert_close


def randn(gen, *shape, dtype=torch.float64):
    return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)


# ---------------------------------------------------------------- SparseCodes
def test_codes_roundtrip_dense(gen):
    a = torch.relu(randn(gen, 7, 13))
    a[3] = 0  # a row with no active feature
    codes = SparseCodes.from_dense(a)
    assert codes.row_ptr.dtype == torch.int64 and codes.index.dtype == torch.int32
    assert codes.row_ptr[3] == codes.row_ptr[4]
    assert torch.equal(codes.to_dense(13), a)
    assert codes.row_ids().tolist() == sorted(codes.row_ids().tolist())
    assert float(codes.l0()) == pytest.approx(float((a > 0).sum()) / 7)


def test_codes_validation():
    with pytest.raises(TypeError, match="row_ptr"):
        SparseCodes(torch.zeros(3, dtype=torch.int32), torch.zeros(0, dtype=torch.int32), torch.zeros(0))
    with pytest.raises(TypeError, match="index"):
        SparseCodes(torch.zeros(3, dtype=torch.int64), torch.zeros(0, dtype=torch.int64), torch.zeros(0))
    with pytest.raises(ValueError, match="same length"):
        SparseCodes(torch.zeros(3, dtype=torch.int64), torch.zeros(2, dtype=torch.int32), torch.zeros(1))
    with pytest.raises(ValueError, match="n_features"):
        SparseCodes(torch.zeros(1, dtype=torch.int64), torch.zeros(0, dtype=torch.int32), torch.zeros(0)).to_dense()


# ------------------------------------------------------------------ JumpReLU
def test_jumprelu_dense_forward_and_grads(gen):
    h = randn(gen, 11, 17).requires_grad_()
    theta = (randn(gen, 17).abs() * 0.5).requires_grad_()
    eps = 0.3
    a = ops.jumprelu_dense(h, theta, eps)
    assert torch.equal(a, h * (h > theta))
    g = randn(gen, 11, 17)
    a.backward(g)
    assert torch.equal(h.grad, g * (h > theta))
    rect = ((h - theta) / eps).abs() < 0.5
    assert_close(theta.grad, (g * -(theta / eps) * rect).sum(0), 1e-12, "dθ")
    # strict >: an entry exactly at θ is inactive
    at = theta.detach().clone()[None].expand(2, 17).clone()
    assert ops.jumprelu_dense(at, theta.detach(), eps).abs().sum() == 0


@pytest.mark.parametrize("what", ["activation", "step"])
def test_jumprelu_threshold_gradient_matches_finite_differences(what):
    """The straight-through θ gradient estimates d/dθ E[a] (or E[1[h>θ]]): check it against a
    central finite difference of the empirical mean over a large sample (SPEC §3)."""
    g = torch.Generator().manual_seed(1234)
    N = 400_000
    h = torch.randn(N, generator=g, dtype=torch.float64)
    theta0, eps = 0.7, 0.1
    theta = torch.tensor([theta0], dtype=torch.float64, requires_grad=True)
    fn = ops.jumprelu_dense if what == "activation" else ops.jumprelu_step
    fn(h[:, None], theta, eps).mean().backward()
    ste = float(theta.grad)

    def mean_at(t):
        return float((h * (h > t)).mean()) if what == "activation" else float((h > t).double().mean())

    delta = 0.02
    fd = (mean_at(theta0 + delta) - mean_at(theta0 - delta)) / (2 * delta)
    pdf = math.exp(-theta0 ** 2 / 2) / math.sqrt(2 * math.pi)
    exact = -theta0 * pdf if what == "activation" else -pdf
    assert fd == pytest.approx(exact, rel=0.05)
    assert ste == pytest.approx(fd, rel=0.05)


def test_jumprelu_codes_keep_the_band(gen):
    h = randn(gen, 9, 23).requires_grad_()
    theta = (randn(gen, 23).abs() * 0.3).requires_grad_()
    eps = 0.4
    codes = ops.jumprelu(h, theta, eps)
    mask = (h > theta) | ((h - theta).abs() < eps / 2)
    assert codes.nnz == int(mask.sum())
    assert torch.equal(codes.to_dense(23), h * (h > theta))
    # gradients through the codes equal the dense STE gradients (band entries included)
    g = randn(gen, 9, 23)
    (codes.to_dense(23) * g).sum().backward()
    h_ref = h.detach().clone().requires_grad_()
    theta_ref = theta.detach().clone().requires_grad_()
    (ops.jumprelu_dense(h_ref, theta_ref, eps) * g).sum().backward()
    assert_close(h.grad, h_ref.grad, 1e-12, "dh")
    assert_close(theta.grad, theta_ref.grad, 1e-12, "dθ")
    assert float(codes.l0()) == pytest.approx(float((h > theta).sum()) / 9)


def test_relu_codes(gen):
    h = randn(gen, 6, 10).requires_grad_()
    codes = ops.relu(h)
    assert torch.equal(codes.to_dense(10), torch.relu(h))
    codes.to_dense(10).sum().backward()
    assert torch.equal(h.grad, (h > 0).double())


# --------------------------------------------------------------- selections
@pytest.mark.parametrize("B,F,k", [(5, 37, 1), (8, 37, 5), (3, 12, 12), (1, 1001, 17)])
def test_topk_brute_force(gen, B, F, k):
    h = randn(gen, B, F).requires_grad_()
    codes = ops.topk(h, k, impl="reference")
    assert codes.k == k and codes.nnz == B * k
    dense = codes.to_dense(F)
    for b in range(B):
        row = sorted(h[b].tolist(), reverse=True)[:k]
        kept = sorted(dense[b][dense[b] != 0].tolist() + [0.0] * 0, reverse=True)
        assert sorted([max(v, 0.0) for v in row], reverse=True)[:len(kept)] == kept
        kept_idx = set(codes.index[b * k:(b + 1) * k].tolist())
        assert len(kept_idx) == k
        assert min(h[b, list(kept_idx)].tolist()) >= row[-1]
    g = randn(gen, B, F)
    (dense * g).sum().backward()
    sel = torch.zeros(B, F, dtype=torch.bool)
    sel[codes.row_ids(), codes.index.long()] = True
    assert torch.equal(h.grad, g * (sel & (h > 0)))


def test_topk_negative_values_relu(gen):
    h = -randn(gen, 4, 9).abs() - 0.1  # all negative
    codes = ops.topk(h, 3)
    assert codes.nnz == 12 and codes.to_dense(9).abs().sum() == 0 and float(codes.l0()) == 0


@pytest.mark.parametrize("B,F,k", [(7, 37, 1), (16, 45, 4), (3, 8, 8), (1, 13, 2)])
def test_batch_topk_exact_count_and_set(gen, B, F, k):
    h = randn(gen, B, F).requires_grad_()
    codes = ops.batch_topk(h, k, impl="reference")
    assert codes.nnz == k * B  # exactly k·B, whatever the per-row counts
    flat = h.detach().flatten()
    cut = flat.sort(descending=True).values[k * B - 1]
    kept = torch.zeros(B, F, dtype=torch.bool)
    kept[codes.row_ids(), codes.index.long()] = True
    assert torch.equal(kept, h.detach() >= cut)  # continuous values: no ties
    assert torch.equal(codes.to_dense(F), torch.relu(h.detach()) * kept)
    g = randn(gen, B, F)
    (codes.to_dense(F) * g).sum().backward()
    assert torch.equal(h.grad, g * (kept & (h > 0)))


def test_batch_topk_ties_count_exact():
    h = torch.ones(6, 10)
    codes = ops.batch_topk(h, 3)
    assert codes.nnz == 18


def test_batch_topk_layers(gen):
    L, B, F, k = 3, 5, 11, 2
    h = randn(gen, L, B, F).requires_grad_()
    codes = ops.batch_topk_layers(h, k, impl="reference")
    assert len(codes) == L and sum(c.nnz for c in codes) == k * B * L
    cut = h.detach().flatten().sort(descending=True).values[k * B * L - 1]
    dense = torch.stack([c.to_dense(F) for c in codes])
    assert torch.equal(dense, torch.relu(h.detach()) * (h.detach() >= cut))
    dense.sum().backward()
    assert torch.equal(h.grad, ((h >= cut) & (h > 0)).double())


def test_batch_topk_empty_batch():
    codes = ops.batch_topk(torch.zeros(0, 5), 2)
    assert codes.nnz == 0 and codes.batch_size == 0


# ------------------------------------------------------------------ decode
@pytest.mark.parametrize("D_shape", [(13,), (3, 5)])
def test_sparse_decode_against_dense(gen, D_shape):
    B, F = 9, 31
    a = torch.relu(randn(gen, B, F)) * (randn(gen, B, F) > 0.8)
    a[4] = 0  # a row with no active feature
    a[:, 7] = randn(gen, B).abs() + 0.1  # a feature active in every row
    codes = SparseCodes.from_dense(a)
    value = codes.value.clone().requires_grad_()
    codes = codes.with_value(value)
    W = randn(gen, F, *D_shape).requires_grad_()
    b = randn(gen, *D_shape).requires_grad_()
    y = ops.sparse_decode(codes, W, b, impl="reference")
    ref = (a @ W.detach().reshape(F, -1)).reshape(B, *D_shape) + b.detach()
    assert_close(y, ref, 1e-12, "y")
    g = randn(gen, B, *D_shape)
    y.backward(g)
    gf = g.reshape(B, -1)
    rows, cols = codes.row_ids(), codes.index.long()
    assert_close(value.grad, (gf[rows] * W.detach().reshape(F, -1)[cols]).sum(1), 1e-12, "dvalue")
    assert_close(W.grad.reshape(F, -1), a.T @ gf, 1e-12, "dW")
    assert_close(b.grad, g.sum(0), 1e-12, "db")


def _dense_clt(a_list, model):
    """ŷ_t = Σ_{s≤t} g_t(a_s) @ decoder_weight(s)[:, t−s] + b_dec[t] in float64, from the expansion."""
    L = model.n_layers
    outs = []
    for t in range(L):
        acc = model.b_dec[t].double().expand(a_list[0].shape[0], -1)
        for s in range(t + 1):
            a = a_list[s].double()
            if model.cfg.feature_affine:
                a = (a + model.feature_offset[t].double() * (a > 0)) * model.feature_scale[t].double()
            acc = acc + a @ model.decoder_weight(s)[:, t - s].double()
        outs.append(acc)
    return torch.stack(outs, 1)


@pytest.mark.parametrize("tying,affine", [("none", False), ("per_source", False), ("per_source", True),
                                          ("per_target", False), ("per_target", True)])
def test_clt_decode_equals_dense_expansion(gen, tying, affine):
    torch.manual_seed(int(torch.randint(0, 2**30, (1,), generator=gen)))
    L, F, d = 4, 19, 7
    cfg = fastclt.CLTConfig(n_layers=L, d_in=5, d_out=d, n_features=F, activation="relu", decoder_tying=tying,
                            feature_affine=affine, dtype="float64")
    model = fastclt.CrossLayerTranscoder(cfg)
    with torch.no_grad():
        model.b_dec.normal_()
        if affine:
            model.feature_offset.normal_()
            model.feature_scale.normal_()
    B = 6
    a_list = [torch.relu(randn(gen, B, F)) * (randn(gen, B, F) > 0.5) for _ in range(L)]
    codes = [SparseCodes.from_dense(a).with_value(SparseCodes.from_dense(a).value.clone().requires_grad_())
             for a in a_list]
    y = model.decode(codes)
    ref = _dense_clt(a_list, model)
    assert_close(y, ref.detach(), 1e-12, f"ŷ ({tying})")
    # gradients: the sparse path against autograd through the dense expansion
    g = randn(gen, B, L, d)
    y.backward(g)
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    dense_in = [a.clone().requires_grad_() for a in a_list]
    (_dense_clt(dense_in, model) * g).sum().backward()
    for n, p in model.named_parameters():
        if p.grad is not None:
            assert_close(grads[n], p.grad, 1e-10, f"d{n}")
    for s in range(L):
        c = codes[s]
        assert_close(c.value.grad, dense_in[s].grad[c.row_ids(), c.index.long()], 1e-10, f"dvalue[{s}]")


# ------------------------------------------------------------------ losses
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


def test_auxk_select_only_dead_and_exact(gen):
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
        (fastclt.CrossLayerTranscoder(fastclt.CLTConfig(n_layers=3, d_in=6, d_out=5, n_features=24, activation="batchtopk",
                                                        k=2, skip_connection=True)),
         torch.randn(16, 3, 6), torch.randn(16, 3, 5), torch.rand(3, 24) > 0.5),
    ]:
        out = model.loss(x, y, dead_mask=dead)
        model.zero_grad()
        out.parts["auxk"].backward()
        assert float(out.parts["auxk"]) > 0
        assert model.b_dec.grad is None or model.b_dec.grad.abs().max() == 0
        g_enc = model.W_enc.grad.reshape(-1, model.W_enc.shape[-1]).abs().sum(-1).reshape(dead.shape)
        assert (g_enc[dead] > 0).any(), "AuxK must reach the dead encoder rows"
        assert (g_enc[~dead] == 0).all(), "AuxK must touch only dead encoder rows"
        if hasattr(model, "W_skip"):
            assert model.W_skip.grad is None or model.W_skip.grad.abs().max() == 0


def test_auxk_loss_formula(gen):
    B, d, k_aux = 10, 4, 3
    y = randn(gen, B, d)
    resid = randn(gen, B, d)
    e_hat = randn(gen, B, d)
    got = ops.auxk_loss(e_hat, resid, y, n_dead=2, k_aux=k_aux)
    ref = min(2 / k_aux, 1) * ((e_hat - resid) ** 2).sum() / ((y - y.mean(0)) ** 2).sum()
    assert_close(got, ref, 1e-6)
