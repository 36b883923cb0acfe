"""The training statistics of a batch's codes (``ops.code_stats``: fastclt/ops/reference/stats.py and
the C++ kernel of csrc/cpu/sparse_cpu.cpp) on every implementation, against a plain per-entry loop in
float64, with NaN-poisoned outputs; its bad input; and the models' fired / L0 / cut statistics read
from it."""
import math

import pytest
import torch

import fastclt
from _impls import impl_params, takes
from fastclt import ops
from fastclt.codes import SparseCodes


def _codes(gen, B: int, F: int, nnz_per_row: int, dtype, *, special: bool = False) -> SparseCodes:
    """CSR codes of B rows with up to nnz_per_row distinct features each (some rows empty), values of
    both signs (zeros too; with ``special``: -0.0, NaN, +inf among them)."""
    counts = torch.randint(0, nnz_per_row + 1, (B,), generator=gen)
    counts[::7] = 0
    row_ptr = torch.zeros(B + 1, dtype=torch.int64)
    row_ptr[1:] = counts.cumsum(0)
    index = torch.cat([torch.randperm(F, generator=gen)[:int(n)].sort().values for n in counts]
                      or [torch.zeros(0, dtype=torch.int64)]).int()
    value = torch.randn(index.shape[0], generator=gen, dtype=torch.float64)
    value[torch.rand(index.shape[0], generator=gen) < 0.1] = 0.0
    if special and index.shape[0] >= 4:
        value[:4] = torch.tensor([-0.0, float("nan"), float("inf"), 1e-30], dtype=torch.float64)
    return SparseCodes(row_ptr, index, value.to(dtype), F)


def _on(c: SparseCodes, device) -> SparseCodes:
    return SparseCodes(c.row_ptr.to(device), c.index.to(device), c.value.to(device), c.n_features)


def _want(codes: list, F: int) -> tuple:
    """(fmin [L, F] float64, active [L]) by a loop over the entries."""
    fmin = torch.full((len(codes), F), math.inf, dtype=torch.float64)
    active = []
    for l, c in enumerate(codes):
        n = 0
        for f, v in zip(c.index.tolist(), c.value.double().tolist()):
            if v > 0:
                n += 1
                fmin[l, f] = min(fmin[l, f].item(), v)
        active.append(n)
    return fmin, torch.tensor(active)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("L,B,F,k", [(1, 33, 37, 5), (3, 65, 1031, 9), (4, 1, 7, 7), (2, 0, 5, 1),
                                     (3, 4099, 3001, 40)])  # the last: above the parallel size
@pytest.mark.parametrize("impl,device", impl_params("code_stats", reference=True))
def test_code_stats_every_impl(impl, device, L, B, F, k, dtype, poisoned):
    """fmin and the active counts equal a per-entry loop: the smallest value > 0 of each feature,
    +inf where none; -0.0, zeros and NaN are not active, +inf is; odd sizes, empty rows and layers,
    no rows at all."""
    takes("code_stats", impl, dtype)
    gen = torch.Generator().manual_seed(41 + L + B)
    codes = [_codes(gen, B, F, k, dtype, special=(l == 0)) for l in range(L)]
    want_fmin, want_active = _want(codes, F)
    fmin, active = ops.code_stats([_on(c, device) for c in codes], F, impl=impl)
    assert fmin.shape == (L, F) and fmin.dtype == torch.float32
    assert active.shape == (L,) and active.dtype == torch.int64
    assert torch.equal(fmin.cpu(), want_fmin.float()), (fmin, want_fmin)
    assert torch.equal(active.cpu(), want_active)


@pytest.mark.parametrize("impl,device", impl_params("code_stats", reference=True))
def test_code_stats_bad_input(impl, device):
    """The arguments are named; an index past n_features is refused by every implementation."""
    gen = torch.Generator().manual_seed(5)
    c = _on(_codes(gen, 9, 11, 3, torch.float32), device)
    with pytest.raises(ValueError, match="codes: expected a non-empty sequence"):
        ops.code_stats([], 11, impl=impl)
    with pytest.raises(ValueError, match="codes: expected a non-empty sequence"):
        ops.code_stats(c, 11, impl=impl)
    with pytest.raises(TypeError, match=r"codes\[1\]: expected SparseCodes"):
        ops.code_stats([c, c.value], 11, impl=impl)
    with pytest.raises(ValueError, match=r"codes\[0\]: has n_features=11, expected 12"):
        ops.code_stats([c], 12, impl=impl)
    with pytest.raises(ValueError, match="n_features: expected an int >= 0"):
        ops.code_stats([c], -1, impl=impl)
    bad = SparseCodes(c.row_ptr, c.index.clone(), c.value, None)
    bad.index[-1] = 11
    with pytest.raises((RuntimeError, IndexError), match="index"):
        ops.code_stats([bad], 11, impl=impl)


@pytest.mark.parametrize("impl", ["reference", "cpu"])
def test_model_statistics_from_code_stats(impl):
    """A BatchTopK CLT's fired features, L0 and cut statistics come out the same on the reference and
    the kernel, and agree with the codes: fired = a feature with an entry > 0, L0 = entries > 0 per
    token, the running per-feature cut sum adds each fired feature's smallest kept value."""
    if impl == "cpu" and not fastclt._ext.has_cpu_ext():
        pytest.skip(fastclt._ext.missing_message("cpu"))
    torch.manual_seed(3)
    model = fastclt.CrossLayerTranscoder(fastclt.CLTConfig(n_layers=3, d_in=16, d_out=16, n_features=40,
                                                           activation="batchtopk", k=4))
    model.train()
    model.impl = impl
    x = torch.randn(50, 3, 16)
    out = model.loss(x, x)
    fmin, active = _want(out.codes, 40)
    assert torch.equal(out.fired, torch.isfinite(fmin))
    assert torch.equal(out.per_layer["l0"], active.float() / 50)
    assert torch.equal(model.feature_cut_count, torch.isfinite(fmin).long())
    assert torch.equal(model.feature_cut_sum, torch.where(torch.isfinite(fmin), fmin, 0.0).float())


def test_code_stats_kernel_opcheck():
    """The registered fake of fastclt::code_stats agrees with the C++ kernel (shapes, dtypes, schema)."""
    if not fastclt._ext.has_cpu_ext():
        pytest.skip(fastclt._ext.missing_message("cpu"))
    gen = torch.Generator().manual_seed(9)
    codes = [_codes(gen, 13, 29, 4, torch.float32, special=True), _codes(gen, 13, 29, 4, torch.float32)]
    torch.library.opcheck(torch.ops.fastclt.code_stats, ([c.index for c in codes], [c.value for c in codes], 29))
