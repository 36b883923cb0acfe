"""CLT decoder norms (the sparsity / pre-activation loss weights): values and gradients against
float64 for every tying, and their memory: one fused fp32-accumulating reduction per decoder, with no
fp32 copy or square of the decoder forward or backward (tests/_alloc.py counts the bytes)."""
import pytest
import torch

import fastclt
from _alloc import AllocationTracker
from _util import assert_close

TYINGS = [("none", False), ("per_source", False), ("per_target", False), ("per_source", True), ("per_target", True)]


def _model(tying, affine, dtype, device, F=300, d=40, L=3):
    torch.manual_seed(0)
    cfg = fastclt.CLTConfig(n_layers=L, d_in=d, d_out=d, n_features=F, activation="relu", decoder_tying=tying,
                            feature_affine=affine, dtype=dtype)
    model = fastclt.CrossLayerTranscoder(cfg).to(device)
    with torch.no_grad():
        for p in model._decoder_params():
            p.normal_()
            p[: F // 10].zero_()  # a zero row: norm 0, gradient 0 (not NaN)
        if affine:
            model.feature_scale.uniform_(0.5, 2.0)
    return model


def _float64_norms(model):
    """The concatenated norm from its definition: ‖(W^{s→t}[i]·scale_t[i])_{t≥s}‖ (fp64 model)."""
    rows = []
    for s in range(model.n_layers):
        W = model.decoder_weight(s)  # [F, L − s, d]
        if model.cfg.feature_affine:
            W = W * model.feature_scale[s:].T[:, :, None]
        rows.append(torch.linalg.vector_norm(W, dim=(1, 2)))
    return torch.stack(rows)


@pytest.mark.parametrize("tying,affine", TYINGS)
def test_decoder_norms_match_float64(tying, affine, device):
    model = _model(tying, affine, "float32", device)
    g = torch.randn(model.n_layers, model.cfg.n_features, dtype=torch.float64)
    norms = model.decoder_norms()
    assert norms.dtype == torch.float32 and norms.shape == g.shape
    (norms.double() * g.to(device)).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    ref = model.double()
    (_float64_norms(ref) * g.to(device)).sum().backward()
    assert_close(norms, _float64_norms(ref), 1e-6, "norms")
    for n, p in ref.named_parameters():
        if p.grad is not None:
            assert torch.isfinite(grads[n]).all(), n
            assert_close(grads[n], p.grad, 1e-5, f"d{n}")


@pytest.mark.parametrize("tying,affine", TYINGS)
def test_decoder_norms_allocate_no_decoder_sized_temporaries(tying, affine, device):
    """Forward: nothing near the decoder's size. Backward: the decoder gradients and small tensors
    only (before: an fp32 copy, its square and fp32 gradients of the full decoder)."""
    dtypes = ["float32"] + (["bfloat16"] if device.type == "cuda" else [])  # CPU reductions widen bf16 first
    for dtype in dtypes:
        model = _model(tying, affine, dtype, device, F=2048, d=64, L=3)
        decoders = model._decoder_params()
        smallest = min(p.numel() * p.element_size() for p in decoders)
        total = sum(p.numel() * p.element_size() for p in decoders)
        with AllocationTracker() as fwd:
            norms = model.decoder_norms()
        assert fwd.largest < smallest // 8, (dtype, fwd.log)
        loss = norms.sum()
        with AllocationTracker() as bwd:
            loss.backward()
        assert bwd.peak <= total + smallest // 8, (dtype, bwd.peak, total, bwd.log)
