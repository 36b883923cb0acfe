"""Training checkpoints: per-rank shards, atomic, verified, no pickle.

    out_dir/checkpoints/step_00000100/
        rank_00000.safetensors   model/<name> (this rank's shard: F/tp features), optim/<param>/<key>
                                 (Adam state, flattened), rng/cpu (+ rng/cuda), train/tokens_since_fired
        rank_00000.json          step, data position (micro-batches consumed), tokens seen, SHA-256 of
                                 the .safetensors, layout (tp, dp, rank), the config fingerprint
        …one pair per rank…
        meta.json                written by rank 0 after every rank has finished: the checkpoint is
                                 complete only when it exists
    out_dir/model/               the merged save_pretrained model (tp shards concatenated along the
                                 feature axis — each rank contributes its own shard)

Loading verifies the SHA-256 of every rank's file; a truncated or corrupt checkpoint is reported,
renamed ``step_XXXXXXXX.corrupt`` and the previous one is used (the last ``checkpoint.keep`` are
kept). A checkpoint written with a
different configuration (``RunConfig.fingerprint``) or layout is refused with an error.
"""
from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Optional

import torch

from fastclt.checkpoint import CheckpointError, load_tensors, read_json, save_tensors, write_json

__all__ = ["CheckpointError", "ConfigMismatch", "save_checkpoint", "find_checkpoints", "load_checkpoint",
           "restore", "merge_checkpoint", "checkpoint_dir"]

_STEP = re.compile(r"^step_(\d{8})$")


def checkpoint_dir(out_dir) -> Path:
    return Path(out_dir) / "checkpoints"


def _rank_name(rank: int) -> str:
    return f"rank_{rank:05d}"


def save_checkpoint(out_dir, step: int, model, optimizer, param_names: list, extra_tensors: dict, state: dict,
                    layout, fingerprint: dict, full_config: dict, keep: int, barrier) -> Path:
    """Every rank writes its pair of files; rank 0 then writes meta.json and prunes old ones."""
    folder = checkpoint_dir(out_dir) / f"step_{step:08d}"
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {f"model/{k}": v for k, v in model.state_dict().items()}
    opt_state = optimizer.state_dict()["state"]
    for i, name in enumerate(param_names):
        for key, t in opt_state.get(i, {}).items():
            tensors[f"optim/{name}/{key}"] = t if torch.is_tensor(t) else torch.tensor(t)
    tensors["rng/cpu"] = torch.get_rng_state()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors["rng/cuda"] = torch.cuda.get_rng_state()
    tensors.update({f"train/{k}": v for k, v in extra_tensors.items()})
    name = _rank_name(layout.rank)
    digest = save_tensors(folder / f"{name}.safetensors", tensors, metadata={"format": "pt", "step": str(step)})
    write_json(folder / f"{name}.json", {"step": step, "rank": layout.rank, "tp": layout.tp, "dp": layout.dp,
                                         "sha256": digest, "state": state, "fingerprint": fingerprint})
    barrier()
    if layout.rank == 0:
        write_json(folder / "meta.json", {"step": step, "world": layout.world, "tp": layout.tp, "dp": layout.dp,
                                          "complete": True, "config": full_config})
        _prune(out_dir, keep)
    barrier()
    return folder


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


def load_checkpoint(folder: Path, layout, fingerprint: dict, device) -> tuple[dict, dict]:
    """This rank's (tensors, json) from ``folder`` after checking completeness, layout, config and
    the SHA-256. Raises CheckpointError (corrupt/incomplete) or ValueError (config/layout mismatch)."""
    meta = read_json(folder / "meta.json", "checkpoint meta.json")
    if (meta.get("tp"), meta.get("dp")) != (layout.tp, layout.dp):
        raise ConfigMismatch(f"checkpoint {folder}: written with tp={meta.get('tp')}, dp={meta.get('dp')}, but "
                             f"this run has tp={layout.tp}, dp={layout.dp} (train.tp and the torchrun world size "
                             f"must match)")
    name = _rank_name(layout.rank)
    info = read_json(folder / f"{name}.json", f"checkpoint {name}.json")
    diff = sorted(k for k in set(fingerprint) | set(info.get("fingerprint", {}))
                  if fingerprint.get(k) != info.get("fingerprint", {}).get(k))
    if diff:
        shown = ", ".join(f"{k}: checkpoint {info.get('fingerprint', {}).get(k)!r} vs now {fingerprint.get(k)!r}"
                          for k in diff[:6])
        raise ConfigMismatch(f"checkpoint {folder}: its configuration does not match this run ({shown}); use another "
                        f"out_dir (or delete its checkpoints/ folder to start over)")
    tensors = load_tensors(folder / f"{name}.safetensors", info.get("sha256"), device="cpu",
                           what=f"checkpoint {name}.safetensors")
    return tensors, info


class ConfigMismatch(ValueError):
    """A checkpoint that is intact but belongs to another configuration: never silently skipped."""


def restore(tensors: dict, model, optimizer, param_names: list, device) -> dict:
    """Load model, optimizer and RNG state from a rank's tensors; return the train/* extras."""
    model.load_checked_state({k[6:]: v.to(device) for k, v in tensors.items() if k.startswith("model/")},
                             source="checkpoint")
    sd = optimizer.state_dict()
    state = {}
    for i, name in enumerate(param_names):
        prefix = f"optim/{name}/"
        entry = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        if entry:
            state[i] = {k: (v if k == "step" else v.to(device)) for k, v in entry.items()}
    sd["state"] = state
    optimizer.load_state_dict(sd)
    torch.set_rng_state(tensors["rng/cpu"])
    if "rng/cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng/cuda"])
    return {k[6:]: v for k, v in tensors.items() if k.startswith("train/")}


def merge_checkpoint(folder, out: Optional[Path] = None):
    """The full model of a checkpoint folder: tp shards of dp group 0 (ranks 0 … tp−1), read from
    disk and concatenated along the feature axis → a CrossLayerTranscoder / SparseAutoencoder / MOLT
    (saved with save_pretrained to ``out`` when given)."""
    import fastclt
    from fastclt.training.parallel import merge_states
    folder = Path(folder)
    meta = read_json(folder / "meta.json", "checkpoint meta.json")
    cfg_dict = meta["config"]
    mcfg = {k: v for k, v in cfg_dict["model"].items() if k != "kind"}
    cls = fastclt.models.MODEL_KINDS[cfg_dict["model"].get("kind", "clt")]
    model = cls(cls.config_class(**mcfg))
    shards = []
    for r in range(meta["tp"]):
        info = read_json(folder / f"{_rank_name(r)}.json")
        t = load_tensors(folder / f"{_rank_name(r)}.safetensors", info["sha256"])
        shards.append({k[6:]: v for k, v in t.items() if k.startswith("model/")})
    model.load_checked_state(merge_states(shards, model.feature_axes()), source=str(folder))
    if out is not None:
        model.save_pretrained(out)
    return model
