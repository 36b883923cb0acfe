"""The trainer with the dictionary variants: model.kind molt and a Matryoshka CLT train through
the command line, load back with their fields, and refuse what they cannot do (tensor
parallelism, a field of another kind, prefix ends that do not reach n_features)."""
import pytest

import fastclt


def test_trainer_runs_model_kind_molt(tmp_path):
    from fastclt.train import main
    from fastclt.training.config import ConfigError, load_config

    out = tmp_path / "run"
    common = ["--model.kind", "molt", "--model.d_in", "16", "--model.d_out", "16", "--model.n_layers", "2",
              "--model.n_features", "12", "--data.n_true", "8", "--train.batch_size", "32",
              "--train.init_samples", "64",
              "--log.progress", "false", "--log.plot", "false", "--checkpoint.every", "0"]
    assert main(common + ["--train.steps", "3", "--out_dir", str(out)]) == 0
    m = fastclt.load(out)
    assert isinstance(m, fastclt.MOLT) and m.cfg.n_features == 12
    with pytest.raises(ConfigError, match="train.tp"):
        load_config(common + ["--train.tp", "2"])
    with pytest.raises(ConfigError, match="model.decoder_tying: .* is not an option of a MOLT"):
        load_config(common + ["--model.decoder_tying", "per_source"])


def test_trainer_accepts_matryoshka(tmp_path):
    from fastclt.train import main
    from fastclt.training.config import ConfigError, load_config

    common = ["--model.n_layers", "2", "--model.d_in", "16", "--model.d_out", "16", "--model.n_features", "24",
              "--model.matryoshka_prefixes", "[6, 12, 24]", "--model.matryoshka_weights", "[0.5, 0.25, 0.25]",
              "--train.batch_size", "32", "--train.init_samples", "64", "--data.n_true", "8", "--log.progress", "false",
              "--log.plot", "false", "--checkpoint.every", "0"]
    assert main(common + ["--train.steps", "3", "--out_dir", str(tmp_path / "run")]) == 0
    m = fastclt.load(tmp_path / "run")
    assert m.cfg.matryoshka_prefixes == [6, 12, 24] and m.cfg.matryoshka_weights == [0.5, 0.25, 0.25]
    with pytest.raises(ConfigError, match="train.tp"):
        load_config(common + ["--train.tp", "2"])
    with pytest.raises(ConfigError, match="matryoshka_prefixes"):
        load_config(common + ["--model.matryoshka_prefixes", "[6, 12]"])
