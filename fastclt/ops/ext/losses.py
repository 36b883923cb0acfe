"""The C++ total variance of ``fastclt._C`` (csrc/cpu/losses_cpu.cpp) as ``total_variance`` (impl "cpu";
the math: ``fastclt/ops/reference/losses.py``): two reads of y and no temporary of its size, where
the PyTorch formulation writes y − ȳ and its square.

The kernel takes fp32 (the op table sends other dtypes to the reference) and has no backward: a y
that needs a gradient (a target computed with grad, e.g. through a language model) is handed to
the reference, which has one.
"""
from __future__ import annotations

import math

import torch

from fastclt.ops.ext._common import ops
from fastclt.ops.reference import losses as reference

__all__ = ["total_variance"]


def total_variance(y: torch.Tensor) -> torch.Tensor:
    """``fastclt.ops.total_variance`` on the C++ kernel (CPU, fp32 y [B, ..., d] → fp32 [...])."""
    if y.dtype != torch.float32:
        raise TypeError(f"y: the C++ total variance takes fp32, got {y.dtype}")
    if y.requires_grad and torch.is_grad_enabled():
        return reference.total_variance(y)
    B, mid, d = y.shape[0], y.shape[1:-1], y.shape[-1]
    return ops().total_variance(y.reshape(B, math.prod(mid), d).contiguous()).view(mid)
