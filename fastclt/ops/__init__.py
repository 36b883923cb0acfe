"""fastclt ops (docs/DESIGN.md §11): functional entry points with
``impl="auto"|"cuda"|"triton"|"cpu"|"dense"|"reference"``.

Each entry point validates its arguments once (``_checks``), picks an implementation from the op
table (``_registry``: ``FASTCLT_IMPL`` overrides "auto"; a dtype a kernel does not take runs the
reference) and calls it. The implementations of an op live in files of the same name under
``reference/`` (pure PyTorch: the test oracle and the eager baseline of every benchmark),
``triton/`` and ``ext/`` (the fastclt._C extension); ``python -c "import fastclt.ops as o;
print(o.implementations('topk'))"`` lists an op's.

The selection ops (``topk``, ``batch_topk``, ``batch_topk_layers``, ``encode``, ``encode_layers``,
``auxk_select``) take ``group=``: a torch.distributed process group over whose ranks the features
are sharded (tensor parallelism; rank r holds the r-th contiguous block of F). They then select
exactly over all shards and return this rank's share, with local feature indices
(``fastclt.ops.sharded``; docs/DESIGN.md §14).

Matryoshka dictionaries (docs/DESIGN.md §15) decode every prefix with one call of the dispatched
decodes (``fastclt.ops.prefix_decode``: ``split_codes``, ``matryoshka_blocks``, ...) and take every
prefix's squared error from the op ``prefix_errors``; MOLTs (§16) apply their gated low-rank
transforms with the op ``molt_decode`` (``molt_norms``: batched matmuls, not dispatched).
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

from fastclt.codes import DenseCodes, SparseCodes
from fastclt.names import ACTIVATIONS, SELECTIONS, TYINGS
from fastclt.ops import _checks
from fastclt.ops import density as _density
from fastclt.ops._registry import capturable, implementations, resolve
from fastclt.ops.reference.activation import band_mask, jumprelu_dense, jumprelu_step
from fastclt.ops.reference.clt_decode import feature_affine
from fastclt.ops.reference.encode import preacts, preacts_layers
from fastclt.ops.prefix_decode import (matryoshka_blocks, matryoshka_clt_blocks, matryoshka_clt_decode,
                                       matryoshka_decode, prefix_bounds, prefix_sums, split_codes)
from fastclt.ops.reference.losses import auxk_loss, fvu, mse, preact_loss, sparsity_loss, squared_error
from fastclt.ops.reference.molt import molt_norms, rank_ptr
from fastclt.ops.sharded import as_shards

__all__ = [
    "SparseCodes", "DenseCodes", "ACTIVATIONS", "TYINGS",
    "encode", "encode_layers", "relu", "jumprelu", "topk", "batch_topk", "batch_topk_layers",
    "sparse_decode", "clt_decode", "auxk_select", "molt_decode", "prefix_errors", "total_variance", "fvu_terms",
    "code_stats",
    "jumprelu_dense", "jumprelu_step", "band_mask", "feature_affine", "preacts", "preacts_layers",
    "mse", "fvu", "sparsity_loss", "preact_loss", "auxk_loss", "squared_error",
    "split_codes", "prefix_bounds", "prefix_sums", "matryoshka_blocks", "matryoshka_decode", "matryoshka_clt_blocks",
    "matryoshka_clt_decode", "molt_norms", "rank_ptr",
    "implementations", "resolve", "capturable",
]


def _call(op: str, impl: str, like: Optional[torch.Tensor], shards, *args, density: Optional[float] = None,
          **kwargs):
    """Run ``op`` with the implementation chosen for the device and dtype of the tensor ``like``
    (and that takes a process group, when ``shards`` is given; for the ``density`` of its codes,
    when the op has a dense formulation: docs/DESIGN.md §17)."""
    if isinstance(like, torch.Tensor):
        device, dtype = like.device, like.dtype
    else:
        device, dtype = torch.device("cpu"), None
    _, fn = resolve(op, impl, device, dtype, sharded=shards is not None, density=density)
    if shards is not None:
        kwargs["shards"] = shards
    return fn(*args, **kwargs)


def _n(shards) -> int:
    return 1 if shards is None else shards.size


def encode(x: torch.Tensor, W_enc: torch.Tensor, b_enc: Optional[torch.Tensor], *, activation: str,
           k: Optional[int] = None, threshold: Optional[torch.Tensor] = None, bandwidth: float = 0.01,
           pre_bias: Optional[torch.Tensor] = None, return_preacts: bool = False, group=None,
           impl: str = "auto", form: str = "sparse"):
    """x: [B, d_in], W_enc: [F, d_in], b_enc: [F] → SparseCodes of ``act(W_enc (x − pre_bias) + b_enc)``
    (and the dense h: [B, F] when ``return_preacts``; fused kernels then fall back to writing it).
    activation: one of ACTIVATIONS; k for TopK / BatchTopK; threshold [F] and bandwidth ε for JumpReLU.
    ``group``: W_enc, b_enc, threshold hold this rank's features (TopK/BatchTopK select over all).
    ``form="dense"`` (ReLU / JumpReLU, impl "auto" or "dense"): the codes held dense, ``DenseCodes``
    (one GEMM and a masked activation, fastclt/ops/dense/encode.py; docs/DESIGN.md §17)."""
    shards = as_shards(group) if activation in SELECTIONS else None
    _checks.check_encode(x, W_enc, b_enc, activation, k, threshold, bandwidth, pre_bias, _n(shards))
    if form != "sparse":
        _checks.check_dense_form(form, activation, impl)
        from fastclt.ops.dense.encode import encode as dense_encode

        return dense_encode(x, W_enc, b_enc, activation=activation, threshold=threshold, bandwidth=bandwidth,
                            pre_bias=pre_bias, return_preacts=return_preacts)
    return _call("encode", impl, x, shards, x, W_enc, b_enc, activation=activation, k=k, threshold=threshold,
                 bandwidth=bandwidth, pre_bias=pre_bias, return_preacts=return_preacts)


def encode_layers(x: torch.Tensor, W_enc: torch.Tensor, b_enc: Optional[torch.Tensor], k: int,
                  pre_bias: Optional[torch.Tensor] = None, *, across_layers: bool = True, group=None,
                  impl: str = "auto") -> list[SparseCodes]:
    """BatchTopK of L layers: x: [B, L, d_in], W_enc: [L, F, d_in], b_enc: [L, F] → L SparseCodes
    with exactly k·B·L entries over all layers together (a CLT's ``batchtopk_across_layers``), or
    k·B per layer when not ``across_layers`` (one selection for all layers under a ``group``)."""
    shards = as_shards(group)
    _checks.check_encode_layers(x, W_enc, b_enc, k, pre_bias, _n(shards))
    return _call("encode_layers", impl, x, shards, x, W_enc, b_enc, k, pre_bias, across_layers=across_layers)


def relu(h: torch.Tensor, *, impl: str = "auto") -> SparseCodes:
    """h: [B, F] → SparseCodes of the positive entries."""
    _checks.check_h(h, 2, "[B, F]")
    return _call("relu", impl, h, None, h)


def jumprelu(h: torch.Tensor, threshold: torch.Tensor, bandwidth: float, *, impl: str = "auto") -> SparseCodes:
    """h: [B, F], threshold: [F] → SparseCodes of the active and threshold-band entries
    (docs/DESIGN.md §3: the band entries are stored as zeros for the straight-through θ gradient)."""
    _checks.check_jumprelu(h, threshold, bandwidth)
    return _call("jumprelu", impl, h, None, h, threshold, bandwidth)


def topk(h: torch.Tensor, k: int, *, group=None, impl: str = "auto") -> SparseCodes:
    """h: [B, F] → SparseCodes with the k largest entries of each row, ReLU applied."""
    shards = as_shards(group)
    _checks.check_h(h, 2, "[B, F]")
    _checks.check_k(k, h.shape[1] * _n(shards))
    return _call("topk", impl, h, shards, h, k)


def batch_topk(h: torch.Tensor, k: int, *, group=None, impl: str = "auto") -> SparseCodes:
    """h: [B, F] → SparseCodes with exactly k·B entries, the largest of the batch, ReLU applied."""
    shards = as_shards(group)
    _checks.check_h(h, 2, "[B, F]")
    _checks.check_k(k, h.shape[1] * _n(shards))
    return _call("batch_topk", impl, h, shards, h, k)


def batch_topk_layers(h: torch.Tensor, k: int, *, group=None, impl: str = "auto") -> list[SparseCodes]:
    """h: [L, B, F] → L SparseCodes with exactly k·B·L entries over all layers together."""
    shards = as_shards(group)
    _checks.check_h(h, 3, "[L, B, F]")
    _checks.check_k(k, h.shape[2] * _n(shards))
    return _call("batch_topk_layers", impl, h, shards, h, k)


def sparse_decode(codes: SparseCodes, W_dec: torch.Tensor, b_dec: Optional[torch.Tensor] = None, *,
                  impl: str = "auto") -> torch.Tensor:
    """codes over B rows, W_dec: [F, D] (or [F, T, d]) → y: [B, D] (or [B, T, d]).
    ``impl="auto"`` decodes densely (GEMMs) when the codes are at least as dense as the crossover, or
    are held dense (``DenseCodes``)."""
    _checks.check_sparse_decode(codes, W_dec, b_dec)
    return _call("sparse_decode", impl, W_dec, None, codes, W_dec, b_dec,
                 density=_density.of_codes([codes], W_dec.shape[0]))


def clt_decode(codes: Sequence[SparseCodes], W_dec: Union[torch.Tensor, Sequence[torch.Tensor]], tying: str,
               b_dec: Optional[torch.Tensor] = None, feature_offset: Optional[torch.Tensor] = None,
               feature_scale: Optional[torch.Tensor] = None, *, impl: str = "auto",
               skip_empty: bool = False) -> torch.Tensor:
    """codes: L SparseCodes (source layers) → ŷ: [B, L, d_out] (no skip term; add it outside).

    W_dec: L tensors [F, L−s, d_out] (tying "none") or [L, F, d_out] (tied: "per_source",
    "per_target"); b_dec: [L, d_out] or None (None for AuxK: never add b_dec there);
    feature_offset / feature_scale: [L, F] per target layer (tied only) or None (docs/DESIGN.md §2.1).
    ``impl="auto"`` decodes densely (GEMMs) when the codes of all sources together are at least as
    dense as the crossover. ``skip_empty``: an implementation may leave out the sources whose codes
    hold no entry (the same ŷ; their decoder blocks then get no gradient from this call, so use it
    only for a second decode of decoders that another one reaches, as AuxK's: data-parallel ranks
    reduce the gradients of every parameter that has one)."""
    _checks.check_clt_decode(codes, W_dec, tying, b_dec, feature_offset, feature_scale)
    like = W_dec if isinstance(W_dec, torch.Tensor) else W_dec[0]
    F = like.shape[-2] if isinstance(W_dec, torch.Tensor) else like.shape[0]
    return _call("clt_decode", impl, like, None, codes, W_dec, tying, b_dec, feature_offset, feature_scale,
                 density=_density.of_codes(codes, F), skip_empty=skip_empty)


def auxk_select(x: torch.Tensor, W_enc: torch.Tensor, b_enc: Optional[torch.Tensor], dead_mask: torch.Tensor,
                k_aux: int, pre_bias: Optional[torch.Tensor] = None, *, group=None, n_dead: Optional[int] = None,
                impl: str = "auto") -> SparseCodes:
    """Top min(k_aux, n_dead) of the dead features' pre-activations per row → SparseCodes with global
    feature indices (docs/DESIGN.md §4). ``group``: W_enc, b_enc, dead_mask hold this rank's features.
    ``n_dead``: dead_mask's number of True entries when the caller knows it (then the dead features are
    listed without reading the device); it must be exact."""
    shards = as_shards(group)
    _checks.check_auxk(x, W_enc, b_enc, dead_mask, k_aux, pre_bias, n_dead)
    return _call("auxk_select", impl, x, shards, x, W_enc, b_enc, dead_mask, k_aux, pre_bias, n_dead)


def molt_decode(codes: SparseCodes, x: torch.Tensor, U: torch.Tensor, V: torch.Tensor, rank_groups: Sequence,
                b_dec: Optional[torch.Tensor] = None, *, impl: str = "auto") -> torch.Tensor:
    """MOLT transforms (docs/DESIGN.md §16): gates ``codes`` (CSR over T transforms, B rows),
    x: [B, d_in], U: [R, d_out], V: [R, d_in] (one dtype; transform i owns the packed rank rows
    rank_ptr[i] : rank_ptr[i+1]), rank_groups ((count, rank), ...), b_dec: [d_out] or None →
    y[b] = Σ_{j ∈ row b} g_j · U_{i_j} (V_{i_j} x[b]) (+ b_dec): [B, d_out] in U's dtype, fp32
    accumulation; differentiable in codes.value, x, U, V and b_dec (fastclt/ops/reference/molt.py)."""
    groups = _checks.check_molt_decode(codes, x, U, V, rank_groups, b_dec)
    return _call("molt_decode", impl, U, None, codes, x, U, V, groups, b_dec)


def total_variance(y: torch.Tensor, *, impl: str = "auto") -> torch.Tensor:
    """y: [B, ..., d] → Σ_b ‖y − ȳ‖² per middle index: [...] (a scalar for [B, d]), ȳ the batch mean;
    B · the population variance, in fp32 (fp64 for fp64 y): the normaliser of the FVU and of AuxK.
    Differentiable in y (a kernel hands a y that needs a gradient to the reference)."""
    _checks.check_targets(y)
    return _call("total_variance", impl, y, None, y)


def fvu_terms(y: torch.Tensor, y_hat: torch.Tensor, *, impl: str = "auto") -> tuple:
    """y, y_hat: [B, ..., d] → (sq, tv), each [...]: sq = Σ_b ‖y − ŷ‖² (differentiable in ŷ and y) and
    tv = ``total_variance(y)`` (differentiable in y), the numerator and denominator of the FVU, in fp32
    (fp64 for fp64 y); a kernel reads y and ŷ once for both."""
    _checks.check_fvu_terms(y, y_hat)
    return _call("fvu_terms", impl, y, None, y, y_hat)


def code_stats(codes: Sequence[SparseCodes], n_features: int, *, impl: str = "auto") -> tuple:
    """The training statistics of L layers' codes (one SparseCodes per layer, on one device):
    (fmin fp32 [L, F]: each feature's smallest active (> 0) value, +inf where it has none; active
    int64 [L]: the active entries per layer). Not differentiable; reads nothing back from the
    device (fastclt/ops/reference/stats.py)."""
    _checks.check_code_stats(codes, n_features)
    return _call("code_stats", impl, codes[0].value, None, list(codes), n_features)


def prefix_errors(y: torch.Tensor, base: torch.Tensor, blocks: torch.Tensor, *, impl: str = "auto"):
    """Matryoshka prefix errors (docs/DESIGN.md §15): y [B, ..., d] targets, base broadcastable to y
    (b_dec, plus a skip term), blocks [G, B, ..., d] → (sq [G, ...]: Σ_b ‖y − ŷ_g‖² per middle index
    for ŷ_g = base + Σ_{g' ≤ g} blocks[g'], differentiable in y, base and blocks; ŷ_{G-1}, the full
    reconstruction, detached). Accumulated in fp32 (fp64 for fp64 y); the prefixes are never stored."""
    _checks.check_prefix_errors(y, base, blocks)
    return _call("prefix_errors", impl, y, None, y, base, blocks)
