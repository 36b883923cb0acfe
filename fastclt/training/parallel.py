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
    BatchTopK histograms    8·2^b·R·G all-reduced (R = 4 rounds for fp32/bf16, 8 for fp64; G = L
                            groups, or 1 across layers) + 8·tp·G for the tie counts
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
           "clip_grad_norm", "float_keys", "radix_select"]


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
def float_keys(h: torch.Tensor) -> torch.Tensor:
    """h: float tensor → signed integer keys with the same order (-0.0 < +0.0): int32 for fp32,
    bf16 and fp16 (through fp32, exact), int64 for fp64. Same width as fp32 h, so the keys cost no
    more memory than the pre-activations."""
    if h.dtype == torch.float64:
        b = h.view(torch.int64)
        return torch.where(b >= 0, b, b ^ 0x7FFFFFFFFFFFFFFF)
    b = h.float().view(torch.int32)
    return torch.where(b >= 0, b, b ^ 0x7FFFFFFF)


def radix_select(keys: torch.Tensor, k_total: torch.Tensor, reduce=None, digit_bits: int = 8):
    """Exact k-th largest per group. keys: [G, N] int32|int64 (``float_keys``), k_total: [G] int64 ≥ 1.

    Returns (greater [G, N] bool — strictly above the threshold, equal [G, N] bool — equal to it,
    n_take [G] int64 — how many of the (global) equal entries to keep). ``reduce(counts)`` sums a
    histogram over the ranks that hold the other shards of the same groups (None: one shard).
    One histogram all-reduce of G·2^digit_bits int64 per round, ceil(key bits / digit_bits) rounds.
    """
    G, N = keys.shape
    n_bits = 64 if keys.dtype == torch.int64 else 32
    nb = 1 << digit_bits
    cand = torch.ones_like(keys, dtype=torch.bool)
    greater = torch.zeros_like(cand)
    remaining = k_total.to(torch.int64).clone()
    offsets = torch.arange(G, device=keys.device, dtype=keys.dtype)[:, None] * nb
    bits = 0
    while bits < n_bits:
        step = min(digit_bits, n_bits - bits)
        shift = n_bits - bits - step
        digit = (keys >> shift) & ((1 << step) - 1)
        if bits == 0:  # signed keys: flip the sign bit, so that the top digit orders like the value
            digit = digit ^ (1 << (step - 1))
        hist = torch.bincount((digit + offsets)[cand], minlength=G * nb).view(G, nb)
        if reduce is not None:
            hist = reduce(hist)
        at_least = hist.flip(1).cumsum(1).flip(1)  # entries whose digit is >= t
        t = ((at_least >= remaining[:, None]).sum(1) - 1).clamp_min(0)  # the last t with at_least[t] >= remaining
        above = torch.cat([at_least, at_least.new_zeros(G, 1)], 1).gather(1, (t + 1)[:, None]).squeeze(1)
        t = t.to(keys.dtype)[:, None]
        greater |= cand & (digit > t)
        cand &= digit == t
        remaining = remaining - above
        bits += step
    return greater, cand, remaining


# ------------------------------------------------------------------ the model hook
class TensorParallel:
    """What a sharded model calls (see ``SparseDictionary.tp``): exact selections across shards,
    the partial-decode all-reduce and feature sums. ``group``: the tp process group."""

    def __init__(self, group, size: int, rank: int, digit_bits: int = 8) -> None:
        self.group, self.size, self.rank, self.digit_bits = group, size, rank, digit_bits

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
        when ``across_layers``) over all shards, by radix select on all-reduced histograms."""
        L, B, Fl = h.shape
        hd = h.detach()
        keys = float_keys(hd).reshape(1 if across_layers else L, -1)
        G = keys.shape[0]
        k_total = torch.full((G,), k * B * (L if across_layers else 1), dtype=torch.int64, device=h.device)
        found = _ext_select(hd, keys, k_total, self.sum_detached) if hd.is_cuda else None
        if found is None:
            found = radix_select(keys, k_total, reduce=self.sum_detached, digit_bits=self.digit_bits)
        greater, equal, n_take = found
        # ties: the lowest rank first, then the lowest flat index
        n_eq = self._all_gather(equal.sum(1))  # [tp, G]
        before = n_eq[:self.rank].sum(0)
        take = (n_take - before).clamp(min=0)
        keep = greater | (equal & (equal.cumsum(1) <= take[:, None]))
        keep = keep.view(L, B, Fl)
        return [SparseCodes.from_mask(torch.relu(h[l]), keep[l]) for l in range(L)]


_EXT_WARNED = []


def _ext_select(hd: torch.Tensor, keys: torch.Tensor, k_total: torch.Tensor, reduce):
    """The extension's CUDA histogram op (fastclt.ops.ext_ops.batch_topk_threshold: same keys, same
    all-reduced histograms, 8-bit digits), when built; None → use ``radix_select``."""
    if hd.dtype not in (torch.float32, torch.bfloat16):
        return None
    try:
        from fastclt import _ext
        if not _ext.has_cuda_ext():
            return None
        from fastclt.ops import ext_ops
        G = keys.shape[0]
        flat = hd.reshape(G, -1)
        greater, equal, take = [], [], []
        for g in range(G):
            th = ext_ops.batch_topk_threshold(flat[g].contiguous(), int(k_total[g]), all_reduce=reduce)
            key = th.key - (1 << 31)  # the extension's unsigned key → our signed one
            gt, eq = keys[g] > key, keys[g] == key
            if int(gt.sum()) != th.n_greater_local:  # disagree with the keys: do not trust it
                raise RuntimeError("batch_topk_threshold: local counts disagree with the float keys")
            greater.append(gt)
            equal.append(eq)
            take.append(th.n_take)
        return torch.stack(greater), torch.stack(equal), torch.tensor(take, device=keys.device)
    except Exception as e:  # noqa: BLE001 — the torch path is always correct
        if not _EXT_WARNED:
            _EXT_WARNED.append(1)
            import warnings
            warnings.warn(f"tensor-parallel BatchTopK: the extension's histogram op failed ({e}); using torch")
        return None


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
