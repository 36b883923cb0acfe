"""Configuration and clear errors: YAML + overrides, --help, validation that names the field,
missing paths, mismatched widths, NaN activations (the previous checkpoint still loads)."""
import json

import pytest
import torch
import yaml

from fastclt.train import main
from fastclt.training.checkpointing import find_checkpoints, merge_checkpoint
from fastclt.training.config import load_config

TINY = ["--model.n_layers", "2", "--model.d_in", "8", "--model.d_out", "8", "--model.n_features", "16",
        "--model.k", "2", "--train.steps", "4", "--train.batch_size", "16", "--train.init_samples", "16",
        "--train.eval_batches", "1", "--train.device", "cpu", "--log.progress", "false", "--log.plot", "false"]


def test_help_lists_every_option(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for key in ("--model.n_features", "--model.activation", "--train.lr", "--train.tp", "--train.max_steps",
                "--data.source", "--data.tokens", "--checkpoint.every", "--checkpoint.resume", "--log.wandb",
                "--out_dir", "torchrun"):
        assert key in out, key


def test_yaml_then_overrides(tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text(yaml.safe_dump({"model": {"n_features": 64, "activation": "topk"}, "train": {"lr": 1e-3},
                                 "out_dir": str(tmp_path / "o")}))
    cfg = load_config(["--config", str(f), "--train.lr", "2e-3", "--max_steps", "3", "--model.k", "8"])
    assert cfg.model["n_features"] == 64 and cfg.model["activation"] == "topk" and cfg.model["k"] == 8
    assert cfg.train.lr == 2e-3 and cfg.train.max_steps == 3 and cfg.out_dir == str(tmp_path / "o")
    assert cfg.model_config().n_features == 64


@pytest.mark.parametrize("args, field", [
    (["--train.lr", "-1"], "train.lr"),
    (["--train.lr", "fast"], "train.lr"),
    (["--model.activation", "gelu"], "model.activation"),
    (["--model.n_features", "15", "--train.tp", "2"], "model.n_features"),
    (["--model.k", "9", "--model.n_features", "16", "--train.tp", "2"], "model.k"),
    (["--train.bogus", "1"], "train.bogus"),
    (["--nonsense", "1"], "nonsense"),
    (["--data.source", "shards"], "data.path"),
    (["--data.source", "shards", "--data.path", "/nonexistent/x"], "data.path"),
    (["--data.source", "hf", "--data.model", "/nonexistent/m"], "data.model"),
    (["--checkpoint.keep", "0"], "checkpoint.keep"),
    (["--config", "/nonexistent.yaml"], "config"),
    (["--data.input_hook", "resid_post"], "data.input_hook"),
    (["--data.layers", "[2, 1]"], "data.layers"),
    (["--data.buffer_batches", "0"], "data.buffer_batches"),
    (["--eval.lm", "/tmp"], "eval.lm"),
    (["--eval.ctx_len", "1"], "eval.ctx_len"),
    (["--train.eval_every", "-1"], "train.eval_every"),
    (["--model.lm_layers", "[0, 1]"], "model.lm_layers"),
    (["--model.cross_layer", "false", "--model.decoder_tying", "per_source"], "model.decoder_tying"),
])
def test_bad_config_names_the_field(args, field, capsys, tmp_path):
    assert main(TINY + args + ["--out_dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and field in err, err


def _write_shards(folder, n, d, nan_at=None):
    from fastclt.checkpoint import save_tensors, write_json
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 2, d, generator=g)
    y = torch.randn(n, 2, d, generator=g)
    if nan_at is not None:
        x[nan_at:] = float("nan")
    save_tensors(folder / "shard_00000.safetensors", {"x": x, "y": y})
    write_json(folder / "manifest.json", {"format": "fastclt.activations", "version": 1, "n_layers": 2, "d_in": d,
                                          "d_out": d, "dtype": "float32", "n_tokens": n,
                                          "shards": [{"file": "shard_00000.safetensors", "n_tokens": n}]})


def test_mismatched_widths(tmp_path, capsys):
    _write_shards(tmp_path / "sh", 64, 12)
    assert main(TINY + ["--data.source", "shards", "--data.path", str(tmp_path / "sh"), "--out_dir",
                        str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "data.path" in err and "(2, 12, 12)" in err and "model.d_in" in err


def test_nan_activations_keep_the_checkpoint(tmp_path, capsys):
    shards = tmp_path / "sh"
    _write_shards(shards, 16 * 8, 8, nan_at=16 * 6)  # batches 6, 7 hold NaN
    args = TINY + ["--data.source", "shards", "--data.path", str(shards), "--data.shuffle", "false",
                   "--train.steps", "8", "--checkpoint.every", "2", "--out_dir", str(tmp_path / "o")]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "NaN" in err and "x" in err
    ck = find_checkpoints(tmp_path / "o")
    assert ck and ck[0].name == "step_00000006"
    merge_checkpoint(ck[0])  # the previous checkpoint loads (and verifies)
    assert not (tmp_path / "o" / "model").exists()
    cfg = json.loads((tmp_path / "o" / "config.json").read_text())
    assert cfg["train"]["steps"] == 8


def test_saved_config_round_trips(tmp_path):
    out = tmp_path / "o"
    assert main(TINY + ["--model.activation", "jumprelu", "--train.lr", "1e-4", "--out_dir", str(out)]) == 0
    again = load_config(["--config", str(out / "config.yaml")])
    first = load_config(TINY + ["--model.activation", "jumprelu", "--train.lr", "1e-4", "--out_dir", str(out)])
    assert again.to_dict() == first.to_dict()
    assert json.loads((out / "config.json").read_text()) == first.to_dict()
