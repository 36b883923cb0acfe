"""Hostile and broken checkpoint folders: clear errors naming the file and the field or tensor, never
code execution (YAML tags, pickles), never reads outside the folder, never a huge allocation."""
import json
import os
import pickle
import struct

import pytest
import torch
from safetensors.torch import save_file

import fastclt
from fastclt.checkpoint import CheckpointError
from fastclt.export import to_circuit_tracer
from fastclt.interop import NotRepresentableError, sniff
from _interop import random_transcoder


class _Boom:
    """Unpickling this creates the file ``path`` (what a malicious pickle would do)."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def _sparsify_folder(folder, cfg=None, tensors=None):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "cfg.json").write_text(json.dumps(cfg or {"d_in": 4, "num_latents": 6, "k": 2, "activation": "topk",
                                                        "transcode": False, "skip_connection": False}))
    t = tensors or {"encoder.weight": torch.randn(6, 4), "encoder.bias": torch.randn(6), "W_dec": torch.randn(6, 4),
                    "b_dec": torch.randn(4)}
    save_file(t, str(folder / "sae.safetensors"))
    return folder


@pytest.fixture
def ct_set(gen, tmp_path):
    model, _ = random_transcoder(gen, L=2, cross_layer=False, dtype="float32")
    return to_circuit_tracer(model, tmp_path / "ct")


@pytest.fixture
def ct_clt(gen, tmp_path):
    model, _ = random_transcoder(gen, L=3, dtype="float32")
    return to_circuit_tracer(model, tmp_path / "clt")


def test_wrong_shapes_dtypes_missing_and_extra_tensors(tmp_path, ct_clt):
    t = {"encoder.weight": torch.randn(6, 4), "encoder.bias": torch.randn(6), "W_dec": torch.randn(6, 5),
         "b_dec": torch.randn(4)}
    with pytest.raises(CheckpointError, match=r"sae.safetensors.*'W_dec' has shape \[6, 5\], expected \[6, 4\]"):
        fastclt.load(_sparsify_folder(tmp_path / "shape", tensors=t))
    t.update(W_dec=torch.randn(6, 4), b_dec=torch.arange(4, dtype=torch.int32))
    with pytest.raises(CheckpointError, match="'b_dec' has dtype I32; expected a float dtype"):
        fastclt.load(_sparsify_folder(tmp_path / "dtype", tensors=t))
    del t["b_dec"]
    with pytest.raises(CheckpointError, match="'b_dec' is missing"):
        fastclt.load(_sparsify_folder(tmp_path / "missing", tensors=t))
    t.update(b_dec=torch.randn(4), extra=torch.randn(2))
    with pytest.raises(NotRepresentableError, match=r"unexpected tensor\(s\) \['extra'\]"):
        fastclt.load(_sparsify_folder(tmp_path / "extra", tensors=t))
    save_file({"W_dec_1": torch.randn(24, 3, 8)}, str(ct_clt / "W_dec_1.safetensors"))
    with pytest.raises(CheckpointError, match=r"W_dec_1.*shape \[24, 3, 8\], expected \[24, 2, 8\]"):
        fastclt.load(ct_clt)
    (ct_clt / "W_dec_1.safetensors").unlink()
    with pytest.raises(CheckpointError, match="W_dec_1.safetensors does not exist"):
        fastclt.load(ct_clt)


def test_config_fields_are_type_checked(tmp_path):
    for bad, msg in (({"d_in": "4"}, "'d_in' is '4', expected int"), ({"d_in": True}, "'d_in' is True"),
                     ({"d_in": -4}, "'d_in' has an invalid value -4"), ({"k": 99}, "'k' has an invalid value 99")):
        cfg = {"d_in": 4, "num_latents": 6, "k": 2, **bad}
        with pytest.raises(CheckpointError, match=msg):
            fastclt.load(_sparsify_folder(tmp_path / str(len(list(tmp_path.iterdir()))), cfg=cfg))


def test_config_claiming_huge_sizes_allocates_nothing(tmp_path):
    """Sizes come from the config but are checked against the tensors' headers before any model exists."""
    folder = _sparsify_folder(tmp_path / "huge", cfg={"d_in": 4, "num_latents": 1 << 40, "k": 2})
    with pytest.raises(CheckpointError, match=r"expected \[1099511627776, 4\]"):
        fastclt.load(folder)


@pytest.mark.parametrize("text,msg", [
    ("{not json", "not valid JSON"), ("[1, 2]", "holds a list, expected a mapping"), ("\xff\xfe", "not UTF-8"),
])
def test_non_json_configs(text, msg, tmp_path):
    folder = _sparsify_folder(tmp_path / "hp")
    (folder / "cfg.json").write_bytes(text.encode("latin-1"))
    with pytest.raises(CheckpointError, match=msg):
        fastclt.load(folder, format="sparsify")


def test_yaml_tags_are_never_executed(ct_set, tmp_path):
    marker = tmp_path / "pwned"
    (ct_set / "config.yaml").write_text(f"!!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(CheckpointError, match="not valid YAML for the safe loader"):
        fastclt.load(ct_set)
    (ct_set / "config.yaml").write_text(f"model_kind: !!python/object/apply:builtins.open ['{marker}', 'w']\n")
    with pytest.raises(CheckpointError, match="not valid YAML"):
        fastclt.load(ct_set)
    assert not marker.exists()
    (ct_set / "config.yaml").write_text("model_kind: [unclosed\n")
    with pytest.raises(CheckpointError, match="not valid YAML"):
        fastclt.load(ct_set)
    (ct_set / "config.yaml").write_text("- just\n- a list\n")
    with pytest.raises(CheckpointError, match="holds a list"):
        fastclt.load(ct_set)
    (ct_set / "config.yaml").write_text("model_kind: sparse_crosscoder\nfeature_input_hook: mlp.hook_in\n")
    with pytest.raises(NotRepresentableError, match="model_kind 'sparse_crosscoder'"):
        fastclt.load(ct_set)


def test_pickles_are_never_loaded(tmp_path):
    marker = tmp_path / "pwned"
    folder = _sparsify_folder(tmp_path / "hp")
    (folder / "sae.safetensors").write_bytes(pickle.dumps(_Boom(str(marker))))
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        fastclt.load(folder)
    assert not marker.exists()


def test_corrupt_safetensors(tmp_path):
    folder = _sparsify_folder(tmp_path / "hp")
    path = folder / "sae.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 10])  # truncated
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        fastclt.load(folder)
    path.write_bytes(struct.pack("<Q", 1 << 62) + b"{}")  # a header claiming 4 EiB
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        fastclt.load(folder)
    header = json.dumps({"b_dec": {"dtype": "F32", "shape": [1 << 30], "data_offsets": [0, 4 << 30]}}).encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 16)  # claims 4 GiB of data in 16 bytes
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        fastclt.load(folder)


def test_oversized_config(tmp_path):
    folder = _sparsify_folder(tmp_path / "hp")
    with open(folder / "cfg.json", "wb") as f:
        f.truncate(17 << 20)
    with pytest.raises(CheckpointError, match="a config file is expected to be under"):
        fastclt.load(folder)


@pytest.mark.parametrize("entry", ["../outside.safetensors", "/etc/passwd", "hf://org/repo/layer_0.safetensors",
                                   "~/layer_0.safetensors", "link/layer_0.safetensors", 7])
def test_paths_outside_the_folder(entry, ct_set, tmp_path):
    (tmp_path / "outside.safetensors").write_bytes((ct_set / "layer_0.safetensors").read_bytes())
    os.symlink(tmp_path, ct_set / "link")  # a link inside the folder that leads out of it
    (ct_set / "config.yaml").write_text(json.dumps({"model_kind": "transcoder_set", "feature_input_hook": "mlp.hook_in",
                                                    "feature_output_hook": "mlp.hook_out",
                                                    "transcoders": ["layer_0.safetensors", entry]}))
    with pytest.raises(CheckpointError, match=r"transcoders\[1\]"):
        fastclt.load(ct_set)


def test_listed_layer_files_inside_the_folder_are_read(ct_set, gen):
    (ct_set / "sub").mkdir()
    os.replace(ct_set / "layer_1.safetensors", ct_set / "sub" / "second.safetensors")
    (ct_set / "config.yaml").write_text(json.dumps({"model_kind": "transcoder_set", "feature_input_hook": "mlp.hook_in",
                                                    "feature_output_hook": "mlp.hook_out",
                                                    "transcoders": ["layer_0.safetensors", "sub/second.safetensors"]}))
    assert fastclt.load(ct_set).cfg.n_layers == 2


def test_circuit_tracer_layer_numbering_and_thresholds(ct_clt):
    os.replace(ct_clt / "W_enc_1.safetensors", ct_clt / "W_enc_7.safetensors")
    with pytest.raises(CheckpointError, match=r"numbered \[0, 2, 7\]"):
        fastclt.load(ct_clt)
    os.replace(ct_clt / "W_enc_7.safetensors", ct_clt / "W_enc_1.safetensors")
    from safetensors.torch import load_file
    t = load_file(ct_clt / "W_enc_2.safetensors")
    for value, msg in ((-0.5, "negative or non-finite"), (float("nan"), "negative or non-finite")):
        t["threshold_2"][3] = value
        save_file(t, str(ct_clt / "W_enc_2.safetensors"))
        with pytest.raises(NotRepresentableError, match=f"threshold_2 holds {msg}"):
            fastclt.load(ct_clt)


def test_unknown_formats_and_paths(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        fastclt.load(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="not recognised"):
        fastclt.load(tmp_path / "empty")
    (tmp_path / "w.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match="is a file"):
        sniff(tmp_path / "w.safetensors")
    with pytest.raises(ValueError, match="format: expected 'auto' or one of"):
        fastclt.load(tmp_path / "empty", format="pickle")
    with pytest.raises(CheckpointError, match="cfg.json does not exist"):
        fastclt.load(tmp_path / "empty", format="saelens")


def test_fastclt_folders_are_verified(gen, tmp_path):
    """fastclt's own folders (also a training run's out_dir, via model/) keep their SHA-256 check."""
    model, x = random_transcoder(gen, L=2)
    model.save_pretrained(tmp_path / "run" / "model")
    assert torch.equal(fastclt.load(tmp_path / "run")(x), model(x))
    path = tmp_path / "run" / "model" / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupt"):
        fastclt.load(tmp_path / "run")
