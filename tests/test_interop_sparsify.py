"""eai-sparsify checkpoints load exactly, checked against the real library (an optional test extra;
skipped without it): sparsify's own ``save_to_disk`` → ``fastclt.load`` → the same codes and outputs
as sparsify's forward, for TopK SAEs, transcoders and skip transcoders, float64, float32 and bfloat16
weights; what has no exact form is refused naming the field."""
import json
import os

import pytest
import torch

import fastclt
from fastclt.interop import NotRepresentableError
from _util import assert_close

os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")  # its Triton decode is for GPUs; the eager one runs here
sparsify = pytest.importorskip("sparsify")

D, F, K = 12, 40, 5


def _coder(gen, dtype, **cfg):
    coder = sparsify.SparseCoder(D, sparsify.SparseCoderConfig(k=K, **cfg), dtype=dtype)
    with torch.no_grad():
        for p in coder.parameters():
            p.copy_(torch.randn(p.shape, generator=gen).to(dtype) * 0.4)
    return coder


KINDS = {"sae": dict(num_latents=F), "transcoder": dict(num_latents=F, transcode=True),
         "skip_transcoder": dict(num_latents=F, transcode=True, skip_connection=True),
         "expansion_factor": dict(expansion_factor=3, normalize_decoder=False)}


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-13), (torch.float32, 1e-6)])
@pytest.mark.parametrize("kind", list(KINDS))
def test_sparsify_saved_model_loads_exactly(kind, dtype, tol, gen, tmp_path):
    coder = _coder(gen, dtype, **KINDS[kind])
    coder.save_to_disk(tmp_path / "layers.3.mlp")
    model = fastclt.load(tmp_path / "layers.3.mlp")
    transcoder = kind.endswith("transcoder")
    assert isinstance(model, fastclt.CrossLayerTranscoder if transcoder else fastclt.SparseAutoencoder)
    assert model.param_dtype == dtype and model.cfg.activation == "topk" and model.cfg.k == K
    assert model.cfg.n_features == coder.num_latents
    if transcoder:
        assert model.cfg.n_layers == 1 and model.cfg.skip_connection == (kind == "skip_transcoder")
        assert model.cfg.lm_layers == [3] and model.cfg.input_hook == "mlp_in"  # from the hookpoint's name
    else:
        assert model.cfg.lm_layers is None
    x = torch.randn(64, D, generator=gen).to(dtype)
    with torch.no_grad():
        ref = coder(x)
        out = model(x)  # [B, d] in, [B, d] out, like sparsify's module
        enc = coder.encode(x)
    assert out.shape == ref.sae_out.shape
    assert_close(out, ref.sae_out, tol, "fastclt vs sparsify output")
    codes = model.encode(x)
    codes = codes[0] if isinstance(codes, list) else codes
    dense = torch.zeros(64, coder.num_latents, dtype=dtype).scatter_(1, enc.top_indices, enc.top_acts)
    if dtype == torch.float64:  # the same pre-activations: the same features and values
        assert torch.equal(codes.to_dense(coder.num_latents) > 0, dense > 0)
    assert_close(codes.to_dense(coder.num_latents), dense, tol, "codes")


@pytest.mark.parametrize("kind", list(KINDS))
def test_sparsify_bf16_weights_bit_exact(kind, gen, tmp_path):
    """bfloat16 checkpoints keep their dtype and every weight bit for bit (outputs are not compared in
    bf16: the two libraries round the pre-activations differently, which moves near-ties of TopK)."""
    coder = _coder(gen, torch.bfloat16, **KINDS[kind])
    coder.save_to_disk(tmp_path / "hp")
    model = fastclt.load(tmp_path / "hp")
    assert model.param_dtype == torch.bfloat16
    W_dec = model.W_dec if isinstance(model, fastclt.SparseAutoencoder) else model.decoder_weight(0)[:, 0]
    assert torch.equal(model.W_enc.reshape(coder.encoder.weight.shape), coder.encoder.weight)
    assert torch.equal(model.b_enc.reshape(-1), coder.encoder.bias)
    assert torch.equal(W_dec, coder.W_dec)
    assert torch.equal(model.b_dec.reshape(-1), coder.b_dec)
    if coder.W_skip is not None:
        assert torch.equal(model.W_skip[0], coder.W_skip)


def test_sparsify_refusals(gen, tmp_path):
    coder = _coder(gen, torch.float32, num_latents=F, activation="groupmax")
    coder.save_to_disk(tmp_path / "gm")
    with pytest.raises(NotRepresentableError, match="activation 'groupmax'"):
        fastclt.load(tmp_path / "gm")
    coder = _coder(gen, torch.float32, num_latents=F, skip_connection=True)
    coder.save_to_disk(tmp_path / "sae_skip")
    with pytest.raises(NotRepresentableError, match="skip_connection"):
        fastclt.load(tmp_path / "sae_skip")


def test_sparsify_multi_hookpoint_folder(gen, tmp_path):
    """A run folder with one checkpoint per hookpoint: pass one of them (the error lists them)."""
    for hp in ("layers.0.mlp", "layers.1.mlp"):
        _coder(gen, torch.float32, num_latents=F).save_to_disk(tmp_path / "run" / hp)
    with pytest.raises(ValueError, match="layers.0.mlp, layers.1.mlp"):
        fastclt.load(tmp_path / "run")
    assert fastclt.load(tmp_path / "run" / "layers.1.mlp", format="sparsify").cfg.n_features == F


def test_sparsify_config_mismatch(gen, tmp_path):
    """cfg.json sizes that do not match the tensors are an error naming the tensor, before any allocation."""
    _coder(gen, torch.float32, num_latents=F).save_to_disk(tmp_path / "hp")
    cfg = json.loads((tmp_path / "hp" / "cfg.json").read_text())
    cfg["num_latents"] = 10 ** 9
    (tmp_path / "hp" / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"encoder.weight.*shape \[40, 12\], expected \[1000000000, 12\]"):
        fastclt.load(tmp_path / "hp")
