"""Dense or sparse by density (fastclt/ops/density.py, fastclt/ops/dense/, the encoder backward's
dense branch in fastclt/ops/encoder_backward.py; docs/DESIGN.md §17).

- the crossover: defaults, the environment variable, ``set_crossover`` / ``crossover``, bad values;
- ``impl="auto"`` routes a decode to the dense formulation at and above the crossover, and an
  explicit impl is never re-routed;
- dense and sparse paths — CSR codes into sparse ops, CSR codes into the dense ops, and codes held
  dense (``DenseCodes``) from the encoder to the losses — give the same loss and every gradient of
  whole models (CLT of every tying,
  with the feature affine; SAE with its pre-bias; JumpReLU and ReLU) at densities 0, one entry,
  about the crossover, 50% and 100%, in fp64 (the reference against the dense formulation) and in
  fp32 / bf16 (the kernels, sparse and dense encoder backward and decode);
- Matryoshka dictionaries: the prefix decodes choose by the density of the codes before their split
  into G row blocks (G times sparser), and decode densely by column blocks of one [B, F];
- MOLT gates (ReLU/JumpReLU) at a high density: the encoder backward's dense branch;
- the switch in both directions within one training run, against a run kept sparse;
- the memory of the reference decodes at 50% density stays below the dense formulation's.
The dense implementations' own forward/backward tests against the reference (odd sizes, dtypes,
NaN-poisoned outputs) are those of tests/ops/test_decode.py and test_clt_decode.py, which run every
registered implementation."""
import math
import zlib

import pytest
import torch

import fastclt
from _alloc import AllocationTracker
from _decode_cases import make_clt_inputs
from _impls import impl_params, takes
from _util import assert_close
from fastclt import _ext, ops
from fastclt.codes import SparseCodes
from fastclt.ops import density

CPU_KERNELS = _ext.has_cpu_ext()


@pytest.fixture(autouse=True)
def _no_env(monkeypatch):
    monkeypatch.delenv(density.ENV, raising=False)
    monkeypatch.delenv("FASTCLT_IMPL", raising=False)
    density.set_crossover(None)
    yield
    density.set_crossover(None)


# ---------------------------------------------------------------------------- the crossover
def test_defaults_and_overrides(monkeypatch):
    cpu = torch.device("cpu")
    for op in density.OPS:
        assert density.crossover_for(op, cpu, torch.float32) == density.DEFAULTS[("cpu", torch.float32)][op]
        assert density.crossover_for(op, cpu, torch.float64) == density.FALLBACK
    density.set_crossover(0.25)
    assert all(density.crossover_for(op, cpu, torch.float32) == 0.25 for op in density.OPS)
    density.set_crossover("never", op="sparse_decode")
    assert density.crossover_for("sparse_decode", cpu, torch.float32) == math.inf
    assert density.crossover_for("clt_decode", cpu, torch.float32) == 0.25
    with density.crossover("always"):
        assert density.crossover_for("clt_decode", cpu, torch.float32) == 0.0
    assert density.crossover_for("clt_decode", cpu, torch.float32) == 0.25  # restored
    monkeypatch.setenv(density.ENV, "encode_backward=0.5, clt_decode = never")  # the environment wins
    assert density.crossover_for("encode_backward", cpu, torch.float32) == 0.5
    assert density.crossover_for("clt_decode", cpu, torch.float32) == math.inf
    assert density.crossover_for("sparse_decode", cpu, torch.float32) == math.inf  # from set_crossover
    monkeypatch.setenv(density.ENV, "0.125")
    assert density.crossover_for("sparse_decode", cpu, torch.float32) == 0.125


@pytest.mark.parametrize("text,match", [("decode=0.1", "unknown op 'decode'"), ("fast", "expected a density"),
                                        ("-0.5", "expected a density >= 0"), ("nan", "expected a density >= 0"),
                                        (",", "expected a density")])
def test_bad_crossover_is_named(monkeypatch, text, match):
    monkeypatch.setenv(density.ENV, text)
    with pytest.raises(ValueError, match=f"{density.ENV}: {match}"):
        density.crossover_for("sparse_decode", torch.device("cpu"), torch.float32)
    monkeypatch.delenv(density.ENV)
    with pytest.raises(ValueError, match="op: expected one of"):
        density.set_crossover(0.1, op="decode")


def test_codes_density_and_flat_index(gen):
    a = torch.randn(7, 11, generator=gen).relu()
    codes = SparseCodes.from_dense(a)
    assert codes.density() == pytest.approx(int((a > 0).sum()) / 77)
    flat = codes.flat_index()
    assert torch.equal(a.reshape(-1)[flat], codes.value)
    assert codes.with_value(codes.value * 2).flat_index() is flat  # shared by codes of the same pattern
    empty = SparseCodes(torch.zeros(1, dtype=torch.int64), torch.zeros(0, dtype=torch.int32), torch.zeros(0), 5)
    assert empty.density() == 0.0


def test_auto_routes_decodes_by_density(gen):
    cpu = torch.device("cpu")
    sparse_impl = "cpu" if CPU_KERNELS else "reference"
    for dt in (torch.float32, torch.float64):
        low = ops.resolve("sparse_decode", "auto", cpu, dt, density=0.01)[0]
        assert low == (sparse_impl if dt == torch.float32 else "reference")
        assert ops.resolve("sparse_decode", "auto", cpu, dt, density=0.9)[0] == "dense"
        assert ops.resolve("clt_decode", "auto", cpu, dt, density=0.9)[0] == "dense"
    with density.crossover("never"):
        assert ops.resolve("sparse_decode", "auto", cpu, torch.float32, density=1.0)[0] == sparse_impl
    with density.crossover("always"):
        assert ops.resolve("clt_decode", "auto", cpu, torch.float32, density=0.0)[0] == "dense"
        # a named implementation is what runs, whatever the density
        assert ops.resolve("clt_decode", "reference", cpu, torch.float32, density=1.0)[0] == "reference"
        # ops without a dense formulation ignore the density
        assert ops.resolve("encode", "auto", cpu, torch.float32, density=1.0)[0] != "dense"
    # the entry point measures the codes' density itself
    W = torch.randn(6, 3, generator=gen)
    full = SparseCodes.from_dense(torch.rand(4, 6, generator=gen) + 0.1)
    density.STATS.clear()
    ops.sparse_decode(full, W)
    assert density.STATS[("sparse_decode", "dense")] == 1


# ------------------------------------------------------------------- the encoder backward
@pytest.mark.parametrize("activation", ["jumprelu", "relu", "topk"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("impl,device", impl_params("encode"))
def test_encoder_backward_dense_equals_sparse(impl, device, activation, dtype):
    """Every kernel backend's encoder backward: the dense branch (dH and two GEMMs) gives the sparse
    branch's dx, dW_enc, db_enc, dθ and d pre-bias, and both the reference's (its autograd; fp32)."""
    takes("encode", impl, dtype)
    gen = torch.Generator().manual_seed(11)
    B, F, d = 29, 53, 19
    x = torch.randn(B, d, generator=gen).to(device, dtype)
    W = (torch.randn(F, d, generator=gen) / d ** 0.5).to(device, dtype)
    b = (0.3 * torch.randn(F, generator=gen)).to(device, dtype)
    theta = (0.2 * torch.rand(F, generator=gen)).to(device, dtype)
    pre = (0.1 * torch.randn(d, generator=gen)).to(device, dtype)
    up = torch.randn(B, F, generator=gen).to(device, torch.float32)
    kw = dict(activation=activation, k=9, threshold=theta if activation == "jumprelu" else None, bandwidth=0.1)

    def grads(which, crossover):
        leaves = [t.detach().clone().requires_grad_() for t in (x, W, b, theta, pre)]
        xi, Wi, bi, ti, pi = leaves
        if activation != "jumprelu":
            ti = None
        density.STATS.clear()
        with density.crossover(crossover):
            codes = ops.encode(xi, Wi, bi, pre_bias=pi, impl=which, **{**kw, "threshold": ti})
            loss = (codes.value.float() * up.reshape(-1)[codes.flat_index()]).sum()
            loss.backward()
        return [torch.zeros_like(t) if t.grad is None else t.grad for t in leaves], dict(density.STATS)
    dense, st_d = grads(impl, "always")
    sparse, st_s = grads(impl, "never")
    # (bf16: the kernels' fp32 h can put an entry on the other side of θ than the reference's bf16 h)
    ref = grads("reference", "never")[0] if dtype == torch.float32 else sparse
    assert st_d.get(("encode_backward", "dense")) == 1 and st_s.get(("encode_backward", "sparse")) == 1
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for name, gd, gs, gr in zip(("dx", "dW_enc", "db_enc", "dθ", "d pre_bias"), dense, sparse, ref):
        assert_close(gd, gs, tol, name + " dense vs sparse")
        assert_close(gd, gr, tol, name + " dense vs reference")


# ------------------------------------------------------------- dense = sparse, whole models
MODELS = ["clt-none", "clt-per_source-affine", "clt-per_target-affine", "plt", "sae",
          "clt-none-matryoshka", "clt-per_target-affine-matryoshka", "sae-matryoshka"]
DENSITIES = ["zero", "one", "crossover", "half", "full"]
CROSS = 0.3


def _model(kind: str, activation: str, dtype: str, seed: int):
    torch.manual_seed(seed)
    common = dict(activation=activation, jumprelu_bandwidth=1e-3, sparsity_coef=0.1, dtype=dtype,
                  init_fire_rate=None, matryoshka_prefixes=[5, 17, 37] if kind.endswith("matryoshka") else None)
    if kind.startswith("sae"):
        return fastclt.SparseAutoencoder(fastclt.SAEConfig(d_in=10, n_features=37, **common))
    L = 1 if kind == "plt" else 3
    tying = kind.split("-")[1] if kind.startswith("clt-") else "none"
    return fastclt.CrossLayerTranscoder(fastclt.CLTConfig(
        n_layers=L, d_in=10, d_out=9, n_features=37, decoder_tying=tying, feature_affine="affine" in kind,
        **common))


def _set_density(model, x, which: str) -> None:
    """Thresholds (JumpReLU) or encoder biases (ReLU) so that each layer's codes hold about the
    wanted fraction of all entries: none, one, the crossover, half, all."""
    W_enc, b_enc, _ = model._enc_layers()
    pre = model._pre_bias()
    xl = model._layered(x, "x")
    with torch.no_grad():
        for l in range(model.n_layers):
            h = ops.preacts(xl[:, l], W_enc[l], b_enc[l], pre).double()
            flat = h.flatten().sort(descending=True).values
            n = {"zero": 0, "one": 1, "crossover": round(CROSS * flat.numel()), "half": flat.numel() // 2,
                 "full": flat.numel()}[which]
            if n == 0:
                cut = float(flat[0]) + 1.0
            elif n == flat.numel():
                cut = float(flat[-1]) - 1.0
            else:
                cut = float(flat[n - 1] + flat[n]) / 2
            if model.cfg.activation == "jumprelu":
                model.threshold.view(model.n_layers, -1)[l].fill_(cut)
            else:  # ReLU: h − cut > 0 on the same entries
                b_enc.view(model.n_layers, -1)[l].sub_(cut)


def _loss_and_grads(model, x, y, crossover):
    model.zero_grad(set_to_none=True)
    density.STATS.clear()
    with density.crossover(crossover):
        out = model.loss(x, y)
        out.loss.backward()
    grads = {n: (torch.zeros_like(p) if p.grad is None else p.grad.clone()) for n, p in model.named_parameters()}
    return out.loss.detach(), grads, dict(density.STATS)


# every model with JumpReLU; ReLU (the same paths, another mask) on one CLT and the SAE
KINDS = [(m, "jumprelu") for m in MODELS] + [("clt-none", "relu"), ("sae", "relu")]


@pytest.mark.parametrize("which", DENSITIES)
@pytest.mark.parametrize("kind,activation", KINDS)
@pytest.mark.parametrize("dtype", ["float64", "float32", "bfloat16"])
def test_dense_and_sparse_paths_agree(kind, activation, which, dtype):
    if dtype != "float64" and not CPU_KERNELS:
        pytest.skip(_ext.missing_message("cpu"))
    # a seed fixed per case (str hash() is salted per process: the case would change from run to run)
    model = _model(kind, activation, dtype, seed=zlib.crc32(f"{kind}-{activation}-{which}".encode()) % 1000)
    dt = model.param_dtype
    gen = torch.Generator().manual_seed(7)
    B = 23
    shape = (B, 10) if kind.startswith("sae") else (B, model.n_layers, 10)
    x = torch.randn(*shape, generator=gen).to(dt)
    y = None if kind.startswith("sae") else torch.randn(B, model.n_layers, 9, generator=gen).to(dt)
    _set_density(model, x, which)
    with torch.no_grad():
        codes = model.encode(x)
    codes = [codes] if isinstance(codes, SparseCodes) else codes
    d = sum(c.nnz for c in codes) / (len(codes) * B * model.cfg.n_features)
    want = {"zero": 0.0, "one": 1 / (B * model.cfg.n_features), "crossover": CROSS, "half": 0.5, "full": 1.0}[which]
    assert abs(d - want) <= 0.02 or (which == "one" and 0 < d <= 2 / (B * 37)), d
    loss_s, grads_s, stats_s = _loss_and_grads(model, x, y, "never")
    # the dense ops on CSR codes, then codes held dense (DenseCodes: the previous call's density, any,
    # is at least the crossover 0) into the same dense ops
    loss_c, grads_c, stats_c = _loss_and_grads(model, x, y, {None: "always", "codes": "never"})
    loss_d, grads_d, stats_d = _loss_and_grads(model, x, y, "always")
    assert not any(k[1] == "dense" for k in stats_s) and not any(k[1] == "sparse" for k in stats_d)
    assert stats_c[("codes", "sparse")] == 1 and stats_d[("codes", "dense")] == 1
    for st in (stats_c, stats_d):
        assert any(k[0] in ("sparse_decode", "clt_decode") and k[1] == "dense" for k in st)
    # fp32/bf16: the paths sum in different orders, and gradients where the reconstruction and
    # sparsity terms nearly cancel lose a few digits (worst of 25 seeds: fp32 7e-4, bf16 3e-2)
    tol = {"float64": 1e-10, "float32": 2e-3, "bfloat16": 8e-2}[dtype]
    for name, loss, grads in (("dense ops", loss_c, grads_c), ("dense codes", loss_d, grads_d)):
        assert_close(loss, loss_s, tol, f"loss ({name})")
        for n in grads_s:
            assert_close(grads[n], grads_s[n], tol, f"d{n} ({name})") if grads_s[n].abs().sum() > 0 else \
                assert_close(grads[n].abs().sum(), grads_s[n].abs().sum(), 0, f"d{n} (zero, {name})")


def test_matryoshka_decodes_choose_by_the_density_before_the_split(gen):
    """At 50% density the G = 3 split rows hold 1/6 of their [G·B, F] entries: below the crossover, yet
    ``impl="auto"`` decodes densely (the codes' own density), by column blocks of one [B, F] — the same
    blocks and gradients as the split sparse decode; at a low density it decodes sparsely."""
    B, L, F, d = 40, 3, 30, 7
    prefixes = [4, 13, 30]

    def codes_at(p):
        a = torch.rand(B, F, generator=gen) * (torch.rand(B, F, generator=gen) < p)
        return SparseCodes.from_dense(a)
    W_sae = torch.randn(F, d, generator=gen)
    W_clt = torch.randn(L, F, d, generator=gen)
    off, sc = 0.2 * torch.randn(L, F, generator=gen), torch.rand(L, F, generator=gen) + 0.5
    with density.crossover(0.3):
        for p, want in ((0.5, "dense"), (0.05, "sparse")):
            c = codes_at(p)
            cs = [codes_at(p) for _ in range(L)]
            assert (c.density() >= 0.3) == (want == "dense")
            cases = {"sparse_decode": lambda impl: ops.matryoshka_blocks(c, W_sae, prefixes, impl=impl),
                     "clt_decode": lambda impl: ops.matryoshka_clt_blocks(cs, W_clt, "per_target", prefixes, off, sc,
                                                                          impl=impl)}
            for op, fn in cases.items():
                density.STATS.clear()
                got = fn("auto")
                assert dict(density.STATS) == {(op, want): 1}, (op, p, dict(density.STATS))
                assert_close(got, fn("dense" if want == "sparse" else "reference"), 1e-5, f"{op} at {p}")


@pytest.mark.parametrize("activation", ["jumprelu", "relu"])
def test_molt_gates_at_high_density_dense_equals_sparse(activation):
    """A MOLT whose ReLU/JumpReLU gates open on half the (token, transform) pairs: the encoder backward's
    dense branch gives the sparse branch's loss and every gradient (no pre-activation loss: with one,
    the encoder keeps its dense pre-activations and autograd runs through them on either setting)."""
    if not CPU_KERNELS:
        pytest.skip(_ext.missing_message("cpu"))
    torch.manual_seed(4)
    m = fastclt.MOLT(fastclt.MOLTConfig(n_layers=2, d_in=12, d_out=10, n_features=9, ranks=[5, 3, 1],
                                        rank_counts=[2, 3, 4], activation=activation, threshold_init=0.1,
                                        jumprelu_bandwidth=0.5, sparsity_coef=0.3))
    gen = torch.Generator().manual_seed(9)
    x, y = torch.randn(48, 2, 12, generator=gen), torch.randn(48, 2, 10, generator=gen)
    m.initialize_from_data(x, y, fire_rate=0.5)
    loss_s, grads_s, stats_s = _loss_and_grads(m, x, y, "never")
    loss_d, grads_d, stats_d = _loss_and_grads(m, x, y, "always")
    assert stats_d.get(("encode_backward", "dense")) and not stats_d.get(("encode_backward", "sparse"))
    assert stats_s.get(("encode_backward", "sparse")) and not stats_s.get(("encode_backward", "dense"))
    with torch.no_grad():
        codes = m.encode(x)
    assert 0.35 < sum(c.nnz for c in codes) / (2 * 48 * 9) < 0.65
    assert_close(loss_d, loss_s, 1e-5, "loss")
    for n in grads_s:
        assert_close(grads_d[n], grads_s[n], 1e-5, f"d{n}")


def _twin_runs(crossovers, scales, steps=6):
    """Train two identical JumpReLU CLTs on the same batches, one with ``crossovers[0]``, one with
    ``crossovers[1]``; batch i is scaled by scales[i % len(scales)]. Returns per-step losses,
    the density per step, the final parameters and the formulations each run chose."""
    out = []
    for cross in crossovers:
        model = _model("clt-none", "jumprelu", "float32", seed=3)
        model.cfg.init_fire_rate = None
        opt = torch.optim.Adam(model.parameters(), lr=3e-3)
        gen = torch.Generator().manual_seed(5)
        x0 = torch.randn(31, 3, 10, generator=gen)
        _set_density(model, x0, "crossover")  # θ > 0: batches scaled down fire (almost) nowhere
        losses, dens, stats = [], [], {}
        density.STATS.clear()
        with density.crossover(cross):
            for i in range(steps):
                x = torch.randn(31, 3, 10, generator=gen) * scales[i % len(scales)]
                y = torch.randn(31, 3, 9, generator=gen)
                opt.zero_grad()
                r = model.loss(x, y)
                r.loss.backward()
                opt.step()
                model.post_step()
                losses.append(float(r.loss.detach()))
                dens.append(sum(c.nnz for c in r.codes) / (3 * 31 * 37))
        stats = dict(density.STATS)
        out.append((losses, dens, {n: p.detach().clone() for n, p in model.named_parameters()}, stats))
    return out


def test_the_switch_both_ways_within_one_run():
    """Batches go two dense (about 30% of the entries fire), two sparse (scaled down: few fire), and
    again: with the crossover between them the run switches to the dense formulation and back —
    the ops per call, the codes held dense (``DenseCodes``) from the step after a dense one, back to
    CSR the step after a sparse one; it trains exactly as a run kept sparse throughout."""
    (loss_a, dens_a, params_a, stats_a), (loss_s, dens_s, params_s, stats_s) = _twin_runs(
        (0.2, "never"), (1.0, 1.0, 0.05, 0.05), steps=10)
    dense_steps, sparse_steps = [0, 1, 4, 5, 8, 9], [2, 3, 6, 7]
    assert min(dens_a[i] for i in dense_steps) > 0.2 and max(dens_a[i] for i in sparse_steps) < 0.2, dens_a
    # codes: CSR at step 0 (no history: not counted), dense at 1, 2 (one step late), 5, 6, 9; CSR at 3,
    # 4, 7, 8 (counted)
    assert stats_a[("codes", "dense")] == 5 and stats_a[("codes", "sparse")] == 4, stats_a
    # the decode is sparse only where CSR codes are sparse (steps 3 and 7); where the codes are CSR the
    # encoder backward is dense at the dense steps 0, 4, 8 and sparse at the sparse steps 3 and 7
    assert stats_a[("clt_decode", "sparse")] == 2 and stats_a[("clt_decode", "dense")] == 8, stats_a
    if CPU_KERNELS:
        assert stats_a.get(("encode_backward", "dense"), 0) >= 2 and stats_a.get(("encode_backward", "sparse"), 0) >= 2
    for op in ("clt_decode", "encode_backward", "codes"):
        assert stats_s.get((op, "dense"), 0) == 0
    assert_close(torch.tensor(loss_a), torch.tensor(loss_s), 1e-4, "losses")
    for n in params_s:
        assert_close(params_a[n], params_s[n], 1e-4, n)


# ------------------------------------------------------------------------------- memory
def _peak(fn) -> tuple[int, int]:
    with AllocationTracker() as t:
        fn()
    return t.peak, t.largest


@pytest.mark.parametrize("tying", ["none", "per_source", "per_target"])
def test_reference_memory_at_half_density_is_below_dense(tying):
    """At 50% density the reference decodes hold no [nnz, d] tensor of gathered rows: their peak
    extra memory, forward and backward, is at most the dense formulation's."""
    B, L, F, d = 96, 3, 160, 48
    k = F  # row lengths uniform in 1..F: about half of all entries
    codes, W, b, off, sc, g = make_clt_inputs(tying, "both" if tying != "none" else "none", torch.float32,
                                              (B, L, F, d, k), 3, "cpu")
    codes = [c.with_value(c.value.detach().requires_grad_()) for c in codes]
    W = [w.requires_grad_() for w in W] if isinstance(W, list) else W.requires_grad_()
    d_avg = sum(c.nnz for c in codes) / (L * B * F)
    assert 0.4 < d_avg < 0.6, d_avg

    def step(impl):
        def run():
            y = ops.clt_decode(codes, W, tying, b, off, sc, impl=impl)
            y.backward(g)
        return run
    ref_peak, ref_largest = _peak(step("reference"))
    dense_peak, _ = _peak(step("dense"))
    nnz = max(c.nnz for c in codes)
    assert ref_largest < nnz * d * 4, (ref_largest, nnz * d * 4)  # not one [nnz, d] fp32 tensor
    assert ref_peak <= dense_peak, (ref_peak, dense_peak)
    # and the dense formulation itself: O(L) [B, F] tensors (codes, masks of the affine, gradients),
    # outputs, dW, the entries' flat positions
    W_bytes = sum(w.numel() for w in (W if isinstance(W, list) else [W])) * 4
    assert dense_peak <= (3 * L * B * F + 3 * B * L * d) * 4 + 2 * W_bytes + 8 * L * nnz, dense_peak


def test_sparse_decode_reference_memory_at_half_density():
    B, F, D = 128, 200, 96
    gen = torch.Generator().manual_seed(1)
    a = torch.rand(B, F, generator=gen) * (torch.rand(B, F, generator=gen) < 0.5)
    codes = SparseCodes.from_dense(a)
    codes = codes.with_value(codes.value.requires_grad_())
    W = torch.randn(F, D, generator=gen, requires_grad=True)
    g = torch.randn(B, D, generator=gen)

    def step(impl):
        return lambda: ops.sparse_decode(codes, W, impl=impl).backward(g)
    ref_peak, ref_largest = _peak(step("reference"))
    dense_peak, _ = _peak(step("dense"))
    assert ref_largest < codes.nnz * D * 4
    assert ref_peak <= dense_peak, (ref_peak, dense_peak)
