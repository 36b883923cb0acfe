"""Choose an implementation of an op: ``impl="auto" | "cuda" | "triton" | "cpu" | "reference"``.

Every op registers its implementations here by name. Kernel modules are imported lazily, on the
first call that needs them, so that ``import fastclt`` never pulls in Triton or the extension.
``impl="auto"`` takes the first available implementation in the device's preference order that
takes the call's dtype (kernels declare theirs; the references take every float dtype); the
environment variable ``FASTCLT_IMPL`` overrides "auto" (an unavailable choice is an error).
"""
from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from typing import Callable, Optional

import torch

IMPLS = ("auto", "cuda", "triton", "cpu", "reference")

# Preference of impl="auto" per device type: kernels first, the eager reference last.
AUTO_ORDER = {
    "cuda": ("triton", "cuda", "reference"),
    "cpu": ("cpu", "reference"),
}

# What to tell a user whose requested implementation is missing.
HOW_TO_GET = {
    "cuda": "the CUDA part of fastclt._C is not built: reinstall on a machine with nvcc and a CUDA "
            "build of PyTorch, with FASTCLT_BUILD_CUDA=1 pip install --no-build-isolation .",
    "cpu": "the C++ part of fastclt._C is not built: reinstall with a C++ compiler present, "
           "FASTCLT_BUILD_CPU=1 pip install --no-build-isolation .",
    "triton": "Triton kernels need `pip install triton` and a CUDA tensor (or TRITON_INTERPRET=1 "
              "set before fastclt is imported, for testing on the CPU)",
    "reference": "",
}


@dataclass
class _Impl:
    target: str  # "module:attribute", imported on first use
    available: Callable[[torch.device], bool]
    dtypes: Optional[tuple] = None  # the float dtypes it takes (None: all); "auto" skips it for others
    fn: Optional[Callable] = None

    def load(self) -> Callable:
        if self.fn is None:
            module, attr = self.target.split(":")
            self.fn = getattr(importlib.import_module(module), attr)
        return self.fn


_REGISTRY: dict[str, dict[str, _Impl]] = {}


def _always(device: torch.device) -> bool:
    return True


def register(op: str, impl: str, target: str, available: Callable[[torch.device], bool] = _always,
             dtypes: Optional[tuple] = None) -> None:
    """Register ``target`` ("module:attr") as implementation ``impl`` of ``op`` (taking ``dtypes``)."""
    if impl not in IMPLS or impl == "auto":
        raise ValueError(f"impl: expected one of {IMPLS[1:]}, got {impl!r}")
    _REGISTRY.setdefault(op, {})[impl] = _Impl(target, available, dtypes)


def implementations(op: str) -> tuple[str, ...]:
    """Names of the registered implementations of ``op``."""
    return tuple(_REGISTRY.get(op, {}))


def resolve(op: str, impl: str, device: torch.device, dtype: Optional[torch.dtype] = None) -> tuple[str, Callable]:
    """Return ``(impl_name, fn)`` for ``op`` on ``device`` (for inputs of ``dtype``, when given);
    raise a clear error when unavailable."""
    if impl not in IMPLS:
        raise ValueError(f"impl: expected one of {IMPLS}, got {impl!r}")
    impls = _REGISTRY.get(op)
    if not impls:
        raise KeyError(f"op {op!r} has no registered implementation")
    if impl == "auto":
        env = os.environ.get("FASTCLT_IMPL", "auto")
        if env not in IMPLS:
            raise ValueError(f"FASTCLT_IMPL: expected one of {IMPLS}, got {env!r}")
        if env != "auto" and env in impls:
            impl = env
    if impl == "auto":
        for name in AUTO_ORDER.get(device.type, ("reference",)):
            entry = impls.get(name)
            if entry is None or (dtype is not None and entry.dtypes is not None and dtype not in entry.dtypes):
                continue
            if entry.available(device):
                return name, entry.load()
        raise RuntimeError(f"op {op!r}: no implementation available on {device}")
    entry = impls.get(impl)
    if entry is None:
        raise NotImplementedError(f"op {op!r} has no impl={impl!r}; it has {tuple(impls)}")
    if not entry.available(device):
        raise RuntimeError(f"op {op!r}: impl={impl!r} is not available on {device}: {HOW_TO_GET[impl]}")
    return impl, entry.load()
