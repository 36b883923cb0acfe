"""Safe, atomic checkpoint files: safetensors for tensors, JSON for everything else. No pickle.

Every write goes to a temporary file in the destination folder (``.NAME.XXXXXXXX.tmp``, created
with the process's umask like any other file), is fsync'ed, then renamed over the target
(``os.replace`` is atomic on POSIX), so a crash never leaves a half-written file under the real
name; ``remove_stale_tmp`` clears what a killed process left behind. Tensor files are hashed
(SHA-256) and the hash is stored beside them (in the model's ``config.json``), so a truncated or
corrupted file is detected on load, never used.
"""
from __future__ import annotations

import hashlib
import json
import os
import secrets
from pathlib import Path
from typing import Any, Optional, Union

import torch

__all__ = ["CheckpointError", "atomic_write", "write_json", "read_json", "save_tensors", "load_tensors",
           "read_header", "sha256_file", "remove_stale_tmp"]

PathLike = Union[str, os.PathLike]
TMP_SUFFIX = ".tmp"


class CheckpointError(ValueError):
    """A checkpoint file is missing, truncated, corrupt, or does not match what was expected."""


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: PathLike, write) -> None:
    """Call ``write(tmp_path)`` to produce the file, then atomically move it to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:  # mode 0o666 less the umask, as open() gives (mkstemp would make it 0600)
        tmp = str(path.parent / f".{path.name}.{secrets.token_hex(4)}{TMP_SUFFIX}")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            break
        except FileExistsError:
            continue
    mode = os.fstat(fd).st_mode & 0o777  # 0o666 less the umask
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, mode)  # a writer that recreates the file (safetensors: 0600) gets the same mode
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def remove_stale_tmp(folder: PathLike) -> list:
    """Delete the temporary files ``atomic_write`` leaves in ``folder`` when its process is killed
    mid-write (``.NAME.XXXXXXXX.tmp``); return their paths. Only for a folder no other process is
    writing to (the trainer holds the run's lock)."""
    folder = Path(folder)
    removed = []
    if not folder.is_dir():
        return removed
    for p in folder.iterdir():
        if p.name.startswith(".") and p.name.endswith(TMP_SUFFIX) and p.is_file():
            try:
                p.unlink()
                removed.append(p)
            except FileNotFoundError:
                pass
    return removed


def write_json(path: PathLike, obj: Any) -> None:
    """Atomically write ``obj`` as indented JSON."""
    def _write(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=True)
            f.write("\n")
    atomic_write(path, _write)


def read_json(path: PathLike, what: str = "file") -> Any:
    """Read a JSON file; a missing or unparsable file raises CheckpointError naming it."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{what}: {path} does not exist")
    try:
        with open(path) as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{what}: {path} is not valid JSON ({e})") from e


def sha256_file(path: PathLike, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk)
            if not block:
                break
            h.update(block)
    return h.hexdigest()


def save_tensors(path: PathLike, tensors: dict[str, torch.Tensor], metadata: Optional[dict[str, str]] = None) -> str:
    """Atomically write ``tensors`` (moved to CPU, made contiguous) as safetensors; return the file's SHA-256."""
    from safetensors.torch import save_file

    flat = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
    atomic_write(path, lambda tmp: save_file(flat, tmp, metadata=metadata))
    return sha256_file(path)


def load_tensors(path: PathLike, expected_sha256: Optional[str] = None, device: Union[str, torch.device] = "cpu",
                 what: str = "weights") -> dict[str, torch.Tensor]:
    """Load a safetensors file, verifying its SHA-256 when given. Missing, truncated or corrupt →
    CheckpointError naming the file."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{what}: {path} does not exist")
    if expected_sha256 is not None:
        actual = sha256_file(path)
        if actual != expected_sha256:
            raise CheckpointError(f"{what}: {path} is corrupt or was modified: SHA-256 {actual[:16]}… "
                                  f"does not match the recorded {expected_sha256[:16]}…")
    try:
        return load_file(str(path), device=str(device))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{what}: {path} is not a readable safetensors file ({e})") from e


def read_header(path: PathLike, what: str = "weights") -> tuple[dict, dict]:
    """({tensor name: (shape, safetensors dtype name)}, ``__metadata__``) of a safetensors file, from
    its header alone (the safetensors library checks it against the file's size: a truncated file is
    an error); nothing is allocated. Missing or unreadable → CheckpointError naming the file."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{what}: {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            entries = {}
            for name in f.keys():
                sl = f.get_slice(name)
                entries[name] = (tuple(sl.get_shape()), sl.get_dtype())
            return entries, dict(f.metadata() or {})
    except Exception as e:  # SafetensorError, OSError: truncated, corrupt, not safetensors
        raise CheckpointError(f"{what}: {path} is not a readable safetensors file ({e})") from e
