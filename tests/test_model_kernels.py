"""The models' default (kernel) path trains like the pure-PyTorch reference: the same loss and every
parameter gradient, model by model. (Which implementation ``impl="auto"`` takes:
tests/ops/test_registry.py.)

On the CPU the default path is the C++ extension (dense GEMM + exact select + sparse backward);
on a GPU it is the Triton kernels (fused encode, sparse decode, fused AuxK)."""
import pytest
import torch

import fastclt
from _util import assert_close
from fastclt import _ext

KERNELS = {"cpu": "cpu", "cuda": "triton"}


def kernels_here(device) -> bool:
    return _ext.has_cpu_ext() if device.type == "cpu" else True


CASES = {
    "sae-topk": lambda: fastclt.SparseAutoencoder(fastclt.SAEConfig(d_in=24, n_features=53, activation="topk", k=5)),
    "sae-jumprelu": lambda: fastclt.SparseAutoencoder(fastclt.SAEConfig(
        d_in=24, n_features=53, activation="jumprelu", threshold_init=0.05, jumprelu_bandwidth=0.2, preact_coef=0.0)),
    "clt-batchtopk-none": lambda: fastclt.CrossLayerTranscoder(fastclt.CLTConfig(
        n_layers=3, d_in=20, d_out=22, n_features=41, activation="batchtopk", k=4, decoder_tying="none")),
    "clt-batchtopk-across-per_target": lambda: fastclt.CrossLayerTranscoder(fastclt.CLTConfig(
        n_layers=3, d_in=20, d_out=22, n_features=41, activation="batchtopk", k=4, decoder_tying="per_target",
        batchtopk_across_layers=True)),
    "clt-jumprelu-per_source-affine": lambda: fastclt.CrossLayerTranscoder(fastclt.CLTConfig(
        n_layers=3, d_in=20, d_out=22, n_features=41, activation="jumprelu", decoder_tying="per_source",
        feature_affine=True, skip_connection=True, threshold_init=0.05, jumprelu_bandwidth=0.2)),
    "plt-relu": lambda: fastclt.CrossLayerTranscoder(fastclt.CLTConfig(
        n_layers=1, d_in=20, d_out=22, n_features=41, activation="relu")),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_model_default_path_equals_reference(case, device, monkeypatch):
    """A forward + backward of ``model.loss`` (AuxK included for TopK/BatchTopK) gives the
    reference's loss and parameter gradients (fp32)."""
    monkeypatch.delenv("FASTCLT_IMPL", raising=False)
    if not kernels_here(device):
        pytest.skip(_ext.missing_message("cpu"))
    torch.manual_seed(0)
    model = CASES[case]().to(device)
    with torch.no_grad():  # decoders that are not small, so every term has a visible gradient
        for name, p in model.named_parameters():
            if name.startswith("W_dec") or name == "W_skip":
                p.normal_(0, 0.2)
    sae = isinstance(model, fastclt.SparseAutoencoder)
    L = 1 if sae else model.cfg.n_layers
    B = 29
    g = torch.Generator().manual_seed(1)
    x = torch.randn(B, 24 if sae else L, *(() if sae else (20,)), generator=g).to(device)
    y = None if sae else torch.randn(B, L, 22, generator=g).to(device)
    F = model.cfg.n_features
    dead = None
    if model.cfg.activation in ("topk", "batchtopk"):
        dead = (torch.arange(F) % 3 == 0).to(device)
        dead = dead if sae else dead.expand(L, F).clone()
    results = {}
    for impl in ("reference", "auto"):
        model.impl = impl
        model.zero_grad(set_to_none=True)
        out = model.loss(x, y, dead_mask=dead)
        out.loss.backward()
        results[impl] = (out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    model.impl = "auto"
    (ro, rg), (ko, kg) = results["reference"], results["auto"]
    assert_close(ko.loss, ro.loss, 1e-5, "loss")
    if dead is not None:
        assert_close(ko.parts["auxk"], ro.parts["auxk"], 1e-5, "auxk")
    assert set(kg) == set(rg)
    for n in rg:
        assert kg[n].abs().sum() > 0 or rg[n].abs().sum() == 0, f"{n}: no gradient on the kernel path"
        assert_close(kg[n], rg[n], 1e-4, f"d{n}")
