"""The host pool of fastclt._C (csrc/host_pool.h): large CPU outputs and workspaces are reused warm."""
import subprocess
import sys

import pytest
import torch

from fastclt import _ext
from fastclt import ops

pytestmark = pytest.mark.skipif(not _ext.build_info()["loaded"], reason=_ext.missing_message("cpu"))

BIG = (1024, 1024)  # 4 MiB of fp32: pooled (>= 2 MiB)


@pytest.fixture(autouse=True)
def fresh_pool():
    old = _ext.host_pool_stats()["limit_bytes"]
    _ext.host_pool_release()
    yield
    _ext.host_pool_set_limit(old)
    _ext.host_pool_release()


def test_big_blocks_are_reused_and_small_ones_are_not_pooled():
    a = _ext.host_empty(BIG, torch.float32, "cpu")
    assert a.shape == BIG and a.dtype == torch.float32 and a.is_contiguous() and a.device.type == "cpu"
    ptr = a.data_ptr()
    assert ptr % (2 << 20) == 0, "pooled blocks are 2 MiB-aligned"
    a.fill_(1.5)
    assert float(a.sum()) == 1.5 * a.numel()
    del a
    s = _ext.host_pool_stats()
    assert s["cached_blocks"] == 1 and s["cached_bytes"] == 4 << 20
    b = _ext.host_empty((2048, 512), torch.float32, "cpu")  # same rounded size: the same block
    assert b.data_ptr() == ptr
    assert _ext.host_pool_stats()["cached_blocks"] == 0
    c = _ext.host_empty((1024, 1024), torch.bfloat16, "cpu")  # 2 MiB: another size class, a new block
    assert c.data_ptr() != ptr
    del b, c
    before = _ext.host_pool_stats()
    small = _ext.host_empty((7, 5), torch.float32, "cpu")
    assert small.shape == (7, 5)
    del small
    assert _ext.host_pool_stats()["cached_blocks"] == before["cached_blocks"]


def test_limit_release_and_off():
    _ext.host_pool_set_limit(5 << 20)  # room for one 4 MiB block
    a, b = _ext.host_empty(BIG, torch.float32, "cpu"), _ext.host_empty(BIG, torch.float32, "cpu")
    del a, b
    assert _ext.host_pool_stats()["cached_bytes"] == 4 << 20
    c = _ext.host_empty((3 << 20,), torch.uint8, "cpu")  # 4 MiB rounded, fits: reuses the cached block
    d = _ext.host_empty((3 << 20,), torch.int8, "cpu")   # nothing cached: a new block
    del c
    assert _ext.host_pool_stats()["cached_blocks"] == 1
    e = _ext.host_empty((1 << 20,), torch.float16, "cpu")  # 2 MiB
    del d  # 4 + 4 MiB would exceed 5 MiB: the older block (c's) is freed for d's
    assert _ext.host_pool_stats()["cached_bytes"] == 4 << 20
    del e  # 2 MiB more would exceed 5 MiB: the older 4 MiB block is evicted for the newer one
    s = _ext.host_pool_stats()
    assert s["cached_bytes"] == 2 << 20 and s["cached_blocks"] == 1
    _ext.host_pool_release()
    assert _ext.host_pool_stats()["cached_bytes"] == 0
    _ext.host_pool_set_limit(0)  # off: plain allocations
    a = _ext.host_empty(BIG, torch.float32, "cpu")
    del a
    assert _ext.host_pool_stats()["cached_bytes"] == 0
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="n_bytes: expected a non-negative int"):
            _ext.host_pool_set_limit(bad)


def test_op_outputs_come_from_the_pool_and_are_poisoned_on_reuse():
    """A large gradient (feature_scatter) is reused after it is freed, and a reused block is still
    poisoned in poison mode: a kernel cannot hide an unwritten element behind last step's data."""
    B, F, d, k = 64, 2048, 512, 4  # dW_dec: 4 MiB
    h = torch.randn(B, F)
    codes = ops.topk(h, k, impl="cpu")
    W = torch.randn(F, d, requires_grad=True)
    ops.sparse_decode(codes, W, impl="cpu").square().sum().backward()
    first = W.grad.clone()
    W.grad = None
    hits = _ext.host_pool_stats()["hits"]
    _ext._C.set_poison_outputs(True)
    try:
        ops.sparse_decode(codes, W, impl="cpu").square().sum().backward()
    finally:
        _ext._C.set_poison_outputs(False)
    assert _ext.host_pool_stats()["hits"] > hits, "the second gradient did not reuse the first's block"
    assert torch.equal(W.grad, first)
    assert not W.grad.isnan().any()


def test_bad_limit_in_the_environment_is_a_clear_error():
    code = ("import torch, fastclt._ext as e\n"
            "try:\n    e.host_empty((1024, 1024), torch.float32, 'cpu')\n"
            "except Exception as x:\n    print(type(x).__name__, x)\n")
    env = {"FASTCLT_HOST_POOL_MB": "lots", "PATH": ""}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert "FASTCLT_HOST_POOL_MB: expected a non-negative integer" in out.stdout + out.stderr


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [True, False])
def test_preacts_into_a_pooled_buffer_matches_linear(dtype, bias):
    from fastclt.ops.reference.encode import preacts, preacts_layers

    g = torch.Generator().manual_seed(3)
    x = torch.randn(37, 3, 29, generator=g).to(dtype)
    W = torch.randn(3, 1031, 29, generator=g).to(dtype)
    b = torch.randn(3, 1031, generator=g).to(dtype) if bias else None
    pre = torch.randn(29, generator=g).to(dtype)
    out = _ext.host_empty((37, 1031), dtype, "cpu")
    got = preacts(x[:, 1], W[1], None if b is None else b[1], pre, out=out)
    assert got.data_ptr() == out.data_ptr()
    assert torch.equal(got, preacts(x[:, 1], W[1], None if b is None else b[1], pre))
    out3 = _ext.host_empty((3, 37, 1031), dtype, "cpu")
    assert torch.equal(preacts_layers(x, W, b, pre, out=out3), preacts_layers(x, W, b, pre))
