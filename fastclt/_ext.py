"""The optional C++/CUDA extension ``fastclt._C``: what was built, and fake impls for tracing.

``fastclt._C`` registers the ops ``torch.ops.fastclt.*`` (schemas in csrc/bindings.cpp, math in
csrc/README.md). fastclt works without it: every op also has a PyTorch reference implementation.
Importing this module never fails; ``build_info()`` says what is there and how to build the rest.
"""
from __future__ import annotations

import torch

__all__ = ["has_cpu_ext", "has_cuda_ext", "build_info", "missing_message", "host_empty", "host_pool_stats",
           "host_pool_release", "host_pool_set_limit", "OPS"]

# Op names under torch.ops.fastclt.
OPS = ("topk", "topk_bias", "batch_topk_histogram", "batch_topk_compact", "batch_topk", "batch_topk_bias",
       "batch_topk_bias_layers",
       "threshold_compact", "sparse_decode", "clt_decode_untied", "sparse_dot", "feature_scatter",
       "feature_scatter_dot", "jumprelu_dense",
       "jumprelu_dense_backward", "normal_philox_", "code_stats", "clt_by_target", "clt_by_target_backward",
       "fvu_terms", "prefix_sum", "prefix_sum_backward", "bf16_split", "screened_topk", "screened_batch_topk")

BUILD_HINT = {
    "cpu": "the C++ kernels of fastclt._C are not built: with a C++ compiler present, run "
           "`FASTCLT_BUILD_CPU=1 pip install --no-build-isolation -e .` (or "
           "`python setup.py build_ext --inplace`)",
    "cuda": "the CUDA kernels of fastclt._C are not built: on a machine with nvcc and a CUDA build of "
            "PyTorch, run `FASTCLT_BUILD_CUDA=1 pip install --no-build-isolation -e .`",
}

try:
    from fastclt import _C  # noqa: F401  (loading it registers torch.ops.fastclt.*)

    _INFO = dict(_C.build_info())
    _IMPORT_ERROR = None
except (ImportError, OSError) as e:  # not built, or built against another torch
    _C = None
    _INFO = {"cpu": False, "openmp": False, "cuda": False, "cuda_arch_list": ""}
    _IMPORT_ERROR = f"{type(e).__name__}: {e}"


def has_cpu_ext() -> bool:
    """True when fastclt._C holds the C++ (CPU) kernels."""
    return bool(_INFO["cpu"])


def has_cuda_ext() -> bool:
    """True when fastclt._C holds the CUDA kernels."""
    return bool(_INFO["cuda"])


def build_info() -> dict:
    """dict: ``loaded``, ``cpu``, ``openmp``, ``cuda``, ``cuda_arch_list`` ("80_90a" = sm_80, sm_90a),
    ``torch_version`` (the running torch), ``import_error`` (why loading failed, else None)."""
    return {"loaded": _C is not None, **_INFO, "torch_version": torch.__version__, "import_error": _IMPORT_ERROR}


def missing_message(part: str) -> str:
    """How to build the missing ``part`` ("cpu" or "cuda"), with the load error if there was one."""
    msg = BUILD_HINT[part]
    if _IMPORT_ERROR is not None:
        msg += f" (importing fastclt._C failed: {_IMPORT_ERROR})"
    return msg


def host_empty(shape, dtype: torch.dtype, device) -> torch.Tensor:
    """An uninitialised contiguous tensor; on the CPU from fastclt._C's host pool (blocks of >= 2 MiB
    freed earlier are reused warm, without page faults; csrc/host_pool.h), else ``torch.empty``."""
    device = torch.device(device)
    if _C is not None and device.type == "cpu":
        return _C.host_empty([int(s) for s in shape], dtype)
    return torch.empty(shape, dtype=dtype, device=device)


def host_pool_stats() -> dict:
    """The host pool's ``cached_bytes`` / ``cached_blocks`` (held, unused), ``limit_bytes``, ``hits``
    and ``misses``; all zero when fastclt._C is not loaded."""
    if _C is None:
        return {"cached_bytes": 0, "cached_blocks": 0, "limit_bytes": 0, "hits": 0, "misses": 0}
    return dict(_C.host_pool_stats())


def host_pool_release() -> None:
    """Free every unused block the host pool holds (memory in use stays in use)."""
    if _C is not None:
        _C.host_pool_release()


def host_pool_set_limit(n_bytes: int) -> None:
    """Limit the unused bytes the host pool may hold (``FASTCLT_HOST_POOL_MB`` sets it at start;
    0 turns caching off); frees what is over the new limit."""
    if isinstance(n_bytes, bool) or not isinstance(n_bytes, int) or n_bytes < 0:
        raise ValueError(f"n_bytes: expected a non-negative int, got {n_bytes!r}")
    if _C is not None:
        _C.host_pool_set_limit(n_bytes)


def _register_fakes() -> None:
    """Shape/dtype functions so that the ops trace under torch.compile (FakeTensor / meta)."""

    @torch.library.register_fake("fastclt::topk")
    def _(h, k):
        return h.new_empty(h.shape[0], k, dtype=torch.int32), h.new_empty(h.shape[0], k)

    @torch.library.register_fake("fastclt::topk_bias")
    def _(h, bias, k):
        return h.new_empty(h.shape[0], k, dtype=torch.int32), h.new_empty(h.shape[0], k)

    @torch.library.register_fake("fastclt::batch_topk_histogram")
    def _(h, prefix, prefix_bits, digit_bits):
        return h.new_empty((1 << digit_bits) + 1, dtype=torch.int64)

    @torch.library.register_fake("fastclt::batch_topk_compact")
    def _(h, threshold_key, equal_skip, equal_take, nnz):
        rows = h.numel() // h.shape[-1] if h.shape[-1] else 0
        return (h.new_empty(rows + 1, dtype=torch.int64), h.new_empty(nnz, dtype=torch.int32), h.new_empty(nnz))

    @torch.library.register_fake("fastclt::batch_topk")
    def _(h, k_total):
        rows = h.numel() // h.shape[-1] if h.shape[-1] else 0
        return (h.new_empty(rows + 1, dtype=torch.int64), h.new_empty(k_total, dtype=torch.int32),
                h.new_empty(k_total))

    @torch.library.register_fake("fastclt::batch_topk_bias")
    def _(h, bias, k_total):
        return (h.new_empty(h.shape[0] + 1, dtype=torch.int64), h.new_empty(k_total, dtype=torch.int32),
                h.new_empty(k_total))

    @torch.library.register_fake("fastclt::batch_topk_bias_layers")
    def _(h, bias, k_total):
        L, B = h.shape[0], h.shape[1]
        return (h.new_empty(L * B + 1, dtype=torch.int64), h.new_empty(L * k_total, dtype=torch.int32),
                h.new_empty(L * k_total))

    @torch.library.register_fake("fastclt::bf16_split")
    def _(a):
        return a.new_empty(a.shape, dtype=torch.bfloat16), a.new_empty(2, a.shape[0])

    @torch.library.register_fake("fastclt::screened_topk")
    def _(A, x, W, bias, x_norms, w_norms, k):
        return (x.new_empty(A.shape[0], k, dtype=torch.int32), x.new_empty(A.shape[0], k),
                x.new_empty((), dtype=torch.int32))

    @torch.library.register_fake("fastclt::screened_batch_topk")
    def _(A, x, W, bias, x_norms, w_norms, k_total):
        return (x.new_empty(A.shape[0] + 1, dtype=torch.int64), x.new_empty(k_total, dtype=torch.int32),
                x.new_empty(k_total), x.new_empty((), dtype=torch.int32))

    @torch.library.register_fake("fastclt::normal_philox_")
    def _(out, seed, stream, std):
        return None

    @torch.library.register_fake("fastclt::threshold_compact")
    def _(h, threshold, half_band):
        nnz = torch.library.get_ctx().new_dynamic_size()
        return (h.new_empty(h.shape[0] + 1, dtype=torch.int64), h.new_empty(nnz, dtype=torch.int32),
                h.new_empty(nnz, dtype=torch.float32))

    @torch.library.register_fake("fastclt::sparse_decode")
    def _(row_ptr, index, value, weight, bias):
        return weight.new_empty(row_ptr.shape[0] - 1, weight.shape[1])

    @torch.library.register_fake("fastclt::clt_decode_untied")
    def _(row_ptr, index, value, weight, sources, n_layers, bias):
        d = weight[0].shape[1] // (n_layers - sources[0])
        return weight[0].new_empty(row_ptr[0].shape[0] - 1, n_layers * d)

    @torch.library.register_fake("fastclt::sparse_dot")
    def _(row_ptr, index, grad, weight):
        return weight.new_empty(index.shape[0])

    @torch.library.register_fake("fastclt::feature_scatter")
    def _(row_ptr, index, coef, x, n_features):
        return x.new_empty(n_features, x.shape[-1]), x.new_empty(n_features, dtype=torch.float32)

    @torch.library.register_fake("fastclt::feature_scatter_dot")
    def _(row_ptr, index, coef, x, weight):
        return (x.new_empty(weight.shape[0], x.shape[-1]), x.new_empty(weight.shape[0], dtype=torch.float32),
                x.new_empty(index.shape[0]))


    @torch.library.register_fake("fastclt::fvu_terms")
    def _(y, y_hat):
        return y.new_empty(y.shape[1]), y.new_empty(y.shape[1])

    @torch.library.register_fake("fastclt::prefix_sum")
    def _(parts, bias, cumulative=True):
        return parts.new_empty(parts.shape[1], parts.shape[0], parts.shape[2])

    @torch.library.register_fake("fastclt::prefix_sum_backward")
    def _(grad, need_bias, cumulative=True):
        return (grad.new_empty(grad.shape[1], grad.shape[0], grad.shape[2]),
                grad.new_empty((grad.shape[1], grad.shape[2]) if need_bias else (0,), dtype=torch.float32))

    @torch.library.register_fake("fastclt::code_stats")
    def _(index, value, n_features):
        return (value[0].new_empty(len(index), n_features, dtype=torch.float32),
                value[0].new_empty(len(index), dtype=torch.int64))

    @torch.library.register_fake("fastclt::clt_by_target")
    def _(row_ptrs, index, value, n_features):
        L, B = row_ptrs.shape[0], row_ptrs.shape[1] - 1
        total = torch.library.get_ctx().new_dynamic_size()  # Σ_s nnz_s · (L − s): from row_ptrs' values
        return (row_ptrs.new_empty(L * B + 1), index.new_empty(total), value.new_empty(total))

    @torch.library.register_fake("fastclt::clt_by_target_backward")
    def _(row_ptrs, grad, n_entries):
        return grad.new_empty(n_entries)

    @torch.library.register_fake("fastclt::molt_forward")
    def _(row_ptr, index, gate, x, U, V, rank_ptr, bias):
        n = torch.library.get_ctx().new_dynamic_size()  # h holds r_i floats per active pair
        return U.new_empty(x.shape[0], U.shape[1]), x.new_empty(n, dtype=torch.float32)

    @torch.library.register_fake("fastclt::molt_backward")
    def _(row_ptr, index, gate, x, U, V, rank_ptr, h, grad_y, need_gate, need_x, need_U, need_V):
        def pick(want, t):
            return t if want else x.new_empty(0)
        return (pick(need_gate, gate.new_empty(index.shape[0])), pick(need_x, torch.empty_like(x)),
                pick(need_U, torch.empty_like(U)), pick(need_V, torch.empty_like(V)))

    @torch.library.register_fake("fastclt::prefix_errors_forward")
    def _(y, base, blocks):
        return y.new_empty(blocks.shape[0], y.shape[1]), torch.empty_like(y)

    @torch.library.register_fake("fastclt::prefix_errors_backward")
    def _(y, base, blocks, dsq, need_y, need_base, need_blocks):
        def pick(want, t):
            return torch.empty_like(t) if want else y.new_empty(0)
        return pick(need_y, y), pick(need_base, base), pick(need_blocks, blocks)

    @torch.library.register_fake("fastclt::total_variance")
    def _(y):
        return y.new_empty(y.shape[1])

    @torch.library.register_fake("fastclt::jumprelu_dense")
    def _(h, threshold, half_band):
        return torch.empty_like(h), torch.empty_like(h, dtype=torch.bool), torch.empty_like(h, dtype=torch.uint8)

    @torch.library.register_fake("fastclt::jumprelu_dense_backward")
    def _(grad, code, threshold, bandwidth, need_h, need_threshold):
        return (torch.empty_like(grad) if need_h else grad.new_empty(0),
                torch.empty_like(threshold) if need_threshold else threshold.new_empty(0))


_PY_KERNELS = []  # the torch.library.Library holding Python kernels (kept alive: dropping it deregisters them)


def _register_python_kernels() -> None:
    """Device kernels written in Python over the C++ ops: ``batch_topk`` on CUDA is the radix select
    of ``fastclt.ops.ext.select.batch_topk_radix`` (histogram passes, then one compaction)."""
    lib = torch.library.Library("fastclt", "IMPL")

    def batch_topk_cuda(h, k_total):
        from fastclt.ops.ext.select import batch_topk_radix

        return batch_topk_radix(h, k_total)

    lib.impl("batch_topk", batch_topk_cuda, "CUDA")
    _PY_KERNELS.append(lib)


if _C is not None:
    _register_fakes()
    _register_python_kernels()
