"""Tensor parallel (tp=2 over gloo) equals one process: the sharded model's loss, metrics and every
gradient (model level), and whole training runs — loss curve and final merged weights — for TopK,
BatchTopK and JumpReLU. One torch.multiprocessing spawn of 2 ranks does all of it. (The sharded
selections themselves: tests/ops/test_sharded.py.)"""
import json
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import fastclt
from fastclt.training.config import load_config
from fastclt.training.parallel import TensorParallel, shard_state, shutdown_distributed

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
                                                          "--train.tp", "2",
                                                          "--out_dir", os.path.join(out_root, "tp2_hf")])
    train(hf)
    from fastclt.training.data import make_source
    from fastclt.training.parallel import init_distributed
    assert (make_source(hf, init_distributed(2, "cpu"), torch.device("cpu")).ex is None) == (rank == 1)
    # data parallel (tp=1, dp=2) on shards: replica r takes micro-batches 2i + r, gradients averaged
    train(load_config(RUN_ARGS + RUNS["topk"] + DP_ARGS + ["--out_dir", os.path.join(out_root, "dp2"),
                                                           "--data.path", os.path.join(out_root, "shards")]))
    shutdown_distributed()


def _losses(path):
    return [json.loads(l) for l in open(os.path.join(path, "metrics.jsonl"))]


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
