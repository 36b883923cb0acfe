"""Bad input gets a clear ValueError/TypeError naming the argument and what was expected."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fastclt
from fastclt import ops
from fastclt.checkpoint import CheckpointError


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


def test_nonfinite_check_overflow_and_cancelling_infinities():
    """Finite inputs whose sums overflow fp32 are neither refused nor skipped (the exact row check clears
    them; the loss itself may overflow); +Inf in x and -Inf in y (sums that would cancel into NaN) are
    each found, in the tensor that holds it."""
    model = clt()
    x, y = torch.full((4, 3, 10), 3e38), torch.full((4, 3, 7), 3e38)
    model.loss(x, y)  # no ValueError
    assert clt(nonfinite="skip").loss(x, y).metrics["skipped_tokens"] == 0
    x, y = torch.randn(6, 3, 10), torch.randn(6, 3, 7)
    x[1, 0, 0], y[3, 2, 1] = float("inf"), float("-inf")
    with pytest.raises(ValueError, match=r"x: 1 token\(s\) contain NaN or Inf"):
        model.loss(x, y)
    with pytest.raises(ValueError, match=r"y: 1 token\(s\) contain NaN or Inf"):
        model.loss(torch.randn(6, 3, 10), y)
    out = clt(nonfinite="skip").loss(x, y)
    assert out.metrics["skipped_tokens"] == 2 and out.n_tokens == 4


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


def _saved(tmp_path, name="m", **changes):
    """A saved small CLT whose config.json has ``changes`` applied (key "config.<field>" for the config)."""
    path = tmp_path / name
    clt().save_pretrained(path)
    meta = json.loads((path / "config.json").read_text())
    for key, value in changes.items():
        if key.startswith("config."):
            meta["config"][key[7:]] = value
        elif value is _DROP:
            del meta[key]
        else:
            meta[key] = value
    (path / "config.json").write_text(json.dumps(meta))
    return path


_DROP = object()


def test_from_pretrained_checks_the_header_before_allocating(tmp_path):
    """config.json claiming n_features 3·10⁶ or 10¹² over the real weights: refused from the safetensors
    header before any model memory is allocated — in a process whose address space is capped at
    its size + 512 MiB (the model would need over 1 GiB, resp. terabytes)."""
    paths = [str(_saved(tmp_path, f"m{n}", **{"config.n_features": n})) for n in (3_000_000, 10**12)]
    script = (
        "import resource, sys, fastclt\n"
        "from fastclt.checkpoint import CheckpointError\n"
        "vm = [int(l.split()[1]) * 1024 for l in open('/proc/self/status') if l.startswith('VmSize:')][0]\n"
        "resource.setrlimit(resource.RLIMIT_AS, (vm + (512 << 20), vm + (512 << 20)))\n"
        "for path in sys.argv[1:]:\n"
        "    for verify in (True, False):\n"
        "        try:\n"
        "            fastclt.CrossLayerTranscoder.from_pretrained(path, verify=verify)\n"
        "            print('loaded')\n"
        "        except CheckpointError as e:\n"
        "            print('refused', 'W_enc' in str(e) and 'shape' in str(e))\n"
        "        except (MemoryError, RuntimeError) as e:\n"
        "            print('allocator', type(e).__name__)\n")
    env = dict(os.environ, PYTHONPATH=str(Path(fastclt.__file__).parent.parent))
    proc = subprocess.run([sys.executable, "-c", script, *paths], capture_output=True, text=True, env=env,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split("\n")[:4] == ["refused True"] * 4, proc.stdout + proc.stderr[-2000:]


def test_from_pretrained_reads_weights_only_from_inside_its_folder(tmp_path):
    other = tmp_path / "other"
    clt().save_pretrained(other)
    for weights, pattern in ((str(other / "model.safetensors"), "only relative paths"),
                             ("../other/model.safetensors", "leads outside")):
        path = _saved(tmp_path, "m", weights=weights)
        with pytest.raises(CheckpointError, match=pattern):
            fastclt.CrossLayerTranscoder.from_pretrained(path, verify=False)
    path = _saved(tmp_path, "link")
    (path / "model.safetensors").unlink()
    (path / "model.safetensors").symlink_to(other / "model.safetensors")
    with pytest.raises(CheckpointError, match="leads outside"):
        fastclt.CrossLayerTranscoder.from_pretrained(path, verify=False)


def test_from_pretrained_needs_the_hash_unless_told(tmp_path):
    path = _saved(tmp_path, weights_sha256=_DROP)
    with pytest.raises(CheckpointError, match="records no weights_sha256.*verify=False"):
        fastclt.CrossLayerTranscoder.from_pretrained(path)
    model = fastclt.CrossLayerTranscoder.from_pretrained(path, verify=False)
    assert model.cfg.n_features == 24


@pytest.mark.parametrize("change, pattern", [
    ({"config.n_features": "24"}, r"config.json: .*n_features: expected an int, got str"),
    ({"config.k": 2.5}, r"config.json: .*k: expected an int"),
    ({"config": [1, 2]}, r"config.json: .*expected a JSON object"),
    ({"weights": 5}, r"'weights'.*expected a relative file name"),
    ({"weights_sha256": 5}, r"weights_sha256.*expected 64 hex digits"),
])
def test_from_pretrained_wrong_types_in_config_json(tmp_path, change, pattern):
    with pytest.raises(CheckpointError, match=pattern):
        fastclt.CrossLayerTranscoder.from_pretrained(_saved(tmp_path, **change))
