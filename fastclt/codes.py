"""Sparse codes: the one interchange form between ops (docs/DESIGN.md §6).

Per layer, token-major CSR:

    row_ptr: int64 [B + 1]   row b owns entries row_ptr[b]:row_ptr[b+1]
    index:   int32 [nnz]     feature index of each entry, in [0, F)
    value:   float [nnz]     activation of each entry (may carry autograd history)

TopK codes are the special case of a fixed row length k; ``index`` / ``value`` can then be viewed
as [B, k] (``SparseCodes.k`` is set). JumpReLU codes may also hold explicit zero entries just below
the threshold (the straight-through band of docs/DESIGN.md §3) so that the sparse backward visits them; an
entry is *active* when its value is > 0.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

__all__ = ["SparseCodes"]


@dataclass
class SparseCodes:
    row_ptr: torch.Tensor
    index: torch.Tensor
    value: torch.Tensor
    n_features: Optional[int] = None
    k: Optional[int] = None  # fixed entries per row (TopK), else None
    # row·F + index of every entry (int64 [nnz]), made once by ``flat_index`` and shared by codes
    # with the same pattern (``with_value``)
    _flat: Optional[torch.Tensor] = field(default=None, init=False, repr=False, compare=False)
    _flat_F: int = field(default=0, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.row_ptr.dtype != torch.int64 or self.row_ptr.dim() != 1:
            raise TypeError(f"row_ptr: expected a 1-D int64 tensor, got {self.row_ptr.dtype} of shape "
                            f"{tuple(self.row_ptr.shape)}")
        if self.index.dtype != torch.int32 or self.index.dim() != 1:
            raise TypeError(f"index: expected a 1-D int32 tensor, got {self.index.dtype} of shape "
                            f"{tuple(self.index.shape)}")
        if self.value.dim() != 1 or not self.value.is_floating_point():
            raise TypeError(f"value: expected a 1-D floating tensor, got {self.value.dtype} of shape "
                            f"{tuple(self.value.shape)}")
        if self.index.shape[0] != self.value.shape[0]:
            raise ValueError(f"index and value: expected the same length, got {self.index.shape[0]} and "
                             f"{self.value.shape[0]}")
        if self.k is not None and self.index.shape[0] != self.k * self.batch_size:
            raise ValueError(f"k: codes with k={self.k} per row need {self.k * self.batch_size} entries, "
                             f"got {self.index.shape[0]}")

    # ------------------------------------------------------------------ shape
    @property
    def batch_size(self) -> int:
        return self.row_ptr.shape[0] - 1

    @property
    def nnz(self) -> int:
        return self.index.shape[0]

    @property
    def device(self) -> torch.device:
        return self.value.device

    @property
    def dtype(self) -> torch.dtype:
        return self.value.dtype

    def density(self, n_features: Optional[int] = None) -> float:
        """Stored entries (active and band) over all entries, nnz / (B·F): what the ops compare with
        their crossover to choose a sparse or a dense formulation (docs/DESIGN.md §17). No device sync."""
        total = self.batch_size * self._features(n_features)
        return self.nnz / total if total > 0 else 0.0

    def flat_index(self, n_features: Optional[int] = None) -> torch.Tensor:
        """int64 [nnz]: ``row · F + index`` of every entry, its position in the dense [B, F] (cached)."""
        F = self._features(n_features)
        if self._flat is None or self._flat_F != F:
            self._flat = self.row_ids() * F + self.index  # int64 + int32: int64, no copy of the index
            self._flat_F = F
        return self._flat

    def row_ids(self) -> torch.Tensor:
        """int64 [nnz]: the row (token) of every entry."""
        if self.k is not None:
            return torch.arange(self.batch_size, device=self.device).repeat_interleave(self.k)
        return SparseCodes.rows_of(self.row_ptr, self.nnz)

    @staticmethod
    def rows_of(row_ptr: torch.Tensor, nnz: int) -> torch.Tensor:
        """int64 [nnz]: the row of every entry of a CSR ``row_ptr`` (for callers that hold only the pattern)."""
        rows = torch.arange(row_ptr.shape[0] - 1, device=row_ptr.device)
        return torch.repeat_interleave(rows, row_ptr[1:] - row_ptr[:-1], output_size=nnz)

    def row_lengths(self) -> torch.Tensor:
        """int64 [B]: stored entries per row (active and band)."""
        return self.row_ptr[1:] - self.row_ptr[:-1]

    def l0(self) -> torch.Tensor:
        """float32 scalar: mean number of active (> 0) entries per row."""
        if self.batch_size == 0:
            return torch.zeros((), device=self.device)
        return (self.value.detach() > 0).sum().float() / self.batch_size

    def active_features(self, n_features: Optional[int] = None) -> torch.Tensor:
        """bool [F]: features with at least one active entry."""
        F = self._features(n_features)
        fired = torch.zeros(F, dtype=torch.bool, device=self.device)
        fired[self.index[self.value.detach() > 0].long()] = True
        return fired

    # ------------------------------------------------------------ conversion
    def to_dense(self, n_features: Optional[int] = None) -> torch.Tensor:
        """[B, F] dense activations (differentiable in ``value``). Debugging and tests only."""
        F = self._features(n_features)
        out = self.value.new_zeros(self.batch_size, F)
        return out.index_put((self.row_ids(), self.index.long()), self.value, accumulate=True)

    def topk_view(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(index [B, k] int32, value [B, k]) for fixed-row-length codes."""
        if self.k is None:
            raise ValueError("topk_view: these codes have no fixed row length k")
        return self.index.view(self.batch_size, self.k), self.value.view(self.batch_size, self.k)

    @staticmethod
    def from_topk(index: torch.Tensor, value: torch.Tensor, n_features: Optional[int] = None) -> "SparseCodes":
        """Codes from per-row top-k results ``index, value: [B, k]``."""
        if index.dim() != 2 or index.shape != value.shape:
            raise ValueError(f"index/value: expected two [B, k] tensors, got {tuple(index.shape)} and "
                             f"{tuple(value.shape)}")
        B, k = index.shape
        row_ptr = torch.arange(0, (B + 1) * k, k, device=index.device, dtype=torch.int64)
        return SparseCodes(row_ptr, index.reshape(-1).to(torch.int32), value.reshape(-1), n_features, k)

    @staticmethod
    def pattern_from_mask(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """mask: [B, F] bool → (row_ptr int64 [B+1], rows int64 [nnz], cols int64 [nnz]), row-major."""
        rows, cols = mask.nonzero(as_tuple=True)
        row_ptr = torch.zeros(mask.shape[0] + 1, dtype=torch.int64, device=mask.device)
        row_ptr[1:] = torch.cumsum(mask.sum(1), 0)
        return row_ptr, rows, cols

    @staticmethod
    def from_mask(h: torch.Tensor, mask: torch.Tensor) -> "SparseCodes":
        """Codes holding the entries of ``mask: [B, F] bool``, values gathered differentiably from
        ``h: [B, F]``, in row-major order."""
        if h.dim() != 2 or mask.shape != h.shape:
            raise ValueError(f"mask: expected the shape of h {tuple(h.shape)}, got {tuple(mask.shape)}")
        row_ptr, rows, cols = SparseCodes.pattern_from_mask(mask)
        return SparseCodes(row_ptr, cols.to(torch.int32), h[rows, cols], h.shape[1])

    @staticmethod
    def from_dense(a: torch.Tensor) -> "SparseCodes":
        """Codes holding the non-zero entries of ``a: [B, F]``."""
        return SparseCodes.from_mask(a, a != 0)

    def with_value(self, value: torch.Tensor) -> "SparseCodes":
        """The same sparsity pattern with other values (e.g. a transformed activation)."""
        out = SparseCodes(self.row_ptr, self.index, value, self.n_features, self.k)
        if self._flat is not None:
            out._flat, out._flat_F = self._flat, self._flat_F
        return out

    def detach(self) -> "SparseCodes":
        return self.with_value(self.value.detach())

    def _features(self, n_features: Optional[int]) -> int:
        F = n_features if n_features is not None else self.n_features
        if F is None:
            raise ValueError("n_features: these codes do not record F; pass n_features")
        return F

    def __repr__(self) -> str:
        return (f"SparseCodes(batch_size={self.batch_size}, nnz={self.nnz}, n_features={self.n_features}, "
                f"k={self.k}, dtype={self.dtype}, device={self.device})")
