"""What only the fused Triton AuxK (fastclt/ops/triton/auxk.py) does, against the reference
``auxk_select``: no speculative state across calls, the sampled threshold's fallback, one autotune
key for drifting dead counts. (What every AuxK implementation must do: tests/ops/test_auxk.py.)
Runs under TRITON_INTERPRET=1 without a GPU (tiny sizes)."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


import fastclt.ops.triton.encode as tenc  # noqa: E402
from _encode_cases import make_inputs as make_encode_inputs  # noqa: E402
from fastclt.ops.reference.auxk import auxk_select as ref_auxk  # noqa: E402
from fastclt.ops.triton.auxk import auxk_select  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ON_GPU = DEVICE == "cuda"


def make_inputs(B, d, F, dtype, seed=0, n_dead=None, scale=1.0, shift=0.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, d, generator=g) * scale + shift
    W = torch.randn(F, d, generator=g) / d ** 0.5
    b = torch.randn(F, generator=g) * 0.1
    p = torch.randn(d, generator=g) * 0.5
    n_dead = F // 3 if n_dead is None else n_dead
    dead = torch.zeros(F, dtype=torch.bool)
    dead[torch.randperm(F, generator=g)[:n_dead]] = True
    t = {n: v.to(DEVICE, dtype) for n, v in dict(x=x, W_enc=W, b_enc=b, pre_bias=p).items()}
    return t, dead.to(DEVICE)


def run(fn, inputs, dead, k_aux, upstream, pre_bias=True, dtype=None):
    t = {n: v.detach().clone().to(dtype or v.dtype).requires_grad_(True) for n, v in inputs.items()}
    F = t["W_enc"].shape[0]
    codes = fn(t["x"], t["W_enc"], t["b_enc"], dead, k_aux, t["pre_bias"] if pre_bias else None)
    dense = codes.to_dense(F)
    (dense.double() * upstream).sum().backward()
    grads = {n: v.grad for n, v in t.items() if pre_bias or n != "pre_bias"}
    return codes, dense.detach(), grads


def rel_rmse(a, b):
    a, b = a.double(), b.double()
    return float((a - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt().clamp_min(1e-30))


def compare(inputs, dead, k_aux, pre_bias=True):
    B, F = inputs["x"].shape[0], inputs["W_enc"].shape[0]
    up = torch.randn(B, F, dtype=torch.float64, device=DEVICE)
    tc, td, tg = run(auxk_select, inputs, dead, k_aux, up, pre_bias)
    tg = {n: g.clone() for n, g in tg.items()}
    rc, rd, rg = run(ref_auxk, inputs, dead, k_aux, up, pre_bias)
    assert tc.k == rc.k and tc.nnz == rc.nnz and tc.n_features == F
    assert not torch.isnan(tc.value).any()
    assert bool(dead[tc.index.long()].all()), "AuxK codes may only hold dead features"
    key = tc.row_ids() * F + tc.index.long()
    assert bool((key[1:] > key[:-1]).all())
    flips = int((_mask(tc, F) != _mask(rc, F)).sum())
    # a GPU at real sizes sums in another order than the reference: rare near-ties may swap there
    assert flips <= (B * F // 10**5 if ON_GPU else 0), f"{flips} entries differ from the reference's kept set"
    tol = 1e-4 if flips == 0 else 1e-2
    assert rel_rmse(td, rd) < tol / 10
    for n in rg:
        assert rel_rmse(tg[n], rg[n]) < tol, n
    alive = ~dead
    assert not tg["W_enc"][alive].any() and not tg["b_enc"][alive].any()
    return tc


def _mask(codes, F):
    m = torch.zeros(codes.batch_size, F, dtype=torch.bool, device=codes.device)
    m[codes.row_ids(), codes.index.long()] = True
    return m


def test_no_state_across_calls():
    """AuxK's inputs are per-step casts and gathers (nothing stable to key a cache on): each call
    samples its own τ and capacity, and leaves no speculative state behind. Calls on very
    different data are all exact."""
    tenc.STATS.clear()
    inputs, dead = make_inputs(13, 19, 37, torch.float32, seed=3)
    for i, (scale, shift, seed) in enumerate([(1.0, 0.0, 3), (0.02, 0.0, 4), (30.0, 0.0, 5), (1.0, 2.0, 6)]):
        x = make_inputs(13, 19, 37, torch.float32, seed=seed, scale=scale, shift=shift)[0]["x"]
        compare(dict(inputs, x=x), dead, 3)
        assert tenc.STATS["sample_tau"] == i + 1
    assert len(tenc._TAU) == 0 and len(tenc._CAP) == 0 and len(tenc._DENSITY) == 0


def test_sampled_threshold_too_high_falls_back(monkeypatch):
    """A τ sampled from rows whose k-th value is far above the others' (here: the one sampled row
    is scaled up): the rows short of candidates take the exact dense-rows path."""
    inputs, dead = make_inputs(13, 19, 37, torch.float32, seed=10)
    inputs["x"][0] *= 50.0
    monkeypatch.setattr(tenc, "_sample_rows", lambda B, n, device: torch.zeros(1, dtype=torch.long, device=device))
    tenc.STATS.clear()
    compare(inputs, dead, 3)
    assert tenc.STATS["topk_dense_rows"] > 0


def _autotune_keys(monkeypatch) -> list:
    """Collects, for every launch of the encode kernel, the key the autotuner caches its choice
    under (a new key = a new tuning run on a GPU)."""
    kern = tenc._encode_kernel
    keys = []
    run_ = type(kern).run

    def recording_run(self, *args, **kwargs):
        if self is kern:
            named = dict(zip(self.arg_names, args), **kwargs)
            keys.append(tuple(named[k] for k in self.keys))
        return run_(self, *args, **kwargs)

    monkeypatch.setattr(type(kern), "run", recording_run)
    return keys


def test_auxk_dead_count_drift_does_not_retune(monkeypatch):
    """AuxK launches the encode GEMM over the n_dead dead features, a count that changes every
    step: the autotune key holds n_dead rounded up to a power of two, so 31 different counts in
    (32, 64] give one key per launch mode (candidates and the dense τ sample), not 31."""
    B, d, F = 13, 19, 64
    inputs = make_encode_inputs(B, d, F, torch.float32, seed=20)
    keys = _autotune_keys(monkeypatch)
    for n_dead in range(33, 64):
        dead = torch.zeros(F, dtype=torch.bool, device=DEVICE)
        dead[torch.randperm(F, generator=torch.Generator().manual_seed(n_dead))[:n_dead].to(DEVICE)] = True
        auxk_select(inputs["x"], inputs["W_enc"], inputs["b_enc"], dead, 4)
    assert len(keys) >= 2 * 31
    assert len(set(keys)) == 2, sorted(set(keys))
    assert {k[0] for k in keys} == {64}
