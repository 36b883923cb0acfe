"""Training checkpoints: per-rank shards, atomic, verified, no pickle.

    out_dir/checkpoints/step_00000100/
        rank_00000.safetensors   model/<name> (this rank's shard: F/tp features), optim/<param>/<key>
                                 (Adam state, flattened), rng/cpu (+ rng/cuda), train/tokens_since_fired;
                                 its metadata holds the resume state (step, data position, tokens,
                                 layout, the SHA-256 of the config fingerprint), so the state is
                                 covered by the file's hash
        rank_00000.json          the same state, readable, the SHA-256 of the .safetensors and the
                                 config fingerprint
        …one pair per rank…
        meta.json                written by rank 0 after every rank has finished: the checkpoint is
                                 complete only when it exists
    out_dir/model/               the merged save_pretrained model (tp shards concatenated along the
                                 feature axis — each rank contributes its own shard)

Loading verifies the SHA-256 of every rank's file and that the state in the rank's JSON, in the
tensors' metadata, in meta.json and in the folder name agree; anything else is a CheckpointError.
A checkpoint written with a different configuration (``RunConfig.fingerprint``, compared
resolved) or layout is refused with ``ConfigMismatch``. Which checkpoint a run resumes from, and
what happens to unusable ones, is decided by the trainer (fastclt.train).
"""
from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path
from typing import Optional

import torch

from fastclt.checkpoint import (CheckpointError, load_tensors, read_json, read_header, remove_stale_tmp,
                                save_tensors, write_json)

__all__ = ["CheckpointError", "ConfigMismatch", "CheckpointWriteError", "save_checkpoint", "find_checkpoints",
           "load_checkpoint", "restore", "merge_checkpoint", "model_class", "checkpoint_dir", "is_checkpoint_folder",
           "set_aside", "remove_stale_files"]

_STEP = re.compile(r"^step_(\d{8})$")
_STATE_KEY = "fastclt.state"
STATE_FIELDS = ("step", "micro", "tokens")


class ConfigMismatch(ValueError):
    """A checkpoint that is intact but belongs to another configuration: never silently skipped."""


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (full disk, I/O error) on some rank; the previous ones are kept."""


def checkpoint_dir(out_dir) -> Path:
    return Path(out_dir) / "checkpoints"


def is_checkpoint_folder(path) -> bool:
    """A step folder with its meta.json (complete as far as the file names go)."""
    p = Path(path)
    return p.is_dir() and (p / "meta.json").is_file()


def _rank_name(rank: int) -> str:
    return f"rank_{rank:05d}"


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def save_checkpoint(out_dir, step: int, model, optimizer, param_names: list, extra_tensors: dict, state: dict,
                    layout, fingerprint: dict, full_config: dict, keep: int, agree) -> Path:
    """Every rank writes its pair of files; rank 0 then writes meta.json and prunes old ones.

    ``agree(flag) -> bool`` ORs a flag over all ranks (a collective). A rank that cannot write its
    files (full disk, I/O error) makes every rank raise CheckpointWriteError: the incomplete folder is
    removed and the previous checkpoints are kept."""
    folder = checkpoint_dir(out_dir) / f"step_{step:08d}"
    record = {"step": step, "rank": layout.rank, "tp": layout.tp, "dp": layout.dp,
              "state": {k: int(state[k]) for k in STATE_FIELDS}, "fingerprint_sha256": _digest(fingerprint)}
    name = _rank_name(layout.rank)
    error = None
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {f"model/{k}": v for k, v in model.state_dict().items()}
        opt_state = optimizer.state_dict()["state"]
        for i, pname in enumerate(param_names):
            for key, t in opt_state.get(i, {}).items():
                tensors[f"optim/{pname}/{key}"] = t if torch.is_tensor(t) else torch.tensor(t)
        tensors["rng/cpu"] = torch.get_rng_state()
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            tensors["rng/cuda"] = torch.cuda.get_rng_state()
        tensors.update({f"train/{k}": v for k, v in extra_tensors.items()})
        digest = save_tensors(folder / f"{name}.safetensors", tensors,
                              metadata={"format": "pt", _STATE_KEY: json.dumps(record, sort_keys=True)})
        write_json(folder / f"{name}.json", {**record, "sha256": digest, "fingerprint": fingerprint})
    except OSError as e:
        error = e
    _raise_if_failed(agree, error, folder, layout, out_dir)
    if layout.rank == 0:
        try:
            write_json(folder / "meta.json", {"step": step, "world": layout.world, "tp": layout.tp, "dp": layout.dp,
                                              "complete": True, "config": full_config})
        except OSError as e:
            error = e
    _raise_if_failed(agree, error, folder, layout, out_dir)
    if layout.rank == 0:
        _prune(out_dir, keep)
    agree(False)
    return folder


def _raise_if_failed(agree, error: Optional[OSError], folder: Path, layout, out_dir) -> None:
    if not agree(error is not None):
        return
    if layout.rank == 0:
        shutil.rmtree(folder, ignore_errors=True)
    prev = find_checkpoints(out_dir)
    kept = f"the previous checkpoint {prev[0]} is kept" if prev else "there is no earlier checkpoint"
    why = f"rank {layout.rank}: {error}" if error is not None else "failed on another rank"
    raise CheckpointWriteError(f"checkpoint {folder.name} could not be written ({why}); {kept}. Free space in "
                               f"{folder.parent.parent} (or use another out_dir) and rerun to resume")


def _prune(out_dir, keep: int) -> None:
    """Keep the newest ``keep`` complete checkpoints; incomplete folders are leftovers of a crash."""
    complete = find_checkpoints(out_dir)
    for p in find_checkpoints(out_dir, complete_only=False):
        if p not in complete[:keep]:
            shutil.rmtree(p, ignore_errors=True)


def find_checkpoints(out_dir, complete_only: bool = True) -> list:
    """Step folders, newest first."""
    root = checkpoint_dir(out_dir)
    if not root.is_dir():
        return []
    found = sorted((p for p in root.iterdir() if p.is_dir() and _STEP.match(p.name)), key=lambda p: p.name,
                   reverse=True)
    return [p for p in found if (p / "meta.json").is_file()] if complete_only else found


def set_aside(folder: Path) -> Path:
    """Rename an unusable checkpoint out of the rotation (``step_X.corrupt``, or ``.corrupt.N`` when
    that name is taken) and return the new path; it is kept for inspection."""
    target = folder.with_name(folder.name + ".corrupt")
    n = 1
    while target.exists():
        target = folder.with_name(f"{folder.name}.corrupt.{n}")
        n += 1
    folder.rename(target)
    return target


def remove_stale_files(out_dir) -> int:
    """The temporary files of interrupted atomic writes in the run's folders (out_dir, model/,
    model_jumprelu/, checkpoints/ and each step folder); how many were removed."""
    out = Path(out_dir)
    folders = [out, out / "model", out / "model_jumprelu", checkpoint_dir(out)]
    folders += find_checkpoints(out, complete_only=False)
    return sum(len(remove_stale_tmp(f)) for f in folders)


def load_checkpoint(folder: Path, layout, fingerprint: dict, device, resolve: bool = True) -> tuple[dict, dict]:
    """This rank's (tensors, state) from ``folder`` after checking completeness, layout, config, the
    SHA-256 and the agreement of the state recorded in the tensors' metadata, the rank's JSON,
    meta.json and the folder name. Raises CheckpointError (corrupt, incomplete, edited) or
    ConfigMismatch (config/layout). ``resolve``: the stored fingerprint is a trainer configuration's,
    resolved as ``RunConfig.fingerprint`` before the comparison (False: compared as stored)."""
    from fastclt.training.config import resolve_fingerprint
    folder = Path(folder)
    meta = read_json(folder / "meta.json", "checkpoint meta.json")
    if not isinstance(meta, dict):
        raise CheckpointError(f"checkpoint {folder}: meta.json holds no object")
    m = _STEP.match(folder.name)
    if m is None or meta.get("step") != int(m.group(1)):
        raise CheckpointError(f"checkpoint {folder}: meta.json records step {meta.get('step')!r}, not the step of "
                              f"the folder's name (step_XXXXXXXX)")
    if (meta.get("tp"), meta.get("dp")) != (layout.tp, layout.dp):
        raise ConfigMismatch(f"checkpoint {folder}: written with tp={meta.get('tp')}, dp={meta.get('dp')}, but "
                             f"this run has tp={layout.tp}, dp={layout.dp} (train.tp and the torchrun world size "
                             f"must match)")
    name = _rank_name(layout.rank)
    info = read_json(folder / f"{name}.json", f"checkpoint {name}.json")
    if not isinstance(info, dict) or not isinstance(info.get("fingerprint"), dict):
        raise CheckpointError(f"checkpoint {folder / name}.json: not a rank record (no fingerprint)")
    theirs = resolve_fingerprint(info["fingerprint"]) if resolve else info["fingerprint"]
    diff = sorted(k for k in set(fingerprint) | set(theirs) if fingerprint.get(k) != theirs.get(k))
    if diff:
        shown = ", ".join(f"{k}: checkpoint {theirs.get(k)!r} vs now {fingerprint.get(k)!r}" for k in diff[:6])
        hint = ""
        if "train.optimizer_moments" in diff:
            hint = (f"; its Adam moments are stored in {theirs.get('train.optimizer_moments')} and are resumed as "
                    f"they are (exactly), not converted: rerun with --train.optimizer_moments "
                    f"{theirs.get('train.optimizer_moments')} to resume it")
        raise ConfigMismatch(f"checkpoint {folder}: its configuration does not match this run ({shown}){hint}; use "
                             f"another out_dir (or delete its checkpoints/ folder to start over)")
    weights = folder / f"{name}.safetensors"
    if not isinstance(info.get("sha256"), str):
        raise CheckpointError(f"checkpoint {folder / name}.json: records no SHA-256 of {weights.name}")
    tensors = load_tensors(weights, info["sha256"], device="cpu", what=f"checkpoint {name}.safetensors")
    record = read_header(weights, f"checkpoint {name}.safetensors")[1].get(_STATE_KEY)
    try:
        record = json.loads(record) if record is not None else None
    except json.JSONDecodeError:
        record = None
    if not isinstance(record, dict):
        raise CheckpointError(f"checkpoint {weights}: its metadata holds no resume state (written by an older "
                              f"fastclt?); it cannot be verified")
    claimed = {"step": info.get("step"), "rank": info.get("rank"), "tp": info.get("tp"), "dp": info.get("dp"),
               "state": info.get("state"), "fingerprint_sha256": _digest(info["fingerprint"])}
    bad = [k for k in claimed if claimed[k] != record.get(k)]
    if bad or record.get("step") != meta["step"] or record.get("rank") != layout.rank:
        what = ", ".join(f"{k}: {claimed[k]!r} in {name}.json vs {record.get(k)!r} with the tensors" for k in bad)
        raise CheckpointError(f"checkpoint {folder}: the recorded state does not agree ({what or 'step or rank'}; "
                              f"meta.json step {meta['step']}) — the files were edited or mixed up")
    return tensors, dict(record["state"])


def restore(tensors: dict, model, optimizer, param_names: list, device) -> dict:
    """Load model, optimizer and RNG state from a rank's tensors; return the train/* extras.

    Adam's moments must be stored in the dtype this run keeps them in (``optimizer.moment_dtype`` of
    fastclt.training.optim.Adam, the parameter's dtype for torch's Adam): moments of another dtype
    (train.optimizer_moments changed) are refused with ConfigMismatch, never cast."""
    sd = optimizer.state_dict()
    params = [p for g in optimizer.param_groups for p in g["params"]]
    state = {}
    for i, name in enumerate(param_names):
        prefix = f"optim/{name}/"
        entry = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        want = getattr(optimizer, "moment_dtype", params[i].dtype)
        for key in ("exp_avg", "exp_avg_sq"):
            if key in entry and entry[key].dtype != want:
                stored = str(entry[key].dtype).replace("torch.", "")
                raise ConfigMismatch(f"checkpoint: the Adam moments of {name} ({key}) are stored in {stored}, but "
                                     f"this run keeps them in {str(want).replace('torch.', '')} "
                                     f"(train.optimizer_moments); resume with the setting the checkpoint was written "
                                     f"with (moments are resumed exactly, not converted)")
        if entry:
            state[i] = {k: (v if k == "step" else v.to(device)) for k, v in entry.items()}
    model.load_checked_state({k[6:]: v.to(device) for k, v in tensors.items() if k.startswith("model/")},
                             source="checkpoint")
    sd["state"] = state
    optimizer.load_state_dict(sd)
    torch.set_rng_state(tensors["rng/cpu"])
    if "rng/cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng/cuda"])
    return {k[6:]: v for k, v in tensors.items() if k.startswith("train/")}


def model_class(mcfg):
    """The model class of a dictionary config: SparseAutoencoder for an SAEConfig, MOLT for a
    MOLTConfig, CrossLayerTranscoder for a CLTConfig."""
    from fastclt.models import MODEL_CLASSES
    for cls in MODEL_CLASSES.values():
        if type(mcfg) is cls.config_class:
            return cls
    raise TypeError(f"model config: expected a CLTConfig, SAEConfig or MOLTConfig, got {type(mcfg).__name__}")


def model_config_of(model_section: dict):
    """(model class, its config) of a saved run configuration's ``model`` section (the resolved
    section plus the LM metadata the trainer records)."""
    import dataclasses

    from fastclt.training.config import ModelSection
    config_class = ModelSection(kind=model_section.get("kind", "clt")).config_class()
    names = {f.name for f in dataclasses.fields(config_class)}
    mcfg = config_class(**{k: v for k, v in model_section.items() if k in names and v is not None})
    return model_class(mcfg), mcfg


def merge_checkpoint(folder, out: Optional[Path] = None):
    """The full model of a checkpoint folder: tp shards of dp group 0 (ranks 0 … tp−1), read from
    disk and concatenated along the feature axis → a CrossLayerTranscoder / SparseAutoencoder / MOLT
    (saved with save_pretrained to ``out`` when given)."""
    from fastclt.training.parallel import merge_states
    folder = Path(folder)
    meta = read_json(folder / "meta.json", "checkpoint meta.json")
    cls, mcfg = model_config_of(meta["config"]["model"])
    model = cls(mcfg)
    shards = []
    for r in range(meta["tp"]):
        info = read_json(folder / f"{_rank_name(r)}.json")
        t = load_tensors(folder / f"{_rank_name(r)}.safetensors", info["sha256"])
        shards.append({k[6:]: v for k, v in t.items() if k.startswith("model/")})
    model.load_checked_state(merge_states(shards, model.feature_axes()), source=str(folder))
    if out is not None:
        model.save_pretrained(out)
    return model
