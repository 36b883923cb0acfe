"""The op table: every implementation of every op, and the choice among them.

``impl="auto" | "cuda" | "triton" | "cpu" | "dense" | "reference"`` names a backend:

    reference   fastclt/ops/reference/<file>.py   pure PyTorch: the test oracle, any device, any float dtype
    dense       fastclt/ops/dense/<file>.py       the dense formulation (GEMMs on dense codes) of the decodes
    triton      fastclt/ops/triton/<file>.py      Triton kernels: CUDA (the CPU under TRITON_INTERPRET=1, tests)
    cpu, cuda   fastclt/ops/ext/<file>.py         the fastclt._C extension's C++ / CUDA kernels

``TABLE`` below is the one list of what exists: (op, backend, callable, dtypes, devices, whether it
takes a process group). ``resolve`` picks an entry:

- ``impl="auto"`` takes the first entry in the device's preference order (``AUTO_ORDER``) that is
  available there and takes the call's dtype — except that an op with a dense formulation takes it
  when the call's codes are at least as dense as the crossover (``density``, ``fastclt.ops.density``);
  the environment variable ``FASTCLT_IMPL`` names a backend to use instead of "auto" wherever the op
  has it (an invalid name is an error).
- a named backend that does not take the call's dtype (fp64, or fp16 for the extension) runs the
  reference instead — the routing is done here, never inside a kernel's wrapper;
- a named backend that is not available on the device is an error that says how to get it;
- a call with a process group (features sharded over tensor-parallel ranks) considers only the
  entries that take one;
- inside ``capturable()`` the ops whose kernels' wrappers read a value back from the device (a NaN
  count, a radix histogram, a row count: ``CAPTURE_REFERENCE``) resolve to their reference, which
  reads nothing for TopK and per-layer BatchTopK, so that a step can be captured in a CUDA graph.

Modules are imported on first use: ``import fastclt.ops`` imports neither Triton nor fastclt._C.
docs/DESIGN.md §11 prints this table with the tests and benchmarks of each op.
"""
from __future__ import annotations

import contextlib
import importlib
import os
import threading
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Callable, Optional

import torch

__all__ = ["IMPLS", "AUTO_ORDER", "TABLE", "Entry", "implementations", "entries", "resolve", "available",
           "FLOATS", "EXT_DTYPES", "TRITON_DTYPES", "CAPTURE_REFERENCE", "capturable", "capturing"]

IMPLS = ("auto", "cuda", "triton", "cpu", "dense", "reference")

# Preference of impl="auto" per device type: kernels first, the eager reference last.
AUTO_ORDER = {
    "cuda": ("triton", "cuda", "reference"),
    "cpu": ("cpu", "reference"),
}

# What each backend's kernels take (they accumulate in fp32); None: every float dtype.
FLOATS = None
EXT_DTYPES = (torch.float32, torch.bfloat16)
TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# The device types each backend runs on (None: any). Triton also runs on the CPU under
# TRITON_INTERPRET=1 (set before fastclt is imported), for tests.
DEVICES = {"reference": None, "dense": None, "triton": ("cuda", "cpu"), "cpu": ("cpu",), "cuda": ("cuda",)}

# What to tell a user whose requested implementation is missing.
HOW_TO_GET = {
    "cuda": "the CUDA part of fastclt._C is not built: reinstall on a machine with nvcc and a CUDA "
            "build of PyTorch, with FASTCLT_BUILD_CUDA=1 pip install --no-build-isolation .",
    "cpu": "the C++ part of fastclt._C is not built: reinstall with a C++ compiler present, "
           "FASTCLT_BUILD_CPU=1 pip install --no-build-isolation .",
    "triton": "Triton kernels need `pip install triton` and a CUDA tensor (or TRITON_INTERPRET=1 "
              "set before fastclt is imported, for testing on the CPU)",
    "dense": "",
    "reference": "",
}


@dataclass
class Entry:
    """One implementation of one op."""

    op: str
    impl: str
    target: str  # "module:attribute" under fastclt.ops, imported on first use
    dtypes: Optional[tuple]  # the float dtypes it takes (None: all)
    sharded: bool  # takes ``shards=`` (a process group over which the features are sharded)
    fn: Optional[Callable] = field(default=None, repr=False)

    @property
    def devices(self) -> Optional[tuple]:
        return DEVICES[self.impl]

    def takes(self, dtype: Optional[torch.dtype]) -> bool:
        return dtype is None or self.dtypes is None or dtype in self.dtypes

    def load(self) -> Callable:
        if self.fn is None:
            module, attr = self.target.split(":")
            self.fn = getattr(importlib.import_module(f"fastclt.ops.{module}"), attr)
        return self.fn


def _e(op, impl, target, dtypes, sharded=False) -> Entry:
    return Entry(op, impl, target, dtypes, sharded)


R, T, C, G, D, SHARDED = "reference", "triton", "cpu", "cuda", "dense", True
# The op table. A new op: its reference (and kernels, and a dense formulation) in files of the same
# name under reference/, triton/, ext/ (and dense/), one row per implementation here, its entry
# point in fastclt/ops/__init__.py (docs/DESIGN.md §13).
TABLE = (
    #  op                   impl  callable ("module:attribute" under fastclt.ops)    dtypes         process group
    _e("relu",              R,    "reference.activation:relu",                       FLOATS),
    _e("jumprelu",          R,    "reference.activation:jumprelu",                   FLOATS),
    _e("topk",              R,    "reference.select:topk",                           FLOATS,        SHARDED),
    _e("topk",              C,    "ext.select:topk",                                 EXT_DTYPES,    SHARDED),
    _e("topk",              G,    "ext.select:topk",                                 EXT_DTYPES,    SHARDED),
    _e("batch_topk",        R,    "reference.select:batch_topk",                     FLOATS,        SHARDED),
    _e("batch_topk",        C,    "ext.select:batch_topk",                           EXT_DTYPES,    SHARDED),
    _e("batch_topk",        G,    "ext.select:batch_topk",                           EXT_DTYPES,    SHARDED),
    _e("batch_topk_layers", R,    "reference.select:batch_topk_layers",              FLOATS,        SHARDED),
    _e("batch_topk_layers", C,    "ext.select:batch_topk_layers",                    EXT_DTYPES,    SHARDED),
    _e("batch_topk_layers", G,    "ext.select:batch_topk_layers",                    EXT_DTYPES,    SHARDED),
    _e("encode",            R,    "reference.encode:encode",                         FLOATS,        SHARDED),
    _e("encode",            T,    "triton.encode:encode",                            TRITON_DTYPES),
    _e("encode",            C,    "ext.encode:encode",                               EXT_DTYPES,    SHARDED),
    _e("encode",            G,    "ext.encode:encode",                               EXT_DTYPES,    SHARDED),
    _e("encode_layers",     R,    "reference.encode:encode_layers",                  FLOATS,        SHARDED),
    _e("encode_layers",     T,    "triton.encode:encode_layers",                     TRITON_DTYPES),
    _e("encode_layers",     C,    "ext.encode:encode_layers",                        EXT_DTYPES,    SHARDED),
    _e("encode_layers",     G,    "ext.encode:encode_layers",                        EXT_DTYPES,    SHARDED),
    _e("auxk_select",       R,    "reference.auxk:auxk_select",                      FLOATS,        SHARDED),
    _e("auxk_select",       T,    "triton.auxk:auxk_select",                         TRITON_DTYPES),
    _e("auxk_select",       C,    "ext.auxk:auxk_select",                            EXT_DTYPES,    SHARDED),
    _e("auxk_select",       G,    "ext.auxk:auxk_select",                            EXT_DTYPES,    SHARDED),
    _e("sparse_decode",     R,    "reference.decode:sparse_decode",                  FLOATS),
    _e("sparse_decode",     T,    "triton.decode:sparse_decode",                     TRITON_DTYPES),
    _e("sparse_decode",     C,    "ext.decode:sparse_decode",                        EXT_DTYPES),
    _e("sparse_decode",     G,    "ext.decode:sparse_decode",                        EXT_DTYPES),
    _e("sparse_decode",     D,    "dense.decode:sparse_decode",                      FLOATS),
    _e("clt_decode",        R,    "reference.clt_decode:clt_decode",                 FLOATS),
    _e("clt_decode",        T,    "triton.clt_decode:clt_decode",                    TRITON_DTYPES),
    _e("clt_decode",        C,    "ext.clt_decode:clt_decode",                       EXT_DTYPES),
    _e("clt_decode",        G,    "ext.clt_decode:clt_decode",                       EXT_DTYPES),
    _e("clt_decode",        D,    "dense.clt_decode:clt_decode",                     FLOATS),
    _e("molt_decode",       R,    "reference.molt:molt_decode",                      FLOATS),
    _e("molt_decode",       T,    "triton.molt:molt_decode",                         TRITON_DTYPES),
    _e("molt_decode",       C,    "ext.molt:molt_decode",                            EXT_DTYPES),
    _e("prefix_errors",     R,    "reference.matryoshka:prefix_errors",              FLOATS),
    _e("prefix_errors",     C,    "ext.matryoshka:prefix_errors",                    (torch.float32,)),
    _e("total_variance",    R,    "reference.losses:total_variance",                 FLOATS),
    _e("total_variance",    C,    "ext.losses:total_variance",                       (torch.float32,)),
    _e("fvu_terms",         R,    "reference.losses:fvu_terms",                      FLOATS),
    _e("fvu_terms",         C,    "ext.losses:fvu_terms",                            (torch.float32,)),
    _e("code_stats",        R,    "reference.stats:code_stats",                      FLOATS),
    _e("code_stats",        C,    "ext.stats:code_stats",                            EXT_DTYPES),
)

_BY_OP: dict[str, dict[str, Entry]] = {}
for _entry in TABLE:
    if _entry.impl in _BY_OP.setdefault(_entry.op, {}):
        raise RuntimeError(f"op table: {_entry.op!r} lists impl {_entry.impl!r} twice")
    _BY_OP[_entry.op][_entry.impl] = _entry


# The ops whose kernel wrappers wait for the device: the CUDA TopK reads its NaN count, the CUDA
# BatchTopK each radix histogram and its row count, the Triton encodes their candidate counts. Their
# references read nothing for TopK and for one layer's (or per-layer) BatchTopK: ``capturable`` routes
# these ops to them (a selection across layers still reads its layers' bounds, and AuxK its dead count).
CAPTURE_REFERENCE = frozenset({"topk", "batch_topk", "batch_topk_layers", "encode", "encode_layers", "auxk_select"})
_CAPTURE = threading.local()


@contextlib.contextmanager
def capturable():
    """Within this block (in this thread) the ops of ``CAPTURE_REFERENCE`` resolve to "reference"
    whatever impl a call names: a step made of them and of the decodes and losses (whose kernels
    read nothing back) can be captured in a CUDA graph (fastclt/training/graphed.py)."""
    before = capturing()
    _CAPTURE.on = True
    try:
        yield
    finally:
        _CAPTURE.on = before


def capturing() -> bool:
    """Whether this thread is inside ``capturable()``."""
    return getattr(_CAPTURE, "on", False)


# ------------------------------------------------------------------------------ availability
@lru_cache(maxsize=None)
def _triton_imports() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:
        return False
    return True


def available(impl: str, device: torch.device) -> bool:
    """Whether backend ``impl`` can run on ``device`` in this process (nothing is imported but the
    extension's loader and, for "triton", Triton itself)."""
    devices = DEVICES[impl]
    if devices is not None and device.type not in devices:
        return False
    if impl == "triton":
        if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            return False
        return _triton_imports()
    if impl in ("cpu", "cuda"):
        from fastclt import _ext

        return _ext.has_cpu_ext() if impl == "cpu" else _ext.has_cuda_ext()
    return True


# -------------------------------------------------------------------------------- resolution
def implementations(op: str) -> tuple[str, ...]:
    """Names of the registered implementations of ``op``."""
    return tuple(_BY_OP.get(op, {}))


def entries(op: str) -> tuple[Entry, ...]:
    """The table's rows for ``op``."""
    return tuple(_BY_OP.get(op, {}).values())


def resolve(op: str, impl: str, device: torch.device, dtype: Optional[torch.dtype] = None, *,
            sharded: bool = False, density: Optional[float] = None) -> tuple[str, Callable]:
    """``(impl_name, fn)`` for ``op`` on ``device`` (for inputs of ``dtype`` when given; ``sharded``:
    a call with a process group; ``density``: of the call's codes, for an op with a dense
    formulation). Raises a clear error when no implementation fits."""
    if impl not in IMPLS:
        raise ValueError(f"impl: expected one of {IMPLS}, got {impl!r}")
    registered = _BY_OP.get(op)
    if not registered:
        raise KeyError(f"op {op!r} has no registered implementation")
    impls = {n: e for n, e in registered.items() if e.sharded or not sharded}
    if op in CAPTURE_REFERENCE and capturing():
        return "reference", impls["reference"].load()
    if impl == "auto":
        env = os.environ.get("FASTCLT_IMPL", "auto")
        if env not in IMPLS:
            raise ValueError(f"FASTCLT_IMPL: expected one of {IMPLS}, got {env!r}")
        if env != "auto" and env in impls:
            impl = env
    if impl == "auto":
        dense = impls.get("dense")
        if density is not None and dense is not None and dense.takes(dtype):
            from fastclt.ops import density as _density

            if _density.use_dense(op, density, device, dtype):
                return "dense", dense.load()
        for name in AUTO_ORDER.get(device.type, ("reference",)):
            entry = impls.get(name)
            if entry is not None and entry.takes(dtype) and available(name, device):
                return name, entry.load()
        raise RuntimeError(f"op {op!r}: no implementation available on {device}")
    entry = impls.get(impl)
    if entry is None:
        if impl in registered:
            raise NotImplementedError(f"op {op!r}: impl={impl!r} does not take a process group (features sharded "
                                      f"over ranks); those that do: {tuple(impls)}")
        raise NotImplementedError(f"op {op!r} has no impl={impl!r}; it has {tuple(registered)}")
    if not available(impl, device):
        raise RuntimeError(f"op {op!r}: impl={impl!r} is not available on {device}: {HOW_TO_GET[impl]}")
    if not entry.takes(dtype):  # kernels accumulate in fp32: other dtypes run the reference
        return "reference", impls["reference"].load()
    return impl, entry.load()
