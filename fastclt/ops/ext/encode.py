"""Encode on the extension's kernels (impl "cpu" and "cuda"; docs/DESIGN.md §3, §7, §8).

Forward: the dense encoder GEMM (the CPU BLAS / cuBLAS) outside autograd, the entries found by the
extension's exact selections (``fastclt.ops.ext.select``) or, for ReLU and JumpReLU, by
``fastclt::threshold_compact`` on the CPU (a mask elsewhere); h is gathered at the entries and the
dense h freed. Where the CPU's TopK / BatchTopK screens (``fastclt.ops.ext.screen``), a bf16 GEMM
with a proven error bound and the candidates rescored in fp32 replace the fp32 GEMM: the same codes.
Backward: the sparse encoder backward (``fastclt.ops.encoder_backward``) on
``fastclt::feature_scatter`` and ``fastclt::sparse_decode`` — no dense [B, F] gradient and no
backward GEMM. ``return_preacts`` keeps h in autograd and returns it too. Same codes as the reference.
"""
from __future__ import annotations

from typing import Optional

import torch

from fastclt.codes import SparseCodes
from fastclt.ops import density, sharded
from fastclt.ops.encoder_backward import encode_codes
from fastclt.ops.ext import screen
from fastclt.ops.ext import select as ext_select
from fastclt.ops.ext._common import EXT_KERNELS, h_out, ops
from fastclt.ops.reference.activation import band_mask
from fastclt.ops.reference.encode import activate, preacts, preacts_layers
from fastclt.profiling import phase

__all__ = ["encode", "encode_layers"]


def _pattern(h: torch.Tensor, activation: str, k: Optional[int], threshold: Optional[torch.Tensor],
             bandwidth: float, shards: Optional[sharded.Shards]):
    """Dense h: [B, F] (no grad) → (row_ptr, row int64, col int32, h fp32 at the entries), sorted by (row, col)."""
    if activation in ("relu", "jumprelu") and h.device.type == "cpu":
        # one read of h, no dense mask (csrc/cpu/select_cpu.cpp); the band's half-width rounded to
        # h's dtype, as `band_mask`'s comparison does
        thr = None if activation == "relu" else threshold.to(h.dtype).contiguous()
        half = 0.0 if activation == "relu" else float(torch.tensor(0.5 * bandwidth, dtype=h.dtype))
        row_ptr, col, h_e = ops().threshold_compact(h, thr, half)
        return row_ptr, SparseCodes.rows_of(row_ptr, col.shape[0]), col, h_e
    if activation in ("relu", "jumprelu"):
        mask = h > 0 if activation == "relu" else band_mask(h, threshold.to(h.dtype), bandwidth)
        row_ptr, row, col = SparseCodes.pattern_from_mask(mask)
    elif shards is not None:
        if activation == "topk":
            row_ptr, col = ext_select.topk_entries(h, k, shards)
        else:
            row_ptr, col = ext_select.sharded_batch_topk_entries(h[None], k, False, shards)[0]
        col = col.long()
        row = SparseCodes.rows_of(row_ptr, col.shape[0])
    else:
        c = ext_select.topk(h, k) if activation == "topk" else ext_select.batch_topk(h, k)
        row_ptr, col, row = c.row_ptr, c.index.long(), c.row_ids()
    return row_ptr, row, col.to(torch.int32), h[row, col].float()


def encode(x: torch.Tensor, W_enc: torch.Tensor, b_enc: Optional[torch.Tensor], *, activation: str,
           k: Optional[int] = None, threshold: Optional[torch.Tensor] = None, bandwidth: float = 0.01,
           pre_bias: Optional[torch.Tensor] = None, return_preacts: bool = False,
           shards: Optional[sharded.Shards] = None):
    """x: [B, d_in], W_enc: [F, d_in], b_enc: [F] → SparseCodes of ``act(W_enc (x − pre_bias) + b_enc)``
    (see the module docstring)."""
    if return_preacts:
        h = preacts(x, W_enc, b_enc, pre_bias)
        return activate(h, activation, k=k, threshold=threshold, bandwidth=bandwidth, shards=shards,
                        select=ext_select), h
    row_ptr, row, col, h_e, centered = _entries(x, W_enc, b_enc, activation, k, threshold, bandwidth, pre_bias, shards)
    return encode_codes(x, W_enc, b_enc, threshold, pre_bias, row_ptr, row, col, h_e, activation, bandwidth,
                        EXT_KERNELS, k if activation == "topk" and shards is None else None, centered)


@torch.no_grad()
def _entries(x, W_enc, b_enc, activation, k, threshold, bandwidth, pre_bias, shards):
    """encode's forward without autograd → (row_ptr, row, col, h fp32 at the entries, centered)."""
    # CPU fp32 TopK / BatchTopK: the GEMM without its bias (no broadcast copy, beta = 0), the bias
    # folded into the select (fastclt::topk_bias, fastclt::batch_topk_bias); elsewhere the GEMM adds it
    fold = activation in ("topk", "batchtopk") and shards is None and _folds(x, b_enc)
    centered = None
    with phase("encoder_gemm"):
        # x − pre_bias once, for the GEMM and (fp32: the same numbers) for dW_enc in the backward
        if pre_bias is not None and x.dtype == torch.float32:
            centered = x.detach() - pre_bias.detach().to(x.dtype)
        xs = x.detach() if centered is None else centered
        # on CPUs with bf16 matrix units, a bf16 screen and the candidates rescored in fp32 (fastclt/ops/ext/screen.py)
        product = screen.product(xs, W_enc.detach()) if fold and screen.applies(xs, W_enc, b_enc, activation, k) \
            else None
    picked = None if product is None else screen.select(product, b_enc.detach(), activation, k)
    del product
    if picked is not None:
        c = SparseCodes.from_topk(*picked, W_enc.shape[0]) if activation == "topk" else \
            SparseCodes(*picked, W_enc.shape[0])
        return c.row_ptr, None, c.index, c.value, centered
    with phase("encoder_gemm"):
        h = preacts(xs, W_enc.detach(), None if b_enc is None or fold else b_enc.detach(),
                    None if pre_bias is None or centered is not None else pre_bias.detach(),
                    out=h_out(x, x.shape[0], W_enc.shape[0]))
    if fold:
        bias = b_enc.detach().contiguous()
        if activation == "topk":
            c = SparseCodes.from_topk(*ops().topk_bias(h, bias, k), h.shape[1])
        else:
            c = SparseCodes(*ops().batch_topk_bias(h, bias, k * h.shape[0]), h.shape[1])
        # relu'd: the same codes and mask; no row of each entry (the backward reads row_ptr)
        return c.row_ptr, None, c.index, c.value, centered
    threshold = None if threshold is None else threshold.detach()
    return (*_pattern(h, activation, k, threshold, bandwidth, shards), centered)


def encode_layers(x: torch.Tensor, W_enc: torch.Tensor, b_enc: Optional[torch.Tensor], k: int,
                  pre_bias: Optional[torch.Tensor] = None, *, across_layers: bool = True,
                  shards: Optional[sharded.Shards] = None) -> list[SparseCodes]:
    """BatchTopK of a CLT's L layers: x: [B, L, d_in], W_enc: [L, F, d_in], b_enc: [L, F] → L SparseCodes
    with exactly k·B·L entries over all layers together (k·B per layer when not ``across_layers``):
    one exact selection over the stacked h (no grad; per layer when not across layers and unsharded:
    on the CPU in fp32 and for small layers one ``fastclt::batch_topk_bias_layers`` for all layers,
    elsewhere each layer's own GEMM and selection), then the sparse encoder backward — for all layers at once
    (``_encode_joined``) unless there is a pre-bias or the codes are dense enough for its dense form."""
    B, L, F = x.shape[0], W_enc.shape[0], W_enc.shape[1]
    xs, Ws = x.unbind(1), W_enc.unbind(0)
    bs = [None] * L if b_enc is None else b_enc.unbind(0)
    joined = pre_bias is None and L * F < 2 ** 31 and \
        k / max(F, 1) < density.crossover_for("encode_backward", x.device, x.dtype)
    if not across_layers and shards is None:
        if not joined:
            return [encode(x_l, W_l, b_l, activation="batchtopk", k=k, pre_bias=pre_bias)
                    for x_l, W_l, b_l in zip(xs, Ws, bs)]
        if _folds(x, b_enc) and B * F <= _SMALL_LAYER and not screen.applies(xs[0], Ws[0], bs[0], "batchtopk", k):
            # the L selections in one call, the bias folded in (unless each layer's is screened)
            with torch.no_grad():
                with phase("encoder_gemm"):
                    h = preacts_layers(x.detach(), W_enc.detach(), None, out=h_out(x, L, B, F))
                row_ptr, index, value = ops().batch_topk_bias_layers(h, b_enc.detach().contiguous(), k * B)
                del h
                offsets = torch.arange(0, L * F, F, device=x.device, dtype=torch.int32)
                col = (index.view(L, k * B) + offsets[:, None]).view(-1)
                layers = sharded.split_layers(row_ptr, L, B, index, bounds=[l * k * B for l in range(L + 1)])
            return _encode_joined(x, W_enc, b_enc, row_ptr, None, col, value, layers)
        pats = [_entries(x_l, W_l, b_l, "batchtopk", k, None, 0.01, None, None)[:4]
                for x_l, W_l, b_l in zip(xs, Ws, bs)]
        return _encode_joined(x, W_enc, b_enc, *_join(pats, B, F))
    with torch.no_grad():
        with phase("encoder_gemm"):
            h = preacts_layers(x.detach(), W_enc.detach(), None if b_enc is None else b_enc.detach(),
                               None if pre_bias is None else pre_bias.detach(), out=h_out(x, L, x.shape[0], F))
        if shards is None:
            parts = [(c.row_ptr, c.index) for c in ext_select.batch_topk_layers(h, k)]
        else:
            parts = ext_select.sharded_batch_topk_entries(h, k, across_layers, shards)
        pats = []
        for h_l, (row_ptr, col) in zip(h.unbind(0), parts):
            col = col.long()
            row = SparseCodes.rows_of(row_ptr, col.shape[0])
            pats.append((row_ptr, row, col.to(torch.int32), h_l[row, col].float()))
        del h, parts
    if joined:
        return _encode_joined(x, W_enc, b_enc, *_join(pats, B, F))
    return [encode_codes(x_l, W_l, b_l, None, pre_bias, *pat, "batchtopk", 0.01, EXT_KERNELS)
            for x_l, W_l, b_l, pat in zip(xs, Ws, bs, pats)]


# Layers of at most this many entries are selected by one fastclt::batch_topk_bias_layers, in parallel
# (one selection of that size runs on one thread). Larger ones are selected each right after its own
# GEMM: its h is then still in cache (4 layers of [1024, 4096]: 2.5-4 ms less per step than the GEMMs
# first and one call, 2-core Xeon).
_SMALL_LAYER = 1 << 18


def _folds(x: torch.Tensor, b_enc: Optional[torch.Tensor]) -> bool:
    """Whether a CPU TopK / BatchTopK selection takes the bias (fastclt::topk_bias and the
    batch_topk_bias ops: fp32 h and bias) so that the GEMM runs without it."""
    return (x.device.type == "cpu" and x.dtype == torch.float32 and b_enc is not None
            and b_enc.dtype == torch.float32)


@torch.no_grad()
def _join(pats: list, B: int, F: int) -> tuple:
    """The L layers' entries (row_ptr, row or None, col, h per layer) as one CSR over the L·B rows
    (layer-major) → (row_ptr, rows (None where a layer's are), col + l·F, h, [(row_ptr, col) of each layer])."""
    row_ptr = SparseCodes.join_row_ptrs([rp for rp, _, _, _ in pats], [c.shape[0] for _, _, c, _ in pats])
    rows = None if any(row is None for _, row, _, _ in pats) else \
        torch.cat([row + l * B for l, (_, row, _, _) in enumerate(pats)])
    col = torch.cat([c + l * F for l, (_, _, c, _) in enumerate(pats)])
    h = torch.cat([h_l for _, _, _, h_l in pats])
    return row_ptr, rows, col, h, [(rp, c) for rp, _, c, _ in pats]


def _encode_joined(x: torch.Tensor, W_enc: torch.Tensor, b_enc: Optional[torch.Tensor], row_ptr: torch.Tensor,
                   rows: torch.Tensor, col: torch.Tensor, h: torch.Tensor, layers: list) -> list[SparseCodes]:
    """The L layers' entries as the codes of one encode: a CSR over the rows l·B + b of x seen
    layer-major ([L, B, d_in], a view: the CPU scatter reads its rows in place; ``row_ptr``, ``rows``
    of its entries), their features
    l·F + f (``col``) of W_enc viewed [L·F, d_in] (and of b_enc viewed [L·F]), ``h`` their fp32
    pre-activations, ``layers`` each layer's own (row_ptr, col). One sparse encoder backward then
    writes dW_enc and db_enc in their own [L, F, d_in] and [L, F] layouts — no stack of per-layer
    gradients (4 layers of [4096, 256] cost ~3.5 ms of copies per step on a 2-core CPU) and one
    autograd node, not L. Each layer's values are a slice of the joined values."""
    B, L, d = x.shape
    F = W_enc.shape[1]
    codes = encode_codes(x.transpose(0, 1), W_enc.reshape(L * F, d),
                         None if b_enc is None else b_enc.reshape(L * F), None, None, row_ptr, rows, col, h,
                         "batchtopk", 0.01, EXT_KERNELS)
    lens = [c.shape[0] for _, c in layers]
    return [SparseCodes(rp, c, v, F) for (rp, c), v in zip(layers, codes.value.split(lens))]
