"""The synthetic activations (fastclt/training/synthetic.py): a batch is a pure function of
(seed, dp rank, index); features are active with probability p, independently, with magnitudes
uniform on [0.5, 1.5); x and y come from the same activities (x = a E, y = a U without noise)."""
import math

import pytest
import torch

from fastclt.training.synthetic import SyntheticActivations


def _gen(**kw):
    args = dict(n_layers=3, d_in=24, d_out=20, n_true=16, true_l0=2.0, noise=0.0, seed=5)
    args.update(kw)
    return SyntheticActivations(**args)


def test_batches_are_pure_functions_of_seed_rank_index():
    s = _gen(noise=0.1)
    x, y = s.batch(7, 33, dp_rank=1)
    x2, y2 = _gen(noise=0.1).batch(7, 33, dp_rank=1)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    assert x.shape == (33, 3, 24) and y.shape == (33, 3, 20) and x.dtype == torch.float32
    for other in (s.batch(8, 33, dp_rank=1), s.batch(7, 33, dp_rank=0), _gen(noise=0.1, seed=6).batch(7, 33, 1)):
        assert not torch.equal(other[0], x)
    assert torch.isfinite(x).all() and torch.isfinite(y).all()


def _activities(s, x):
    """Without noise x_l = a_l E_l with E_l [n_true, d_in] of full row rank: a by least squares."""
    E = s.E  # [L, n_true, d_in]
    a = torch.linalg.lstsq(E.transpose(1, 2).double(), x.transpose(0, 1).transpose(1, 2).double()).solution
    return a.transpose(1, 2).transpose(0, 1)  # [B, L, n_true]


def test_x_and_y_share_their_activities():
    s = _gen()
    x, y = s.batch(3, 257)
    a = _activities(s, x)
    # the activities are 0 or in [0.5, 1.5)
    off = a.abs() < 1e-6
    assert ((a[~off] >= 0.5 - 1e-6) & (a[~off] < 1.5 + 1e-6)).all()
    y_want = (a.reshape(257, -1) @ s._U_all.double()).view_as(y)
    torch.testing.assert_close(y.double(), y_want, rtol=1e-5, atol=1e-5)


def test_activity_rate_and_magnitudes():
    s = _gen(true_l0=3.0)
    xs = [s.batch(i, 512)[0] for i in range(6)]
    a = torch.cat([_activities(s, x) for x in xs])
    on = a.abs() > 1e-6
    n, p = on.numel(), s.p
    sd = math.sqrt(n * p * (1 - p))
    assert abs(on.sum().item() - n * p) < 5 * sd
    # every feature of every layer is equally likely (no position is favoured by the sampler)
    per = on.float().mean(0)  # [L, n_true]
    assert (per - p).abs().max() < 6 * math.sqrt(p * (1 - p) / a.shape[0])
    m = a[on]
    assert abs(m.mean().item() - 1.0) < 5 * math.sqrt(1 / 12 / m.numel())
    assert abs(m.var().item() - 1 / 12) < 0.01


def test_noise_level():
    s0, s1 = _gen(), _gen(noise=0.05)
    x0, y0 = s0.batch(2, 300)
    x1, y1 = s1.batch(2, 300)
    # the same activities (same draws), plus Gaussian noise of the given std
    for clean, noisy in ((x0, x1), (y0, y1)):
        e = noisy - clean
        assert abs(e.std().item() - 0.05) < 0.003 and abs(e.mean().item()) < 0.003


@pytest.mark.parametrize("n,p", [(1, 0.5), (37, 0.3), (1000, 0.01), (50_000, 0.047), (20, 1.0)])
def test_active_positions(n, p):
    s = _gen(n_true=100, true_l0=100 * p)
    g = torch.Generator().manual_seed(11)
    counts = []
    for _ in range(200 if n < 1000 else 20):
        pos = s._active(n, g)
        assert pos.dtype == torch.int64
        if pos.numel():
            assert pos.min() >= 0 and pos.max() < n
            assert (pos.diff() > 0).all()  # increasing, so distinct
        counts.append(pos.numel())
    mean = sum(counts) / len(counts)
    if p == 1.0:
        assert counts == [n] * len(counts)
    else:
        assert abs(mean - n * p) < 5 * math.sqrt(n * p * (1 - p) / len(counts))


def test_small_batches_come_in_chunks_large_ones_alone():
    """Small batches are rows of a chunk of C drawn together (the same numbers in any call order, for
    any rank and batch size, whatever was drawn before); a batch too large to chunk is drawn alone."""
    s = _gen(noise=0.1)
    C = s.chunk_batches(40)
    assert C == s.MAX_CHUNK and s.chunk_batches(100_000) == 1
    x_chunk, y_chunk = s._draw(1, 40 * C, 0, C)
    order = [C + 2, 0, C + 2, 2 * C - 1, C]
    for i in order:
        x, y = s.batch(i, 40)
        j = i - C
        if 0 <= j < C:
            assert torch.equal(x, x_chunk[j * 40:(j + 1) * 40]) and torch.equal(y, y_chunk[j * 40:(j + 1) * 40])
    a = _gen(noise=0.1)
    for i in reversed(order):  # another order, interleaved with other ranks and sizes
        a.batch(i, 40, dp_rank=1)
        a.batch(i, 41)
        assert all(torch.equal(u, v) for u, v in zip(a.batch(i, 40), s.batch(i, 40)))
    assert not torch.equal(s.batch(3, 40)[0], s.batch(3, 40, dp_rank=1)[0])
    big = _gen(noise=0.1)
    B = 100_000
    assert torch.equal(big.batch(5, B)[0], big._draw(5, B, 0, 1)[0])
    sae = _gen(kind="sae", noise=0.1)
    x, y = sae.batch(3, 40)
    assert x is y and x.shape == (40, 3, 24)


# ------------------------------------------------------------------------------------ philox_normal
def test_philox_words_match_the_published_answers():
    """Philox4x32-10 against the known-answer vectors of its authors' Random123 library (counter,
    key → four words): zeros, all ones, and the digits of π."""
    from fastclt.training.synthetic import _philox4x32
    cases = [((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
             ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
             ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
              (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1))]
    for ctr, key, want in cases:
        got = _philox4x32([torch.tensor([v]) for v in ctr], key)
        assert tuple(int(w) for w in got) == want


def _both_normals(monkeypatch, n, seed, stream, std):
    """(the extension's draws, the PyTorch ops' draws) of philox_normal."""
    from fastclt import _ext
    from fastclt.training.synthetic import philox_normal
    if not _ext.has_cpu_ext():
        pytest.skip(_ext.missing_message("cpu"))
    ext = philox_normal(n, seed, stream, std)
    with monkeypatch.context() as m:
        m.setattr(_ext, "has_cpu_ext", lambda: False)
        ops = philox_normal(n, seed, stream, std)
    return ext, ops


@pytest.mark.parametrize("n,seed,stream,std", [(1, 0, 0, 1.0), (1001, 5, 1, 0.02), (64 * 257 + 3, 2 ** 61 + 7, 3, 2.5),
                                               (0, 1, 0, 1.0)])
def test_philox_normal_kernel_matches_the_ops(monkeypatch, n, seed, stream, std):
    """fastclt::normal_philox_ (polynomial ln, sin, cos) against PyTorch's functions on the same
    uniforms: equal to float rounding, at sizes that cut a block of four and a sweep of 64, a seed
    above 2³², a stream above 0."""
    ext, ops = _both_normals(monkeypatch, n, seed, stream, std)
    assert ext.shape == ops.shape == (n,) and ext.dtype == torch.float32
    torch.testing.assert_close(ext, ops, rtol=2e-6, atol=2e-6 * std)


def test_philox_normal_is_a_function_of_the_index(monkeypatch):
    """A value depends on (seed, stream, index) only: a shorter draw is a prefix of a longer one,
    whatever the thread count; seeds and streams give different, uncorrelated draws; every value
    of the output is written (the buffer starts as NaN)."""
    from fastclt.training.synthetic import philox_normal
    long = philox_normal(100_003, 9, 0, 1.0)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.equal(philox_normal(5_001, 9, 0, 1.0), long[:5_001])
    finally:
        torch.set_num_threads(threads)
    for other in (philox_normal(100_003, 10, 0, 1.0), philox_normal(100_003, 9, 1, 1.0)):
        assert abs(float(torch.corrcoef(torch.stack([long, other]))[0, 1])) < 5 / 100_003 ** 0.5
    from fastclt import _ext
    if _ext.has_cpu_ext():
        out = torch.full((777,), float("nan"))
        torch.ops.fastclt.normal_philox_(out, 9, 0, 1.0)
        assert torch.equal(out, long[:777])


@pytest.mark.parametrize("use_ext", [True, False])
def test_philox_normal_is_gaussian(monkeypatch, use_ext):
    """2^18 draws: mean, variance, kurtosis within their sampling errors, and the largest gap between
    the empirical and the normal CDF (Kolmogorov-Smirnov) below its 0.1% critical value; the two
    values of a Box-Muller pair uncorrelated."""
    from fastclt import _ext
    from fastclt.training.synthetic import philox_normal
    if use_ext and not _ext.has_cpu_ext():
        pytest.skip(_ext.missing_message("cpu"))
    n = 2 ** 18
    with monkeypatch.context() as m:
        if not use_ext:
            m.setattr(_ext, "has_cpu_ext", lambda: False)
        z = philox_normal(n, 123, 0, 1.0).double()
    assert abs(float(z.mean())) < 5 / n ** 0.5
    assert abs(float(z.var()) - 1) < 5 * (2 / n) ** 0.5
    assert abs(float((z ** 4).mean()) - 3) < 5 * (96 / n) ** 0.5
    cdf = 0.5 * (1 + torch.erf(z.sort().values / 2 ** 0.5))
    i = torch.arange(1, n + 1, dtype=torch.float64)
    ks = float(torch.maximum(i / n - cdf, cdf - (i - 1) / n).max())
    assert ks < 1.95 / n ** 0.5
    pairs = z.view(-1, 2)
    assert abs(float((pairs[:, 0] * pairs[:, 1]).mean())) < 5 / (n / 2) ** 0.5


def test_philox_normal_bad_input():
    from fastclt import _ext
    from fastclt.training.synthetic import philox_normal
    for kw, what in ((dict(n=-1), "n=-1"), (dict(stream=2 ** 32), "stream=4294967296"), (dict(std=-0.5), "std=-0.5")):
        args = dict(n=4, seed=0, stream=0, std=1.0)
        args.update(kw)
        with pytest.raises(ValueError, match=what):
            philox_normal(**args)
    if _ext.has_cpu_ext():
        op = torch.ops.fastclt.normal_philox_
        with pytest.raises(RuntimeError, match="out must be float32"):
            op(torch.empty(8, dtype=torch.float64), 0, 0, 1.0)
        with pytest.raises(RuntimeError, match="out must be contiguous"):
            op(torch.empty(8, 2)[:, 0], 0, 0, 1.0)
        with pytest.raises(ValueError, match="stream must be in"):
            op(torch.empty(8), 0, -1, 1.0)
        torch.library.opcheck(op, (torch.empty(37), 3, 1, 0.5))
