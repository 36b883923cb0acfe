"""Triton kernels for fastclt ops (see README.md in this folder).

One module per op (kernel + launcher + ``autograd.Function``), imported lazily by the dispatcher:
``import fastclt.ops.triton`` does not import Triton. Kernels run on CUDA tensors, or on the CPU
under ``TRITON_INTERPRET=1`` (set before the op modules are imported) for testing.
"""
from __future__ import annotations

import os
from functools import lru_cache
from typing import Optional, Sequence

import torch

__all__ = ["TRITON_IMPLS", "AUTOTUNE_CONFIGS_ENV", "autotune_limit", "first_configs", "available",
           "register_triton_impls"]

# Environment variable: keep only the first N configs of every Triton autotune space (after the
# configs that do not fit the device are dropped); unset or empty = all. For runs that must bound
# autotuning time (GPU tests); the configs are listed best-guess first.
AUTOTUNE_CONFIGS_ENV = "FASTCLT_AUTOTUNE_CONFIGS"

# (op, "module:attribute") of every Triton implementation; add new ops here.
TRITON_IMPLS = [
    ("encode", "fastclt.ops.triton.encode:encode"),
    ("encode_layers", "fastclt.ops.triton.encode:encode_layers"),
    ("auxk_select", "fastclt.ops.triton.auxk:auxk_select"),
    ("sparse_decode", "fastclt.ops.triton.sparse_decode:sparse_decode"),
    ("clt_decode", "fastclt.ops.triton.clt_decode:clt_decode"),
    ("molt_decode", "fastclt.ops.triton.molt:molt_decode"),
]


# What the Triton kernels take (fp32 accumulation); "auto" sends fp64 to the references.
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@lru_cache(maxsize=None)
def _triton_imports() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:
        return False
    return True


def autotune_limit() -> Optional[int]:
    """N from ``FASTCLT_AUTOTUNE_CONFIGS`` (a positive integer), None when unset or empty; any other
    value raises ValueError naming the variable."""
    raw = os.environ.get(AUTOTUNE_CONFIGS_ENV, "").strip()
    if not raw:
        return None
    try:
        n = int(raw)
    except ValueError:
        n = 0
    if n < 1:
        raise ValueError(f"{AUTOTUNE_CONFIGS_ENV}: expected a positive integer (how many autotune configs to "
                         f"keep), or unset for all; got {raw!r}")
    return n


def first_configs(configs: Sequence) -> list:
    """``configs`` cut to the first ``autotune_limit()`` (all when unset)."""
    n = autotune_limit()
    return list(configs) if n is None else list(configs)[:n]


def available(device: torch.device) -> bool:
    """True when Triton imports and ``device`` is CUDA (or TRITON_INTERPRET=1 is set, for the CPU)."""
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return False
    return _triton_imports()


def register_triton_impls() -> None:
    """Register every entry of ``TRITON_IMPLS`` as impl "triton" with the dispatcher."""
    from fastclt.ops import _dispatch

    for op, target in TRITON_IMPLS:
        _dispatch.register(op, "triton", target, available=available, dtypes=DTYPES)
