"""SAELens checkpoints load exactly or are refused with the field named: the cases SAELens 6 itself
cannot write (configs older than SAELens 6, training checkpoints holding log_threshold, a non-unit
fine-tuning scale, unknown architectures), on folders written as its ``SAE.save_model`` writes them,
with the expected outputs following its encode/decode as read in its source (written out below).
Folders SAELens itself saves are checked in tests/test_interop_saelens_package.py.
"""
import json

import pytest
import torch
from safetensors.torch import save_file

import fastclt
from fastclt.interop import NotRepresentableError
from _util import assert_close

D_IN, D_OUT, F, K = 10, 7, 32, 4
ARCHS = ["standard", "jumprelu", "topk", "transcoder", "skip_transcoder", "jumprelu_transcoder",
         "jumprelu_skip_transcoder"]


def _write(folder, cfg: dict, tensors: dict):
    folder.mkdir(parents=True)
    (folder / "cfg.json").write_text(json.dumps(cfg))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "sae_weights.safetensors"))


def _sae(arch, gen, dtype=torch.float64, apply_b_dec_to_input=None):
    transcoder = "transcoder" in arch
    d_out = D_OUT if transcoder else D_IN
    cfg = {"d_in": D_IN, "d_sae": F, "dtype": "float64", "device": "cpu",
           "apply_b_dec_to_input": (not transcoder) if apply_b_dec_to_input is None else apply_b_dec_to_input,
           "normalize_activations": "none", "reshape_activations": "none", "architecture": arch,
           "metadata": {"model_name": "gpt2", "hook_name": "blocks.3.hook_mlp_in", "sae_lens_version": "6.5.0"}}
    if transcoder:
        cfg["d_out"] = d_out
    if arch == "topk":
        cfg.update(k=K, rescale_acts_by_decoder_norm=False)
    r = lambda *s: (torch.randn(*s, generator=gen) * 0.5).to(dtype)  # noqa: E731
    t = {"W_enc": r(D_IN, F), "b_enc": r(F), "W_dec": r(F, d_out), "b_dec": r(d_out)}
    if "jumprelu" in arch:  # some thresholds negative: SAELens's relu(h)·1[h > θ] then acts as relu
        t["threshold"] = (torch.rand(F, generator=gen) * 0.8 - 0.2).to(dtype)
    if "skip" in arch:
        t["W_skip"] = r(d_out, D_IN)
    return cfg, t


def _saelens_forward(cfg, t, x):
    """SAELens's encode + decode (+ skip) for these architectures, in float64."""
    t = {k: v.double() for k, v in t.items()}
    x = x.double()
    s = x - t["b_dec"] if cfg["apply_b_dec_to_input"] else x
    h = s @ t["W_enc"] + t["b_enc"]
    arch = cfg["architecture"]
    if arch == "topk":
        v, i = h.topk(cfg["k"], dim=-1)
        a = torch.zeros_like(h).scatter(-1, i, v.relu())
    else:
        a = h.relu()
        if "jumprelu" in arch:
            a = a * (h > t["threshold"])
    out = a @ t["W_dec"] + t["b_dec"]
    if "W_skip" in t:
        out = out + x @ t["W_skip"].T
    return out


@pytest.mark.parametrize("arch", ARCHS)
def test_saelens_loads_exactly(arch, gen, tmp_path):
    cfg, t = _sae(arch, gen)
    _write(tmp_path / "sae", cfg, t)
    model = fastclt.load(tmp_path / "sae")
    sae = cfg["apply_b_dec_to_input"]
    assert isinstance(model, fastclt.SparseAutoencoder if sae else fastclt.CrossLayerTranscoder)
    assert model.cfg.lm_name == "gpt2"
    x = torch.randn(80, D_IN, generator=gen, dtype=torch.float64)
    out = model(x)
    ref = _saelens_forward(cfg, t, x)
    assert out.shape == ref.shape
    assert_close(out, ref, 1e-13, arch)
    if "jumprelu" in arch:
        assert bool((t["threshold"] < 0).any())
        assert torch.equal(model.threshold.reshape(-1), t["threshold"].clamp_min(0))


def test_saelens_sae_without_input_bias_is_a_plt(gen, tmp_path):
    cfg, t = _sae("jumprelu", gen, apply_b_dec_to_input=False)
    _write(tmp_path / "sae", cfg, t)
    model = fastclt.load(tmp_path / "sae", format="saelens")
    assert isinstance(model, fastclt.CrossLayerTranscoder) and model.cfg.n_layers == 1
    x = torch.randn(50, D_IN, generator=gen, dtype=torch.float64)
    assert_close(model(x), _saelens_forward(cfg, t, x), 1e-13)


def test_saelens_old_config_and_log_threshold(gen, tmp_path):
    """A pre-6 config (activation_fn_str / activation_fn_kwargs, no architecture) with float32 weights;
    a JumpReLU training checkpoint holding log_threshold."""
    _, t = _sae("topk", gen, dtype=torch.float32)
    old = {"d_in": D_IN, "d_sae": F, "dtype": "float32", "activation_fn_str": "topk",
           "activation_fn_kwargs": {"k": K}, "hook_point": "blocks.2.hook_resid_pre", "model_name": "gpt2"}
    _write(tmp_path / "old", old, t)
    model = fastclt.load(tmp_path / "old")
    assert model.cfg.activation == "topk" and model.cfg.k == K and model.param_dtype == torch.float32
    x = torch.randn(40, D_IN, generator=gen)
    assert_close(model(x), _saelens_forward({"apply_b_dec_to_input": True, "architecture": "topk", "k": K}, t, x),
                 1e-6)
    cfg, t = _sae("jumprelu", gen)
    theta = torch.rand(F, generator=gen, dtype=torch.float64) + 0.1
    t.pop("threshold")
    t["log_threshold"] = theta.log()
    _write(tmp_path / "log", cfg, t)
    model = fastclt.load(tmp_path / "log")
    assert torch.equal(model.threshold, t["log_threshold"].exp())


@pytest.mark.parametrize("change,field", [
    ({"architecture": "gated"}, "architecture 'gated'"),
    ({"normalize_activations": "layer_norm"}, "normalize_activations 'layer_norm'"),
    ({"normalize_activations": "expected_average_only_in"}, "normalize_activations"),
    ({"architecture": "topk", "k": K, "rescale_acts_by_decoder_norm": True}, "rescale_acts_by_decoder_norm"),
    ({"activation_fn_str": "tanh-relu", "architecture": None}, "activation_fn 'tanh-relu'"),
])
def test_saelens_refusals(change, field, gen, tmp_path):
    cfg, t = _sae("standard", gen)
    cfg.update(change)
    if cfg.get("architecture") is None:
        del cfg["architecture"]
    _write(tmp_path / "sae", cfg, t)
    with pytest.raises(NotRepresentableError) as e:
        fastclt.load(tmp_path / "sae")
    assert field in str(e.value)


def test_saelens_finetuning_scale(gen, tmp_path):
    cfg, t = _sae("standard", gen)
    _write(tmp_path / "ones", cfg, {**t, "scaling_factor": torch.ones(F, dtype=torch.float64)})
    assert fastclt.load(tmp_path / "ones").cfg.activation == "relu"  # all ones: nothing to fold
    _write(tmp_path / "scaled", cfg, {**t, "scaling_factor": torch.full((F,), 2.0, dtype=torch.float64)})
    with pytest.raises(NotRepresentableError, match="scaling_factor"):
        fastclt.load(tmp_path / "scaled")
