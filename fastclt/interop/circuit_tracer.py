"""circuit-tracer's transcoder folders (as circuit-tracer 0.5 reads them), into fastclt models.

A folder holds ``config.yaml`` (``model_kind``, ``feature_input_hook``, ``feature_output_hook``,
optionally ``model_name``) and the weights:

cross_layer_transcoder — for each layer l of L:
    W_enc_{l}.safetensors   W_enc_{l} [F, d], b_enc_{l} [F], b_dec_{l} [d] (the bias of target l),
                            threshold_{l} [F] (JumpReLU only)
    W_dec_{l}.safetensors   W_dec_{l} [F, L − l, d]: feature (l, i)'s decoder rows into targets l..L−1
transcoder_set — for each layer l:
    layer_{l}.safetensors   W_enc [F, d], W_dec [F, d], b_enc [F], b_dec [d],
                            activation_function.threshold [F] (JumpReLU only), W_skip [d, d] (optional)

with h = W_enc x + b_enc, a = h·1[h > θ] (strict) or relu(h), ŷ_t = Σ_{s≤t} W_dec^{s→t}ᵀ a_s + b_dec_t
(+ W_skip x_t in a set; circuit-tracer's CLT loader reads no skip). Input and output widths are
both d. Hooks are named like TransformerLens hook points relative to block l; layer l of the
dictionary is block l of the LM.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Union

import torch

from fastclt.config import CLTConfig
from fastclt.interop._io import (CheckpointError, NotRepresentableError, TensorFile, build, common_dtype, inside,
                                 read_config)

__all__ = ["load_circuit_tracer", "INPUT_HOOK_NAMES", "OUTPUT_HOOK_NAME", "CONFIG_FILE", "is_circuit_tracer"]

CONFIG_FILE = "config.yaml"
KINDS = ("cross_layer_transcoder", "transcoder_set")
# fastclt's input_hook → circuit-tracer's feature_input_hook; the output is the MLP module's output.
INPUT_HOOK_NAMES = {"mlp_in": "mlp.hook_in", "resid_mid": "hook_resid_mid"}
OUTPUT_HOOK_NAME = "mlp.hook_out"
# circuit-tracer names read back: ln2.hook_normalized is the MLP input too (TransformerLens's ln2 output).
_READ_INPUT = {"mlp.hook_in": "mlp_in", "ln2.hook_normalized": "mlp_in", "hook_resid_mid": "resid_mid"}
_READ_OUTPUT = ("mlp.hook_out", "hook_mlp_out")
_SET_REQUIRED = ("W_enc", "W_dec", "b_enc", "b_dec")
_SET_OPTIONAL = ("activation_function.threshold", "W_skip")


def is_circuit_tracer(folder: Path) -> bool:
    return (folder / CONFIG_FILE).is_file() or (folder / "W_enc_0.safetensors").is_file() \
        or (folder / "layer_0.safetensors").is_file()


def load_circuit_tracer(path: Union[str, Path]):
    """A circuit-tracer folder → CrossLayerTranscoder: a CLT (cross_layer_transcoder), a PLT (a
    one-layer transcoder_set) or a per-layer transcoder set (cross_layer=False)."""
    folder = Path(path)
    what = f"circuit-tracer folder {folder}"
    if not folder.is_dir():
        raise CheckpointError(f"{what}: not a folder")
    cfg = read_config(folder / CONFIG_FILE, f"circuit-tracer {CONFIG_FILE}", kind="yaml")
    kind = cfg.get("model_kind")
    if kind not in KINDS:
        raise NotRepresentableError(f"circuit-tracer {CONFIG_FILE}: model_kind {kind!r}: expected one of {KINDS}")
    meta = _lm_metadata(cfg)
    if kind == "cross_layer_transcoder":
        return _load_clt(folder, cfg, meta)
    return _load_set(folder, cfg, meta)


def _lm_metadata(cfg: dict) -> dict:
    what = f"circuit-tracer {CONFIG_FILE}"
    hook_in, hook_out = cfg.get("feature_input_hook"), cfg.get("feature_output_hook")
    if hook_in not in _READ_INPUT:
        raise NotRepresentableError(f"{what}: feature_input_hook {hook_in!r}: fastclt records the MLP input "
                                    f"({', '.join(sorted(_READ_INPUT))}) only")
    if hook_out not in _READ_OUTPUT:
        raise NotRepresentableError(f"{what}: feature_output_hook {hook_out!r}: fastclt records the MLP output "
                                    f"({', '.join(_READ_OUTPUT)}) only")
    name = cfg.get("model_name")
    if name is not None and (not isinstance(name, str) or not name):
        raise CheckpointError(f"{what}: model_name is {name!r}, expected a non-empty string")
    return {"lm_name": name, "input_hook": _READ_INPUT[hook_in]}


def _layer_indices(folder: Path, pattern: str, what: str) -> list:
    """Indices l of the files ``pattern.format(l)`` present, checked to be 0..L−1."""
    rx = re.compile("^" + re.escape(pattern).replace(r"\{\}", r"(\d+)") + "$")
    found = sorted(int(m.group(1)) for p in folder.iterdir() if (m := rx.match(p.name)))
    if not found:
        raise CheckpointError(f"{what}: no {pattern.format('*')} files in {folder}")
    if found != list(range(len(found))):
        raise CheckpointError(f"{what}: {pattern.format('*')} files are numbered {found}; expected 0..{len(found) - 1}")
    return found


def _check_threshold(theta: torch.Tensor, name: str, what: str) -> None:
    if not bool(torch.isfinite(theta).all()) or bool((theta < 0).any()):
        raise NotRepresentableError(f"{what}: {name} holds negative or non-finite thresholds; fastclt's JumpReLU "
                                    f"thresholds are finite and >= 0")


def _load_clt(folder: Path, cfg: dict, meta: dict):
    what = f"circuit-tracer folder {folder}"
    if "transcoders" in cfg:
        raise NotRepresentableError(f"circuit-tracer {CONFIG_FILE}: transcoders: a cross_layer_transcoder listing "
                                    f"per-layer files is GemmaScope-2's format, which fastclt does not read")
    L = len(_layer_indices(folder, "W_enc_{}.safetensors", what))
    enc = [TensorFile(folder / f"W_enc_{l}.safetensors") for l in range(L)]
    dec = [TensorFile(folder / f"W_dec_{l}.safetensors") for l in range(L)]
    F, d = _matrix_shape(enc[0], "W_enc_0")
    jump = "threshold_0" in enc[0].keys
    names = []
    for l in range(L):
        want = {f"W_enc_{l}", f"b_enc_{l}", f"b_dec_{l}"} | ({f"threshold_{l}"} if jump else set())
        _exact_keys(enc[l], want)
        _exact_keys(dec[l], {f"W_dec_{l}"})
        names.append((enc[l], [f"W_enc_{l}", f"b_enc_{l}", f"b_dec_{l}"] + ([f"threshold_{l}"] if jump else [])))
        names.append((dec[l], [f"W_dec_{l}"]))
    for f, ns in names:  # every shape checked before anything is read
        for n in ns:
            f.check(n, _clt_shape(n, L, F, d))
    dtype = common_dtype(_dt(f, ns) for f, ns in names)
    g = lambda f, n: f.get(n, _clt_shape(n, L, F, d))  # noqa: E731
    params = {"W_enc": torch.stack([g(enc[l], f"W_enc_{l}") for l in range(L)]),
              "b_enc": torch.stack([g(enc[l], f"b_enc_{l}") for l in range(L)]),
              "b_dec": torch.stack([g(enc[l], f"b_dec_{l}") for l in range(L)])}
    params.update({f"W_dec.{l}": g(dec[l], f"W_dec_{l}") for l in range(L)})
    if jump:
        for l in range(L):
            _check_threshold(g(enc[l], f"threshold_{l}"), f"threshold_{l}", what)
        params["threshold"] = torch.stack([g(enc[l], f"threshold_{l}") for l in range(L)])
    mcfg = CLTConfig(n_layers=L, d_in=d, d_out=d, n_features=F, activation="jumprelu" if jump else "relu",
                     dtype=dtype, lm_layers=list(range(L)), **meta)
    return build(mcfg, params, what)


def _clt_shape(name: str, L: int, F: int, d: int) -> tuple:
    kind, l = name.rsplit("_", 1)
    return {"W_enc": (F, d), "b_enc": (F,), "b_dec": (d,), "threshold": (F,), "W_dec": (F, L - int(l), d)}[kind]


def _load_set(folder: Path, cfg: dict, meta: dict):
    what = f"circuit-tracer folder {folder}"
    if "transcoders" in cfg:
        paths = cfg["transcoders"]
        if not isinstance(paths, list) or not paths:
            raise CheckpointError(f"circuit-tracer {CONFIG_FILE}: transcoders: expected a list of layer files, "
                                  f"got {paths!r}")
        files = [inside(folder, p, f"circuit-tracer {CONFIG_FILE}: transcoders[{i}]") for i, p in enumerate(paths)]
        for p in files:
            if p.suffix != ".safetensors":
                raise NotRepresentableError(f"circuit-tracer {CONFIG_FILE}: transcoders: {p.name} is not a safetensors "
                                            f"file (GemmaScope .npz files are not read)")
    else:
        files = [folder / f"layer_{l}.safetensors" for l in _layer_indices(folder, "layer_{}.safetensors", what)]
    L = len(files)
    tfs = [TensorFile(p) for p in files]
    F, d = _matrix_shape(tfs[0], "W_enc")
    present = [k for k in _SET_OPTIONAL if k in tfs[0].keys]
    for tf in tfs:
        _exact_keys(tf, set(_SET_REQUIRED) | set(present))
    shapes = {"W_enc": (F, d), "W_dec": (F, d), "b_enc": (F,), "b_dec": (d,), "W_skip": (d, d),
              "activation_function.threshold": (F,)}
    if "activation_function.threshold" in present and tfs[0].shape("activation_function.threshold") == (1, F):
        shapes["activation_function.threshold"] = (1, F)
    for tf in tfs:
        for n in _SET_REQUIRED + tuple(present):
            tf.check(n, shapes[n])
    dtype = common_dtype(_dt(tf, list(_SET_REQUIRED) + present) for tf in tfs)

    def stack(name):  # [L, ...] (a [1, F] threshold is read as [F])
        return torch.stack([tf.get(name, shapes[name]).reshape(-1) if name == "activation_function.threshold"
                            else tf.get(name, shapes[name]) for tf in tfs])

    params = {"W_enc": stack("W_enc"), "b_enc": stack("b_enc"), "b_dec": stack("b_dec")}
    W_dec = stack("W_dec")
    if L == 1:
        params["W_dec.0"] = W_dec[0].unsqueeze(1)
    else:
        params["W_dec"] = W_dec
    jump = "activation_function.threshold" in present
    if jump:
        params["threshold"] = stack("activation_function.threshold")
        for l in range(L):
            _check_threshold(params["threshold"][l], f"activation_function.threshold of {files[l].name}", what)
    skip = "W_skip" in present
    if skip:
        params["W_skip"] = stack("W_skip")
    mcfg = CLTConfig(n_layers=L, d_in=d, d_out=d, n_features=F, activation="jumprelu" if jump else "relu",
                     skip_connection=skip, cross_layer=L == 1, dtype=dtype, lm_layers=list(range(L)), **meta)
    return build(mcfg, params, what)


def _matrix_shape(tf: TensorFile, name: str) -> tuple:
    shape = tf.shape(name)
    if len(shape) != 2:
        raise CheckpointError(f"{tf.what}: tensor {name!r} has shape {list(shape)}, expected [F, d]")
    return shape


def _exact_keys(tf: TensorFile, want: set) -> None:
    missing, extra = sorted(want - tf.keys), sorted(tf.keys - want)
    if missing:
        raise CheckpointError(f"{tf.what}: missing tensor(s) {missing}")
    if extra:
        raise NotRepresentableError(f"{tf.what}: tensor(s) {extra} are not part of circuit-tracer's format as its "
                                    f"loaders read it (expected exactly {sorted(want)})")


def _dt(tf: TensorFile, names) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}[tf.dtype(names)]
