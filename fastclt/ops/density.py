"""Dense or sparse: which formulation an op uses, chosen per call from the codes' density
(docs/DESIGN.md §17).

The density of codes is their stored entries over all entries, ``nnz / (B·F)`` (``SparseCodes.density``;
JumpReLU's band entries count: the backward visits them). A sparse formulation costs O(nnz·d): a
gather or scatter of one row per entry, bandwidth-bound. A dense one costs O(B·F·d) on GEMMs, which run
far closer to the device's peak. Above a *crossover* density the dense one is faster:

    decode (sparse_decode, clt_decode)   y = A W, with A the dense [B, F] codes; backward dA = G Wᵀ, dW = Aᵀ G
    encoder backward                     dH = dvalue·act'(h) scattered into [B, F]; dx = dH W_enc, dW_enc = dHᵀ x
    codes                                a ReLU / JumpReLU dictionary's training step holds its codes dense
                                         (``DenseCodes``: no CSR extraction, no scatter back into [B, F]),
                                         chosen from the density of the previous step's codes

Both give the same numbers up to rounding (tests/ops/test_density.py). The crossover of each op is a
number per device type and dtype (``DEFAULTS``, measured by ``python -m benchmarks.run --suite density
--calibrate``), overridable:

- the environment variable ``FASTCLT_DENSE_CROSSOVER``: one value for every op (``0.2``), or per op
  (``sparse_decode=0.1,encode_backward=0.3``); ``0`` or ``always``: always dense; ``inf`` or
  ``never``: always sparse;
- ``set_crossover(value, op=None)`` in Python (None restores the defaults), or the context manager
  ``crossover(value, op=None)``. The environment variable wins over both.

``STATS`` counts the choices made, per (op, "dense" | "sparse"), for tests and benchmark notes.
"""
from __future__ import annotations

import contextlib
import math
import os
from collections import Counter
from typing import Iterator, Optional, Union

import torch

__all__ = ["OPS", "DEFAULTS", "FALLBACK", "ENV", "STATS", "crossover_for", "use_dense", "of", "of_layers", "of_codes",
           "set_crossover", "crossover", "parse"]

ENV = "FASTCLT_DENSE_CROSSOVER"
OPS = ("sparse_decode", "clt_decode", "encode_backward", "codes")

# Crossover densities per (device type, dtype): at or above them the dense formulation runs.
# CPU fp32: measured on 2 cores of an idle Intel Xeon VM, torch 2.13, commit dd9dfe1, by
# `python -m benchmarks.run --suite density --shapes density-cpu --quick --calibrate` (the sweep is in
# benchmarks/results/cpu-intel-xeon-2c-density/; a sweep at 9384993, before the fused C++ dense
# JumpReLU, gave 0.15, 0.14, 0.11 and codes 0.19; an earlier one on a heavily loaded AMD EPYC VM,
# benchmarks/results/cpu-amd-epyc-2c-density/, put the three op crossovers at 0.33, 0.29, 0.15).
# CPU bf16 and CUDA: not measured yet — estimates (dense GEMMs on tensor cores win earlier);
# gpu_check.sh's bench-density stage measures the CUDA ones.
_CPU = {"sparse_decode": 0.14, "clt_decode": 0.12, "encode_backward": 0.09, "codes": 0.13}
DEFAULTS: dict = {
    ("cpu", torch.float32): dict(_CPU),
    ("cpu", torch.bfloat16): dict(_CPU),
    ("cuda", torch.float32): {"sparse_decode": 0.05, "clt_decode": 0.05, "encode_backward": 0.05, "codes": 0.05},
    ("cuda", torch.bfloat16): {"sparse_decode": 0.03, "clt_decode": 0.03, "encode_backward": 0.03, "codes": 0.03},
    ("cuda", torch.float16): {"sparse_decode": 0.03, "clt_decode": 0.03, "encode_backward": 0.03, "codes": 0.03},
}
FALLBACK = 0.30  # any other device type or dtype (fp64: the reference against the dense formulation)

STATS: Counter = Counter()
_overrides: dict = {}  # op (or None: every op) → crossover, from set_crossover


def parse(text: str) -> dict:
    """A crossover setting (``FASTCLT_DENSE_CROSSOVER``'s syntax) → {op or None: float}."""
    out: dict = {}
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        op, sep, value = part.rpartition("=")
        op = op.strip() if sep else None
        if op is not None and op not in OPS:
            raise ValueError(f"{ENV}: unknown op {op!r}; expected one of {OPS}")
        out[op] = _number(value.strip())
    if not out:
        raise ValueError(f"{ENV}: expected a density in [0, 1], 'always', 'never', or op=value pairs, got {text!r}")
    return out


def _number(value: Union[str, float]) -> float:
    words = {"always": 0.0, "dense": 0.0, "never": math.inf, "sparse": math.inf}
    if isinstance(value, str) and value.lower() in words:
        return words[value.lower()]
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{ENV}: expected a density in [0, 1], 'always' or 'never', got {value!r}") from None
    if not v >= 0:  # NaN too
        raise ValueError(f"{ENV}: expected a density >= 0 (inf: never dense), got {value!r}")
    return v


_env_cache: tuple = ("", {})


def _from_env() -> dict:
    global _env_cache
    text = os.environ.get(ENV, "")
    if text != _env_cache[0]:
        _env_cache = (text, parse(text) if text.strip() else {})
    return _env_cache[1]


def crossover_for(op: str, device: torch.device, dtype: Optional[torch.dtype]) -> float:
    """The density at or above which ``op`` runs its dense formulation on ``device`` for ``dtype``."""
    if op not in OPS:
        raise ValueError(f"op: expected one of {OPS}, got {op!r}")
    for table in (_from_env(), _overrides):
        if op in table:
            return table[op]
        if None in table:
            return table[None]
    return DEFAULTS.get((device.type, dtype), {}).get(op, FALLBACK)


def of(nnz: int, rows: int, n_features: int) -> float:
    """Density of ``nnz`` entries over ``rows`` × ``n_features`` (0 for an empty shape)."""
    total = rows * n_features
    return nnz / total if total > 0 else 0.0


def of_codes(codes, n_features: int) -> float:
    """The density the decodes choose by for the codes of one or several layers: 1 when any are held
    dense (``DenseCodes``: their dense formulation needs no scatter), else ``of_layers``."""
    if any(c.is_dense for c in codes):
        return 1.0
    return of_layers(codes, n_features)


def of_layers(codes, n_features: int) -> float:
    """Density of the codes of several source layers together: Σ nnz / (L·B·F) (a CLT decode's)."""
    return of(sum(c.nnz for c in codes), len(codes) * (codes[0].batch_size if len(codes) else 0), n_features)


def use_dense(op: str, density: float, device: torch.device, dtype: Optional[torch.dtype]) -> bool:
    """Whether ``op`` at ``density`` takes its dense formulation (counted in ``STATS``)."""
    dense = density >= crossover_for(op, device, dtype)
    STATS[(op, "dense" if dense else "sparse")] += 1
    return dense


def set_crossover(value: Union[None, float, str, dict], op: Optional[str] = None) -> None:
    """Override the crossover of ``op`` (every op when None) with ``value`` (a density, 'always',
    'never'); ``value=None`` removes the override (of ``op``, or all of them). A dict sets several:
    {op or None: value}. The environment variable ``FASTCLT_DENSE_CROSSOVER`` still wins."""
    if isinstance(value, dict):
        for o, v in value.items():
            set_crossover(v, o)
        return
    if op is not None and op not in OPS:
        raise ValueError(f"op: expected one of {OPS} or None, got {op!r}")
    if value is None:
        if op is None:
            _overrides.clear()
        else:
            _overrides.pop(op, None)
        return
    _overrides[op] = _number(value)


@contextlib.contextmanager
def crossover(value: Union[float, str, dict], op: Optional[str] = None) -> Iterator[None]:
    """``set_crossover`` for the duration of a block; the previous overrides are restored after."""
    saved = dict(_overrides)
    try:
        set_crossover(value, op)
        yield
    finally:
        _overrides.clear()
        _overrides.update(saved)
