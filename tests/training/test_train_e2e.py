"""Training through the language model (train.objective kl / kl+fvu / ce): the dictionary spliced into
a frozen LM (tiny GPT-2 and Qwen2 built from configs, random weights large enough that the MLPs
matter), gradients reaching the dictionary and never the LM, activation checkpointing changing no
gradient, KL training beating reconstruction training on the spliced KL, exact resume,
reconstruction pre-training then KL fine-tuning (train.init_from), and the refused options."""
import json
from pathlib import Path

import pytest
import torch

from _lm import tiny_lm
import fastclt
from fastclt import CLTConfig, CrossLayerTranscoder, SAEConfig, SparseAutoencoder
from fastclt.config import MOLTConfig
from fastclt.models import MOLT
from fastclt.train import main as train_main
from fastclt.training.e2e import SplicedObjective

transformers = pytest.importorskip("transformers")

D, V, CTX = 32, 64, 16
NO_LOG = ["--log.progress", "false", "--log.plot", "false", "--train.device", "cpu"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models (tests/conftest.py)


def _lm(arch: str):
    return tiny_lm(arch, seed=1, d=D, vocab=V)


def _stream(n: int, seed: int) -> torch.Tensor:
    """Token ids of a small Markov chain: each token is one of 3 successors of the one before (a
    structure a 2-block LM learns in a few hundred steps, and whose MLPs then matter)."""
    g = torch.Generator().manual_seed(0)
    succ = torch.randint(1, V, (V, 3), generator=g)
    g.manual_seed(seed)
    pick = torch.randint(0, 3, (n,), generator=g)
    out = torch.empty(n, dtype=torch.long)
    out[0] = 1
    for i in range(1, n):
        out[i] = succ[out[i - 1], pick[i]]
    return out


@pytest.fixture(scope="module")
def lm_dirs(tmp_path_factory):
    """gpt2: a GPT-2 trained on the Markov chain (tokens.npy: its sequences); qwen2: random weights."""
    import numpy as np
    root = tmp_path_factory.mktemp("lms")
    _lm("qwen2").save_pretrained(root / "qwen2")
    lm = _lm("gpt2").train()
    seqs = _stream(40_000, 1).view(-1, CTX)
    opt = torch.optim.Adam(lm.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(150):
        batch = seqs[torch.randint(0, len(seqs), (16,), generator=g)]
        loss = lm(input_ids=batch, labels=batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    lm.eval().save_pretrained(root / "gpt2")
    np.save(root / "tokens.npy", _stream(20_000, 2).numpy())
    return root


def _dictionary(kind: str, activation: str = "relu"):
    torch.manual_seed(2)
    if kind == "sae":
        return SparseAutoencoder(SAEConfig(d_in=D, n_features=48, activation=activation, k=4))
    if kind == "molt":
        return MOLT(MOLTConfig(n_layers=2, d_in=D, d_out=D, n_features=14, activation=activation, k=2))
    return CrossLayerTranscoder(CLTConfig(n_layers=2, d_in=D, d_out=D, n_features=48, activation=activation, k=4,
                                          cross_layer=kind == "clt", preact_coef=0.1))


@pytest.mark.parametrize("arch", ["gpt2", "qwen2"])
@pytest.mark.parametrize("kind,objective,activation", [("clt", "kl", "jumprelu"), ("plt", "kl+fvu", "relu"),
                                                       ("sae", "ce", "relu"), ("clt", "kl+fvu", "batchtopk"),
                                                       ("molt", "kl", "topk")])
def test_gradients_reach_the_dictionary_and_never_the_lm(arch, kind, objective, activation):
    lm = _lm(arch)
    ids = torch.randint(0, V, (3, 11), generator=torch.Generator().manual_seed(0))
    grads = []
    for checkpointing in (False, True):
        model = _dictionary(kind, activation)
        obj = SplicedObjective(model, lm, objective, lm_checkpoint=checkpointing)
        dead = torch.ones(model.n_layers, model.cfg.n_features, dtype=torch.bool) if "topk" in activation else None
        out = obj.loss(ids, dead)
        out.loss.backward()
        assert torch.isfinite(out.loss)
        g = {n: p.grad for n, p in model.named_parameters()}
        for n, v in g.items():
            assert v is not None and torch.isfinite(v).all(), n
        assert g["W_enc"].abs().sum() > 0
        assert sum(v.abs().sum() for n, v in g.items() if n.startswith(("W_dec", "U"))) > 0
        assert all(p.grad is None and not p.requires_grad for p in lm.parameters())
        assert not any(m._forward_hooks or m._forward_pre_hooks for m in lm.modules())
        assert not any("forward" in m.__dict__ for m in lm.modules())  # checkpoint wrappers removed
        if "topk" in activation:
            assert "auxk" in out.parts
        grads.append(g)
    for n in grads[0]:  # recomputing the blocks in the backward changes no gradient
        torch.testing.assert_close(grads[0][n], grads[1][n], rtol=1e-5, atol=1e-7)


def test_the_kl_is_that_of_the_evaluation():
    """The objective's KL on a batch equals evaluate_replacement's KL of the same model (a per-token rule)."""
    from fastclt.eval import evaluate_replacement
    lm, model = _lm("gpt2"), _dictionary("clt", "relu")
    ids = torch.randint(0, V, (4, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        out = SplicedObjective(model, lm, "kl", lm_checkpoint=False).loss(ids)
    ref = evaluate_replacement(model, lm, ids, per_layer=False)
    assert out.metrics["kl"] == pytest.approx(ref["kl"], rel=1e-4)
    assert out.metrics["ce"] == pytest.approx(ref["ce_spliced"], rel=1e-5)


def _args(lm_dir, out, *extra, arch="gpt2"):
    tokens = str(lm_dir / "tokens.npy") if arch == "gpt2" else "random"
    return ["--data.source", "hf", "--data.model", str(lm_dir / arch), "--data.tokens", tokens,
            "--data.ctx_len", str(CTX), "--model.n_layers", "2", "--model.d_in", str(D), "--model.d_out", str(D),
            "--model.n_features", "64", "--model.activation", "relu", "--model.sparsity_coef", "1e-4",
            "--model.init_fire_rate", "0.2",  # 64 features: the default 1% would open < 1 per token
            "--train.steps", "40", "--train.batch_size", "64", "--train.init_samples", "256", "--train.lr", "3e-3",
            "--train.lr_warmup_steps", "2", "--train.sparsity_warmup_steps", "0", "--train.eval_batches", "1",
            "--eval.n_seqs", "16", "--eval.per_layer", "false", "--checkpoint.every", "0", "--out_dir", str(out),
            *extra] + NO_LOG


def _summary(out):
    return json.loads((out / "summary.json").read_text())


def _records(out):
    return [json.loads(line) for line in open(out / "metrics.jsonl")]


def test_kl_beats_reconstruction_and_logs_kl_as_it_trains(lm_dirs, tmp_path):
    rec, kl = tmp_path / "rec", tmp_path / "kl"
    assert train_main(_args(lm_dirs, rec)) == 0
    assert train_main(_args(lm_dirs, kl, "--train.objective", "kl", "--train.eval_every", "20")) == 0
    k_rec, k_kl = _summary(rec)["replacement"]["kl"], _summary(kl)["replacement"]["kl"]
    assert k_kl < 0.7 * k_rec, (k_kl, k_rec)
    recs = _records(kl)
    steps = [r for r in recs if "loss" in r]
    assert len(steps) == 40 and all("kl" in r and "ce" in r and "layer1/l0" in r for r in steps)
    evals = [r for r in recs if "eval/kl" in r]
    assert [r["step"] for r in evals] == [0, 20, 40]
    assert evals[-1]["eval/kl"] < evals[0]["eval/kl"] and "eval/ce_recovered" in evals[-1]
    model = CrossLayerTranscoder.from_pretrained(kl / "model")
    assert model.cfg.lm_layers == [0, 1]


def test_resume_is_exact(lm_dirs, tmp_path):
    extra = ("--train.objective", "kl+fvu", "--train.fvu_coef", "0.5", "--model.activation", "batchtopk",
             "--model.k", "4", "--train.steps", "8", "--checkpoint.every", "3", "--train.eval_every", "4")
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    assert train_main(_args(lm_dirs, ref, *extra, arch="qwen2")) == 0
    assert train_main(_args(lm_dirs, cut, *extra, "--train.max_steps", "5", arch="qwen2")) == 0
    assert train_main(_args(lm_dirs, cut, *extra, arch="qwen2")) == 0
    losses = [[(r["step"], r["loss"], r["auxk"]) for r in _records(o) if "loss" in r] for o in (ref, cut)]
    assert len(losses[0]) == 8 and losses[0] == losses[1]
    a = CrossLayerTranscoder.from_pretrained(ref / "model")
    b = CrossLayerTranscoder.from_pretrained(cut / "model")
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())


def test_reconstruction_pretraining_then_kl_fine_tuning(lm_dirs, tmp_path, capsys):
    pre, fine = tmp_path / "pre", tmp_path / "fine"
    assert train_main(_args(lm_dirs, pre, "--train.steps", "20")) == 0
    args = _args(lm_dirs, fine, "--train.objective", "kl", "--train.steps", "20", "--train.eval_every", "10",
                 "--train.init_from", str(pre / "model"), "--train.lr", "1e-3")
    assert train_main(args) == 0
    evals = [r for r in _records(fine) if "eval/kl" in r]
    start = _summary(pre)["replacement"]["kl"]
    assert evals[0]["step"] == 0 and evals[0]["eval/kl"] == pytest.approx(start, rel=1e-6)  # the weights it loaded
    assert evals[-1]["eval/kl"] < 0.8 * start
    # a model of another shape is refused, naming what differs
    capsys.readouterr()
    other = _args(lm_dirs, tmp_path / "bad", "--train.objective", "kl", "--init_from", str(pre / "model"),
                  "--model.n_features", "32")
    assert train_main(other) == 2
    assert "train.init_from" in capsys.readouterr().err


def test_sae_on_qwen2_trains_with_ce(lm_dirs, tmp_path):
    out = tmp_path / "sae"
    args = _args(lm_dirs, out, "--model.kind", "sae", "--model.n_layers", "1", "--data.layers", "[1]",
                 "--train.objective", "ce", "--train.steps", "6", "--train.autocast", "bf16",
                 "--train.lm_checkpoint", "false", arch="qwen2")
    args = [a for i, a in enumerate(args) if not (a == "--model.d_out" or (i and args[i - 1] == "--model.d_out"))]
    assert train_main(args) == 0
    model = SparseAutoencoder.from_pretrained(out / "model")
    assert model.cfg.lm_layers == [1]
    assert all("ce" in r for r in _records(out) if "loss" in r)


@pytest.mark.parametrize("extra,message", [
    (("--train.objective", "mse"), "train.objective: expected one of"),
    (("--train.objective", "kl", "--train.batch_size", "60"), "train.batch_size"),
    (("--train.objective", "kl", "--train.calibrate_jumprelu", "true", "--model.activation", "topk"),
     "train.calibrate_jumprelu"),
    (("--train.objective", "kl", "--model.activation", "batchtopk", "--model.batchtopk_across_layers", "true"),
     "model.batchtopk_across_layers"),
    (("--train.objective", "kl", "--train.tp", "2"), "train.tp"),
    (("--train.objective", "kl", "--train.fvu_coef", "-1"), "train.fvu_coef"),
    (("--train.init_from", "/nonexistent"), "train.init_from"),
])
def test_bad_options_are_refused(lm_dirs, tmp_path, capsys, extra, message):
    assert train_main(_args(lm_dirs, tmp_path / "x", *extra)) == 2
    assert message in capsys.readouterr().err


def test_objective_needs_the_lm(capsys):
    assert train_main(["--train.objective", "kl", "--train.steps", "1"] + NO_LOG) == 2
    assert "data.source" in capsys.readouterr().err


@pytest.mark.slow
def test_data_parallel_equals_one_process_with_the_summed_batch(lm_dirs, tmp_path):
    """torchrun, 2 gloo ranks of 2 sequences each: rank r takes sequence groups 2i + r, so every step
    sees the same 4 sequences as one process with twice the batch — the same model, up to rounding
    (per-token rules: the ReLU codes of a sequence do not depend on the rest of the batch)."""
    import subprocess
    import sys
    extra = ("--train.objective", "kl", "--train.steps", "4", "--eval.n_seqs", "0", "--data.prefetch", "0")
    one = tmp_path / "one"
    assert train_main(_args(lm_dirs, one, *extra, "--train.batch_size", "64")) == 0
    two = tmp_path / "two"
    env = {"PYTHONPATH": str(Path(fastclt.__file__).parent.parent), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}
    args = _args(lm_dirs, two, *extra, "--train.batch_size", "32")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        "-m", "fastclt.train", *args], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert json.loads((two / "summary.json").read_text())["dp"] == 2
    a = CrossLayerTranscoder.from_pretrained(one / "model")
    b = CrossLayerTranscoder.from_pretrained(two / "model")
    for k, v in a.state_dict().items():
        torch.testing.assert_close(b.state_dict()[k], v, rtol=1e-4, atol=1e-6, msg=k)
    la = [r["kl"] for r in _records(one) if "loss" in r]
    lb = [r["kl"] for r in _records(two) if "loss" in r]
    assert la == pytest.approx(lb, rel=1e-4)
