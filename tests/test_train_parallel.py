"""Tensor parallel (tp=2 over gloo) equals one process: the sharded model's loss, metrics and every
gradient (model level), and whole training runs — loss curve and final merged weights — for TopK,
BatchTopK and JumpReLU. One torch.multiprocessing spawn of 2 ranks does all of it."""
import json
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import fastclt
from fastclt.training.config import load_config
from fastclt import _ext
from fastclt.training import parallel
from fastclt.training.parallel import TensorParallel, float_keys, shard_state, torch_histogram

RUN_ARGS = ["--model.n_layers", "3", "--model.d_in", "16", "--model.d_out", "16", "--model.n_features", "32",
            "--model.dtype", "float64", "--data.n_true", "16", "--data.true_l0", "2",
            "--train.steps", "12", "--train.batch_size", "64", "--train.lr_warmup_steps", "3",
            "--train.sparsity_warmup_steps", "4", "--train.dead_tokens", "256", "--train.init_samples", "128",
            "--train.eval_batches", "1", "--train.device", "cpu", "--log.every", "1", "--log.progress", "false",
            "--log.plot", "false", "--checkpoint.every", "0"]
RUNS = {
    "topk": ["--model.activation", "topk", "--model.k", "3", "--model.k_aux", "4"],
    "batchtopk": ["--model.activation", "batchtopk", "--model.k", "3", "--model.k_aux", "4"],
    "jumprelu": ["--model.activation", "jumprelu", "--model.sparsity_coef", "0.01", "--model.preact_coef", "0.001",
                 "--model.threshold_init", "0.1", "--train.init_fire_rate", "0.1"],
}
DP_ARGS = ["--train.steps", "6", "--data.source", "shards", "--data.shuffle", "false"]
# on-the-fly extraction: only tp rank 0 runs the LM; its batches (shuffle buffer) are broadcast
HF_ARGS = ["--train.steps", "6", "--data.source", "hf", "--data.ctx_len", "8", "--data.seqs_per_forward", "3",
           "--eval.n_seqs", "2", "--eval.batch_size", "2", "--eval.per_layer", "false"]
MODEL_CASES = [
    ("clt", dict(activation="topk", k=3)),
    ("clt", dict(activation="batchtopk", k=3, batchtopk_across_layers=True)),
    ("clt", dict(activation="batchtopk", k=3, decoder_tying="per_target", feature_affine=True, skip_connection=True)),
    ("clt", dict(activation="jumprelu", decoder_tying="per_source", preact_coef=0.1)),
    ("clt", dict(activation="topk", k=3, cross_layer=False, skip_connection=True)),
    ("sae", dict(activation="topk", k=3)),
    ("sae", dict(activation="jumprelu", preact_coef=0.1)),
]


def _model_check(rank, world, kind, kw):
    torch.manual_seed(0)
    if kind == "sae":
        cfg = fastclt.SAEConfig(d_in=8, n_features=16, dtype="float64", **kw)
        cls = fastclt.SparseAutoencoder
    else:
        cfg = fastclt.CLTConfig(n_layers=3, d_in=8, d_out=8, n_features=16, dtype="float64", **kw)
        cls = fastclt.CrossLayerTranscoder
    full = cls(cfg)
    L, F = full.n_layers, cfg.n_features
    x = torch.randn(32, L, 8, dtype=torch.float64)
    y = torch.randn(32, L, 8, dtype=torch.float64)
    dead = torch.rand(L, F) < 0.5
    if kind == "sae":
        x, y, dead = x[:, 0], None, dead[0]
    topk_like = cfg.activation in ("topk", "batchtopk")
    out = full.loss(x, y, dead_mask=dead if topk_like else None, sparsity_coef=0.1)
    out.loss.backward()
    shard_kw = {"n_features": F // world}
    if topk_like:
        shard_kw["k_aux"] = cfg.effective_k_aux
    shard = cls(cfg.replace(**shard_kw))
    axes = full.feature_axes()
    shard.load_state_dict(shard_state(full.state_dict(), axes, world, rank))
    shard.tp = TensorParallel(None, world, rank)
    dl = dead.reshape(L, F)[:, rank * F // world:(rank + 1) * F // world].reshape(dead.shape[:-1] + (F // world,))
    o2 = shard.loss(x, y, dead_mask=dl if topk_like else None, sparsity_coef=0.1)
    o2.loss.backward()
    for key, v in out.metrics.items():
        assert abs(o2.metrics[key] - v) <= 1e-9 * max(1, abs(v)), (kind, kw, key, v, o2.metrics[key])
    grads = dict(full.named_parameters())
    for name, p in shard.named_parameters():
        ref = grads[name].grad
        ax = axes[name]
        if ax is not None:
            n = ref.shape[ax] // world
            ref = ref.narrow(ax, rank * n, n)
        assert torch.allclose(p.grad, ref, atol=1e-12, rtol=1e-9), (kind, kw, name, (p.grad - ref).abs().max())


def _worker(rank, world, store_path, out_root):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    dist.init_process_group("gloo", store=dist.FileStore(store_path, world), rank=rank, world_size=world)
    torch.set_num_threads(1)
    for kind, kw in MODEL_CASES:
        _model_check(rank, world, kind, kw)
    from fastclt.train import train
    for name, extra in RUNS.items():
        train(load_config(RUN_ARGS + extra + ["--train.tp", "2", "--out_dir", os.path.join(out_root, f"tp2_{name}")]))
    # stop at step 5 (checkpoints at 3 and 5), rank 1's newest shard gets corrupted, resume: every rank
    # falls back to step 3 together, and the run equals the uninterrupted one
    resumed = os.path.join(out_root, "tp2_resumed")
    train(load_config(RUN_ARGS + RUNS["batchtopk"] + ["--train.max_steps", "5", "--checkpoint.every", "3",
                                                      "--train.tp", "2", "--out_dir", resumed]))
    if rank == 1:
        shard = os.path.join(resumed, "checkpoints", "step_00000005", "rank_00001.safetensors")
        data = bytearray(open(shard, "rb").read())
        data[-5] ^= 0xFF
        open(shard, "wb").write(bytes(data))
    dist.barrier()
    train(load_config(RUN_ARGS + RUNS["batchtopk"] + ["--train.tp", "2", "--out_dir", resumed]))
    hf = load_config(RUN_ARGS + RUNS["topk"] + HF_ARGS + ["--data.model", os.path.join(out_root, "gpt2"),
                                                          "--train.tp", "2", "--out_dir", os.path.join(out_root, "tp2_hf")])
    train(hf)
    from fastclt.training.data import make_source
    from fastclt.training.parallel import init_distributed
    assert (make_source(hf, init_distributed(2, "cpu"), torch.device("cpu")).ex is None) == (rank == 1)
    # data parallel (tp=1, dp=2) on shards: replica r takes micro-batches 2i + r, gradients averaged
    train(load_config(RUN_ARGS + RUNS["topk"] + DP_ARGS + ["--out_dir", os.path.join(out_root, "dp2"),
                                                           "--data.path", os.path.join(out_root, "shards")]))
    dist.destroy_process_group()


def _losses(path):
    return [json.loads(l) for l in open(os.path.join(path, "metrics.jsonl"))]


def test_radix_threshold_torch_path_is_exact():
    """The torch histograms (any float dtype) find the exact cut: ties, ±0 (one key), ±Inf."""
    from fastclt.ops.ext_ops import radix_threshold
    torch.manual_seed(0)
    for dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
        h = torch.randn(3, 500).to(dtype)
        h[0, :50] = 0.25  # ties
        h[1, :10] = -0.0
        h[1, 10:20] = 0.0
        h[1, 20:] = -h[1, 20:].abs() - 1  # the cut of row 1 falls among the zeros of both signs
        h[2, :5] = float("-inf")
        h[2, 5] = float("inf")
        bits = 64 if dtype == torch.float64 else 32
        for k in (1, 7, 15, 60, 500):
            cuts = radix_threshold(torch_histogram(list(h), bits), [k] * 3, bits, 8)
            for g, c in enumerate(cuts):
                keys = float_keys(h[g])
                key = c.key - (1 << (bits - 1))
                kth = torch.sort(h[g].double(), descending=True).values[k - 1]
                assert int((keys > key).sum()) == c.n_greater and c.n_greater + c.n_take == k
                assert c.n_equal_local == int((keys == key).sum()) >= c.n_take >= 1
                assert bool((h[g][keys == key].double() == kth).all())
    assert torch.equal(float_keys(torch.tensor([-0.0, 0.0])), float_keys(torch.tensor([0.0, 0.0])))


@pytest.mark.skipif(not _ext.has_cpu_ext(), reason="needs the CPU kernels of fastclt._C")
def test_torch_histogram_equals_the_extension_op():
    """Both paths histogram the same keys (the extension's uint32 key, −0 folded), so ranks on
    different paths could not disagree on counts — the paths are agreed anyway."""
    h = torch.randn(7, 300)
    h[:, :20] = 0.0
    h[:, 20:40] = -0.0
    hist = torch_histogram([h.reshape(-1)], 32)
    for prefix, bits, step in ((0, 0, 8), (0x80, 8, 8), (0x7f, 8, 8), (0x3f80, 16, 8)):
        assert torch.equal(hist([prefix], bits, step)[0], torch.ops.fastclt.batch_topk_histogram(h, prefix, bits, step))


def _tp_expected(h: torch.Tensor, world: int, k_total_of, across: bool) -> torch.Tensor:
    """bool [L, B, F]: the kept entries of sharded BatchTopK — the k_total largest, ties to the lowest
    rank (feature block) first, then the lowest flat index within that rank's shard."""
    L, B, F = h.shape
    n = F // world
    groups = [h] if across else [h[l:l + 1] for l in range(L)]
    out = []
    for g in groups:
        shards = [g[..., r * n:(r + 1) * n] for r in range(world)]
        flat = torch.cat([s.reshape(-1) for s in shards]).double() + 0.0  # the ±0 fold
        keep = torch.zeros_like(flat, dtype=torch.bool)
        keep[torch.sort(flat, descending=True, stable=True).indices[:k_total_of(g)]] = True
        parts = keep.split([s.numel() for s in shards])
        out.append(torch.cat([p.view(s.shape) for p, s in zip(parts, shards)], -1))
    return torch.cat(out, 0)


def _tp_case(seed, dtype, L=3, B=16, F=64):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(L, B, F, generator=g)
    h[:, :, ::3] = torch.randint(-2, 3, (L, B, (F + 2) // 3), generator=g).float() / 2  # ties, ±0 at the cut
    h[:, ::2, ::5] = -0.0
    return h.to(dtype)


def _tp_batchtopk_worker(rank, world, store_path, fail_rank):
    import warnings
    dist.init_process_group("gloo", store=dist.FileStore(store_path, world), rank=rank, world_size=world)
    torch.set_num_threads(1)
    F, k = 64, 5
    n = F // world
    dtypes = (torch.float32, torch.bfloat16, torch.float64)
    for case in ("plain", "fail", "no_ext_here"):
        tp = TensorParallel(None, world, rank)
        if case == "fail" and rank == fail_rank:  # the extension's histogram raises on its second pass
            real = parallel._ext_histogram

            def failing(groups):
                inner, calls = real(groups), []

                def histogram(prefixes, bits, step):
                    calls.append(1)
                    if len(calls) == 2:
                        raise RuntimeError("injected failure")
                    return inner(prefixes, bits, step)
                return histogram
            parallel._ext_histogram = failing
        if case == "no_ext_here" and rank == fail_rank:  # as if this rank had no CPU kernels
            has_cpu_ext = _ext.has_cpu_ext
            _ext.has_cpu_ext = lambda: False
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for dtype in dtypes:
                for across in (False, True):
                    h = _tp_case(7, dtype).requires_grad_()
                    shard = h.detach()[..., rank * n:(rank + 1) * n].clone().requires_grad_()
                    codes = tp.batch_topk(shard, k, across_layers=across)
                    mine = torch.stack([torch.zeros(16, n, dtype=torch.bool).index_put_(
                        (c.row_ids(), c.index.long()), torch.tensor(True)) for c in codes])
                    want = _tp_expected(h.detach(), world, lambda g: k * 16 * g.shape[0], across)[..., rank * n:(rank + 1) * n]
                    assert torch.equal(mine, want), (case, dtype, across, rank)
                    for l, c in enumerate(codes):
                        assert torch.equal(c.value, torch.relu(shard.detach()[l][c.row_ids(), c.index.long()]))
                    sum(c.value.float().sum() for c in codes).backward()
                    grad = torch.where(want & (shard.detach() > 0), 1.0, 0.0).to(dtype)
                    assert torch.equal(shard.grad, grad), (case, dtype, across)
        ext_ok = tp._ext_ok.get(("cpu", torch.float32))
        if case == "plain":
            assert ext_ok is _ext.has_cpu_ext() and not caught
        else:  # every rank on the torch path together, from the agreement or the failed pass on
            assert ext_ok is False, (case, rank)
            if case == "fail" and _ext.has_cpu_ext():
                assert any("failed on 1 rank" in str(w.message) for w in caught), (rank, [str(w.message) for w in caught])
        if case == "fail" and rank == fail_rank:
            parallel._ext_histogram = real
        if case == "no_ext_here" and rank == fail_rank:
            _ext.has_cpu_ext = has_cpu_ext
    # NaN on one rank only: a ValueError on every rank (the count is all-reduced), no hang
    tp = TensorParallel(None, world, rank)
    for dtype in (torch.float32, torch.float64):
        shard = _tp_case(8, dtype)[..., rank * n:(rank + 1) * n].clone()
        if rank == 1:
            shard[1, 2, 3] = float("nan")
        with pytest.raises(ValueError, match="NaN"):
            tp.batch_topk(shard, k)
    dist.destroy_process_group()


def test_tp_batch_topk_exact_agreed_and_failure_safe(tmp_path):
    """Two gloo ranks: sharded BatchTopK (per layer and across layers; fp32, bf16 — the extension's
    ops —, fp64 — torch ops) keeps exactly the entries of the unsharded selection with ties to the
    lower rank, with ±0 tying at the cut; when the extension's histogram raises on one rank, or one
    rank lacks the extension, every rank takes the torch path together and the result is the same."""
    mp.spawn(_tp_batchtopk_worker, args=(2, str(tmp_path / "store"), 1), nprocs=2, join=True)


def test_tp_batch_topk_memory_is_o_of_kept(tmp_path, monkeypatch):
    """Extra memory of the sharded BatchTopK (one rank of one): a small multiple of the kept entries
    plus the torch path's CHUNK-element temporaries, never keys or masks of all of h."""
    from _alloc import AllocationTracker
    monkeypatch.setattr(parallel, "CHUNK", 1 << 14)
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        tp = TensorParallel(None, 1, 0)
        L, B, F, k = 2, 64, 8192, 8
        kept = k * B * L
        for dtype in (torch.float32, torch.float64):
            h = torch.randn(L, B, F, dtype=dtype)
            for across in (False, True):
                tp.batch_topk(h, k, across_layers=across)  # warm: the path agreement
                with AllocationTracker() as t:
                    codes = tp.batch_topk(h, k, across_layers=across)
                assert sum(c.nnz for c in codes) == kept
                bound = 64 * kept + 48 * parallel.CHUNK + (1 << 16)  # fp64 keys: 8 bytes, and masks
                assert t.peak <= bound, (dtype, across, t.peak, bound, sorted(t.log, key=lambda e: -e[1])[:5])
                assert t.peak < h.numel(), (dtype, across)  # under one byte per element of h
    finally:
        dist.destroy_process_group()


def test_tp2_equals_one_process(tmp_path):
    from fastclt.train import train
    store = str(tmp_path / "store")
    _write_shards(tmp_path / "shards")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=3, n_embd=16, n_head=2, vocab_size=97,
                                                         n_positions=16)).save_pretrained(tmp_path / "gpt2")
    mp.spawn(_worker, args=(2, store, str(tmp_path)), nprocs=2, join=True)
    # on-the-fly extraction under tp=2 (the LM on rank 0, batches broadcast) equals one process
    ref_dir = str(tmp_path / "tp1_hf")
    train(load_config(RUN_ARGS + RUNS["topk"] + HF_ARGS + ["--data.model", str(tmp_path / "gpt2"),
                                                           "--out_dir", ref_dir]))
    a, b = _losses(ref_dir), _losses(str(tmp_path / "tp2_hf"))
    assert len(a) == len(b) == 7  # 6 steps and the final evaluation
    for ra, rb in zip(a, b):
        assert set(ra) == set(rb)
        for key, v in ra.items():
            assert rb[key] == pytest.approx(v, rel=1e-6, abs=1e-9) or key in ("tokens_per_s", "tflops"), key
    for name, extra in RUNS.items():
        ref_dir = str(tmp_path / f"tp1_{name}")
        train(load_config(RUN_ARGS + extra + ["--out_dir", ref_dir]))
        a, b = _losses(ref_dir), _losses(str(tmp_path / f"tp2_{name}"))
        assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, 13))
        for ra, rb in zip(a, b):
            for key in ("loss", "fvu", "l0", "reconstruction"):
                assert rb[key] == pytest.approx(ra[key], rel=1e-9, abs=1e-12), (name, ra["step"], key)
        m1 = fastclt.CrossLayerTranscoder.from_pretrained(os.path.join(ref_dir, "model"))
        m2 = fastclt.CrossLayerTranscoder.from_pretrained(str(tmp_path / f"tp2_{name}" / "model"))
        s1, s2 = m1.state_dict(), m2.state_dict()
        for key in s1:
            assert torch.allclose(s1[key], s2[key], rtol=1e-6, atol=1e-7), (name, key)  # Adam amplifies fp64 rounding
        # the per-rank checkpoint shards, merged from disk, are the same model (each rank saved its own)
        from fastclt.training.checkpointing import find_checkpoints, merge_checkpoint
        merged = merge_checkpoint(find_checkpoints(tmp_path / f"tp2_{name}")[0]).state_dict()
        for key in s1:
            assert torch.equal(merged[key], s2[key]), (name, key)
    def curve(name):
        return [(r["step"], r["loss"], r["fvu"]) for r in _losses(str(tmp_path / name))]
    assert curve("tp2_resumed") == curve("tp2_batchtopk")
    a = fastclt.CrossLayerTranscoder.from_pretrained(tmp_path / "tp2_resumed" / "model").state_dict()
    b = fastclt.CrossLayerTranscoder.from_pretrained(tmp_path / "tp2_batchtopk" / "model").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    # data parallel: both replicas hold the same weights, and they differ from one process's run
    from fastclt.checkpoint import load_tensors
    last = find_checkpoints(tmp_path / "dp2")[0]
    r0, r1 = (load_tensors(last / f"rank_0000{r}.safetensors") for r in (0, 1))
    # (the BatchTopK → JumpReLU statistics are per replica until the export pools them)
    assert all(torch.equal(r0[k], r1[k]) for k in r0 if k.startswith(("model/", "optim/")) and "cut" not in k)
    summary = json.loads((tmp_path / "dp2" / "summary.json").read_text())
    assert summary["dp"] == 2 and summary["tokens"] == 6 * 64 * 2
    # ... which is one process accumulating the same two micro-batches per step
    ref = tmp_path / "accum2"
    train(load_config(RUN_ARGS + RUNS["topk"] + DP_ARGS + ["--train.grad_accum", "2", "--out_dir", str(ref),
                                                           "--data.path", str(tmp_path / "shards")]))
    a = fastclt.CrossLayerTranscoder.from_pretrained(ref / "model").state_dict()
    b = fastclt.CrossLayerTranscoder.from_pretrained(tmp_path / "dp2" / "model").state_dict()
    for key in a:
        if "cut" not in key:  # (statistics pooled differently: running mean per replica)
            assert torch.allclose(a[key], b[key], rtol=1e-6, atol=1e-7), key
    assert json.loads((ref / "summary.json").read_text())["tokens"] == summary["tokens"]


def _write_shards(folder):
    from fastclt.checkpoint import save_tensors, write_json
    folder.mkdir()
    g = torch.Generator().manual_seed(1)
    n, L, d = 64 * 20, 3, 16
    x = torch.randn(n, L, d, generator=g)
    y = x.flip(1) + 0.1 * torch.randn(n, L, d, generator=g)
    save_tensors(folder / "shard_00000.safetensors", {"x": x, "y": y})
    write_json(folder / "manifest.json", {"format": "fastclt.activations", "version": 1, "n_layers": L, "d_in": d,
                                          "d_out": d, "dtype": "float32", "n_tokens": n,
                                          "shards": [{"file": "shard_00000.safetensors", "n_tokens": n}]})
