"""Tensor parallel over features × data parallel over the rest — plain torch.distributed.

Layout: world = dp × tp, ranks numbered ``rank = dp_rank · tp + tp_rank`` (the tp ranks of one
group are neighbours, so on one node they share NVLink). NCCL on GPUs, gloo on CPUs; torchrun's
env (RANK, WORLD_SIZE, MASTER_ADDR, …) is all it needs, on one node or many.

Tensor parallel (``TensorParallel``, set as ``model.tp``): each tp rank holds F/tp features of every
layer — rows [r·F/tp, (r+1)·F/tp) of W_enc, b_enc, θ, W_dec (every source's block), the feature
affine and the BatchTopK statistics. b_dec, W_skip and the normalisation are replicated.
    encode      local h = W_enc x + b_enc: [B, F/tp] per layer (no communication)
    TopK        all-gather each rank's local top-k VALUES per row, pick the global top-k (exact)
    BatchTopK   exact radix select of the k·B-th largest key over all shards: all-reduce of
                2^b-bin histograms, ceil(32/b) rounds for fp32 (b = 8 bits: 4 rounds), then one
                all-gather of the tie counts (ties go to the lowest rank, then the lowest index)
                and a compaction of the kept entries: extra memory O(kept), never keys or masks of
                all of h; the extension's ops when every rank has them (agreed once), torch ops else
    decode      partial ŷ from the local features, all-reduce (sum), b_dec and skip added once
    losses      feature sums (sparsity, pre-activation, L0, dead counts) all-reduced; the
                reconstruction is computed on the replicated ŷ, so the backward of the all-reduce
                is the identity and no gradient is communicated for tp
Data parallel: gradients of every parameter averaged over the dp group (one flat all-reduce);
the fired-feature masks are OR-ed over it so that dead-feature counts stay identical.

Bytes communicated per step and per rank (s = bytes per activation: 2 under bf16 autocast, 4 in
fp32; B tokens per micro-batch per dp rank, L layers, d = d_out, k active per token, b = 8 radix
bits, P = parameters of one shard; ring all-reduce moves 2(n−1)/n of the buffer per rank):
    decode all-reduce       s·B·L·d, forward only (its backward is the identity)
    TopK all-gather         sends s·B·k·L, receives (tp−1)·s·B·k·L (values only; indices stay local)
    BatchTopK histograms    8·(2^b + 1)·R·G + 8 all-reduced (R = 4 rounds for fp32, 2 for bf16 on
                            the extension's ops, 8 for fp64; G = L groups, or 1 across layers; the
                            last 8 bytes a failure flag) + 8·tp·G for the tie counts
    AuxK (dead features)    one more decode all-reduce + a top-k_aux all-gather (as TopK)
    scalar sums             ~8·(L + 4) (sparsity, pre-activation, L0, dead counts)
    SAE only                s·B·d all-reduced in the backward (the pre-bias gradient)
    dp gradients            4·P all-reduced over the dp group (fp32 grads — fp64 for fp64 models —
                            in one flat buffer)
Example B=4096, L=12, d=768, k=32, F=32768 per layer, tp=4, bf16: decode 72 MiB all-reduced
(108 MiB ring traffic per rank), TopK 3 MiB sent / 9 MiB received, BatchTopK 96 KiB of
histograms — against 3 GiB (B·F·L·s) for gathering the pre-activations.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from fastclt.codes import SparseCodes

__all__ = ["Layout", "init_distributed", "TensorParallel", "shard_state", "merge_states", "allreduce_grads",
           "clip_grad_norm", "float_keys", "torch_histogram"]


@dataclass
class Layout:
    """Where this process sits: world = dp × tp; groups are None when of size 1 or single-process."""

    rank: int = 0
    world: int = 1
    tp: int = 1
    dp: int = 1
    tp_rank: int = 0
    dp_rank: int = 0
    local_rank: int = 0
    tp_group: object = None
    dp_group: object = None
    backend: Optional[str] = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


def init_distributed(tp: int, device_kind: str) -> Layout:
    """Initialise torch.distributed from torchrun's environment (nothing to do without it) and
    build the tp and dp groups. device_kind: "cuda" → NCCL, else gloo."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if world % tp != 0:
        raise ValueError(f"train.tp: {tp} does not divide the world size {world} (torchrun --nproc_per_node × nodes)")
    if world == 1:
        return Layout(local_rank=local_rank)
    backend = "nccl" if device_kind == "cuda" else "gloo"
    if not dist.is_initialized():
        if device_kind == "cuda":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend=backend)
    dp = world // tp
    tp_group = dp_group = None
    # every rank must create every group, in the same order
    for d in range(dp):
        ranks = list(range(d * tp, (d + 1) * tp))
        g = dist.new_group(ranks) if tp > 1 else None
        if rank in ranks:
            tp_group = g
    for t in range(tp):
        ranks = list(range(t, world, tp))
        g = dist.new_group(ranks) if dp > 1 else None
        if rank in ranks:
            dp_group = g
    return Layout(rank=rank, world=world, tp=tp, dp=dp, tp_rank=rank % tp, dp_rank=rank // tp,
                  local_rank=local_rank, tp_group=tp_group, dp_group=dp_group, backend=backend)


# ------------------------------------------------------------------ autograd all-reduces
class _ReducePartial(torch.autograd.Function):
    """Forward: sum over the tp group. Backward: identity (the loss downstream is replicated)."""

    @staticmethod
    def forward(ctx, x, group):
        out = x.contiguous().clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, g):
        return g, None


class _CopyIn(torch.autograd.Function):
    """Forward: identity. Backward: sum the gradient over the tp group (a replicated input feeding
    sharded features, e.g. an SAE's pre-bias)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        g = g.contiguous().clone()
        dist.all_reduce(g, group=ctx.group)
        return g, None


# ------------------------------------------------------------------ exact radix selection
# Elements of h whose keys the torch path makes at a time (its temporaries: ~20 bytes each).
CHUNK = 1 << 22


def float_keys(h: torch.Tensor) -> torch.Tensor:
    """h: float tensor → signed integer keys with the same order: int32 for fp32, bf16 and fp16
    (through fp32, exact), int64 for fp64. −0.0 is folded onto +0.0 (the two zeros tie, as in the
    extension's key), so every path counts the same entries at a cut of 0."""
    wide = h.dtype == torch.float64
    b = (h + 0.0 if wide else h.float() + 0.0).view(torch.int64 if wide else torch.int32)
    sign = b >> (63 if wide else 31)  # −1 for negative floats, else 0: flip their other bits
    sign &= 0x7FFFFFFFFFFFFFFF if wide else 0x7FFFFFFF
    b ^= sign
    return b


def _unsigned_keys(h: torch.Tensor) -> torch.Tensor:
    """The keys with the sign bit flipped: as unsigned numbers (their bits), ordered like the values
    (for fp32: the extension's uint32 key, bit for bit)."""
    k = float_keys(h)
    k ^= torch.iinfo(k.dtype).min
    return k


def _chunks(flat: torch.Tensor):
    for i in range(0, flat.shape[0], CHUNK):
        yield flat[i:i + CHUNK]


def torch_histogram(groups: list, digits_total: int):
    """``radix_threshold``'s histogram over 1-D tensors ``groups`` by torch ops, CHUNK elements at
    a time (memory O(CHUNK), not O(h)); unsigned order keys of ``digits_total`` bits."""
    def histogram(prefixes, bits, step):
        nb = 1 << step
        out = torch.zeros(len(groups), nb + 1, dtype=torch.int64, device=groups[0].device)
        for g, flat in enumerate(groups):
            for part in _chunks(flat):
                nan = torch.isnan(part)
                u = _unsigned_keys(part)
                match = ~nan
                if bits > 0:
                    match &= ((u >> (digits_total - bits)) & ((1 << bits) - 1)) == prefixes[g]
                digit = (u >> (digits_total - bits - step)) & (nb - 1)
                out[g, :nb] += torch.bincount(digit[match], minlength=nb)
                out[g, nb] += nan.sum()
        return out
    return histogram


def _compact_chunked(h2d: torch.Tensor, signed_key: int, take: int):
    """Rows of h2d [R, F] → (row_ptr int64 [R+1], col int32 [nnz]) of the entries with key >
    signed_key and the first ``take`` key-equal ones in flat order, rows of CHUNK elements at a time."""
    R, F = h2d.shape
    rows_per = max(1, CHUNK // max(F, 1))
    counts, cols = [], []
    equal_seen = 0
    for r0 in range(0, R, rows_per):
        keys = float_keys(h2d[r0:r0 + rows_per])
        keep = keys > signed_key
        equal = keys == signed_key
        if take > equal_seen:
            rank = equal.view(-1).cumsum(0).view(equal.shape) + equal_seen  # 1-based flat rank among equal keys
            keep |= equal & (rank <= take)
        equal_seen += int(equal.sum())
        counts.append(keep.sum(1))
        cols.append(keep.nonzero()[:, 1].to(torch.int32))
    row_ptr = torch.zeros(R + 1, dtype=torch.int64, device=h2d.device)
    if R:
        row_ptr[1:] = torch.cat(counts).cumsum(0)
    col = torch.cat(cols) if cols else torch.zeros(0, dtype=torch.int32, device=h2d.device)
    return row_ptr, col


# ------------------------------------------------------------------ the model hook
class TensorParallel:
    """What a sharded model calls (see ``SparseDictionary.tp``): exact selections across shards,
    the partial-decode all-reduce and feature sums. ``group``: the tp process group."""

    def __init__(self, group, size: int, rank: int, digit_bits: int = 8) -> None:
        self.group, self.size, self.rank, self.digit_bits = group, size, rank, digit_bits
        self._ext_ok: dict = {}  # (device type, dtype) → every rank uses the extension's ops

    # ---- sums
    def reduce_partial(self, y: torch.Tensor) -> torch.Tensor:
        return _ReducePartial.apply(y, self.group)

    sum_loss = reduce_partial

    def copy_in(self, x: torch.Tensor) -> torch.Tensor:
        return _CopyIn.apply(x, self.group)

    def sum_detached(self, t: torch.Tensor) -> torch.Tensor:
        out = t.detach().clone()
        dist.all_reduce(out, group=self.group)
        return out

    def min_detached(self, t: torch.Tensor) -> torch.Tensor:
        out = t.detach().clone()
        dist.all_reduce(out, op=dist.ReduceOp.MIN, group=self.group)
        return out

    def _all_gather(self, t: torch.Tensor) -> torch.Tensor:
        """t: [...] → [tp, ...] (rank order)."""
        out = t.new_empty((self.size,) + tuple(t.shape))
        if _gather_into_ok(t):
            dist.all_gather_into_tensor(out, t.contiguous(), group=self.group)
        else:
            dist.all_gather(list(out.unbind(0)), t.contiguous(), group=self.group)
        return out

    # ---- TopK per row
    def _row_topk_local(self, h: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """h: [B, F_local] → (row_ptr, local column [nnz] int64) of the entries of this shard that are
        among the global top-k of their row; ties go to the lowest rank."""
        B, Fl = h.shape
        kl = min(k, Fl)
        hd = h.detach()
        if kl > 0:
            vals, idx = torch.topk(hd, kl, dim=1)  # local candidates: every global winner of this shard is here
        else:
            vals = hd.new_empty(B, 0)
            idx = torch.zeros(B, 0, dtype=torch.int64, device=h.device)
        pad = k - kl
        if pad:
            vals = torch.cat([vals, vals.new_full((B, pad), float("-inf"))], 1)
            idx = torch.cat([idx, idx.new_zeros(B, pad)], 1)
        allv = self._all_gather(vals).permute(1, 0, 2).reshape(B, self.size * k)  # [B, tp·k], rank-major
        order = torch.sort(allv, dim=1, descending=True, stable=True).indices[:, :k]
        mine = (order // k) == self.rank
        slot = order % k
        mine &= slot < kl
        counts = mine.sum(1)
        row_ptr = torch.zeros(B + 1, dtype=torch.int64, device=h.device)
        row_ptr[1:] = torch.cumsum(counts, 0)
        rows = torch.arange(B, device=h.device)[:, None].expand(B, k)[mine]
        cols = idx.gather(1, slot)[mine]
        # CSR order inside a row is free; keep feature order for determinism
        perm = torch.argsort(rows * max(Fl, 1) + cols)
        return row_ptr, cols[perm]

    def topk(self, h: torch.Tensor, k: int) -> SparseCodes:
        """h: [B, F/tp] → codes (local feature ids) of this shard's part of the global per-row top-k."""
        row_ptr, cols = self._row_topk_local(h, k)
        rows = SparseCodes.rows_of(row_ptr, cols.shape[0])
        return SparseCodes(row_ptr, cols.to(torch.int32), torch.relu(h[rows, cols]), h.shape[1])

    def auxk_select(self, x, W_enc, b_enc, dead_mask, k_aux, pre_bias=None) -> SparseCodes:
        """AuxK's selection (ops.auxk_select) over all shards: the global top-k_aux dead
        pre-activations per row (k_aux capped by the global number of dead features)."""
        from fastclt.ops.encode import preacts
        Fl = W_enc.shape[0]
        dead = dead_mask.nonzero().squeeze(1)
        n_dead = int(self.sum_detached(dead_mask.sum()))
        B = x.shape[0]
        if n_dead == 0 or B == 0:
            return SparseCodes(torch.zeros(B + 1, dtype=torch.int64, device=x.device),
                               torch.zeros(0, dtype=torch.int32, device=x.device), x.new_zeros(0), Fl)
        h = preacts(x, W_enc[dead], None if b_enc is None else b_enc[dead], pre_bias)
        row_ptr, cols = self._row_topk_local(h, min(k_aux, n_dead))
        rows = SparseCodes.rows_of(row_ptr, cols.shape[0])
        return SparseCodes(row_ptr, dead[cols].to(torch.int32), torch.relu(h[rows, cols]), Fl)

    # ---- BatchTopK
    def batch_topk(self, h: torch.Tensor, k: int, across_layers: bool = False) -> list:
        """h: [L, B, F/tp] → L codes keeping exactly k·B entries per layer (k·B·L over all layers
        when ``across_layers``) over all shards, ties to the lowest rank, then the lowest flat index.

        Exact radix select on all-reduced histograms (``ext_ops.radix_threshold``: one all-reduce
        per pass for all layers), then one all-gather of the tie counts and a compaction of this
        shard's kept entries: extra memory O(kept entries) beyond h (the torch path also makes
        CHUNK-element temporaries), never a key or mask of all of h. The extension's histogram and
        compaction ops when every rank has them for h's dtype and device, else torch ops; the ranks
        agree on the path first, and a histogram that raises on any rank sends every rank to the
        torch path at the same collective (a compaction that raises, after the last collective, is
        raised: the process stops rather than leave the ranks on different paths)."""
        L, B, Fl = h.shape
        hd = h.detach().contiguous()
        groups = [hd.view(L * B, Fl)] if across_layers else list(hd.unbind(0))
        k_total = k * B * (L if across_layers else 1)
        parts = self._select(groups, k_total)  # per group: (row_ptr, col)
        if across_layers:
            row_ptr, col = parts[0]
            parts = [(row_ptr[l * B:(l + 1) * B + 1] - row_ptr[l * B], col[row_ptr[l * B]:row_ptr[(l + 1) * B]])
                     for l in range(L)]
        codes = []
        for l, (row_ptr, col) in enumerate(parts):
            rows = SparseCodes.rows_of(row_ptr, col.shape[0])
            codes.append(SparseCodes(row_ptr, col, torch.relu(h[l][rows, col.long()]), Fl))
        return codes

    def _select(self, groups: list, k_total: int) -> list:
        """groups: G tensors [R, F/tp] → per group (row_ptr, col int32) of this shard's kept entries."""
        from fastclt.ops import ext_ops

        G, device = len(groups), groups[0].device
        compact = None
        if self._ext_agreed(groups[0]):
            try:
                bits = ext_ops.key_bits(groups[0].dtype)
                cuts = [ext_ops.to_threshold(c, bits) for c in ext_ops.radix_threshold(
                    _ext_histogram(groups), [k_total] * G, bits, self.digit_bits, self.sum_detached, device)]
                compact = lambda g, cut, before, take: ext_ops.batch_topk_compact(g, cut, equal_offset=before)[:2]  # noqa: E731
            except ext_ops.ShardSelectionError as e:  # raised on every rank at once: all switch to torch ops
                self._ext_ok[(device.type, groups[0].dtype)] = False
                import warnings
                warnings.warn(f"tensor-parallel BatchTopK: {e}; every rank uses the torch path from now on")
        if compact is None:
            bits = 64 if groups[0].dtype == torch.float64 else 32
            cuts = ext_ops.radix_threshold(torch_histogram([g.reshape(-1) for g in groups], bits), [k_total] * G,
                                           bits, self.digit_bits, self.sum_detached, device)
            compact = lambda g, cut, before, take: _compact_chunked(g, cut.key - (1 << (bits - 1)), take)  # noqa: E731
        # ties: the lowest rank first; this rank's first tie has global rank Σ n_equal_local of lower ranks
        n_eq = self._all_gather(torch.tensor([c.n_equal_local for c in cuts], device=device))
        before = n_eq[:self.rank].sum(0).tolist() if self.rank else [0] * G
        return [compact(g, c, b, max(0, min(c.n_take - b, c.n_equal_local))) for g, c, b in zip(groups, cuts, before)]

    def _ext_agreed(self, h: torch.Tensor) -> bool:
        """Whether every rank can use the extension's ops for h (one MIN all-reduce per device and
        dtype, remembered; set to False on every rank together after a failure)."""
        key = (h.device.type, h.dtype)
        if key not in self._ext_ok:
            from fastclt import _ext

            here = h.dtype in (torch.float32, torch.bfloat16) and (
                _ext.has_cuda_ext() if h.device.type == "cuda" else _ext.has_cpu_ext() and h.device.type == "cpu")
            self._ext_ok[key] = bool(self.min_detached(torch.tensor(int(here), device=h.device)))
        return self._ext_ok[key]


def _ext_histogram(groups: list):
    """``radix_threshold``'s histogram from the extension's op, one call per group."""
    ops = torch.ops.fastclt

    def histogram(prefixes, bits, step):
        return torch.stack([ops.batch_topk_histogram(g, p, bits, step) for g, p in zip(groups, prefixes)])
    return histogram


def _gather_into_ok(t: torch.Tensor) -> bool:
    return hasattr(dist, "all_gather_into_tensor") and t.device.type == "cuda"


# ------------------------------------------------------------------ state sharding
def shard_state(full: dict, axes: dict, tp: int, rank: int) -> dict:
    """Slice a full state_dict into tp rank ``rank``'s shard (features along ``axes[name]``)."""
    out = {}
    for name, t in full.items():
        ax = axes.get(name)
        if ax is None:
            out[name] = t.clone()
        else:
            n = t.shape[ax]
            if n % tp:
                raise ValueError(f"model.n_features: {n} is not divisible by train.tp={tp}")
            out[name] = t.narrow(ax, rank * (n // tp), n // tp).clone()
    return out


def merge_states(shards: list, axes: dict) -> dict:
    """Concatenate tp shards (in rank order) along the feature axis; replicated tensors from rank 0."""
    return {name: (shards[0][name] if axes.get(name) is None else torch.cat([s[name] for s in shards], axes[name]))
            for name in shards[0]}


def gather_full_state(model, layout: Layout) -> Optional[dict]:
    """The full (merged) state_dict on tp rank 0 — every rank contributes ITS OWN shard (all-gather
    per tensor, moved to CPU one at a time); None on the other ranks."""
    state = model.state_dict()
    if layout.tp == 1:
        return {n: t.detach().cpu() for n, t in state.items()}
    axes = model.feature_axes()
    out = {}
    for name, t in state.items():
        if axes.get(name) is None:
            out[name] = t.detach().cpu()
            continue
        parts = [torch.empty_like(t) for _ in range(layout.tp)]
        dist.all_gather(parts, t.detach().contiguous(), group=layout.tp_group)
        out[name] = torch.cat([p.cpu() for p in parts], axes[name])
    return out if layout.tp_rank == 0 else None


# ------------------------------------------------------------------ gradients
def allreduce_grads(params: list, layout: Layout) -> None:
    """Average the gradients of ``params`` over the dp group (one flat buffer)."""
    if layout.dp == 1:
        return
    grads = [p.grad for p in params if p.grad is not None]
    acc = torch.float64 if any(g.dtype == torch.float64 for g in grads) else torch.float32
    flat = torch.cat([g.reshape(-1).to(acc) for g in grads])
    dist.all_reduce(flat, group=layout.dp_group)
    flat /= layout.dp
    i = 0
    for g in grads:
        n = g.numel()
        g.copy_(flat[i:i + n].view_as(g))
        i += n


def clip_grad_norm(sharded: list, replicated: list, max_norm: float, layout: Layout) -> torch.Tensor:
    """Clip by the global gradient norm: sharded params summed over the tp group, replicated ones
    counted once. Returns the norm before clipping (a 0-dim fp32 tensor)."""
    def sq(ps):
        gs = [p.grad.float().pow(2).sum() for p in ps if p.grad is not None]
        return torch.stack(gs).sum() if gs else None
    dev = (sharded + replicated)[0].device
    s = sq(sharded)
    s = torch.zeros((), device=dev) if s is None else s
    if layout.tp > 1:
        dist.all_reduce(s, group=layout.tp_group)
    r = sq(replicated)
    total = (s + (0 if r is None else r)).sqrt()
    if max_norm > 0:
        coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
        for p in sharded + replicated:
            if p.grad is not None:
                p.grad.mul_(coef.to(p.grad.dtype))
    return total
