"""Other libraries' checkpoints in and out of fastclt.

    model = fastclt.load(path)                        # the format is sniffed
    model = fastclt.load(path, format="sparsify")     # or named

Formats read (each module's docstring gives the layout and the exact mapping):

    fastclt            a ``save_pretrained`` folder (or a training run's ``--out_dir``, via its model/)
    circuit-tracer     config.yaml + W_enc_{l}/W_dec_{l} (CLT) or layer_{l} (transcoder set) safetensors
    sparsify           eai-sparsify: cfg.json + sae.safetensors (one hookpoint folder)
    saelens            SAELens: cfg.json + sae_weights.safetensors
    crosslayer-coding  curt-tigges/crosslayer-coding: cfg.json + its state dict (.safetensors)

A PLT or an SAE takes and returns [B, d] like the source library's module; a CLT [B, L, d].
Nothing is unpickled or executed; files are checked before any weight is read (``_io``). What
cannot be computed exactly by a fastclt model is refused with ``NotRepresentableError`` naming
the field. Writing: ``fastclt.export.to_circuit_tracer``.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Union

import torch

from fastclt.checkpoint import CheckpointError
from fastclt.interop._io import NotRepresentableError

__all__ = ["load", "sniff", "FORMATS", "NotRepresentableError", "CheckpointError"]

FORMATS = ("fastclt", "circuit-tracer", "sparsify", "saelens", "crosslayer-coding")


def _loaders() -> dict:
    from fastclt.interop.circuit_tracer import load_circuit_tracer
    from fastclt.interop.crosslayer_coding import load_crosslayer_coding
    from fastclt.interop.saelens import load_saelens
    from fastclt.interop.sparsify import load_sparsify
    return {"fastclt": _load_fastclt, "circuit-tracer": load_circuit_tracer, "sparsify": load_sparsify,
            "saelens": load_saelens, "crosslayer-coding": load_crosslayer_coding}


def _fastclt_folder(path: Path):
    """The save_pretrained folder at ``path`` or at ``path/model`` (a training run), or None."""
    from fastclt.models.base import CONFIG_FILE, WEIGHTS_FILE
    for folder in (path, path / "model"):
        if (folder / CONFIG_FILE).is_file() and (folder / WEIGHTS_FILE).is_file():
            return folder
    return None


def _load_fastclt(path: Path):
    from fastclt.checkpoint import read_json
    from fastclt.models import MODEL_CLASSES
    from fastclt.models.base import CONFIG_FILE
    folder = _fastclt_folder(path)
    if folder is None:
        raise CheckpointError(f"path: {path} holds no fastclt model (config.json + model.safetensors)")
    meta = read_json(folder / CONFIG_FILE, "config.json")
    cls = MODEL_CLASSES.get(meta.get("model_type") if isinstance(meta, dict) else None)
    if cls is None:
        raise CheckpointError(f"config.json: {folder / CONFIG_FILE} has no known model_type")
    return cls.from_pretrained(folder)


def sniff(path: Union[str, os.PathLike]) -> str:
    """The format of the checkpoint at ``path`` (one of FORMATS), from its file names and config keys."""
    from fastclt.interop.circuit_tracer import is_circuit_tracer
    from fastclt.interop.crosslayer_coding import is_crosslayer_coding
    from fastclt.interop.saelens import is_saelens
    from fastclt.interop.sparsify import is_sparsify
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"path: {p} does not exist")
    if p.is_file():
        if is_crosslayer_coding(p):
            return "crosslayer-coding"
        raise CheckpointError(f"path: {p} is a file; pass the checkpoint's folder (a single file is read only as a "
                              f"crosslayer-coding state dict with its cfg.json beside it or one folder up)")
    if _fastclt_folder(p) is not None:
        return "fastclt"
    if is_sparsify(p):
        return "sparsify"
    if is_saelens(p):
        return "saelens"
    if is_circuit_tracer(p):
        return "circuit-tracer"
    if is_crosslayer_coding(p):
        return "crosslayer-coding"
    hookpoints = sorted(q.name for q in p.iterdir() if q.is_dir() and (is_sparsify(q) or is_saelens(q)))
    if hookpoints:
        raise CheckpointError(f"path: {p} holds one checkpoint per hookpoint; pass one of its folders: "
                              f"{', '.join(hookpoints[:8])}{' …' if len(hookpoints) > 8 else ''}")
    raise CheckpointError(f"path: the format of {p} is not recognised (fastclt reads {', '.join(FORMATS)})")


def load(path: Union[str, os.PathLike], format: str = "auto", device: Union[str, torch.device] = "cpu"):
    """The fastclt model (CrossLayerTranscoder, SparseAutoencoder or MOLT) of the checkpoint at ``path``.

    format: "auto" (sniffed, see ``sniff``) or one of FORMATS. Unreadable or inconsistent files →
    CheckpointError; readable but not exactly representable → NotRepresentableError (both
    ValueErrors naming the file and field)."""
    if format != "auto" and format not in FORMATS:
        raise ValueError(f"format: expected 'auto' or one of {FORMATS}, got {format!r}")
    p = Path(path)
    fmt = sniff(p) if format == "auto" else format
    if not p.exists():
        raise CheckpointError(f"path: {p} does not exist")
    return _loaders()[fmt](p).to(device)
