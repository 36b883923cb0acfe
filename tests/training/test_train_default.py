"""The default command (no flags but --out_dir) trains a small CLT on synthetic activations and
recovers the planted features; an SAE trains through the same entry point; the README's "Use"
example runs. (torchrun: tests/training/test_train_torchrun.py.)"""
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


def test_readme_use_example_runs_in_seconds(tmp_path, monkeypatch):
    """The README's first "Use" block, as written (in a scratch folder: it saves clt/)."""
    text = (Path(__file__).parents[2] / "README.md").read_text()
    block = text.split("## Use", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    monkeypatch.chdir(tmp_path)
    scope = {}
    exec(compile(block, "README.md (Use)", "exec"), scope)
    assert scope["model"].cfg.n_features == 1024 and (tmp_path / "clt" / "model.safetensors").is_file()
    assert scope["y_hat"].shape == (512, 4, 64)
