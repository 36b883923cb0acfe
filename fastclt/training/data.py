"""Activation sources and the prefetcher.

Every source yields ``(x [B, L, d_in], y [B, L, d_out])`` micro-batches (``get(i)``: this rank's i-th,
called in order) and an initialisation sample (``init_sample(n)``: the same n micro-batches on every
rank and for every layout). The data position of a checkpoint is the micro-batch counter, plus —
for a stateful source — ``state_dict()``:

    SyntheticSource   planted features (fastclt.training.synthetic); micro-batch i of dp rank r, a
                      pure function of (seed, r, i)
    ShardSource       a folder of activation shards written by ``python -m fastclt.extract``:
                      ``manifest.json`` + ``shard_XXXXX.safetensors`` (tensors "x", "y") or .npy
                      pairs, memory-mapped (numpy); an epoch is the shards in a seeded order, each
                      in a seeded token order (``data.shuffle``); micro-batch g·dp + r of the epoch
                      stream goes to dp rank r
    HFSource          on-the-fly extraction from a local Hugging Face causal LM (x at the input
                      hook, y = the MLP output per layer; fastclt.training.extract) through a
                      ``TokenBuffer``: dp rank r runs the LM on sequence groups r, r + dp, …; with
                      ``data.shuffle`` a batch is B tokens drawn by a seeded generator from a buffer
                      of ``data.buffer_batches`` micro-batches (so it mixes many sequences), else the
                      next B tokens in stream order. Stateful: the buffer's token ids, the next
                      group and the generator state are checkpointed (ints, not activations); a
                      resumed run recomputes the buffered groups and continues exactly. Under
                      tensor parallelism only tp rank 0 of each data-parallel group loads and runs
                      the LM; the prefetcher broadcasts its batches to the other tp ranks.

``Prefetcher`` prepares the next batches in a background thread — on-the-fly extraction included,
on its own CUDA stream — so that the LM runs while the dictionary trains (pinned memory and
non-blocking copies for CPU sources).
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

__all__ = ["SyntheticSource", "ShardSource", "HFSource", "SequenceSource", "TokenBuffer", "Prefetcher", "make_source",
           "MANIFEST", "read_manifest", "check_shards"]

MANIFEST = "manifest.json"
FORMAT = "fastclt.activations"
_ST_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "F64": np.float64}


class SyntheticSource:
    compute_bound = True  # its batches are computed, not read (``Prefetcher``: no thread on a CPU)

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

    def init_sample(self, n: int):
        """n micro-batches never seen in training (negative batch numbers)."""
        return _cat([self.get_global(-1 - i) for i in range(n)])

    def lm_metadata(self) -> dict:
        return {}


# ------------------------------------------------------------------------- shards on disk
def _memmap_safetensors(path: Path) -> dict:
    """{name: np.memmap} of a safetensors file whose header ``check_shards`` has validated (bf16 as
    uint16, viewed as bf16 by torch later)."""
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
    if not isinstance(m, dict) or m.get("format") != FORMAT or not isinstance(m.get("shards"), list) or not m["shards"]:
        raise ConfigError(f"data.path: {folder / MANIFEST} is not a fastclt activations manifest with shards")
    for key in ("n_layers", "d_in", "d_out"):
        if isinstance(m.get(key), bool) or not isinstance(m.get(key), int):
            raise ConfigError(f"data.path: {folder / MANIFEST} records {key} {m.get(key)!r}; expected an integer")
    for j, s in enumerate(m["shards"]):
        names = ("x", "y") if isinstance(s, dict) and "x" in s else ("file",)
        if not isinstance(s, dict) or any(not isinstance(s.get(k), str) for k in names):
            raise ConfigError(f"data.path: manifest entry {j} of {folder / MANIFEST} is not an object naming its "
                              f"file (\"file\", or \"x\" and \"y\"): {s!r}")
    return m


def check_shards(folder: Path, manifest: dict, n_layers: int, d_in: int, d_out: int, verify: bool = False) -> None:
    """Every shard of ``manifest`` against it before training: each file's header (safetensors) or
    .npy header is read (not the data) and must hold x [n, n_layers, d_in] and y [n, n_layers, d_out]
    in a float dtype, with the manifest's n_tokens rows and the file's full length (a truncated file
    is named); with ``verify`` each file's SHA-256 must equal the manifest's. ConfigError naming the
    file otherwise."""
    from fastclt.checkpoint import CheckpointError, read_header, sha256_file
    want = {"x": (n_layers, d_in), "y": (n_layers, d_out)}
    total = 0
    for j, s in enumerate(manifest["shards"]):  # (entries as read_manifest checked them)
        one_file = "x" not in s  # one safetensors file holding x and y, or x and y .npy files
        names = ("file",) if one_file else ("x", "y")
        files = {"x": s["file"], "y": s["file"]} if one_file else {"x": s["x"], "y": s["y"]}
        shapes = {}
        for key, name in files.items():
            path = folder / name
            if not path.is_file():
                raise ConfigError(f"data.path: shard file {path} listed in the manifest is missing")
            if one_file:
                try:
                    entries, _ = read_header(path, "data.path shard")
                except CheckpointError as e:
                    raise ConfigError(str(e)) from None
                if key not in entries:
                    raise ConfigError(f"data.path: shard {path} holds no tensor {key!r} (found {sorted(entries)})")
                shape, dt = entries[key]
            else:
                try:
                    a = np.load(path, mmap_mode="r")
                except (ValueError, OSError, EOFError) as e:
                    raise ConfigError(f"data.path: shard {path} is not a readable .npy file ({e})") from None
                shape, dt = a.shape, {np.dtype(np.float32): "F32",
                                      np.dtype(np.float16): "F16"}.get(a.dtype, str(a.dtype))
            if dt not in ("F32", "F16", "BF16"):
                raise ConfigError(f"data.path: shard {path} tensor {key} has dtype {dt}; expected F32, F16 or BF16")
            if len(shape) != 3 or tuple(shape[1:]) != want[key]:
                raise ConfigError(f"data.path: shard {path} tensor {key} has shape {list(shape)}; the manifest and "
                                  f"the model expect [n, {want[key][0]}, {want[key][1]}] (n_layers, "
                                  f"{'d_in' if key == 'x' else 'd_out'})")
            shapes[key] = tuple(shape)
        n = shapes["x"][0]
        if shapes["y"][0] != n or s.get("n_tokens", n) != n:
            raise ConfigError(f"data.path: shard {folder / files['x']} holds {n} rows of x and {shapes['y'][0]} "
                              f"of y; the manifest says {s.get('n_tokens')}")
        total += n
        if verify:
            digests = {"file": s.get("sha256")} if one_file else s.get("sha256")
            if not isinstance(digests, dict) or any(not isinstance(digests.get(k), str) for k in names):
                raise ConfigError(f"data.verify: the manifest records no SHA-256 for shard {j} ({files['x']})")
            for k in names:
                if sha256_file(folder / s[k]) != digests[k]:
                    raise ConfigError(f"data.verify: shard {folder / s[k]} does not match the SHA-256 in the "
                                      f"manifest (modified or corrupt)")
    if manifest.get("n_tokens", total) != total:
        raise ConfigError(f"data.path: the shards hold {total} tokens; {folder / MANIFEST} says {manifest['n_tokens']}")


class ShardSource:
    def __init__(self, cfg, n_layers: int, d_in: int, d_out: int, dp_rank: int, dp: int) -> None:
        self.folder = Path(cfg.data.path)
        m = self.manifest = read_manifest(self.folder)
        got = (m["n_layers"], m["d_in"], m["d_out"])
        if got != (n_layers, d_in, d_out):
            raise ConfigError(f"data.path: shards hold (n_layers, d_in, d_out) = {got} but the model expects "
                              f"{(n_layers, d_in, d_out)} (model.n_layers / model.d_in / model.d_out)")
        hook = m.get("input_hook", "mlp_in")  # manifests before the option: the MLP input
        if cfg.data.input_hook is not None and cfg.data.input_hook != hook:
            raise ConfigError(f"data.input_hook: the shards hold {hook} activations, not {cfg.data.input_hook}")
        if cfg.data.layers is not None and m.get("layers") is not None and list(cfg.data.layers) != m["layers"]:
            raise ConfigError(f"data.layers: the shards hold blocks {m['layers']}, not {cfg.data.layers}")
        self.n_layers, self.d_in, self.d_out = n_layers, d_in, d_out
        check_shards(self.folder, m, n_layers, d_in, d_out, verify=getattr(cfg.data, "verify", False))
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

    def init_sample(self, n: int):
        """The first n micro-batches of the stream."""
        return _cat([self.get_global(i) for i in range(n)])

    def lm_metadata(self) -> dict:
        """The LM, its blocks and the input hook recorded in the manifest (older manifests: the MLP
        input, and no LM path)."""
        m = self.manifest
        return {"lm_name": m.get("lm"), "lm_layers": m.get("layers"), "input_hook": m.get("input_hook", "mlp_in")}


def _to_torch(a: np.ndarray, st_dtype) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(a))
    if st_dtype == "BF16":
        t = t.view(torch.bfloat16)
    return t.float()


class TokenBuffer:
    """Fixed-size batches of B tokens from a stream of token groups.

    ``produce(q)`` → (x [n, L, d_in], y [n, L, d_out], token ids [n] int64 on the CPU) of global group
    q; this buffer reads groups ``offset``, ``offset + stride``, … With ``shuffle`` it holds
    ``capacity`` tokens; each batch takes B of them uniformly at random (a CPU generator seeded by
    ``seed``) and the buffer is refilled before the next draw; without, it is a FIFO (stream order).
    The state (token ids in buffer order, the next group, the generator) is a few integer tensors:
    ``load_state_dict`` recomputes the groups holding the buffered tokens.
    """

    def __init__(self, produce, group_of, B: int, capacity: int, shuffle: bool, seed, stride: int = 1,
                 offset: int = 0) -> None:
        self.produce, self.group_of = produce, group_of
        self.B, self.capacity, self.shuffle = B, max(capacity, B), shuffle
        self.stride, self.offset = stride, offset
        self.gen = torch.Generator().manual_seed(int(np.random.SeedSequence(seed).generate_state(1)[0]))
        self.next_group = 0
        self.x = self.y = None
        self.ids = torch.zeros(0, dtype=torch.int64)
        self.n = 0

    def _append(self, x: torch.Tensor, y: torch.Tensor, ids: torch.Tensor) -> None:
        k = ids.shape[0]
        if self.x is None or self.n + k > self.x.shape[0]:  # grow (rarely: once per new largest group)
            size = max(self.n + k, self.capacity + max(k, self.B))
            nx, ny = x.new_empty((size,) + x.shape[1:]), y.new_empty((size,) + y.shape[1:])
            nids = torch.empty(size, dtype=torch.int64)
            if self.x is not None:
                nx[:self.n], ny[:self.n], nids[:self.n] = self.x[:self.n], self.y[:self.n], self.ids[:self.n]
            self.x, self.y, self.ids = nx, ny, nids
        self.x[self.n:self.n + k], self.y[self.n:self.n + k], self.ids[self.n:self.n + k] = x, y, ids
        self.n += k

    def _fill(self) -> None:
        while self.n < self.capacity:
            self._append(*self.produce(self.next_group * self.stride + self.offset))
            self.next_group += 1

    def next(self):
        """The next batch: (x [B, L, d_in], y [B, L, d_out])."""
        self._fill()
        n, B = self.n, self.B
        if not self.shuffle:
            x, y = self.x[:B].clone(), self.y[:B].clone()
            rest = slice(B, n)
            self.x[:n - B], self.y[:n - B], self.ids[:n - B] = (self.x[rest].clone(), self.y[rest].clone(),
                                                                self.ids[rest].clone())
        else:
            sel = torch.randperm(n, generator=self.gen)[:B]
            dev = sel.to(self.x.device)
            x, y = self.x[dev], self.y[dev]
            # the tail's unselected rows move into the selected rows below the tail
            taken = torch.zeros(n, dtype=torch.bool)
            taken[sel] = True
            holes = sel[sel < n - B].sort().values
            tail = torch.arange(n - B, n)[~taken[n - B:]]
            if holes.numel():
                hd, td = holes.to(self.x.device), tail.to(self.x.device)
                self.x[hd], self.y[hd] = self.x[td], self.y[td]
                self.ids[holes] = self.ids[tail]
        self.n -= B
        return x, y

    def state_dict(self) -> dict:
        return {"ids": self.ids[:self.n].clone(), "next_group": torch.tensor([self.next_group]),
                "rng": self.gen.get_state()}

    def load_state_dict(self, state: dict) -> None:
        ids = state["ids"].to(torch.int64).cpu()
        groups = self.group_of(ids)
        xs, ys, where = [], [], []
        for q in torch.unique(groups).tolist():
            x, y, gid = self.produce(q)  # gid ascending: stream order
            at = (groups == q).nonzero().squeeze(1)  # buffer positions of this group's tokens
            rows = torch.searchsorted(gid, ids[at]).clamp(max=max(gid.numel() - 1, 0))
            if gid.numel() == 0 or not torch.equal(gid[rows], ids[at]):
                raise ValueError(f"data: the checkpoint's buffered tokens are not in group {q} of this token "
                                 f"source (another data.tokens, ctx_len or BOS setting?)")
            rows = rows.to(x.device)
            xs.append(x[rows])
            ys.append(y[rows])
            where.append(at)
        self.x = self.y = None
        self.n = 0
        if xs:
            inv = torch.argsort(torch.cat(where))
            dev = inv.to(xs[0].device)
            self._append(torch.cat(xs)[dev], torch.cat(ys)[dev], ids)
        self.next_group = int(state["next_group"][0])
        self.gen.set_state(state["rng"].to(torch.uint8).cpu())


class HFSource:
    """On-the-fly extraction (see the module docstring). ``runs_lm``: this rank loads the LM (tp rank
    0 of its data-parallel group); the others receive the batches (``Prefetcher``)."""

    stateful = True

    def __init__(self, cfg, kind: str, n_layers: int, d_in: int, d_out: int, layout, device: torch.device) -> None:
        d = cfg.data
        self.layers = list(d.layers) if d.layers is not None else list(range(n_layers))
        self.input_hook = d.input_hook or "mlp_in"
        self.model_path = d.model
        self.kind, self.layout, self.device = kind, layout, device
        self.n_layers, self.d_in, self.d_out = n_layers, d_in, d_out
        self.B = cfg.train.batch_size
        self.runs_lm = layout.tp_rank == 0
        self.ex = None
        self._prefix = None
        self._next = None
        if not self.runs_lm:
            return
        from fastclt.training.extract import HFExtractor
        self.ex = HFExtractor(d.model, self.layers, device=device, dtype=d.hf_dtype, tokens=d.tokens,
                              ctx_len=d.ctx_len, seed=cfg.train.seed, input_hook=self.input_hook,
                              prepend_bos=d.prepend_bos, exclude_bos=d.exclude_bos, text_field=d.text_field,
                              seqs_per_forward=d.seqs_per_forward)
        if self.ex.d_model != d_in or (kind != "sae" and self.ex.d_model != d_out):
            raise ConfigError(f"model.d_in: the host model's width is {self.ex.d_model}, but model.d_in={d_in}"
                              + ("" if kind == "sae" else f" and model.d_out={d_out}"))
        self.buffer = TokenBuffer(self.ex.group, self.ex.group_of, self.B,
                                  self.B * d.buffer_batches if d.shuffle else self.B, d.shuffle,
                                  seed=[cfg.train.seed, layout.dp_rank], stride=layout.dp, offset=layout.dp_rank)

    def lm_metadata(self) -> dict:
        return {"lm_name": str(Path(self.model_path).resolve()), "lm_layers": self.layers,
                "input_hook": self.input_hook}

    def get(self, i: int):
        if self._next is not None and i != self._next:
            raise RuntimeError(f"data: the hf source is read in order; asked for micro-batch {i}, next is {self._next}")
        self._next = i + 1
        x, y = self.buffer.next()
        return (x, x) if self.kind == "sae" else (x, y)

    def init_sample(self, n: int):
        """The first n·B kept tokens of the stream in order (groups 0, 1, …; every rank alike)."""
        if not self.runs_lm:
            return None
        need = n * self.B
        xs, ys, have, q = [], [], 0, 0
        while have < need:
            x, y, _ = self.ex.group(q)
            xs.append(x)
            ys.append(y)
            have += x.shape[0]
            q += 1
        x, y = torch.cat(xs)[:need], torch.cat(ys)[:need]
        return (x, x) if self.kind == "sae" else (x, y)

    def state_dict(self) -> dict:
        return self.buffer.state_dict() if self.runs_lm else {}

    def load_state_dict(self, state: dict) -> None:
        if self.runs_lm:
            self.buffer.load_state_dict(state)


class SequenceSource(HFSource):
    """Token sequences for the objectives that train through the LM (train.objective kl / kl+fvu / ce):
    micro-batch i of dp rank r is ``(ids,)``, ids int64 [S, ctx_len] on the CPU, the sequences
    g·S … (g + 1)·S − 1 of the token source with g = i·dp + r and S = batch_size / ctx_len — a pure
    function of (i, r), so a resumed run continues exactly (no state to checkpoint). The
    initialisation sample is the activations of the stream's first sequences, as for ``HFSource``."""

    stateful = False

    def __init__(self, cfg, kind: str, n_layers: int, d_in: int, d_out: int, layout, device: torch.device) -> None:
        super().__init__(cfg, kind, n_layers, d_in, d_out, layout, device)
        self.S = cfg.train.batch_size // cfg.data.ctx_len
        self.dp, self.dp_rank = layout.dp, layout.dp_rank

    def get(self, i: int):
        g = i * self.dp + self.dp_rank
        return (self.ex.token_ids(g * self.S, self.S),)

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def _cat(batches: list):
    xs, ys = zip(*batches)
    return torch.cat(xs), torch.cat(ys)


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
    if cfg.train.objective != "reconstruction":
        return SequenceSource(cfg, kind, L, mc.d_in, d_out, layout, device)
    return HFSource(cfg, kind, L, mc.d_in, d_out, layout, device)


def share_batch(source, layout, batch, n_tokens: int, device: torch.device, dtype: torch.dtype):
    """(x, y) on ``device`` in ``dtype`` on every rank: as given, or — for an LM source under tensor
    parallelism — broadcast from tp rank 0 of the data-parallel group (the only rank that runs the
    LM; ``batch`` is None elsewhere). A collective: every tp rank calls it at the same point."""
    nb = device.type == "cuda"
    if batch is not None:  # (token ids keep their integer dtype)
        batch = tuple(t.to(device, dtype if t.is_floating_point() else None, non_blocking=nb).contiguous()
                      for t in batch)
    if layout is None or layout.tp == 1 or not hasattr(source, "runs_lm"):
        return batch
    import torch.distributed as dist
    if batch is None:
        batch = (torch.empty(n_tokens, source.n_layers, source.d_in, device=device, dtype=dtype),
                 torch.empty(n_tokens, source.n_layers, source.d_out, device=device, dtype=dtype))
    for t in batch:
        dist.broadcast(t, src=layout.dp_rank * layout.tp, group=layout.tp_group)
    return batch


class Prefetcher:
    """Yields the source's micro-batches start, start + 1, … on ``device``: (x, y) in ``dtype``, or
    ``(ids,)`` of a ``SequenceSource`` (integer tensors keep their dtype).

    ``depth`` > 0: a background thread prepares up to ``depth`` batches ahead — CPU sources into
    pinned memory, on-the-fly extraction on its own CUDA stream — so that the data is ready when the
    step needs it. On a CPU run that thread computes on one intra-op thread (the step's parallel
    regions use every core), and a source of computed batches (``compute_bound``: synthetic data)
    has none: its batches are made in the training thread. A stateful source's ``state_dict()`` after
    each batch travels with the batch; ``state()`` is the state after the last batch returned (what a
    checkpoint saves with the micro-batch counter). Under tensor parallelism the LM's batches reach
    the other tp ranks by broadcast, in this (the training) thread, in step order (``share_batch``).
    """

    def __init__(self, source, start: int, device: torch.device, dtype: torch.dtype, depth: int,
                 layout=None) -> None:
        self.source, self.next, self.device, self.dtype, self.layout = source, start, device, dtype, layout
        self.stateful = getattr(source, "stateful", False)
        self.receives = getattr(source, "runs_lm", True) is False
        self._state = source.state_dict() if self.stateful and not self.receives else None
        # a source whose batches are pure computation (synthetic data) runs in this thread on a CPU:
        # a producer thread would only move that work onto the cores the step computes on
        inline = device.type == "cpu" and getattr(source, "compute_bound", False)
        self.threaded = depth > 0 and not self.receives and not inline
        self.stream = None
        if self.threaded and device.type == "cuda" and isinstance(source, HFSource):
            self.stream = torch.cuda.Stream(device)
        if self.threaded:
            self.q: queue.Queue = queue.Queue(maxsize=depth)
            self.stop = threading.Event()
            configured = threading.Event()
            self.thread = threading.Thread(target=self._work, args=(start, configured), daemon=True)
            threads = torch.get_num_threads()
            self.thread.start()
            if device.type == "cpu":
                # the worker runs its ops on one intra-op thread (``_work``); setting that also set the
                # count a thread started later inherits: put it back (this thread's own is unchanged)
                configured.wait()
                torch.set_num_threads(threads)

    def _load(self, i: int):
        event = None
        if self.stream is not None:
            with torch.cuda.stream(self.stream):
                batch = tuple(self.source.get(i))
                event = torch.cuda.Event()
                event.record(self.stream)
        else:
            batch = tuple(self.source.get(i))
            if self.device.type == "cuda" and batch[0].device.type == "cpu":
                batch = tuple(t.pin_memory() for t in batch)
        return batch, event, self.source.state_dict() if self.stateful else None

    def _work(self, i: int, configured: threading.Event) -> None:
        try:
            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)
            else:
                # On a CPU run the training step's parallel regions use every core: a team of threads
                # here would oversubscribe them, and each region waits for its slowest, preempted thread
                # (the demo's step: 12.0 ms with the producer on two threads, ~8 on one). One thread.
                torch.set_num_threads(1)
        except BaseException as e:  # re-raised in the consumer
            self.q.put(e)
            return
        finally:
            configured.set()
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
        B = getattr(self.source, "B", 0)
        if self.receives:
            self.next += 1
            return share_batch(self.source, self.layout, None, B, self.device, self.dtype)
        if self.threaded:
            item = self.q.get()
            if isinstance(item, BaseException):
                raise item
        else:
            item = self._load(self.next)
        self.next += 1
        batch, event, self._state = item
        if event is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(event)
            for t in batch:
                t.record_stream(current)
        return share_batch(self.source, self.layout, batch, B, self.device, self.dtype)

    def state(self) -> Optional[dict]:
        """The source's state after the last batch returned (None for stateless sources)."""
        return self._state

    def close(self) -> None:
        if self.threaded:
            self.stop.set()
            self.thread.join(timeout=5)
