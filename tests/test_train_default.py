"""The default command (no flags but --out_dir) trains a small CLT on synthetic activations and
recovers the planted features; an SAE trains through the same entry point."""
import json
import subprocess
import sys
from pathlib import Path

import fastclt
from fastclt.train import main


def test_default_command_recovers_features(tmp_path):
    env_path = str(Path(fastclt.__file__).parent.parent)
    cmd = [sys.executable, "-m", "fastclt.train", "--out_dir", str(tmp_path), "--log.progress", "false"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={"PYTHONPATH": env_path, "PATH": "/usr/bin:/bin"},
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "mmcs" in proc.stdout
    s = json.loads((tmp_path / "summary.json").read_text())
    assert s["mmcs"] >= 0.9, s
    for key in ("fvu_per_layer", "l0_per_layer", "dead_fraction", "tokens_per_s", "tflops"):
        assert key in s
    assert len(s["fvu_per_layer"]) == 4 and s["fvu"] < 0.5
    for f in ("config.yaml", "config.json", "metrics.jsonl", "model/config.json", "model/model.safetensors"):
        assert (tmp_path / f).is_file(), f
    model = fastclt.CrossLayerTranscoder.from_pretrained(tmp_path / "model")
    assert model.cfg.n_features == 128
    rec = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    for key in ("loss", "fvu", "l0", "layer3/fvu", "layer0/l0", "dead_fraction", "tokens_per_s", "tflops", "lr"):
        assert key in rec, key


def test_sae_and_jumprelu_train(tmp_path):
    common = ["--train.steps", "30", "--train.batch_size", "128", "--train.device", "cpu", "--log.progress", "false",
              "--log.plot", "false", "--train.eval_batches", "2", "--checkpoint.every", "0"]
    assert main(common + ["--model.kind", "sae", "--model.d_in", "32", "--model.n_features", "64",
                          "--model.activation", "topk", "--model.k", "3", "--out_dir", str(tmp_path / "sae")]) == 0
    sae = fastclt.SparseAutoencoder.from_pretrained(tmp_path / "sae" / "model")
    assert torch_norms_are_unit(sae)
    assert main(common + ["--model.activation", "jumprelu", "--model.preact_coef", "1e-4", "--train.init_fire_rate",
                          "0.05", "--out_dir", str(tmp_path / "jr")]) == 0
    s = json.loads((tmp_path / "jr" / "summary.json").read_text())
    assert 0 < s["l0"] < 128


def torch_norms_are_unit(sae):
    n = sae.W_dec.norm(dim=1)
    return bool(((n - 1).abs() < 1e-5).all())


def test_torchrun_entry_point(tmp_path):
    """The real launcher (torchrun is ``python -m torch.distributed.run``, what ``make train`` runs):
    --standalone, 2 gloo ranks, tp=2 — the same loss curve as one process."""
    args = ["--model.dtype", "float64", "--model.n_features", "64", "--model.activation", "topk", "--model.k", "3",
            "--train.steps", "5", "--train.batch_size", "64", "--train.init_samples", "64", "--train.device", "cpu",
            "--train.eval_batches", "1", "--log.progress", "false", "--log.plot", "false"]
    env = {"PYTHONPATH": str(Path(fastclt.__file__).parent.parent), "PATH": "/usr/bin:/bin",
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "fastclt.train", *args,
                           "--train.tp", "2", "--out_dir", str(tmp_path / "tp2")], capture_output=True, text=True,
                          env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert main(args + ["--out_dir", str(tmp_path / "tp1")]) == 0

    def curve(name):
        return [json.loads(l)["loss"] for l in open(tmp_path / name / "metrics.jsonl")]
    a, b = curve("tp1"), curve("tp2")
    assert len(a) == 5 and all(abs(x - y) <= 1e-9 * abs(x) for x, y in zip(a, b))
