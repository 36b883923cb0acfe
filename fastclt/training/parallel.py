"""Tensor parallel over features × data parallel over the rest — plain torch.distributed.

Layout: world = dp × tp, ranks numbered ``rank = dp_rank · tp + tp_rank`` (the tp ranks of one
group are neighbours, so on one node they share NVLink). NCCL on GPUs, gloo on CPUs; torchrun's
env (RANK, WORLD_SIZE, MASTER_ADDR, …) is all it needs, on one node or many.

Tensor parallel (``TensorParallel``, set as ``model.tp``): each tp rank holds F/tp features of every
layer — rows [r·F/tp, (r+1)·F/tp) of W_enc, b_enc, θ, W_dec (every source's block), the feature
affine and the BatchTopK statistics. b_dec, W_skip and the normalisation are replicated.
    encode      local h = W_enc x + b_enc: [B, F/tp] per layer (no communication)
    TopK, BatchTopK, AuxK   the selection ops themselves, with ``group=process_group``
                (``fastclt.ops.sharded``): an all-gather of each rank's local top-k values per row
                (TopK), or an exact radix select over all shards — all-reduced 2^b-bin histograms,
                ceil(32/b) rounds for fp32 (b = 8 bits: 4 rounds), one all-gather of the tie counts —
                and a compaction of the kept entries (BatchTopK: extra memory O(kept)); on whichever
                implementation ``impl`` picks on each rank (they all run the same protocol)
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
    BatchTopK histograms    8·(2^b + 1)·R·G + 8 all-reduced (R = 4 rounds for fp32, 2 for bf16, 8 for
                            fp64; G = L groups, or 1 across layers; the last 8 bytes a failure flag)
                            + 8·tp·G for the tie counts
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

import gc
import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

__all__ = ["Layout", "init_distributed", "TensorParallel", "shard_state", "merge_states", "allreduce_grads",
           "clip_grad_norm"]


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



def shutdown_distributed() -> None:
    """Destroy every process group, first collecting garbage: a group still referenced from a
    reference cycle (a caught exception's traceback keeps the frames, and their locals, of the
    collective that raised) would otherwise be destroyed during interpreter shutdown, where gloo's
    process group can abort the process. A no-op when torch.distributed is not initialised."""
    if dist.is_available() and dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()

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


# ------------------------------------------------------------------ the model hook
class TensorParallel:
    """What a sharded model uses (see ``SparseDictionary.tp``): the process group its selection ops
    run over, the partial-decode all-reduce and feature sums. ``group``: the tp process group
    (None: the default group); ``size``, ``rank``: this rank's place in it."""

    def __init__(self, group, size: int, rank: int) -> None:
        self.group, self.size, self.rank = group, size, rank

    @property
    def process_group(self):
        """The group to pass as ``group=`` to the selection ops of ``fastclt.ops``."""
        return dist.group.WORLD if self.group is None else self.group

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
    counted once. Returns the norm before clipping (a 0-dim fp32 tensor). One read of every
    gradient for the norms (``torch._foreach_norm``: no squared temporaries) and, when clipping, one
    multi-tensor scale per dtype; nothing waits for the device."""
    def sq(ps):
        gs = [p.grad for p in ps if p.grad is not None]
        return torch.stack(torch._foreach_norm(gs)).float().square().sum() if gs else None
    dev = (sharded + replicated)[0].device
    s = sq(sharded)
    s = torch.zeros((), device=dev) if s is None else s
    if layout.tp > 1:
        dist.all_reduce(s, group=layout.tp_group)
    r = sq(replicated)
    total = (s + (0 if r is None else r)).sqrt()
    if max_norm > 0:
        coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
        by_dtype: dict = {}
        for p in sharded + replicated:
            if p.grad is not None:
                by_dtype.setdefault(p.grad.dtype, []).append(p.grad)
        for dt, gs in by_dtype.items():
            torch._foreach_mul_(gs, coef.to(dt))
    return total
