"""Activation sources and the prefetcher.

Every source maps a micro-batch number (``get(i)``: this rank's i-th; ``get_global(g)``: the g-th of
the stream, which dp rank r reads as g = i·dp + r) to ``(x [B, L, d_in], y [B, L, d_out])`` deterministically,
so that the data position of a checkpoint is one integer and a resumed run sees the same batches:

    SyntheticSource   planted features (fastclt.training.synthetic); micro-batch i of dp rank r
    ShardSource       a folder of activation shards written by ``python -m fastclt.extract``:
                      ``manifest.json`` + ``shard_XXXXX.safetensors`` (tensors "x", "y") or .npy
                      pairs, memory-mapped (numpy); an epoch is the shards in a seeded order, each
                      in a seeded token order (``data.shuffle``); micro-batch g·dp + r of the epoch
                      stream goes to dp rank r
    HFSource          on-the-fly extraction from a local Hugging Face causal LM (MLP input → x,
                      MLP output → y per layer; fastclt.training.extract)

``Prefetcher`` prepares the next batches in a background thread (pinned memory, non-blocking copy
to the device); the HF source runs in the caller's thread (it already uses the device).
"""
from __future__ import annotations

import json
import queue
import struct
import threading
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from fastclt.training.config import ConfigError

__all__ = ["SyntheticSource", "ShardSource", "HFSource", "Prefetcher", "make_source", "MANIFEST", "read_manifest"]

MANIFEST = "manifest.json"
FORMAT = "fastclt.activations"
_ST_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "F64": np.float64}


class SyntheticSource:
    def __init__(self, cfg, kind: str, n_layers: int, d_in: int, d_out: int, dp_rank: int) -> None:
        from fastclt.training.synthetic import SyntheticActivations
        self.gen = SyntheticActivations(n_layers, d_in, d_out, cfg.data.n_true, cfg.data.true_l0, cfg.data.noise,
                                        seed=cfg.train.seed, kind=kind)
        self.B, self.dp_rank = cfg.train.batch_size, dp_rank
        self.n_layers, self.d_in, self.d_out = n_layers, d_in, d_out

    def get(self, i: int):
        return self.gen.batch(i, self.B, self.dp_rank)

    def get_global(self, g: int):
        return self.gen.batch(g, self.B, 0)


# ------------------------------------------------------------------------- shards on disk
def _memmap_safetensors(path: Path) -> dict:
    """{name: np.memmap} of a safetensors file (bf16 as uint16, viewed as bf16 by torch later)."""
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in _ST_DTYPES:
            raise ConfigError(f"data.path: {path} tensor {name} has dtype {info['dtype']}; expected F32, F16 or BF16")
        start, end = info["data_offsets"]
        out[name] = (np.memmap(path, dtype=_ST_DTYPES[info["dtype"]], mode="r", offset=8 + n + start,
                               shape=tuple(info["shape"])), info["dtype"])
    return out


def read_manifest(folder) -> dict:
    from fastclt.checkpoint import read_json
    folder = Path(folder)
    m = read_json(folder / MANIFEST, "data.path manifest")
    if not isinstance(m, dict) or m.get("format") != FORMAT or not m.get("shards"):
        raise ConfigError(f"data.path: {folder / MANIFEST} is not a fastclt activations manifest with shards")
    for s in m["shards"]:
        for key in ("x", "y") if "x" in s else ("file",):
            if not (folder / s[key]).is_file():
                raise ConfigError(f"data.path: shard file {folder / s[key]} listed in the manifest is missing")
    return m


class ShardSource:
    def __init__(self, cfg, n_layers: int, d_in: int, d_out: int, dp_rank: int, dp: int) -> None:
        self.folder = Path(cfg.data.path)
        m = read_manifest(self.folder)
        got = (m["n_layers"], m["d_in"], m["d_out"])
        if got != (n_layers, d_in, d_out):
            raise ConfigError(f"data.path: shards hold (n_layers, d_in, d_out) = {got} but the model expects "
                              f"{(n_layers, d_in, d_out)} (model.n_layers / model.d_in / model.d_out)")
        self.n_layers, self.d_in, self.d_out = n_layers, d_in, d_out
        self.shards = []
        for s in m["shards"]:
            if "file" in s:
                t = _memmap_safetensors(self.folder / s["file"])
                self.shards.append((t["x"], t["y"]))
            else:
                self.shards.append(((np.load(self.folder / s["x"], mmap_mode="r"), None),
                                    (np.load(self.folder / s["y"], mmap_mode="r"), None)))
        self.sizes = np.array([s[0][0].shape[0] for s in self.shards], dtype=np.int64)
        self.total = int(self.sizes.sum())
        self.B, self.dp_rank, self.dp = cfg.train.batch_size, dp_rank, dp
        self.shuffle, self.seed = cfg.data.shuffle, cfg.train.seed
        if self.total < self.B:
            raise ConfigError(f"data.path: {self.total} tokens in the shards, fewer than train.batch_size={self.B}")
        self._epoch = self._perm_cache = None

    def _order(self, epoch: int):
        """(shard order, start offsets in the epoch stream) of ``epoch``."""
        if self._epoch is None or self._epoch[0] != epoch:
            order = (np.random.default_rng([self.seed, epoch]).permutation(len(self.shards)) if self.shuffle
                     else np.arange(len(self.shards)))
            starts = np.concatenate([[0], np.cumsum(self.sizes[order])])
            self._epoch = (epoch, order, starts)
        return self._epoch[1], self._epoch[2]

    def _perm(self, epoch: int, shard: int):
        """The token order inside one shard for one epoch (None: stream order); one shard cached."""
        if not self.shuffle:
            return None
        if self._perm_cache is None or self._perm_cache[0] != (epoch, shard):
            perm = np.random.default_rng([self.seed, epoch, shard]).permutation(int(self.sizes[shard]))
            self._perm_cache = ((epoch, shard), perm)
        return self._perm_cache[1]

    def _tokens(self, start: int, n: int):
        """Tokens [start, start + n) of the (infinite, epoch after epoch) stream → (x, y) fp32."""
        xs, ys = [], []
        while n > 0:
            epoch, pos = divmod(start, self.total)
            order, starts = self._order(epoch)
            j = int(np.searchsorted(starts, pos, side="right") - 1)
            shard = int(order[j])
            off = pos - int(starts[j])
            take = min(n, int(self.sizes[shard]) - off)
            perm = self._perm(epoch, shard)
            rows = np.arange(off, off + take) if perm is None else np.sort(perm[off:off + take])
            (x, xdt), (y, ydt) = self.shards[shard]
            xs.append(_to_torch(x[rows], xdt))
            ys.append(_to_torch(y[rows], ydt))
            start += take
            n -= take
        return torch.cat(xs), torch.cat(ys)

    def get(self, i: int):
        return self.get_global(i * self.dp + self.dp_rank)

    def get_global(self, g: int):
        """Micro-batch ``g`` of the stream, whatever the layout (rank r's batch i is g = i·dp + r)."""
        return self._tokens(g * self.B, self.B)


def _to_torch(a: np.ndarray, st_dtype) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(a))
    if st_dtype == "BF16":
        t = t.view(torch.bfloat16)
    return t.float()


class HFSource:
    def __init__(self, cfg, kind: str, n_layers: int, d_in: int, d_out: int, dp_rank: int, dp: int,
                 device: torch.device) -> None:
        from fastclt.training.extract import HFExtractor
        layers = cfg.data.layers if cfg.data.layers is not None else list(range(n_layers))
        self.ex = HFExtractor(cfg.data.model, layers, device=device, dtype=cfg.data.hf_dtype,
                              tokens=cfg.data.tokens, ctx_len=cfg.data.ctx_len, seed=cfg.train.seed)
        if self.ex.d_model != d_in or (kind != "sae" and self.ex.d_model != d_out):
            raise ConfigError(f"model.d_in: the host model's MLP width is {self.ex.d_model}, but model.d_in={d_in}"
                              + ("" if kind == "sae" else f" and model.d_out={d_out}"))
        if cfg.train.batch_size % cfg.data.ctx_len:
            raise ConfigError(f"train.batch_size: {cfg.train.batch_size} is not a multiple of data.ctx_len="
                              f"{cfg.data.ctx_len} (hf extraction feeds whole sequences)")
        self.seqs = cfg.train.batch_size // cfg.data.ctx_len
        self.kind, self.dp_rank, self.dp = kind, dp_rank, dp
        self.n_layers, self.d_in, self.d_out = n_layers, d_in, d_out

    def get(self, i: int):
        return self.get_global(i * self.dp + self.dp_rank)

    def get_global(self, g: int):
        x, y = self.ex.activations(g * self.seqs, self.seqs)
        return (x, x) if self.kind == "sae" else (x, y)


def make_source(cfg, layout, device):
    """The configured source for this rank (every tp rank of a dp group sees the same data)."""
    mc = cfg.model_config()
    kind = cfg.kind
    L = 1 if kind == "sae" else mc.n_layers
    d_out = mc.d_in if kind == "sae" else mc.d_out
    src = cfg.data.source
    if src == "synthetic":
        return SyntheticSource(cfg, kind, L, mc.d_in, d_out, layout.dp_rank)
    if src == "shards":
        return ShardSource(cfg, L, mc.d_in, d_out, layout.dp_rank, layout.dp)
    return HFSource(cfg, kind, L, mc.d_in, d_out, layout.dp_rank, layout.dp, device)


class Prefetcher:
    """Yields (x, y) on ``device`` for micro-batches start, start + 1, …; ``depth`` > 0 prepares them
    in a background thread from pinned memory (CPU sources only)."""

    def __init__(self, source, start: int, device: torch.device, dtype: torch.dtype, depth: int) -> None:
        self.source, self.next, self.device, self.dtype = source, start, device, dtype
        self.threaded = depth > 0 and not isinstance(source, HFSource)
        self.error: Optional[BaseException] = None
        if self.threaded:
            self.q: queue.Queue = queue.Queue(maxsize=depth)
            self.stop = threading.Event()
            self.thread = threading.Thread(target=self._work, args=(start,), daemon=True)
            self.thread.start()

    def _load(self, i: int):
        x, y = self.source.get(i)
        if self.device.type == "cuda":
            x, y = x.pin_memory(), y.pin_memory()
        return x, y

    def _work(self, i: int) -> None:
        try:
            while not self.stop.is_set():
                item = self._load(i)
                while not self.stop.is_set():
                    try:
                        self.q.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                i += 1
        except BaseException as e:  # re-raised in the consumer
            self.q.put(e)

    def get(self):
        if self.threaded:
            item = self.q.get()
            if isinstance(item, BaseException):
                raise item
        else:
            item = self.source.get(self.next)
        self.next += 1
        x, y = item
        nb = self.device.type == "cuda"
        return x.to(self.device, self.dtype, non_blocking=nb), y.to(self.device, self.dtype, non_blocking=nb)

    def close(self) -> None:
        if self.threaded:
            self.stop.set()
            self.thread.join(timeout=5)
