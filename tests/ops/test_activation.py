"""ReLU and JumpReLU (fastclt/ops/reference/activation.py; the reference is their only
implementation): the dense straight-through JumpReLU against its formulas and finite differences,
sparse JumpReLU codes keeping the threshold band, ReLU codes; every registered implementation."""
import math

import pytest
import torch

from _impls import impl_params
from _util import assert_close
from fastclt import ops


def randn(gen, *shape, dtype=torch.float64):
    return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)


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
    central finite difference of the empirical mean over a large sample (docs/DESIGN.md §3)."""
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


@pytest.mark.parametrize("impl,device", impl_params("jumprelu", reference=True))
def test_jumprelu_bad_input(impl, device):
    h = torch.randn(4, 9, device=device)
    with pytest.raises(ValueError, match="bandwidth"):
        ops.jumprelu(h, torch.zeros(9, device=device), 0.0, impl=impl)
    with pytest.raises(ValueError, match="threshold"):
        ops.jumprelu(h, torch.zeros(8, device=device), 0.1, impl=impl)
    with pytest.raises(ValueError, match=r"h: expected \[B, F\]"):
        ops.relu(h[0], impl=impl)
