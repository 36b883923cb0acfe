"""MOLT models (sparse mixtures of low-rank linear transforms) on every backend, against dense
float64 math built from the definition — every A_i = U_i V_i formed explicitly — loss and every
gradient; bad configs; save/load, splicing into a language model, export refusal; and a planted
MOLT (low-rank transforms, sparse gates) that training recovers. The op ``molt_decode`` and
``molt_norms``: tests/ops/test_molt.py; the trainer: tests/training/test_train_variants.py."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import fastclt  # noqa: E402
from _impls import device_of  # noqa: E402
from _util import assert_close, train_steps  # noqa: E402
from fastclt import _ext  # noqa: E402
from fastclt.config import MOLTConfig  # noqa: E402
from _molt_cases import dense_A  # noqa: E402

try:
    import triton  # noqa: F401
    HAS_TRITON = True
except ImportError:
    HAS_TRITON = False

NEED_CPU = pytest.mark.skipif(not _ext.has_cpu_ext(), reason=_ext.missing_message("cpu"))
NEED_TRITON = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
BACKENDS = ["reference", pytest.param("cpu", marks=NEED_CPU), pytest.param("triton", marks=NEED_TRITON)]
# the model on every backend; Triton's TopK / AuxK kernels (not MOLT's) have their own tests
MODEL_CASES = [("reference", "jumprelu"), ("reference", "topk"), pytest.param("cpu", "jumprelu", marks=NEED_CPU),
               pytest.param("cpu", "topk", marks=NEED_CPU), pytest.param("triton", "jumprelu", marks=NEED_TRITON)]


def test_bad_configs_are_clear_errors():
    with pytest.raises(ValueError, match="ranks: every rank must be in"):
        MOLTConfig(d_in=16, d_out=12, ranks=[8, 13])
    with pytest.raises(ValueError, match="rank_counts: must sum to n_features"):
        MOLTConfig(d_in=16, d_out=16, n_features=10, ranks=[4, 2], rank_counts=[3, 3])
    with pytest.raises(ValueError, match="rank_counts: expected 2 counts"):
        MOLTConfig(d_in=16, d_out=16, n_features=10, ranks=[4, 2], rank_counts=[10])
    with pytest.raises(TypeError, match="ranks"):
        MOLTConfig(d_in=16, d_out=16, ranks=[4.5])
    cfg = MOLTConfig(d_in=768, d_out=768, n_features=992)  # the default rank mix at d = 768, N = 32
    assert cfg.rank_groups == ((32, 512), (64, 256), (128, 128), (256, 64), (512, 32))
    assert MOLTConfig(d_in=48, d_out=40, n_features=100).rank_groups == ((6, 16), (6, 8), (12, 4), (25, 2), (51, 1))


def _model(**kw):
    cfg = dict(n_layers=2, d_in=12, d_out=10, n_features=9, ranks=[5, 3, 1], rank_counts=[2, 3, 4],
               activation="jumprelu", threshold_init=0.1, jumprelu_bandwidth=0.5, sparsity_coef=0.3,
               sparsity="tanh", sparsity_c=2.0, preact_coef=0.2, normalization="mean_std")
    cfg.update(kw)
    return fastclt.MOLT(MOLTConfig(**cfg))


def _dense_model_loss(m, x, y, dead=None):
    """The MOLT loss from the definition in float64: dense gates, explicit A_i = U_i V_i, the
    sparsity penalty on g_i·‖A_i‖_F, the pre-activation loss, AuxK (dead gates' top k_aux decoded
    without b_dec against the detached residual)."""
    from fastclt.ops import jumprelu_dense

    cfg = m.cfg
    p = {n: t.detach().double().clone().requires_grad_(True) for n, t in m.named_parameters()}
    xn = (x.double() - m.input_mean.double()) / m.input_scale.double()
    yn = (y.double() - m.output_mean.double()) / m.output_scale.double()
    B = x.shape[0]
    total = 0.0
    groups = m.rank_groups
    for l in range(cfg.n_layers):
        h = xn[:, l] @ p["W_enc"][l].T + p["b_enc"][l]
        if cfg.activation == "jumprelu":
            g = jumprelu_dense(h, p["threshold"][l], cfg.jumprelu_bandwidth)
        elif cfg.activation == "topk":
            keep = torch.zeros_like(h, dtype=torch.bool).scatter_(1, h.topk(cfg.k, dim=1).indices, True)
            g = torch.relu(h) * keep
        A = dense_A(p["U"][l], p["V"][l], groups)
        y_hat = torch.einsum("bt,toi,bi->bo", g, A, xn[:, l])
        if cfg.output_bias:
            y_hat = y_hat + p["b_dec"][l]
        total = total + (yn[:, l] - y_hat).pow(2).sum() / B
        norms = A.flatten(1).norm(dim=1)
        if cfg.activation == "jumprelu":
            total = total + cfg.sparsity_coef * torch.tanh(cfg.sparsity_c * g * norms).sum() / B
            total = total + cfg.preact_coef * (torch.relu(p["threshold"][l] - h) * norms).sum() / B
        if dead is not None:
            hd = h.masked_fill(~dead[l], float("-inf"))
            k_aux = cfg.effective_k_aux
            keep = torch.zeros_like(h, dtype=torch.bool).scatter_(1, hd.topk(k_aux, dim=1).indices, True) & dead[l]
            ga = torch.relu(h) * keep
            e_hat = torch.einsum("bt,toi,bi->bo", ga, A, xn[:, l])
            resid = (yn[:, l] - y_hat).detach()
            tv = (yn[:, l] - yn[:, l].mean(0)).pow(2).sum()
            scale = min(float(dead.sum()) / cfg.n_layers / k_aux, 1.0)
            total = total + cfg.auxk_coef * scale * (e_hat - resid).pow(2).sum() / tv
    total.backward()
    return total.detach(), {n: t.grad for n, t in p.items()}


@pytest.mark.parametrize("impl,activation", MODEL_CASES)
def test_model_loss_and_every_gradient_match_dense_math(impl, activation, gen):
    torch.manual_seed(int(torch.randint(1 << 30, (1,), generator=gen)))
    m = _model(activation=activation, k=3, output_bias=activation == "jumprelu")
    x = torch.randn(24, 2, 12, generator=gen)
    y = torch.randn(24, 2, 10, generator=gen) + 0.5
    m.initialize_from_data(x, y, fire_rate=0.3 if activation == "jumprelu" else None)
    dead = None
    if activation == "topk":
        dead = torch.zeros(2, 9, dtype=torch.bool)
        dead[:, 4:] = True
    want_loss, want = _dense_model_loss(m, x, y, dead)
    dev = device_of(impl)
    m.to(dev).impl = impl
    out = m.loss(x.to(dev), y.to(dev), dead_mask=None if dead is None else dead.to(dev))
    out.loss.backward()
    assert_close(out.loss.detach(), want_loss, 2e-5, f"{impl} loss")
    for name, param in m.named_parameters():
        assert_close(param.grad, want[name], 5e-5, f"{impl} {activation} d{name}")


def test_save_load_roundtrip_and_load_by_type(tmp_path, gen):
    from fastclt.eval import load_dictionary

    m = _model()
    x, y = torch.randn(16, 2, 12, generator=gen), torch.randn(16, 2, 10, generator=gen)
    m.initialize_from_data(x, y)
    m.save_pretrained(tmp_path / "molt")
    for again in (fastclt.MOLT.from_pretrained(tmp_path / "molt"), fastclt.load(tmp_path / "molt"),
                  load_dictionary(tmp_path / "molt")):
        assert isinstance(again, fastclt.MOLT) and again.cfg == m.cfg
        for (n, a), (_, b) in zip(m.state_dict().items(), again.state_dict().items()):
            assert torch.equal(a, b), n
        assert torch.equal(again(x), m(x))
    one = _model(n_layers=1)
    assert one(x[:, 0]).shape == (16, 10)  # a one-layer MOLT also takes [B, d]
    with pytest.raises(ValueError, match="needs x"):
        m.decode(m.encode(x))


def test_export_refuses_a_molt_clearly(tmp_path):
    from fastclt.interop import NotRepresentableError

    with pytest.raises(NotRepresentableError, match="MOLT"):
        fastclt.export.to_circuit_tracer(_model(), tmp_path / "ct")


def test_spliced_into_a_language_model_like_a_transcoder(gen):
    """The spliced MLP outputs are exactly the MOLT's reconstruction of the hooked MLP inputs."""
    transformers = pytest.importorskip("transformers")
    from fastclt.lm import find_paths, resolve_sites
    from fastclt.replacement import splice

    torch.manual_seed(0)
    lm = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=3, n_embd=16, n_head=2, vocab_size=50,
                                                              n_positions=16)).eval()
    m = fastclt.MOLT(MOLTConfig(n_layers=2, d_in=16, d_out=16, n_features=7, ranks=[3, 1], activation="jumprelu",
                                threshold_init=0.05, lm_layers=[0, 2], normalization="mean_std"))
    ids = torch.randint(0, 50, (2, 9), generator=gen)
    sites = resolve_sites(lm, [0, 2], find_paths(lm))
    seen = {}

    def record():  # the MLPs' inputs and (final) outputs
        return [s.mlp.register_forward_hook(lambda mod, a, o, l=l: seen.__setitem__(l, (a[0], o)))
                for l, s in enumerate(sites)]
    with torch.no_grad():
        hooks = record()
        lm(ids)
        for h in hooks:
            h.remove()
        xs = torch.stack([seen[l][0].reshape(-1, 16) for l in range(2)], 1)
        ys = torch.stack([seen[l][1].reshape(-1, 16) for l in range(2)], 1)
        m.initialize_from_data(xs, ys, fire_rate=0.3)
        seen.clear()
        with splice(m, lm, record_stats=True) as sp:
            hooks = record()  # after the splice's: they see the replaced outputs
            lm(ids)
            for h in hooks:
                h.remove()
    x_in = torch.stack([seen[l][0].reshape(-1, 16) for l in range(2)], 1)
    out = torch.stack([seen[l][1].reshape(-1, 16) for l in range(2)], 1)
    assert_close(out, m(x_in).detach(), 1e-5, "spliced MLP outputs")
    assert all(v is not None for v in sp.stats()["fvu"])


def test_planted_low_rank_transforms_with_sparse_gates_are_recovered():
    """Data from a planted MOLT (6 rank-2 transforms, ReLU gates open on ~20% of tokens): training a
    MOLT of the same shape finds every planted A_i (cosine > 0.99) and explains the targets."""
    g = torch.Generator().manual_seed(0)
    d, T, r = 16, 6, 2
    E = torch.randn(T, d, generator=g)
    E /= E.norm(dim=1, keepdim=True)
    A = (torch.randn(T, d, r, generator=g) / r ** 0.5) @ (torch.randn(T, r, d, generator=g) / d ** 0.5)

    def batch(B=256):
        x = torch.randn(B, d, generator=g)
        gate = torch.relu(x @ E.T - 0.8)
        return x, torch.einsum("bt,tij,bj->bi", gate, A, x)
    torch.manual_seed(0)
    m = fastclt.MOLT(MOLTConfig(d_in=d, d_out=d, n_features=T, ranks=[r], activation="jumprelu",
                                threshold_init=0.01, sparsity_coef=0.0, output_bias=False))
    m.initialize_from_data(*batch(1024), fire_rate=0.2)
    train_steps(m, batch, 250)
    with torch.no_grad():
        out = m.loss(*batch(2048))
    learned = torch.stack([m.transform(0, i) for i in range(T)]).detach().flatten(1)
    planted = A.flatten(1)
    cos = (planted / planted.norm(dim=1, keepdim=True)) @ (learned / learned.norm(dim=1, keepdim=True)).T
    assert out.metrics["fvu"] < 1e-3, out.metrics
    assert cos.max(1).values.min() > 0.99, cos
    assert 0.5 < out.metrics["l0"] < 3, out.metrics  # sparse gates (the planted ones open ~1.3 per token)
