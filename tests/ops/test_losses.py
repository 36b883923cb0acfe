"""The losses (fastclt/ops/reference/losses.py; reference only): MSE and FVU, the sparsity penalty
with the concatenated decoder norm, the pre-activation loss, the AuxK loss — against dense float64."""
import pytest
import torch

import fastclt
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
