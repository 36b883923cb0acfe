"""Per-layer transcoder sets (CLTConfig.cross_layer=False) and the LM metadata every dictionary config
records (lm_name, lm_layers, input_hook): validation, save/load, old config files.

A set of L transcoders must equal L separate one-layer transcoders with the same weights — outputs,
loss and every gradient — and keep working through save/load, fold_normalization, to_jumprelu and
the trainer."""
import json

import pytest
import torch

import fastclt
from fastclt.train import main
from _util import assert_close

L, D_IN, D_OUT, F = 3, 10, 7, 24


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models (tests/conftest.py)


def _set(activation="topk", dtype="float64", **kw):
    cfg = fastclt.CLTConfig(n_layers=L, d_in=D_IN, d_out=D_OUT, n_features=F, activation=activation, k=3,
                            cross_layer=False, dtype=dtype, **kw)
    return fastclt.CrossLayerTranscoder(cfg)


def _layer(model, l):
    """Transcoder l of a set, as a one-layer CLT with copies of its weights."""
    cfg = model.cfg.replace(n_layers=1, cross_layer=True)
    plt = fastclt.CrossLayerTranscoder(cfg)
    state = {}
    for name, t in model.state_dict().items():
        if name == "W_dec":
            state["W_dec.0"] = t[l].unsqueeze(1).clone()
        elif name == "cut_steps":
            state[name] = t.clone()
        else:
            state[name] = t[l:l + 1].clone()
    plt.load_state_dict(state)
    return plt


@pytest.mark.parametrize("activation", ["jumprelu", "relu", "topk", "batchtopk"])
def test_set_equals_separate_transcoders(activation, gen):
    model = _set(activation, skip_connection=True, normalization="mean_std")
    x = torch.randn(64, L, D_IN, generator=gen, dtype=torch.float64)
    y = torch.randn(64, L, D_OUT, generator=gen, dtype=torch.float64)
    model.initialize_from_data(x, y, fire_rate=0.3 if activation == "jumprelu" else None)
    with torch.no_grad():
        model.W_skip.normal_(generator=gen)
        model.b_dec.normal_(generator=gen)
    parts = [_layer(model, l) for l in range(L)]
    out = model.loss(x, y, sparsity_coef=0.1, preact_coef=0.05)
    out.loss.backward()
    total = 0
    for l, plt in enumerate(parts):
        o = plt.loss(x[:, l], y[:, l], sparsity_coef=0.1, preact_coef=0.05)
        o.loss.backward()
        total = total + o.loss.detach()
        assert_close(model(x)[:, l], plt(x[:, l]), 1e-12, f"layer {l} forward")
        assert_close(model.W_dec.grad[l], plt.W_dec[0].grad[:, 0], 1e-12, f"layer {l} dW_dec")
        for name in ("W_enc", "b_enc", "b_dec", "W_skip") + (("threshold",) if activation == "jumprelu" else ()):
            assert_close(getattr(model, name).grad[l], getattr(plt, name).grad[0], 1e-12, f"layer {l} d{name}")
    assert float(out.loss.detach()) == pytest.approx(float(total), rel=1e-12)
    assert model.decoder_norms().shape == (L, F)
    assert_close(model.decoder_norms(), model.W_dec.detach().norm(dim=-1), 1e-6, "decoder_norms")
    for s in range(L):
        assert model.decoder_weight(s).shape == (F, 1, D_OUT)
        assert torch.equal(model.decoder_weight(s)[:, 0], model.W_dec[s])


def test_set_decodes_through_the_dispatched_sparse_decode(monkeypatch):
    from fastclt import ops
    calls = []
    real = ops.sparse_decode
    monkeypatch.setattr(ops, "sparse_decode", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setattr(ops, "clt_decode", lambda *a, **k: pytest.fail("a set must not use clt_decode"))
    model = _set("relu", dtype="float32")
    model(torch.randn(5, L, D_IN))
    assert len(calls) == L


def test_set_save_load_fold_and_jumprelu(tmp_path, gen):
    model = _set("batchtopk", skip_connection=True, normalization="mean_std")
    x = torch.randn(128, L, D_IN, generator=gen, dtype=torch.float64)
    y = torch.randn(128, L, D_OUT, generator=gen, dtype=torch.float64)
    model.initialize_from_data(x, y)
    with torch.no_grad():
        model.W_skip.normal_(generator=gen)
    model.train()
    for _ in range(3):  # the BatchTopK → JumpReLU statistics
        model.loss(x, y)
    model.save_pretrained(tmp_path)
    loaded = fastclt.CrossLayerTranscoder.from_pretrained(tmp_path)
    assert loaded.cfg == model.cfg and not loaded.cfg.cross_layer
    assert torch.equal(loaded(x), model(x))
    assert_close(model.fold_normalization()(x), model(x), 1e-12, "fold_normalization")
    jr = model.to_jumprelu(min_count=1)
    assert jr.cfg.activation == "jumprelu" and not jr.cfg.cross_layer and jr.W_dec.shape == (L, F, D_OUT)
    assert jr(x).shape == (128, L, D_OUT)
    assert model.feature_axes()["W_dec"] == 1


def test_set_config_errors():
    with pytest.raises(ValueError, match="decoder_tying"):
        fastclt.CLTConfig(n_layers=2, cross_layer=False, decoder_tying="per_source")
    with pytest.raises(TypeError, match="cross_layer"):
        fastclt.CLTConfig(n_layers=2, cross_layer="no")


def test_trainer_trains_a_set(tmp_path):
    args = ["--model.n_layers", "2", "--model.d_in", "16", "--model.d_out", "16", "--model.n_features", "32",
            "--model.k", "2", "--model.cross_layer", "false", "--train.steps", "3", "--train.batch_size", "32",
            "--train.init_samples", "32", "--train.eval_batches", "1", "--train.device", "cpu",
            "--log.progress", "false", "--log.plot", "false", "--checkpoint.every", "0", "--out_dir", str(tmp_path)]
    assert main(args) == 0
    model = fastclt.CrossLayerTranscoder.from_pretrained(tmp_path / "model")
    assert not model.cfg.cross_layer and model.W_dec.shape == (2, 32, 16)


# ------------------------------------------------------------------ LM metadata
def test_lm_metadata_round_trips(tmp_path):
    cfg = fastclt.CLTConfig(n_layers=3, d_in=8, d_out=8, n_features=16, lm_name="models/gpt2", lm_layers=[1, 4, 7],
                            input_hook="resid_mid")
    fastclt.CrossLayerTranscoder(cfg).save_pretrained(tmp_path / "clt")
    back = fastclt.CrossLayerTranscoder.from_pretrained(tmp_path / "clt").cfg
    assert (back.lm_name, back.lm_layers, back.input_hook) == ("models/gpt2", [1, 4, 7], "resid_mid")
    sae = fastclt.SAEConfig(d_in=8, n_features=16, k=4, lm_layers=[5], input_hook="resid_mid")
    fastclt.SparseAutoencoder(sae).save_pretrained(tmp_path / "sae")
    assert fastclt.SparseAutoencoder.from_pretrained(tmp_path / "sae").cfg.lm_layers == [5]


def test_old_config_without_metadata_loads(tmp_path):
    fastclt.CrossLayerTranscoder(fastclt.CLTConfig(n_layers=2, d_in=8, d_out=8,
                                                   n_features=16)).save_pretrained(tmp_path)
    meta = json.loads((tmp_path / "config.json").read_text())
    for key in ("lm_name", "lm_layers", "input_hook", "cross_layer"):
        del meta["config"][key]
    (tmp_path / "config.json").write_text(json.dumps(meta))
    cfg = fastclt.CrossLayerTranscoder.from_pretrained(tmp_path).cfg
    assert (cfg.lm_name, cfg.lm_layers, cfg.input_hook, cfg.cross_layer) == (None, None, "mlp_in", True)


@pytest.mark.parametrize("kw, err, match", [
    (dict(lm_layers=[0, 1]), ValueError, "lm_layers: expected 3"),
    (dict(lm_layers=[0, 2, 2]), ValueError, "strictly increasing"),
    (dict(lm_layers=[-1, 0, 1]), ValueError, ">= 0"),
    (dict(lm_layers=[0, 1.0, 2]), TypeError, "lm_layers"),
    (dict(lm_layers=[0, True, 2]), TypeError, "lm_layers"),
    (dict(lm_layers="0,1,2"), TypeError, "lm_layers"),
    (dict(input_hook="resid_post"), ValueError, "input_hook"),
    (dict(lm_name=""), TypeError, "lm_name"),
    (dict(lm_name=3), TypeError, "lm_name"),
])
def test_lm_metadata_validation(kw, err, match):
    with pytest.raises(err, match=match):
        fastclt.CLTConfig(n_layers=3, **kw)


def test_sae_metadata_has_one_layer():
    with pytest.raises(ValueError, match="lm_layers: expected 1"):
        fastclt.SAEConfig(d_in=8, n_features=16, k=4, lm_layers=[0, 1])


def test_trainer_refuses_recorded_fields(tmp_path, capsys):
    assert main(["--model.input_hook", "resid_mid", "--out_dir", str(tmp_path)]) == 2
    assert "data.input_hook" in capsys.readouterr().err
