"""TopK, BatchTopK and BatchTopK across layers (fastclt/ops/{reference,ext}/select.py) on one device:
the reference against brute force, and every kernel implementation against brute force in float64
(ties to the lowest index: the kernels' rule), the reference op, and in its backward, with
NaN-poisoned outputs, adversarial inputs (ties, ±Inf, sorted data, one hot row or column), odd
sizes and every dtype the kernel takes. Selections over features sharded across ranks:
tests/ops/test_sharded.py."""
from __future__ import annotations

import pytest
import torch

from _impls import impl_params, takes
from _select_cases import DTYPES, brute_batch_topk_mask, brute_topk_mask, check_codes_wellformed, kept_mask, make_h
from fastclt import ops
from fastclt.ops.reference import select as reference


def randn(gen, *shape, dtype=torch.float64):
    return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)


# ------------------------------------------------------------------------- the reference
@pytest.mark.parametrize("B,F,k", [(5, 37, 1), (8, 37, 5), (3, 12, 12), (1, 1001, 17)])
def test_reference_topk_brute_force(gen, B, F, k):
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
def test_reference_batch_topk_exact_count_and_set(gen, B, F, k):
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


def test_reference_batch_topk_layers(gen):
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


# ------------------------------------------------------- every implementation vs the reference
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("op", ["topk", "batch_topk", "batch_topk_layers"])
@pytest.mark.parametrize("impl,device", impl_params("topk", reference=True))
def test_every_implementation_equals_the_reference(impl, device, op, dtype, gen, poisoned):
    """Continuous random h (no ties; bf16 ties are covered against brute force below): the same kept
    set, values and gradient as the reference, for every implementation of the op (a dtype a kernel
    does not take runs the reference)."""
    shape = (3, 16, 129) if op == "batch_topk_layers" else (32, 129)
    h = randn(gen, *shape, dtype=dtype).to(device).requires_grad_()
    h_ref = h.detach().clone().requires_grad_()
    got, want = getattr(ops, op)(h, 6, impl=impl), getattr(ops, op)(h_ref, 6, impl="reference")
    got, want = (got, want) if op == "batch_topk_layers" else ([got], [want])
    up = randn(gen, *shape).to(device)
    for l, (a, b) in enumerate(zip(got, want)):
        assert a.value.dtype == dtype and torch.equal(a.to_dense(129), b.to_dense(129)), (op, l)
    sum((c.to_dense(129).double() * (up[l] if op == "batch_topk_layers" else up)).sum()
        for l, c in enumerate(got)).backward()
    sum((c.to_dense(129).double() * (up[l] if op == "batch_topk_layers" else up)).sum()
        for l, c in enumerate(want)).backward()
    assert torch.equal(h.grad, h_ref.grad)


# ---------------------------------------------------------- kernels against brute force
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,F,k,kind", [
    (7, 37, 5, "randn"), (5, 1001, 32, "randn"), (4, 37, 1, "randn"), (4, 37, 37, "randn"),
    (6, 40, 9, "ties"), (3, 16, 4, "equal"), (5, 23, 6, "negative"), (6, 45, 12, "inf"),
    (0, 37, 3, "randn"), (3, 300, 100, "randn"), (5, 64, 10, "negties"),
    # k * 16 <= F: the block-maximum bound and filter (csrc/cpu/select_cpu.cpp topk_row)
    (4, 600, 8, "ties"), (3, 512, 4, "equal"), (4, 777, 6, "inf"), (5, 640, 10, "negties"),
    (3, 1003, 7, "ascending"), (3, 999, 5, "descending"), (6, 500, 3, "hotrow"), (2, 4099, 256, "randn"),
    (3, 8209, 80, "ties"),  # more blocks per row than the candidate scan lists at a time
])
@pytest.mark.parametrize("impl,device", impl_params("topk"))
def test_topk_forward(impl, device, B, F, k, kind, dtype, poisoned):
    takes("topk", impl, dtype)
    h = make_h(B, F, dtype, device, kind)
    codes = ops.topk(h, k, impl=impl)
    check_codes_wellformed(codes, B, F)
    assert codes.k == k and codes.nnz == B * k
    idx = codes.index.view(B, k).cpu()
    assert bool((idx[:, 1:] > idx[:, :-1]).all()), "indices must be ascending and distinct per row"
    mask = brute_topk_mask(h.cpu(), k)
    assert torch.equal(kept_mask(codes, B, F), mask)
    expected = torch.where(mask, h.cpu().float().clamp_min(0), torch.zeros(()))
    assert torch.equal(codes.to_dense(F).cpu().float(), expected)
    assert codes.value.dtype == dtype


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("op", ["topk", "batch_topk"])
@pytest.mark.parametrize("impl,device", impl_params("topk"))
def test_select_backward(impl, device, op, dtype, poisoned):
    """dh = dvalue at the kept entries where h > 0, zero elsewhere (ties in h)."""
    takes(op, impl, dtype)
    B, F, k = (9, 101, 7) if op == "topk" else (12, 53, 4)
    h = make_h(B, F, dtype, device, "ties", seed=3).requires_grad_()
    G = torch.randn(B, F).to(dtype).to(device)
    (getattr(ops, op)(h, k, impl=impl).to_dense(F) * G).sum().backward()
    kept = brute_topk_mask(h.detach().cpu(), k) if op == "topk" else brute_batch_topk_mask(h.detach().cpu(), k * B)
    mask = kept & (h.detach().cpu() > 0)
    assert torch.equal(h.grad.cpu(), torch.where(mask, G.cpu(), torch.zeros((), dtype=dtype)))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,F,k,kind", [
    (8, 37, 5, "randn"), (16, 1001, 8, "randn"), (4, 37, 1, "randn"), (4, 37, 37, "randn"),
    (6, 40, 9, "ties"), (3, 16, 4, "equal"), (5, 23, 6, "negative"), (6, 45, 12, "inf"), (0, 37, 3, "randn"),
    (7, 50, 9, "negties"),
    # k*B * 16 <= numel: the block-maximum bound and filter, blocks of 64 and less (select_cpu.cpp)
    (8, 400, 3, "ties"), (6, 160, 1, "equal"), (9, 333, 2, "inf"), (7, 500, 4, "negties"),
    (10, 321, 3, "ascending"), (10, 321, 3, "descending"), (12, 250, 5, "hotrow"), (64, 2053, 32, "randn"),
    (4, 37, 12, "ties"), (5, 200, 20, "negties"),  # blocks of 1 and 2 entries
    (64, 129, 4, "ties"), (64, 129, 4, "randn"),  # the demo's k_total = numel / 32: blocks of 8
])
@pytest.mark.parametrize("impl,device", impl_params("batch_topk"))
def test_batch_topk_forward(impl, device, B, F, k, kind, dtype, poisoned):
    takes("batch_topk", impl, dtype)
    h = make_h(B, F, dtype, device, kind)
    codes = ops.batch_topk(h, k, impl=impl)
    check_codes_wellformed(codes, B, F)
    assert codes.nnz == k * B and codes.n_features == F
    mask = brute_batch_topk_mask(h.cpu(), k * B)
    assert torch.equal(kept_mask(codes, B, F), mask)
    expected = torch.where(mask, h.cpu().float().clamp_min(0), torch.zeros(()))
    assert torch.equal(codes.to_dense(F).cpu().float(), expected)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("L,B,F,k,kind", [(3, 8, 37, 5, "randn"), (2, 5, 40, 7, "ties"), (4, 0, 11, 2, "randn"),
                                          (3, 9, 400, 4, "hotrow"), (2, 6, 513, 3, "ties")])
@pytest.mark.parametrize("impl,device", impl_params("batch_topk_layers"))
def test_batch_topk_layers(impl, device, L, B, F, k, kind, dtype, poisoned):
    takes("batch_topk_layers", impl, dtype)
    h = torch.stack([make_h(B, F, dtype, device, kind, seed=s) for s in range(L)])
    h.requires_grad_()
    codes = ops.batch_topk_layers(h, k, impl=impl)
    assert len(codes) == L and sum(c.nnz for c in codes) == k * B * L
    for c in codes:
        check_codes_wellformed(c, B, F)
    mask = brute_batch_topk_mask(h.detach().cpu(), k * B * L)
    got = torch.stack([kept_mask(c, B, F) for c in codes])
    assert torch.equal(got, mask)
    G = torch.randn(L, B, F).to(dtype).to(device)
    sum((c.to_dense(F) * G[i]).sum() for i, c in enumerate(codes)).backward()
    live = mask & (h.detach().cpu() > 0)
    assert torch.equal(h.grad.cpu(), torch.where(live, G.cpu(), torch.zeros((), dtype=dtype)))


@pytest.mark.parametrize("impl,device", impl_params("topk"))
def test_kernels_match_the_reference_op(impl, device):
    h = make_h(16, 257, torch.float32, device)
    assert torch.equal(ops.topk(h, 11, impl=impl).to_dense(257), reference.topk(h, 11).to_dense(257))
    h = make_h(32, 129, torch.float32, device)
    assert torch.equal(ops.batch_topk(h, 6, impl=impl).to_dense(129), reference.batch_topk(h, 6).to_dense(129))
    hl = torch.randn(3, 16, 129, device=device)
    ours = ops.batch_topk_layers(hl, 6, impl=impl)
    ref = reference.batch_topk_layers(hl, 6)
    for a, b in zip(ours, ref):
        assert torch.equal(a.to_dense(129), b.to_dense(129))


# ------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("impl,device", impl_params("topk"))
def test_nan_input_is_an_error(impl, device):
    h = torch.randn(4, 37, device=device)
    h[2, 5] = float("nan")
    with pytest.raises((RuntimeError, ValueError), match="NaN"):
        ops.topk(h, 3, impl=impl)
    with pytest.raises((RuntimeError, ValueError), match="NaN"):
        ops.batch_topk(h, 3, impl=impl)
    with pytest.raises((RuntimeError, ValueError), match="NaN"):
        ops.batch_topk_layers(h.view(1, 4, 37), 3, impl=impl)
    # the filter paths (k * 16 <= F), a NaN of either sign, last entry of a partial block
    for nan in (float("nan"), -float("nan")):
        big = torch.randn(5, 1001, device=device)
        big[4, 1000] = nan
        for dtype in DTYPES:
            with pytest.raises(ValueError, match="h contains NaN"):
                ops.batch_topk(big.to(dtype), 3, impl=impl)
            with pytest.raises((RuntimeError, ValueError), match="NaN"):
                ops.topk(big.to(dtype), 3, impl=impl)


@pytest.mark.parametrize("impl,device", impl_params("topk", reference=True))
def test_bad_input(impl, device):
    """The entry points check once, for every implementation: k, and h's type and rank."""
    h = torch.randn(4, 37, device=device)
    for k in (0, 38, -1):
        with pytest.raises(ValueError, match="k: expected"):
            ops.batch_topk(h, k, impl=impl)
        with pytest.raises(ValueError, match=rf"k: expected 1 <= k <= n_features=37, got {k}"):
            ops.topk(h, k, impl=impl)
    with pytest.raises(TypeError, match="k: expected an int"):
        ops.topk(h, 2.0, impl=impl)
    with pytest.raises(ValueError, match=r"h: expected \[B, F\]"):
        ops.topk(h.view(2, 2, 37), 3, impl=impl)
    with pytest.raises(TypeError, match="h: expected a floating-point"):
        ops.batch_topk(h.int(), 3, impl=impl)
    with pytest.raises(ValueError, match=r"h: expected \[L, B, F\]"):
        ops.batch_topk_layers(h, 3, impl=impl)
