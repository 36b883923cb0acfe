"""Cases shared by the encode kernels' tests (Triton: test_triton_encode.py; the extension:
test_ext_encode.py): inputs, a run that backpropagates a fixed fp64 upstream through the dense
codes, checks of the CSR layout and of a kept set, and the fp64 oracle on a given kept set."""
import torch

from fastclt.ops.activation import jumprelu_dense
from fastclt.ops.encode import encode as ref_encode
from fastclt.ops.encode import preacts

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BW = 0.5  # a wide JumpReLU band, so that the tiny tests hold band entries


def make_inputs(B, d, F, dtype, seed=0, pre_bias=False, scale=1.0, shift=0.0, device=DEVICE):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, d, generator=g) * scale + shift
    W = torch.randn(F, d, generator=g) / d ** 0.5
    b = torch.randn(F, generator=g) * 0.1
    thr = torch.rand(F, generator=g) * 0.8 + 0.1
    p = torch.randn(d, generator=g) * 0.5 if pre_bias else None
    out = dict(x=x, W_enc=W, b_enc=b, threshold=thr, pre_bias=p)
    return {n: (None if t is None else t.to(device, dtype)) for n, t in out.items()}


def leaves(inputs, dtype=None, keep=()):
    """Fresh leaf copies of the inputs; the names in ``keep`` are used as they are (persistent
    leaves, grads reset, as for a model's parameter)."""
    out = {}
    for n, t in inputs.items():
        if n in keep:
            t.grad = None
        elif t is not None:
            t = t.detach().clone()
            t = t.to(dtype) if dtype is not None else t
            t.requires_grad_(True)
        out[n] = t
    return out


def kwargs_for(act, k, inputs):
    kw = dict(activation=act, pre_bias=inputs["pre_bias"])
    if act == "jumprelu":
        kw.update(threshold=inputs["threshold"], bandwidth=BW)
    if act in ("topk", "batchtopk"):
        kw.update(k=k)
    return kw


def run(fn, act, k, inputs, upstream):
    F = inputs["W_enc"].shape[0]
    codes = fn(inputs["x"], inputs["W_enc"], inputs["b_enc"], **kwargs_for(act, k, inputs))
    dense = codes.to_dense(F)
    (dense.double() * upstream).sum().backward()
    grads = {n: t.grad for n, t in inputs.items() if t is not None and (n != "threshold" or act == "jumprelu")}
    return codes, dense.detach(), grads


def pattern(codes, F):
    """bool [B, F]: stored entries (band entries included)."""
    m = torch.zeros(codes.batch_size, F, dtype=torch.bool, device=codes.device)
    m[codes.row_ids(), codes.index.long()] = True
    return m


def check_csr(codes, F):
    assert codes.row_ptr[0] == 0 and codes.row_ptr[-1] == codes.nnz
    assert bool((codes.row_ptr[1:] >= codes.row_ptr[:-1]).all())
    key = codes.row_ids() * F + codes.index.long()
    assert bool((key[1:] > key[:-1]).all()), "entries must be sorted by (row, feature), without duplicates"
    assert not torch.isnan(codes.value).any()


def rel_rmse(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt().clamp_min(1e-30))


def assert_close(name, got, want, tol):
    err = rel_rmse(got, want)
    if err > tol:
        diff = (got.double() - want.double()).abs()
        worst = diff.flatten().topk(min(5, diff.numel())).indices
        raise AssertionError(f"{name}: relative RMSE {err:.3g} > {tol:.3g}; worst flat indices {worst.tolist()} "
                             f"got {got.flatten()[worst].tolist()} want {want.flatten()[worst].tolist()}")


def compare_fp32(fn, act, k, inputs, upstream, allowed_flips=0, keep=()):
    """fp32: the reference's kept set exactly, its values and every gradient. With ``allowed_flips``
    (real sizes on a GPU, where the GEMMs sum in different orders), a few entries within rounding of
    a cut may differ; the kernel is then checked against the fp64 reference on its own kept set."""
    F = inputs["W_enc"].shape[0]
    tc, td, tg = run(fn, act, k, leaves(inputs, keep=keep), upstream)
    tg = {n: g.clone() for n, g in tg.items()}
    rc, rd, rg = run(ref_encode, act, k, leaves(inputs), upstream)
    check_csr(tc, F)
    assert tc.value.dtype == rc.value.dtype
    if act == "topk":
        assert tc.k == k
    assert set(tg) == set(rg)
    for n in rg:
        assert tg[n] is not None, f"{n}: no gradient"
        assert tg[n].dtype == rg[n].dtype and tg[n].shape == rg[n].shape
    t_set = pattern(tc, F)
    flips = int((t_set != pattern(rc, F)).sum())
    assert flips <= allowed_flips, f"{act}: {flips} entries differ from the reference's kept set"
    if flips > 0:
        rd, rg, h64 = oracle_on_set(act, inputs, t_set, upstream)
        check_kept_set(act, k, t_set, h64, inputs["threshold"].double(), 1e-5 * float(h64.abs().max()))
    assert tc.nnz == int(t_set.sum())
    assert_close(f"{act} codes", td, rd, 1e-5)
    for n in rg:
        assert_close(f"{act} d{n}", tg[n], rg[n], 1e-4)
    return tc


def oracle_on_set(act, inputs, mask, upstream):
    """The reference's values and gradients in fp64 on a given kept set ``mask: [B, F]`` (the set
    itself is checked by ``check_kept_set``): separates rounding error from ties at the cut."""
    t = leaves(inputs, torch.float64)
    h = preacts(t["x"], t["W_enc"], t["b_enc"], t["pre_bias"])
    rows, cols = mask.nonzero(as_tuple=True)
    hv = h[rows, cols]
    if act == "jumprelu":
        v = jumprelu_dense(hv, t["threshold"][cols], BW)
    else:
        v = torch.relu(hv)
    dense = torch.zeros_like(h).index_put((rows, cols), v)
    (dense * upstream).sum().backward()
    grads = {n: g.grad for n, g in t.items() if g is not None and (n != "threshold" or act == "jumprelu")}
    return dense.detach(), grads, h.detach()


def check_kept_set(act, k, mask, h, threshold, tol):
    """mask is a valid kept set of ``act`` for the exact pre-activations h (fp64), up to ``tol``."""
    B, F = h.shape
    if act == "relu":
        assert bool((h[mask] > -tol).all()) and bool((h[~mask] <= tol).all())
    elif act == "jumprelu":
        lo = (threshold - BW / 2).expand_as(h)
        assert bool((h[mask] > lo[mask] - tol).all()) and bool((h[~mask] <= lo[~mask] + tol).all())
    elif act == "topk":
        assert bool((mask.sum(1) == k).all())
        kept_min = h.masked_fill(~mask, float("inf")).min(1).values
        rest_max = h.masked_fill(mask, float("-inf")).max(1).values
        assert bool((kept_min >= rest_max - tol).all())
    else:
        assert int(mask.sum()) == k * B
        if k * B < B * F:
            assert float(h[mask].min()) >= float(h[~mask].max()) - tol




def check_bf16_vs_fp64(fn, act, k, inputs, upstream):
    """bf16: the kept set is right up to bf16 rounding, and ``fn``'s error against fp64 on its own
    kept set is ≤ 2× eager bf16's error on eager's kept set + a floor (codes and every gradient)."""
    F = inputs["W_enc"].shape[0]
    tc, td, tg = run(fn, act, k, leaves(inputs), upstream)
    ec, ed, eg = run(ref_encode, act, k, leaves(inputs), upstream)
    check_csr(tc, F)
    assert tc.value.dtype == torch.bfloat16
    t_set, e_set = pattern(tc, F), pattern(ec, F)
    rd_t, rg_t, h64 = oracle_on_set(act, inputs, t_set, upstream)
    rd_e, rg_e, _ = oracle_on_set(act, inputs, e_set, upstream)
    check_kept_set(act, k, t_set, h64, inputs["threshold"].double(), 2.0 ** -6 * float(h64.abs().max()))
    floor = 0.01
    assert rel_rmse(td, rd_t) <= 2 * rel_rmse(ed, rd_e) + floor
    assert set(tg) == set(eg)
    for n in rg_t:
        assert tg[n].dtype == torch.bfloat16, n
        assert rel_rmse(tg[n], rg_t[n]) <= 2 * rel_rmse(eg[n], rg_e[n]) + floor, n


def check_deterministic(fn, act, inputs, upstream):
    """Two runs of ``fn`` give bit-identical codes and gradients."""
    c1, _, g1 = run(fn, act, 4, leaves(inputs), upstream)
    c2, _, g2 = run(fn, act, 4, leaves(inputs), upstream)
    assert torch.equal(c1.row_ptr, c2.row_ptr) and torch.equal(c1.index, c2.index)
    assert torch.equal(c1.value, c2.value)
    for n in g1:
        assert torch.equal(g1[n], g2[n]), n


def check_return_preacts(fn, act, inputs, tol_h, tol_grad):
    """``return_preacts=True``: the reference's pattern and h, and the gradients of a loss on both."""
    F = inputs["W_enc"].shape[0]
    t, r = leaves(inputs), leaves(inputs)
    tc, th = fn(t["x"], t["W_enc"], t["b_enc"], return_preacts=True, **kwargs_for(act, 3, t))
    rc, rh = ref_encode(r["x"], r["W_enc"], r["b_enc"], return_preacts=True, **kwargs_for(act, 3, r))
    assert torch.equal(pattern(tc, F), pattern(rc, F))
    assert_close("h", th, rh, tol_h)
    up = torch.randn(tc.batch_size, F, device=th.device)
    ((tc.to_dense(F) * up).sum() + th.pow(2).sum()).backward()
    ((rc.to_dense(F) * up).sum() + rh.pow(2).sum()).backward()
    for n in ("x", "W_enc", "b_enc", "pre_bias"):
        assert_close(f"d{n}", t[n].grad, r[n].grad, tol_grad)
