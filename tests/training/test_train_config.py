"""Configuration and clear errors: YAML + overrides, --help, validation that names the field,
missing paths, mismatched widths, NaN activations (the previous checkpoint still loads)."""
import json
import os
import re

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
    assert cfg.model.n_features == 64 and cfg.model.activation == "topk" and cfg.model.k == 8
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
    (["--model.kind", "sae", "--model.n_layers", "2"], "model.n_layers"),
    (["--data.verify", "true"], "data.verify"),
    (["--model.init_fire_rate", "1.5", "--model.activation", "relu"], "init_fire_rate"),
    (["--train.init_fire_rate", "0.1"], "train.init_fire_rate"),  # the default model is BatchTopK
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


@pytest.mark.parametrize("activation", ["batchtopk", "relu"])
def test_nan_activations_keep_the_checkpoint(tmp_path, capsys, activation):
    """NaN in a batch stops the run with the model's error naming x, and the last checkpoint stays:
    BatchTopK's selection refuses NaN in the forward (the trainer then checks the batch itself);
    ReLU's runs through and the step's deferred check of the inputs reports it before Adam."""
    shards = tmp_path / "sh"
    _write_shards(shards, 16 * 8, 8, nan_at=16 * 6)  # batches 6, 7 hold NaN
    args = TINY + ["--data.source", "shards", "--data.path", str(shards), "--data.shuffle", "false",
                   "--train.steps", "8", "--checkpoint.every", "2", "--out_dir", str(tmp_path / "o"),
                   "--model.activation", activation]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert re.search(r"x: \d+ token\(s\) contain NaN or Inf", err), err
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


def test_a_section_from_its_own_file(tmp_path, capsys):
    """--model FILE.yaml reads the model section (a section's name is never the shorthand of a field
    of that name, here data.model), also from inside --config; a missing file is an error naming it."""
    (tmp_path / "model.yaml").write_text("n_features: 64\nactivation: topk\n")
    cfg = load_config(["--model", str(tmp_path / "model.yaml"), "--model.k", "8"])
    assert (cfg.model.n_features, cfg.model.activation, cfg.model.k, cfg.data.model) == (64, "topk", 8, None)
    (tmp_path / "run.yaml").write_text(yaml.safe_dump({"model": str(tmp_path / "model.yaml"), "train": {"lr": 1e-4}}))
    cfg = load_config(["--config", str(tmp_path / "run.yaml")])
    assert (cfg.model.n_features, cfg.train.lr) == (64, 1e-4)
    assert load_config(["--train", "{lr: 2.0e-4, steps: 7}"]).train.steps == 7
    assert main(["--model", str(tmp_path / "lm"), "--out_dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: model: file {tmp_path / 'lm'} does not exist"), err
    assert main(["--train", str(tmp_path / "model.yaml"), "--out_dir", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err.startswith("error: train.n_features: unknown option")


def test_print_config_prints_the_resolved_configuration(tmp_path, capsys):
    """--print_config: the validated configuration, model section resolved, as YAML that loads back
    to it; nothing is written. An invalid value is an error as in training."""
    out = tmp_path / "o"
    args = TINY + ["--model.activation", "jumprelu", "--out_dir", str(out)]
    assert main(["--print_config"] + args) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed == load_config(args).to_dict() and printed["model"]["decoder_tying"] == "none"
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(printed))
    assert load_config(["--config", str(tmp_path / "p.yaml")]).to_dict() == printed
    assert not out.exists()
    assert main(args + ["--print_config", "--train.lr", "-1"]) == 2
    assert capsys.readouterr().err.startswith("error: train.lr:")


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", ".nan", ".inf"])
def test_non_finite_numbers_are_refused_before_work(value, tmp_path, capsys):
    out = tmp_path / "o"
    for args in (["--train.lr", value], ["--config", str(tmp_path / "c.yaml")]):
        (tmp_path / "c.yaml").write_text(f"train:\n  lr: {value}\n")
        assert main(TINY + args + ["--out_dir", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: train.lr: expected a") and ("finite" in err or "number" in err), err
        assert not out.exists()


@pytest.mark.parametrize("args, field", [
    (["--model.n_features", "1000000000"], "model.n_features"),
    (["--train.batch_size", "1000000000", "--train.init_samples", "16"], "train.batch_size"),
    (["--train.init_samples", "1000000000"], "train.init_samples"),
])
def test_absurd_sizes_are_refused_with_numbers(args, field, tmp_path, capsys):
    assert main(TINY + args + ["--out_dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {field}: this run needs at least") and "available" in err, err
    assert "GiB" in err or "TiB" in err


def test_unwritable_out_dir_is_the_first_error(tmp_path, capsys):
    """Checked before the data are set up (here an LM folder that holds no model)."""
    (tmp_path / "file").write_text("")
    (tmp_path / "lm").mkdir()
    outs = [tmp_path / "file" / "out"]
    if os.geteuid() != 0:  # root writes through permission bits
        (tmp_path / "ro").mkdir(mode=0o500)
        outs.append(tmp_path / "ro" / "out")
    for out in outs:
        assert main(TINY + ["--data.source", "hf", "--data.model", str(tmp_path / "lm"), "--out_dir", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: out_dir: {out} cannot be written"), err


def _shards(folder, sizes, d=8, L=2, bad=None, fmt="safetensors"):
    """A shards folder of len(sizes) shards as python -m fastclt.extract writes them (one safetensors
    file per shard, or x/y .npy files); ``bad(j, x, y, entry)`` may spoil shard j."""
    import numpy as np

    from fastclt.checkpoint import save_tensors, sha256_file, write_json
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    entries = []
    for j, n in enumerate(sizes):
        x, y = torch.randn(n, L, d, generator=g), torch.randn(n, L, d, generator=g)
        entry = ({"file": f"shard_{j:05d}.safetensors", "n_tokens": n} if fmt == "safetensors" else
                 {"x": f"x_{j:05d}.npy", "y": f"y_{j:05d}.npy", "n_tokens": n})
        if bad is not None:
            x, y = bad(j, x, y, entry)
        if fmt == "safetensors":
            entry["sha256"] = save_tensors(folder / entry["file"], {"x": x, "y": y})
        else:
            for key, t in (("x", x), ("y", y)):
                np.save(folder / entry[key], t.numpy())
            entry["sha256"] = {key: sha256_file(folder / entry[key]) for key in ("x", "y")}
        entries.append(entry)
    write_json(folder / "manifest.json", {"format": "fastclt.activations", "version": 1, "n_layers": L, "d_in": d,
                                          "d_out": d, "dtype": "float32", "n_tokens": sum(sizes), "shards": entries})
    return folder


def _spoil_width(j, x, y, e):
    return (x[:, :, :6], y) if j == 1 else (x, y)


def _spoil_layers(j, x, y, e):
    return (x, y[:, :1]) if j == 1 else (x, y)


def _spoil_rows(j, x, y, e):
    return (x, y[:-3]) if j == 1 else (x, y)


def _spoil_count(j, x, y, e):
    if j == 1:
        e["n_tokens"] += 5
    return x, y


@pytest.mark.parametrize("bad, message", [
    (_spoil_width, "tensor x has shape [48, 2, 6]"),
    (_spoil_layers, "tensor y has shape [48, 1, 8]"),
    (_spoil_rows, "holds 48 rows of x and 45 of y"),
    (_spoil_count, "the manifest says 53"),
])
@pytest.mark.parametrize("fmt", ["safetensors", "npy"])
def test_shards_are_checked_against_the_manifest_at_start(bad, message, fmt, tmp_path, capsys):
    shards = _shards(tmp_path / "sh", [48, 48, 48], bad=bad, fmt=fmt)
    assert main(TINY + ["--data.source", "shards", "--data.path", str(shards), "--out_dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    name = "shard_00001.safetensors" if fmt == "safetensors" else "_00001.npy"
    assert err.startswith("error: data.path: shard") and name in err and message in err, err
    assert not (tmp_path / "o" / "metrics.jsonl").exists()


@pytest.mark.parametrize("fmt, name, unreadable", [("safetensors", "shard_00002.safetensors", "safetensors"),
                                                   ("npy", "y_00002.npy", ".npy")])
def test_truncated_and_tampered_shards(fmt, name, unreadable, tmp_path, capsys):
    shards = _shards(tmp_path / "sh", [48, 48, 48], fmt=fmt)
    args = TINY + ["--data.source", "shards", "--data.path", str(shards), "--out_dir", str(tmp_path / "o")]
    f = shards / name
    good = f.read_bytes()
    f.write_bytes(good[:-64])
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "data.path" in err and name in err and f"not a readable {unreadable} file" in err, err
    tampered = bytearray(good)
    tampered[-8] ^= 0x40  # one float of y changed: a header-valid file
    f.write_bytes(bytes(tampered))
    assert main(args + ["--data.verify", "true"]) == 2
    err = capsys.readouterr().err
    assert "data.verify" in err and name in err and "SHA-256" in err, err
    assert not (tmp_path / "o" / "metrics.jsonl").exists()
    assert main(args) == 0  # not verified unless asked (it reads all the data)


@pytest.mark.parametrize("edit, message", [
    (lambda m: m["shards"].__setitem__(1, "shard_00001.safetensors"), "manifest entry 1 .* is not an object naming"),
    (lambda m: m["shards"][2].pop("file"), "manifest entry 2 .* is not an object naming"),
    (lambda m: m["shards"][0].pop("y"), "manifest entry 0 .* is not an object naming"),
    (lambda m: m.pop("d_in"), "records d_in None; expected an integer"),
    (lambda m: m.__setitem__("shards", {}), "is not a fastclt activations manifest with shards"),
])
def test_malformed_manifest_is_a_clear_error(edit, message, tmp_path, capsys):
    fmt = "npy" if "entry 0" in message else "safetensors"
    shards = _shards(tmp_path / "sh", [48, 48, 48], fmt=fmt)
    m = json.loads((shards / "manifest.json").read_text())
    edit(m)
    (shards / "manifest.json").write_text(json.dumps(m))
    assert main(TINY + ["--data.source", "shards", "--data.path", str(shards), "--out_dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: data.path: ") and re.search(message, err), err


def test_model_section_is_the_union_of_the_model_configs():
    """The model section has every CLTConfig / SAEConfig / MOLTConfig field (but those the trainer
    records), and its defaults are theirs except the trainer's small default model and the kind-specific fields (null:
    the kind's default)."""
    import dataclasses

    from fastclt.config import CONFIG_KINDS
    from fastclt.training.config import RECORDED_MODEL_FIELDS, ModelSection
    section = {f.name: f.default for f in dataclasses.fields(ModelSection)}
    union = {}
    for cls in CONFIG_KINDS.values():
        for f in dataclasses.fields(cls):
            union.setdefault(f.name, set()).add(f.default)
    assert set(section) == {"kind"} | set(union) - set(RECORDED_MODEL_FIELDS)
    trainer_defaults = {"d_in": 32, "n_features": 128, "activation": "batchtopk", "k": 4}
    for name, default in section.items():
        if name in trainer_defaults:
            assert default == trainer_defaults[name], name
        elif name != "kind" and len(union[name]) == 1 and all(name in {f.name for f in dataclasses.fields(c)}
                                                             for c in CONFIG_KINDS.values()):
            assert {default} == union[name], name  # shared and alike in both: the same default
        elif name != "kind":
            assert default is None, name  # one kind's field: null = that kind's default
    clt = ModelSection().resolved()
    assert clt["n_layers"] == 4 and clt["d_out"] == 32 and clt["decoder_tying"] == "none" and clt["b_dec_init"] is None
    sae = ModelSection(kind="sae", n_layers=1).resolved()
    assert sae["n_layers"] is None and sae["unit_norm_decoder"] is True and sae["b_dec_init"] == "geometric_median"
    molt = ModelSection(kind="molt").resolved()
    assert molt["n_layers"] == 4 and molt["output_bias"] is True and molt["rank_counts"] is None  # the default mix
    mc = ModelSection(kind="molt").config_class()(**ModelSection(kind="molt").config_kwargs())
    assert sum(n for n, _ in mc.rank_groups) == 128
    assert molt["matryoshka_prefixes"] is None and molt["decoder_tying"] is None


def test_init_fire_rate_options():
    """model.init_fire_rate: null takes the kind's default (0.01; a MOLT 0.02), 0 keeps b_enc = 0;
    train.init_fire_rate overrides it for ReLU and JumpReLU models."""
    from fastclt.training.config import ModelSection
    assert ModelSection(activation="relu").resolved()["init_fire_rate"] == 0.01
    assert ModelSection(kind="molt", activation="jumprelu").resolved()["init_fire_rate"] == 0.02
    assert ModelSection(activation="jumprelu", init_fire_rate=0).resolved()["init_fire_rate"] is None
    assert ModelSection(activation="jumprelu", init_fire_rate=0.05).resolved()["init_fire_rate"] == 0.05
    for act in ("relu", "jumprelu"):
        cfg = load_config(TINY + ["--model.activation", act, "--train.init_fire_rate", "0.2"])
        assert cfg.train.init_fire_rate == 0.2
