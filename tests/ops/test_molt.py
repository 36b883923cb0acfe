"""molt_decode (fastclt/ops/{reference,triton,ext}/molt.py) and molt_norms: every implementation
against dense float64 math built from the definition (tests/_molt_cases.py: every A_i = U_i V_i
formed explicitly) — forward and every gradient (gates, x, U, V, b_dec); odd sizes, empty rows, an
empty rank group, unused and hot transforms, NaN-poisoned outputs, bf16 (and fp16 where taken),
B = 0 entries, partial gradients, fp64 routed to the reference, bad input; the C++ ops under
opcheck. On a GPU also a real size (several tiles and column blocks)."""
import pytest
import torch

from _impls import GPU, impl_params, takes
from _molt_cases import GROUPS, NAMES, dense_A, dense_molt, molt_inputs, run_molt
from _util import assert_close
from fastclt import _ext, ops
from fastclt.codes import SparseCodes
from fastclt.ops.reference.molt import molt_decode as ref_molt

ALL = impl_params("molt_decode", reference=True)
KERNELS = impl_params("molt_decode")
# (B, d_in, d_out): odd sizes; on a GPU also a real-sized one
SIZES = [(11, 13, 9), (3, 1, 70)] + ([(1031, 771, 389)] if GPU else [])


@pytest.mark.parametrize("impl,device", ALL)
@pytest.mark.parametrize("kind", ["csr", "hot"])
@pytest.mark.parametrize("size", SIZES)
def test_molt_decode_matches_dense_math(impl, device, kind, size, gen, poisoned):
    B, d_in, d_out = size
    codes, x, U, V, b = molt_inputs(gen, B, d_in, d_out, kind=kind)
    up = torch.randn(x.shape[0], U.shape[1], generator=gen, dtype=torch.float64)
    want = dense_molt(codes, x, U, V, b, up)
    got = run_molt(lambda *a: ops.molt_decode(*a, impl=impl), codes, x, U, V, b, up, device=torch.device(device))
    for name, o, w in zip(NAMES, got, want):
        assert torch.isfinite(o).all(), f"{impl} {kind} {name}: unwritten (NaN) elements"
        assert_close(o, w, 2e-5, f"{impl} {kind} {name}")


@pytest.mark.parametrize("impl,device", KERNELS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_molt_decode_16_bit(impl, device, dtype, gen, poisoned):
    """bf16 / fp16 x, U, V (fp32 gates): within 16-bit rounding of the fp64 math."""
    takes("molt_decode", impl, dtype)
    codes, x, U, V, b = molt_inputs(gen)
    up = torch.randn(x.shape[0], U.shape[1], generator=gen, dtype=torch.float64)
    want = dense_molt(codes, x.to(dtype), U.to(dtype), V.to(dtype), b.to(dtype), up)

    def fn(c, x_, U_, V_, groups, b_):
        return ops.molt_decode(SparseCodes(c.row_ptr, c.index, c.value.float(), c.n_features), x_, U_, V_, groups, b_,
                               impl=impl)
    got = run_molt(fn, codes, x, U, V, b, up, dtype=dtype, device=torch.device(device))
    assert got[0].dtype == dtype and got[3].dtype == dtype
    for name, o, w in zip(NAMES, got, want):
        assert_close(o, w, 4e-2, f"{impl} {dtype} {name}")


@pytest.mark.parametrize("impl,device", KERNELS)
def test_molt_decode_no_entries_and_only_some_grads(impl, device, gen, poisoned):
    """nnz = 0 gives the bias and zero gradients; frozen U/V/x get no gradient computed."""
    dev = torch.device(device)
    codes, x, U, V, b = molt_inputs(gen, B=5)
    codes = SparseCodes(codes.row_ptr.to(dev), codes.index.to(dev), codes.value.to(dev), 9)
    x, U, V, b = (t.to(dev) for t in (x, U, V, b))
    empty = SparseCodes(torch.zeros(6, dtype=torch.int64, device=dev), codes.index[:0],
                        codes.value[:0].requires_grad_(True), 9)
    Ul = U.clone().requires_grad_(True)
    y = ops.molt_decode(empty, x, Ul, V, GROUPS, b, impl=impl)
    assert torch.equal(y, b.expand(5, -1))
    y.sum().backward()
    assert torch.equal(Ul.grad, torch.zeros_like(U))
    v = codes.value.clone().requires_grad_(True)
    out = ops.molt_decode(SparseCodes(codes.row_ptr, codes.index, v, 9), x, U, V, GROUPS, impl=impl)
    out.pow(2).sum().backward()
    ref_v = codes.value.clone().requires_grad_(True)
    ref_molt(SparseCodes(codes.row_ptr, codes.index, ref_v, 9), x, U, V, GROUPS).pow(2).sum().backward()
    assert_close(v.grad, ref_v.grad, 2e-5, f"{impl} d_gate alone")


@pytest.mark.parametrize("impl,device", KERNELS)
def test_fp64_runs_the_reference(impl, device, gen):
    codes, x, U, V, b = (t.to(device) if isinstance(t, torch.Tensor) else t for t in molt_inputs(gen))
    assert ops.resolve("molt_decode", impl, torch.device(device), torch.float64)[0] == "reference"
    codes = SparseCodes(codes.row_ptr.to(device), codes.index.to(device), codes.value.to(device).double(), 9)
    y = ops.molt_decode(codes, x.double(), U.double(), V.double(), GROUPS, b.double(), impl=impl)
    assert y.dtype == torch.float64


def test_molt_norms_are_the_frobenius_norms_of_the_products(gen):
    R = sum(n * r for n, r in GROUPS)
    U = torch.randn(R, 9, generator=gen, dtype=torch.float64, requires_grad=True)
    V = torch.randn(R, 13, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.randn(9, generator=gen, dtype=torch.float64)
    (ops.molt_norms(U, V, GROUPS) * w).sum().backward()
    got = (U.grad.clone(), V.grad.clone())
    U.grad = V.grad = None
    want = dense_A(U, V, GROUPS).flatten(1).norm(dim=1)
    (want * w).sum().backward()
    assert_close(ops.molt_norms(U, V, GROUPS), want, 1e-12, "norms")
    assert_close(got[0], U.grad, 1e-12, "dU")
    assert_close(got[1], V.grad, 1e-12, "dV")
    Z = torch.zeros(R, 9, dtype=torch.float64, requires_grad=True)  # zero transforms: norm 0, gradient 0 (not NaN)
    ops.molt_norms(Z, V.detach(), GROUPS).sum().backward()
    assert torch.equal(Z.grad, torch.zeros_like(Z))


@pytest.mark.parametrize("impl,device", ALL)
def test_bad_input(impl, device, gen):
    """Checked once by the entry point, the same for every implementation."""
    codes, x, U, V, b = molt_inputs(gen)
    codes = SparseCodes(codes.row_ptr.to(device), codes.index.to(device), codes.value.to(device), 9)
    x, U, V, b = (t.to(device) for t in (x, U, V, b))
    with pytest.raises(ValueError, match="V: expected"):
        ops.molt_decode(codes, x, U, V[:-1], GROUPS, impl=impl)
    with pytest.raises(ValueError, match="x: expected"):
        ops.molt_decode(codes, x[:-1], U, V, GROUPS, impl=impl)
    with pytest.raises(ValueError, match="U: expected"):
        ops.molt_decode(codes, x, U[:-1], V, GROUPS, impl=impl)
    with pytest.raises(ValueError, match="rank_groups"):
        ops.molt_decode(codes, x, U, V, ((2, 0),), impl=impl)
    with pytest.raises(ValueError, match="codes: n_features=9 but rank_groups hold 8"):
        ops.molt_decode(codes, x, U[:-1], V[:-1], ((2, 7), (3, 4), (3, 1)), impl=impl)
    with pytest.raises(ValueError, match="b_dec"):
        ops.molt_decode(codes, x, U, V, GROUPS, b[:-1], impl=impl)
    with pytest.raises(TypeError, match="x, V: expected U's dtype"):
        ops.molt_decode(codes, x.double(), U, V, GROUPS, impl=impl)
    with pytest.raises(TypeError, match="codes"):
        ops.molt_decode((codes.index, codes.value), x, U, V, GROUPS, impl=impl)
    with pytest.raises(ValueError, match="on meta"):
        ops.molt_decode(codes, x, U, V.to("meta"), GROUPS, impl=impl)


def test_opcheck_of_the_cpu_ops(gen):
    if not _ext.has_cpu_ext():
        pytest.skip(_ext.missing_message("cpu"))
    codes, x, U, V, b = molt_inputs(gen)
    ptr = ops.rank_ptr(GROUPS, torch.device("cpu"))
    torch.library.opcheck(torch.ops.fastclt.molt_forward, (codes.row_ptr, codes.index, codes.value, x, U, V, ptr, b),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
    y, h = torch.ops.fastclt.molt_forward(codes.row_ptr, codes.index, codes.value, x, U, V, ptr, b)
    torch.library.opcheck(torch.ops.fastclt.molt_backward,
                          (codes.row_ptr, codes.index, codes.value, x, U, V, ptr, h, torch.randn_like(y), True, True,
                           True, False), test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
    bad = SparseCodes(codes.row_ptr, codes.index.clone(), codes.value, None)
    bad.index[0] = 99
    with pytest.raises(RuntimeError, match="index must lie in"):
        torch.ops.fastclt.molt_forward(bad.row_ptr, bad.index, bad.value, x, U, V, ptr, b)
