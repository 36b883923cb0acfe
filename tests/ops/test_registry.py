"""The op table (fastclt/ops/_registry.py): which implementation ``impl="auto"`` takes, that
``FASTCLT_IMPL`` overrides it, that a dtype a kernel does not take runs the reference, that every
row of the table loads and has the reference's signature, and what a call with a process group may
use. docs/DESIGN.md prints the same table (tests/test_docs.py checks it)."""
import inspect
import os

import pytest
import torch

import fastclt.ops as ops
from fastclt import _ext
from fastclt.ops import _registry

KERNELS = {"cpu": "cpu", "cuda": "triton"}
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def kernels_here(device) -> bool:
    return _ext.has_cpu_ext() if device.type == "cpu" else True


def test_auto_skips_kernels_for_dtypes_they_do_not_take(monkeypatch):
    monkeypatch.delenv("FASTCLT_IMPL", raising=False)
    assert ops.resolve("encode", "auto", DEVICE, torch.float64)[0] == "reference"
    assert ops.resolve("sparse_decode", "auto", DEVICE, torch.float64)[0] == "reference"
    if kernels_here(DEVICE):
        assert ops.resolve("encode", "auto", DEVICE, torch.float32)[0] == KERNELS[DEVICE.type]
        assert ops.resolve("encode", "auto", DEVICE, torch.bfloat16)[0] == KERNELS[DEVICE.type]


def test_env_override_beats_the_dtype_rule(monkeypatch):
    monkeypatch.setenv("FASTCLT_IMPL", "reference")
    assert ops.resolve("encode", "auto", DEVICE, torch.float32)[0] == "reference"


def test_a_named_kernel_runs_the_reference_for_a_dtype_it_does_not_take(ext_device):
    device = torch.device(ext_device)
    for op in ("topk", "encode", "sparse_decode", "clt_decode"):
        assert ops.resolve(op, ext_device, device, torch.float64)[0] == "reference", op
        assert ops.resolve(op, ext_device, device, torch.float32)[0] == ext_device, op
    if _registry.available("triton", DEVICE):
        assert ops.resolve("encode", "triton", DEVICE, torch.float16)[0] == "triton"
        assert ops.resolve("encode", "triton", DEVICE, torch.float64)[0] == "reference"


def test_dispatch_prefers_the_extension(ext_device, monkeypatch):
    """impl="auto" takes the extension's kernels on this device (the models' default path)."""
    monkeypatch.delenv("FASTCLT_IMPL", raising=False)
    for op in ("encode", "encode_layers", "auxk_select", "topk", "batch_topk", "sparse_decode", "clt_decode"):
        name, _ = ops.resolve(op, "auto", torch.device(ext_device), torch.float32)
        if ext_device == "cpu":
            assert name == "cpu", (op, name)
        else:  # on CUDA the Triton kernels come first where there are some
            assert name == ("triton" if "triton" in ops.implementations(op) else "cuda"), (op, name)


def test_triton_availability():
    assert _registry.available("triton", DEVICE) == (_registry._triton_imports()
                                                     and (DEVICE.type == "cuda"
                                                          or os.environ.get("TRITON_INTERPRET") == "1"))
    assert not _registry.available("triton", torch.device("meta"))
    if _registry.available("triton", DEVICE):
        from fastclt.ops.triton import decode

        name, fn = ops.resolve("sparse_decode", "triton", DEVICE)
        assert name == "triton" and fn is decode.sparse_decode


def test_errors_name_what_is_missing(monkeypatch):
    monkeypatch.delenv("FASTCLT_IMPL", raising=False)
    with pytest.raises(ValueError, match="impl: expected one of"):
        ops.resolve("topk", "fast", torch.device("cpu"))
    with pytest.raises(KeyError, match="no registered implementation"):
        ops.resolve("conv", "auto", torch.device("cpu"))
    with pytest.raises(NotImplementedError, match="has no impl='triton'"):
        ops.resolve("topk", "triton", torch.device("cpu"))
    with pytest.raises(RuntimeError, match="impl='cuda' is not available on cpu"):
        ops.resolve("topk", "cuda", torch.device("cpu"))
    with pytest.raises(NotImplementedError, match="does not take a process group"):
        ops.resolve("encode", "triton", torch.device("cpu"), sharded=True)
    with pytest.raises(RuntimeError, match="group: a process group needs torch.distributed"):
        ops.topk(torch.randn(3, 5), 2, group=object())


def test_a_sharded_call_uses_only_implementations_that_take_a_group(monkeypatch):
    monkeypatch.setenv("FASTCLT_IMPL", "triton")  # the encode's Triton kernel takes no group: "auto" proceeds
    name, _ = ops.resolve("encode", "auto", DEVICE, torch.float32, sharded=True)
    assert name != "triton"
    for op in ("topk", "batch_topk", "batch_topk_layers", "encode", "encode_layers", "auxk_select"):
        assert "reference" in [e.impl for e in _registry.entries(op) if e.sharded], op


def test_every_entry_loads_and_has_the_reference_signature():
    """One op, one signature: each implementation takes the reference's parameters (those taking
    a process group add ``shards``), so the entry point can call any of them the same way."""
    assert {e.op for e in _registry.TABLE} <= set(ops.__all__)
    for op in {e.op for e in _registry.TABLE}:
        entries = {e.impl: e for e in _registry.entries(op)}
        assert "reference" in entries, op
        ref = [n for n in inspect.signature(entries["reference"].load()).parameters if n != "shards"]
        for impl, entry in entries.items():
            if impl == "triton" and not _registry._triton_imports():
                continue  # (Triton is not installed here)
            params = list(inspect.signature(entry.load()).parameters)
            assert ("shards" in params) == entry.sharded, (op, impl)
            assert [n for n in params if n != "shards"] == ref, (op, impl, params, ref)
            assert entry.devices is None or all(d in ("cpu", "cuda") for d in entry.devices)
