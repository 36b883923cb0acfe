"""Matryoshka dictionaries (SAE, PLT, transcoder set, CLT with every tying): the block decodes and
the prefix losses on every backend against dense float64 math built from the definition — one
global selection mask over the B×F matrix (per layer), then every prefix ŷ_g from the features
i < m_g alone, loss Σ_g w_g · loss_g — forward and every gradient; the codes split; NaN-poisoned
kernel outputs; bad configs; AuxK on the full dictionary; save/load, export, the trainer; and a
planted hierarchy (frequent parent features, rarer children) that lands in the nested prefixes."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import fastclt  # noqa: E402
from _util import assert_close  # noqa: E402
from fastclt import _ext, ops  # noqa: E402
from fastclt.codes import SparseCodes  # noqa: E402
from fastclt.ops.activation import jumprelu_dense  # noqa: E402

try:
    import triton  # noqa: F401
    HAS_TRITON = True
except ImportError:
    HAS_TRITON = False

NEED_CPU = pytest.mark.skipif(not _ext.has_cpu_ext(), reason=_ext.missing_message("cpu"))
NEED_TRITON = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
BACKENDS = ["reference", pytest.param("cpu", marks=NEED_CPU), pytest.param("triton", marks=NEED_TRITON)]
PREFIXES = [3, 8, 13, 20]  # odd block sizes 3, 5, 5, 7 over F = 20
GPU = torch.cuda.is_available()


def device_of(impl: str) -> torch.device:
    """Triton runs on the GPU when there is one (else on the CPU under the interpreter)."""
    return torch.device("cuda" if impl == "triton" and GPU else "cpu")


def _to(codes: SparseCodes, device, value=None) -> SparseCodes:
    return SparseCodes(codes.row_ptr.to(device), codes.index.to(device),
                       (codes.value if value is None else value).to(device), codes.n_features)


@pytest.fixture
def poison_all(monkeypatch):
    """Kernel outputs start as NaN (C++: fastclt._C's switch; Triton: FASTCLT_POISON)."""
    monkeypatch.setenv("FASTCLT_POISON", "1")
    if _ext._C is not None:
        _ext._C.set_poison_outputs(True)
    yield
    if _ext._C is not None:
        _ext._C.set_poison_outputs(False)


def _codes(B, F, gen):
    """Random CSR codes: 0–5 entries per row (row 2 empty), ascending indices, values > 0."""
    lengths = torch.randint(0, 6, (B,), generator=gen)
    lengths[2] = 0
    cols = [torch.randperm(F, generator=gen)[: int(n)].sort().values for n in lengths]
    row_ptr = torch.zeros(B + 1, dtype=torch.int64)
    row_ptr[1:] = lengths.cumsum(0)
    index = torch.cat(cols).to(torch.int32)
    return SparseCodes(row_ptr, index, torch.rand(index.shape[0], generator=gen) + 0.1, F)


def test_split_codes_puts_each_feature_block_in_its_rows(gen):
    B, F = 9, 20
    codes = _codes(B, F, gen)
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


def _dense_prefixes(a_list, W, tying, b, off, sc):
    """[G, B, L, d] in float64 from dense codes a_list (L × [B, F]): prefix g keeps features < m_g."""
    L = len(a_list)
    outs = []
    for m in PREFIXES:
        ys = []
        for t in range(L):
            y = b[t].clone() if b is not None else 0
            for s in range(t + 1):
                a = a_list[s][:, :m]
                if off is not None:
                    a = (a + off[t, :m] * (a > 0)) * sc[t, :m]
                if tying == "none":
                    Wst = W[s][:m, t - s]
                elif tying == "per_source":
                    Wst = W[s][:m]
                else:
                    Wst = W[t][:m]
                y = y + a @ Wst
            ys.append(y)
        outs.append(torch.stack(ys, 1))
    return torch.stack(outs)


# Triton under the interpreter is slow: its untied and tied (with affine) kernels, not every tying
TYINGS = (("none", False), ("per_source", False), ("per_target", True))
CLT_CASES = ([("reference", *t) for t in TYINGS] + [pytest.param("cpu", *t, marks=NEED_CPU) for t in TYINGS]
             + [pytest.param("triton", *t, marks=NEED_TRITON) for t in (TYINGS[0], TYINGS[2])])


@pytest.mark.parametrize("impl,tying,affine", CLT_CASES)
def test_clt_prefix_decodes_match_dense_math(impl, tying, affine, gen, poison_all):
    B, L, F, d = 7, 3, 20, 11
    codes = [_codes(B, F, gen) for _ in range(L)]
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
        y = fn([_to(c, dev, v) for c, v in zip(codes, vals)], Ws, rest)
        (y.double() * up.to(dev)).sum().backward()
        leaves = vals + (Ws if tying == "none" else [Ws]) + [t for t in rest if t is not None]
        return [y.detach()] + [t.grad for t in leaves]

    want = run(torch.float64, lambda cs, Ws, rest: _dense_prefixes([c.to_dense() for c in cs], Ws, tying, *rest))
    got = run(torch.float32, lambda cs, Ws, rest: ops.matryoshka_clt_decode(cs, Ws, tying, PREFIXES, *rest, impl=impl),
              device_of(impl))
    for i, (o, w) in enumerate(zip(got, want)):
        assert_close(o, w, 2e-6, f"{impl} {tying} output/grad {i}")


@pytest.mark.parametrize("impl", BACKENDS)
def test_sae_prefix_decodes_match_dense_math(impl, gen, poison_all):
    B, F, d = 9, 20, 13
    codes = _codes(B, F, gen)
    W, b = torch.randn(F, d, generator=gen), torch.randn(d, generator=gen)
    up = torch.randn(len(PREFIXES), B, d, generator=gen, dtype=torch.float64)
    outs = {}
    for name, dtype in (("want", torch.float64), ("got", torch.float32)):
        dev = device_of(impl) if name == "got" else torch.device("cpu")
        v, Wl, bl = (t.to(dev, dtype).clone().requires_grad_(True) for t in (codes.value, W, b))
        c = _to(codes, dev, v)
        if name == "want":
            y = _dense_prefixes([c.to_dense()], [Wl.unsqueeze(1)], "none", bl[None], None, None)[:, :, 0]
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


@pytest.mark.parametrize("impl", ["reference", pytest.param("cpu", marks=NEED_CPU)])
def test_prefix_errors_on_every_backend_match_the_formed_prefixes(impl, gen, poison_all):
    """prefix_errors of each implementation against the formed prefixes in float64: odd sizes (d not
    a multiple of 8, more tokens than one chunk of the C++ token sums), a bias shared by the tokens
    ([d], [L, d], [1, L, d]) and a per-token base; every gradient, and only some of them."""
    G, B, L, d = 4, 37, 3, 21
    for base_shape in ((d,), (L, d), (1, L, d), (B, L, d)):
        y, base, blocks = (torch.randn(*s, generator=gen) for s in ((B, L, d), base_shape, (G, B, L, d)))
        w = torch.randn(G, L, generator=gen, dtype=torch.float64)
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
            for leaf, want, g, name in zip(leaves, (y64.grad, base64.grad, blocks64.grad), grads, ("y", "base", "blocks")):
                if g:
                    assert_close(leaf.grad, want, 1e-5, f"{impl} d{name}, base {base_shape}")
                else:
                    assert leaf.grad is None
    # an SAE's y [B, 1, d] with b_dec [d]; and dtypes the kernels do not take go to the reference
    y, b, blocks = torch.randn(9, 1, 8, generator=gen), torch.randn(8, generator=gen), torch.randn(2, 9, 1, 8, generator=gen)
    for dtype in (torch.float32, torch.float64):
        sq, _ = ops.prefix_errors(y.to(dtype), b.to(dtype), blocks.to(dtype), impl=impl)
        assert sq.dtype == dtype
        assert_close(sq, (y.double() - ops.prefix_sums(blocks.double(), b.double())).pow(2).sum((1, 3)), 1e-5, "SAE")
    with pytest.raises(ValueError, match="base: expected a shape that broadcasts"):
        ops.prefix_errors(y, torch.zeros(3), blocks, impl=impl)
    with pytest.raises(ValueError, match="blocks: expected"):
        ops.prefix_errors(y, b, blocks[:, :4], impl=impl)


@NEED_CPU
def test_opcheck_of_the_cpu_prefix_error_ops(gen):
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


# ------------------------------------------------------------------------------------- models
def _dense_model_loss(m, x, y):
    """The Matryoshka loss from the definition, float64: pre-activations, ONE selection over each
    layer's B×F matrix (BatchTopK: the k·B largest; JumpReLU: h > θ with its straight-through
    gradients), then every prefix's reconstruction from its features alone, Σ_g w_g Σ_l MSE or FVU."""
    cfg = m.cfg
    p = {n: t.detach().double().clone().requires_grad_(True) for n, t in m.named_parameters()}
    sae = isinstance(m, fastclt.SparseAutoencoder)
    xl = x.double()[:, None] if sae else x.double()
    yl = xl if sae else y.double()
    B, L = xl.shape[0], xl.shape[1]
    a_list = []
    for l in range(L):
        W_enc = p["W_enc"] if sae else p["W_enc"][l]
        b_enc = p["b_enc"] if sae else p["b_enc"][l]
        h = (xl[:, l] - p["b_dec"] if sae else xl[:, l]) @ W_enc.T + b_enc
        if cfg.activation == "batchtopk":
            flat = h.flatten().topk(cfg.k * B).indices
            mask = torch.zeros(h.numel(), dtype=torch.bool).scatter_(0, flat, True).view_as(h)
            a_list.append(torch.relu(h) * mask)
        else:
            a_list.append(jumprelu_dense(h, p["threshold"] if sae else p["threshold"][l], cfg.jumprelu_bandwidth))
    if sae:
        prefixes = _dense_prefixes(a_list, [p["W_dec"].unsqueeze(1)], "none", p["b_dec"][None], None, None)
    elif not cfg.cross_layer:
        prefixes = torch.stack([_dense_prefixes([a_list[l]], [p["W_dec"][l].unsqueeze(1)], "none",
                                                p["b_dec"][l][None], None, None)[:, :, 0] for l in range(L)], 2)
    else:
        W = [p[f"W_dec.{s}"] for s in range(L)] if cfg.decoder_tying == "none" else p["W_dec"]
        prefixes = _dense_prefixes(a_list, W, cfg.decoder_tying, p["b_dec"], p.get("feature_offset"),
                                   p.get("feature_scale"))
    if not sae and cfg.skip_connection:
        prefixes = prefixes + torch.einsum("bli,loi->blo", xl, p["W_skip"])
    tv = (yl - yl.mean(0)).pow(2).sum((0, 2))
    loss = 0.0
    for w, y_g in zip(cfg.matryoshka_loss_weights, prefixes):
        sq = (yl - y_g).pow(2).sum((0, 2))
        loss = loss + w * (sq / tv if cfg.reconstruction_loss == "fvu" else sq / B).sum()
    loss.backward()
    return loss.detach(), {n: t.grad for n, t in p.items()}


def _clt(**kw):
    cfg = dict(n_layers=2, d_in=10, d_out=9, n_features=20, activation="batchtopk", k=3,
               matryoshka_prefixes=PREFIXES, sparsity_coef=0.0)
    cfg.update(kw)
    return fastclt.CrossLayerTranscoder(fastclt.CLTConfig(**cfg))


MODELS = {
    "sae": lambda: fastclt.SparseAutoencoder(fastclt.SAEConfig(d_in=10, n_features=20, activation="batchtopk", k=3,
                                                               matryoshka_prefixes=PREFIXES)),
    "plt-jumprelu-fvu": lambda: _clt(n_layers=1, activation="jumprelu", threshold_init=0.3, jumprelu_bandwidth=0.5,
                                     reconstruction_loss="fvu", matryoshka_weights=[0.1, 0.2, 0.0, 1.5]),
    "set": lambda: _clt(cross_layer=False),
    "clt-none-skip": lambda: _clt(skip_connection=True),
    "clt-per_source": lambda: _clt(decoder_tying="per_source"),
    "clt-per_target-affine": lambda: _clt(decoder_tying="per_target", feature_affine=True),
}
MODEL_CASES = [(kind, "reference") for kind in MODELS] + [pytest.param(kind, "cpu", marks=NEED_CPU) for kind in MODELS] \
    + [pytest.param("sae", "triton", marks=NEED_TRITON)]  # the CLT decodes on Triton: the op test above


@pytest.mark.parametrize("kind,impl", MODEL_CASES)
def test_model_loss_and_every_gradient_match_dense_math(kind, impl, gen):
    torch.manual_seed(int(torch.randint(1 << 30, (1,), generator=gen)))
    m = MODELS[kind]()
    with torch.no_grad():  # non-trivial values everywhere the loss reads
        for name, t in m.named_parameters():
            if name in ("b_dec", "b_enc", "W_skip", "feature_offset"):
                t.normal_(0, 0.2)
    sae = kind == "sae"
    x = torch.randn(12, 10, generator=gen) if sae else torch.randn(12, m.n_layers, 10, generator=gen)
    y = None if sae else torch.randn(12, m.n_layers, 9, generator=gen)
    want_loss, want = _dense_model_loss(m, x, y)
    dev = device_of(impl)
    m.to(dev).impl = impl
    out = m.loss(x.to(dev), None if y is None else y.to(dev))
    out.loss.backward()
    assert_close(out.loss.detach(), want_loss, 2e-5, f"{kind} {impl} loss")
    for name, param in m.named_parameters():
        assert_close(param.grad, want[name], 5e-5, f"{kind} {impl} d{name}")
    assert set(out.metrics) >= {"fvu_prefix0", "fvu_prefix1", "fvu_prefix2", "fvu"}


def test_one_prefix_is_the_plain_model_and_auxk_uses_the_full_dictionary(gen):
    x = torch.randn(16, 2, 10, generator=gen)
    y = torch.randn(16, 2, 9, generator=gen)
    dead = torch.zeros(2, 20, dtype=torch.bool)
    dead[:, 12:] = True
    torch.manual_seed(0)
    plain = _clt(matryoshka_prefixes=None)
    for prefixes in ([20], PREFIXES):
        m = _clt(matryoshka_prefixes=prefixes)
        m.load_state_dict(plain.state_dict())
        a, b = plain.loss(x, y, dead_mask=dead), m.loss(x, y, dead_mask=dead)
        assert torch.allclose(a.parts["auxk"], b.parts["auxk"], rtol=1e-5)  # the full dictionary's residual
        assert torch.allclose(a.y_hat, b.y_hat, atol=1e-6)
        if prefixes == [20]:
            a.loss.backward()
            b.loss.backward()
            assert torch.allclose(a.loss, b.loss, rtol=1e-6)
            for (n, p), (_, q) in zip(plain.named_parameters(), m.named_parameters()):
                assert torch.allclose(p.grad, q.grad, rtol=1e-5, atol=1e-7), n


def test_bf16_autocast_model(gen):
    """Under bf16 autocast (the GPU training mode) the C++ kernels give the fp64 loss within bf16 rounding."""
    if not _ext.has_cpu_ext():
        pytest.skip(_ext.missing_message("cpu"))
    torch.manual_seed(1)
    m = _clt(activation="jumprelu", threshold_init=0.2, decoder_tying="per_source")
    x, y = torch.randn(12, 2, 10, generator=gen), torch.randn(12, 2, 9, generator=gen)
    want_loss, want = _dense_model_loss(m, x, y)
    m.impl = "cpu"
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m.loss(x, y)
    out.loss.backward()
    assert_close(out.loss.detach(), want_loss, 3e-2, "bf16 loss")
    assert_close(m.W_dec.grad, want["W_dec"], 5e-2, "bf16 dW_dec")


@pytest.mark.parametrize("cfg,match", [
    (dict(matryoshka_prefixes=[4, 4, 20]), "strictly increasing"),
    (dict(matryoshka_prefixes=[4, 12]), "must be n_features=20"),
    (dict(matryoshka_prefixes=[0, 20]), "strictly increasing prefix ends >= 1"),
    (dict(matryoshka_prefixes=[4, 20], matryoshka_weights=[1.0]), "expected a list of 2 numbers"),
    (dict(matryoshka_prefixes=[4, 20], matryoshka_weights=[1.0, -1.0]), "finite numbers >= 0"),
    (dict(matryoshka_prefixes=[4, 20], matryoshka_weights=[0, 0]), "at least one positive"),
    (dict(matryoshka_weights=[1.0]), "without matryoshka_prefixes"),
])
def test_bad_configs_are_clear_errors(cfg, match):
    for make in (lambda: fastclt.CLTConfig(n_features=20, **cfg), lambda: fastclt.SAEConfig(n_features=20, k=4, **cfg)):
        with pytest.raises(ValueError, match=match):
            make()
    with pytest.raises(TypeError, match="matryoshka_prefixes"):
        fastclt.SAEConfig(n_features=20, k=4, matryoshka_prefixes=[4.0, 20])


def test_save_load_decode_prefixes_and_export(tmp_path, gen):
    torch.manual_seed(0)
    m = _clt(activation="jumprelu", threshold_init=0.1, n_layers=1, d_out=10, normalization="mean_std")
    x, y = torch.randn(32, 10, generator=gen), torch.randn(32, 10, generator=gen)
    m.initialize_from_data(x, y)
    m.save_pretrained(tmp_path / "m")
    again = fastclt.load(tmp_path / "m")
    assert again.cfg.matryoshka_prefixes == PREFIXES and again.cfg == m.cfg
    prefixes = again.decode_prefixes(x)
    assert prefixes.shape == (4, 32, 10)
    assert torch.allclose(prefixes[-1], again(x), atol=1e-5)
    dense = again.encode(x)[0].to_dense().detach()
    dense[:, PREFIXES[1]:] = 0  # prefix 1 is the decode of the features i < m_2 alone
    assert torch.allclose(prefixes[1], again.decode([SparseCodes.from_dense(dense)])[:, 0], atol=1e-5)
    out = fastclt.export.to_circuit_tracer(again, tmp_path / "ct")  # the full dictionary
    assert (out / "layer_0.safetensors").is_file()


def test_trainer_accepts_matryoshka(tmp_path):
    from fastclt.train import main
    from fastclt.training.config import ConfigError, load_config

    common = ["--model.n_layers", "2", "--model.d_in", "16", "--model.d_out", "16", "--model.n_features", "24",
              "--model.matryoshka_prefixes", "[6, 12, 24]", "--model.matryoshka_weights", "[0.5, 0.25, 0.25]",
              "--train.batch_size", "32", "--train.init_samples", "64", "--data.n_true", "8", "--log.progress", "false",
              "--log.plot", "false", "--checkpoint.every", "0"]
    assert main(common + ["--train.steps", "3", "--out_dir", str(tmp_path / "run")]) == 0
    m = fastclt.load(tmp_path / "run")
    assert m.cfg.matryoshka_prefixes == [6, 12, 24] and m.cfg.matryoshka_weights == [0.5, 0.25, 0.25]
    with pytest.raises(ConfigError, match="train.tp"):
        load_config(common + ["--train.tp", "2"])
    with pytest.raises(ConfigError, match="matryoshka_prefixes"):
        load_config(common + ["--model.matryoshka_prefixes", "[6, 12]"])


def test_planted_hierarchy_lands_in_the_nested_prefixes():
    """4 frequent parent features, each with 3 rarer children that fire only with their parent: a
    Matryoshka SAE with prefixes [4, 16] puts the parents in its first 4 latents and finds the
    children among the rest."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny steps: thread start-up would dominate
    try:
        g = torch.Generator().manual_seed(0)
        d, P, C = 32, 4, 3
        dirs = torch.randn(P + P * C, d, generator=g)
        dirs /= dirs.norm(dim=1, keepdim=True)

        def batch(B):
            parent = (torch.rand(B, P, generator=g) < 0.25).float()
            child = (torch.rand(B, P, C, generator=g) < 0.3).float() * parent[:, :, None]
            mag = torch.cat([parent * (0.5 + torch.rand(B, P, generator=g)),
                             (child * (0.5 + torch.rand(B, P, C, generator=g))).flatten(1)], 1)
            return mag @ dirs + 0.01 * torch.randn(B, d, generator=g)
        torch.manual_seed(0)
        m = fastclt.SparseAutoencoder(fastclt.SAEConfig(d_in=d, n_features=16, activation="batchtopk", k=2,
                                                        matryoshka_prefixes=[P, 16], b_dec_init="zeros"))
        opt = torch.optim.Adam(m.parameters(), lr=1e-2)
        for _ in range(200):
            out = m.loss(batch(256))
            opt.zero_grad()
            out.loss.backward()
            m.project_decoder_grads()
            opt.step()
            m.post_step()
    finally:
        torch.set_num_threads(threads)
    W = m.W_dec.detach()
    cos = dirs @ (W / W.norm(dim=1, keepdim=True)).T  # [parents + children, latents]
    parents_in_prefix = cos[:P, :P].max(1).values
    children = cos[P:].max(1).values
    assert parents_in_prefix.min() > 0.85, parents_in_prefix
    assert children.min() > 0.7 and children.mean() > 0.9, children
