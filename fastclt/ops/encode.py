"""Reference encode (SPEC §2, §3, §7): ``h = W_enc (x − pre_bias) + b_enc``, then the activation.

    x: [B, d_in], W_enc: [F, d_in], b_enc: [F], pre_bias: [d_in] or None (an SAE's b_dec)
    → SparseCodes over F features (and the dense pre-activations h: [B, F] when asked)

activation: "relu" | "jumprelu" (threshold: [F], bandwidth ε) | "topk" (k per row) | "batchtopk"
(k·B over the batch). The reference writes the dense h; the fused kernels never do.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from fastclt.codes import SparseCodes
from fastclt.ops.activation import jumprelu, relu
from fastclt.ops.select import batch_topk, batch_topk_layers, check_k, topk

__all__ = ["ACTIVATIONS", "encode", "encode_layers", "preacts", "preacts_layers", "activate"]

ACTIVATIONS = ("relu", "jumprelu", "topk", "batchtopk")


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
    if out is None:
        return torch.stack([preacts(x[:, l], W_enc[l], None if b_enc is None else b_enc[l], pre_bias)
                            for l in range(x.shape[1])])
    for l in range(x.shape[1]):
        preacts(x[:, l], W_enc[l], None if b_enc is None else b_enc[l], pre_bias, out=out[l])
    return out


def activate(h: torch.Tensor, activation: str, *, k: Optional[int] = None,
             threshold: Optional[torch.Tensor] = None, bandwidth: float = 0.01) -> SparseCodes:
    """h: [B, F] → SparseCodes under ``activation`` (see the module docstring)."""
    if activation == "relu":
        return relu(h)
    if activation == "jumprelu":
        if threshold is None:
            raise ValueError("threshold: activation 'jumprelu' needs a [F] threshold")
        return jumprelu(h, threshold, bandwidth)
    if activation in ("topk", "batchtopk"):
        if k is None:
            raise ValueError(f"k: activation {activation!r} needs k")
        return topk(h, k) if activation == "topk" else batch_topk(h, k)
    raise ValueError(f"activation: expected one of {ACTIVATIONS}, got {activation!r}")


def encode(x: torch.Tensor, W_enc: torch.Tensor, b_enc: Optional[torch.Tensor], *, activation: str,
           k: Optional[int] = None, threshold: Optional[torch.Tensor] = None, bandwidth: float = 0.01,
           pre_bias: Optional[torch.Tensor] = None, return_preacts: bool = False):
    """x: [B, d_in], W_enc: [F, d_in], b_enc: [F] → SparseCodes (and h [B, F] if return_preacts)."""
    _check_encode_args(x, W_enc, b_enc, activation, k, threshold)
    h = preacts(x, W_enc, b_enc, pre_bias)
    codes = activate(h, activation, k=k, threshold=threshold, bandwidth=bandwidth)
    return (codes, h) if return_preacts else codes


def encode_layers(x: torch.Tensor, W_enc: torch.Tensor, b_enc: Optional[torch.Tensor], k: int,
                  pre_bias: Optional[torch.Tensor] = None) -> list[SparseCodes]:
    """BatchTopK across layers (a CLT option): x: [B, L, d_in], W_enc: [L, F, d_in], b_enc: [L, F],
    pre_bias: [d_in] or None → L SparseCodes holding exactly k·B·L entries over all layers together
    (the largest h of the stacked [L, B, F] pre-activations, ReLU applied)."""
    _check_layers_args(x, W_enc, b_enc, k, pre_bias)
    return batch_topk_layers(preacts_layers(x, W_enc, b_enc, pre_bias), k)


def _check_layers_args(x, W_enc, b_enc, k, pre_bias) -> tuple[int, int]:
    """Shapes of ``encode_layers``' arguments → (L, F)."""
    if x.dim() != 3:
        raise ValueError(f"x: expected [B, L, d_in], got shape {tuple(x.shape)}")
    B, L, d = x.shape
    if W_enc.dim() != 3 or W_enc.shape[0] != L or W_enc.shape[2] != d:
        raise ValueError(f"W_enc: expected [L={L}, F, d_in={d}], got shape {tuple(W_enc.shape)}")
    F = W_enc.shape[1]
    if b_enc is not None and b_enc.shape != (L, F):
        raise ValueError(f"b_enc: expected [{L}, {F}], got shape {tuple(b_enc.shape)}")
    if pre_bias is not None and pre_bias.shape != (d,):
        raise ValueError(f"pre_bias: expected [{d}], got shape {tuple(pre_bias.shape)}")
    check_k(k, F)
    return L, F


def _check_encode_args(x, W_enc, b_enc, activation, k, threshold) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation: expected one of {ACTIVATIONS}, got {activation!r}")
    if x.dim() != 2:
        raise ValueError(f"x: expected [B, d_in], got shape {tuple(x.shape)}")
    if W_enc.dim() != 2 or W_enc.shape[1] != x.shape[1]:
        raise ValueError(f"W_enc: expected [F, d_in={x.shape[1]}], got shape {tuple(W_enc.shape)}")
    if b_enc is not None and b_enc.shape != (W_enc.shape[0],):
        raise ValueError(f"b_enc: expected [{W_enc.shape[0]}], got shape {tuple(b_enc.shape)}")
    if activation in ("topk", "batchtopk"):
        if k is None:
            raise ValueError(f"k: activation {activation!r} needs k")
        check_k(k, W_enc.shape[0])
    if activation == "jumprelu" and (threshold is None or threshold.shape != (W_enc.shape[0],)):
        got = None if threshold is None else tuple(threshold.shape)
        raise ValueError(f"threshold: expected [{W_enc.shape[0]}] for 'jumprelu', got {got}")
