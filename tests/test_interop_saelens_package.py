"""SAELens checkpoints written by SAELens itself load into fastclt and compute what SAELens computes.

SAELens (the ``sae-lens`` package, an optional test extra installed by tools/bootstrap.py) builds
each inference architecture from its own config class; every parameter is drawn at random (the
thresholds partly negative, the biases non-zero), ``SAE.save_model`` writes the folder, and
``fastclt.load`` must give a model whose output equals SAELens's own forward on the same input, in
float64 and float32. Reloading with SAELens's ``SAE.load_from_disk`` checks the folder is the one
SAELens reads back. Skips when SAE Lens is absent.
"""
import pytest
import torch

import fastclt
from _util import assert_close

sae_lens = pytest.importorskip("sae_lens", reason="sae-lens (optional test extra) is not installed")

D_IN, D_OUT, F, K = 12, 9, 40, 5
# SAELens architecture → (its config class, its SAE class, extra config fields); SAELens refuses b_dec
# subtracted from a transcoder's input
TC = {"d_out": D_OUT, "apply_b_dec_to_input": False}
ARCHS = {
    "standard": ("StandardSAEConfig", "StandardSAE", {}),
    "jumprelu": ("JumpReLUSAEConfig", "JumpReLUSAE", {}),
    "topk": ("TopKSAEConfig", "TopKSAE", {"k": K}),
    "transcoder": ("TranscoderConfig", "Transcoder", TC),
    "skip_transcoder": ("SkipTranscoderConfig", "SkipTranscoder", TC),
    "jumprelu_transcoder": ("JumpReLUTranscoderConfig", "JumpReLUTranscoder", TC),
    "jumprelu_skip_transcoder": ("JumpReLUSkipTranscoderConfig", "JumpReLUSkipTranscoder", TC),
}


def _saelens_model(arch: str, dtype: str, gen: torch.Generator, **cfg_kw):
    cfg_name, cls_name, extra = ARCHS[arch]
    cfg = getattr(sae_lens, cfg_name)(d_in=D_IN, d_sae=F, dtype=dtype, device="cpu", **extra, **cfg_kw)
    cfg.metadata.model_name = "gpt2"
    cfg.metadata.hook_name = "blocks.2.hook_mlp_in"
    sae = getattr(sae_lens, cls_name)(cfg)
    with torch.no_grad():
        for name, p in sae.named_parameters():
            r = torch.randn(p.shape, generator=gen, dtype=torch.float64) * 0.5
            if name == "threshold":  # a quarter of them negative: relu(h)·1[h > θ] then acts as relu
                r = torch.rand(p.shape, generator=gen, dtype=torch.float64) * 0.8 - 0.2
            p.copy_(r.to(p.dtype))
    return sae.eval()


@pytest.mark.parametrize("dtype,tol", [("float64", 1e-12), ("float32", 1e-5)])
@pytest.mark.parametrize("arch", list(ARCHS))
def test_a_folder_saelens_saved_loads_and_matches_its_forward(arch, dtype, tol, gen, tmp_path):
    sae = _saelens_model(arch, dtype, gen)
    sae.save_model(tmp_path / "sae")
    assert fastclt.interop.sniff(tmp_path / "sae") == "saelens"
    model = fastclt.load(tmp_path / "sae")
    transcoder = "transcoder" in arch
    assert isinstance(model, fastclt.CrossLayerTranscoder if transcoder else fastclt.SparseAutoencoder)
    assert model.cfg.lm_name == "gpt2"
    assert model.param_dtype == getattr(torch, dtype)
    x = torch.randn(70, D_IN, generator=gen, dtype=torch.float64).to(getattr(torch, dtype))
    with torch.no_grad():
        want = sae(x)
        got = model(x)
    assert got.shape == want.shape
    assert_close(got, want, tol, f"{arch} {dtype}")
    if arch in ("jumprelu", "topk", "standard"):  # the codes too, not only their decode
        with torch.no_grad():
            codes = model.encode(x)
            acts = codes.to_dense() if hasattr(codes, "to_dense") else codes
        assert_close(acts, sae.encode(x), tol, f"{arch} {dtype} codes")
    # SAELens reads the same folder back (the folder is SAELens's, not fastclt's reading of it)
    again = sae_lens.SAE.load_from_disk(tmp_path / "sae")
    with torch.no_grad():
        assert torch.equal(again(x), want)


def test_saelens_sae_without_input_bias_loads_as_a_plt(gen, tmp_path):
    sae = _saelens_model("jumprelu", "float64", gen, apply_b_dec_to_input=False)
    sae.save_model(tmp_path / "sae")
    model = fastclt.load(tmp_path / "sae", format="saelens")
    assert isinstance(model, fastclt.CrossLayerTranscoder) and model.cfg.n_layers == 1
    x = torch.randn(40, D_IN, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        assert_close(model(x), sae(x), 1e-12)


def test_saelens_refusals_of_what_fastclt_cannot_represent(gen, tmp_path):
    """A TopK that rescales by decoder norms and run-time input normalisation are refused with the
    field named, as SAELens wrote them."""
    from fastclt.interop import NotRepresentableError
    sae = _saelens_model("topk", "float32", gen, rescale_acts_by_decoder_norm=True)
    sae.save_model(tmp_path / "rescale")
    with pytest.raises(NotRepresentableError, match="rescale_acts_by_decoder_norm"):
        fastclt.load(tmp_path / "rescale")
    sae = _saelens_model("standard", "float32", gen, normalize_activations="layer_norm")
    sae.save_model(tmp_path / "norm")
    with pytest.raises(NotRepresentableError, match="normalize_activations"):
        fastclt.load(tmp_path / "norm")
