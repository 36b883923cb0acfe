"""Bad input gets a clear ValueError/TypeError naming the argument and what was expected."""
import pytest
import torch

import fastclt
from fastclt import ops


def clt(**kw):
    base = dict(n_layers=3, d_in=10, d_out=7, n_features=24, activation="topk", k=3)
    base.update(kw)
    return fastclt.CrossLayerTranscoder(fastclt.CLTConfig(**base))


@pytest.mark.parametrize("kw,exc,pattern", [
    (dict(k=25), ValueError, r"k: expected 1 <= k <= n_features=24"),
    (dict(k=0), ValueError, r"k: expected an int >= 1"),
    (dict(k=2.5), TypeError, r"k: expected an int"),
    (dict(activation="gelu"), ValueError, r"activation: expected one of"),
    (dict(decoder_tying="shared"), ValueError, r"decoder_tying: expected one of"),
    (dict(normalization="zscore"), ValueError, r"normalization: expected one of"),
    (dict(n_layers=0), ValueError, r"n_layers"),
    (dict(d_in=-3), ValueError, r"d_in"),
    (dict(jumprelu_bandwidth=0.0), ValueError, r"jumprelu_bandwidth"),
    (dict(sparsity_coef=float("nan")), ValueError, r"sparsity_coef"),
    (dict(k_aux=100), ValueError, r"k_aux"),
    (dict(nonfinite="drop"), ValueError, r"nonfinite"),
    (dict(feature_affine=True), ValueError, r"feature_affine: only tied"),
    (dict(batchtopk_across_layers=True), ValueError, r"batchtopk_across_layers: needs activation 'batchtopk'"),
    (dict(dtype="float16"), ValueError, r"dtype"),
])
def test_bad_config(kw, exc, pattern):
    base = dict(n_layers=3, d_in=10, d_out=7, n_features=24, activation="topk", k=3)
    base.update(kw)
    with pytest.raises(exc, match=pattern):
        fastclt.CLTConfig(**base)


def test_bad_config_dict():
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['n_feature'\]"):
        fastclt.CLTConfig.from_dict({"n_feature": 3})
    with pytest.raises(TypeError, match="config: expected a JSON object"):
        fastclt.SAEConfig.from_dict([1, 2])
    with pytest.raises(TypeError, match="cfg: expected a CLTConfig"):
        fastclt.CrossLayerTranscoder(fastclt.SAEConfig(d_in=4, n_features=8, k=2))


def test_wrong_rank_and_width():
    model = clt()
    with pytest.raises(ValueError, match=r"x: expected shape \[B, 3, 10\], got \(4, 10\)"):
        model.encode(torch.randn(4, 10))
    with pytest.raises(ValueError, match=r"x: expected shape \[B, 3, 10\], got \(4, 3, 11\)"):
        model(torch.randn(4, 3, 11))
    with pytest.raises(ValueError, match=r"y: expected shape \[B, 3, 7\], got \(4, 3, 10\)"):
        model.loss(torch.randn(4, 3, 10), torch.randn(4, 3, 10))
    with pytest.raises(ValueError, match=r"y: expected 4 tokens like x, got 5"):
        model.loss(torch.randn(4, 3, 10), torch.randn(5, 3, 7))
    with pytest.raises(TypeError, match=r"x: expected a torch.Tensor"):
        model(torch.randn(4, 3, 10).numpy())
    with pytest.raises(TypeError, match=r"x: expected a floating-point tensor"):
        model(torch.ones(4, 3, 10, dtype=torch.int64))
    sae = fastclt.SparseAutoencoder(fastclt.SAEConfig(d_in=6, n_features=12, k=2))
    with pytest.raises(ValueError, match=r"x: expected shape \[B, 6\], got \(4, 7\)"):
        sae(torch.randn(4, 7))
    with pytest.raises(ValueError, match=r"x: expected shape \[B, 6\], got \(2, 4, 6\)"):
        sae(torch.randn(2, 4, 6))


def test_dtype_and_device_mismatch():
    model = clt()
    with pytest.raises(TypeError, match=r"x: dtype torch.float64 does not match the model's torch.float32"):
        model(torch.randn(4, 3, 10, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"x: is on meta but the model's weights are on cpu"):
        model(torch.empty(4, 3, 10, device="meta"))
    with pytest.raises(ValueError, match=r"W_dec: on meta, but codes are on cpu"):
        ops.sparse_decode(fastclt.SparseCodes.from_dense(torch.eye(3)), torch.empty(3, 4, device="meta"))


def test_nonfinite_inputs_error_or_skip():
    model = clt()
    x, y = torch.randn(6, 3, 10), torch.randn(6, 3, 7)
    x[2, 1, 3] = float("nan")
    y[4, 0, 0] = float("inf")
    with pytest.raises(ValueError, match=r"x: 1 token\(s\) contain NaN or Inf"):
        model.loss(x, y)
    with pytest.raises(ValueError, match=r"x: 1 token\(s\) contain NaN or Inf"):
        model.encode(x)
    skipping = clt(nonfinite="skip")
    out = skipping.loss(x, y)
    assert out.metrics["skipped_tokens"] == 2 and out.n_tokens == 4
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert torch.isfinite(skipping.W_enc.grad).all()


def test_bad_dead_mask():
    model = clt()
    x, y = torch.randn(4, 3, 10), torch.randn(4, 3, 7)
    with pytest.raises(TypeError, match="dead_mask: expected a bool tensor"):
        model.loss(x, y, dead_mask=torch.zeros(3, 24))
    with pytest.raises(ValueError, match=r"dead_mask: expected \[3, 24\]"):
        model.loss(x, y, dead_mask=torch.zeros(3, 23, dtype=torch.bool))


def test_bad_op_arguments():
    h = torch.randn(4, 9)
    with pytest.raises(ValueError, match=r"k: expected 1 <= k <= n_features=9, got 10"):
        ops.topk(h, 10)
    with pytest.raises(ValueError, match=r"k: expected 1 <= k <= n_features=9, got 0"):
        ops.batch_topk(h, 0)
    with pytest.raises(TypeError, match=r"h: expected a floating-point tensor"):
        ops.topk(torch.ones(4, 9, dtype=torch.int32), 2)
    with pytest.raises(ValueError, match=r"h: expected \[B, F\]"):
        ops.topk(torch.randn(9), 2)
    with pytest.raises(ValueError, match=r"h: expected \[L, B, F\]"):
        ops.batch_topk_layers(h, 2)
    with pytest.raises(ValueError, match=r"impl: expected one of"):
        ops.topk(h, 2, impl="fast")
    with pytest.raises(ValueError, match=r"activation: expected one of"):
        ops.encode(torch.randn(3, 5), torch.randn(9, 5), None, activation="gelu", impl="reference")
    with pytest.raises(ValueError, match=r"W_enc: expected \[F, d_in=5\]"):
        ops.encode(torch.randn(3, 5), torch.randn(9, 6), None, activation="relu", impl="reference")
    with pytest.raises(ValueError, match=r"threshold: expected \[9\] for 'jumprelu'"):
        ops.encode(torch.randn(3, 5), torch.randn(9, 5), None, activation="jumprelu", impl="reference")
    codes = fastclt.SparseCodes.from_dense(torch.relu(h))
    with pytest.raises(ValueError, match=r"W_dec: codes have n_features=9 but W_dec has 8 rows"):
        ops.sparse_decode(codes, torch.randn(8, 3))
    with pytest.raises(ValueError, match=r"tying: expected one of"):
        ops.clt_decode([codes], [torch.randn(9, 1, 3)], "tied")
    with pytest.raises(ValueError, match=r"bandwidth"):
        ops.jumprelu(h, torch.zeros(9), 0.0, impl="reference")


def test_env_impl_override(monkeypatch):
    monkeypatch.setenv("FASTCLT_IMPL", "bogus")
    with pytest.raises(ValueError, match="FASTCLT_IMPL"):
        ops.topk(torch.randn(3, 5), 2)
    monkeypatch.setenv("FASTCLT_IMPL", "reference")
    assert ops.topk(torch.randn(3, 5), 2).nnz == 6
