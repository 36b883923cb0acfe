"""Fused encode (docs/DESIGN.md §3, §7): ``h = W_enc (x − pre_bias) + b_enc`` as a tiled Triton GEMM with the
activation in the epilogue, returning SparseCodes. The training path never writes a dense [B, F] h.

    x: [B, d_in] fp32|bf16|fp16, W_enc: [F, d_in] (x's dtype), b_enc: [F] or None,
    threshold: [F] (JumpReLU), pre_bias: [d_in] or None  →  SparseCodes over F features
    (values in x's dtype, token-major CSR sorted by (row, feature))

Epilogue modes of ``_encode_kernel`` (one program = one BLOCK_M × BLOCK_N tile of h):
    relu       emit (row, col, h) where h > 0
    jumprelu   emit where h > θ or |h − θ| < ε/2 (band entries, value 0)
    candidates emit where h > τ (a speculative threshold, for TopK / BatchTopK)
    dense      store the tile of h (fallbacks, samples, ``return_preacts``)
Emitted entries go to a preallocated COO buffer at ``atomic_add(counter, tile_count)`` offsets; a
counter above the capacity means the buffer was too small, and the launcher reruns (never
truncates). The COO is then sorted by ``row·F + col`` (unique keys: deterministic).

TopK / BatchTopK select exactly among the candidates; see README_encode.md for the speculative
threshold τ and its fallbacks, which make the result identical to the reference in every case.
Backward (``fastclt.ops.encoder_backward``, with Triton kernels): ``dh = dvalue·act'(h)`` at the entries, then
``dW_enc = feature_scatter(index, row, dh, x − pre_bias)``, ``db_enc[f] = Σ dh``,
``dx = sparse_decode(codes with value dh, W_enc)``, ``dθ[f] = Σ dvalue·(−θ/ε)·rect((h − θ)/ε)``,
``d pre_bias = −W_encᵀ db_enc``. Only what needs a gradient is computed.
"""
from __future__ import annotations

import math
import os
from collections import Counter, OrderedDict
from typing import Optional

import torch
import triton
import triton.language as tl

from fastclt.codes import SparseCodes
from fastclt.ops.encoder_backward import encode_codes, folded_bias, vecmat_f32
from fastclt.ops.reference.encode import activate
from fastclt.ops.triton._common import autotune_limit, feature_scatter, feature_segments, first_configs, gather_decode
from fastclt.profiling import phase

__all__ = ["encode", "encode_layers"]

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
autotune_limit()  # a bad FASTCLT_AUTOTUNE_CONFIGS fails here, not at the first launch

MODE_RELU, MODE_JUMPRELU, MODE_CANDIDATES, MODE_DENSE = 0, 1, 2, 3

_TL_DTYPE = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


# ---------------------------------------------------------------------------------------- kernel
def _configs():
    if _INTERPRET:  # 8-column chunks: the interpreter's 16-wide tiles walk two, as the GPU's walk several
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "GROUP_M": 4, "CHUNK_N": 8})]
    return _gpu_configs()


# The GPU autotune space, best guess first (``FASTCLT_AUTOTUNE_CONFIGS=N`` keeps the first N that
# fit): BLOCK_M, BLOCK_N, BLOCK_K, num_stages, num_warps, CHUNK_N (the epilogue's column chunk),
# then what each config is for: input element sizes (bytes), GPU families (``_family``) and rows
# aligned to 16 elements (``_aligned``: vectorised, pipelined loads) or not (one scalar load and
# one 64-bit address per element: a 128×128 tile at most). Every entry compiles without register
# spills, in every mode, for what it is for, with Triton 3.6 and 3.9. The 128×256 tiles (128
# accumulator registers per thread) walk the epilogue 16 columns at a time; the other tiles with
# 128 accumulator registers per thread, 256×128 with 8 warps and 128×128 with 4, spill even so
# (Triton 3.6 on sm_90, 3.9 on sm_80) and are not listed. fp32 has its own smaller tiles (its
# "ieee" dot runs on the FMA units, operands in registers); its 128×128×32 with 4 stages spills on
# sm_80. Checked by ``python -m benchmarks.kernel_resources`` (its CI subset:
# tests/ops/triton/test_triton_compile.py).
_SPACE = [
    (128, 256, 64, 3, 8, 16, (2,), (80, 90), True),
    (128, 256, 64, 4, 8, 16, (2,), (80, 90), True),
    (128, 128, 64, 4, 8, 32, (2,), (80, 90), True),
    (64, 256, 64, 4, 8, 32, (2,), (80, 90), True),
    (128, 256, 32, 4, 8, 16, (2,), (80, 90), True),
    (128, 256, 32, 3, 8, 16, (2,), (80, 90), True),
    (128, 128, 32, 4, 8, 32, (2,), (80, 90), True),
    (128, 128, 32, 4, 8, 32, (4,), (90,), True),
    (128, 128, 32, 3, 8, 32, (4,), (80, 90), True),
    (64, 256, 32, 4, 8, 32, (4,), (80, 90), True),
    (128, 64, 32, 4, 4, 32, (4,), (80, 90), True),
    (64, 128, 32, 4, 4, 32, (4,), (80, 90), True),
    (128, 128, 32, 2, 8, 16, (2, 4), (80, 90), False),
]


def _family(cc: int) -> int:
    """The configs' GPU family of compute capability ``cc`` (major·10 + minor): 90 for Hopper and
    the data-centre Blackwells (wgmma / tcgen05: accumulators need no operand registers), 80 for
    the others (Ampere, Ada, consumer Blackwell: mma.sync)."""
    return 90 if 90 <= cc < 120 else 80


def _aligned(*tensors: torch.Tensor) -> bool:
    """Rows that start on 16-element boundaries (what lets the compiler vectorise the loads)."""
    return all(t.data_ptr() % 16 == 0 and t.stride(0) % 16 == 0 for t in tensors)


def _gpu_configs():
    """Every config of ``_SPACE`` (all dtypes, families and alignments), in order, once each."""
    tiles = list(dict.fromkeys(entry[:6] for entry in _SPACE))
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8, "CHUNK_N": cn},
                          num_stages=s, num_warps=w) for bm, bn, bk, s, w, cn in tiles]


def _fits(cfg, elem_bytes: int, cc: int, aligned: bool) -> bool:
    k = cfg.kwargs
    key = (k["BLOCK_M"], k["BLOCK_N"], k["BLOCK_K"], cfg.num_stages, cfg.num_warps, k["CHUNK_N"])
    return any(entry[:6] == key and elem_bytes in entry[6] and _family(cc) in entry[7] and entry[8] == aligned
               for entry in _SPACE)


def _pipeline_bytes(cfg, elem_bytes: int) -> int:
    """Shared memory of the software pipeline: num_stages × (x tile + W tile)."""
    k = cfg.kwargs
    return cfg.num_stages * (k["BLOCK_M"] + k["BLOCK_N"]) * k["BLOCK_K"] * elem_bytes


def smem_limit(device) -> int:
    """Shared memory one block may opt in to on ``device`` (bytes)."""
    props = torch.cuda.get_device_properties(device)
    limit = getattr(props, "shared_memory_per_block_optin", None)
    if limit:
        return int(limit)
    return {(8, 0): 166912, (9, 0): 232448, (10, 0): 232448}.get((props.major, props.minor), 101376)


def prune_configs(configs, elem_bytes: int, limit: int):
    """The configs whose pipeline fits in ``limit`` bytes of shared memory (fp32 tiles are twice
    bf16's: the big bf16 tiles do not fit); the smallest one if none does."""
    keep = [c for c in configs if _pipeline_bytes(c, elem_bytes) <= limit]
    return keep or [min(configs, key=lambda c: _pipeline_bytes(c, elem_bytes))]


def gpu_configs(elem_bytes: int, cc: int, smem: int, aligned: bool = True, configs=None):
    """The autotune configs (of ``configs``, default all) that a GPU of compute capability ``cc``
    (major·10 + minor) with ``smem`` bytes of shared memory per block runs for inputs of
    ``elem_bytes`` bytes, with rows ``aligned`` to 16 elements or not: those of ``_SPACE`` for
    that, pruned by shared memory."""
    configs = _gpu_configs() if configs is None else configs
    return prune_configs([c for c in configs if _fits(c, elem_bytes, cc, aligned)], elem_bytes, smem)


def _early_prune(configs, named_args, **kwargs):
    x, W = named_args["x_ptr"], named_args["w_ptr"]
    if not _INTERPRET:
        major, minor = torch.cuda.get_device_capability(x.device)
        configs = gpu_configs(x.element_size(), 10 * major + minor, smem_limit(x.device), _aligned(x, W), configs)
    return first_configs(configs)


def size_bucket(n: int) -> int:
    """n rounded up to a power of two: the autotune key's size (AuxK's N, the number of dead
    features, drifts every step; keyed on N itself, every new value would re-tune)."""
    return 1 << max(0, int(n) - 1).bit_length()


@triton.autotune(configs=_configs(), key=["N_BUCKET", "K", "ALIGNED", "MODE"], reset_to_zero=["counter_ptr"],
                 prune_configs_by={"early_config_prune": _early_prune})
@triton.heuristics({"EVEN_K": lambda args: args["K"] % args["BLOCK_K"] == 0})
@triton.jit
def _encode_kernel(x_ptr, w_ptr, bias_ptr, thr_ptr,
                   rows_ptr, cols_ptr, vals_ptr, counter_ptr, dense_ptr,
                   M, N, K, N_BUCKET, ALIGNED,
                   stride_xm, stride_xk, stride_wn, stride_wk, stride_dm,
                   tau, half_band, capacity,
                   MODE: tl.constexpr, HAS_BIAS: tl.constexpr, ROUND_DTYPE: tl.constexpr,
                   INPUT_PRECISION: tl.constexpr, UPCAST: tl.constexpr, EVEN_K: tl.constexpr,
                   CHUNK_N: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    # grouped tile order: GROUP_M row-tiles share the W_enc column tiles while they are in L2
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    group = GROUP_M * num_pid_n
    first_m = (pid // group) * GROUP_M
    size_m = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + ((pid % group) % size_m)
    pid_n = (pid % group) // size_m
    m0 = pid_m * BLOCK_M
    n0 = pid_n * BLOCK_N

    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    # rows/features past the edge read a valid row (modulo) instead of a masked load, so the main
    # loop loads are unmasked when K % BLOCK_K == 0; their results are never emitted (``_keep``)
    rm = (offs_m % M).to(tl.int64)
    rn = (offs_n % N).to(tl.int64)
    x_tile = x_ptr + rm[:, None] * stride_xm + offs_k[None, :] * stride_xk
    w_tile = w_ptr + rn[None, :] * stride_wn + offs_k[:, None] * stride_wk
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            a = tl.load(x_tile)
            b = tl.load(w_tile)
        else:
            k_ok = (k0 + offs_k) < K
            a = tl.load(x_tile, mask=k_ok[None, :], other=0.0)
            b = tl.load(w_tile, mask=k_ok[:, None], other=0.0)
        if UPCAST:  # the interpreter's bf16/fp16 dot is wrong (Triton 3.9); fp32 is exact here
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
        x_tile += BLOCK_K * stride_xk
        w_tile += BLOCK_K * stride_wk

    # columns past N hold h = −inf (a bias of −inf; h may be NaN there if acc is +inf): no mode
    # emits them, so the epilogue needs no column mask
    h = acc
    if HAS_BIAS:
        h += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=-float("inf"))[None, :]
    else:
        h = tl.where((offs_n < N)[None, :], h, -float("inf"))
    # round to the output dtype first, so that the kept set is decided on the stored value
    if UPCAST and ROUND_DTYPE == tl.bfloat16:
        # round-to-nearest-even by hand: the interpreter's fp32 → bf16 cast truncates (Triton 3.9)
        bits = h.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        h = bits.to(tl.float32, bitcast=True)
    else:
        h = h.to(ROUND_DTYPE).to(tl.float32)
    if MODE == 3:
        _chunks(h, offs_m, n0, M, N, thr_ptr, rows_ptr, cols_ptr, vals_ptr, dense_ptr, stride_dm, tau, half_band,
                0, 0, MODE, BLOCK_M, BLOCK_N, CHUNK_N)
    else:
        # one atomic per tile reserves its entries; the chunks then write them in order
        keep = _keep(h, offs_m, offs_n, thr_ptr, tau, half_band, M, N, MODE)
        total = tl.sum(tl.sum(keep.to(tl.int32), axis=1), axis=0)
        base = tl.atomic_add(counter_ptr, total.to(tl.int64))
        # positions inside the tile stay int32; the int64 base goes into three scalar pointers
        room = tl.minimum(tl.maximum(capacity - base, 0), BLOCK_M * BLOCK_N).to(tl.int32)
        _chunks(h, offs_m, n0, M, N, thr_ptr, rows_ptr + base, cols_ptr + base, vals_ptr + base, dense_ptr,
                stride_dm, tau, half_band, room, 0, MODE, BLOCK_M, BLOCK_N, CHUNK_N)


@triton.jit
def _keep(h, offs_m, offs_n, thr_ptr, tau, half_band, M, N, MODE: tl.constexpr):
    """The entries of h that the mode emits, in rows < M (columns ≥ N hold h = −inf or NaN: never)."""
    if MODE == 0:
        keep = h > 0.0
    elif MODE == 1:
        thr = tl.load(thr_ptr + offs_n, mask=offs_n < N, other=0.0)[None, :]
        keep = (h > thr) | (tl.abs(h - thr) < half_band)
    else:
        keep = h > tau
    return keep & (offs_m < M)[:, None]


@triton.jit
def _chunks(h, offs_m, n0, M, N, thr_ptr, rows_ptr, cols_ptr, vals_ptr, dense_ptr, stride_dm, tau, half_band,
            room, done, MODE: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, CN: tl.constexpr):
    """The epilogue on h: [BM, BN] (columns n0 …) in column chunks of CN, left to right, so that the
    temporaries (masks, positions, store addresses, the scans' layout conversion) are those of one
    [BM, CN] chunk. The halves come from ``reshape → permute → split`` (register renames),
    recursively. Returns ``done`` + the entries this part emitted."""
    if BN == CN:
        done = _chunk(h, offs_m, n0, M, N, thr_ptr, rows_ptr, cols_ptr, vals_ptr, dense_ptr, stride_dm, tau,
                      half_band, room, done, MODE, BM, CN)
    else:
        left, right = tl.split(tl.permute(tl.reshape(h, (BM, 2, BN // 2)), (0, 2, 1)))
        done = _chunks(left, offs_m, n0, M, N, thr_ptr, rows_ptr, cols_ptr, vals_ptr, dense_ptr, stride_dm, tau,
                       half_band, room, done, MODE, BM, BN // 2, CN)
        done = _chunks(right, offs_m, n0 + BN // 2, M, N, thr_ptr, rows_ptr, cols_ptr, vals_ptr, dense_ptr,
                       stride_dm, tau, half_band, room, done, MODE, BM, BN // 2, CN)
    return done


@triton.jit
def _chunk(h, offs_m, n0, M, N, thr_ptr, rows_ptr, cols_ptr, vals_ptr, dense_ptr, stride_dm, tau, half_band,
           room, done, MODE: tl.constexpr, BM: tl.constexpr, CN: tl.constexpr):
    """One [BM, CN] chunk of h (fp32, rounded): store it (dense mode), or write its entries at
    positions ``done …`` of the tile's reservation (pointers already offset by the tile's base),
    row-major inside the chunk; positions ≥ room are counted, not written."""
    offs_n = n0 + tl.arange(0, CN)
    if MODE == 3:
        ok = (offs_m < M)[:, None] & (offs_n < N)[None, :]
        tl.store(dense_ptr + offs_m.to(tl.int64)[:, None] * stride_dm + offs_n[None, :], h, mask=ok)
    else:
        ki = _keep(h, offs_m, offs_n, thr_ptr, tau, half_band, M, N, MODE).to(tl.int32)
        row_cnt = tl.sum(ki, axis=1)
        row_end = done + tl.cumsum(row_cnt, axis=0)  # exclusive end of each row's positions
        pos = (row_end - row_cnt)[:, None] + tl.cumsum(ki, axis=1) - 1  # int32; valid where ki = 1
        ok = (ki != 0) & (pos < room)
        tl.store(rows_ptr + pos, offs_m[:, None] + tl.zeros((BM, CN), dtype=tl.int32), mask=ok)
        tl.store(cols_ptr + pos, offs_n[None, :] + tl.zeros((BM, CN), dtype=tl.int32), mask=ok)
        tl.store(vals_ptr + pos, h, mask=ok)
        done += tl.sum(row_cnt, axis=0)
    return done


# ------------------------------------------------------------------------------------- launchers
def _poison() -> bool:
    return os.environ.get("FASTCLT_POISON") == "1"


def _alloc(shape, dtype: torch.dtype, device) -> torch.Tensor:
    """An output buffer; NaN-filled (or -1 for integers) under FASTCLT_POISON=1, so that an element
    a kernel forgot to write fails a test instead of passing as zero."""
    if not _poison():
        return torch.empty(shape, dtype=dtype, device=device)
    return torch.full(shape, float("nan") if dtype.is_floating_point else -1, dtype=dtype, device=device)


def _input_precision(dtype: torch.dtype) -> str:
    # fp32 follows torch's own matmul setting, so that codes match F.linear on the same GPU
    if dtype == torch.float32 and not _INTERPRET and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def _launch(x, W, bias, mode, *, threshold=None, half_band=0.0, tau=0.0, capacity=0, dense_dtype=torch.float32):
    """One launch of ``_encode_kernel``. Returns (rows int32, cols int32, h fp32, count) for the
    emitting modes (only the first min(count, capacity) entries are valid) or the dense h [M, N]."""
    M, K = x.shape
    N = W.shape[0]
    dev = x.device
    dummy = torch.empty(1, dtype=torch.float32, device=dev)
    counter = torch.zeros(1, dtype=torch.int64, device=dev)
    if mode == MODE_DENSE:
        dense = _alloc((M, N), dense_dtype, dev)
        rows = cols = vals = dummy
    else:
        dense = dummy
        rows = _alloc((max(capacity, 1),), torch.int32, dev)
        cols = _alloc((max(capacity, 1),), torch.int32, dev)
        vals = _alloc((max(capacity, 1),), torch.float32, dev)
    if M > 0 and N > 0:
        grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)  # noqa: E731
        with phase("encoder_gemm"):  # the GEMM with the candidates' stores fused in
            _encode_kernel[grid](
                x, W, bias if bias is not None else dummy, threshold if threshold is not None else dummy,
                rows, cols, vals, counter, dense,
                M, N, K, size_bucket(N), int(_aligned(x, W)), x.stride(0), x.stride(1), W.stride(0), W.stride(1),
                dense.stride(0) if mode == MODE_DENSE else 0,
                float(tau), float(half_band), int(capacity),
                MODE=mode, HAS_BIAS=bias is not None, ROUND_DTYPE=_TL_DTYPE[x.dtype],
                INPUT_PRECISION=_input_precision(x.dtype), UPCAST=_INTERPRET and x.dtype != torch.float32)
    if mode == MODE_DENSE:
        return dense
    return rows, cols, vals, int(counter.item())


class _Pattern:
    """Emitted entries sorted by (row, col): row int64, col int32, h fp32 (rounded to x's dtype)."""

    def __init__(self, row: torch.Tensor, col: torch.Tensor, h: torch.Tensor):
        self.row, self.col, self.h = row, col, h

    @staticmethod
    def empty(device) -> "_Pattern":
        return _Pattern(torch.zeros(0, dtype=torch.int64, device=device),
                        torch.zeros(0, dtype=torch.int32, device=device),
                        torch.zeros(0, dtype=torch.float32, device=device))

    @staticmethod
    def sorted(row: torch.Tensor, col: torch.Tensor, h: torch.Tensor, n_features: int) -> "_Pattern":
        row = row.long()
        key = row * n_features + col.long()
        key, perm = torch.sort(key)  # keys are unique: deterministic
        return _Pattern(row[perm], col[perm].to(torch.int32), h[perm])

    def take(self, idx: torch.Tensor) -> "_Pattern":
        return _Pattern(self.row[idx], self.col[idx], self.h[idx])

    @property
    def nnz(self) -> int:
        return self.row.shape[0]

    def row_ptr(self, B: int) -> torch.Tensor:
        bounds = torch.arange(B + 1, device=self.row.device, dtype=torch.int64)
        return torch.searchsorted(self.row, bounds).to(torch.int64)


def _emit(x, W, bias, mode, *, capacity: int, max_count: Optional[int] = None, threshold=None,
          half_band=0.0, tau=0.0):
    """Emit the entries of ``mode`` as a sorted _Pattern and the exact count. With ``max_count``, an
    overflow beyond it returns (None, count) instead of a rerun (the caller changes τ)."""
    F = W.shape[0]
    capacity = max(int(capacity), 1)
    rows, cols, vals, count = _launch(x, W, bias, mode, threshold=threshold, half_band=half_band, tau=tau,
                                      capacity=capacity)
    if count > capacity:
        if max_count is not None and count > max_count:
            return None, count
        # the buffer was too small: rerun with the exact count, never truncate
        STATS["overflow_rerun"] += 1
        rows, cols, vals, count2 = _launch(x, W, bias, mode, threshold=threshold, half_band=half_band,
                                           tau=tau, capacity=count)
        assert count2 == count, f"encode: nondeterministic entry count ({count} then {count2})"
    return _Pattern.sorted(rows[:count], cols[:count], vals[:count], F), count


# ----------------------------------------------------------- speculative state (small LRU caches)
class _LRU(OrderedDict):
    def __init__(self, size: int = 64):
        super().__init__()
        self.size = size

    def get_(self, key):
        if key in self:
            self.move_to_end(key)
            return self[key]
        return None

    def put(self, key, value) -> None:
        self[key] = value
        self.move_to_end(key)
        while len(self) > self.size:
            self.popitem(last=False)


_DENSITY = _LRU()  # (call site, mode) → entries per (row·feature) of the previous call
_TAU = _LRU()      # (call site, tag, k) → speculative threshold τ for the next call
_CAP = _LRU()      # (call site, tag, k) → candidate buffer capacity (one per layer) for the next call
# How often each fallback ran (tests check that they are exercised; a benchmark can report them).
STATS: Counter = Counter()


def clear_caches() -> None:
    """Forget the speculative thresholds and capacities (tests; a new model)."""
    _DENSITY.clear()
    _TAU.clear()
    _CAP.clear()


def _w_key(W: torch.Tensor, *extra):
    """Where a call's speculative state lives: W_enc's shape, strides, offset in its storage, dtype
    and device — not its address: models pass a per-step cast of their weights (``W_enc.to(bf16)``,
    a new tensor every step) or views of one (a layer's offset tells the layers apart). Calls that
    share a key (two models of one shape) only share a guess: the results are exact either way."""
    return (tuple(W.shape), W.stride(), W.storage_offset(), W.dtype, str(W.device)) + extra


# ---------------------------------------------------------------------------- autograd Function
class _TritonKernels:
    """The grouped-by-feature sums and the gather of the sparse encoder backward, as Triton kernels
    (``fastclt.ops.encoder_backward.SparseKernels``)."""

    @staticmethod
    def segments(col, n_features):
        return feature_segments(col, n_features)

    @staticmethod
    def feature_sums(col, coef, n_features, segments):
        nnz = col.shape[0]
        ones = torch.ones(nnz, dtype=torch.float32, device=col.device)
        entry = torch.arange(nnz, device=col.device)
        return feature_scatter(col, entry, ones, coef, n_features, segments=segments)

    @staticmethod
    def feature_scatter(col, row, row_ptr, coef, G, n_features, segments):
        if row is None:
            row = SparseCodes.rows_of(row_ptr, col.shape[0])
        return feature_scatter(col, row, coef, G.reshape(-1, G.shape[-1]), n_features, segments=segments)

    @staticmethod
    def gather(row_ptr, col, coef, W, out_dtype):
        return gather_decode(row_ptr, col, coef, W, out_dtype=out_dtype)


TRITON_KERNELS = _TritonKernels()


def _codes(x, W, b, threshold, pre_bias, pattern: _Pattern, act: str, bandwidth: float, k=None) -> SparseCodes:
    row_ptr = pattern.row_ptr(x.shape[0])
    return encode_codes(x, W, b, threshold, pre_bias, row_ptr, pattern.row, pattern.col, pattern.h, act, bandwidth,
                        TRITON_KERNELS, k)


# --------------------------------------------------------------------------- dense pre-activations
class _DensePreacts(torch.autograd.Function):
    """h = W (x − p) + b written densely ([B, F], x's dtype) — the documented ``return_preacts``
    fallback; its backward is dense (it is what a loss on h needs)."""

    @staticmethod
    def forward(ctx, x, W, b, pre_bias, bias32):
        ctx.save_for_backward(x, W, pre_bias)
        ctx.b_dtype = None if b is None else b.dtype
        return _launch(x, W, bias32, MODE_DENSE, dense_dtype=x.dtype)

    @staticmethod
    def backward(ctx, dh):
        x, W, pre_bias = ctx.saved_tensors
        need_x, need_W, need_b, need_p = ctx.needs_input_grad[:4]
        dx = dW = db = dp = None
        g = dh.to(x.dtype)  # dense GEMMs in the input dtype, as eager autograd does
        if need_x:
            dx = g @ W
        if need_W:
            xc = x if pre_bias is None else x - pre_bias.to(x.dtype)
            dW = (g.t() @ xc).to(W.dtype)
        if need_b or need_p:
            s = dh.float().sum(0)
            db = s.to(ctx.b_dtype) if need_b else None
            dp = (-vecmat_f32(s, W)).to(pre_bias.dtype) if need_p else None
        return dx, dW, db, dp, None


# ------------------------------------------------------------------------------------ layouts
def _inner_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


# ------------------------------------------------------------------------- pattern finders (no grad)
def _capacity(key, B, F) -> int:
    dens = _DENSITY.get_(key)
    if dens is None:
        return max(B * F // 8, 256)
    return int(math.ceil(1.25 * dens * B * F)) + 256


def _pattern_threshold_act(x, W, bias, mode, threshold, half_band) -> _Pattern:
    B, F = x.shape[0], W.shape[0]
    key = _w_key(W, mode, "density")
    pattern, count = _emit(x, W, bias, mode, capacity=_capacity(key, B, F), threshold=threshold,
                           half_band=half_band)
    if B * F > 0:
        _DENSITY.put(key, count / (B * F))
    return pattern


def _dense_rows(x, W, bias) -> torch.Tensor:
    """h for the given rows, fp32 [M, F], from the same kernel (so values match the fused path)."""
    return _launch(x, W, bias, MODE_DENSE)


def _sample_rows(B: int, n: int, device) -> torch.Tensor:
    n = min(B, n)
    return torch.linspace(0, B - 1, n, device=device).round().long().unique()


def _kth_largest(v: torch.Tensor, m: int) -> float:
    m = max(1, min(int(m), v.numel()))
    return float(torch.kthvalue(-v.reshape(-1), m).values.neg())


def _dense_topk_rows(x, W, bias, rows, k, chunk: int = 1024):
    """Exact top-k of h for the given rows, recomputed densely by the same kernel in chunks of rows
    (so that the temporary is chunk·F, not len(rows)·F) → (values fp32 [n, k], cols int64 [n, k])."""
    vals, idx = [], []
    for i in range(0, rows.numel(), chunk):
        v, j = torch.topk(_dense_rows(x[rows[i:i + chunk]], W, bias), k, dim=1)
        vals.append(v)
        idx.append(j)
    return torch.cat(vals), torch.cat(idx)


def _topk_pattern(x, W, bias, k, key) -> _Pattern:
    """Exactly k entries per row (the k largest of h), via candidates h > τ; rows with fewer than k
    candidates are recomputed densely. Identical to ``select.topk`` up to ties at the cut.
    ``key``: where the speculative τ and capacity of this call site live (``_w_key(W_enc, ...)``);
    None keeps no state: τ and the capacity come from a sample of this call's rows."""
    B, F = x.shape[0], W.shape[0]
    dev = x.device
    if B == 0:
        return _Pattern.empty(dev)

    def sample_tau():
        """τ from 64 evenly spaced rows computed densely (first call, a cached τ far too low, or no
        state), and a capacity for its candidates: the sample's count scaled to B rows, × 1.25."""
        STATS["sample_tau"] += 1
        rows = _sample_rows(B, 64, dev)
        hs = _dense_rows(x[rows], W, bias)
        kth = torch.topk(hs, k, dim=1).values[:, -1]
        lo, mid = float(kth.min()), float(kth.median())
        t = lo - 0.5 * (mid - lo) - 1e-6 * abs(lo)
        n = int((hs > t).sum())
        return t, int(1.25 * n * B / rows.numel()) + 64

    cap_key = None if key is None else key + ("cap",)
    tau = None if key is None else _TAU.get_(key)
    cap = None if key is None else _CAP.get_(cap_key)
    sampled = tau is None
    if k == F:
        tau = -math.inf
    elif tau is None:
        tau, cap = sample_tau()
    cap = cap or 2 * k * B + 64
    # more candidates than 16·k·B (+64) means τ is far too low: do not hold a huge COO
    max_count = None if k == F else 16 * k * B + 64
    cand, count = _emit(x, W, bias, MODE_CANDIDATES, capacity=cap, max_count=max_count, tau=tau)
    if cand is None:
        STATS["topk_tau_too_low"] += 1
        if not sampled:  # the cached τ was far too low (the data changed): one retry with a fresh one
            tau, cap = sample_tau()
            cand, count = _emit(x, W, bias, MODE_CANDIDATES, capacity=cap, max_count=max_count, tau=tau)
        if cand is None:  # still too low: every row goes through the exact dense-rows path below
            cand, count = _Pattern.empty(dev), 0
    if key is not None:
        _CAP.put(cap_key, int(1.25 * count) + 64)

    # rank the candidates inside each row by value (descending, stable), then keep the first k
    n = cand.nnz
    order = torch.argsort(cand.h, descending=True, stable=True)
    order = order[torch.argsort(cand.row[order], stable=True)]
    starts = torch.searchsorted(cand.row, torch.arange(B + 1, device=dev))
    counts = starts[1:] - starts[:-1]
    rank = torch.arange(n, device=dev) - starts[:-1][cand.row[order]]
    kept_pos, _ = torch.sort(order[rank < k])  # back to (row, col) order
    good = counts >= k
    kept = cand.take(kept_pos)
    kept = kept.take(good[kept.row])
    kth_good = cand.h[order[rank == k - 1]]  # the k-th value of every good row, in row order

    bad = (~good).nonzero().squeeze(1)
    kth = kth_good
    if bad.numel() > 0:
        STATS["topk_dense_rows"] += bad.numel()
        vals, idx = _dense_topk_rows(x, W, bias, bad, k)
        kth = torch.cat([kth_good, vals[:, -1]])
        rb = bad[:, None].expand(-1, k).reshape(-1)
        extra = _Pattern(rb, idx.reshape(-1).to(torch.int32), vals.reshape(-1))
        kept = _Pattern.sorted(torch.cat([kept.row, extra.row]), torch.cat([kept.col, extra.col]),
                               torch.cat([kept.h, extra.h]), F)
    if k < F:
        # a low quantile, not the minimum: one outlier row (padding, a BOS token) must not drag τ
        # down for every row; the ~1 % of rows below it take the dense-rows path
        lo, mid = torch.quantile(kth.float(), torch.tensor([0.01, 0.5], device=dev)).tolist()
        tau_next = lo - 0.1 * (mid - lo) - 1e-6 * abs(lo)
        if math.isfinite(tau_next) and key is not None:  # NaN/inf in h: keep the old τ (exact anyway)
            _TAU.put(key, tau_next)
    return kept


def _batch_topk_pattern(xs, Ws, biases, k, tag) -> list[_Pattern]:
    """Exactly k·B·L entries over all L layers together, the largest values of h; identical to
    ``select.batch_topk_layers`` up to ties at the cut. xs[l]: [B, d], Ws[l]: [F, d]."""
    L = len(xs)
    B, F = xs[0].shape[0], Ws[0].shape[0]
    dev = xs[0].device
    if B == 0:
        return [_Pattern.empty(dev) for _ in range(L)]
    want = k * B * L
    key = _w_key(Ws[0], tag, k, L)
    cap_key = _w_key(Ws[0], tag, k, L, "cap")

    def sample_tau(factor):
        rows = _sample_rows(B, 64, dev)
        hs = torch.cat([_dense_rows(xs[l][rows], Ws[l], biases[l]).reshape(-1) for l in range(L)])
        return _kth_largest(hs, factor * k * rows.numel() * L + 1) if factor * k < F else -math.inf

    taus = []
    if k == F:
        taus = [-math.inf]
    else:
        cached = _TAU.get_(key)
        if cached is not None:
            taus.append(cached)
        taus += [("sample", 1.5), ("sample", 4.0)]
    for attempt, tau in enumerate(taus):
        if attempt > 0:
            STATS["batchtopk_retry"] += 1
        if isinstance(tau, tuple):
            STATS["sample_tau"] += 1
            tau = sample_tau(tau[1])
        # one capacity per layer, learned from that layer's previous count: layers differ (a
        # share of the total would make every layer above the mean overflow and rerun each call)
        caps = _CAP.get_(cap_key) or [2 * k * B + 64] * L
        pats, counts = [], []
        for l in range(L):
            p, c = _emit(xs[l], Ws[l], biases[l], MODE_CANDIDATES, capacity=caps[l],
                         max_count=None if k == F else 8 * want + 64, tau=tau)
            counts.append(c)
            if p is None:
                break
            pats.append(p)
        if len(pats) < L or sum(counts) < want:
            continue  # τ too low (too many candidates) or too high (too few): next estimate
        _CAP.put(cap_key, [int(1.25 * c) + 64 for c in counts])
        return _select_largest(pats, want, key, tau)
    # exact dense path (rare): h of every layer written densely, one top-k over all of them
    STATS["batchtopk_dense"] += 1
    h = torch.cat([_dense_rows(xs[l], Ws[l], biases[l]).reshape(-1) for l in range(L)])
    vals, idx = torch.topk(h, want, sorted=False)
    if h.numel() > int(1.5 * want):
        _TAU.put(key, _kth_largest(h, int(1.5 * want) + 1))
    del h
    idx, perm = torch.sort(idx)  # layer-major, then (row, col): CSR order
    vals = vals[perm]
    layer, within = idx // (B * F), idx % (B * F)
    bounds = torch.searchsorted(layer, torch.arange(L + 1, device=dev)).tolist()
    return [_Pattern(within[bounds[l]:bounds[l + 1]] // F, (within[bounds[l]:bounds[l + 1]] % F).to(torch.int32),
                     vals[bounds[l]:bounds[l + 1]]) for l in range(L)]


def _select_largest(pats, want, key, tau_used: float) -> list[_Pattern]:
    h = torch.cat([p.h for p in pats])
    sizes = [p.nnz for p in pats]
    _, idx = torch.topk(h, want, sorted=False)
    idx, _ = torch.sort(idx)  # layer-major, then (row, col): CSR order
    # next τ: the value at rank 1.5·want among this call's candidates when there were that many,
    # else the τ that worked
    m = int(1.5 * want)
    if h.numel() > m:
        tau_next = _kth_largest(h, m + 1)
        if math.isfinite(tau_next):
            _TAU.put(key, tau_next)
    elif math.isfinite(tau_used):
        _TAU.put(key, tau_used)
    out, start = [], 0
    bounds = torch.tensor([0] + sizes, device=h.device).cumsum(0)
    for l, p in enumerate(pats):
        lo, hi = torch.searchsorted(idx, bounds[l:l + 2]).tolist()
        out.append(p.take(idx[lo:hi] - start))
        start += sizes[l]
    return out


# ---------------------------------------------------------------------------------- entry points
def encode(x: torch.Tensor, W_enc: torch.Tensor, b_enc: Optional[torch.Tensor], *, activation: str,
           k: Optional[int] = None, threshold: Optional[torch.Tensor] = None, bandwidth: float = 0.01,
           pre_bias: Optional[torch.Tensor] = None, return_preacts: bool = False):
    """x: [B, d_in], W_enc: [F, d_in], b_enc: [F] → SparseCodes of ``act(W_enc (x − pre_bias) + b_enc)``
    (values in x's dtype), identical to the reference encode; with ``return_preacts`` also the dense
    h: [B, F] (written densely: the documented fallback). Arguments as checked by ``fastclt.ops.encode``."""
    x, W_enc = _inner_contiguous(x), _inner_contiguous(W_enc)
    bias = folded_bias(W_enc, b_enc, pre_bias)
    Wd = W_enc.detach()
    if return_preacts:
        h = _DensePreacts.apply(x, W_enc, b_enc, pre_bias, bias)
        return activate(h, activation, k=k, threshold=threshold, bandwidth=bandwidth), h
    with torch.no_grad():
        xd = x.detach()
        if activation == "relu":
            pattern = _pattern_threshold_act(xd, Wd, bias, MODE_RELU, None, 0.0)
        elif activation == "jumprelu":
            thr = threshold.detach().float().contiguous()
            pattern = _pattern_threshold_act(xd, Wd, bias, MODE_JUMPRELU, thr, 0.5 * bandwidth)
        elif activation == "topk":
            pattern = _topk_pattern(xd, Wd, bias, k, _w_key(Wd, "topk", k))
        else:
            pattern = _batch_topk_pattern([xd], [Wd], [bias], k, "batchtopk")[0]
    return _codes(x, W_enc, b_enc, threshold, pre_bias, pattern, activation, bandwidth,
                  k if activation == "topk" else None)


def encode_layers(x: torch.Tensor, W_enc: torch.Tensor, b_enc: Optional[torch.Tensor], k: int,
                  pre_bias: Optional[torch.Tensor] = None, *, across_layers: bool = True) -> list[SparseCodes]:
    """BatchTopK across layers (CLTs): x: [B, L, d_in], W_enc: [L, F, d_in], b_enc: [L, F] → L
    SparseCodes holding exactly k·B·L entries over all layers together (the largest h, ReLU applied);
    identical to the reference's ``batch_topk_layers`` on the stacked h. pre_bias: [d_in] or None.
    Not ``across_layers``: each layer's own BatchTopK of k·B (one ``encode`` per layer)."""
    B, L, d = x.shape
    if not across_layers:
        bs = [None] * L if b_enc is None else b_enc.unbind(0)
        return [encode(x_l, W_l, b_l, activation="batchtopk", k=k, pre_bias=pre_bias)
                for x_l, W_l, b_l in zip(x.unbind(1), W_enc.unbind(0), bs)]
    xs = [_inner_contiguous(x[:, l]) for l in range(L)]
    Ws = [_inner_contiguous(W_enc[l]) for l in range(L)]
    bs = [None if b_enc is None else b_enc[l] for l in range(L)]
    biases = [folded_bias(Ws[l], bs[l], pre_bias) for l in range(L)]
    with torch.no_grad():
        pats = _batch_topk_pattern([t.detach() for t in xs], [w.detach() for w in Ws], biases, k, "layers")
    return [_codes(xs[l], Ws[l], bs[l], None, pre_bias, pats[l], "batchtopk", 0.01) for l in range(L)]
