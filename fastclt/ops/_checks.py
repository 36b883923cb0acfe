"""Argument validation of the ops, done once by each entry point of ``fastclt.ops`` before it
dispatches (the implementations trust their arguments). Every error names the argument and what
was expected. What only one backend cannot take (e.g. a Triton decode's non-contiguous rows) is
checked by that backend."""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from fastclt.codes import SparseCodes
from fastclt.names import ACTIVATIONS, SELECTIONS, TYINGS

__all__ = ["check_h", "check_k", "check_bandwidth", "check_jumprelu", "check_encode", "check_encode_layers",
           "check_auxk", "check_sparse_decode", "check_clt_decode", "check_rank_groups", "check_molt_decode",
           "check_prefix_errors", "check_fvu_terms", "check_bounds"]


def _shape(t) -> str:
    return str(tuple(t.shape)) if isinstance(t, torch.Tensor) else type(t).__name__


def _tensor(name: str, t, device: torch.device, shape: Optional[tuple] = None, layout: str = "") -> None:
    """t: a floating-point tensor on ``device`` (of ``shape`` when given, described as ``layout``)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor, got {t.dtype}")
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name}: expected {layout or list(shape)}, got shape {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name}: expected a tensor on {device} (x's device), got {t.device}")


def check_h(h, rank: int, layout: str) -> None:
    """h: a floating-point tensor of ``rank`` dims (``layout``, e.g. "[B, F]")."""
    if not isinstance(h, torch.Tensor) or not h.is_floating_point():
        raise TypeError(f"h: expected a floating-point tensor {layout}, got {type(h).__name__}"
                        + (f" of dtype {h.dtype}" if isinstance(h, torch.Tensor) else ""))
    if h.dim() != rank:
        raise ValueError(f"h: expected {layout}, got shape {tuple(h.shape)}")


def check_k(k, n_features: int, name: str = "k") -> None:
    """TypeError unless an int, ValueError unless 1 <= k <= n_features."""
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"{name}: expected an int, got {type(k).__name__}")
    if not 1 <= k <= n_features:
        raise ValueError(f"{name}: expected 1 <= {name} <= n_features={n_features}, got {k}")


def check_bandwidth(bandwidth) -> None:
    if not bandwidth > 0:
        raise ValueError(f"bandwidth: expected a positive JumpReLU bandwidth ε, got {bandwidth}")


def check_jumprelu(h, threshold, bandwidth) -> None:
    check_h(h, 2, "[B, F]")
    _tensor("threshold", threshold, h.device, (h.shape[1],))
    check_bandwidth(bandwidth)


def _check_weights(x, W_enc, b_enc, threshold, pre_bias, feature_shape: tuple, layout: str) -> None:
    """The encoder's tensors beside x: W_enc (x's dtype), b_enc and θ of ``feature_shape``, pre_bias [d_in]."""
    d = x.shape[-1]
    _tensor("W_enc", W_enc, x.device)
    if W_enc.shape[:-1] != feature_shape or W_enc.shape[-1] != d:
        raise ValueError(f"W_enc: expected {layout}, got shape {tuple(W_enc.shape)}")
    if W_enc.dtype != x.dtype:
        raise TypeError(f"W_enc: expected x's dtype {x.dtype}, got {W_enc.dtype}")
    fshape = "[" + ", ".join(str(n) for n in feature_shape) + "]"
    if b_enc is not None:
        _tensor("b_enc", b_enc, x.device, feature_shape, fshape)
    if threshold is not None:
        _tensor("threshold", threshold, x.device, feature_shape, fshape)
    if pre_bias is not None:
        _tensor("pre_bias", pre_bias, x.device, (d,))


def _check_x(x, rank: int, layout: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x: expected a tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"x: expected a floating-point tensor, got {x.dtype}")
    if x.dim() != rank:
        raise ValueError(f"x: expected {layout}, got shape {tuple(x.shape)}")


def check_encode(x, W_enc, b_enc, activation, k, threshold, bandwidth, pre_bias, n_shards: int = 1) -> None:
    """``encode``'s arguments; with n_shards > 1 W_enc holds F/n_shards of the F features."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation: expected one of {ACTIVATIONS}, got {activation!r}")
    _check_x(x, 2, "[B, d_in]")
    if not isinstance(W_enc, torch.Tensor) or W_enc.dim() != 2 or W_enc.shape[1] != x.shape[1]:
        raise ValueError(f"W_enc: expected [F, d_in={x.shape[1]}], got shape {_shape(W_enc)}")
    F = W_enc.shape[0]
    if activation in SELECTIONS:
        if k is None:
            raise ValueError(f"k: activation {activation!r} needs k")
        check_k(k, F * n_shards)
    if activation == "jumprelu":
        if threshold is None or not isinstance(threshold, torch.Tensor) or threshold.shape != (F,):
            raise ValueError(f"threshold: expected [{F}] for 'jumprelu', "
                             f"got {None if threshold is None else _shape(threshold)}")
        check_bandwidth(bandwidth)
    _check_weights(x, W_enc, b_enc, threshold, pre_bias, (F,), f"[F, d_in={x.shape[1]}]")


def check_dense_form(form, activation, impl) -> None:
    """``encode``'s ``form`` when not "sparse": "dense", for ReLU / JumpReLU, computed in PyTorch."""
    if form != "dense":
        raise ValueError(f"form: expected 'sparse' or 'dense', got {form!r}")
    if activation not in ("relu", "jumprelu"):
        raise ValueError(f"form: 'dense' codes are for 'relu' and 'jumprelu' (a selection keeps k per row "
                         f"sparse), not {activation!r}")
    if impl not in ("auto", "dense"):
        raise ValueError(f"impl: form='dense' is computed by the dense formulation ('auto' or 'dense'), "
                         f"not {impl!r}")


def check_encode_layers(x, W_enc, b_enc, k, pre_bias, n_shards: int = 1) -> None:
    """``encode_layers``' arguments: x [B, L, d_in], W_enc [L, F, d_in], b_enc [L, F], pre_bias [d_in]."""
    _check_x(x, 3, "[B, L, d_in]")
    B, L, d = x.shape
    if not isinstance(W_enc, torch.Tensor) or W_enc.dim() != 3 or W_enc.shape[0] != L or W_enc.shape[2] != d:
        raise ValueError(f"W_enc: expected [L={L}, F, d_in={d}], got shape {_shape(W_enc)}")
    check_k(k, W_enc.shape[1] * n_shards)
    _check_weights(x, W_enc, b_enc, None, pre_bias, (L, W_enc.shape[1]), f"[L={L}, F, d_in={d}]")


def check_auxk(x, W_enc, b_enc, dead_mask, k_aux, pre_bias, n_dead=None) -> None:
    """``auxk_select``'s arguments: as ``encode``'s, a bool dead_mask [F], an int k_aux >= 1 and n_dead
    None or an int in [0, F] (its agreement with dead_mask is the caller's: checking it would read the device)."""
    _check_x(x, 2, "[B, d_in]")
    if not isinstance(W_enc, torch.Tensor) or W_enc.dim() != 2 or W_enc.shape[1] != x.shape[1]:
        raise ValueError(f"W_enc: expected [F, d_in={x.shape[1]}], got shape {_shape(W_enc)}")
    F = W_enc.shape[0]
    if not isinstance(dead_mask, torch.Tensor) or dead_mask.shape != (F,) or dead_mask.dtype != torch.bool:
        got = (f"{dead_mask.dtype} {tuple(dead_mask.shape)}" if isinstance(dead_mask, torch.Tensor)
               else type(dead_mask).__name__)
        raise ValueError(f"dead_mask: expected a bool [{F}] tensor, got {got}")
    if dead_mask.device != x.device:
        raise ValueError(f"dead_mask: expected a tensor on {x.device} (x's device), got {dead_mask.device}")
    if isinstance(k_aux, bool) or not isinstance(k_aux, int):
        raise TypeError(f"k_aux: expected an int, got {type(k_aux).__name__}")
    if k_aux < 1:
        raise ValueError(f"k_aux: expected >= 1, got {k_aux}")
    if n_dead is not None and (isinstance(n_dead, bool) or not isinstance(n_dead, int) or not 0 <= n_dead <= F):
        raise ValueError(f"n_dead: expected None or an int in [0, F={F}], got {n_dead!r}")
    _check_weights(x, W_enc, b_enc, None, pre_bias, (F,), f"[F, d_in={x.shape[1]}]")


def check_sparse_decode(codes, W_dec, b_dec) -> None:
    """codes over B rows, W_dec [F, D] or [F, T, d] on the codes' device, b_dec [D] or [T, d]."""
    if not isinstance(codes, SparseCodes):
        raise TypeError(f"codes: expected SparseCodes, got {type(codes).__name__}")
    if not isinstance(W_dec, torch.Tensor) or W_dec.dim() not in (2, 3):
        raise ValueError(f"W_dec: expected [F, D] or [F, T, d], got shape {_shape(W_dec)}")
    if not W_dec.is_floating_point():
        raise TypeError(f"W_dec: expected a floating-point tensor, got {W_dec.dtype}")
    if codes.n_features is not None and codes.n_features != W_dec.shape[0]:
        raise ValueError(f"W_dec: codes have n_features={codes.n_features} but W_dec has {W_dec.shape[0]} rows")
    if codes.device != W_dec.device:
        raise ValueError(f"W_dec: on {W_dec.device}, but codes are on {codes.device}")
    if b_dec is not None:
        tail = W_dec.shape[1:]
        if not isinstance(b_dec, torch.Tensor) or (b_dec.shape != (tail.numel(),) and b_dec.shape != tail):
            raise ValueError(f"b_dec: expected shape {tuple(tail)}, got {_shape(b_dec)}")
        if b_dec.device != W_dec.device:
            raise ValueError(f"b_dec: on {b_dec.device}, but codes are on {codes.device}")


def check_code_stats(codes: Sequence, n_features) -> None:
    """``code_stats``'s arguments: a non-empty sequence of SparseCodes on one device, F >= 0 features,
    every index below it."""
    if isinstance(codes, SparseCodes) or not isinstance(codes, (list, tuple)) or len(codes) == 0:
        raise ValueError("codes: expected a non-empty sequence of SparseCodes, one per layer, got "
                         + (type(codes).__name__ if not isinstance(codes, (list, tuple)) else "none"))
    if isinstance(n_features, bool) or not isinstance(n_features, int) or n_features < 0:
        raise ValueError(f"n_features: expected an int >= 0, got {n_features!r}")
    for l, c in enumerate(codes):
        if not isinstance(c, SparseCodes):
            raise TypeError(f"codes[{l}]: expected SparseCodes, got {type(c).__name__}")
        if c.device != codes[0].device:
            raise ValueError(f"codes[{l}]: on {c.device}, but codes[0] is on {codes[0].device}")
        if c.n_features is not None and c.n_features != n_features:
            raise ValueError(f"codes[{l}]: has n_features={c.n_features}, expected {n_features}")


def check_clt_decode(codes: Sequence, W_dec, tying, b_dec, offset, scale) -> None:
    """A CLT decode's arguments (see ``fastclt.ops.clt_decode``)."""
    if tying not in TYINGS:
        raise ValueError(f"tying: expected one of {TYINGS}, got {tying!r}")
    if isinstance(codes, SparseCodes) or not isinstance(codes, (list, tuple)) or len(codes) == 0:
        raise ValueError("codes: expected a sequence of one SparseCodes per source layer, got "
                         + (type(codes).__name__ if not isinstance(codes, (list, tuple)) else "none"))
    for s, c in enumerate(codes):
        if not isinstance(c, SparseCodes):
            raise TypeError(f"codes[{s}]: expected SparseCodes, got {type(c).__name__}")
    L, B, device = len(codes), codes[0].batch_size, codes[0].device
    for s, c in enumerate(codes):
        if c.batch_size != B:
            raise ValueError(f"codes[{s}]: expected {B} rows like codes[0], got {c.batch_size}")
        if c.device != device:
            raise ValueError(f"codes[{s}]: on {c.device}, but codes[0] is on {device}")
    affine = offset is not None or scale is not None
    if tying == "none":
        if affine:
            raise ValueError("feature_offset/feature_scale: only tied decoders take a feature affine")
        if isinstance(W_dec, torch.Tensor) or not isinstance(W_dec, (list, tuple)) or len(W_dec) != L:
            n = len(W_dec) if isinstance(W_dec, (list, tuple)) else _shape(W_dec)
            raise ValueError(f"W_dec: expected {L} per-source tensors [F, L − s, d_out] for tying 'none', got {n}")
        W0 = W_dec[0]
        if not isinstance(W0, torch.Tensor) or W0.dim() != 3:
            raise ValueError(f"W_dec[0]: expected [F, {L}, d_out], got {_shape(W0)}")
        F, d = W0.shape[0], W0.shape[-1]
        for s, W in enumerate(W_dec):
            if not isinstance(W, torch.Tensor) or W.dim() != 3 or W.shape != (F, L - s, d):
                raise ValueError(f"W_dec[{s}]: expected [F, {L - s}, d_out] = [{F}, {L - s}, {d}], got {_shape(W)}")
            _weight(f"W_dec[{s}]", W, device, W0.dtype)
    else:
        if not isinstance(W_dec, torch.Tensor) or W_dec.dim() != 3 or W_dec.shape[0] != L:
            raise ValueError(f"W_dec: expected [L={L}, F, d_out] for tying {tying!r}, got {_shape(W_dec)}")
        _weight("W_dec", W_dec, device, W_dec.dtype)
        F, d = W_dec.shape[1], W_dec.shape[2]
    for s, c in enumerate(codes):
        if c.n_features is not None and c.n_features != F:
            raise ValueError(f"codes[{s}]: n_features={c.n_features} but W_dec has {F} features")
    if b_dec is not None:
        _tensor("b_dec", b_dec, device, (L, d))
    for name, t in (("feature_offset", offset), ("feature_scale", scale)):
        if t is not None:
            _tensor(name, t, device, (L, F))


def _weight(name: str, W: torch.Tensor, device: torch.device, dtype: torch.dtype) -> None:
    if not W.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor, got {W.dtype}")
    if W.device != device:
        raise ValueError(f"{name}: on {W.device}, but the codes are on {device}")
    if W.dtype != dtype:
        raise TypeError(f"{name}: expected {dtype} like W_dec[0], got {W.dtype}")


def check_rank_groups(rank_groups) -> tuple:
    """``rank_groups`` of a MOLT as a tuple of (count, rank) int pairs (count >= 0, not all 0; rank >= 1)."""
    try:
        groups = tuple((int(n), int(r)) for n, r in rank_groups)
        ok = all(n == n0 and r == r0 and not isinstance(n0, bool) and not isinstance(r0, bool)
                 for (n, r), (n0, r0) in zip(groups, rank_groups))
    except (TypeError, ValueError):
        ok = False
    if not ok or not groups or any(n < 0 or r < 1 for n, r in groups) or not any(n for n, _ in groups):
        raise ValueError(f"rank_groups: expected ((count, rank), ...) with counts >= 0 (not all 0) and ranks >= 1, "
                         f"got {rank_groups!r}")
    return groups


def check_molt_decode(codes, x, U, V, rank_groups, b_dec) -> tuple:
    """A MOLT decode's arguments (see ``fastclt.ops.molt_decode``): gates over T transforms and B rows,
    x [B, d_in], U [R, d_out], V [R, d_in] in one dtype, b_dec [d_out] → the rank groups as a tuple."""
    if not isinstance(codes, SparseCodes):
        raise TypeError(f"codes: expected SparseCodes (the gates), got {type(codes).__name__}")
    groups = check_rank_groups(rank_groups)
    T = sum(n for n, _ in groups)
    R = sum(n * r for n, r in groups)
    for name, t in (("x", x), ("U", U), ("V", V)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise TypeError(f"{name}: expected a floating-point tensor, got "
                            f"{t.dtype if isinstance(t, torch.Tensor) else type(t).__name__}")
        if t.dim() != 2:
            raise ValueError(f"{name}: expected a 2-D tensor, got shape {tuple(t.shape)}")
    if x.shape[0] != codes.batch_size:
        raise ValueError(f"x: expected [B={codes.batch_size}, d_in] (one row per codes row), got {tuple(x.shape)}")
    if V.shape != (R, x.shape[1]):
        raise ValueError(f"V: expected [R={R}, d_in={x.shape[1]}] (rank rows of every transform), got {tuple(V.shape)}")
    if U.shape[0] != R:
        raise ValueError(f"U: expected [R={R}, d_out] (rank rows of every transform), got {tuple(U.shape)}")
    if x.dtype != U.dtype or V.dtype != U.dtype:
        raise TypeError(f"x, V: expected U's dtype {U.dtype}, got {x.dtype} and {V.dtype}")
    if codes.n_features is not None and codes.n_features != T:
        raise ValueError(f"codes: n_features={codes.n_features} but rank_groups hold {T} transforms")
    if b_dec is not None:
        if not isinstance(b_dec, torch.Tensor) or b_dec.shape != (U.shape[1],):
            raise ValueError(f"b_dec: expected [{U.shape[1]}], got shape {_shape(b_dec)}")
    for name, t in (("x", x), ("U", U), ("V", V), ("b_dec", b_dec)):
        if t is not None and t.device != codes.device:
            raise ValueError(f"{name}: on {t.device}, but codes are on {codes.device}")
    return groups


def check_targets(y) -> None:
    """y [B, ..., d], floating-point: the targets of ``total_variance`` and ``prefix_errors``."""
    if not isinstance(y, torch.Tensor) or not y.is_floating_point():
        raise TypeError(f"y: expected a floating-point tensor, got "
                        f"{y.dtype if isinstance(y, torch.Tensor) else type(y).__name__}")
    if y.dim() < 2:
        raise ValueError(f"y: expected [B, ..., d], got {tuple(y.shape)}")


def check_fvu_terms(y, y_hat) -> None:
    """y [B, ..., d] floating-point; y_hat floating-point, of y's shape and device."""
    check_targets(y)
    if not isinstance(y_hat, torch.Tensor) or not y_hat.is_floating_point():
        raise TypeError(f"y_hat: expected a floating-point tensor, got "
                        f"{y_hat.dtype if isinstance(y_hat, torch.Tensor) else type(y_hat).__name__}")
    if y_hat.shape != y.shape:
        raise ValueError(f"y_hat: expected y's shape {tuple(y.shape)}, got {tuple(y_hat.shape)}")
    if y_hat.device != y.device:
        raise ValueError(f"y_hat: on {y_hat.device}, but y is on {y.device}")


def check_prefix_errors(y, base, blocks) -> None:
    """y [B, ..., d], base broadcastable to y, blocks [G, *y.shape], all floating-point on y's device."""
    check_targets(y)
    for name, t in (("base", base), ("blocks", blocks)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise TypeError(f"{name}: expected a floating-point tensor, got "
                            f"{t.dtype if isinstance(t, torch.Tensor) else type(t).__name__}")
    if blocks.dim() != y.dim() + 1 or blocks.shape[1:] != y.shape or blocks.shape[0] < 1:
        raise ValueError(f"blocks: expected [G, *y.shape] = [G, {', '.join(map(str, y.shape))}], got "
                         f"{tuple(blocks.shape)}")
    try:
        torch.broadcast_shapes(base.shape, y.shape)
        ok = base.dim() <= y.dim()
    except RuntimeError:
        ok = False
    if not ok:
        raise ValueError(f"base: expected a shape that broadcasts to y {tuple(y.shape)}, got {tuple(base.shape)}")
    for name, t in (("base", base), ("blocks", blocks)):
        if t.device != y.device:
            raise ValueError(f"{name}: on {t.device}, but y is on {y.device}")


def check_bounds(bounds, n_features: int) -> list:
    """``bounds`` as a list of ints 0 = m_0 < m_1 < … < m_G = n_features, or a ValueError naming it."""
    b = list(bounds)
    if (len(b) < 2 or any(isinstance(v, bool) or not isinstance(v, int) for v in b) or b[0] != 0
            or b[-1] != n_features or any(y <= x for x, y in zip(b, b[1:]))):
        raise ValueError(f"bounds: expected increasing ints 0 = m_0 < ... < m_G = n_features={n_features}, got {b}")
    return b
