"""Reading other libraries' checkpoint folders without trusting them.

Only safetensors (tensors) and JSON / YAML (``yaml.safe_load``: no object construction) are read;
nothing is unpickled and nothing in a file is executed. Every check happens before memory is
allocated for the model: config files are size-capped, tensor names, shapes and dtypes are read
from the safetensors header and compared with what the config implies, and a path named inside a
file must stay inside the folder. Errors are ``CheckpointError`` (a ValueError) naming the file and
the field or tensor; what is readable but has no exact fastclt form is ``NotRepresentableError``.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable, Optional, Union

import torch

from fastclt.checkpoint import CheckpointError

__all__ = ["NotRepresentableError", "CheckpointError", "read_config", "TensorFile", "inside", "field",
           "MAX_CONFIG_BYTES"]

PathLike = Union[str, os.PathLike]

# A config file is a few kilobytes; a much larger one is not a config.
MAX_CONFIG_BYTES = 16 << 20

_FLOAT_DTYPES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float64: "float64"}
# safetensors dtype names → torch dtypes this package stores; float16 is widened to float32 (exactly).
_ST_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F64": torch.float64, "F16": torch.float16}


class NotRepresentableError(ValueError):
    """The checkpoint is readable, but what it computes has no exact fastclt form (the message names
    the field and says why)."""


def read_config(path: PathLike, what: str, kind: str = "json") -> dict:
    """A JSON (``kind="json"``) or YAML (``"yaml"``, safe loader) file holding one mapping.
    Missing, oversized, unparsable or not-a-mapping → CheckpointError naming ``what`` and the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{what}: {path} does not exist")
    size = path.stat().st_size
    if size > MAX_CONFIG_BYTES:
        raise CheckpointError(f"{what}: {path} is {size:,} bytes; a config file is expected to be under "
                              f"{MAX_CONFIG_BYTES:,}")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
        if kind == "json":
            data = json.loads(text)
        else:
            import yaml
            data = yaml.safe_load(text)
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{what}: {path} is not UTF-8 text ({e})") from e
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{what}: {path} is not valid JSON ({e})") from e
    except Exception as e:  # yaml.YAMLError and its subclasses (constructor errors for !!python tags)
        raise CheckpointError(f"{what}: {path} is not valid YAML for the safe loader ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''})") from e
    if not isinstance(data, dict):
        raise CheckpointError(f"{what}: {path} holds a {type(data).__name__}, expected a mapping of fields")
    return data


_MISSING = object()


def field(cfg: dict, name: str, types, what: str, default: Any = _MISSING, check=None) -> Any:
    """``cfg[name]`` checked against ``types`` (bool is never an int here) and ``check(value) -> bool``;
    errors name ``what`` and the field."""
    if name not in cfg:
        if default is _MISSING:
            raise CheckpointError(f"{what}: missing field {name!r}")
        return default
    value = cfg[name]
    types = types if isinstance(types, tuple) else (types,)
    if (isinstance(value, bool) and bool not in types) or not isinstance(value, types):
        names = " or ".join(t.__name__ if t is not type(None) else "null" for t in types)
        raise CheckpointError(f"{what}: field {name!r} is {value!r}, expected {names}")
    if check is not None and not check(value):
        raise CheckpointError(f"{what}: field {name!r} has an invalid value {value!r}")
    return value


def inside(folder: Path, rel: Any, what: str) -> Path:
    """``folder / rel`` for a relative path named in a file; absolute paths, URLs, ``..`` escapes and
    links that lead outside ``folder`` are refused."""
    if not isinstance(rel, str) or not rel:
        raise CheckpointError(f"{what}: expected a relative file name, got {rel!r}")
    if "://" in rel or os.path.isabs(rel) or rel.startswith("~"):
        raise CheckpointError(f"{what}: {rel!r} is not a path inside {folder} (only relative paths are read)")
    base = folder.resolve()
    target = (folder / rel).resolve()
    if base != target and base not in target.parents:
        raise CheckpointError(f"{what}: {rel!r} leads outside the folder {folder}")
    return target


class TensorFile:
    """A safetensors file opened for checked reads: names, shapes and dtypes come from its header
    (validated by the safetensors library against the file's size) before any tensor is read."""

    def __init__(self, path: PathLike, what: Optional[str] = None) -> None:
        from safetensors import safe_open

        self.path = Path(path)
        self.what = what or str(self.path)
        if not self.path.is_file():
            raise CheckpointError(f"{self.what}: {self.path} does not exist")
        try:
            self._f = safe_open(str(self.path), framework="pt", device="cpu")
            self.keys = set(self._f.keys())
            self._dtypes = {k: self._f.get_slice(k).get_dtype() for k in self.keys}
            self._shapes = {k: tuple(self._f.get_slice(k).get_shape()) for k in self.keys}
        except Exception as e:  # SafetensorError, OSError, ValueError: truncated, corrupt, not safetensors
            raise CheckpointError(f"{self.what}: {self.path} is not a readable safetensors file ({e})") from e

    def shape(self, name: str) -> tuple:
        self._need(name)
        return self._shapes[name]

    def _need(self, name: str) -> None:
        if name not in self.keys:
            raise CheckpointError(f"{self.what}: tensor {name!r} is missing (found: {sorted(self.keys)[:12]})")

    def check(self, name: str, shape: tuple) -> None:
        """Tensor ``name`` exists, is floating point and has ``shape``."""
        self._need(name)
        dt = self._dtypes[name]
        if dt not in _ST_DTYPES:
            raise CheckpointError(f"{self.what}: tensor {name!r} has dtype {dt}; expected a float dtype "
                                  f"(F32, BF16, F64 or F16)")
        if self._shapes[name] != tuple(shape):
            raise CheckpointError(f"{self.what}: tensor {name!r} has shape {list(self._shapes[name])}, "
                                  f"expected {list(shape)}")

    def get(self, name: str, shape: tuple) -> torch.Tensor:
        """The checked tensor (float16 widened to float32, exactly)."""
        self.check(name, shape)
        try:
            t = self._f.get_tensor(name)
        except Exception as e:
            raise CheckpointError(f"{self.what}: tensor {name!r} could not be read ({e})") from e
        return t.float() if t.dtype == torch.float16 else t

    def dtype(self, names: Iterable[str]) -> str:
        """The one parameter dtype ("float32" | "bfloat16" | "float64") of ``names``; mixed dtypes are
        stored at the widest of them (a lossless widening)."""
        dts = set()
        for n in names:
            self._need(n)
            dt = _ST_DTYPES.get(self._dtypes[n])
            if dt is None:
                raise CheckpointError(f"{self.what}: tensor {n!r} has dtype {self._dtypes[n]}; expected a float dtype")
            dts.add(torch.float32 if dt == torch.float16 else dt)
        return common_dtype(dts)


def common_dtype(dtypes: Iterable[torch.dtype]) -> str:
    """The narrowest of float32 / bfloat16 / float64 that holds every dtype exactly."""
    dts = set(dtypes)
    if torch.float64 in dts:
        return "float64"
    if torch.float32 in dts or len(dts) != 1:
        return "float32"
    return _FLOAT_DTYPES[next(iter(dts))]


def build(cfg, params: dict, what: str):
    """The fastclt model of ``cfg`` (CLTConfig → CrossLayerTranscoder, SAEConfig → SparseAutoencoder)
    holding ``params`` ({state_dict name: tensor}, cast to the config's dtype, which holds each of them
    exactly); the other state (normalisation statistics) keeps its identity defaults."""
    from fastclt.config import SAEConfig
    from fastclt.models import CrossLayerTranscoder, SparseAutoencoder

    model = (SparseAutoencoder if isinstance(cfg, SAEConfig) else CrossLayerTranscoder)(cfg)
    state = model.state_dict()
    unknown = sorted(set(params) - set(state))
    if unknown:  # a bug in a loader, not a bad file
        raise RuntimeError(f"{what}: internal: no fastclt parameters named {unknown}")
    for name, t in params.items():
        if tuple(t.shape) != tuple(state[name].shape):
            raise CheckpointError(f"{what}: {name} has shape {list(t.shape)}, expected {list(state[name].shape)}")
        state[name] = t.to(state[name].dtype)
    model.load_state_dict(state)
    return model
