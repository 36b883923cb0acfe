"""Reference encode (docs/DESIGN.md §2, §3, §7): ``h = W_enc (x − pre_bias) + b_enc``, then the activation.

    x: [B, d_in], W_enc: [F, d_in], b_enc: [F], pre_bias: [d_in] or None (an SAE's b_dec)
    → SparseCodes over F features (and the dense pre-activations h: [B, F] when asked)

activation: "relu" | "jumprelu" (threshold: [F], bandwidth ε) | "topk" (k per row) | "batchtopk"
(k·B over the batch). The reference writes the dense h; the fused kernels never do. With
``shards`` (features sharded over a process group: W_enc holds this rank's rows) the selections
run over all shards (``fastclt.ops.sharded``).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from fastclt.codes import SparseCodes
from fastclt.ops.reference import select as reference_select
from fastclt.ops.reference.activation import jumprelu, relu
from fastclt.profiling import phase

__all__ = ["encode", "encode_layers", "preacts", "preacts_layers", "activate"]


def preacts(x: torch.Tensor, W_enc: torch.Tensor, b_enc: Optional[torch.Tensor],
            pre_bias: Optional[torch.Tensor] = None, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x: [B, d_in], W_enc: [F, d_in], b_enc: [F] → h: [B, F] (dense).

    ``out``: a contiguous [B, F] tensor to write h into (not differentiable; for callers that
    supply their own buffer, e.g. a reused host block)."""
    if pre_bias is not None:
        x = x - pre_bias.to(x.dtype)
    if out is None:
        return F.linear(x, W_enc, b_enc)
    if b_enc is None:
        return torch.mm(x, W_enc.t(), out=out)
    return torch.addmm(b_enc, x, W_enc.t(), out=out)  # as F.linear: one rounding of GEMM + bias


def preacts_layers(x: torch.Tensor, W_enc: torch.Tensor, b_enc: Optional[torch.Tensor],
                   pre_bias: Optional[torch.Tensor] = None, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x: [B, L, d_in], W_enc: [L, F, d_in], b_enc: [L, F] → h: [L, B, F] (dense, layer by layer);
    ``out``: as for ``preacts``, [L, B, F]."""
    # layer views by unbind: indexing W_enc[l] would make each layer's backward a zero-filled [L, F, d]
    xs, Ws, bs = x.unbind(1), W_enc.unbind(0), [None] * x.shape[1] if b_enc is None else b_enc.unbind(0)
    if out is None:
        return torch.stack([preacts(x_l, W_l, b_l, pre_bias) for x_l, W_l, b_l in zip(xs, Ws, bs)])
    for l, (x_l, W_l, b_l) in enumerate(zip(xs, Ws, bs)):
        preacts(x_l, W_l, b_l, pre_bias, out=out[l])
    return out


def activate(h: torch.Tensor, activation: str, *, k: Optional[int] = None,
             threshold: Optional[torch.Tensor] = None, bandwidth: float = 0.01, shards=None,
             select=reference_select) -> SparseCodes:
    """h: [B, F] → SparseCodes under ``activation`` (see the module docstring; arguments checked by
    the caller). ``select``: the module whose ``topk`` / ``batch_topk`` select (a backend's)."""
    if activation == "relu":
        return relu(h)
    if activation == "jumprelu":
        return jumprelu(h, threshold, bandwidth)
    fn = select.topk if activation == "topk" else select.batch_topk
    return fn(h, k) if shards is None else fn(h, k, shards)


def encode(x: torch.Tensor, W_enc: torch.Tensor, b_enc: Optional[torch.Tensor], *, activation: str,
           k: Optional[int] = None, threshold: Optional[torch.Tensor] = None, bandwidth: float = 0.01,
           pre_bias: Optional[torch.Tensor] = None, return_preacts: bool = False, shards=None):
    """x: [B, d_in], W_enc: [F, d_in], b_enc: [F] → SparseCodes (and h [B, F] if return_preacts)."""
    with phase("encoder_gemm"):
        h = preacts(x, W_enc, b_enc, pre_bias)
    codes = activate(h, activation, k=k, threshold=threshold, bandwidth=bandwidth, shards=shards)
    return (codes, h) if return_preacts else codes


def encode_layers(x: torch.Tensor, W_enc: torch.Tensor, b_enc: Optional[torch.Tensor], k: int,
                  pre_bias: Optional[torch.Tensor] = None, *, across_layers: bool = True,
                  shards=None) -> list[SparseCodes]:
    """BatchTopK of a CLT's L layers: x: [B, L, d_in], W_enc: [L, F, d_in], b_enc: [L, F],
    pre_bias: [d_in] or None → L SparseCodes holding exactly k·B·L entries over all layers together
    (the largest h of the stacked [L, B, F] pre-activations, ReLU applied), or k·B per layer when
    not ``across_layers``."""
    if not across_layers and shards is None:
        bs = [None] * x.shape[1] if b_enc is None else b_enc.unbind(0)
        return [encode(x_l, W_l, b_l, activation="batchtopk", k=k, pre_bias=pre_bias)
                for x_l, W_l, b_l in zip(x.unbind(1), W_enc.unbind(0), bs)]
    with phase("encoder_gemm"):
        h = preacts_layers(x, W_enc, b_enc, pre_bias)
    if not across_layers:
        return reference_select.batch_topk_per_layer(h, k, shards)
    return reference_select.batch_topk_layers(h, k, shards)
