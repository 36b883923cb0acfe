"""Matryoshka ops: the op prefix_errors (fastclt/ops/{reference,ext}/matryoshka.py) on every
implementation against the formed prefixes in float64 (every gradient, and only some; a shared and a
per-token base; odd sizes; NaN-poisoned outputs; dtypes the kernel does not take; bad input; the
C++ ops under opcheck), and the prefix decodes composed of the dispatched decodes
(fastclt/ops/prefix_decode.py: split_codes, matryoshka_decode, matryoshka_clt_decode) on every
decode implementation (the dense formulation's block GEMMs included) against dense float64 math."""
import pytest
import torch

from _impls import GPU, device_of, impl_params
from _matryoshka_cases import PREFIXES, dense_prefixes, random_codes, to_device
from _util import assert_close
from fastclt import _ext, ops
from fastclt.codes import SparseCodes
from fastclt.ops import _registry

NEED_CPU = pytest.mark.skipif(not _registry.available("cpu", torch.device("cpu")), reason=_ext.missing_message("cpu"))
NEED_TRITON = pytest.mark.skipif(not _registry.available("triton", torch.device("cuda" if GPU else "cpu")),
                                 reason="triton is not available here")
BACKENDS = ["reference", "dense", pytest.param("cpu", marks=NEED_CPU), pytest.param("triton", marks=NEED_TRITON)]


def test_split_codes_puts_each_feature_block_in_its_rows(gen):
    B, F = 9, 20
    codes = random_codes(B, F, gen)
    v = codes.value.clone().requires_grad_(True)
    split = ops.split_codes(SparseCodes(codes.row_ptr, codes.index, v, F), [0, *PREFIXES])
    assert split.batch_size == 4 * B and split.n_features == F
    dense, got = codes.to_dense(), split.to_dense().view(4, B, F)
    for g, (lo, hi) in enumerate(zip([0, *PREFIXES], PREFIXES)):
        want = torch.zeros_like(dense)
        want[:, lo:hi] = dense[:, lo:hi]
        assert torch.equal(got[g], want), g
    w = torch.randn(split.nnz, generator=gen)
    (split.value * w).sum().backward()
    assert torch.equal(v.grad.sort().values, w.sort().values)  # a permutation of the entries
    with pytest.raises(ValueError, match="bounds"):
        ops.split_codes(codes, [0, 8, 8, 20])


# Triton under the interpreter is slow: its untied and tied (with affine) kernels, not every tying
TYINGS = (("none", False), ("per_source", False), ("per_target", True))
CLT_CASES = ([("reference", *t) for t in TYINGS] + [pytest.param("cpu", *t, marks=NEED_CPU) for t in TYINGS]
             + [("dense", *t) for t in (*TYINGS, ("per_source", True))]
             + [pytest.param("triton", *t, marks=NEED_TRITON) for t in (TYINGS[0], TYINGS[2])])


@pytest.mark.parametrize("impl,tying,affine", CLT_CASES)
def test_clt_prefix_decodes_match_dense_math(impl, tying, affine, gen, poisoned):
    B, L, F, d = 7, 3, 20, 11
    codes = [random_codes(B, F, gen) for _ in range(L)]
    W = ([torch.randn(F, L - s, d, generator=gen) for s in range(L)] if tying == "none"
         else torch.randn(L, F, d, generator=gen))
    b = torch.randn(L, d, generator=gen)
    off = torch.randn(L, F, generator=gen) * 0.3 if affine else None
    sc = torch.rand(L, F, generator=gen) + 0.5 if affine else None
    up = torch.randn(len(PREFIXES), B, L, d, generator=gen, dtype=torch.float64)

    def run(dtype, fn, dev=torch.device("cpu")):
        vals = [c.value.to(dev, dtype).clone().requires_grad_(True) for c in codes]
        Ws = [w.to(dev, dtype).clone().requires_grad_(True) for w in W] if tying == "none" else \
            W.to(dev, dtype).clone().requires_grad_(True)
        rest = [None if t is None else t.to(dev, dtype).clone().requires_grad_(True) for t in (b, off, sc)]
        y = fn([to_device(c, dev, v) for c, v in zip(codes, vals)], Ws, rest)
        (y.double() * up.to(dev)).sum().backward()
        leaves = vals + (Ws if tying == "none" else [Ws]) + [t for t in rest if t is not None]
        return [y.detach()] + [t.grad for t in leaves]

    want = run(torch.float64, lambda cs, Ws, rest: dense_prefixes([c.to_dense() for c in cs], Ws, tying, *rest))
    got = run(torch.float32, lambda cs, Ws, rest: ops.matryoshka_clt_decode(cs, Ws, tying, PREFIXES, *rest, impl=impl),
              device_of(impl))
    for i, (o, w) in enumerate(zip(got, want)):
        assert_close(o, w, 2e-6, f"{impl} {tying} output/grad {i}")


@pytest.mark.parametrize("impl", BACKENDS)
def test_sae_prefix_decodes_match_dense_math(impl, gen, poisoned):
    B, F, d = 9, 20, 13
    codes = random_codes(B, F, gen)
    W, b = torch.randn(F, d, generator=gen), torch.randn(d, generator=gen)
    up = torch.randn(len(PREFIXES), B, d, generator=gen, dtype=torch.float64)
    outs = {}
    for name, dtype in (("want", torch.float64), ("got", torch.float32)):
        dev = device_of(impl) if name == "got" else torch.device("cpu")
        v, Wl, bl = (t.to(dev, dtype).clone().requires_grad_(True) for t in (codes.value, W, b))
        c = to_device(codes, dev, v)
        if name == "want":
            y = dense_prefixes([c.to_dense()], [Wl.unsqueeze(1)], "none", bl[None], None, None)[:, :, 0]
        else:
            y = ops.matryoshka_decode(c, Wl, PREFIXES, bl, impl=impl)
        (y.double() * up.to(dev)).sum().backward()
        outs[name] = [y.detach(), v.grad, Wl.grad, bl.grad]
    for i, (o, w) in enumerate(zip(outs["got"], outs["want"])):
        assert_close(o, w, 2e-6, f"{impl} output/grad {i}")


def test_prefix_errors_match_explicit_prefixes(gen):
    """The fused squared errors and their gradients equal those of the formed prefixes (float64),
    for a broadcast bias and for a per-token base (bias + skip term)."""
    G, B, L, d = 4, 6, 2, 5
    for base_shape in ((L, d), (B, L, d)):
        y, base, blocks = (torch.randn(*s, generator=gen, dtype=torch.float64, requires_grad=True)
                           for s in ((B, L, d), base_shape, (G, B, L, d)))
        w = torch.randn(G, L, generator=gen, dtype=torch.float64)
        sq, y_hat = ops.prefix_errors(y, base, blocks)
        (sq * w).sum().backward()
        got = [sq.detach(), y.grad, base.grad, blocks.grad]
        for t in (y, base, blocks):
            t.grad = None
        prefixes = ops.prefix_sums(blocks, base)
        want_sq = (y - prefixes).pow(2).sum(-1).sum(1)
        (want_sq * w).sum().backward()
        for i, (o, e) in enumerate(zip(got, [want_sq.detach(), y.grad, base.grad, blocks.grad])):
            assert_close(o, e, 1e-12, f"base {base_shape} {i}")
        assert torch.allclose(y_hat, prefixes[-1].detach()) and not y_hat.requires_grad


@pytest.mark.parametrize("impl,device", impl_params("prefix_errors", reference=True))
def test_prefix_errors_on_every_backend_match_the_formed_prefixes(impl, device, gen, poisoned):
    """prefix_errors of each implementation against the formed prefixes in float64: odd sizes (d not
    a multiple of 8, more tokens than one chunk of the C++ token sums), a bias shared by the tokens
    ([d], [L, d], [1, L, d]) and a per-token base; every gradient, and only some of them."""
    G, B, L, d = 4, 37, 3, 21
    for base_shape in ((d,), (L, d), (1, L, d), (B, L, d)):
        y, base, blocks = (torch.randn(*s, generator=gen).to(device) for s in ((B, L, d), base_shape, (G, B, L, d)))
        w = torch.randn(G, L, generator=gen, dtype=torch.float64).to(device)
        y64, base64, blocks64 = (t.double().requires_grad_(True) for t in (y, base, blocks))
        want_sq = (y64 - ops.prefix_sums(blocks64, base64)).pow(2).sum(-1).sum(1)
        (want_sq * w).sum().backward()
        for grads in ((True, True, True), (False, False, True), (True, False, False)):
            leaves = [t.clone().requires_grad_(g) for t, g in zip((y, base, blocks), grads)]
            sq, y_hat = ops.prefix_errors(*leaves, impl=impl)
            assert sq.shape == (G, L) and sq.dtype == torch.float32 and not y_hat.requires_grad
            assert_close(sq, want_sq, 1e-5, f"{impl} sq, base {base_shape}")
            assert_close(y_hat, ops.prefix_sums(blocks64, base64)[-1], 1e-5, f"{impl} y_hat")
            (sq * w.float()).sum().backward()
            wants = (y64.grad, base64.grad, blocks64.grad)
            for leaf, want, g, name in zip(leaves, wants, grads, ("y", "base", "blocks")):
                if g:
                    assert_close(leaf.grad, want, 1e-5, f"{impl} d{name}, base {base_shape}")
                else:
                    assert leaf.grad is None
    # an SAE's y [B, 1, d] with b_dec [d]; and dtypes the kernels do not take go to the reference
    y, b = torch.randn(9, 1, 8, generator=gen).to(device), torch.randn(8, generator=gen).to(device)
    blocks = torch.randn(2, 9, 1, 8, generator=gen).to(device)
    for dtype in (torch.float32, torch.float64):
        sq, _ = ops.prefix_errors(y.to(dtype), b.to(dtype), blocks.to(dtype), impl=impl)
        assert sq.dtype == dtype
        assert_close(sq, (y.double() - ops.prefix_sums(blocks.double(), b.double())).pow(2).sum((1, 3)), 1e-5, "SAE")
    with pytest.raises(ValueError, match="base: expected a shape that broadcasts"):
        ops.prefix_errors(y, torch.zeros(3, device=device), blocks, impl=impl)
    with pytest.raises(ValueError, match="blocks: expected"):
        ops.prefix_errors(y, b, blocks[:, :4], impl=impl)


def test_opcheck_of_the_cpu_prefix_error_ops(gen):
    if not _ext.has_cpu_ext():
        pytest.skip(_ext.missing_message("cpu"))
    y, base, blocks = torch.randn(5, 2, 9, generator=gen), torch.randn(2, 9, generator=gen), \
        torch.randn(3, 5, 2, 9, generator=gen)
    utils = ("test_schema", "test_autograd_registration", "test_faketensor")
    torch.library.opcheck(torch.ops.fastclt.prefix_errors_forward, (y, base, blocks), test_utils=utils)
    torch.library.opcheck(torch.ops.fastclt.prefix_errors_backward,
                          (y, base, blocks, torch.randn(3, 2, generator=gen), True, True, False), test_utils=utils)
    with pytest.raises(RuntimeError, match="blocks must be"):
        torch.ops.fastclt.prefix_errors_forward(y, base, blocks[:, :4].contiguous())
    with pytest.raises(RuntimeError, match="must be float32"):
        torch.ops.fastclt.prefix_errors_forward(y.double(), base, blocks)


@pytest.mark.parametrize("impl,device", impl_params("prefix_errors", reference=True))
def test_prefix_errors_of_bf16_decodes_with_fp32_targets(impl, device, gen, poisoned):
    """bf16 blocks and base (decodes under autocast) with fp32 targets: read as fp32 by every
    implementation, ŷ in the blocks' dtype, gradients in each input's dtype."""
    y = torch.randn(7, 2, 5, generator=gen).to(device)
    base = torch.randn(2, 5, generator=gen).bfloat16().to(device).requires_grad_(True)
    blocks = torch.randn(3, 7, 2, 5, generator=gen).bfloat16().to(device).requires_grad_(True)
    sq, y_hat = ops.prefix_errors(y, base, blocks, impl=impl)
    want = (y.double() - ops.prefix_sums(blocks.detach().double(), base.detach().double())).pow(2).sum(-1).sum(1)
    assert sq.dtype == torch.float32 and y_hat.dtype == torch.bfloat16
    assert_close(sq, want, 1e-5, f"{impl} sq")
    sq.sum().backward()
    assert blocks.grad.dtype == torch.bfloat16 and base.grad.dtype == torch.bfloat16
    assert torch.isfinite(blocks.grad).all() and torch.isfinite(base.grad).all()
