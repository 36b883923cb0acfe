"""Sparse codes: the one interchange form between ops (docs/DESIGN.md §6).

Per layer, token-major CSR:

    row_ptr: int64 [B + 1]   row b owns entries row_ptr[b]:row_ptr[b+1]
    index:   int32 [nnz]     feature index of each entry, in [0, F)
    value:   float [nnz]     activation of each entry (may carry autograd history)

TopK codes are the special case of a fixed row length k; ``index`` / ``value`` can then be viewed
as [B, k] (``SparseCodes.k`` is set). JumpReLU codes may also hold explicit zero entries just below
the threshold (the straight-through band of docs/DESIGN.md §3) so that the sparse backward visits them; an
entry is *active* when its value is > 0.

``DenseCodes`` is the same codes held dense, for the dense-activation regime (docs/DESIGN.md §17):

    dense:  float [B, F]   the activations, zero where there is no entry (may carry autograd history)
    stored: bool  [B, F]   the entries (active and band)

Ops with a dense formulation read ``dense`` directly (a GEMM, no scatter); every other reader gets the
CSR above, built from them once on first use (``to_sparse``), with values gathered differentiably
from ``dense``. A DenseCodes is a SparseCodes: code written for CSR codes takes it unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

__all__ = ["SparseCodes", "DenseCodes"]


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

    is_dense = False  # True for DenseCodes: the ops read its [B, F] form

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

    @staticmethod
    def join_row_ptrs(row_ptrs: list, nnzs: list) -> torch.Tensor:
        """CSR row pointers (each from 0; block i holds ``nnzs[i]`` entries) → one row pointer over all
        their rows, block after block (the codes of several layers or sources as one CSR)."""
        parts, start = [row_ptrs[0]], nnzs[0]
        for rp, n in zip(row_ptrs[1:], nnzs[1:]):
            parts.append(rp[1:] + start)
            start += n
        return torch.cat(parts)

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


class DenseCodes(SparseCodes):
    """Codes held as a dense [B, F] tensor and the bool [B, F] mask of their entries (module docstring).

    ``dense`` (floating [B, F], differentiable) must be zero wherever ``stored`` is False; ``stored``
    holds the entries: the non-zero values and, for JumpReLU, the band entries stored as zeros. The
    CSR fields (``row_ptr``, ``index``, ``value``) are built on first access and cached; ``nnz`` and
    ``density`` count ``stored`` (one device sync, once, unless the count is passed in as ``nnz``)."""

    is_dense = True

    def __init__(self, dense: torch.Tensor, stored: torch.Tensor, nnz: Optional[int] = None) -> None:
        if not isinstance(dense, torch.Tensor) or dense.dim() != 2 or not dense.is_floating_point():
            got = getattr(dense, "dtype", type(dense).__name__)
            raise TypeError(f"dense: expected a floating [B, F] tensor, got {got} of shape "
                            f"{tuple(getattr(dense, 'shape', ()))}")
        if not isinstance(stored, torch.Tensor) or stored.dtype != torch.bool or stored.shape != dense.shape:
            raise TypeError(f"stored: expected a bool tensor of dense's shape {tuple(dense.shape)}, got "
                            f"{getattr(stored, 'dtype', type(stored).__name__)} of shape "
                            f"{tuple(getattr(stored, 'shape', ()))}")
        if stored.device != dense.device:
            raise ValueError(f"stored: is on {stored.device} but dense is on {dense.device}")
        self.dense, self.stored = dense, stored
        self.n_features, self.k = dense.shape[1], None
        self._nnz = nnz
        self._csr: Optional[SparseCodes] = None
        self._flat, self._flat_F = None, 0

    # the CSR view, built once on demand
    def to_sparse(self) -> SparseCodes:
        """These codes as CSR ``SparseCodes`` (entries in row-major order, values gathered
        differentiably from ``dense``); built once and cached."""
        if self._csr is None:
            row_ptr, rows, cols = SparseCodes.pattern_from_mask(self.stored)
            self._csr = SparseCodes(row_ptr, cols.to(torch.int32), self.dense[rows, cols], self.n_features)
            self._nnz = self._csr.nnz
        return self._csr

    @property
    def row_ptr(self) -> torch.Tensor:
        return self.to_sparse().row_ptr

    @property
    def index(self) -> torch.Tensor:
        return self.to_sparse().index

    @property
    def value(self) -> torch.Tensor:
        return self.to_sparse().value

    @property
    def batch_size(self) -> int:
        return self.dense.shape[0]

    @property
    def nnz(self) -> int:
        if self._nnz is None:
            self._nnz = int(self.stored.sum())
        return self._nnz

    @property
    def device(self) -> torch.device:
        return self.dense.device

    @property
    def dtype(self) -> torch.dtype:
        return self.dense.dtype

    def flat_index(self, n_features: Optional[int] = None) -> torch.Tensor:
        return self.to_sparse().flat_index(self._features(n_features))

    def row_ids(self) -> torch.Tensor:
        return self.to_sparse().row_ids()

    def row_lengths(self) -> torch.Tensor:
        return self.stored.sum(1)

    def l0(self) -> torch.Tensor:
        if self.batch_size == 0:
            return torch.zeros((), device=self.device)
        return (self.dense.detach() > 0).sum().float() / self.batch_size

    def active_features(self, n_features: Optional[int] = None) -> torch.Tensor:
        self._features(n_features)
        return (self.dense.detach() > 0).any(0)

    def to_dense(self, n_features: Optional[int] = None) -> torch.Tensor:
        self._features(n_features)
        return self.dense

    def topk_view(self) -> tuple[torch.Tensor, torch.Tensor]:
        raise ValueError("topk_view: these codes have no fixed row length k")

    def with_value(self, value: torch.Tensor) -> "DenseCodes":
        """The same entries with other values: ``value`` is [B, F] (dense) here."""
        if value.shape != self.dense.shape:
            raise ValueError(f"value: expected the dense shape {tuple(self.dense.shape)}, got {tuple(value.shape)}")
        return DenseCodes(value, self.stored, self._nnz)

    def detach(self) -> "DenseCodes":
        return DenseCodes(self.dense.detach(), self.stored, self._nnz)

    def _features(self, n_features: Optional[int]) -> int:
        if n_features is not None and n_features != self.n_features:
            raise ValueError(f"n_features: these codes have F={self.n_features}, got {n_features}")
        return self.n_features

    def __repr__(self) -> str:
        nnz = "?" if self._nnz is None else self._nnz
        return (f"DenseCodes(batch_size={self.batch_size}, nnz={nnz}, n_features={self.n_features}, "
                f"dtype={self.dtype}, device={self.device})")
