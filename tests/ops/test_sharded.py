"""The selection ops over features sharded across the ranks of a process group (fastclt/ops/sharded.py):
``group=`` on topk, batch_topk, batch_topk_layers, encode, encode_layers and auxk_select, on every
implementation that takes a group, against the unsharded selection. Two gloo ranks (one
torch.multiprocessing spawn runs every case); the memory bound with one rank in this process."""
from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from _select_cases import brute_topk_mask
from fastclt import _ext, ops
from fastclt.ops.ext import select as ext_select
from fastclt.ops.radix import ShardSelectionError
from fastclt.ops.reference import auxk as reference_auxk
from fastclt.ops.reference import encode as reference_encode
from fastclt.ops.reference import select as reference_select
from fastclt.ops.sharded import as_shards
from fastclt.training.parallel import shutdown_distributed

F, K, B, L = 64, 5, 16, 3


def _expected_batch_topk(h: torch.Tensor, world: int, k_total_of, across: bool) -> torch.Tensor:
    """bool [L, B, F]: the kept entries of sharded BatchTopK — the k_total largest, ties to the lowest
    rank (feature block) first, then the lowest flat index within that rank's shard."""
    L_, B_, F_ = h.shape
    n = F_ // world
    groups = [h] if across else [h[l:l + 1] for l in range(L_)]
    out = []
    for g in groups:
        shards = [g[..., r * n:(r + 1) * n] for r in range(world)]
        flat = torch.cat([s.reshape(-1) for s in shards]).double() + 0.0  # the ±0 fold
        keep = torch.zeros_like(flat, dtype=torch.bool)
        keep[torch.sort(flat, descending=True, stable=True).indices[:k_total_of(g)]] = True
        parts = keep.split([s.numel() for s in shards])
        out.append(torch.cat([p.view(s.shape) for p, s in zip(parts, shards)], -1))
    return torch.cat(out, 0)


def _ties_case(seed, dtype):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(L, B, F, generator=g)
    h[:, :, ::3] = torch.randint(-2, 3, (L, B, (F + 2) // 3), generator=g).float() / 2  # ties, ±0 at the cut
    h[:, ::2, ::5] = -0.0
    return h.to(dtype)


def _mask(codes, n) -> torch.Tensor:
    return torch.stack([torch.zeros(B, n, dtype=torch.bool).index_put_((c.row_ids(), c.index.long()),
                                                                       torch.tensor(True))
                        for c in codes])


def _backend(impl: str, dtype: torch.dtype):
    """The select module ``impl`` resolves to for ``dtype`` on the CPU (the op table's choice)."""
    name = ops.resolve("batch_topk", impl, torch.device("cpu"), dtype, sharded=True)[0]
    return ext_select if name == "cpu" else reference_select


def _batch_topk_cases(rank, world, impl, tag):
    """Sharded BatchTopK per layer (one call per layer, and one grouped call for all layers) and
    across layers: exactly the unsharded selection with ties to the lower rank, ±0 tying at the cut,
    values relu(h) and the gradient at the kept positive entries."""
    n = F // world
    group = dist.group.WORLD
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        for mode in ("per_layer", "grouped", "across"):
            h = _ties_case(7, dtype)
            shard = h[..., rank * n:(rank + 1) * n].clone().requires_grad_()
            if mode == "across":
                codes = ops.batch_topk_layers(shard, K, group=group, impl=impl)
            elif mode == "per_layer":
                codes = [ops.batch_topk(shard[l], K, group=group, impl=impl) for l in range(L)]
            else:  # what encode_layers(across_layers=False) runs: one selection for all layers
                codes = _backend(impl, dtype).batch_topk_per_layer(shard, K, as_shards(group))
            want = _expected_batch_topk(h, world, lambda g: K * B * g.shape[0],
                                        mode == "across")[..., rank * n:(rank + 1) * n]
            assert torch.equal(_mask(codes, n), want), (tag, impl, dtype, mode, rank)
            for l, c in enumerate(codes):
                assert torch.equal(c.value, torch.relu(shard.detach()[l][c.row_ids(), c.index.long()]))
            sum(c.value.float().sum() for c in codes).backward()
            grad = torch.where(want & (shard.detach() > 0), 1.0, 0.0).to(dtype)
            assert torch.equal(shard.grad, grad), (tag, impl, dtype, mode)


def _topk_auxk_encode_cases(rank, world, impl):
    """Sharded TopK (k up to more than a shard's features), AuxK and encode (TopK, BatchTopK, across
    layers) equal the unsharded reference restricted to this rank's features, gradients included."""
    n = F // world
    group = dist.group.WORLD
    lo, hi = rank * n, (rank + 1) * n
    g = torch.Generator().manual_seed(3)
    for k in (1, K, n + 7):
        h = torch.randn(B, F, generator=g, dtype=torch.float64)
        h[:, 5] = h[:, 40] = 0.75  # an exact tie across ranks: the lower rank keeps it
        for dtype in (torch.float32, torch.float64):
            hd = h.to(dtype)
            shard = hd[:, lo:hi].clone().requires_grad_()
            codes = ops.topk(shard, k, group=group, impl=impl)
            want = brute_topk_mask(hd, k)[:, lo:hi]
            assert torch.equal(_mask([codes], n)[0], want), (impl, k, dtype)
            codes.value.sum().backward()
            assert torch.equal(shard.grad, torch.where(want & (shard.detach() > 0), 1.0, 0.0).to(dtype))
    d = 7
    x = torch.randn(B, d, generator=g)
    W = torch.randn(F, d, generator=g)
    b = torch.randn(F, generator=g) * 0.1
    dead = torch.rand(F, generator=g) < 0.4
    up = torch.randn(B, F, generator=g, dtype=torch.float64)

    def run(fn, W_, b_, cols):
        W_, b_ = W_.clone().requires_grad_(), b_.clone().requires_grad_()
        codes = fn(W_, b_)
        dense = codes.to_dense(W_.shape[0]) if not isinstance(codes, list) else None
        (dense.double() * up[:, cols]).sum().backward()
        return dense.detach(), W_.grad, b_.grad

    full = slice(0, F)
    mine = slice(lo, hi)
    for k_aux in (3, 40):
        got = run(lambda W_, b_: ops.auxk_select(x, W_, b_, dead[mine], k_aux, group=group, impl=impl),
                  W[mine], b[mine], mine)
        ref = run(lambda W_, b_: reference_auxk.auxk_select(x, W_, b_, dead, k_aux), W, b, full)
        for a, r, name in zip(got, ref, ("codes", "dW_enc", "db_enc")):
            assert torch.allclose(a, r[..., lo:hi] if name == "codes" else r[lo:hi], atol=1e-5), (impl, k_aux, name)
    for act in ("topk", "batchtopk"):
        got = run(lambda W_, b_: ops.encode(x, W_, b_, activation=act, k=K, group=group, impl=impl),
                  W[mine], b[mine], mine)
        ref = run(lambda W_, b_: reference_encode.encode(x, W_, b_, activation=act, k=K), W, b, full)
        for a, r, name in zip(got, ref, ("codes", "dW_enc", "db_enc")):
            assert torch.allclose(a, r[..., lo:hi] if name == "codes" else r[lo:hi], atol=1e-5), (impl, act, name)
    xl = torch.randn(B, L, d, generator=g)
    Wl = torch.randn(L, F, d, generator=g)
    for across in (False, True):
        Ws = Wl[:, lo:hi].clone().requires_grad_()
        codes = ops.encode_layers(xl, Ws, None, K, across_layers=across, group=group, impl=impl)
        Wr = Wl.clone().requires_grad_()
        ref = reference_encode.encode_layers(xl, Wr, None, K, across_layers=across)
        for l in range(L):
            assert torch.allclose(codes[l].to_dense(n), ref[l].to_dense(F)[:, lo:hi], atol=1e-5), (impl, across, l)
        sum((c.to_dense(n).double() * up[:, lo:hi]).sum() for c in codes).backward()
        sum((c.to_dense(F).double() * up).sum() for c in ref).backward()
        assert torch.allclose(Ws.grad, Wr.grad[:, lo:hi], atol=1e-5), (impl, across)


def _worker(rank, world, store_path, fail_rank):
    dist.init_process_group("gloo", store=dist.FileStore(store_path, world), rank=rank, world_size=world)
    torch.set_num_threads(1)
    os.environ.pop("FASTCLT_IMPL", None)
    ext = _ext.has_cpu_ext()
    impls = ["auto", "reference"] + (["cpu"] if ext else [])
    for impl in impls:
        _batch_topk_cases(rank, world, impl, "plain")
        _topk_auxk_encode_cases(rank, world, impl)
    if ext:
        # one rank without the extension: it runs the reference, the other the extension's kernels —
        # the same protocol, so the same exact selection
        has_cpu_ext = _ext.has_cpu_ext
        if rank == fail_rank:
            _ext.has_cpu_ext = lambda: False
        assert ops.resolve("batch_topk", "auto", torch.device("cpu"), torch.float32, sharded=True)[0] == \
            ("reference" if rank == fail_rank else "cpu")
        _batch_topk_cases(rank, world, "auto", "mixed")
        _ext.has_cpu_ext = has_cpu_ext
        # the extension's histogram raises on one rank's second pass: every rank raises at that pass
        from fastclt.ops.ext import select as ext_select
        real = ext_select.histogram_of
        if rank == fail_rank:
            def failing(groups):
                inner, calls = real(groups), []

                def histogram(prefixes, bits, step):
                    calls.append(1)
                    if len(calls) == 2:
                        raise RuntimeError("injected failure")
                    return inner(prefixes, bits, step)
                return histogram
            ext_select.histogram_of = failing
        with pytest.raises(ShardSelectionError, match="failed on 1 rank"):
            ops.batch_topk_layers(_ties_case(7, torch.float32)[..., :F // world].contiguous(), K,
                                  group=dist.group.WORLD, impl="cpu")
        ext_select.histogram_of = real
    # NaN on one rank only: a ValueError on every rank (the count is all-reduced), no hang
    n = F // world
    for impl in impls:
        for dtype in (torch.float32, torch.float64):
            shard = _ties_case(8, dtype)[..., rank * n:(rank + 1) * n].clone()
            if rank == 1:
                shard[1, 2, 3] = float("nan")
            with pytest.raises(ValueError, match="NaN"):
                ops.batch_topk_layers(shard, K, group=dist.group.WORLD, impl=impl)
    shutdown_distributed()  # the caught errors' tracebacks still hold the group


def test_sharded_selections_are_exact_on_every_implementation(tmp_path):
    """Two gloo ranks, each implementation that takes a group (auto, reference, the extension's
    kernels): BatchTopK (per layer, grouped, across layers; fp32, bf16, fp64) keeps exactly the
    entries of the unsharded selection with ties to the lower rank, ±0 tying at the cut; TopK,
    AuxK and encode equal the unsharded reference; ranks on different implementations agree; a
    histogram that raises on one rank raises ShardSelectionError on every rank; NaN on one rank is
    a ValueError on every rank."""
    mp.spawn(_worker, args=(2, str(tmp_path / "store"), 1), nprocs=2, join=True)


def test_sharded_batch_topk_memory_is_o_of_kept(tmp_path, monkeypatch):
    """Extra memory of the sharded BatchTopK (one rank of one; fp32 on the extension's kernels when
    built, fp64 on the reference's torch path): a small multiple of the kept entries plus the torch
    path's CHUNK-element temporaries, never keys or masks of all of h."""
    from _alloc import AllocationTracker

    impl = "auto"
    monkeypatch.setattr(reference_select, "CHUNK", 1 << 14)
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        group = dist.group.WORLD
        L_, B_, F_, k = 2, 64, 8192, 8
        kept = k * B_ * L_
        for dtype in (torch.float32, torch.float64):
            h = torch.randn(L_, B_, F_, dtype=dtype)
            for across in (False, True):
                def select():
                    if across:
                        return ops.batch_topk_layers(h, k, group=group, impl=impl)
                    return _backend(impl, dtype).batch_topk_per_layer(h, k, as_shards(group))
                select()  # warm
                with AllocationTracker() as t:
                    codes = select()
                assert sum(c.nnz for c in codes) == kept
                bound = 64 * kept + 48 * reference_select.CHUNK + (1 << 16)  # fp64 keys: 8 bytes, and masks
                assert t.peak <= bound, (dtype, across, t.peak, bound, sorted(t.log, key=lambda e: -e[1])[:5])
                assert t.peak < h.numel(), (dtype, across)  # under one byte per element of h
    finally:
        shutdown_distributed()
