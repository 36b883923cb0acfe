"""TopK / BatchTopK → JumpReLU calibrated on held-out activations (``calibrate_jumprelu``), its CLI
(``python -m fastclt.calibrate``) and the trainer's ``train.calibrate_jumprelu``.

The per-layer threshold must make the JumpReLU L0 on the calibration tokens equal the target, i.e.
fire exactly at the n largest positive pre-activations of the layer (a brute-force check on the
dense pre-activations), and the reported L0 / FVU must be what the two models compute."""
import json

import pytest
import torch

import fastclt
from fastclt.calibrate import main as calibrate_main
from fastclt.checkpoint import save_tensors, write_json
from fastclt.train import main as train_main
from _interop import random_transcoder

N = 900


def _dense_preacts(model, x):
    """[L, N, F] pre-activations in the model's normalised space (brute force)."""
    xl = x if x.dim() == 3 else x[:, None]
    xn = model._normalize(xl, "in")
    W, b, _ = model._enc_layers()
    pre = model._pre_bias()
    return torch.stack([(xn[:, l] - (0 if pre is None else pre)) @ W[l].T + b[l] for l in range(model.n_layers)])


def _fvu(model, x, y):
    y_hat = model(x)
    yl, hl = (y, y_hat) if y.dim() == 3 else (y[:, None], y_hat[:, None])
    yl, hl = yl.double(), hl.double()
    return ((yl - hl).pow(2).sum((0, 2)) / (yl - yl.mean(0)).pow(2).sum((0, 2))).tolist()


def _check(cal, model, x, y, targets):
    jr = cal.model
    L = model.n_layers
    assert jr.cfg.activation == "jumprelu" and cal.n_tokens == N
    h = _dense_preacts(model, x)
    for l in range(L):
        n = round(targets[l] * N)
        theta = torch.tensor(cal.threshold[l], dtype=model.param_dtype)
        assert torch.equal(jr.threshold.reshape(L, -1)[l], theta.expand(model.cfg.n_features))
        fired = h[l] > theta
        top = h[l].flatten().topk(n).indices
        assert int(fired.sum()) == n, f"layer {l}: {int(fired.sum())} fire, wanted {n}"
        assert bool(fired.flatten()[top].all())  # exactly the n largest
        assert cal.l0_after[l] == pytest.approx(n / N, abs=1e-12)
    codes = jr.encode(x)
    codes = codes if isinstance(codes, list) else [codes]
    assert [float(c.l0()) for c in codes] == pytest.approx(cal.l0_after, abs=1e-6)
    if y is not None:
        assert cal.fvu_after == pytest.approx(_fvu(jr, x, y), rel=1e-9)


@pytest.mark.parametrize("kind,activation", [(k, a) for k in ("clt", "set", "sae") for a in ("topk", "batchtopk")]
                         + [("across_layers", "batchtopk")])
def test_calibrated_l0_matches_trained_l0(kind, activation, gen):
    if kind == "sae":
        model = fastclt.SparseAutoencoder(fastclt.SAEConfig(d_in=10, n_features=48, activation=activation, k=3,
                                                            dtype="float64", normalization="mean_std"))
        x = torch.randn(N, 10, generator=gen, dtype=torch.float64) * 2 + 1
        model.initialize_from_data(x)
        y = None
    else:
        extra = {"batchtopk_across_layers": True} if kind == "across_layers" else {}
        model, _ = random_transcoder(gen, L=3, activation=activation, cross_layer=kind != "set",
                                     normalization="mean_std", **extra)
        x = torch.randn(N, 3, 8, generator=gen, dtype=torch.float64) * 1.5 + 0.5
        y = torch.randn(N, 3, 8, generator=gen, dtype=torch.float64)
    cal = model.calibrate_jumprelu(x, y, batch_size=256)
    # the target: the TopK/BatchTopK model's own L0 on these tokens, in the same batches
    l0 = torch.zeros(model.n_layers, dtype=torch.float64)
    for i in range(0, N, 256):
        codes = model.encode(x[i:i + 256])
        codes = codes if isinstance(codes, list) else [codes]
        l0 += torch.tensor([float((c.value > 0).sum()) for c in codes], dtype=torch.float64)
    assert cal.target_l0 == pytest.approx((l0 / N).tolist(), abs=1e-12) == cal.l0_before
    if activation == "topk":  # k per token, less where fewer than k pre-activations are positive
        assert all(model.cfg.k - 0.01 < v <= model.cfg.k for v in cal.l0_before)
    _check(cal, model, x, x if kind == "sae" else y, cal.target_l0)
    assert cal.fvu_before == pytest.approx([v for v in _fvu_batched(model, x, x if kind == "sae" else y)], rel=1e-9)
    assert model.cfg.activation == activation  # the source model is unchanged


def _fvu_batched(model, x, y, batch=256):
    yl = y if y.dim() == 3 else y[:, None]
    y_hat = torch.cat([model(x[i:i + batch]) for i in range(0, N, batch)])
    hl = y_hat if y_hat.dim() == 3 else y_hat[:, None]
    yl, hl = yl.double(), hl.double()
    return ((yl - hl).pow(2).sum((0, 2)) / (yl - yl.mean(0)).pow(2).sum((0, 2))).tolist()


def test_user_targets_float32_and_no_targets(gen):
    model, _ = random_transcoder(gen, L=3, activation="topk", dtype="float32")
    x = torch.randn(N, 3, 8, generator=gen) * 1.5 + 0.5
    cal = model.calibrate_jumprelu(x, target_l0=[1, 2.5, 0])
    assert cal.fvu_before is None and cal.fvu_after is None  # no targets given
    _check(cal, model, x, None, [1, 2.5, 0])
    cal = model.calibrate_jumprelu(x, target_l0=2)
    _check(cal, model, x, None, [2, 2, 2])


def test_bad_arguments(gen):
    model, _ = random_transcoder(gen, L=2, activation="jumprelu")
    x = torch.randn(10, 2, 8, generator=gen, dtype=torch.float64)
    with pytest.raises(ValueError, match="activation: only a TopK/BatchTopK"):
        model.calibrate_jumprelu(x)
    model, _ = random_transcoder(gen, L=2, activation="topk")
    for bad in ([1.0], -1, [1, 10 ** 6], "3", True):
        with pytest.raises(ValueError, match="target_l0"):
            model.calibrate_jumprelu(x, target_l0=bad)
    with pytest.raises(ValueError, match="batch_size"):
        model.calibrate_jumprelu(x, batch_size=0)
    with pytest.raises(ValueError, match=r"x: expected shape \[B, 2, 8\]"):
        model.calibrate_jumprelu(x[:, :1])
    with pytest.raises(ValueError, match="y: expected 10 tokens"):
        model.calibrate_jumprelu(x, x[:5])
    with pytest.raises(ValueError, match="at least one token"):
        model.calibrate_jumprelu(x[:0])


def _shards(folder, x, y):
    folder.mkdir(parents=True)
    save_tensors(folder / "shard_00000.safetensors", {"x": x, "y": y})
    write_json(folder / "manifest.json", {"format": "fastclt.activations", "version": 1, "n_layers": x.shape[1],
                                          "d_in": x.shape[2], "d_out": y.shape[2], "dtype": "float32",
                                          "n_tokens": x.shape[0], "shards": [{"file": "shard_00000.safetensors",
                                                                              "n_tokens": x.shape[0]}]})


def test_cli(gen, tmp_path, capsys):
    model, _ = random_transcoder(gen, L=3, activation="batchtopk", dtype="float32")
    model.save_pretrained(tmp_path / "model")
    x = torch.randn(N + 100, 3, 8, generator=gen) * 1.5 + 0.5
    y = torch.randn(N + 100, 3, 8, generator=gen)
    _shards(tmp_path / "heldout", x, y)
    out = tmp_path / "jr"
    assert calibrate_main([str(tmp_path / "model"), str(out), "--data", str(tmp_path / "heldout"), "--tokens", str(N),
                           "--batch-size", "300"]) == 0
    table = capsys.readouterr().out
    assert "threshold" in table and "FVU after" in table
    summary = json.loads((out / "calibration.json").read_text())
    jr = fastclt.load(out)
    ref = model.calibrate_jumprelu(x[:N], y[:N], batch_size=300)
    assert summary == ref.summary()
    assert torch.equal(jr.threshold, ref.model.threshold)
    assert calibrate_main([str(tmp_path / "model"), str(tmp_path / "jr2"), "--data", str(tmp_path / "heldout"),
                           "--tokens", "100", "--target-l0", "1,2,3"]) == 0
    assert json.loads((tmp_path / "jr2" / "calibration.json").read_text())["l0_after"] == pytest.approx([1, 2, 3])
    assert calibrate_main([str(tmp_path / "model"), str(tmp_path / "x"), "--data", str(tmp_path / "heldout"),
                           "--tokens", str(10 ** 6)]) == 2
    assert "--tokens" in capsys.readouterr().err
    assert calibrate_main([str(out), str(tmp_path / "y"), "--data", str(tmp_path / "heldout")]) == 2
    assert "only a TopK/BatchTopK" in capsys.readouterr().err


def test_trainer_calibrates_at_the_end(tmp_path):
    out = tmp_path / "run"
    args = ["--train.steps", "6", "--train.batch_size", "64", "--train.init_samples", "128",
            "--train.eval_batches", "1", "--train.calibrate_jumprelu", "true", "--train.calibrate_batches", "3",
            "--log.progress", "false", "--log.plot", "false", "--out_dir", str(out)]
    assert train_main(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    cal = json.loads((out / "model_jumprelu" / "calibration.json").read_text())
    assert summary["calibration"] == cal and cal["n_tokens"] == 3 * 64
    assert cal["l0_after"] == pytest.approx(cal["target_l0"], abs=1 / 64)
    jr = fastclt.load(out / "model_jumprelu")
    assert jr.cfg.activation == "jumprelu" and fastclt.load(out).cfg.activation == "batchtopk"
    bad = tmp_path / "bad"
    assert train_main(args[:-1] + [str(bad), "--model.activation", "relu"]) == 2


def _tp_worker(rank, world, store_path, args):
    import os

    import torch.distributed as dist
    from fastclt.train import train
    from fastclt.training.parallel import shutdown_distributed
    from fastclt.training.config import load_config
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    dist.init_process_group("gloo", store=dist.FileStore(store_path, world), rank=rank, world_size=world)
    torch.set_num_threads(1)
    train(load_config(args))
    shutdown_distributed()


def test_trainer_calibrates_under_tensor_parallelism_with_an_lm_source(tmp_path):
    """With tp=2 and on-the-fly extraction the batches are a collective (tp rank 0 runs the LM and
    broadcasts): every rank draws the calibration batches, rank 0 calibrates — no rank waits forever."""
    import time

    import torch.multiprocessing as mp
    import transformers
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=61,
                                                         n_positions=32)).save_pretrained(tmp_path / "lm")
    out = tmp_path / "run"
    args = ["--model.n_layers", "2", "--model.d_in", "16", "--model.d_out", "16", "--model.n_features", "32",
            "--model.activation", "topk", "--model.k", "3", "--data.source", "hf", "--data.model", str(tmp_path / "lm"),
            "--data.ctx_len", "16", "--train.steps", "3", "--train.batch_size", "32", "--train.init_samples", "32",
            "--train.eval_batches", "1", "--train.device", "cpu", "--train.tp", "2", "--train.calibrate_jumprelu",
            "true", "--train.calibrate_batches", "2", "--eval.n_seqs", "0", "--log.progress", "false",
            "--log.plot", "false", "--checkpoint.every", "0", "--out_dir", str(out)]
    ctx = mp.start_processes(_tp_worker, args=(2, str(tmp_path / "store"), args), nprocs=2, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + 240
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("the tp=2 run with train.calibrate_jumprelu did not finish (a rank waits on a collective)")
    cal = json.loads((out / "model_jumprelu" / "calibration.json").read_text())
    assert cal["n_tokens"] == 64 and fastclt.load(out / "model_jumprelu").cfg.activation == "jumprelu"
