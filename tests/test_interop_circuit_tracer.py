"""Export to circuit-tracer and back.

Against the real circuit-tracer (an optional test extra; these tests skip when it is absent): a
folder written by ``fastclt.export.to_circuit_tracer``, opened by circuit-tracer's own folder loader,
encodes, decodes and reconstructs (its attribution components) exactly what ``model(x)`` computes,
for CLTs of every tying (with feature scales and folded normalisation), PLTs and per-layer
transcoder sets, ReLU and JumpReLU; and folders written by circuit-tracer's own ``to_safetensors``
load into fastclt models that compute what circuit-tracer computes. Without it: export → import is
bit-exact, every refusal, the config and model card, the CLI.
"""
import json

import pytest
import torch
from safetensors.torch import load_file

import fastclt
from fastclt.export import main as export_main
from fastclt.export import to_circuit_tracer
from fastclt.interop import NotRepresentableError
from _interop import circuit_tracer_load, random_transcoder
from _util import assert_close

TOL = 1e-12  # float64 throughout: the two libraries differ only in summation order

CASES = [  # (L, tying, cross_layer, skip, affine, normalization)
    (3, "none", True, False, False, "none"),
    (3, "none", True, False, False, "mean_std"),
    (3, "per_source", True, False, True, "mean_std"),
    (3, "per_target", True, False, True, "sqrt_d"),
    (3, "per_source", True, False, False, "none"),
    (1, "none", True, True, False, "mean_std"),
    (1, "per_target", True, False, True, "none"),
    (3, "none", False, True, False, "mean_std"),
    (2, "none", False, False, False, "none"),
]
IDS = [f"L{c[0]}-{c[1]}-{'clt' if c[2] else 'set'}{'-skip' if c[3] else ''}{'-affine' if c[4] else ''}-{c[5]}"
       for c in CASES]


def _model(gen, case, activation):
    L, tying, cross_layer, skip, affine, norm = case
    return random_transcoder(gen, L=L, tying=tying, cross_layer=cross_layer, skip=skip, affine=affine,
                             normalization=norm, activation=activation)


def _dense_codes(model, x):
    return torch.stack([c.to_dense(model.cfg.n_features) for c in model.encode(x)])  # [L, B, F]


@pytest.mark.parametrize("activation", ["relu", "jumprelu"])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_circuit_tracer_reconstructs_model(case, activation, gen, tmp_path):
    pytest.importorskip("circuit_tracer")
    model, x = _model(gen, case, activation)
    folder = to_circuit_tracer(model, tmp_path / "export")
    tc, config = circuit_tracer_load(folder)
    clt_kind = case[0] > 1 and case[2]
    assert config["model_kind"] == ("cross_layer_transcoder" if clt_kind else "transcoder_set")
    assert type(tc).__name__ == ("CrossLayerTranscoder" if clt_kind else "TranscoderSet")
    assert tc.feature_input_hook == "mlp.hook_in" and tc.feature_output_hook == "mlp.hook_out"
    x_ct = x.transpose(0, 1).contiguous()  # circuit-tracer: [L, positions, d]
    ref = model(x).transpose(0, 1)
    with torch.no_grad():
        acts = tc.encode(x_ct)  # dense [L, B, F]
        out = tc(x_ct) if clt_kind else tc.decode(acts, x_ct)
        parts = tc.compute_attribution_components(x_ct, zero_positions=slice(0, 0))
    codes = _dense_codes(model, x)
    assert torch.equal(acts > 0, codes > 0), "circuit-tracer and fastclt activate different features"
    assert 0 < int((codes > 0).sum()) < codes.numel()  # the thresholds matter in this test
    assert_close(acts, codes, TOL, "feature activations")
    assert_close(out, ref, TOL, "circuit-tracer forward")
    assert_close(parts["reconstruction"], ref, TOL, "attribution reconstruction")
    assert_close(parts["activation_matrix"].to_dense(), codes, TOL, "attribution activation matrix")


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_export_import_round_trip(case, gen, tmp_path):
    """import(export(m)) computes model(x); the imported tensors are the files' tensors bit for bit, and
    exporting them again writes the same bytes. Without normalisation or feature scales every
    parameter comes back bit-exact."""
    model, x = _model(gen, case, "jumprelu")
    a = to_circuit_tracer(model, tmp_path / "a")
    back = fastclt.load(a)
    assert isinstance(back, fastclt.CrossLayerTranscoder) and back.cfg.activation == "jumprelu"
    assert back.cfg.cross_layer == (case[2] or case[0] == 1) and back.cfg.skip_connection == case[3]
    assert_close(back(x), model(x), TOL, "imported model")
    b = to_circuit_tracer(back, tmp_path / "b")
    files = sorted(p.name for p in a.iterdir())
    assert files == sorted(p.name for p in b.iterdir())
    for name in files:
        if name != "README.md":
            assert (a / name).read_bytes() == (b / name).read_bytes(), name
    if case[1] == "none" and case[5] == "none":
        state = back.state_dict()
        assert state.keys() == model.state_dict().keys()
        for name, t in model.state_dict().items():
            assert torch.equal(state[name], t), name
        assert torch.equal(back(x), model(x))


def test_round_trip_keeps_lm_metadata(gen, tmp_path):
    model, x = random_transcoder(gen, L=2, lm_name="org/tiny-lm", lm_layers=[0, 1], input_hook="resid_mid")
    folder = to_circuit_tracer(model, tmp_path / "ct")
    import yaml
    config = yaml.safe_load((folder / "config.yaml").read_text())
    assert config == {"model_kind": "cross_layer_transcoder", "feature_input_hook": "hook_resid_mid",
                      "feature_output_hook": "mlp.hook_out", "model_name": "org/tiny-lm"}
    back = fastclt.load(folder)
    assert (back.cfg.lm_name, back.cfg.lm_layers, back.cfg.input_hook) == ("org/tiny-lm", [0, 1], "resid_mid")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_export_dtypes(dtype, gen, tmp_path):
    model, x = random_transcoder(gen, L=2, dtype="float32")
    folder = to_circuit_tracer(model, tmp_path / "ct", dtype=dtype)
    want = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    assert all(t.dtype == want for p in folder.glob("*.safetensors") for t in load_file(p).values())
    back = fastclt.load(folder)
    assert back.param_dtype == want
    assert torch.equal(back.W_enc, model.W_enc.to(want))
    if dtype == "float32":
        assert torch.equal(back(x), model(x))


def test_refusals(gen, tmp_path):
    def refused(model, *words):
        with pytest.raises(NotRepresentableError) as e:
            to_circuit_tracer(model, tmp_path / "never")
        for w in words:
            assert w in str(e.value)

    for act in ("topk", "batchtopk"):
        refused(random_transcoder(gen, activation=act)[0], "activation", "calibrate_jumprelu", "fastclt.calibrate")
    model, _ = random_transcoder(gen, tying="per_source", affine=True)
    with torch.no_grad():
        model.feature_offset[1, 3] = 0.25
    refused(model, "feature_offset")
    refused(random_transcoder(gen, L=3, skip=True)[0], "skip_connection", "W_skip")
    cfg = fastclt.CLTConfig(n_layers=2, d_in=6, d_out=4, n_features=8, activation="relu")
    refused(fastclt.CrossLayerTranscoder(cfg), "d_in")
    refused(random_transcoder(gen, L=2, lm_layers=[3, 5])[0], "lm_layers", "[3, 5]")
    refused(fastclt.SparseAutoencoder(fastclt.SAEConfig(d_in=8, n_features=16, activation="relu")), "SparseAutoencoder")
    assert not (tmp_path / "never").exists()


def test_existing_export_is_not_mixed(gen, tmp_path):
    """A folder holding an export is replaced only with overwrite=True, and then no stale layer file
    of the earlier (larger) export is left to be read as a layer."""
    big, _ = random_transcoder(gen, L=4)
    small, x = random_transcoder(gen, L=2)
    folder = to_circuit_tracer(big, tmp_path / "ct")
    with pytest.raises(ValueError, match="overwrite"):
        to_circuit_tracer(small, folder)
    to_circuit_tracer(small, folder, overwrite=True)
    assert sorted(p.name for p in folder.glob("*.safetensors")) == [f"W_{k}_{l}.safetensors" for k in ("dec", "enc")
                                                                    for l in range(2)]
    assert_close(fastclt.load(folder)(x), small(x), TOL)
    with pytest.raises(ValueError, match="dtype"):
        to_circuit_tracer(small, tmp_path / "x", dtype="int8")


def test_model_card_and_cli(gen, tmp_path):
    """The CLI exports a training run's model with a card holding its architecture, hooks, training
    configuration and metrics."""
    import yaml
    model, x = random_transcoder(gen, L=2, lm_name="org/tiny-lm", lm_layers=[0, 1], normalization="mean_std")
    run = tmp_path / "run"
    model.save_pretrained(run / "model")
    (run / "config.yaml").write_text(yaml.safe_dump({"model": {"kind": "clt", "n_layers": 2},
                                                     "data": {"source": "shards", "path": "acts/"}}))
    (run / "summary.json").write_text(json.dumps({"fvu": 0.125, "l0": 7.5, "dead_fraction": 0.01}))
    assert export_main(["circuit-tracer", str(run), str(tmp_path / "ct")]) == 0
    card = (tmp_path / "ct" / "README.md").read_text()
    for text in ("cross-layer transcoder", "org/tiny-lm", "mlp.hook_in", "mlp.hook_out", "mean_std", "folded",
                 '"fvu": 0.125', "path: acts/", "load_clt", "W_dec_1.safetensors"):
        assert text in card, text
    assert_close(fastclt.load(tmp_path / "ct")(x), model(x), TOL)
    assert export_main(["circuit-tracer", str(run), str(tmp_path / "ct")]) == 2  # refuses to overwrite
    assert export_main(["circuit-tracer", str(tmp_path / "missing"), str(tmp_path / "o")]) == 2


def test_load_circuit_tracer_own_files(gen, tmp_path):
    """Folders written by circuit-tracer's own to_safetensors (a JumpReLU CLT; a transcoder set with
    skip connections) load into fastclt models that compute what circuit-tracer computes."""
    pytest.importorskip("circuit_tracer")
    from circuit_tracer.transcoder import SingleLayerTranscoder, TranscoderSet
    from circuit_tracer.transcoder.activation_functions import JumpReLU
    from circuit_tracer.transcoder.cross_layer_transcoder import CrossLayerTranscoder as CTCLT
    L, d, F = 3, 8, 20
    cpu, f64 = torch.device("cpu"), torch.float64
    x = torch.randn(L, 40, d, generator=gen, dtype=f64)

    clt = CTCLT(L, F, d, activation_function="jump_relu", lazy_decoder=False, device=cpu, dtype=f64)
    with torch.no_grad():
        for p in clt.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=f64) * 0.5)
        clt.activation_function.threshold.copy_(torch.rand(L, 1, F, generator=gen, dtype=f64))
    clt.to_safetensors(str(tmp_path / "clt"))
    (tmp_path / "clt" / "config.yaml").write_text("model_kind: cross_layer_transcoder\nfeature_input_hook: "
                                                  "hook_resid_mid\nfeature_output_hook: hook_mlp_out\n")
    ours = fastclt.load(tmp_path / "clt")
    assert ours.cfg.input_hook == "resid_mid" and ours.cfg.n_layers == L and ours.cfg.cross_layer
    with torch.no_grad():
        assert_close(ours(x.transpose(0, 1)).transpose(0, 1), clt(x), TOL, "CLT written by circuit-tracer")

    tcs = {}
    for l in range(L):
        t = SingleLayerTranscoder(d, F, JumpReLU(torch.zeros(F, dtype=f64), 0.1), l, skip_connection=True,
                                  device=cpu, dtype=f64)
        with torch.no_grad():
            for p in t.parameters():
                p.copy_(torch.randn(p.shape, generator=gen, dtype=f64) * 0.5)
            t.activation_function.threshold.copy_(torch.rand(F, generator=gen, dtype=f64))
        tcs[l] = t
    ts = TranscoderSet(tcs, feature_input_hook="mlp.hook_in", feature_output_hook="mlp.hook_out")
    ts.to_safetensors(str(tmp_path / "set"))
    (tmp_path / "set" / "config.yaml").write_text("model_kind: transcoder_set\nfeature_input_hook: mlp.hook_in\n"
                                                  "feature_output_hook: mlp.hook_out\nmodel_name: org/lm\n")
    ours = fastclt.load(tmp_path / "set")
    assert not ours.cfg.cross_layer and ours.cfg.skip_connection and ours.cfg.lm_name == "org/lm"
    with torch.no_grad():
        ref = ts.decode(ts.encode(x), x)
        assert_close(ours(x.transpose(0, 1)).transpose(0, 1), ref, TOL, "transcoder set written by circuit-tracer")
