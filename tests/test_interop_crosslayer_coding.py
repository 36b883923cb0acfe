"""crosslayer-coding (curt-tigges/crosslayer-coding, the ``clt`` package) checkpoints load exactly
or are refused with the field named.

That library is not on the package registry, so these checkpoints are written as its trainer writes
them (``cfg.json`` from its CLTConfig, the module's state dict as safetensors), and the expected
outputs follow its modules as read in its source (``clt/models/{encoder,decoder,theta}.py``),
written out below: JumpReLU a = h·1[h ≥ exp(log θ)], untied decoders with one bias per (source,
target) pair, per_source / per_target tied decoders, the feature affine g_t applied to non-zero
codes, skip connections per target (tied) or per pair (untied)."""
import json

import pytest
import torch
from safetensors.torch import save_file

import fastclt
from fastclt.interop import NotRepresentableError
from _util import assert_close

L, D, F = 3, 8, 20
E, DM = "encoder_module.encoders", "decoder_module"


def _checkpoint(gen, tying="none", act="jumprelu", offset=False, scale=False, skip=False, dtype=torch.float64,
                diagonal_skip_only=True):
    cfg = {"num_features": F, "num_layers": L, "d_model": D, "model_name": "EleutherAI/pythia-70m",
           "normalization_method": "mean_std", "activation_fn": act, "jumprelu_threshold": 0.03,
           "batchtopk_k": 8 if act == "batchtopk" else None, "topk_k": 8 if act == "topk" else None,
           "decoder_tying": tying, "enable_feature_offset": offset, "enable_feature_scale": scale,
           "skip_connection": skip, "clt_dtype": None}
    r = lambda *s: (torch.randn(*s, generator=gen) * 0.5).to(dtype)  # noqa: E731
    sd = {}
    for l in range(L):
        sd[f"{E}.{l}.weight"] = r(F, D)
        sd[f"{E}.{l}.bias_param"] = r(F)
    ids = [f"{s}->{t}" for s in range(L) for t in range(s, L)] if tying == "none" else [str(i) for i in range(L)]
    for i in ids:
        sd[f"{DM}.decoders.{i}.weight"] = r(D, F)
        sd[f"{DM}.decoders.{i}.bias_param"] = r(D)
        if skip:
            s_, t_ = (i.split("->") + [None])[:2]
            zero = tying == "none" and diagonal_skip_only and s_ != t_
            sd[f"{DM}.skip_weights.{i}"] = torch.zeros(D, D, dtype=dtype) if zero else r(D, D)
    if act == "jumprelu":
        sd["theta_manager.log_threshold"] = (torch.rand(L, F, generator=gen) * 0.5 + 0.05).log().to(dtype)
    for t in range(L):
        if offset:
            sd[f"{DM}.feature_offset.{t}"] = r(F).abs() * 0.2
        if scale:
            sd[f"{DM}.feature_scale.{t}"] = (torch.rand(F, generator=gen) + 0.5).to(dtype)
    return cfg, sd


def _write(folder, cfg, sd, name="clt_checkpoint_latest.safetensors"):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "cfg.json").write_text(json.dumps(cfg))
    save_file(sd, str(folder / name))


def _their_forward(cfg, sd, x):
    """crosslayer-coding's forward for ReLU/JumpReLU, x: {l: [B, d]} → {t: [B, d]}, float64."""
    sd = {k: v.double() for k, v in sd.items()}
    a = {}
    for l in range(L):
        h = x[l] @ sd[f"{E}.{l}.weight"].T + sd[f"{E}.{l}.bias_param"]
        if cfg["activation_fn"] == "jumprelu":
            a[l] = (h >= sd["theta_manager.log_threshold"][l].exp()).double() * h
        else:
            a[l] = h.relu()
    tying = cfg["decoder_tying"]

    def affine(v, t):
        if tying == "none":
            return v
        nz = v != 0
        if cfg["enable_feature_offset"]:
            v = v + nz * sd[f"{DM}.feature_offset.{t}"]
        if cfg["enable_feature_scale"]:
            v = torch.where(nz, v * sd[f"{DM}.feature_scale.{t}"], v)
        return v

    out = {}
    for t in range(L):
        if tying == "per_target":
            summed = sum(affine(a[s], t) for s in range(t + 1))
            y = summed @ sd[f"{DM}.decoders.{t}.weight"].T + sd[f"{DM}.decoders.{t}.bias_param"]
        else:
            y = 0
            for s in range(t + 1):
                key = f"{s}->{t}" if tying == "none" else str(s)
                y = y + affine(a[s], t) @ sd[f"{DM}.decoders.{key}.weight"].T + sd[f"{DM}.decoders.{key}.bias_param"]
                if cfg["skip_connection"] and tying == "none":
                    y = y + x[s] @ sd[f"{DM}.skip_weights.{s}->{t}"].T
        if cfg["skip_connection"] and tying != "none":
            y = y + x[t] @ sd[f"{DM}.skip_weights.{t}"].T
        out[t] = y
    return out


def _compare(model, cfg, sd, gen, tol=1e-12, dtype=torch.float64):
    x = torch.randn(60, L, D, generator=gen).to(dtype)
    ref = _their_forward(cfg, sd, {l: x[:, l] for l in range(L)})
    assert_close(model(x), torch.stack([ref[t] for t in range(L)], 1), tol)


@pytest.mark.parametrize("act", ["relu", "jumprelu"])
@pytest.mark.parametrize("tying,offset,scale,skip", [
    ("none", False, False, False), ("none", False, False, True), ("per_source", False, False, False),
    ("per_source", True, True, True), ("per_target", False, False, True), ("per_target", True, False, False),
    ("per_target", False, True, False)])
def test_crosslayer_coding_loads_exactly(tying, offset, scale, skip, act, gen, tmp_path):
    cfg, sd = _checkpoint(gen, tying, act, offset, scale, skip)
    _write(tmp_path / "run", cfg, sd)
    model = fastclt.load(tmp_path / "run")
    assert isinstance(model, fastclt.CrossLayerTranscoder) and model.cfg.decoder_tying == tying
    assert model.cfg.feature_affine == (offset or scale) and model.cfg.skip_connection == skip
    assert model.cfg.lm_name == "EleutherAI/pythia-70m"
    _compare(model, cfg, sd, gen)


def test_jumprelu_at_the_threshold_fires(gen, tmp_path):
    """Their JumpReLU keeps h = θ (h ≥ θ); the loaded strict one (h > θ⁻) keeps it too, in float32."""
    cfg, sd = _checkpoint(gen, dtype=torch.float32)
    theta = sd["theta_manager.log_threshold"].exp()
    for l in range(L):  # x = 0: h = b_enc = θ exactly (in float32, as their module computes θ)
        sd[f"{E}.{l}.bias_param"] = theta[l].clone()
    _write(tmp_path / "run", cfg, sd)
    model = fastclt.load(tmp_path / "run")
    assert model.param_dtype == torch.float32
    codes = model.encode(torch.zeros(2, L, D))
    assert all(int((c.value > 0).sum()) == 2 * F for c in codes)
    assert all(torch.equal(c.to_dense(F)[0], theta[l]) for l, c in enumerate(codes))


def test_checkpoint_locations(gen, tmp_path):
    """A run folder (latest or the newest numbered checkpoint), a distributed step folder with cfg.json
    one level up, or the weights file itself."""
    cfg, sd = _checkpoint(gen, "per_source")
    _write(tmp_path / "a", cfg, sd, "clt_checkpoint_100.safetensors")
    cfg2, sd2 = _checkpoint(gen, "per_source")
    save_file(sd2, str(tmp_path / "a" / "clt_checkpoint_2000.safetensors"))
    _compare(fastclt.load(tmp_path / "a"), cfg2, sd2, gen)  # the newest step
    _compare(fastclt.load(tmp_path / "a" / "clt_checkpoint_100.safetensors"), cfg, sd, gen)
    (tmp_path / "b" / "step_7").mkdir(parents=True)
    (tmp_path / "b" / "cfg.json").write_text(json.dumps(cfg))
    save_file(sd, str(tmp_path / "b" / "step_7" / "model.safetensors"))
    _compare(fastclt.load(tmp_path / "b" / "step_7" / "model.safetensors"), cfg, sd, gen)


def test_refusals(gen, tmp_path):
    for act in ("batchtopk", "topk"):
        cfg, sd = _checkpoint(gen, act=act)
        _write(tmp_path / act, cfg, sd)
        with pytest.raises(NotRepresentableError, match=f"activation_fn '{act}'.*convert_batchtopk_to_jumprelu"):
            fastclt.load(tmp_path / act)
    cfg, sd = _checkpoint(gen, "none", skip=True, diagonal_skip_only=False)
    _write(tmp_path / "skip", cfg, sd)
    with pytest.raises(NotRepresentableError, match=r"skip_weights\.0->1"):
        fastclt.load(tmp_path / "skip")
    cfg, sd = _checkpoint(gen, "per_source")
    del sd[f"{DM}.decoders.2.bias_param"]
    _write(tmp_path / "missing", cfg, sd)
    with pytest.raises(ValueError, match=r"missing tensor\(s\) \['decoder_module.decoders.2.bias_param'\]"):
        fastclt.load(tmp_path / "missing")
    cfg, sd = _checkpoint(gen, "per_source")
    sd["decoder_module.mystery"] = torch.zeros(3, dtype=torch.float64)
    _write(tmp_path / "extra", cfg, sd)
    with pytest.raises(NotRepresentableError, match="mystery"):
        fastclt.load(tmp_path / "extra")
