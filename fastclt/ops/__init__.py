"""fastclt ops (SPEC §7): functional entry points with ``impl="auto"|"cuda"|"triton"|"cpu"|"reference"``.

Each entry point validates its arguments, picks an implementation through ``_dispatch.resolve``
(env ``FASTCLT_IMPL`` overrides "auto") and calls it. The pure-PyTorch references live in
``activation``, ``select``, ``encode``, ``decode``, ``auxk``, ``molt``, ``matryoshka`` (``prefix_errors``)
and ``losses``: they are the test oracle and the eager baseline of every benchmark. ``split_codes`` and
``matryoshka`` compose the dispatched ops (Matryoshka prefix decodes on every backend); ``molt_norms``
is batched matmuls.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

from fastclt.codes import SparseCodes
from fastclt.ops import _dispatch
from fastclt.ops._dispatch import implementations, resolve
from fastclt.ops.activation import band_mask, jumprelu_dense, jumprelu_step
from fastclt.ops.decode import TYINGS, feature_affine
from fastclt.ops.encode import ACTIVATIONS, preacts, preacts_layers
from fastclt.ops.losses import auxk_loss, fvu, mse, preact_loss, sparsity_loss
from fastclt.ops.matryoshka import (matryoshka_blocks, matryoshka_clt_blocks, matryoshka_clt_decode, matryoshka_decode,
                                   prefix_errors, prefix_sums)
from fastclt.ops.molt import molt_decode, molt_norms
from fastclt.ops.split_codes import split_codes

__all__ = [
    "SparseCodes", "ACTIVATIONS", "TYINGS",
    "encode", "encode_layers", "relu", "jumprelu", "topk", "batch_topk", "batch_topk_layers",
    "sparse_decode", "clt_decode", "auxk_select",
    "jumprelu_dense", "jumprelu_step", "band_mask", "feature_affine", "preacts", "preacts_layers",
    "mse", "fvu", "sparsity_loss", "preact_loss", "auxk_loss",
    "split_codes", "matryoshka_blocks", "matryoshka_clt_blocks", "matryoshka_decode", "matryoshka_clt_decode",
    "prefix_sums", "prefix_errors",
    "molt_decode", "molt_norms",
    "implementations", "resolve",
]

_REFERENCE = {
    "encode": "fastclt.ops.encode:encode",
    "encode_layers": "fastclt.ops.encode:encode_layers",
    "relu": "fastclt.ops.activation:relu",
    "jumprelu": "fastclt.ops.activation:jumprelu",
    "topk": "fastclt.ops.select:topk",
    "batch_topk": "fastclt.ops.select:batch_topk",
    "batch_topk_layers": "fastclt.ops.select:batch_topk_layers",
    "sparse_decode": "fastclt.ops.decode:sparse_decode",
    "clt_decode": "fastclt.ops.decode:clt_decode",
    "auxk_select": "fastclt.ops.auxk:auxk_select",
    "molt_decode": "fastclt.ops.molt:reference_molt_decode",
    "prefix_errors": "fastclt.ops.matryoshka:reference_prefix_errors",
}
for _op, _target in _REFERENCE.items():
    _dispatch.register(_op, "reference", _target)

# The kernels register lazily-imported targets: neither Triton nor fastclt._C is imported here.
from fastclt.ops.ext_matryoshka import register_ext_matryoshka  # noqa: E402
from fastclt.ops.ext_molt import register_ext_molt  # noqa: E402
from fastclt.ops.ext_ops import register_ext_impls  # noqa: E402
from fastclt.ops.triton import register_triton_impls  # noqa: E402

register_triton_impls()
register_ext_impls()
register_ext_molt()
register_ext_matryoshka()


def _call(op: str, impl: str, like: Optional[torch.Tensor], *args, **kwargs):
    """Run ``op`` with the implementation chosen for the device and dtype of the tensor ``like``."""
    if isinstance(like, torch.Tensor):
        device, dtype = like.device, like.dtype
    else:
        device, dtype = torch.device("cpu"), None
    _, fn = resolve(op, impl, device, dtype)
    return fn(*args, **kwargs)


def encode(x: torch.Tensor, W_enc: torch.Tensor, b_enc: Optional[torch.Tensor], *, activation: str,
           k: Optional[int] = None, threshold: Optional[torch.Tensor] = None, bandwidth: float = 0.01,
           pre_bias: Optional[torch.Tensor] = None, return_preacts: bool = False, impl: str = "auto"):
    """x: [B, d_in], W_enc: [F, d_in], b_enc: [F] → SparseCodes of ``act(W_enc (x − pre_bias) + b_enc)``
    (and the dense h: [B, F] when ``return_preacts``; fused kernels then fall back to writing it)."""
    return _call("encode", impl, x, x, W_enc, b_enc, activation=activation, k=k, threshold=threshold,
                 bandwidth=bandwidth, pre_bias=pre_bias, return_preacts=return_preacts)


def encode_layers(x: torch.Tensor, W_enc: torch.Tensor, b_enc: Optional[torch.Tensor], k: int,
                  pre_bias: Optional[torch.Tensor] = None, *, impl: str = "auto") -> list[SparseCodes]:
    """BatchTopK across layers: x: [B, L, d_in], W_enc: [L, F, d_in], b_enc: [L, F] → L SparseCodes
    with exactly k·B·L entries over all layers together (a CLT's ``batchtopk_across_layers``)."""
    return _call("encode_layers", impl, x, x, W_enc, b_enc, k, pre_bias)


def relu(h: torch.Tensor, *, impl: str = "auto") -> SparseCodes:
    """h: [B, F] → SparseCodes of the positive entries."""
    return _call("relu", impl, h, h)


def jumprelu(h: torch.Tensor, threshold: torch.Tensor, bandwidth: float, *, impl: str = "auto") -> SparseCodes:
    """h: [B, F], threshold: [F] → SparseCodes of the active and threshold-band entries (SPEC §3)."""
    return _call("jumprelu", impl, h, h, threshold, bandwidth)


def topk(h: torch.Tensor, k: int, *, impl: str = "auto") -> SparseCodes:
    """h: [B, F] → SparseCodes with the k largest entries of each row, ReLU applied."""
    return _call("topk", impl, h, h, k)


def batch_topk(h: torch.Tensor, k: int, *, impl: str = "auto") -> SparseCodes:
    """h: [B, F] → SparseCodes with exactly k·B entries, the largest of the batch, ReLU applied."""
    return _call("batch_topk", impl, h, h, k)


def batch_topk_layers(h: torch.Tensor, k: int, *, impl: str = "auto") -> list[SparseCodes]:
    """h: [L, B, F] → L SparseCodes with exactly k·B·L entries over all layers together."""
    return _call("batch_topk_layers", impl, h, h, k)


def sparse_decode(codes: SparseCodes, W_dec: torch.Tensor, b_dec: Optional[torch.Tensor] = None, *,
                  impl: str = "auto") -> torch.Tensor:
    """codes over B rows, W_dec: [F, D] (or [F, T, d]) → y: [B, D] (or [B, T, d])."""
    return _call("sparse_decode", impl, W_dec, codes, W_dec, b_dec)


def clt_decode(codes: Sequence[SparseCodes], W_dec: Union[torch.Tensor, Sequence[torch.Tensor]], tying: str,
               b_dec: Optional[torch.Tensor] = None, feature_offset: Optional[torch.Tensor] = None,
               feature_scale: Optional[torch.Tensor] = None, *, impl: str = "auto") -> torch.Tensor:
    """L codes (one per source layer) → ŷ: [B, L, d_out]; see ``fastclt.ops.decode.clt_decode``."""
    like = W_dec if isinstance(W_dec, torch.Tensor) else (W_dec[0] if len(W_dec) else None)
    return _call("clt_decode", impl, like, codes, W_dec, tying, b_dec, feature_offset, feature_scale)


def auxk_select(x: torch.Tensor, W_enc: torch.Tensor, b_enc: Optional[torch.Tensor], dead_mask: torch.Tensor,
                k_aux: int, pre_bias: Optional[torch.Tensor] = None, *, impl: str = "auto") -> SparseCodes:
    """Top k_aux of the dead features' pre-activations per row → SparseCodes with global indices."""
    return _call("auxk_select", impl, x, x, W_enc, b_enc, dead_mask, k_aux, pre_bias)
