"""Export a fastclt transcoder to circuit-tracer's folder format (attribution graphs).

    python -m fastclt.export circuit-tracer MODEL OUT_DIR [--dtype float32] [--model-name NAME]

MODEL is anything ``fastclt.load`` opens (a ``save_pretrained`` folder, a training run's
``--out_dir``, or another library's checkpoint). In Python::

    fastclt.export.to_circuit_tracer(model, "out/ct", lm_name="meta-llama/Llama-3.2-1B")

A CLT with L > 1 becomes a ``cross_layer_transcoder``; a PLT (n_layers=1) or a per-layer transcoder
set (cross_layer=False) a ``transcoder_set`` (the file layout is in ``fastclt.interop.circuit_tracer``).
The weights are rewritten so that circuit-tracer's forward computes exactly what ``model(x)``
computes, x and ŷ in the data's space: with normalisation statistics (μ, σ in, μ', σ' out, per
layer)

    W_enc ← W_enc / σ          b_enc ← b_enc − (W_enc / σ) μ          (θ unchanged)
    W^{s→t} ← σ'_t ⊙ g_t W      b_dec_t ← σ'_t ⊙ b_dec_t + μ'_t − W_skip,t μ_t
    W_skip,t ← diag(σ'_t) W_skip,t diag(1/σ_t)

where W^{s→t}[i] is the expanded decoder row of feature (s, i) into target t (tied decoders: W[s][i]
per source, or W[t][i] per target) and g_t[i] the feature scale of target t (1 without the affine);
each is computed in float64 and rounded once to the output dtype. What has no exact form is
refused (``NotRepresentableError``, naming the field): TopK/BatchTopK (no threshold: convert with
``calibrate_jumprelu`` first), a non-zero feature offset (it adds to active codes only, which no
circuit-tracer decoder does), a skip connection on a CLT with L > 1 (circuit-tracer's CLT loader
reads none), an SAE, a MOLT, d_in ≠ d_out, and LM blocks other than 0..L−1. A Matryoshka
transcoder exports as its full dictionary (its prefixes are an ordering of the features: every
feature is there, in order).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional, Union

import torch

from fastclt.checkpoint import CheckpointError, atomic_write, save_tensors
from fastclt.interop._io import NotRepresentableError
from fastclt.interop.circuit_tracer import CONFIG_FILE, INPUT_HOOK_NAMES, OUTPUT_HOOK_NAME

__all__ = ["to_circuit_tracer", "main"]

_OUT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64,
               "float16": torch.float16}
_OURS = ("W_enc_", "W_dec_", "layer_")


def to_circuit_tracer(model, path: Union[str, Path], *, lm_name: Optional[str] = None,
                      feature_input_hook: Optional[str] = None, feature_output_hook: Optional[str] = None,
                      dtype: Optional[str] = None, overwrite: bool = False, card: Optional[dict] = None) -> Path:
    """Write ``model`` (a CrossLayerTranscoder) as a circuit-tracer folder at ``path``; return it.

    lm_name: circuit-tracer's ``model_name`` (default: the config's lm_name). feature_input_hook /
    feature_output_hook: hook names (default: from the config's input_hook — "mlp_in" →
    "mlp.hook_in", "resid_mid" → "hook_resid_mid" — and "mlp.hook_out" for the MLP output).
    dtype: "float32" | "bfloat16" | "float64" | "float16" (default: the model's). overwrite:
    replace an earlier export in ``path`` (otherwise a folder holding one is an error, since stale
    layer files would be read as layers). card: extra model-card content — {"training_config":
    dict, "metrics": dict, "calibration": dict, "source": str}.
    """
    from fastclt.models import MOLT, CrossLayerTranscoder

    if isinstance(model, MOLT):
        raise NotRepresentableError("model: circuit-tracer's formats hold transcoders, one fixed decoder row per "
                                    "feature; a MOLT's outputs are input-dependent low-rank transforms "
                                    "g_i · U_i V_i x, which none of its loaders reads (save it with "
                                    "save_pretrained instead)")
    if not isinstance(model, CrossLayerTranscoder):
        raise NotRepresentableError(f"model: circuit-tracer reads transcoders (cross_layer_transcoder, "
                                    f"transcoder_set); a {type(model).__name__} has no place in it")
    cfg = model.cfg
    L = cfg.n_layers
    _refuse(model)
    out_dt = _OUT_DTYPES.get(dtype or cfg.dtype)
    if out_dt is None:
        raise ValueError(f"dtype: expected one of {sorted(_OUT_DTYPES)}, got {dtype!r}")
    hook_in = feature_input_hook or INPUT_HOOK_NAMES[cfg.input_hook]
    hook_out = feature_output_hook or OUTPUT_HOOK_NAME
    for name, v in (("feature_input_hook", hook_in), ("feature_output_hook", hook_out)):
        if not isinstance(v, str) or not v:
            raise ValueError(f"{name}: expected a hook name, got {v!r}")
    name = lm_name if lm_name is not None else cfg.lm_name
    kind = "cross_layer_transcoder" if cfg.cross_layer and L > 1 else "transcoder_set"

    out = Path(path)
    _prepare(out, overwrite)
    p = _exact_parameters(model)
    cast = lambda t: t.to(out_dt).contiguous()  # noqa: E731
    files = []
    if kind == "cross_layer_transcoder":
        for l in range(L):
            enc = {f"W_enc_{l}": p["W_enc"][l], f"b_enc_{l}": p["b_enc"][l], f"b_dec_{l}": p["b_dec"][l]}
            if "threshold" in p:
                enc[f"threshold_{l}"] = p["threshold"][l]
            save_tensors(out / f"W_enc_{l}.safetensors", {k: cast(v) for k, v in enc.items()})
            save_tensors(out / f"W_dec_{l}.safetensors", {f"W_dec_{l}": cast(p["W_dec"][l])})
            files += [f"W_enc_{l}.safetensors", f"W_dec_{l}.safetensors"]
    else:
        for l in range(L):
            t = {"W_enc": p["W_enc"][l], "W_dec": p["W_dec"][l][:, 0], "b_enc": p["b_enc"][l], "b_dec": p["b_dec"][l]}
            if "threshold" in p:
                t["activation_function.threshold"] = p["threshold"][l]
            if "W_skip" in p:
                t["W_skip"] = p["W_skip"][l]
            save_tensors(out / f"layer_{l}.safetensors", {k: cast(v) for k, v in t.items()})
            files.append(f"layer_{l}.safetensors")
    config = {"model_kind": kind, "feature_input_hook": hook_in, "feature_output_hook": hook_out}
    if name:
        config["model_name"] = name
    _write_text(out / CONFIG_FILE, _yaml(config))
    _write_text(out / "README.md", _model_card(model, config, files, str(out_dt).replace("torch.", ""), card or {}))
    return out


def _refuse(model) -> None:
    """NotRepresentableError for what circuit-tracer's format cannot hold exactly."""
    cfg = model.cfg
    L = cfg.n_layers
    if cfg.activation in ("topk", "batchtopk"):
        raise NotRepresentableError(
            f"activation: a {cfg.activation!r} dictionary has no threshold, and circuit-tracer runs ReLU or JumpReLU; "
            f"convert it first on held-out activations — model.calibrate_jumprelu(x, y).model, or "
            f"`python -m fastclt.calibrate MODEL OUT --data SHARDS` — then export the JumpReLU model")
    if cfg.d_in != cfg.d_out:
        raise NotRepresentableError(f"d_in: circuit-tracer's transcoders read and write one width d_model; this one "
                                    f"maps d_in={cfg.d_in} to d_out={cfg.d_out}")
    if cfg.feature_affine and bool((model.feature_offset != 0).any()):
        raise NotRepresentableError("feature_offset: non-zero feature offsets add to a feature's code only where it "
                                    "is active, which circuit-tracer's linear decoders cannot express")
    if cfg.skip_connection and cfg.cross_layer and L > 1:
        raise NotRepresentableError("skip_connection: circuit-tracer's cross_layer_transcoder loader reads no skip "
                                    "weights (W_skip); only a per-layer transcoder (set) exports one")
    if cfg.lm_layers is not None and list(cfg.lm_layers) != list(range(L)):
        raise NotRepresentableError(f"lm_layers: circuit-tracer puts transcoder layer l at LM block l, for blocks "
                                    f"0..L-1; this dictionary was trained on blocks {cfg.lm_layers}")


@torch.no_grad()
def _exact_parameters(model) -> dict:
    """float64 {W_enc [L,F,d], b_enc [L,F], b_dec [L,d], W_dec: L × [F, T_l, d], threshold [L,F]?, W_skip?}
    in the data's space (normalisation folded, tied decoders expanded with the feature scale)."""
    cfg = model.cfg
    L, F = cfg.n_layers, cfg.n_features
    norm = cfg.normalization != "none"
    mi, si, mo, so = (t.double() for t in (model.input_mean, model.input_scale, model.output_mean, model.output_scale))
    W_enc = model.W_enc.double()
    b_enc = model.b_enc.double()
    if norm:
        W_enc = W_enc / si[:, None, :]
        b_enc = b_enc - torch.einsum("lfd,ld->lf", W_enc, mi)
    scale = model.feature_scale.double() if cfg.feature_affine else None
    W_dec = []
    for s in range(L):
        W = model.decoder_weight(s).double()  # [F, T, d]: targets s.. (s only for a set)
        targets = list(range(s, L)) if cfg.cross_layer else [s]
        if scale is not None:
            W = W * scale[targets].T[:, :, None]
        if norm:
            W = W * so[targets][None]
        W_dec.append(W)
    b_dec = model.b_dec.double()
    W_skip = model.W_skip.double() if cfg.skip_connection else None
    if norm:
        b_dec = b_dec * so + mo
        if W_skip is not None:
            W_skip = W_skip * so[:, :, None] / si[:, None, :]
            b_dec = b_dec - torch.einsum("loi,li->lo", W_skip, mi)
    out = {"W_enc": W_enc, "b_enc": b_enc, "b_dec": b_dec, "W_dec": W_dec}
    if cfg.activation == "jumprelu":
        out["threshold"] = model.threshold.double().reshape(L, F)
    if W_skip is not None:
        out["W_skip"] = W_skip
    return out


def _prepare(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ValueError(f"path: {out} exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    old = [p for p in out.iterdir()
           if p.name == CONFIG_FILE or (p.suffix == ".safetensors" and p.name.startswith(_OURS))]
    if old and not overwrite:
        raise ValueError(f"path: {out} already holds a circuit-tracer export "
                         f"({', '.join(sorted(p.name for p in old)[:4])}"
                         f"{', …' if len(old) > 4 else ''}); pass overwrite=True (--overwrite) to replace it")
    for p in old:  # stale layer files of a larger export would be read as layers
        p.unlink()


def _write_text(path: Path, text: str) -> None:
    def _w(tmp):
        with open(tmp, "w") as f:
            f.write(text)
    atomic_write(path, _w)


def _yaml(obj) -> str:
    import yaml
    return yaml.safe_dump(obj, sort_keys=False, default_flow_style=False)


def _model_card(model, config: dict, files: list, dtype: str, card: dict) -> str:
    cfg = model.cfg
    L = cfg.n_layers
    kind = ("cross-layer transcoder (CLT)" if config["model_kind"] == "cross_layer_transcoder" else
            "per-layer transcoder (PLT)" if L == 1 else "set of per-layer transcoders")
    lines = [f"# {kind}, exported by fastclt", "",
             f"A {kind} in circuit-tracer's `{config['model_kind']}` format"
             + (f" for `{cfg.lm_name}`" if cfg.lm_name else "") + ".", "",
             "## Architecture", "",
             "| | |", "|---|---|",
             f"| layers (L) | {L} |", f"| width d (input = output) | {cfg.d_in} |",
             f"| features per layer (F) | {cfg.n_features} |",
             f"| activation | {'JumpReLU, a = h·1[h > θ]' if cfg.activation == 'jumprelu' else 'ReLU'} |",
             f"| decoder (as trained) | "
             f"{'cross-layer, tying ' + repr(cfg.decoder_tying) if cfg.cross_layer else 'per layer'}"
             f"{', feature scale' if cfg.feature_affine else ''} |",
             f"| skip connection | {'yes (W_skip per layer)' if cfg.skip_connection else 'no'} |",
             f"| stored dtype | {dtype} (trained in {cfg.dtype}) |", "",
             "Conversion: " + "; ".join(filter(None, [
                 f"normalisation `{cfg.normalization}` folded into the weights" if cfg.normalization != "none" else
                 "no normalisation to fold",
                 "tied decoders expanded into one decoder per (source, target) pair"
                 + (" with the per-target feature scale" if cfg.feature_affine else "")
                 if cfg.decoder_tying != "none" else "",
             ])) + ". Inputs and outputs are in the LM's own activation space.", "",
             "## Language model and hooks", "",
             f"- language model: {cfg.lm_name or 'not recorded'}",
             f"- LM blocks: "
             f"{cfg.lm_layers if cfg.lm_layers is not None else 'not recorded (layer l is read as block l)'}",
             "- input: " + ("the MLP input, after the pre-MLP norm" if cfg.input_hook == "mlp_in"
                            else "the residual stream before the pre-MLP norm")
             + f" (`feature_input_hook: {config['feature_input_hook']}`)",
             f"- target: the MLP module's output (`feature_output_hook: {config['feature_output_hook']}`)", ""]
    if card.get("source"):
        lines += [f"Exported from `{card['source']}`.", ""]
    train = card.get("training_config")
    if train:
        data = train.get("data") if isinstance(train, dict) else None
        if data:
            lines += ["## Data", "", "```yaml", _yaml(data).rstrip(), "```", ""]
        lines += ["## Training configuration", "", "```yaml", _yaml(train).rstrip(), "```", ""]
    metrics = card.get("metrics")
    if metrics:
        keep = {k: v for k, v in metrics.items() if isinstance(v, (int, float, str, list)) and not isinstance(v, bool)}
        lines += ["## Evaluation", "",
                  "Measured by fastclt on held-out batches at the end of training, on the model as "
                  "trained (FVU and L0 in the training's normalised space):", "", "```json",
                  json.dumps(keep, indent=2, sort_keys=True), "```", ""]
    cal = card.get("calibration")
    if cal:
        lines += ["## TopK → JumpReLU calibration", "",
                  "Per-layer thresholds set on held-out activations so that each layer's L0 matches the target; "
                  "FVU in the data's space:", "", "```json", json.dumps(cal, indent=2, sort_keys=True), "```", ""]
    lines += ["## Files", "", *(f"- `{f}`" for f in [CONFIG_FILE] + files), "",
              "## Loading in circuit-tracer", "",
              "Upload this folder to a Hugging Face repository and pass its name as the transcoder set "
              "(`ReplacementModel.from_pretrained(model_name, \"user/repo\")`), or load it from disk:", "",
              "```python",
              *(["from circuit_tracer.transcoder.cross_layer_transcoder import load_clt",
                 f"clt = load_clt(folder, feature_input_hook=\"{config['feature_input_hook']}\", "
                 f"feature_output_hook=\"{config['feature_output_hook']}\", dtype=torch.float32, lazy_decoder=False)"]
                if config["model_kind"] == "cross_layer_transcoder" else
                ["from circuit_tracer.transcoder import load_transcoder_set",
                 f"paths = {{l: f\"{{folder}}/layer_{{l}}.safetensors\" for l in range({L})}}",
                 f"tc = load_transcoder_set(paths, scan=folder, feature_input_hook=\"{config['feature_input_hook']}\", "
                 f"feature_output_hook=\"{config['feature_output_hook']}\", dtype=torch.float32)"]),
              "```", ""]
    return "\n".join(lines)


def _run_card(model_path: Path) -> dict:
    """Model-card content of a training run: its config.yaml and summary.json, found in MODEL or
    MODEL/.. (MODEL being a run's model/ folder)."""
    import yaml

    card = {"source": str(model_path)}
    try:  # a calibrated JumpReLU model (python -m fastclt.calibrate, or a run's model_jumprelu/)
        card["calibration"] = json.loads((model_path / "calibration.json").read_text())
    except (OSError, ValueError):
        pass
    for run in (model_path, model_path.parent):
        cfg_file, summary = run / "config.yaml", run / "summary.json"
        if not (run / "model").is_dir() or not cfg_file.is_file():
            continue
        try:
            card["training_config"] = yaml.safe_load(cfg_file.read_text())
            if summary.is_file():
                card["metrics"] = json.loads(summary.read_text())
                card["metrics"].pop("calibration", None)
        except (OSError, ValueError, yaml.YAMLError):
            pass  # the card is informational; the export does not depend on it
        break
    return card


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m fastclt.export", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="target", required=True)
    c = sub.add_parser("circuit-tracer", help="a circuit-tracer transcoder folder (config.yaml + safetensors)")
    c.add_argument("model", help="a model folder fastclt.load opens (save_pretrained folder, training run, ...)")
    c.add_argument("out", help="output folder")
    c.add_argument("--format", default="auto", help="format of MODEL (default: sniffed)")
    c.add_argument("--dtype", default=None, choices=sorted(_OUT_DTYPES), help="stored dtype (default: the model's)")
    c.add_argument("--model-name", default=None, help="circuit-tracer model_name (default: the config's lm_name)")
    c.add_argument("--input-hook", default=None, help="feature_input_hook (default: from the config's input_hook)")
    c.add_argument("--output-hook", default=None, help=f"feature_output_hook (default: {OUTPUT_HOOK_NAME})")
    c.add_argument("--overwrite", action="store_true", help="replace an earlier export in OUT")
    a = p.parse_args(argv)
    import fastclt
    try:
        model = fastclt.load(a.model, format=a.format)
        out = to_circuit_tracer(model, a.out, lm_name=a.model_name, feature_input_hook=a.input_hook,
                                feature_output_hook=a.output_hook, dtype=a.dtype, overwrite=a.overwrite,
                                card=_run_card(Path(a.model)))
    except (CheckpointError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out} ({'cross_layer_transcoder' if (out / 'W_enc_0.safetensors').exists() else 'transcoder_set'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
