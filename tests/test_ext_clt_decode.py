"""The extension's CLT decode (``ext_ops.clt_decode``: the CLT layouts built from fastclt._C's
sparse decode) against the reference ``clt_decode`` (itself checked against dense fp64 math in
test_ops_reference.py): the output and every gradient (values of every layer, W_dec, b_dec,
offset, scale), every tying, fp32 and bf16, odd sizes, an empty row, NaN-poisoned kernel outputs.
CPU kernels here; the same cases on CUDA when the CUDA kernels are built and a GPU is present."""
import pytest
import torch

from _util import assert_close, rel_err
from fastclt.codes import SparseCodes
from fastclt.ops import ext_ops
from fastclt.ops.decode import clt_decode as ref_clt_decode

CASES = [("none", False), ("per_source", False), ("per_source", True), ("per_target", False), ("per_target", True)]
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
    Ws = [w.detach().clone().requires_grad_(True) for w in W] if tying == "none" else W.detach().clone().requires_grad_(True)
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


@pytest.mark.parametrize("tying,affine", CASES)
def test_clt_decode_fp32_matches_reference(ext_device, tying, affine, poisoned):
    inputs = make(tying, affine, torch.float32, ext_device, seed=CASES.index((tying, affine)))
    y, g = run(ext_ops.clt_decode, tying, *inputs)
    ry, rg = run(ref_clt_decode, tying, *inputs)
    assert y.dtype == ry.dtype and y.shape == (B, L, d)
    assert_close(y, ry, 1e-6, "y")
    assert set(g) == set(rg)
    for n in rg:
        assert g[n] is not None, n
        assert_close(g[n], rg[n], 1e-5, f"d{n}")


@pytest.mark.parametrize("tying,affine", CASES)
def test_clt_decode_bf16_error_vs_fp64(ext_device, tying, affine):
    """bf16: error against the fp64 reference ≤ 2× eager bf16's + a floor, output and gradients."""
    inputs = make(tying, affine, torch.bfloat16, ext_device, seed=7)
    y, g = run(ext_ops.clt_decode, tying, *inputs)
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


def test_clt_decode_is_the_default_here(ext_device, monkeypatch):
    import fastclt.ops as ops

    monkeypatch.delenv("FASTCLT_IMPL", raising=False)
    name, _ = ops.resolve("clt_decode", "auto", torch.device(ext_device), torch.float32)
    assert name == ("cpu" if ext_device == "cpu" else "triton")
    assert ops.resolve("clt_decode", "auto", torch.device(ext_device), torch.float64)[0] == "reference"


@pytest.mark.parametrize("tying,affine", [("per_source", True), ("per_target", False), ("per_target", True)])
def test_clt_decode_sums_bf16_partials_in_fp32(ext_device, tying, affine):
    """With bf16 decoders, the L(L+1)/2 per-(source, target) decodes are summed in fp32 and rounded
    to bf16 once per target (exactly), the feature affine computed in fp32 — for the reference and
    the extension's clt_decode alike."""
    from fastclt.ops.decode import feature_affine
    from fastclt.ops.decode import sparse_decode as ref_decode

    codes, W, b, off, sc, up = make(tying, affine, torch.bfloat16, ext_device, seed=11)
    for decode, clt in ((ref_decode, ref_clt_decode), (ext_ops.sparse_decode, ext_ops.clt_decode)):
        y = clt(codes, W, tying, None, off, sc)
        for t in range(L):
            acc = None
            for s in range(t + 1):
                c = feature_affine(codes[s], None if off is None else off[t], None if sc is None else sc[t])
                part = decode(c, W[s] if tying == "per_source" else W[t]).float()
                acc = part if acc is None else acc + part
            assert torch.equal(y[:, t], acc.to(torch.bfloat16)), (decode.__module__, t)
