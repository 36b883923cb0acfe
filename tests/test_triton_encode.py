"""Fused Triton encode (fastclt/ops/triton/encode.py) against the reference encode: codes, every
gradient, fp32 and bf16, odd sizes, the speculative-threshold fallbacks, NaN-poisoned outputs,
determinism and bad input. Runs under TRITON_INTERPRET=1 without a GPU (tiny sizes)."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import fastclt.ops.triton.encode as tenc  # noqa: E402
from _encode_cases import (check_bf16_vs_fp64, check_csr, check_deterministic,  # noqa: E402
                           check_return_preacts, kwargs_for, leaves, make_inputs, pattern)
from _encode_cases import assert_close  # noqa: E402
from _encode_cases import compare_fp32 as compare  # noqa: E402
from fastclt.ops.select import batch_topk_layers  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ON_GPU = DEVICE == "cuda"
ODD = (13, 19, 37)  # B, d_in, F
SIZES = [ODD] + ([(4096, 768, 16384)] if ON_GPU else [])
ACTS = ["relu", "jumprelu", "topk", "batchtopk"]


def compare_fp32(act, k, inputs, upstream, allowed_flips=0, keep=()):
    return compare(tenc.encode, act, k, inputs, upstream, allowed_flips, keep)


@pytest.fixture(autouse=True)
def _fresh_caches():
    tenc.clear_caches()
    yield
    tenc.clear_caches()


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("pre_bias", [False, True])
@pytest.mark.parametrize("act", ACTS)
def test_encode_fp32_matches_reference(act, pre_bias, size):
    B, d, F = size
    inputs = make_inputs(B, d, F, torch.float32, pre_bias=pre_bias)
    upstream = torch.randn(B, F, dtype=torch.float64, device=DEVICE)
    compare_fp32(act, 4, inputs, upstream, allowed_flips=0 if not ON_GPU else B * F // 10**5)


@pytest.mark.parametrize("act", ACTS)
def test_encode_even_k(act):
    """d_in a multiple of BLOCK_K: the unmasked main loop (EVEN_K)."""
    B, d, F = 13, 32, 37
    inputs = make_inputs(B, d, F, torch.float32, seed=18, pre_bias=True)
    compare_fp32(act, 4, inputs, torch.randn(B, F, dtype=torch.float64, device=DEVICE))


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("act", ACTS)
def test_encode_bf16_error_vs_fp64(act, size):
    """bf16: the kept set is right up to bf16 rounding, and the kernel's error against fp64 on its
    own kept set is ≤ 2× eager bf16's error on eager's kept set + a floor (codes and grads)."""
    B, d, F = size
    inputs = make_inputs(B, d, F, torch.bfloat16, seed=1, pre_bias=True)
    check_bf16_vs_fp64(tenc.encode, act, 4, inputs, torch.randn(B, F, dtype=torch.float64, device=DEVICE))


@pytest.mark.parametrize("act", ["topk", "batchtopk"])
@pytest.mark.parametrize("k", [1, ODD[2]])
def test_k_extremes(act, k):
    B, d, F = ODD
    inputs = make_inputs(B, d, F, torch.float32, seed=2)
    compare_fp32(act, k, inputs, torch.randn(B, F, dtype=torch.float64, device=DEVICE))


@pytest.mark.parametrize("act", ["relu", "jumprelu"])
def test_empty_row_and_always_active_feature(act):
    B, d, F = ODD
    inputs = make_inputs(B, d, F, torch.float32, seed=3)
    inputs["b_enc"] = -torch.rand(F, device=DEVICE) - 2.0  # row 0 (x = 0) has h = b < θ − ε/2
    inputs["x"][0] = 0
    inputs["W_enc"][5] = 0
    inputs["b_enc"][5] = 3.0  # feature 5: h = 3 > θ in every row
    codes = compare_fp32(act, None, inputs, torch.randn(B, F, dtype=torch.float64, device=DEVICE))
    assert codes.row_lengths()[0] == 1  # only the always-active feature
    assert bool(pattern(codes, F)[:, 5].all())


@pytest.mark.parametrize("act", ["topk", "batchtopk"])
def test_speculative_threshold_fallbacks(act):
    """Calls on very different data, so that the cached τ is too low, then too high: every call must
    still equal the reference, and the fallback paths must have run."""
    B, d, F = ODD
    tenc.STATS.clear()
    upstream = torch.randn(B, F, dtype=torch.float64, device=DEVICE)
    W_inputs = make_inputs(B, d, F, torch.float32, seed=4)
    W_inputs["W_enc"].requires_grad_(True)
    for scale, shift, seed in [(1.0, 0.0, 4), (0.05, 0.0, 6), (20.0, 0.0, 7), (1.0, -3.0, 8)]:
        inputs = dict(W_inputs)
        inputs["x"] = make_inputs(B, d, F, torch.float32, seed=seed, scale=scale, shift=shift)["x"]
        compare_fp32(act, 3, inputs, upstream, keep=("W_enc",))
    assert tenc.STATS["overflow_rerun"] > 0  # τ too low: more candidates than the buffer held
    if act == "topk":
        assert tenc.STATS["topk_dense_rows"] > 0  # τ too high: rows with < k candidates
    else:
        assert tenc.STATS["batchtopk_retry"] > 0


def test_batchtopk_dense_fallback(monkeypatch):
    """Every speculative τ (cached and sampled) too high: the last resort is the exact dense path."""
    B, d, F = ODD
    inputs = make_inputs(B, d, F, torch.float32, seed=17, pre_bias=True)
    monkeypatch.setattr(tenc, "_kth_largest", lambda v, m: 1e30)
    tenc.STATS.clear()
    compare_fp32("batchtopk", 3, inputs, torch.randn(B, F, dtype=torch.float64, device=DEVICE))
    assert tenc.STATS["batchtopk_dense"] == 1


@pytest.mark.parametrize("act", ["topk", "batchtopk"])
@pytest.mark.parametrize("tau", [-1e30, 1e30])
def test_forced_speculative_threshold(act, tau):
    """A cached τ far below (every entry a candidate: above the candidate limit) or far above (no
    candidate) the cut: the exact fallbacks give the reference's codes."""
    B, d, F = ODD
    inputs = make_inputs(B, d, F, torch.float32, seed=16)
    inputs["W_enc"].requires_grad_(True)
    upstream = torch.randn(B, F, dtype=torch.float64, device=DEVICE)
    compare_fp32(act, 1, inputs, upstream, keep=("W_enc",))
    assert len(tenc._TAU) == 1
    for key in list(tenc._TAU):
        tenc._TAU[key] = tau
    tenc.STATS.clear()
    compare_fp32(act, 1, inputs, upstream, keep=("W_enc",))
    if act == "topk":
        assert tenc.STATS["topk_tau_too_low"] == (tau < 0)  # then a retry with a sampled τ
        if tau > 0:
            assert tenc.STATS["topk_dense_rows"] == B
    else:
        assert tenc.STATS["batchtopk_retry"] == 1


def test_capacity_overflow_reruns():
    """A capacity estimate far too small (after a sparse call) must rerun, never truncate."""
    B, d, F = ODD
    inputs = make_inputs(B, d, F, torch.float32, seed=10)
    upstream = torch.randn(B, F, dtype=torch.float64, device=DEVICE)
    inputs["W_enc"].requires_grad_(True)
    sparse = dict(inputs, b_enc=inputs["b_enc"] - 5.0)  # almost nothing active
    compare_fp32("relu", None, sparse, upstream, keep=("W_enc",))
    tenc.STATS.clear()
    dense = dict(inputs, b_enc=inputs["b_enc"] + 5.0)  # almost everything active
    compare_fp32("relu", None, dense, upstream, keep=("W_enc",))
    assert tenc.STATS["overflow_rerun"] > 0


@pytest.mark.parametrize("act", ACTS)
def test_poisoned_outputs(act, monkeypatch):
    monkeypatch.setenv("FASTCLT_POISON", "1")
    B, d, F = ODD
    inputs = make_inputs(B, d, F, torch.float32, seed=11, pre_bias=True)
    compare_fp32(act, 4, inputs, torch.randn(B, F, dtype=torch.float64, device=DEVICE))


@pytest.mark.parametrize("act", ["jumprelu", "topk", "batchtopk"])
def test_deterministic(act):
    B, d, F = ODD
    inputs = make_inputs(B, d, F, torch.float32, seed=12, pre_bias=True)
    check_deterministic(tenc.encode, act, inputs, torch.randn(B, F, dtype=torch.float64, device=DEVICE))


@pytest.mark.parametrize("act", ["jumprelu", "topk"])
def test_return_preacts(act):
    B, d, F = ODD
    inputs = make_inputs(B, d, F, torch.float32, seed=13, pre_bias=True)
    check_return_preacts(tenc.encode, act, inputs, 1e-5, 1e-4)


def test_encode_layers_matches_reference():
    B, d, F, L, k = 11, 19, 37, 3, 3
    g = torch.Generator().manual_seed(14)
    x = torch.randn(B, L, d, generator=g).to(DEVICE)
    W = (torch.randn(L, F, d, generator=g) * torch.tensor([0.5, 1.0, 2.0])[:, None, None] / d ** 0.5).to(DEVICE)
    b = (torch.randn(L, F, generator=g) * 0.1).to(DEVICE)
    up = [torch.randn(B, F, dtype=torch.float64, device=DEVICE) for _ in range(L)]
    results = []
    for fn in ("triton", "reference"):
        xt, Wt, bt = (t.clone().requires_grad_(True) for t in (x, W, b))
        if fn == "triton":
            codes = tenc.encode_layers(xt, Wt, bt, k)
        else:
            h = torch.einsum("bld,lfd->lbf", xt, Wt) + bt[:, None, :]
            codes = batch_topk_layers(h, k)
        sum((c.to_dense(F).double() * u).sum() for c, u in zip(codes, up)).backward()
        results.append((codes, xt.grad, Wt.grad, bt.grad))
    (tc, *tg), (rc, *rg) = results
    assert sum(c.nnz for c in tc) == k * B * L
    for l in range(L):
        check_csr(tc[l], F)
        assert torch.equal(pattern(tc[l], F), pattern(rc[l], F))
        assert_close(f"layer {l} codes", tc[l].to_dense(F), rc[l].to_dense(F), 1e-5)
    for name, a, r in zip(("x", "W_enc", "b_enc"), tg, rg):
        assert_close(f"d{name}", a, r, 1e-4)


@pytest.mark.parametrize("act", ACTS)
def test_empty_batch(act):
    _, d, F = ODD
    inputs = make_inputs(0, d, F, torch.float32)
    t = leaves(inputs)
    codes = tenc.encode(t["x"], t["W_enc"], t["b_enc"], **kwargs_for(act, 2, t))
    assert codes.batch_size == 0 and codes.nnz == 0 and codes.row_ptr.tolist() == [0]
    codes.value.sum().backward()
    assert t["W_enc"].grad is None or not t["W_enc"].grad.any()


def test_non_contiguous_weight_is_converted():
    B, d, F = ODD
    inputs = make_inputs(B, d, F, torch.float32, seed=15)
    inputs["W_enc"] = inputs["W_enc"].t().contiguous().t()  # column-major [F, d]
    compare_fp32("relu", None, inputs, torch.randn(B, F, dtype=torch.float64, device=DEVICE))


def test_bad_input():
    B, d, F = ODD
    i = make_inputs(B, d, F, torch.float32)
    x, W, b, thr = i["x"], i["W_enc"], i["b_enc"], i["threshold"]
    with pytest.raises(TypeError, match="x:"):
        tenc.encode(x.double(), W, b, activation="relu")
    with pytest.raises(TypeError, match="W_enc:"):
        tenc.encode(x, W.bfloat16(), b, activation="relu")
    with pytest.raises(ValueError, match="W_enc:"):
        tenc.encode(x, W[:, :-1], b, activation="relu")
    with pytest.raises(ValueError, match="x:"):
        tenc.encode(x[None], W, b, activation="relu")
    with pytest.raises(ValueError, match="b_enc:"):
        tenc.encode(x, W, b[:-1], activation="relu")
    with pytest.raises(ValueError, match="threshold:"):
        tenc.encode(x, W, b, activation="jumprelu", threshold=thr[:-1])
    with pytest.raises(ValueError, match="threshold:"):
        tenc.encode(x, W, b, activation="jumprelu")
    with pytest.raises(ValueError, match="pre_bias:"):
        tenc.encode(x, W, b, activation="relu", pre_bias=torch.zeros(d + 1, device=DEVICE))
    with pytest.raises(ValueError, match="activation:"):
        tenc.encode(x, W, b, activation="gelu")
    with pytest.raises(ValueError, match="k:"):
        tenc.encode(x, W, b, activation="topk", k=F + 1)
    with pytest.raises(ValueError, match="k:"):
        tenc.encode(x, W, b, activation="batchtopk")
    with pytest.raises(ValueError, match="bandwidth:"):
        tenc.encode(x, W, b, activation="jumprelu", threshold=thr, bandwidth=0.0)
    with pytest.raises(ValueError, match="W_enc:"):
        tenc.encode_layers(x[:, None].expand(B, 2, d), W[None], b[None], 2)


def test_dispatch():
    """The Triton encode and AuxK are registered as impl "triton" and run through fastclt.ops."""
    import fastclt.ops as ops

    B, d, F = ODD
    i = make_inputs(B, d, F, torch.float32, seed=19)
    codes = ops.encode(i["x"], i["W_enc"], i["b_enc"], activation="topk", k=3, impl="triton")
    ref = ops.encode(i["x"], i["W_enc"], i["b_enc"], activation="topk", k=3, impl="reference")
    assert torch.equal(pattern(codes, F), pattern(ref, F))
    dead = torch.arange(F, device=DEVICE) % 3 == 0
    aux = ops.auxk_select(i["x"], i["W_enc"], i["b_enc"], dead, 2, impl="triton")
    assert aux.k == 2 and bool(dead[aux.index.long()].all())


def test_available():
    assert tenc.available(torch.device(DEVICE))
    if not ON_GPU:
        assert tenc.available(torch.device("cpu")) == (os.environ.get("TRITON_INTERPRET") == "1")


# --------------------------------------------------------------- autotune keys and speculative state
def _autotune_keys(monkeypatch) -> list:
    """Collects, for every launch of the encode kernel, the key the autotuner caches its choice
    under (a new key = a new tuning run on a GPU)."""
    kern = tenc._encode_kernel
    keys = []
    run = type(kern).run

    def recording_run(self, *args, **kwargs):
        if self is kern:
            named = dict(zip(self.arg_names, args), **kwargs)
            keys.append(tuple(named[k] for k in self.keys))
        return run(self, *args, **kwargs)

    monkeypatch.setattr(type(kern), "run", recording_run)
    return keys


def test_auxk_dead_count_drift_does_not_retune(monkeypatch):
    """AuxK launches the encode GEMM over the n_dead dead features, a count that changes every
    step: the autotune key holds n_dead rounded up to a power of two, so 31 different counts in
    (32, 64] give one key per launch mode (candidates and the dense τ sample), not 31."""
    from fastclt.ops.triton.auxk import auxk_select

    B, d, F = 13, 19, 64
    inputs = make_inputs(B, d, F, torch.float32, seed=20)
    keys = _autotune_keys(monkeypatch)
    for n_dead in range(33, 64):
        dead = torch.zeros(F, dtype=torch.bool, device=DEVICE)
        dead[torch.randperm(F, generator=torch.Generator().manual_seed(n_dead))[:n_dead].to(DEVICE)] = True
        auxk_select(inputs["x"], inputs["W_enc"], inputs["b_enc"], dead, 4)
    assert len(keys) >= 2 * 31
    assert len(set(keys)) == 2, sorted(set(keys))
    assert {k[0] for k in keys} == {64}


@pytest.mark.parametrize("n", [1, 2, 3, 31, 32, 33, 1000, 65536, 65537])
def test_size_bucket(n):
    b = tenc.size_bucket(n)
    assert b >= n and b & (b - 1) == 0 and (b == 1 or b // 2 < n)


def test_speculative_state_survives_a_per_step_cast():
    """Models pass a per-step cast of their weights (``W_enc.to(bf16)``: a new tensor, at a new
    address, every step): the cached τ must still be found (one τ sample over two calls)."""
    B, d, F = ODD
    inputs = make_inputs(B, d, F, torch.float32, seed=21)
    tenc.STATS.clear()
    casts = []  # both alive: the second cast cannot reuse the first one's memory
    for _ in range(2):
        casts.append(inputs["W_enc"].clone())
        tenc.encode(inputs["x"], casts[-1], inputs["b_enc"], activation="topk", k=3)
    assert casts[0].data_ptr() != casts[1].data_ptr()
    assert tenc.STATS["sample_tau"] == 1
    assert len(tenc._TAU) == 1


def test_speculative_state_is_per_layer_view():
    """Layer views of one weight tensor (a PLT's per-layer encodes) keep one τ each."""
    B, d, F, L = 13, 19, 37, 3
    g = torch.Generator().manual_seed(22)
    W = (torch.randn(L, F, d, generator=g) * torch.tensor([0.5, 1.0, 4.0])[:, None, None]).to(DEVICE)
    x = torch.randn(B, d, generator=g).to(DEVICE)
    for _ in range(2):
        for l in range(L):
            tenc.encode(x, W[l], None, activation="topk", k=3)
    assert len(tenc._TAU) == L


def test_clt_batchtopk_capacity_is_learned_per_layer():
    """encode_layers with layers of very different scales (one layer holds most candidates above
    the shared τ): after the first call, each layer's candidate buffer fits its own count, so
    repeated calls never rerun a layer's GEMM for an overflowing buffer."""
    B, d, F, L, k = 32, 16, 64, 3, 4
    g = torch.Generator().manual_seed(23)
    x = torch.randn(B, L, d, generator=g).to(DEVICE)
    W = (torch.randn(L, F, d, generator=g) * torch.tensor([4.0, 1.0, 0.5])[:, None, None] / d ** 0.5).to(DEVICE)
    b = torch.zeros(L, F, device=DEVICE)
    ref = batch_topk_layers(torch.einsum("bld,lfd->lbf", x, W), k)
    tenc.encode_layers(x, W, b, k)  # learns τ and the capacities
    tenc.STATS.clear()
    for _ in range(3):
        codes = tenc.encode_layers(x, W, b, k)
        for l in range(L):
            assert torch.equal(pattern(codes[l], F), pattern(ref[l], F))
    assert max(c.nnz for c in codes) > 2 * min(c.nnz for c in codes)  # the layers do differ
    assert tenc.STATS["overflow_rerun"] == 0, dict(tenc.STATS)
    assert tenc.STATS["batchtopk_retry"] == 0, dict(tenc.STATS)


def test_benchmark_rows_note_the_fallbacks():
    """benchmarks print the encode's fallback counters (overflow reruns, τ samples) per case."""
    from collections import Counter

    from benchmarks.harness import _stats_note

    assert _stats_note(Counter(sample_tau=1), Counter(sample_tau=1)) == ""
    assert _stats_note(Counter(sample_tau=1), Counter(sample_tau=1, overflow_rerun=2, topk_dense_rows=3)) == \
        "triton encode fallbacks: overflow_rerun=2, topk_dense_rows=3"


# ------------------------------------------------------------------------- FASTCLT_AUTOTUNE_CONFIGS
def test_autotune_configs_env_limits_every_space(monkeypatch):
    from fastclt.ops.triton import AUTOTUNE_CONFIGS_ENV, autotune_limit, first_configs

    monkeypatch.delenv(AUTOTUNE_CONFIGS_ENV, raising=False)
    assert autotune_limit() is None and first_configs([1, 2, 3]) == [1, 2, 3]
    monkeypatch.setenv(AUTOTUNE_CONFIGS_ENV, "")
    assert autotune_limit() is None
    monkeypatch.setenv(AUTOTUNE_CONFIGS_ENV, " 2 ")
    assert first_configs([1, 2, 3]) == [1, 2]
    monkeypatch.setenv(AUTOTUNE_CONFIGS_ENV, "9")
    assert first_configs([1, 2, 3]) == [1, 2, 3]
    # the encode's pruning applies it after dropping what does not fit
    configs = tenc._gpu_configs()
    x = torch.zeros(2, 2, device=DEVICE)
    fitting = configs
    if ON_GPU:
        major, minor = torch.cuda.get_device_capability()
        fitting = tenc.gpu_configs(4, 10 * major + minor, tenc.smem_limit(x.device), tenc._aligned(x))
    monkeypatch.setenv(AUTOTUNE_CONFIGS_ENV, "1")
    assert tenc._early_prune(configs, {"x_ptr": x, "w_ptr": x}) == fitting[:1]
    for bad in ("0", "-1", "two", "1.5"):
        monkeypatch.setenv(AUTOTUNE_CONFIGS_ENV, bad)
        with pytest.raises(ValueError, match=f"{AUTOTUNE_CONFIGS_ENV}: expected a positive integer"):
            autotune_limit()


def test_autotune_configs_env_bad_value_fails_at_import():
    import subprocess
    import sys

    env = dict(os.environ, FASTCLT_AUTOTUNE_CONFIGS="all")
    proc = subprocess.run([sys.executable, "-c", "import fastclt.ops.triton.encode"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "FASTCLT_AUTOTUNE_CONFIGS: expected a positive integer" in proc.stderr
