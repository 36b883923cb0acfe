"""clt_decode (fastclt/ops/{reference,triton,ext}/clt_decode.py): the reference against the dense
expansion of a model's decoders (float64, every tying, with and without the feature affine), and
every kernel implementation against the reference and independent fp64 dense math — forward and
every gradient (values of every layer, W_dec, b_dec, offset, scale), fp32 and bf16, odd sizes, wide
blocks, partial gradients, one layer, B = 0, NaN-poisoned outputs, determinism, bad input. On a GPU
at real sizes. Backend-only: the Triton decode's hot-feature chunks and layout checks
(tests/ops/triton/test_triton_clt_decode.py)."""
import functools
import zlib

import pytest
import torch

import fastclt
from _decode_cases import AFFINES, check_close, clt_dense64, clt_grad_names, make_clt_inputs, rel_err, run_clt
from _impls import GPU, impl_params
from _util import assert_close
from fastclt import ops
from fastclt.codes import SparseCodes
from fastclt.ops import _registry
from fastclt.ops.reference.clt_decode import clt_decode as ref_clt_decode
from fastclt.ops.reference.clt_decode import feature_affine

KERNELS = impl_params("clt_decode")
# (B, L, F, d, k): odd sizes
SIZE = (1031, 6, 4099, 771, 32) if GPU else (7, 3, 13, 13, 4)
CASES = [("none", None)] + [(t, a) for t in ("per_source", "per_target") for a in AFFINES]
# bf16: every tying, with no affine and with both parts (one-sided affines are covered in fp32)
PARAMS = [(t, a, torch.float32) for t, a in CASES] + [(t, a, torch.bfloat16) for t, a in CASES if a in (None, "both")]


def clt_with(impl):
    return functools.partial(ops.clt_decode, impl=impl)


def randn(gen, *shape):
    return torch.randn(*shape, generator=gen, dtype=torch.float64)


# ------------------------------------------------------------------------- the reference
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
def test_reference_equals_dense_expansion(gen, tying, affine):
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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("with_bias", [False, True])
def test_prefix_sum(gen, dtype, with_bias):
    """prefix_sum (the per_source tying's sum over sources): parts [L, B, d] → [B, L, d], forward = the
    parts added one after another in the accumulation dtype, the bias added last, rounded once;
    backward = the gradient's suffix sums the same way (from a non-contiguous gradient), and the
    bias's gradient its sum over the tokens; fp64 gradcheck."""
    from fastclt.ops.reference.clt_decode import prefix_sum
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    L, B, d = 5, 7, 3
    parts = randn(gen, L, B, d).to(dtype).requires_grad_()
    bias = randn(gen, L, d).to(dtype).requires_grad_() if with_bias else None
    y = prefix_sum(parts * 1, bias)  # a non-leaf, as a decode's output
    assert y.dtype == dtype and y.shape == (B, L, d) and y.is_contiguous()
    want, run = [], None
    for v in parts.detach().to(acc).unbind(0):
        run = v.clone() if run is None else run + v
        want.append(run)
    want = torch.stack(want, 1)
    if with_bias:
        want = want + bias.detach().to(acc)
    assert torch.equal(y, want.to(dtype))
    g = randn(gen, d, L, B).to(dtype).permute(2, 1, 0)  # [B, L, d], non-contiguous
    y.backward(g)
    want, run = [], None
    for v in reversed(g.to(acc).unbind(1)):
        run = v.clone() if run is None else run + v
        want.append(run)
    assert torch.equal(parts.grad, torch.stack(want[::-1]).to(dtype))
    if with_bias:
        assert torch.equal(bias.grad, g.to(acc).sum(0).to(dtype))
    if dtype == torch.float64:
        args = (randn(gen, L, B, d).requires_grad_(),) + ((randn(gen, L, d).requires_grad_(),) if with_bias else ())
        assert torch.autograd.gradcheck(lambda p, *b: prefix_sum(p * 1, *b), args)


# ----------------------------------------------------------------- kernels vs the reference
@pytest.mark.parametrize("tying,affine,dtype", PARAMS)
@pytest.mark.parametrize("impl,device", KERNELS)
def test_forward_backward(impl, device, tying, affine, dtype, poisoned):
    inputs = make_clt_inputs(tying, affine, dtype, SIZE, zlib.crc32(repr((tying, affine, dtype)).encode()), device)
    got = run_clt(clt_with(impl), *inputs[:1], inputs[1], tying, *inputs[2:])
    eager = run_clt(ref_clt_decode, *inputs[:1], inputs[1], tying, *inputs[2:])
    exact = run_clt(clt_dense64, *inputs[:1], inputs[1], tying, *inputs[2:], dtype=torch.float64)
    names = clt_grad_names(tying, SIZE[1], affine)
    assert len(names) == len(got)
    for name, out, e, x in zip(names, got, eager, exact):
        assert out.dtype == e.dtype, f"{name}: dtype {out.dtype} != reference {e.dtype}"
        if dtype == torch.float32:
            check_close(name + " vs fp64", out, x, 1e-5)
            check_close(name + " vs reference", out, e, 1e-5)
        else:  # kernel error vs fp64 at most ~2x the eager bf16 error, plus a floor of one bf16 ulp
            check_close(name + " vs fp64", out, x, 2 * rel_err(e, x) + 2**-8)


@pytest.mark.parametrize("tying,affine", [("none", None), ("per_source", None), ("per_target", "both")])
@pytest.mark.parametrize("impl,device", KERNELS)
def test_wide(impl, device, tying, affine):
    """d = 137: several column blocks per program (and a (L−s)·d = 411 wide untied block)."""
    size = (3, 3, 11, 137, 3)
    inputs = make_clt_inputs(tying, affine, torch.float32, size, zlib.crc32(repr((tying, "wide")).encode()), device)
    got = run_clt(clt_with(impl), inputs[0], inputs[1], tying, *inputs[2:])
    want = run_clt(clt_dense64, inputs[0], inputs[1], tying, *inputs[2:], dtype=torch.float64)
    for name, out, x in zip(clt_grad_names(tying, size[1], affine), got, want):
        check_close(name + " vs fp64", out, x, 1e-5)


# the extension's test cases: codes with explicit zeros and a row without entries in one source
EXT_CASES = [("none", False), ("per_source", False), ("per_source", True), ("per_target", False), ("per_target", True)]
B, L, F, d = 13, 3, 37, 19


def make(tying, affine, dtype, device, seed):
    g = torch.Generator().manual_seed(seed)
    codes = []
    for s in range(L):
        k = 2 + s
        idx = torch.stack([torch.randperm(F, generator=g)[:k] for _ in range(B)]).sort(1).values.to(torch.int32)
        val = torch.rand(B, k, generator=g) + 0.1
        val[0] = 0.0 if s == 1 else val[0]  # explicit zeros: the affine's 1[a > 0] is off there
        c = SparseCodes.from_topk(idx, val, F)
        if s == 2:  # row 3 has no entry in this source
            keep = c.row_ids() != 3
            counts = torch.bincount(c.row_ids()[keep], minlength=B)
            c = SparseCodes(torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)]), c.index[keep],
                            c.value[keep], F)
        codes.append(c)
    if tying == "none":
        W = [torch.randn(F, L - s, d, generator=g) / d ** 0.5 for s in range(L)]
    else:
        W = torch.randn(L, F, d, generator=g) / d ** 0.5
    b = torch.randn(L, d, generator=g) * 0.1
    off = torch.randn(L, F, generator=g) * 0.2 if affine else None
    sc = torch.rand(L, F, generator=g) + 0.5 if affine else None
    up = torch.randn(B, L, d, generator=g, dtype=torch.float64)

    def to(t):
        return None if t is None else t.to(device, dtype)
    codes = [SparseCodes(c.row_ptr.to(device), c.index.to(device), to(c.value), F) for c in codes]
    W = [to(w) for w in W] if tying == "none" else to(W)
    return codes, W, to(b), to(off), to(sc), up.to(device)


def run(fn, tying, codes, W, b, off, sc, up):
    vals = [c.value.detach().clone().requires_grad_(True) for c in codes]
    codes = [SparseCodes(c.row_ptr, c.index, v, F) for c, v in zip(codes, vals)]
    Ws = ([w.detach().clone().requires_grad_(True) for w in W] if tying == "none"
          else W.detach().clone().requires_grad_(True))
    leaves = [None if t is None else t.detach().clone().requires_grad_(True) for t in (b, off, sc)]
    y = fn(codes, Ws, tying, *leaves)
    (y.double() * up).sum().backward()
    grads = {f"value[{s}]": v.grad for s, v in enumerate(vals)}
    for s, w in enumerate(Ws if tying == "none" else [Ws]):
        grads[f"W_dec[{s}]"] = w.grad
    for name, t in zip(("b_dec", "offset", "scale"), leaves):
        if t is not None:
            grads[name] = t.grad
    return y.detach(), grads


@pytest.mark.parametrize("tying,affine", EXT_CASES)
@pytest.mark.parametrize("impl,device", KERNELS)
def test_fp32_matches_reference(impl, device, tying, affine, poisoned):
    inputs = make(tying, affine, torch.float32, device, seed=EXT_CASES.index((tying, affine)))
    y, g = run(clt_with(impl), tying, *inputs)
    ry, rg = run(ref_clt_decode, tying, *inputs)
    assert y.dtype == ry.dtype and y.shape == (B, L, d)
    assert_close(y, ry, 1e-6, "y")
    assert set(g) == set(rg)
    for n in rg:
        assert g[n] is not None, n
        assert_close(g[n], rg[n], 1e-5, f"d{n}")


@pytest.mark.parametrize("tying,affine", EXT_CASES)
@pytest.mark.parametrize("impl,device", KERNELS)
def test_bf16_error_vs_fp64(impl, device, tying, affine):
    """bf16: error against the fp64 reference ≤ 2× eager bf16's + a floor, output and gradients."""
    inputs = make(tying, affine, torch.bfloat16, device, seed=7)
    y, g = run(clt_with(impl), tying, *inputs)
    ey, eg = run(ref_clt_decode, tying, *inputs)
    codes, W, b, off, sc, up = inputs
    codes64 = [SparseCodes(c.row_ptr, c.index, c.value.double(), F) for c in codes]
    W64 = [w.double() for w in W] if tying == "none" else W.double()
    oy, og = run(ref_clt_decode, tying, codes64, W64, *(None if t is None else t.double() for t in (b, off, sc)), up)
    assert y.dtype == torch.bfloat16
    assert rel_err(y, oy) <= 2 * rel_err(ey, oy) + 1e-2
    for n in og:
        assert g[n].dtype == torch.bfloat16, n
        assert rel_err(g[n], og[n]) <= 2 * rel_err(eg[n], og[n]) + 1e-2, n


@pytest.mark.parametrize("tying,affine", [("per_source", True), ("per_target", False), ("per_target", True)])
@pytest.mark.parametrize("impl,device", [p for p in impl_params("clt_decode", reference=True)
                                         if p.values[0] in ("reference", "cpu", "cuda")])
def test_composed_decodes_sum_bf16_partials_in_fp32(impl, device, tying, affine):
    """The CLT decodes composed from a sparse decode (the reference's and the extension's): with bf16
    decoders the L(L+1)/2 per-(source, target) decodes are summed in fp32 and rounded to bf16 once
    per target (exactly), the feature affine computed in fp32."""
    codes, W, b, off, sc, up = make(tying, affine, torch.bfloat16, device, seed=11)
    y = ops.clt_decode(codes, W, tying, None, off, sc, impl=impl)
    if impl != "reference" and tying == "per_target" and not affine:
        return  # the extension's plain per_target is one decode per target (test_per_target_one_decode)
    for t in range(L):
        acc = None
        for s in range(t + 1):
            c = feature_affine(codes[s], None if off is None else off[t], None if sc is None else sc[t])
            part = ops.sparse_decode(c, W[s] if tying == "per_source" else W[t], impl=impl).float()
            acc = part if acc is None else acc + part
        assert torch.equal(y[:, t], acc.to(torch.bfloat16)), (impl, t)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("impl,device", [p for p in KERNELS if p.values[0] in ("cpu", "cuda")])
def test_per_target_one_decode(impl, device, dtype):
    """The extension's plain per_target decode is, per target t, one sparse decode of W_dec[t] whose row b
    holds row b's entries of sources 0..t, source after source: every source's contribution summed in one
    fp32 accumulation and rounded to the decoder's dtype once — bit for bit the sparse decode of those
    rows, built here entry by entry; and its value gradients are each entry's gradients summed over the
    targets it reaches."""
    codes, W, b, off, sc, up = make("per_target", None, dtype, device, seed=13)
    codes = [c.with_value(c.value.detach().requires_grad_(True)) for c in codes]
    y = ops.clt_decode(codes, W, "per_target", impl=impl)
    g = torch.randn(y.shape, dtype=torch.float64, device=device).to(dtype)
    y.backward(g)
    B = codes[0].batch_size
    for t in range(L):
        rows = [[(s, j) for s in range(t + 1) for j in range(int(codes[s].row_ptr[r]), int(codes[s].row_ptr[r + 1]))]
                for r in range(B)]
        row_ptr = torch.tensor([0] + [len(r) for r in rows], device=device).cumsum(0)
        index = torch.tensor([int(codes[s].index[j]) for r in rows for s, j in r], dtype=torch.int32, device=device)
        value = torch.stack([codes[s].value[j].detach() for r in rows for s, j in r])
        want = ops.sparse_decode(SparseCodes(row_ptr, index, value, F), W[t].detach(), impl=impl)
        assert torch.equal(y[:, t].detach(), want), t
    for s in range(L):  # d value_s[j] = Σ_{t ≥ s} <g[b, t], W_dec[t][f_j]>, summed in target order
        rows = SparseCodes.rows_of(codes[s].row_ptr, codes[s].nnz)
        idx = codes[s].index.long()
        parts = [(g[rows, t].float() * W[t].detach()[idx].float()).sum(1) for t in range(s, L)]
        tol = 1e-6 if dtype == torch.float32 else 1e-2
        assert_close(codes[s].value.grad, torch.stack(parts).sum(0), tol, f"dvalue {s}")


@pytest.mark.parametrize("tying", ["none", "per_source", "per_target"])
@pytest.mark.parametrize("frozen", ["W", "value"])
@pytest.mark.parametrize("impl,device", KERNELS)
def test_partial_grads(impl, device, tying, frozen):
    """Only the values (W frozen) or only W (values frozen) need a gradient."""
    codes, W, b, _, _, g = make_clt_inputs(tying, None, torch.float32, SIZE, zlib.crc32(repr((tying, frozen)).encode()),
                                           device)

    def grads(fn):
        cs = [c.with_value(c.value.detach().clone().requires_grad_(frozen == "W")) for c in codes]
        Wl = ([w.clone().requires_grad_(frozen == "value") for w in W] if isinstance(W, list)
              else W.clone().requires_grad_(frozen == "value"))
        leaves = [c.value for c in cs] if frozen == "W" else (Wl if isinstance(Wl, list) else [Wl])
        return torch.autograd.grad(fn(cs, Wl, tying, b), leaves, g)

    for i, (out, want) in enumerate(zip(grads(clt_with(impl)), grads(ref_clt_decode))):
        check_close(f"grad {i}", out, want, 1e-5)


@pytest.mark.parametrize("tying", ["per_source", "per_target"])
@pytest.mark.parametrize("impl,device", KERNELS)
def test_frozen_weights_affine(impl, device, tying):
    """W frozen, affine trained: dvalue and the per-(entry, target) dots (the Triton dot kernel)."""
    codes, W, b, off, sc, g = make_clt_inputs(tying, "both", torch.float32, SIZE, zlib.crc32(tying.encode()), device)

    def grads(fn, dtype):
        cs = [c.with_value(c.value.detach().to(dtype).requires_grad_()) for c in codes]
        o, s = off.detach().to(dtype).requires_grad_(), sc.detach().to(dtype).requires_grad_()
        y = fn(cs, W.to(dtype), tying, b.to(dtype), o, s)
        return torch.autograd.grad(y, [c.value for c in cs] + [o, s], g.to(dtype))

    names = [f"dvalue[{s}]" for s in range(SIZE[1])] + ["doffset", "dscale"]
    for name, out, want in zip(names, grads(clt_with(impl), torch.float32), grads(clt_dense64, torch.float64)):
        check_close(name, out, want, 1e-5)


@pytest.mark.parametrize("tying", ["none", "per_source", "per_target"])
@pytest.mark.parametrize("impl,device", KERNELS)
def test_single_layer_no_bias(impl, device, tying):
    B_, _, F_, d_, k = SIZE
    codes, W, _, _, _, g = make_clt_inputs(tying, None, torch.float32, (B_, 1, F_, d_, k), 21, device)
    got = run_clt(clt_with(impl), codes, W, tying, None, None, None, g)
    want = run_clt(ref_clt_decode, codes, W, tying, None, None, None, g)
    for name, out, e in zip(clt_grad_names(tying, 1, None), got, want):
        check_close(name, out, e, 1e-5)


@pytest.mark.parametrize("tying,affine", [("none", None), ("per_source", None), ("per_target", "both")])
@pytest.mark.parametrize("impl,device", KERNELS)
def test_deterministic(impl, device, tying, affine):
    inputs = make_clt_inputs(tying, affine, torch.float32, SIZE, 33, device)
    first = run_clt(clt_with(impl), inputs[0], inputs[1], tying, *inputs[2:])
    second = run_clt(clt_with(impl), inputs[0], inputs[1], tying, *inputs[2:])
    for x, y in zip(first, second):
        assert torch.equal(x, y)


@pytest.mark.parametrize("tying", ["none", "per_target"])
@pytest.mark.parametrize("B_", [0, 4])
@pytest.mark.parametrize("impl,device", KERNELS)
def test_empty(impl, device, tying, B_, poisoned):
    L_, F_, d_ = 3, 7, 5
    gen = torch.Generator().manual_seed(4)
    codes = [SparseCodes(torch.zeros(B_ + 1, dtype=torch.int64, device=device),
                         torch.zeros(0, dtype=torch.int32, device=device), torch.zeros(0, device=device), F_)
             for _ in range(L_)]
    W = ([torch.randn(F_, L_ - s, d_, generator=gen).to(device) for s in range(L_)] if tying == "none"
         else torch.randn(L_, F_, d_, generator=gen).to(device))
    b = torch.randn(L_, d_, generator=gen).to(device)
    sc = torch.randn(L_, F_, generator=gen).to(device) if tying != "none" else None
    g = torch.randn(B_, L_, d_, generator=gen).to(device)
    got = run_clt(clt_with(impl), codes, W, tying, b, None, sc, g)
    assert torch.equal(got[0], b.expand(B_, L_, d_))
    for out in got[1 + L_:]:
        assert torch.isfinite(out).all()
    assert torch.allclose(got[-2 if sc is not None else -1], g.sum(0))


@pytest.mark.parametrize("impl,device", KERNELS)
def test_fp64_runs_the_reference(impl, device):
    if {e.impl: e for e in _registry.entries("clt_decode")}[impl].takes(torch.float64):
        pytest.skip(f"impl {impl!r} takes fp64 itself (tests/ops/test_density.py checks it in fp64)")
    codes, W, b, off, sc, _ = make_clt_inputs("per_target", "both", torch.float64, (5, 3, 8, 6, 2), 8, device)
    assert ops.resolve("clt_decode", impl, torch.device(device), torch.float64)[0] == "reference"
    y = ops.clt_decode(codes, W, "per_target", b, off, sc, impl=impl)
    assert torch.equal(y, ref_clt_decode(codes, W, "per_target", b, off, sc))


@pytest.mark.parametrize("impl,device", impl_params("clt_decode", reference=True))
def test_bad_input(impl, device):
    """Checked once by the entry point, the same for every implementation."""
    codes, W, b, off, sc, _ = make_clt_inputs("per_source", "both", torch.float32, (5, 3, 8, 6, 2), 8, device)
    Wn = make_clt_inputs("none", None, torch.float32, (5, 3, 8, 6, 2), 8, device)[1]
    dec = clt_with(impl)
    with pytest.raises(ValueError, match="tying"):
        dec(codes, W, "tied")
    with pytest.raises(ValueError, match="W_dec"):
        dec(codes, W[:2], "per_source")
    with pytest.raises(ValueError, match="W_dec"):
        dec(codes, Wn[:2], "none")
    with pytest.raises(ValueError, match=r"W_dec\[2\]"):
        dec(codes, [Wn[0], Wn[1], Wn[2].transpose(0, 1)], "none")
    with pytest.raises(ValueError, match="feature_offset"):
        dec(codes, Wn, "none", feature_offset=off)
    with pytest.raises(TypeError, match="W_dec"):
        dec(codes, [Wn[0], Wn[1].double(), Wn[2]], "none")
    with pytest.raises(ValueError, match="W_dec"):
        dec(codes, W.to("meta"), "per_target")
    with pytest.raises(ValueError, match="b_dec"):
        dec(codes, W, "per_target", b_dec=b[:2])
    with pytest.raises(ValueError, match="feature_scale"):
        dec(codes, W, "per_target", feature_scale=sc[:, :5])
    with pytest.raises(ValueError, match=r"codes\[1\]"):
        dec([codes[0], SparseCodes.from_topk(codes[0].index[:4].view(2, 2), codes[0].value[:4].view(2, 2), 8),
             codes[2]], W, "per_target")
    with pytest.raises(ValueError, match="codes: expected a sequence"):
        dec([], W, "per_target")


@pytest.mark.parametrize("empty", [(0,), (1, 2), (0, 1, 2)])
@pytest.mark.parametrize("impl,device", impl_params("clt_decode", reference=True))
def test_skip_empty_sources(impl, device, empty):
    """skip_empty=True: the same ŷ and the same gradients of every non-empty source's values and decoder
    (bit for bit on the composed decodes, which then leave the empty sources out: no gradient for
    their decoders); every source empty gives zeros. Tied decoders ignore it."""
    codes, W, b, _, _, up = make("none", None, torch.float32, device, seed=41)
    codes = [SparseCodes(torch.zeros_like(c.row_ptr), c.index[:0], c.value[:0], F) if s in empty else c
             for s, c in enumerate(codes)]
    y, g = run(clt_with(impl), "none", codes, W, None, None, None, up)
    y_skip, g_skip = run(functools.partial(ops.clt_decode, impl=impl, skip_empty=True), "none", codes, W, None,
                         None, None, up)
    composed = _registry.resolve("clt_decode", impl, torch.device(device), torch.float32)[0] in ("reference", "cpu",
                                                                                                  "cuda")
    assert_close(y_skip, y, 0.0 if composed else 1e-6, "y")
    skipped = set(empty) - {0} if len(empty) == L else set(empty)  # (all empty: source 0 gives ŷ's shape)
    for s in range(L):
        if composed and s in skipped:
            assert g_skip[f"W_dec[{s}]"] is None
        else:
            assert_close(g_skip[f"W_dec[{s}]"], g[f"W_dec[{s}]"], 0.0 if composed else 1e-6, f"dW_dec[{s}]")
        if s not in empty:
            assert_close(g_skip[f"value[{s}]"], g[f"value[{s}]"], 0.0 if composed else 1e-6, f"dvalue[{s}]")
    if len(empty) == L:
        assert torch.equal(y_skip, torch.zeros_like(y_skip))
    Wt = torch.randn(L, F, d, generator=torch.Generator().manual_seed(3)).to(device)
    yt = ops.clt_decode(codes, Wt, "per_source", impl=impl, skip_empty=True)
    assert torch.equal(yt, ops.clt_decode(codes, Wt, "per_source", impl=impl))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("first", [0, 2])
@pytest.mark.parametrize("mode", ["grad", "no_grad", "inference"])
def test_shifted_sum(dtype, first, mode):
    """The untied decode's sum of shifted parts (``_sum_shifted``): parts (s, [B, L−s, d]) from s =
    ``first`` on placed at targets s.. and summed in fp32 (fp64 for fp64), rounded once; each part's
    gradient is its slice of the output's; the same under no_grad and inference_mode (the first part,
    the accumulator when it starts at target 0 in the accumulation dtype, is a fresh non-leaf)."""
    from fastclt.ops.reference.clt_decode import _sum_shifted
    g = torch.Generator().manual_seed(31 + first)
    B, L, d = 7, 5, 3
    leaves = [(s, torch.randn(B, L - s, d, generator=g).to(dtype).requires_grad_()) for s in range(first, L)]
    want = sum(torch.nn.functional.pad(p.detach().double(), (0, 0, s, 0)) for s, p in leaves)
    ctx = {"grad": torch.enable_grad, "no_grad": torch.no_grad, "inference": torch.inference_mode}[mode]
    with ctx():
        y = _sum_shifted([(s, p * 1) for s, p in leaves])  # fresh parts, as a decode returns them
    assert y.dtype == dtype and y.shape == (B, L, d)
    tol = 2.0 ** -7 if dtype == torch.bfloat16 else 1e-6
    assert_close(y.double(), want, tol, "sum")
    if mode == "grad":
        up = torch.randn(B, L, d, generator=g).to(dtype)
        (y * up).sum().backward()
        for s, p in leaves:
            assert p.grad.dtype == dtype and torch.equal(p.grad, up[:, s:]), s
