"""Matryoshka dictionaries (SAE, PLT, transcoder set, CLT with every tying): the prefix losses of the
models on every backend against dense float64 math built from the definition — one global selection
mask over the B×F matrix (per layer), then every prefix ŷ_g from the features i < m_g alone, loss
Σ_g w_g · loss_g — forward and every gradient; bad configs; AuxK on the full dictionary;
save/load, export; and a planted hierarchy (frequent parent features, rarer children) that lands
in the nested prefixes. The ops (prefix_errors, split_codes, the prefix decodes):
tests/ops/test_matryoshka.py; the trainer: tests/training/test_train_variants.py."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import fastclt  # noqa: E402
from _impls import device_of  # noqa: E402
from _matryoshka_cases import PREFIXES, dense_prefixes  # noqa: E402
from _util import assert_close, train_steps  # noqa: E402
from fastclt import _ext  # noqa: E402
from fastclt.codes import SparseCodes  # noqa: E402
from fastclt.ops import jumprelu_dense  # noqa: E402

try:
    import triton  # noqa: F401
    HAS_TRITON = True
except ImportError:
    HAS_TRITON = False

NEED_CPU = pytest.mark.skipif(not _ext.has_cpu_ext(), reason=_ext.missing_message("cpu"))
NEED_TRITON = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
BACKENDS = ["reference", pytest.param("cpu", marks=NEED_CPU), pytest.param("triton", marks=NEED_TRITON)]


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
        prefixes = dense_prefixes(a_list, [p["W_dec"].unsqueeze(1)], "none", p["b_dec"][None], None, None)
    elif not cfg.cross_layer:
        prefixes = torch.stack([dense_prefixes([a_list[l]], [p["W_dec"][l].unsqueeze(1)], "none",
                                                p["b_dec"][l][None], None, None)[:, :, 0] for l in range(L)], 2)
    else:
        W = [p[f"W_dec.{s}"] for s in range(L)] if cfg.decoder_tying == "none" else p["W_dec"]
        prefixes = dense_prefixes(a_list, W, cfg.decoder_tying, p["b_dec"], p.get("feature_offset"),
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
MODEL_CASES = [(kind, "reference") for kind in MODELS] \
    + [pytest.param(kind, "cpu", marks=NEED_CPU) for kind in MODELS] \
    + [pytest.param("sae", "triton", marks=NEED_TRITON)]  # the CLT decodes on Triton: tests/ops/test_matryoshka.py


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


def test_planted_hierarchy_lands_in_the_nested_prefixes():
    """4 frequent parent features, each with 3 rarer children that fire only with their parent: a
    Matryoshka SAE with prefixes [4, 16] puts the parents in its first 4 latents and finds the
    children among the rest."""
    g = torch.Generator().manual_seed(0)
    d, P, C = 32, 4, 3
    dirs = torch.randn(P + P * C, d, generator=g)
    dirs /= dirs.norm(dim=1, keepdim=True)

    def batch(B=256):
        parent = (torch.rand(B, P, generator=g) < 0.25).float()
        child = (torch.rand(B, P, C, generator=g) < 0.3).float() * parent[:, :, None]
        mag = torch.cat([parent * (0.5 + torch.rand(B, P, generator=g)),
                         (child * (0.5 + torch.rand(B, P, C, generator=g))).flatten(1)], 1)
        return (mag @ dirs + 0.01 * torch.randn(B, d, generator=g),)
    torch.manual_seed(0)
    m = fastclt.SparseAutoencoder(fastclt.SAEConfig(d_in=d, n_features=16, activation="batchtopk", k=2,
                                                    matryoshka_prefixes=[P, 16], b_dec_init="zeros"))
    train_steps(m, batch, 200)
    W = m.W_dec.detach()
    cos = dirs @ (W / W.norm(dim=1, keepdim=True)).T  # [parents + children, latents]
    parents_in_prefix = cos[:P, :P].max(1).values
    children = cos[P:].max(1).values
    assert parents_in_prefix.min() > 0.85, parents_in_prefix
    assert children.min() > 0.7 and children.mean() > 0.9, children
