"""The (implementation, device) pairs an op's tests run on: every implementation the op table
(fastclt/ops/_registry.py) lists for the op, on each device it runs on (the Triton kernels under
the interpreter on the CPU when there is no GPU). Pairs that cannot run here are skipped, saying why."""
from __future__ import annotations

import pytest
import torch

from fastclt.ops import _registry

GPU = torch.cuda.is_available()


def devices_of(impl: str) -> list:
    if impl in ("cpu", "cuda"):
        return [impl]
    if impl == "triton":
        return ["cuda" if GPU else "cpu"]
    return ["cpu"] + (["cuda"] if GPU else [])


def device_of(impl: str) -> torch.device:
    """The one device a model-level test runs ``impl`` on: Triton on the GPU when there is one (else on
    the CPU under the interpreter), everything else on the CPU."""
    return torch.device("cuda" if impl == "triton" and GPU else "cpu")


def impl_params(op: str, *, reference: bool = False, sharded: bool = False) -> list:
    """pytest params ``(impl, device)`` of every implementation of ``op`` (the reference only when
    asked; only those that take a process group when ``sharded``)."""
    out = []
    for entry in _registry.entries(op):
        if (entry.impl == "reference" and not reference) or (sharded and not entry.sharded):
            continue
        for device in devices_of(entry.impl):
            here = _registry.available(entry.impl, torch.device(device))
            out.append(pytest.param(entry.impl, device, id=f"{entry.impl}-{device}",
                                    marks=pytest.mark.skipif(not here, reason=f"impl {entry.impl!r} is not "
                                                             f"available on {device} here")))
    return out


def takes(op: str, impl: str, dtype: torch.dtype) -> None:
    """Skip (saying so) when ``impl`` of ``op`` does not take ``dtype`` (the call would run the reference)."""
    entry = {e.impl: e for e in _registry.entries(op)}[impl]
    if not entry.takes(dtype):
        pytest.skip(f"impl {impl!r} of {op!r} does not take {dtype} (the op table routes it to the reference)")
