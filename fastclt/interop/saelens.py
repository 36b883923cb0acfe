"""SAELens checkpoints (``SAE.save_model``: ``cfg.json`` + ``sae_weights.safetensors``), into fastclt models.

Tensors: ``W_enc`` [d_in, d_sae] (transposed relative to fastclt), ``b_enc`` [d_sae], ``W_dec``
[d_sae, d_out], ``b_dec`` [d_out], ``threshold`` [d_sae] (or ``log_threshold``) for JumpReLU,
``W_skip`` [d_out, d_in] for skip transcoders. With s = x − b_dec·apply_b_dec_to_input and
h = s W_enc + b_enc, SAELens computes

    standard:  a = relu(h)               topk:  a = relu at the k largest h per token, else 0
    jumprelu:  a = relu(h)·1[h > θ]      x̂ = a W_dec + b_dec (+ x W_skipᵀ for skip transcoders)

Mapped exactly: standard → ReLU, topk → TopK, jumprelu → JumpReLU with θ ← max(θ, 0) (for θ < 0,
relu(h)·1[h > θ] = relu(h) = h·1[h > 0]), as a fastclt SAE when b_dec is subtracted from the input
and as a PLT otherwise (transcoders, and SAEs with apply_b_dec_to_input false). Refused, naming the
field: other architectures, run-time activation normalisation, a TopK that rescales by decoder
norms, and an unfolded fine-tuning scaling factor. Configs older than SAELens 6 (``activation_fn_str``,
``activation_fn_kwargs``) are read too.
"""
from __future__ import annotations

from pathlib import Path
from typing import Union

import torch

from fastclt.config import CLTConfig, SAEConfig
from fastclt.interop._io import CheckpointError, NotRepresentableError, TensorFile, build, field, read_config

__all__ = ["load_saelens", "is_saelens", "CONFIG_FILE", "WEIGHTS_FILE"]

CONFIG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
# architecture → (activation, transcoder, skip)
_ARCH = {"standard": ("relu", False, False), "jumprelu": ("jumprelu", False, False), "topk": ("topk", False, False),
         "transcoder": ("relu", True, False), "skip_transcoder": ("relu", True, True),
         "jumprelu_transcoder": ("jumprelu", True, False), "jumprelu_skip_transcoder": ("jumprelu", True, True)}


def is_saelens(folder: Path) -> bool:
    return (folder / CONFIG_FILE).is_file() and (folder / WEIGHTS_FILE).is_file()


def load_saelens(path: Union[str, Path]):
    """A SAELens SAE / transcoder folder → SparseAutoencoder or a PLT (see the module docstring)."""
    folder = Path(path)
    what = f"SAELens {folder / CONFIG_FILE}"
    cfg = read_config(folder / CONFIG_FILE, f"SAELens {CONFIG_FILE}")
    arch, k = _architecture(cfg, what)
    if arch not in _ARCH:
        raise NotRepresentableError(f"{what}: architecture {arch!r} has no fastclt form (fastclt reads "
                                    f"{', '.join(sorted(_ARCH))})")
    activation, transcoder, skip = _ARCH[arch]
    pos = lambda v: v > 0  # noqa: E731
    d_in = field(cfg, "d_in", int, what, check=pos)
    F = field(cfg, "d_sae", int, what, check=pos)
    d_out = field(cfg, "d_out", int, what, check=pos) if transcoder else d_in
    norm = field(cfg, "normalize_activations", (str, bool, type(None)), what, default="none")
    if norm not in ("none", False, None):
        raise NotRepresentableError(f"{what}: normalize_activations {norm!r}: the SAE rescales its input at run time "
                                    f"(or expects a factor kept outside the checkpoint); fold it into the weights "
                                    f"first (SAELens: fold_activation_norm_scaling_factor) and save again")
    if field(cfg, "rescale_acts_by_decoder_norm", bool, what, default=False):
        raise NotRepresentableError(f"{what}: rescale_acts_by_decoder_norm: TopK on h·‖W_dec‖ has no fastclt form; "
                                    f"save it with SAELens's save_inference_model, which folds the norms")
    pre_bias = field(cfg, "apply_b_dec_to_input", bool, what, default=not transcoder)
    if pre_bias and (transcoder or d_out != d_in):
        raise CheckpointError(f"{what}: apply_b_dec_to_input is true for a transcoder (SAELens refuses it too)")
    if activation == "topk" and not 0 < k <= F:
        raise CheckpointError(f"{what}: k={k} is not in 1..d_sae={F}")

    tf = TensorFile(folder / WEIGHTS_FILE, f"SAELens {folder / WEIGHTS_FILE}")
    shapes = {"W_enc": (d_in, F), "b_enc": (F,), "W_dec": (F, d_out), "b_dec": (d_out,)}
    if skip:
        shapes["W_skip"] = (d_out, d_in)
    theta_name = None
    if activation == "jumprelu":
        theta_name = "threshold" if "threshold" in tf.keys or "log_threshold" not in tf.keys else "log_threshold"
        shapes[theta_name] = (F,)
    optional = {"scaling_factor": (F,)} if "scaling_factor" in tf.keys else {}
    extra = sorted(tf.keys - set(shapes) - set(optional))
    if extra:
        raise NotRepresentableError(f"{tf.what}: tensor(s) {extra} are not part of a {arch!r} SAE")
    for name, shape in {**shapes, **optional}.items():
        tf.check(name, shape)
    if optional:
        sf = tf.get("scaling_factor", (F,))
        if not bool((sf == 1).all()):
            raise NotRepresentableError(f"{tf.what}: scaling_factor (fine-tuning scale) is not all ones; fold it into "
                                        f"W_dec first")
    dtype = tf.dtype(shapes)
    t = {name: tf.get(name, shape) for name, shape in shapes.items()}
    params = {"W_enc": t["W_enc"].T.contiguous(), "b_enc": t["b_enc"], "W_dec": t["W_dec"], "b_dec": t["b_dec"]}
    if theta_name is not None:
        theta = t[theta_name].exp() if theta_name == "log_threshold" else t[theta_name]
        if not bool(torch.isfinite(theta).all()):
            raise NotRepresentableError(f"{tf.what}: {theta_name} holds non-finite thresholds")
        params["threshold"] = theta.clamp_min(0)
    meta = _lm_metadata(cfg)
    if pre_bias:
        mcfg = SAEConfig(d_in=d_in, n_features=F, activation=activation, k=k or 1, unit_norm_decoder=False,
                         dtype=dtype, **meta)
        return build(mcfg, params, what)
    mcfg = CLTConfig(n_layers=1, d_in=d_in, d_out=d_out, n_features=F, activation=activation, k=k or 1,
                     skip_connection=skip, dtype=dtype, **meta)
    params = {name: (v[:, None] if name == "W_dec" else v[None]) for name, v in params.items()}
    params["W_dec.0"] = params.pop("W_dec")
    if skip:
        params["W_skip"] = t["W_skip"][None]
    return build(mcfg, params, what)


def _architecture(cfg: dict, what: str) -> tuple:
    """(architecture, k or 0), reading pre-6 configs (activation_fn_str / activation_fn_kwargs) too."""
    arch = field(cfg, "architecture", str, what, default=None)
    act = cfg.get("activation_fn", cfg.get("activation_fn_str"))
    kwargs = cfg.get("activation_fn_kwargs") or {}
    if not isinstance(kwargs, dict):
        raise CheckpointError(f"{what}: field 'activation_fn_kwargs' is {kwargs!r}, expected an object")
    if arch is None:  # before SAELens 6: the activation function named the architecture
        arch = "topk" if act == "topk" else "standard"
        if act not in (None, "relu", "topk"):
            raise NotRepresentableError(f"{what}: activation_fn {act!r} has no fastclt form (relu, topk)")
    k = 0
    if arch == "topk":
        k = cfg.get("k", kwargs.get("k"))
        if isinstance(k, bool) or not isinstance(k, int):
            raise CheckpointError(f"{what}: field 'k' is {k!r}, expected an int")
    return arch, k


def _lm_metadata(cfg: dict) -> dict:
    """lm_name from the config's model_name (top level, or SAELens 6's metadata)."""
    meta = cfg.get("metadata") if isinstance(cfg.get("metadata"), dict) else {}
    name = meta.get("model_name", cfg.get("model_name"))
    return {"lm_name": name} if isinstance(name, str) and name else {}
