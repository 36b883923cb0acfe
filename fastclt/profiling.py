"""Phase ranges of a training step, for per-phase profiles (``benchmarks/bench_profile.py``).

The models and ops mark the phases of a step with ``phase(name)``:

    encode        ``loss``'s encoder call: the encoder GEMM, the selection (TopK / BatchTopK /
                  threshold), building the codes
    encoder_gemm  the dense encoder GEMM inside the encode ops (nested in ``encode``)
    decode        ``loss``'s decoder call (every prefix of a Matryoshka model in one decode)
    losses        reconstruction errors, sparsity / pre-activation penalties, AuxK

Outside ``phase_ranges()`` a mark costs one global read and returns a shared null context, so the
hot path pays nothing measurable. Inside it each mark is a ``torch.profiler.record_function``
range named ``PREFIX + name``: a profiler run then attributes every op (and, through the autograd
sequence numbers, every backward node) to the innermost phase that created it. How the ranges
are turned into per-phase times is ``benchmarks/bench_profile.py``'s business.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch

__all__ = ["PREFIX", "MARKS", "phase", "phase_ranges", "ranges_enabled"]

PREFIX = "fastclt.phase::"
MARKS = ("encode", "encoder_gemm", "decode", "losses")

_enabled = False
_NULL = contextlib.nullcontext()


def phase(name: str):
    """A context manager marking ``name`` (one of ``MARKS``, or another label): a profiler range
    inside ``phase_ranges()``, nothing outside."""
    if not _enabled:
        return _NULL
    return torch.profiler.record_function(PREFIX + name)


def ranges_enabled() -> bool:
    return _enabled


@contextlib.contextmanager
def phase_ranges() -> Iterator[None]:
    """Emit the phase ranges within this block (restores the previous state on exit)."""
    global _enabled
    old, _enabled = _enabled, True
    try:
        yield
    finally:
        _enabled = old
