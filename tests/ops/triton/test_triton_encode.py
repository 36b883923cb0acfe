"""What only the fused Triton encode (fastclt/ops/triton/encode.py) does, against the reference
encode: the speculative-threshold fallbacks, the candidate buffer's capacity, the speculative state
and autotune keys, FASTCLT_AUTOTUNE_CONFIGS. (What every encode implementation must do:
tests/ops/test_encode.py.) Runs under TRITON_INTERPRET=1 without a GPU (tiny sizes)."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import fastclt.ops.triton.encode as tenc  # noqa: E402
from _encode_cases import compare_fp32 as compare  # noqa: E402
from _encode_cases import make_inputs, pattern  # noqa: E402
from fastclt.ops.reference.select import batch_topk_layers  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ON_GPU = DEVICE == "cuda"
ODD = (13, 19, 37)  # B, d_in, F


def compare_fp32(act, k, inputs, upstream, allowed_flips=0, keep=()):
    return compare(tenc.encode, act, k, inputs, upstream, allowed_flips, keep)


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


# --------------------------------------------------------------- autotune keys and speculative state
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
    from fastclt.ops.triton._common import AUTOTUNE_CONFIGS_ENV, autotune_limit, first_configs

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
