"""Counting the tensor memory that torch ops allocate (any device), for tests of memory bounds.

``AllocationTracker`` is a TorchDispatchMode: every op output whose storage is new (not an input's,
i.e. not a view or an in-place result) counts from its creation until its storage is freed
(a weak reference to the storage), so ``peak`` is the most bytes held at once by tensors created
while the mode was active, and ``largest`` the largest single allocation (with its op in ``log``).
Allocations inside kernels that never surface as tensors are not seen (none in the code it checks).
"""
from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class AllocationTracker(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.live = self.peak = self.largest = 0
        self.log: list[tuple[str, int]] = []
        self._alive: set[int] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage()._cdata for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                st = t.untyped_storage()
                key, n = st._cdata, st.nbytes()
                if n == 0 or key in inputs or key in self._alive:
                    continue
                self._alive.add(key)
                self.live += n
                self.peak = max(self.peak, self.live)
                self.largest = max(self.largest, n)
                self.log.append((str(func), n))
                weakref.finalize(st, self._free, key, n)
        return out

    def _free(self, key: int, n: int) -> None:
        self._alive.discard(key)
        self.live -= n
