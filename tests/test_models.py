"""The public API of docs/DESIGN.md §10: shapes, save/load, conversions, initialisation, normalisation."""
import json

import pytest
import torch

import fastclt
from fastclt.checkpoint import CheckpointError
from _util import assert_close

ACTS = ["jumprelu", "relu", "topk", "batchtopk"]
TYINGS = ["none", "per_source", "per_target"]


def small_clt(**kw):
    base = dict(n_layers=3, d_in=10, d_out=7, n_features=24, activation="topk", k=3)
    base.update(kw)
    return fastclt.CrossLayerTranscoder(fastclt.CLTConfig(**base))


@pytest.mark.parametrize("activation", ACTS)
@pytest.mark.parametrize("tying", TYINGS)
def test_clt_attribute_shapes_and_methods(activation, tying):
    L, d_in, d_out, F = 3, 10, 7, 24
    model = small_clt(activation=activation, decoder_tying=tying)
    assert model.W_enc.shape == (L, F, d_in)
    assert model.b_enc.shape == (L, F)
    assert model.b_dec.shape == (L, d_out)
    for s in range(L):
        assert model.decoder_weight(s).shape == (F, L - s, d_out)
    if activation == "jumprelu":
        assert model.threshold.shape == (L, F)
    else:
        assert not hasattr(model, "threshold")
    x, y = torch.randn(5, L, d_in), torch.randn(5, L, d_out)
    codes = model.encode(x)
    assert len(codes) == L and all(isinstance(c, fastclt.SparseCodes) for c in codes)
    assert model.decode(codes, x=x).shape == (5, L, d_out)
    assert model(x).shape == (5, L, d_out)
    dead = torch.zeros(L, F, dtype=torch.bool)
    dead[:, ::3] = True
    out = model.loss(x, y, dead_mask=dead)
    assert out.loss.dim() == 0
    for key in ("mse", "fvu", "l0"):
        assert isinstance(out.metrics[key], float)
    assert ("auxk" in out.metrics) == (activation in ("topk", "batchtopk"))
    out.loss.backward()
    assert model.W_enc.grad is not None and torch.isfinite(model.W_enc.grad).all()


def test_plt_is_one_layer_clt_and_takes_2d_input():
    model = small_clt(n_layers=1)
    x = torch.randn(4, 10)
    assert model(x).shape == (4, 7)
    assert torch.equal(model(x), model(x[:, None])[:, 0])


@pytest.mark.parametrize("activation", ACTS)
def test_sae_api(activation):
    d, F = 12, 40
    sae = fastclt.SparseAutoencoder(fastclt.SAEConfig(d_in=d, n_features=F, activation=activation, k=4))
    assert sae.W_enc.shape == (F, d) and sae.b_enc.shape == (F,)
    assert sae.W_dec.shape == (F, d) and sae.b_dec.shape == (d,)
    if activation == "jumprelu":
        assert sae.threshold.shape == (F,)
    # W_dec starts as a unit-normed copy of W_enc's rows — two parameters, not tied
    assert sae.W_dec.data_ptr() != sae.W_enc.data_ptr()
    assert_close(sae.W_dec.norm(dim=1), torch.ones(F), 1e-6)
    assert_close(sae.W_dec / sae.W_dec.norm(dim=1, keepdim=True), sae.W_enc / sae.W_enc.norm(dim=1, keepdim=True), 1e-6)
    x = torch.randn(6, d)
    codes = sae.encode(x)
    assert isinstance(codes, fastclt.SparseCodes)
    assert sae.decode(codes).shape == (6, d) and sae(x).shape == (6, d)
    out = sae.loss(x, dead_mask=torch.ones(F, dtype=torch.bool))
    out.loss.backward()
    assert set(("mse", "fvu", "l0")) <= set(out.metrics)


def test_sae_encoder_uses_pre_bias():
    sae = fastclt.SparseAutoencoder(fastclt.SAEConfig(d_in=5, n_features=9, activation="relu"))
    with torch.no_grad():
        sae.b_dec.normal_()
        sae.b_enc.normal_()
    x = torch.randn(4, 5)
    h = (x - sae.b_dec) @ sae.W_enc.T + sae.b_enc
    assert_close(sae.encode(x).to_dense(9), torch.relu(h), 1e-6)
    assert_close(sae(x), torch.relu(h) @ sae.W_dec + sae.b_dec, 1e-6)


@pytest.mark.parametrize("kind", ["clt", "sae"])
@pytest.mark.parametrize("activation", ["jumprelu", "batchtopk"])
def test_save_load_roundtrip_bit_exact(tmp_path, kind, activation):
    torch.manual_seed(0)
    if kind == "clt":
        model = small_clt(activation=activation, decoder_tying="none", skip_connection=True, normalization="mean_std")
        x, y = torch.randn(32, 3, 10), torch.randn(32, 3, 7)
        model.initialize_from_data(x, y)
        with torch.no_grad():
            model.W_skip.normal_()
    else:
        model = fastclt.SparseAutoencoder(fastclt.SAEConfig(d_in=10, n_features=24, activation=activation, k=3,
                                                            normalization="sqrt_d"))
        x = torch.randn(32, 10)
        model.initialize_from_data(x)
    model.save_pretrained(tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["config.json", "model.safetensors"]
    loaded = type(model).from_pretrained(tmp_path / "m")
    assert loaded.cfg == model.cfg
    for (n1, t1), (n2, t2) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert n1 == n2 and t1.dtype == t2.dtype and torch.equal(t1, t2), n1
    assert torch.equal(loaded(x), model(x))


def test_corrupt_or_mismatched_checkpoint_is_refused(tmp_path):
    model = small_clt()
    path = tmp_path / "m"
    model.save_pretrained(path)
    weights = path / "model.safetensors"
    blob = bytearray(weights.read_bytes())
    # a flipped byte inside the tensor data
    blob[-5] ^= 0xFF
    weights.write_bytes(bytes(blob))
    with pytest.raises(CheckpointError, match="corrupt"):
        fastclt.CrossLayerTranscoder.from_pretrained(path)
    # truncated file, hash check disabled: still detected by the reader
    weights.write_bytes(bytes(blob[: len(blob) // 2]))
    with pytest.raises(CheckpointError, match="safetensors"):
        fastclt.CrossLayerTranscoder.from_pretrained(path, verify=False)
    # missing weights
    weights.unlink()
    with pytest.raises(CheckpointError, match="does not exist"):
        fastclt.CrossLayerTranscoder.from_pretrained(path)
    # config.json that does not match the weights
    model.save_pretrained(path)
    meta = json.loads((path / "config.json").read_text())
    meta["config"]["n_features"] = 25
    (path / "config.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="shape"):
        fastclt.CrossLayerTranscoder.from_pretrained(path)
    # corrupt JSON, missing folder, wrong model type
    (path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="JSON"):
        fastclt.CrossLayerTranscoder.from_pretrained(path)
    with pytest.raises(CheckpointError, match="not a folder"):
        fastclt.CrossLayerTranscoder.from_pretrained(tmp_path / "nowhere")
    model.save_pretrained(path)
    with pytest.raises(CheckpointError, match="model_type"):
        fastclt.SparseAutoencoder.from_pretrained(path)


def test_save_is_atomic_leaves_no_temp_files(tmp_path):
    model = small_clt()
    model.save_pretrained(tmp_path / "m")
    model.save_pretrained(tmp_path / "m")  # overwrite in place
    assert not [p for p in (tmp_path / "m").iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("normalization", ["mean_std", "sqrt_d"])
@pytest.mark.parametrize("tying", ["none", "per_target"])
def test_fold_normalization_is_equivalent(normalization, tying):
    torch.manual_seed(3)
    model = small_clt(activation="jumprelu", decoder_tying=tying, skip_connection=True, normalization=normalization,
                      dtype="float64")
    x = torch.randn(64, 3, 10, dtype=torch.float64) * 3 + 1
    y = torch.randn(64, 3, 7, dtype=torch.float64) * 0.5 - 2
    model.initialize_from_data(x, y, fire_rate=0.3)
    with torch.no_grad():
        model.W_skip.normal_()
    folded = model.fold_normalization()
    assert folded.cfg.normalization == "none"
    assert_close(folded(x), model(x), 1e-10)


def test_fold_normalization_sae():
    torch.manual_seed(4)
    sae = fastclt.SparseAutoencoder(fastclt.SAEConfig(d_in=8, n_features=20, activation="relu",
                                                      normalization="mean_std", dtype="float64"))
    x = torch.randn(50, 8, dtype=torch.float64) * 2 + 3
    sae.initialize_from_data(x)
    assert_close(sae.fold_normalization()(x), sae(x), 1e-10)


def test_normalization_statistics():
    torch.manual_seed(5)
    model = small_clt(normalization="sqrt_d")
    x, y = torch.randn(200, 3, 10) * 4, torch.randn(200, 3, 7)
    model.initialize_from_data(x, y)
    xn = model._normalize(x, "in")
    assert_close(xn.norm(dim=-1).mean(0), torch.full((3,), 10 ** 0.5), 1e-5)
    model = small_clt(normalization="mean_std")
    model.initialize_from_data(x, y)
    xn = model._normalize(x, "in")
    assert xn.mean(0).abs().max() < 1e-5 and (xn.std(0, unbiased=False) - 1).abs().max() < 1e-4
    # b_dec = mean of (normalised) y
    model = small_clt(normalization="none")
    model.initialize_from_data(x, y + 3)
    assert_close(model.b_dec, (y + 3).mean(0), 1e-5)


def test_sae_geometric_median_init():
    torch.manual_seed(6)
    x = torch.randn(101, 4)
    x[:5] += 100  # outliers pull the mean, not the median
    sae = fastclt.SparseAutoencoder(fastclt.SAEConfig(d_in=4, n_features=8, k=2))
    sae.initialize_from_data(x)
    assert sae.b_dec.norm() < 0.5 * x.mean(0).norm()


def test_fire_rate_init():
    torch.manual_seed(7)
    model = small_clt(activation="jumprelu")
    x, y = torch.randn(400, 3, 10), torch.randn(400, 3, 7)
    model.initialize_from_data(x, y, fire_rate=0.1)
    rate = (model.encode(x)[0].to_dense(24) > 0).float().mean()
    assert abs(float(rate) - 0.1) < 0.02


@pytest.mark.parametrize("kind", ["clt", "sae"])
@pytest.mark.parametrize("activation", ["jumprelu", "relu"])
def test_default_start_is_moderately_sparse(kind, activation):
    """ReLU/JumpReLU start (docs/DESIGN.md §5): initialize_from_data sets b_enc from the config's
    init_fire_rate, so every feature fires on about that fraction of the sample (L0 ≈ rate·F), where
    b_enc = 0 would fire on about half; init_fire_rate=None keeps b_enc = 0; TopK takes no rate."""
    torch.manual_seed(9)
    F, N = 200, 3000
    if kind == "clt":
        model = small_clt(activation=activation, n_features=F)
        x = torch.randn(N, 3, 10)
        args = (x, torch.randn(N, 3, 7))
    else:
        model = fastclt.SparseAutoencoder(fastclt.SAEConfig(d_in=10, n_features=F, activation=activation))
        x = torch.randn(N, 10) + 2.0  # off-centre: b_dec (the pre-bias) matters
        args = (x,)
    assert model.cfg.init_fire_rate == 0.01
    dense_start = model.encode(x)
    dense_start = dense_start[0] if isinstance(dense_start, list) else dense_start
    assert float(dense_start.l0()) > 0.3 * F  # the old start: about half the features fire
    model.initialize_from_data(*args)
    codes = model.encode(x)
    codes = codes if isinstance(codes, list) else [codes]
    for c in codes:
        assert abs(float(c.l0()) / F - 0.01) < 0.003, float(c.l0())
        fired = (c.to_dense(F) > 0).float().mean(0)  # per feature, not only on average
        assert fired.min() > 0 and fired.max() < 0.03
    off = (small_clt(activation=activation, init_fire_rate=None) if kind == "clt" else
           fastclt.SparseAutoencoder(fastclt.SAEConfig(d_in=10, n_features=F, activation=activation,
                                                       init_fire_rate=None)))
    off.initialize_from_data(*args)
    assert torch.equal(off.b_enc, torch.zeros_like(off.b_enc))


def test_fire_rate_is_checked():
    with pytest.raises(ValueError, match="init_fire_rate: expected a fraction"):
        fastclt.CLTConfig(activation="jumprelu", init_fire_rate=1.0)
    with pytest.raises(ValueError, match="init_fire_rate"):
        fastclt.SAEConfig(activation="relu", init_fire_rate=-0.1)
    topk = small_clt()  # TopK: the default rate does not apply, an explicit one is refused
    x, y = torch.randn(50, 3, 10), torch.randn(50, 3, 7)
    topk.initialize_from_data(x, y)
    assert torch.equal(topk.b_enc, torch.zeros_like(topk.b_enc))
    with pytest.raises(ValueError, match="fire_rate: only ReLU and JumpReLU"):
        topk.initialize_from_data(x, y, fire_rate=0.1)


@pytest.mark.parametrize("activation", ["topk", "batchtopk"])
def test_batchtopk_to_jumprelu(activation):
    torch.manual_seed(8)
    model = small_clt(activation=activation, k=4)
    x, y = torch.randn(64, 3, 10), torch.randn(64, 3, 7)
    for _ in range(3):
        model.loss(x, y)
    jr = model.to_jumprelu(min_count=2)
    assert jr.cfg.activation == "jumprelu" and jr.threshold.shape == (3, 24)
    assert torch.equal(jr.W_enc, model.W_enc)
    assert (jr.threshold >= 0).all()
    # the converted model keeps about k active features per token
    l0 = sum(float(c.l0()) for c in jr.encode(x)) / 3
    assert 1.0 < l0 < 12.0
    with pytest.raises(ValueError, match="only a TopK"):
        jr.to_jumprelu()


def test_jumprelu_log_threshold():
    model = small_clt(activation="jumprelu", threshold_param="log", threshold_init=0.1)
    assert "log_threshold" in dict(model.named_parameters())
    assert_close(model.threshold, torch.full((3, 24), 0.1), 1e-6)
    model.loss(torch.randn(8, 3, 10), torch.randn(8, 3, 7)).loss.backward()
    assert model.log_threshold.grad is not None


def test_post_step_clamps_threshold_and_renorms_sae_decoder():
    model = small_clt(activation="jumprelu")
    with torch.no_grad():
        model.threshold[0, 0] = -1.0
    model.post_step()
    assert model.threshold.min() >= 0
    sae = fastclt.SparseAutoencoder(fastclt.SAEConfig(d_in=6, n_features=10, k=2))
    with torch.no_grad():
        sae.W_dec.mul_(3)
    sae.W_dec.grad = torch.randn_like(sae.W_dec)
    sae.project_decoder_grads()
    unit = sae.W_dec / sae.W_dec.norm(dim=1, keepdim=True)
    assert (sae.W_dec.grad * unit).sum(1).abs().max() < 1e-5
    sae.post_step()
    assert_close(sae.W_dec.norm(dim=1), torch.ones(10), 1e-6)


def test_autocast_bf16_cpu():
    model = small_clt(activation="batchtopk")
    x, y = torch.randn(16, 3, 10), torch.randn(16, 3, 7)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model.loss(x, y)
    out.loss.backward()
    assert model.W_enc.grad.dtype == torch.float32 and torch.isfinite(model.W_enc.grad).all()


def test_loss_output_metrics_names_and_values():
    """LossOutput.metrics: parts, per-layer means, every layer's value and the loss by name (one
    transfer); per-layer tensors of different lengths, and an fp64 loss kept exactly."""
    from fastclt.models.base import LossOutput
    parts = {"reconstruction": torch.tensor(1.5), "auxk": torch.tensor(0.25, dtype=torch.float64)}
    per_layer = {"mse": torch.tensor([1.0, 2.0, 4.5]), "l0": torch.tensor([3.0, 5.0, 7.0])}
    m = LossOutput(loss=torch.tensor(2.5), codes=None, y_hat=None, fired=None, n_tokens=4, skipped_tokens=1,
                   parts=parts, per_layer=per_layer).metrics
    assert m == {"reconstruction": 1.5, "auxk": 0.25, "mse": 2.5, "l0": 5.0, "layer0/mse": 1.0, "layer1/mse": 2.0,
                 "layer2/mse": 4.5, "layer0/l0": 3.0, "layer1/l0": 5.0, "layer2/l0": 7.0, "loss": 2.5,
                 "skipped_tokens": 1.0}
    ragged = LossOutput(loss=torch.tensor(1.0, dtype=torch.float64) / 3, codes=None, y_hat=None, fired=None,
                        n_tokens=1, skipped_tokens=0, parts={},
                        per_layer={"a": torch.tensor([1.0, 3.0]), "b": torch.tensor([6.0])}).metrics
    assert ragged == {"a": 2.0, "b": 6.0, "layer0/a": 1.0, "layer1/a": 3.0, "layer0/b": 6.0, "loss": 1 / 3,
                      "skipped_tokens": 0.0}
