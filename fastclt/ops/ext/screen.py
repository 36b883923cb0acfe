"""The bf16-screened encoder selection of the CPU (docs/DESIGN.md §8, csrc/README.md).

A TopK / BatchTopK encoder needs only the k (k·B) largest pre-activations h = x W_encᵀ + b_enc of its
dense [B, F] product. On CPUs with bf16 matrix units (AMX) the product of the operands rounded to
bf16 runs 4–6× faster than the fp32 GEMM, and it is within a bound E of h at every entry that
follows from the norms of the operands' bf16 parts and remainders (``fastclt::bf16_split``). The
k-th largest lower bound A + b − E is then a lower bound of the k-th largest h, every entry of
the top k has an upper bound A + b + E at or above it, and only those candidates (about 1.5–2 k
on random data) are rescored in fp32 (``fastclt::screened_topk`` / ``screened_batch_topk``). The
codes are those of the fp32 product: the same entries and values, the values summed in another
order than the BLAS sums them (so within a few fp32 roundings of the dense path's, and an exact
tie between them may break the other way).

A kernel that finds a bound not finite (NaN or Inf in the operands) hands back to the fp32 path,
which raises its own errors; one that finds a rescored value outside its bounds (a BLAS that does
not sum in fp32) turns screening off for the process, with a warning, and hands back too.

``FASTCLT_SCREEN``: ``0`` turns screening off, ``1`` screens every eligible call (fp32 CPU
operands, TopK / BatchTopK, k ≤ F / 32) whatever its size and the CPU; unset, calls of at least
``MIN_WORK`` multiply-adds with d ≥ ``MIN_D`` screen on CPUs with AMX.
"""
from __future__ import annotations

import functools
import os
import warnings
from typing import Optional

import torch

from fastclt.ops.ext._common import ops

__all__ = ["ENV", "MIN_WORK", "MIN_D", "KEEP_SHARE", "applies", "product", "select", "enabled"]

ENV = "FASTCLT_SCREEN"
# When the screen pays (2-core Xeon with AMX; the screened selection against the fp32 GEMM and its
# selection, B = 1024, F = 4096): its passes over the [B, F] bounds and the rescoring cost about what
# the bf16 GEMM saves at d = 64 (0.86× as fast), and less from d = 128 (1.21×; 1.92× at d = 512, F = 8192);
# with k = F/16 the candidates' rescoring takes it all back (0.98× at d = 256), with k = F/8 far more
# (the lane bound then admits every entry). Default: products of at least MIN_WORK multiply-adds with
# d >= MIN_D; always: k <= F / KEEP_SHARE.
MIN_WORK = 1 << 26
MIN_D = 128
KEEP_SHARE = 32

_broken = False  # set when a kernel saw a rescored value outside its bounds


@functools.lru_cache(maxsize=None)
def _bf16_units() -> bool:
    """Whether this CPU multiplies bf16 matrices in hardware (AMX tiles, oneDNN available)."""
    is_amx = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return bool(is_amx is not None and is_amx() and torch.backends.mkldnn.is_available())


def enabled() -> Optional[bool]:
    """``FASTCLT_SCREEN`` read: False (``0``), True (``1``) or None (unset: the default rule)."""
    v = os.environ.get(ENV, "").strip()
    if v in ("", "auto"):
        return None
    if v not in ("0", "1"):
        raise ValueError(f"{ENV}: expected 0, 1 or auto, got {v!r}")
    return v == "1"


def applies(x: torch.Tensor, W: torch.Tensor, b: Optional[torch.Tensor], activation: str, k: int) -> bool:
    """Whether the encode of x [B, d] with W [F, d] (bias b) screens its selection."""
    if _broken or activation not in ("topk", "batchtopk"):
        return False
    on = enabled()
    if on is False:
        return False
    if x.device.type != "cpu" or x.dtype != torch.float32 or W.dtype != torch.float32 or x.dim() != 2:
        return False
    if b is not None and b.dtype != torch.float32:
        return False
    B, d = x.shape
    F = W.shape[0]
    if B == 0 or F == 0 or d == 0 or d > 1 << 16 or F >= 1 << 31 or KEEP_SHARE * k > F:
        return False
    return on is True or (B * F * d >= MIN_WORK and d >= MIN_D and _bf16_units())


@torch.no_grad()
def product(x: torch.Tensor, W: torch.Tensor) -> tuple:
    """The screen's product: x [B, d] and W [F, d] fp32 → (A bf16 [B, F], x, W, x_norms, W_norms), A the
    product of their bf16 parts summed in fp32 (``fastclt::bf16_split``, then the CPU's bf16 GEMM)."""
    from fastclt import _ext

    # rows apart are read in place (a CLT layer of x [B, L, d]), each row contiguous and its own
    if x.stride(-1) != 1 or (x.shape[0] > 1 and x.stride(0) < x.shape[1]):
        x = x.contiguous()
    W = W.contiguous()
    x_hi, x_norms = ops().bf16_split(x)
    W_hi, W_norms = ops().bf16_split(W)
    # A in a host-pool block, as the fp32 path's h (a fresh one costs its page faults every step)
    A = torch.mm(x_hi, W_hi.t(), out=_ext.host_empty((x.shape[0], W.shape[0]), torch.bfloat16, x.device))
    return A, x, W, x_norms, W_norms


@torch.no_grad()
def select(screen: tuple, b: Optional[torch.Tensor], activation: str, k: int):
    """The selection of act(x Wᵀ + b) (TopK: k per row → (index [B, k], value [B, k]); BatchTopK: k·B
    over the batch → (row_ptr, index int32, value fp32)) from ``product``'s screen, as the fp32
    path's; None when the kernel hands back (the caller then runs the fp32 GEMM)."""
    global _broken
    A, x, W, x_norms, W_norms = screen
    b = None if b is None else b.contiguous()
    if activation == "topk":
        *out, status = ops().screened_topk(A, x, W, b, x_norms, W_norms, k)
    else:
        *out, status = ops().screened_batch_topk(A, x, W, b, x_norms, W_norms, k * x.shape[0])
    status = int(status)
    if status == 0:
        return tuple(out)
    if status == 2:
        _broken = True
        warnings.warn("fastclt: the bf16 screen of the encoder's selection found a value outside its bound "
                      "(this CPU's bf16 GEMM does not sum in fp32?); screening is off for this process",
                      RuntimeWarning, stacklevel=3)
    return None
