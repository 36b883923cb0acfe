"""Small integer tensors made from host values once per device and kept (``on_device``).

A tensor built from Python values (``torch.tensor(values, device=...)``) is a copy from the host:
on a GPU it is a transfer that a captured CUDA graph cannot hold (fastclt/training/graphed.py), and
a launch on every call. The ops that need such a tensor on every call (layer offsets of a joined
decode, Matryoshka prefix edges, a MOLT's rank pointer) take it from here: made at the first call
for those values, dtype and device (in a graph's warm-up, before any capture), the same tensor
afterwards. Callers must not write into it.
"""
from __future__ import annotations

from collections import OrderedDict

import torch

__all__ = ["on_device", "CACHE_SIZE"]

CACHE_SIZE = 256  # distinct (values, dtype, device) kept; the least recently used goes first
_CACHE: "OrderedDict[tuple, torch.Tensor]" = OrderedDict()


def on_device(values: tuple, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The 1-D tensor of ``values`` (a tuple of Python numbers) in ``dtype`` on ``device``, shared
    by every call with the same arguments (read only)."""
    key = (values, dtype, str(torch.device(device)))
    t = _CACHE.get(key)
    if t is None:
        t = _CACHE[key] = torch.tensor(values, dtype=dtype, device=device)
        if len(_CACHE) > CACHE_SIZE:
            _CACHE.popitem(last=False)
    else:
        _CACHE.move_to_end(key)
    return t
