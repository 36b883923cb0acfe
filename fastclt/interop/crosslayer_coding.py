"""crosslayer-coding (the ``clt`` package of curt-tigges/crosslayer-coding) checkpoints, into fastclt CLTs.

A run folder holds ``cfg.json`` (its CLTConfig: ``num_layers``, ``num_features``, ``d_model``,
``activation_fn``, ``decoder_tying``, ``enable_feature_offset``, ``enable_feature_scale``,
``skip_connection``, ...) and the model's state dict as safetensors (``clt_checkpoint_latest.safetensors``,
``clt_checkpoint_{step}.safetensors``, or ``model.safetensors`` of a merged distributed checkpoint
in a ``step_N``/``latest`` subfolder, with ``cfg.json`` one level up). Tensors:

    encoder_module.encoders.{l}.weight [F, d], .bias_param [F]          h_l = W_l x_l + b_l
    theta_manager.log_threshold [L, F]                                   JumpReLU: a = h·1[h ≥ exp(log θ)]
    decoder_module.decoders.{s}->{t}.weight [d, F], .bias_param [d]      untied: one per pair s ≤ t
    decoder_module.decoders.{i}.weight [d, F], .bias_param [d]           tied: per source s, or per target t
    decoder_module.feature_offset.{t} / feature_scale.{t} [F]            g_t(a) = (a + off_t·1[a ≠ 0])·scale_t
    decoder_module.skip_weights.{t} [d, d] (tied) / .{s}->{t} (untied)   + x W_skipᵀ

and its module computes ŷ_t = Σ_{s≤t} (W^{s→t} g_t(a_s) + bias^{s→t}) (+ skips), with
bias^{s→t} = the pair's bias (untied), the source's (per_source) or, once, the target's
(per_target). Mapped exactly: weights transposed into fastclt's layouts, the per-pair biases summed
into b_dec_t (in float64, rounded once), a ≥ θ as a > θ⁻ with θ⁻ the next float below θ in the
checkpoint's dtype, off·1[a ≠ 0] as off·1[a > 0] (codes are ≥ 0), a tied skip (or an untied
one whose off-diagonal pairs are all zero) as W_skip. Refused, naming the field: TopK/BatchTopK
(it ranks pre-activations standardised per layer over the batch), untied skips between layers, a
feature affine on untied decoders.
"""
from __future__ import annotations

from pathlib import Path
from typing import Union

import torch

from fastclt.config import CLTConfig
from fastclt.interop._io import CheckpointError, NotRepresentableError, TensorFile, build, field, read_config

__all__ = ["load_crosslayer_coding", "is_crosslayer_coding", "CONFIG_FILE"]

CONFIG_FILE = "cfg.json"
_WEIGHTS = ("clt_checkpoint_latest.safetensors", "model.safetensors")
_KEYS = ("num_layers", "num_features", "d_model")
_E = "encoder_module.encoders"
_D = "decoder_module"


def _is_cfg(path: Path) -> bool:
    if not path.is_file():
        return False
    try:
        cfg = read_config(path, "cfg.json")
    except CheckpointError:
        return False
    return all(k in cfg for k in _KEYS)


def is_crosslayer_coding(path: Path) -> bool:
    if path.is_file():
        return path.suffix == ".safetensors" and (_is_cfg(path.parent / CONFIG_FILE)
                                                  or _is_cfg(path.parent.parent / CONFIG_FILE))
    return _is_cfg(path / CONFIG_FILE)


def _locate(path: Path) -> tuple:
    """(cfg.json, weights file) of a run folder, a step folder, or a weights file."""
    if path.is_file():
        weights = path
        cfg = path.parent / CONFIG_FILE
        if not cfg.is_file():
            cfg = path.parent.parent / CONFIG_FILE
        return cfg, weights
    cfg = path / CONFIG_FILE
    for folder in (path, path / "latest"):
        for name in _WEIGHTS:
            if (folder / name).is_file():
                return cfg, folder / name
    steps = sorted((p for p in path.glob("clt_checkpoint_*.safetensors") if p.stem.rsplit("_", 1)[1].isdigit()),
                   key=lambda p: int(p.stem.rsplit("_", 1)[1]))
    if steps:
        return cfg, steps[-1]
    raise CheckpointError(f"crosslayer-coding folder {path}: no weights ({', '.join(_WEIGHTS)}, "
                          f"clt_checkpoint_<step>.safetensors or latest/model.safetensors); pass the .safetensors file")


def load_crosslayer_coding(path: Union[str, Path]):
    """A crosslayer-coding run folder (or its weights file) → CrossLayerTranscoder."""
    cfg_path, weights = _locate(Path(path))
    what = f"crosslayer-coding {cfg_path}"
    cfg = read_config(cfg_path, f"crosslayer-coding {CONFIG_FILE}")
    pos = lambda v: v > 0  # noqa: E731
    L = field(cfg, "num_layers", int, what, check=pos)
    F = field(cfg, "num_features", int, what, check=pos)
    d = field(cfg, "d_model", int, what, check=pos)
    act = field(cfg, "activation_fn", str, what, default="jumprelu")
    if act in ("topk", "batchtopk"):
        raise NotRepresentableError(f"{what}: activation_fn {act!r}: crosslayer-coding selects on pre-activations "
                                    f"standardised per layer over the batch, which has no fastclt form; convert it to "
                                    f"JumpReLU with its convert_batchtopk_to_jumprelu script, then load that")
    if act not in ("relu", "jumprelu"):
        raise NotRepresentableError(f"{what}: activation_fn {act!r} has no fastclt form")
    tying = field(cfg, "decoder_tying", str, what, default="none",
                  check=lambda v: v in ("none", "per_source", "per_target"))
    offset = field(cfg, "enable_feature_offset", bool, what, default=False)
    scale = field(cfg, "enable_feature_scale", bool, what, default=False)
    skip = field(cfg, "skip_connection", bool, what, default=False)
    if (offset or scale) and tying == "none":
        raise NotRepresentableError(f"{what}: enable_feature_offset/enable_feature_scale with decoder_tying 'none': "
                                    f"the module builds no affine for untied decoders")
    name = cfg.get("model_name")

    tf = TensorFile(weights, f"crosslayer-coding {weights}")
    # prefix of checkpoints saved from a wrapped (compiled / DDP) module: every key carries it
    pre = next((p for p in ("", "module.", "_orig_mod.") if f"{p}{_E}.0.weight" in tf.keys), None)
    if pre is None:
        raise CheckpointError(f"{tf.what}: tensor '{_E}.0.weight' is missing (not a crosslayer-coding state dict)")
    pairs = [(s, t) for s in range(L) for t in range(s, L)]
    dec_ids = [f"{s}->{t}" for s, t in pairs] if tying == "none" else [str(i) for i in range(L)]
    shapes = {}
    for l in range(L):
        shapes[f"{_E}.{l}.weight"] = (F, d)
        shapes[f"{_E}.{l}.bias_param"] = (F,)
    for i in dec_ids:
        shapes[f"{_D}.decoders.{i}.weight"] = (d, F)
        shapes[f"{_D}.decoders.{i}.bias_param"] = (d,)
    if act == "jumprelu":
        shapes["theta_manager.log_threshold"] = (L, F)
    for on, kind in ((offset, "feature_offset"), (scale, "feature_scale")):
        if on:
            shapes.update({f"{_D}.{kind}.{t}": (F,) for t in range(L)})
    if skip:
        shapes.update({f"{_D}.skip_weights.{i}": (d, d) for i in dec_ids})
    have = {k[len(pre):] for k in tf.keys if k.startswith(pre)}
    missing, extra = sorted(set(shapes) - have), sorted(have - set(shapes))
    if missing:
        raise CheckpointError(f"{tf.what}: missing tensor(s) {missing[:8]}{' …' if len(missing) > 8 else ''} for "
                              f"the cfg.json (decoder_tying {tying!r}, activation_fn {act!r})")
    if extra:
        raise NotRepresentableError(f"{tf.what}: tensor(s) {extra[:8]} are not part of this configuration")
    for n, shape in shapes.items():
        tf.check(pre + n, shape)
    dtype = tf.dtype([pre + n for n in shapes])
    get = lambda n: tf.get(pre + n, shapes[n])  # noqa: E731

    params = {"W_enc": torch.stack([get(f"{_E}.{l}.weight") for l in range(L)]),
              "b_enc": torch.stack([get(f"{_E}.{l}.bias_param") for l in range(L)])}
    W = {i: get(f"{_D}.decoders.{i}.weight") for i in dec_ids}
    bias = {i: get(f"{_D}.decoders.{i}.bias_param").double() for i in dec_ids}
    if tying == "none":
        for s in range(L):
            params[f"W_dec.{s}"] = torch.stack([W[f"{s}->{t}"].T for t in range(s, L)], 1)  # [F, L − s, d]
        b_dec = [sum(bias[f"{s}->{t}"] for s in range(t + 1)) for t in range(L)]
    else:
        params["W_dec"] = torch.stack([W[str(i)].T for i in range(L)])  # [L, F, d]
        b_dec = ([sum(bias[str(s)] for s in range(t + 1)) for t in range(L)] if tying == "per_source"
                 else [bias[str(t)] for t in range(L)])
    params["b_dec"] = torch.stack(b_dec)
    if act == "jumprelu":
        log_theta = get("theta_manager.log_threshold")
        theta = log_theta.exp()  # in the checkpoint's dtype, as the module computes it
        if not bool(torch.isfinite(theta).all()):
            raise NotRepresentableError(f"{tf.what}: theta_manager.log_threshold holds non-finite thresholds")
        # a ≥ θ  ⇔  a > nextafter(θ, −∞) for values of θ's dtype
        params["threshold"] = torch.nextafter(theta, torch.full_like(theta, -float("inf"))).clamp_min(0)
    if offset or scale:
        params["feature_offset"] = (torch.stack([get(f"{_D}.feature_offset.{t}") for t in range(L)]) if offset
                                    else torch.zeros(L, F, dtype=params["W_enc"].dtype))
        params["feature_scale"] = (torch.stack([get(f"{_D}.feature_scale.{t}") for t in range(L)]) if scale
                                   else torch.ones(L, F, dtype=params["W_enc"].dtype))
    if skip:
        if tying == "none":
            for s, t in pairs:
                if s != t and bool((get(f"{_D}.skip_weights.{s}->{t}") != 0).any()):
                    raise NotRepresentableError(f"{tf.what}: {_D}.skip_weights.{s}->{t}: a skip from layer {s}'s input "
                                                f"to layer {t}'s output has no fastclt form (fastclt's W_skip maps "
                                                f"x_t to ŷ_t only)")
            params["W_skip"] = torch.stack([get(f"{_D}.skip_weights.{t}->{t}") for t in range(L)])
        else:
            params["W_skip"] = torch.stack([get(f"{_D}.skip_weights.{t}") for t in range(L)])
    mcfg = CLTConfig(n_layers=L, d_in=d, d_out=d, n_features=F, activation=act, decoder_tying=tying,
                     feature_affine=offset or scale, skip_connection=skip, dtype=dtype,
                     lm_name=name if isinstance(name, str) and name else None)
    return build(mcfg, params, what)
