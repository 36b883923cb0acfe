// CPU kernels of the three sparse shapes of the hot path (csrc/README.md):
//   sparse_decode    y[b]   = sum_j value[j] * W[index[j]] (+ bias)       gather by row
//                    (long rows over a large W: blocked, L2-sized slices of W per pass)
//   clt_decode_untied  an untied CLT's sources gathered into y [B, L·d] at once
//   sparse_dot       out[j] = <G[row(j)], W[index[j]]>                     dot at sparse indices
//   feature_scatter  out[f] = sum_{j: index[j]=f} coef[j] * X[row(j)]      scatter by feature
//   feature_scatter_dot  the scatter, plus dot[j] = <X[row(j)], W[index[j]]> in the same sweep
//   clt_by_target    a per_target CLT's sources as one CSR over rows (target, token), for one decode
//                    (and its values' backward: each entry's copies summed, clt_by_target_backward)
// All accumulate in fp32; feature_scatter groups entries by feature (counting sort) so that one
// task owns one output row: deterministic, no atomics.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <memory>
#include <type_traits>
#include <vector>

#if defined(__SSE__)
#include <xmmintrin.h>
#endif

#include "../scatter_plan.h"
#include "checks.h"
#include "simd.h"

namespace fastclt {
namespace {

// Below this many multiply-adds (or entries checked) a kernel runs on one thread: waking the others
// costs tens of microseconds (far more when another process holds a core), the whole op less.
constexpr int64_t kParallelWork = int64_t(1) << 17;

// Whether any of n indices lies outside [0, bound): one unsigned compare per entry (a negative one wraps
// above any bound) OR-ed into a flag, no branch, so the loop vectorizes; written as a short-circuit
// test per entry it did not (65536 entries: the joined decode 1.30 -> 1.27 ms, clt_by_target 0.18 ->
// 0.15 ms, 2-core Xeon; every op of a step checks its codes). Threads only for very long index
// arrays: below that a parallel region costs more than the pass.
constexpr int64_t kParallelCheck = int64_t(1) << 21;

bool any_outside(const int32_t* idx, int64_t n, int64_t bound) {
  const uint32_t ub = bound > INT32_MAX ? 0x80000000u : uint32_t(std::max<int64_t>(bound, 0));
  uint32_t bad = 0;
#pragma omp parallel for reduction(| : bad) schedule(static) if (n > kParallelCheck)
  for (int64_t j = 0; j < n; ++j) bad |= uint32_t(static_cast<uint32_t>(idx[j]) >= ub);
  return bad != 0;
}

// Checks row_ptr (0 = row_ptr[0] <= ... <= row_ptr[B] = nnz) and 0 <= index < n_features: O(B + nnz),
// small next to the O(nnz * D) work of every op that calls it.
void check_codes_content(const at::Tensor& row_ptr, const at::Tensor& index, int64_t n_features,
                         const char* op, const char* bound_name) {
  const int64_t* rp = row_ptr.data_ptr<int64_t>();
  const int64_t B = row_ptr.size(0) - 1, nnz = index.size(0);
  TORCH_CHECK(rp[0] == 0 && rp[B] == nnz, "fastclt::", op,
              ": row_ptr must start at 0 and end at nnz=", nnz, ", got ", rp[0], " and ", rp[B]);
  for (int64_t b = 0; b < B; ++b)
    TORCH_CHECK(rp[b] <= rp[b + 1], "fastclt::", op, ": row_ptr must be non-decreasing (row ", b, ")");
  TORCH_CHECK(!any_outside(index.data_ptr<int32_t>(), nnz, n_features), "fastclt::", op, ": index must lie in [0, ",
              bound_name, "=", n_features, ")");
}

// The blocked decode (decode_blocked) keeps a block of output rows and a slice of W in L2 together:
// about kSliceBytes of W rows per pass, kBlockBytes of fp32 output rows per block.
constexpr int64_t kSliceBytes = int64_t(1) << 20, kBlockBytes = int64_t(512) << 10;
// ... and runs where a pass would gather at least this many entries per row on average.
constexpr int64_t kMinPerPass = 8;

// y[b] = sum_j value[j] * W[index[j]] by blocks of rows, each in passes over slices of the features
// its entries use: a gathered W row then comes from L2 rather than L3, where the rows its entries
// touch span more than L2 holds (a per_target CLT's joined decode: 4 MB of W_dec[t] per target).
// Within a row the entries are summed slice by slice, each slice's in their order.
// Returns false (nothing written) where the blocks would not gain: few entries per row and pass.
// Measured (2-core Xeon, fp32, alternated in one process): the cpu-clt per_target joined decode
// (4096 rows, 163840 entries, W [16384, 256]) 3.8-4.2 -> 2.4-2.6 ms; the per_source joined decode
// (16 entries a row) was 3% slower blocked, hence kMinPerPass = 8. Single-thread gathers, 1 KB rows:
// 15 ns an entry from a 1 MB W, 37 from 4 MB, 50 from 16 MB.
template <typename T, typename V>
bool decode_blocked(const int64_t* rp, const int32_t* idx, const V* val, const T* W, const T* bias,
                    int64_t B, int64_t D, T* y) {
  const int64_t nnz = rp[B], row_bytes = D * int64_t(sizeof(T));
  // (too few entries per row on average for two passes of kMinPerPass: skip the scan below)
  if (D == 0 || nnz < 2 * kMinPerPass * B) return false;
  int shift = 0;  // a slice holds 2^shift features
  while ((int64_t(2) << shift) * row_bytes <= kSliceBytes) ++shift;
  const int64_t block = std::max<int64_t>(1, kBlockBytes / (D * int64_t(sizeof(float))));
  const int64_t n_blocks = (B + block - 1) / block;
  std::vector<int32_t> fmin(n_blocks), n_pass(n_blocks);
  bool any = false;
  for (int64_t k = 0; k < n_blocks; ++k) {
    const int64_t b0 = k * block, b1 = std::min(B, b0 + block);
    int32_t lo = std::numeric_limits<int32_t>::max(), hi = -1;
    for (int64_t j = rp[b0]; j < rp[b1]; ++j) lo = std::min(lo, idx[j]), hi = std::max(hi, idx[j]);
    fmin[k] = lo;
    const int32_t passes = hi < lo ? 1 : int32_t(((hi - lo) >> shift) + 1);
    const bool gains = passes > 1 && (rp[b1] - rp[b0]) >= kMinPerPass * passes * (b1 - b0);
    n_pass[k] = gains ? passes : 1;  // one pass: the plain decode's order
    any = any || gains;
  }
  if (!any) return false;
#pragma omp parallel if (nnz * D > kParallelWork)
  {
    std::vector<float> scratch(std::is_same<T, float>::value ? 0 : block * D);
    std::vector<int64_t> rows, seg;
    std::vector<float> coef;
#pragma omp for schedule(dynamic, 1)
    for (int64_t k = 0; k < n_blocks; ++k) {
      const int64_t b0 = k * block, b1 = std::min(B, b0 + block), nb = b1 - b0;
      const int64_t P = n_pass[k], m = rp[b1] - rp[b0];
      const int shift_k = P == 1 ? 31 : shift;  // one pass: every entry in slice 0
      auto slice = [&](int64_t j) { return (int64_t(idx[j]) - fmin[k]) >> shift_k; };
      float* acc = std::is_same<T, float>::value ? reinterpret_cast<float*>(y + b0 * D) : scratch.data();
      for (int64_t b = 0; b < nb; ++b)
        for (int64_t d = 0; d < D; ++d) acc[b * D + d] = bias ? static_cast<float>(bias[d]) : 0.f;
      // the block's entries grouped by (row, slice), stable: seg[b * P + p] is where row b's slice p starts
      rows.resize(m);
      coef.resize(m);
      seg.assign(nb * P + 1, 0);
      for (int64_t b = 0; b < nb; ++b)
        for (int64_t j = rp[b0 + b]; j < rp[b0 + b + 1]; ++j) ++seg[b * P + slice(j) + 1];
      for (int64_t q = 0; q < nb * P; ++q) seg[q + 1] += seg[q];
      {
        std::vector<int64_t> fill(seg.begin(), seg.end() - 1);
        for (int64_t b = 0; b < nb; ++b)
          for (int64_t j = rp[b0 + b]; j < rp[b0 + b + 1]; ++j) {
            const int64_t q = fill[b * P + slice(j)]++;
            rows[q] = idx[j];
            coef[q] = static_cast<float>(val[j]);
          }
      }
      for (int64_t p = 0; p < P; ++p)
        for (int64_t b = 0; b < nb; ++b) {
          const int64_t s0 = seg[b * P + p], n = seg[b * P + p + 1] - s0;
          if (n > 0) simd::gather_axpy(acc + b * D, W, rows.data() + s0, coef.data() + s0, n, D, D);
        }
      if (!std::is_same<T, float>::value)
        for (int64_t i = 0; i < nb * D; ++i) y[b0 * D + i] = T(acc[i]);
    }
  }
  return true;
}

// acc[0:D) += sum over n entries of val[j] * W[idx[j]] (W's rows D apart), in gather_axpy's order; rows and
// coef are the caller's scratch (the entries' rows widened, their values in fp32).
template <typename T, typename V>
inline void axpy_entries(float* acc, const T* W, const int32_t* idx, const V* val, int64_t n, int64_t D,
                         std::vector<int64_t>& rows, std::vector<float>& coef) {
  rows.resize(n);
  coef.resize(n);
  for (int64_t j = 0; j < n; ++j) {
    rows[j] = idx[j];
    coef[j] = static_cast<float>(val[j]);
  }
  simd::gather_axpy(acc, W, rows.data(), coef.data(), n, D, D);
}

// val: T, or fp32 with bf16 weights (an encoder backward's dh, not rounded before the sum).
template <typename T, typename V>
void decode_impl(const int64_t* rp, const int32_t* idx, const V* val, const T* W, const T* bias,
                 int64_t B, int64_t D, T* y) {
  if (decode_blocked(rp, idx, val, W, bias, B, D, y)) return;
#pragma omp parallel if (rp[B] * D > kParallelWork)
  {
    std::vector<float> acc(D), coef;
    std::vector<int64_t> rows;
#pragma omp for schedule(static)
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t d = 0; d < D; ++d) acc[d] = bias ? static_cast<float>(bias[d]) : 0.f;
      axpy_entries(acc.data(), W, idx + rp[b], val + rp[b], rp[b + 1] - rp[b], D, rows, coef);
      T* out = y + b * D;
      for (int64_t d = 0; d < D; ++d) out[d] = T(acc[d]);
    }
  }
}

at::Tensor sparse_decode_cpu(const at::Tensor& row_ptr, const at::Tensor& index,
                             const at::Tensor& value, const at::Tensor& weight,
                             const std::optional<at::Tensor>& bias) {
  const char* op = "sparse_decode";
  const int64_t B = check_codes(row_ptr, index, value, op, "value");
  check_matrix(weight, row_ptr, op, "weight");
  check_value_dtype(value, weight, op);
  const int64_t F = weight.size(0), D = weight.size(1);
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == D, "fastclt::sparse_decode: bias must have "
                "shape [D=", D, "], got ", bias->sizes());
    check_float_tensor(*bias, op, "bias");
    check_same_dtype(*bias, weight, op, "bias", "weight");
    check_device(*bias, row_ptr, op, "bias", "row_ptr");
  }
  TORCH_CHECK(row_ptr.device().is_cpu(), "fastclt::sparse_decode: CPU kernel called on ", row_ptr.device());
  check_codes_content(row_ptr, index, F, op, "weight.size(0)");
  auto y = new_output({B, D}, weight.options());
  dispatch_float(weight.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    auto run = [&](auto value_tag) {
      using V = decltype(value_tag);
      decode_impl<T, V>(row_ptr.data_ptr<int64_t>(), index.data_ptr<int32_t>(), value.data_ptr<V>(),
                        weight.data_ptr<T>(), bias.has_value() ? bias->data_ptr<T>() : nullptr, B, D,
                        y.data_ptr<T>());
    };
    if (value.scalar_type() == at::kFloat) {
      run(float{});
    } else {
      run(T{});
    }
  });
  return y;
}

// An untied CLT's decode, every source into ŷ [B, L·d] at once: ŷ[b, s·d:] += Σ_j value_s[j] ·
// W_s[index_s[j]] for each source s (W_s: [F_s, (L − s)·d], the source's block of every target t ≥ s),
// token by token, the sources in order, each with gather_axpy's own order of its entries, into one fp32
// accumulator per token that starts at the bias and is rounded once. Against L sparse decodes and a
// sum of their shifted outputs: no [B, (L − s)·d] output per source to write and read back.
template <typename T, typename V>
struct UntiedSource {
  const int64_t* rp;
  const int32_t* idx;
  const V* val;
  const T* W;
  int64_t shift;
};

template <typename T, typename V>
void untied_impl(const std::vector<UntiedSource<T, V>>& src, const T* bias, int64_t B, int64_t L, int64_t d,
                 int64_t work, T* y) {
  const int64_t D = L * d;
#pragma omp parallel if (work > kParallelWork)
  {
    std::vector<float> acc(D), coef;
    std::vector<int64_t> rows;
#pragma omp for schedule(static)
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t c = 0; c < D; ++c) acc[c] = bias ? static_cast<float>(bias[c]) : 0.f;
      for (const auto& s : src)
        axpy_entries(acc.data() + s.shift * d, s.W, s.idx + s.rp[b], s.val + s.rp[b], s.rp[b + 1] - s.rp[b],
                     (L - s.shift) * d, rows, coef);
      T* out = y + b * D;
      for (int64_t c = 0; c < D; ++c) out[c] = T(acc[c]);
    }
  }
}

at::Tensor clt_decode_untied_cpu(at::TensorList row_ptr, at::TensorList index, at::TensorList value,
                                 at::TensorList weight, at::IntArrayRef sources, int64_t n_layers,
                                 const std::optional<at::Tensor>& bias) {
  const char* op = "clt_decode_untied";
  const int64_t n = int64_t(weight.size()), L = n_layers;
  TORCH_CHECK(n >= 1, "fastclt::clt_decode_untied: weight must hold at least one source's block, got none");
  TORCH_CHECK(int64_t(row_ptr.size()) == n && int64_t(index.size()) == n && int64_t(value.size()) == n &&
              int64_t(sources.size()) == n, "fastclt::clt_decode_untied: row_ptr, index, value, weight and sources "
              "must hold one entry per source, got ", row_ptr.size(), ", ", index.size(), ", ", value.size(), ", ", n,
              " and ", sources.size());
  TORCH_CHECK(L >= 1, "fastclt::clt_decode_untied: n_layers must be >= 1, got ", L);
  for (int64_t i = 0; i < n; ++i)
    TORCH_CHECK(sources[i] >= 0 && sources[i] < L && (i == 0 || sources[i] > sources[i - 1]),
                "fastclt::clt_decode_untied: sources must increase within [0, n_layers=", L, "), got ", sources);
  const at::Tensor& W0 = weight[0];
  check_matrix(W0, row_ptr[0], op, "weight[0]");
  TORCH_CHECK(W0.size(1) % (L - sources[0]) == 0, "fastclt::clt_decode_untied: weight[0] must be [F, (n_layers - "
              "sources[0]) * d], got shape ", W0.sizes(), " for n_layers=", L, " and sources[0]=", sources[0]);
  const int64_t d = W0.size(1) / (L - sources[0]);
  const int64_t B = row_ptr[0].dim() == 1 ? row_ptr[0].size(0) - 1 : -1;
  int64_t work = 0;
  for (int64_t i = 0; i < n; ++i) {
    check_codes(row_ptr[i], index[i], value[i], op, "value");
    check_matrix(weight[i], row_ptr[0], op, "weight");
    check_device(row_ptr[i], row_ptr[0], op, "row_ptr", "row_ptr[0]");
    check_same_dtype(weight[i], W0, op, "weight", "weight[0]");
    check_same_dtype(value[i], value[0], op, "value", "value[0]");
    check_value_dtype(value[i], W0, op);
    TORCH_CHECK(row_ptr[i].size(0) - 1 == B, "fastclt::clt_decode_untied: every source must have B=", B,
                " rows, row_ptr[", i, "] has ", row_ptr[i].size(0) - 1);
    TORCH_CHECK(weight[i].size(1) == (L - sources[i]) * d, "fastclt::clt_decode_untied: weight[", i, "] must have (",
                "n_layers - sources[", i, "]) * d = ", (L - sources[i]) * d, " columns, got shape ", weight[i].sizes());
    work += index[i].size(0) * (L - sources[i]) * d;
  }
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 2 && bias->size(0) == L && bias->size(1) == d, "fastclt::clt_decode_untied: bias must "
                "have shape [n_layers=", L, ", d=", d, "], got ", bias->sizes());
    check_float_tensor(*bias, op, "bias");
    check_same_dtype(*bias, W0, op, "bias", "weight");
    check_device(*bias, row_ptr[0], op, "bias", "row_ptr");
  }
  TORCH_CHECK(row_ptr[0].device().is_cpu(), "fastclt::clt_decode_untied: CPU kernel called on ", row_ptr[0].device());
  for (int64_t i = 0; i < n; ++i) check_codes_content(row_ptr[i], index[i], weight[i].size(0), op, "weight.size(0)");
  auto y = new_output({B, L * d}, W0.options());
  dispatch_float(W0.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    auto run = [&](auto value_tag) {
      using V = decltype(value_tag);
      std::vector<UntiedSource<T, V>> src;
      for (int64_t i = 0; i < n; ++i)
        src.push_back({row_ptr[i].data_ptr<int64_t>(), index[i].data_ptr<int32_t>(), value[i].data_ptr<V>(),
                       weight[i].data_ptr<T>(), sources[i]});
      untied_impl<T, V>(src, bias.has_value() ? bias->data_ptr<T>() : nullptr, B, L, d, work, y.data_ptr<T>());
    };
    if (value[0].scalar_type() == at::kFloat) {
      run(float{});
    } else {
      run(T{});
    }
  });
  return y;
}

template <typename T>
void dot_impl(const int64_t* rp, const int32_t* idx, const T* G, const T* W, int64_t B, int64_t D,
              T* out) {
#pragma omp parallel if (rp[B] * D > kParallelWork)
  {
    std::vector<int64_t> rows;
    std::vector<float> dots;
#pragma omp for schedule(static)
    for (int64_t b = 0; b < B; ++b) {
      const int64_t start = rp[b], n = rp[b + 1] - rp[b];
      rows.resize(n);
      dots.resize(n);
      for (int64_t j = 0; j < n; ++j) rows[j] = idx[start + j];
      simd::gather_dot(G + b * D, W, rows.data(), dots.data(), n, D);
      for (int64_t j = 0; j < n; ++j) out[start + j] = T(dots[j]);
    }
  }
}

at::Tensor sparse_dot_cpu(const at::Tensor& row_ptr, const at::Tensor& index,
                          const at::Tensor& grad, const at::Tensor& weight) {
  const char* op = "sparse_dot";
  TORCH_CHECK(row_ptr.scalar_type() == at::kLong && row_ptr.dim() == 1 && row_ptr.size(0) >= 1 &&
              row_ptr.is_contiguous(), "fastclt::sparse_dot: row_ptr must be a contiguous 1-D "
              "int64 tensor of length B+1 >= 1, got ", row_ptr.scalar_type(), " ", row_ptr.sizes());
  TORCH_CHECK(index.scalar_type() == at::kInt && index.dim() == 1 && index.is_contiguous(),
              "fastclt::sparse_dot: index must be a contiguous 1-D int32 tensor, got ",
              index.scalar_type(), " ", index.sizes());
  check_device(index, row_ptr, op, "index", "row_ptr");
  check_matrix(grad, row_ptr, op, "grad");
  check_matrix(weight, row_ptr, op, "weight");
  check_same_dtype(grad, weight, op, "grad", "weight");
  const int64_t B = row_ptr.size(0) - 1, D = weight.size(1);
  TORCH_CHECK(grad.size(0) == B && grad.size(1) == D, "fastclt::sparse_dot: grad must have shape "
              "[B=", B, ", D=", D, "], got ", grad.sizes());
  TORCH_CHECK(row_ptr.device().is_cpu(), "fastclt::sparse_dot: CPU kernel called on ", row_ptr.device());
  check_codes_content(row_ptr, index, weight.size(0), op, "weight.size(0)");
  auto out = new_output({index.size(0)}, weight.options());
  dispatch_float(weight.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    dot_impl<T>(row_ptr.data_ptr<int64_t>(), index.data_ptr<int32_t>(), grad.data_ptr<T>(),
                weight.data_ptr<T>(), B, D, out.data_ptr<T>());
  });
  return out;
}

// Writes an output row of the [F, D] weight gradients. A large output (above kStreamBytes: 50 MB at the
// cpu-small shape), which the optimizer reads back from memory anyway, goes out with fp32 16-byte
// non-temporal stores on x86: they skip reading the destination lines into the cache first (a third
// of the scatter's memory traffic). A smaller one is stored plainly and stays in the cache for the
// optimizer: at the cpu-clt shape (16 MB gradients) streaming them made the per_source step 1.1-3 ms
// slower (50.0-50.7 against 47.7-49.6 ms; none and per_target ~1 ms), and the cpu-small SAE step
// ~1 ms faster (of ~200 ms), timed alternating both in one process on the 2-core Xeon, whose cache
// holds about 100 MB (a sum over 96 MB runs at 49 GB/s, over 256 MB at 28). stores_done() orders the
// streamed stores before the parallel region ends.
constexpr int64_t kStreamBytes = int64_t(32) << 20;

// scatter_impl's counting sort runs on the threads from this many entries (below, a parallel
// region costs more than it saves), in at most this many parts of rows.
constexpr int64_t kParallelSortEntries = int64_t(1) << 15, kMaxSortParts = 16;

inline void store_row(float* o, const float* acc, int64_t D, bool stream) {
#if defined(__SSE__)
  if (!stream) {
    std::copy(acc, acc + D, o);
    return;
  }
  int64_t d = 0;
  for (; d < D && (reinterpret_cast<uintptr_t>(o + d) & 15) != 0; ++d) o[d] = acc[d];
  for (; d + 4 <= D; d += 4) _mm_stream_ps(o + d, _mm_loadu_ps(acc + d));
  for (; d < D; ++d) o[d] = acc[d];
#else
  (void)stream;
  std::copy(acc, acc + D, o);
#endif
}

inline void store_row(at::BFloat16* o, const float* acc, int64_t D, bool) {
  for (int64_t d = 0; d < D; ++d) o[d] = at::BFloat16(acc[d]);
}

inline void stores_done() {
#if defined(__SSE__)
  _mm_sfence();
#endif
}

// out[f] = sum of coef[j] * X[row(j)] over f's entries; with W (feature_scatter_dot) also
// dot[j] = <X[row(j)], W[f]> in the same sweep (csrc/cpu/simd.h gather_axpy_dot). (Sweeping the
// features once per column tile of X, so that X[:, tile] stays in L2, was slower at the cpu-small
// shape: 16.4 ms for 2 tiles and 22 ms for 6, against 15 ms untiled, for the decode fwd+bwd.)
// X's row r starts at X + row_start[r] (element offsets: any row strides).
template <typename T>
void scatter_impl(const int64_t* rp, const int32_t* idx, const T* coef, const T* X, const int64_t* row_start,
                  int64_t B, int64_t nnz, int64_t F, int64_t D, T* out, float* coef_sum, const T* W = nullptr,
                  T* dot = nullptr) {
  // Group entries by feature with a stable counting sort (entries of a feature stay in flat order,
  // so every sum below has a fixed order: deterministic): one pass counts, one writes each entry's
  // row and fp32 coefficient, packed in 8 bytes, at its sorted slot (and, for the dots, records
  // that slot), so that the feature loop reads them in order. The writes land on random cache lines:
  // packing row and coefficient halves the lines written (the sort of 65536 entries over 16384
  // features took 0.45 ms with int64 rows, coefficients and positions in three arrays, 0.31 ms
  // packed with int32 positions, 0.22 ms packed alone; one thread, 2-core Xeon). Sorting positions
  // only and gathering rows and coefficients through them in the loop cost ~0.3 ms more per call.
  // (Two threads, each writing the entries of half of the rows, were 2.3x slower than one: the
  // halves' entries of a feature share cache lines.) Above kParallelSortEntries, and with at most
  // as many counters as entries, the count runs on the threads, each over its own range of rows
  // into its own counts, and the fill too where rows split into ranges whose features do not
  // overlap (a CSR that joins layers, row block l holding layer l's features: the joined per_source
  // / per_target decodes and the joined encoder), each range writing only its own features' slots;
  // elsewhere the fill stays on one thread. The slots are those of the one-thread sort, so the
  // result is the same bit for bit.
  // The dots are written in sorted order, each feature's to its own slots, and put back in entry
  // order after the sweep through each entry's slot (recorded in order by the fill pass): written
  // in place from the sweep, two threads' random 4-byte writes shared cache lines (the per_target
  // joined decode backward, 163840 entries at D = 256: 5.4 ms, 7.0 on one thread).
  struct Entry {
    int32_t row;
    float coef;
  };
  const int64_t parts =
      nnz >= kParallelSortEntries && F > 0
          ? std::max<int64_t>(1, std::min<int64_t>({int64_t(at::get_num_threads()), kMaxSortParts, B, nnz / F}))
          : 1;
  // the count: part t takes rows [part_row[t], part_row[t + 1]), about nnz / parts entries each
  std::vector<int64_t> part_row(parts + 1, B);
  for (int64_t t = 0; t < parts; ++t)
    part_row[t] = std::max(t == 0 ? 0 : part_row[t - 1], std::lower_bound(rp, rp + B + 1, nnz * t / parts) - rp);
  std::unique_ptr<int32_t[]> counts(new int32_t[parts * F]);  // [part, feature]
  std::vector<int32_t> row_lo(parts > 1 ? B : 0), row_hi(parts > 1 ? B : 0);  // each row's features' span
#pragma omp parallel for schedule(static, 1) if (parts > 1)
  for (int64_t t = 0; t < parts; ++t) {
    int32_t* cnt = counts.get() + t * F;
    std::fill(cnt, cnt + F, 0);
    for (int64_t b = part_row[t]; b < part_row[t + 1]; ++b) {
      int32_t mn = std::numeric_limits<int32_t>::max(), mx = -1;
      for (int64_t j = rp[b]; j < rp[b + 1]; ++j) {
        const int32_t f = idx[j];
        ++cnt[f];
        mn = std::min(mn, f);
        mx = std::max(mx, f);
      }
      if (parts > 1) {
        row_lo[b] = mn;
        row_hi[b] = mx;
      }
    }
  }
  std::vector<int64_t> feat_ptr(F + 1, 0);
  for (int64_t f = 0; f < F; ++f) {
    int64_t n = 0;
    for (int64_t t = 0; t < parts; ++t) n += counts[t * F + f];
    feat_ptr[f + 1] = feat_ptr[f] + n;
  }
  // the fill: split at row boundaries b where every feature of the rows before is below every
  // feature of the rows after (so the ranges write disjoint slots), those nearest nnz·t / parts
  std::vector<int64_t> fill_row{0};
  if (parts > 1) {
    std::vector<int32_t> suffix_lo(B + 1, std::numeric_limits<int32_t>::max());
    for (int64_t b = B - 1; b >= 0; --b) suffix_lo[b] = std::min(suffix_lo[b + 1], row_lo[b]);
    std::vector<int64_t> cuts;  // the valid boundaries, increasing
    for (int64_t b = 0, prefix_hi = -1; b < B; ++b) {
      if (b > 0 && prefix_hi < suffix_lo[b] && rp[b] > 0 && rp[b] < nnz) cuts.push_back(b);
      prefix_hi = std::max<int64_t>(prefix_hi, row_hi[b]);
    }
    for (int64_t t = 1; t < parts && !cuts.empty(); ++t) {
      const int64_t want = nnz * t / parts;
      auto it = std::lower_bound(cuts.begin(), cuts.end(), want, [&](int64_t b, int64_t w) { return rp[b] < w; });
      if (it == cuts.end() || (it != cuts.begin() && want - rp[*(it - 1)] < rp[*it] - want)) --it;
      if (*it > fill_row.back()) fill_row.push_back(*it);
    }
  }
  fill_row.push_back(B);
  std::unique_ptr<Entry[]> sorted(new Entry[nnz]);
  std::unique_ptr<int32_t[]> slot(dot != nullptr ? new int32_t[nnz] : nullptr);     // entry j's sorted slot
  std::unique_ptr<float[]> sorted_dot(dot != nullptr ? new float[nnz] : nullptr);  // the dots by slot
  {
    std::vector<int64_t> fill(feat_ptr.begin(), feat_ptr.end() - 1);  // each feature's next slot
    auto fill_rows = [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        for (int64_t j = rp[b]; j < rp[b + 1]; ++j) {
          const int64_t p = fill[idx[j]]++;
          sorted[p] = {int32_t(b), static_cast<float>(coef[j])};
          if (dot != nullptr) slot[j] = int32_t(p);
        }
      }
    };
    const int64_t fill_parts = int64_t(fill_row.size()) - 1;
#pragma omp parallel for schedule(static, 1) if (fill_parts > 1)
    for (int64_t t = 0; t < fill_parts; ++t) fill_rows(fill_row[t], fill_row[t + 1]);
  }
  const bool stream = F * D * int64_t(sizeof(T)) > kStreamBytes;
  // One task per feature; dynamic scheduling because hot features own many more entries.
#pragma omp parallel if (nnz * D > kParallelWork)
  {
    std::vector<float> acc(D), c;
    std::vector<int64_t> rows;
#pragma omp for schedule(dynamic, 16)
    for (int64_t f = 0; f < F; ++f) {
      const int64_t start = feat_ptr[f], n = feat_ptr[f + 1] - feat_ptr[f];
      rows.resize(n);
      c.resize(n);
      float s = 0.f;
      for (int64_t p = 0; p < n; ++p) {
        rows[p] = row_start[sorted[start + p].row];
        c[p] = sorted[start + p].coef;
        s += c[p];
      }
      std::fill(acc.begin(), acc.end(), 0.f);
      if (W == nullptr) {
        simd::gather_axpy(acc.data(), X, rows.data(), c.data(), n, D, 1);
      } else {
        simd::gather_axpy_dot(acc.data(), X, rows.data(), c.data(), W + f * D, sorted_dot.get() + start, n, D, 1);
      }
      store_row(out + f * D, acc.data(), D, stream);
      coef_sum[f] = s;
    }
    stores_done();
    if (dot != nullptr) {
#pragma omp for schedule(static)
      for (int64_t j = 0; j < nnz; ++j) dot[j] = T(sorted_dot[slot[j]]);
    }
  }
}

// feature_scatter (weight null) and feature_scatter_dot (n_features = weight.size(0), and the dots):
// the shared checks, then one scatter_impl.
std::tuple<at::Tensor, at::Tensor, at::Tensor> run_scatter(const char* op, const at::Tensor& row_ptr,
                                                           const at::Tensor& index, const at::Tensor& coef,
                                                           const at::Tensor& x, int64_t n_features,
                                                           const at::Tensor* weight) {
  const int64_t B = check_codes(row_ptr, index, coef, op, "coef");
  // x may be a view with row strides, its rows contiguous: a slice of columns of a wider matrix (a CLT
  // decode's gradient for the targets of one source), or 3-D [G, B', D] whose rows (g, b') are the
  // B = G * B' rows in that order (the layers of [B', L, D] activations seen layer-major, no copy)
  TORCH_CHECK(x.dim() == 2 || x.dim() == 3, "fastclt::", op, ": x must be 2-D [B, D] or 3-D [G, B', D], got shape ",
              x.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, "fastclt::", op,
              ": x must be float32 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK(x.size(-1) <= 1 || x.stride(-1) == 1, "fastclt::", op, ": x's rows must be contiguous (stride 1), got "
              "strides ", x.strides());
  TORCH_CHECK(x.dim() == 3 || x.size(0) <= 1 || x.stride(0) >= x.size(1), "fastclt::", op,
              ": x's rows must not overlap, got strides ", x.strides());
  check_device(x, row_ptr, op, "x", "row_ptr");
  if (weight != nullptr) check_matrix(*weight, row_ptr, op, "weight");
  check_same_dtype(coef, x, op, "coef", "x");
  if (weight != nullptr) check_same_dtype(*weight, x, op, "weight", "x");
  const int64_t x_rows = x.dim() == 3 ? x.size(0) * x.size(1) : x.size(0);
  TORCH_CHECK(x_rows == B, "fastclt::", op, ": x must have B=", B, " rows, got ", x_rows, " (shape ", x.sizes(), ")");
  // (the sort packs rows and positions in int32)
  TORCH_CHECK(B <= INT32_MAX && index.size(0) <= INT32_MAX, "fastclt::", op, ": at most 2^31 - 1 rows and entries, "
              "got ", B, " rows and ", index.size(0), " entries");
  if (weight != nullptr) {
    TORCH_CHECK(weight->size(1) == x.size(-1), "fastclt::", op, ": weight must have D=", x.size(-1),
                " columns (x's), got ", weight->size(1));
    n_features = weight->size(0);
  }
  TORCH_CHECK(n_features >= 0 && n_features <= INT32_MAX, "fastclt::", op, ": ",
              weight != nullptr ? "weight.size(0)" : "n_features", " must be in [0, 2^31), got ", n_features);
  TORCH_CHECK(row_ptr.device().is_cpu(), "fastclt::", op, ": CPU kernel called on ", row_ptr.device());
  check_codes_content(row_ptr, index, n_features, op, weight != nullptr ? "weight.size(0)" : "n_features");
  const int64_t D = x.size(-1);
  std::vector<int64_t> row_start(B);  // each row's element offset in x
  const int64_t inner = x.dim() == 3 ? x.size(1) : std::max<int64_t>(B, 1);
  const int64_t s_outer = x.dim() == 3 ? x.stride(0) : 0, s_inner = x.dim() == 3 ? x.stride(1) : x.stride(0);
  for (int64_t r = 0, g = 0, b = 0; r < B; ++r) {
    row_start[r] = g * s_outer + b * s_inner;
    if (++b == inner) b = 0, ++g;
  }
  auto out = new_output({n_features, D}, x.options());
  auto coef_sum = new_output({n_features}, x.options().dtype(at::kFloat));
  at::Tensor dot = weight != nullptr ? new_output({index.size(0)}, x.options()) : at::Tensor();
  dispatch_float(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    scatter_impl<T>(row_ptr.data_ptr<int64_t>(), index.data_ptr<int32_t>(), coef.data_ptr<T>(), x.data_ptr<T>(),
                    row_start.data(), B, index.size(0), n_features, D, out.data_ptr<T>(), coef_sum.data_ptr<float>(),
                    weight != nullptr ? weight->data_ptr<T>() : nullptr,
                    weight != nullptr ? dot.data_ptr<T>() : nullptr);
  });
  return {out, coef_sum, dot};
}

std::tuple<at::Tensor, at::Tensor> feature_scatter_cpu(const at::Tensor& row_ptr,
                                                       const at::Tensor& index,
                                                       const at::Tensor& coef, const at::Tensor& x,
                                                       int64_t n_features) {
  auto [out, coef_sum, dot] = run_scatter("feature_scatter", row_ptr, index, coef, x, n_features, nullptr);
  return {out, coef_sum};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> feature_scatter_dot_cpu(const at::Tensor& row_ptr,
                                                                       const at::Tensor& index,
                                                                       const at::Tensor& coef, const at::Tensor& x,
                                                                       const at::Tensor& weight) {
  return run_scatter("feature_scatter_dot", row_ptr, index, coef, x, 0, &weight);
}

// The layout of a per_target CLT's L sources as one CSR over the L·B rows (t, b): row (t, b) holds row
// b's entries of every source s <= t, source after source. From row_ptrs [L, B + 1] int64 (each
// source's CSR from 0), checked here: off[s], where source s's entries start in the sources'
// concatenation, and start[t * B + b], where row (t, b) starts (start[L * B] = total).
struct ByTarget {
  int64_t L, B;
  const int64_t* rps;
  std::vector<int64_t> off, start;
};

ByTarget by_target_layout(const at::Tensor& row_ptrs, const char* op) {
  TORCH_CHECK(row_ptrs.dim() == 2 && row_ptrs.size(0) >= 1 && row_ptrs.size(1) >= 1 &&
              row_ptrs.scalar_type() == at::kLong && row_ptrs.is_contiguous(), "fastclt::", op, ": row_ptrs "
              "must be a contiguous [L >= 1, B + 1] int64 tensor, got ", row_ptrs.scalar_type(), " ", row_ptrs.sizes());
  TORCH_CHECK(row_ptrs.device().is_cpu(), "fastclt::", op, ": CPU tensors expected, got ", row_ptrs.device());
  ByTarget t{row_ptrs.size(0), row_ptrs.size(1) - 1, row_ptrs.data_ptr<int64_t>(), {}, {}};
  const int64_t L = t.L, B = t.B;
  t.off.assign(L + 1, 0);
  for (int64_t s = 0; s < L; ++s) {
    const int64_t* rp = t.rps + s * (B + 1);
    TORCH_CHECK(rp[0] == 0, "fastclt::", op, ": row_ptrs[", s, "] must start at 0, got ", rp[0]);
    for (int64_t b = 0; b < B; ++b)
      TORCH_CHECK(rp[b] <= rp[b + 1], "fastclt::", op, ": row_ptrs[", s, "] must be non-decreasing (row ", b, ")");
    t.off[s + 1] = t.off[s] + rp[B];
  }
  t.start.assign(L * B + 1, 0);
  for (int64_t tt = 0; tt < L; ++tt)
    for (int64_t b = 0; b < B; ++b) {
      int64_t n = 0;
      for (int64_t s = 0; s <= tt; ++s) n += t.rps[s * (B + 1) + b + 1] - t.rps[s * (B + 1) + b];
      t.start[tt * B + b + 1] = t.start[tt * B + b] + n;
    }
  return t;
}

// A per_target CLT's L sources as one CSR over the L·B rows (t, b) (fastclt/ops/ext/clt_decode.py;
// layout: by_target_layout), each feature shifted to t·F + f, each value copied: index [E] int32 and
// value [E] (fp32 or bf16) the sources' entries one after another. One pass per output row (rows in
// parallel): O(L·B + total).
std::tuple<at::Tensor, at::Tensor, at::Tensor> clt_by_target_cpu(const at::Tensor& row_ptrs, const at::Tensor& index,
                                                                 const at::Tensor& value, int64_t n_features) {
  const char* op = "clt_by_target";
  TORCH_CHECK(index.dim() == 1 && index.scalar_type() == at::kInt && index.is_contiguous() && index.device().is_cpu(),
              "fastclt::clt_by_target: index must be a contiguous 1-D int32 CPU tensor, got ", index.scalar_type(), " ",
              index.sizes(), " on ", index.device());
  TORCH_CHECK(value.dim() == 1 && value.size(0) == index.size(0) && value.device().is_cpu(), "fastclt::clt_by_target: "
              "value must be a 1-D CPU tensor of index's length ", index.size(0), ", got ", value.sizes(), " on ",
              value.device());
  check_float_tensor(value, op, "value");
  const ByTarget lay = by_target_layout(row_ptrs, op);
  const int64_t L = lay.L, B = lay.B, E = index.size(0);
  TORCH_CHECK(n_features >= 0 && L * n_features <= INT32_MAX, "fastclt::clt_by_target: n_features must be in "
              "[0, 2^31 / L) (L=", L, "), got ", n_features);
  TORCH_CHECK(lay.off[L] == E, "fastclt::clt_by_target: index must hold the sources' ", lay.off[L], " entries (the "
              "sum of row_ptrs[:, -1]), got ", E);
  const int32_t* idx = index.data_ptr<int32_t>();
  TORCH_CHECK(!any_outside(idx, E, n_features), "fastclt::clt_by_target: index must lie in [0, n_features=",
              n_features, ")");
  auto row_ptr = new_output({L * B + 1}, row_ptrs.options());
  std::copy(lay.start.begin(), lay.start.end(), row_ptr.data_ptr<int64_t>());
  const int64_t total = lay.start[L * B];
  auto out_index = new_output({total}, index.options());
  auto out_value = new_output({total}, value.options());
  int32_t* oi = out_index.data_ptr<int32_t>();
  dispatch_float(value.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const T* v = value.data_ptr<T>();
    T* ov = out_value.data_ptr<T>();
#pragma omp parallel for schedule(static) if (total > kParallelWork)
    for (int64_t r = 0; r < L * B; ++r) {
      const int64_t t = r / B, b = r % B;
      const int32_t shift = static_cast<int32_t>(t * n_features);
      int64_t q = lay.start[r];
      for (int64_t s = 0; s <= t; ++s) {
        const int64_t* rp = lay.rps + s * (B + 1);
        for (int64_t j = lay.off[s] + rp[b]; j < lay.off[s] + rp[b + 1]; ++j, ++q) {
          oi[q] = idx[j] + shift;
          ov[q] = v[j];
        }
      }
    }
  });
  return {row_ptr, out_index, out_value};
}

// The backward of clt_by_target's values: grad [total] holds the gradient of every copy (row (t, b),
// source s <= t) in that CSR's order; dvalue [n_entries] (the sources' entries, one after another)
// sums each entry's L - s copies, target after target, in fp32, rounded once. One task per token; no
// atomics, deterministic. (Autograd's backward of a gather through positions is a serial index_add_
// over every copy: 163840 at the cpu-clt shape, 0.43 ms on the 2-core Xeon; this, 0.09 ms.)
at::Tensor clt_by_target_backward_cpu(const at::Tensor& row_ptrs, const at::Tensor& grad, int64_t n_entries) {
  const char* op = "clt_by_target_backward";
  TORCH_CHECK(grad.dim() == 1 && grad.device().is_cpu(), "fastclt::", op, ": grad must be a 1-D CPU tensor, got ",
              "shape ", grad.sizes(), " on ", grad.device());
  check_float_tensor(grad, op, "grad");
  const ByTarget lay = by_target_layout(row_ptrs, op);
  const int64_t L = lay.L, B = lay.B, total = lay.start[L * B];
  TORCH_CHECK(lay.off[L] == n_entries, "fastclt::", op, ": n_entries must be the sources' ", lay.off[L],
              " entries (the sum of row_ptrs[:, -1]), got ", n_entries);
  TORCH_CHECK(grad.size(0) == total, "fastclt::", op, ": grad must hold the ", total, " copies of clt_by_target's "
              "CSR, got ", grad.size(0));
  auto dvalue = new_output({n_entries}, grad.options());
  dispatch_float(grad.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const T* g = grad.data_ptr<T>();
    T* dv = dvalue.data_ptr<T>();
#pragma omp parallel for schedule(static) if (total > kParallelWork)
    for (int64_t b = 0; b < B; ++b) {
      int64_t before = 0;  // row b's entries in the sources before s
      for (int64_t s = 0; s < L; ++s) {
        const int64_t* rp = lay.rps + s * (B + 1);
        const int64_t n = rp[b + 1] - rp[b];
        for (int64_t i = 0; i < n; ++i) {
          float acc = 0.f;
          for (int64_t t = s; t < L; ++t) acc += static_cast<float>(g[lay.start[t * B + b] + before + i]);
          dv[lay.off[s] + rp[b] + i] = T(acc);
        }
        before += n;
      }
    }
  });
  return dvalue;
}

// The training statistics of L layers' codes: fmin [L, F] fp32, each feature's smallest active
// (> 0) value (+inf where it has none), and active [L] int64, the active entries per layer. One
// pass over each layer's entries (layers in parallel when there are many entries); a NaN value is
// not active (every comparison with it is false), as in the reference.
std::tuple<at::Tensor, at::Tensor> code_stats_cpu(at::TensorList index, at::TensorList value, int64_t n_features) {
  const int64_t L = int64_t(index.size());
  TORCH_CHECK(int64_t(value.size()) == L, "fastclt::code_stats: index and value must hold one tensor per layer "
              "each, got ", L, " and ", value.size());
  TORCH_CHECK(n_features >= 0, "fastclt::code_stats: n_features must be >= 0, got ", n_features);
  int64_t total = 0;
  for (int64_t l = 0; l < L; ++l) {
    const at::Tensor& i = index[l];
    const at::Tensor& v = value[l];
    TORCH_CHECK(i.dim() == 1 && i.scalar_type() == at::kInt && i.is_contiguous() && i.device().is_cpu(),
                "fastclt::code_stats: index[", l, "] must be a contiguous 1-D int32 CPU tensor, got ", i.scalar_type(),
                " ", i.sizes(), " on ", i.device());
    TORCH_CHECK(v.dim() == 1 && v.size(0) == i.size(0) && v.device().is_cpu(), "fastclt::code_stats: value[", l,
                "] must be a 1-D CPU tensor of index[", l, "]'s length ", i.size(0), ", got ", v.sizes(), " on ",
                v.device());
    check_float_tensor(v, "code_stats", "value");
    TORCH_CHECK(!any_outside(i.data_ptr<int32_t>(), i.size(0), n_features), "fastclt::code_stats: index[", l,
                "] must lie in [0, n_features=", n_features, ")");
    total += i.size(0);
  }
  auto opts = at::TensorOptions().device(at::kCPU);
  auto fmin = new_output({L, n_features}, opts.dtype(at::kFloat));
  auto active = new_output({L}, opts.dtype(at::kLong));
  float* fm = fmin.data_ptr<float>();
  int64_t* act = active.data_ptr<int64_t>();
  at::parallel_for(0, L, total > kParallelWork ? 1 : L, [&](int64_t l0, int64_t l1) {
    for (int64_t l = l0; l < l1; ++l) {
      float* m = fm + l * n_features;
      std::fill(m, m + n_features, std::numeric_limits<float>::infinity());
      const int32_t* idx = index[l].data_ptr<int32_t>();
      const int64_t n = index[l].size(0);
      int64_t count = 0;
      dispatch_float(value[l].scalar_type(), [&](auto tag) {
        using T = decltype(tag);
        const T* v = value[l].data_ptr<T>();
        for (int64_t j = 0; j < n; ++j) {
          const float x = static_cast<float>(v[j]);
          if (x > 0.f) {
            ++count;
            m[idx[j]] = std::min(m[idx[j]], x);
          }
        }
      });
      act[l] = count;
    }
  });
  return {fmin, active};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, int64_t, int64_t> feature_scatter_replay(const at::Tensor& row_ptr,
                                                                            const at::Tensor& index,
                                                                            const at::Tensor& coef, const at::Tensor& x,
                                                                            int64_t n_features, int64_t chunk) {
  const char* op = "feature_scatter_replay";
  const int64_t B = check_codes(row_ptr, index, coef, op, "coef");
  check_matrix(x, row_ptr, op, "x");
  check_same_dtype(coef, x, op, "coef", "x");
  TORCH_CHECK(x.size(0) == B, "fastclt::", op, ": x must have B=", B, " rows, got ", x.size(0));
  TORCH_CHECK(row_ptr.device().is_cpu(), "fastclt::", op, ": CPU tensors expected, got ", row_ptr.device());
  TORCH_CHECK(n_features >= 0 && n_features <= INT32_MAX, "fastclt::", op, ": n_features must be in [0, 2^31)");
  TORCH_CHECK(chunk >= 1, "fastclt::", op, ": chunk must be >= 1, got ", chunk);
  const int64_t nnz = index.size(0), D = x.size(1), F = n_features;
  const auto p = plan::make_scatter_plan(index, F, chunk);
  const int64_t *fp = p.feat_ptr.data_ptr<int64_t>(), *cp = p.chunk_ptr.data_ptr<int64_t>(),
                *pp = p.partial_ptr.data_ptr<int64_t>(), *order = p.order.data_ptr<int64_t>();
  const int64_t n_work = cp[F], n_partials = pp[F];
  TORCH_CHECK(n_work <= plan::scatter_work_bound(F, nnz, chunk) && n_partials <= plan::scatter_partial_bound(nnz, chunk),
              "fastclt::", op, ": the plan exceeds its host-side bounds");
  std::vector<int64_t> row_of(nnz);
  const int64_t* rp = row_ptr.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b)
    for (int64_t j = rp[b]; j < rp[b + 1]; ++j) row_of[j] = b;
  auto out = new_output({F, D}, x.options());
  auto coef_sum = new_output({F}, x.options().dtype(at::kFloat));
  std::vector<float> partials(static_cast<size_t>(n_partials * D)), partial_coef(static_cast<size_t>(n_partials)),
      acc(static_cast<size_t>(D));
  dispatch_float(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const T *c = coef.data_ptr<T>(), *X = x.data_ptr<T>();
    T* o = out.data_ptr<T>();
    float* cs = coef_sum.data_ptr<float>();
    // the work items as the CUDA kernels see them: every w up to the bound, in order
    for (int64_t w = 0; w < plan::scatter_work_bound(F, nnz, chunk); ++w) {
      plan::ScatterWork work;
      if (!plan::scatter_work(fp, cp, pp, F, chunk, w, &work)) continue;
      std::fill(acc.begin(), acc.end(), 0.f);
      float s = 0.f;
      for (int64_t q = work.begin; q < work.end; ++q) {
        const int64_t j = order[q];
        const float cj = static_cast<float>(c[j]);
        s += cj;
        for (int64_t d = 0; d < D; ++d) acc[d] += cj * static_cast<float>(X[row_of[j] * D + d]);
      }
      if (work.slot < 0) {
        for (int64_t d = 0; d < D; ++d) o[work.feature * D + d] = T(acc[d]);
        cs[work.feature] = s;
      } else {
        std::copy(acc.begin(), acc.end(), partials.begin() + work.slot * D);
        partial_coef[work.slot] = s;
      }
    }
    for (int64_t f = 0; f < F; ++f) {  // the second kernel: hot rows from their partials, in chunk order
      if (pp[f] == pp[f + 1]) continue;
      std::fill(acc.begin(), acc.end(), 0.f);
      float s = 0.f;
      for (int64_t q = pp[f]; q < pp[f + 1]; ++q) {
        s += partial_coef[q];
        for (int64_t d = 0; d < D; ++d) acc[d] += partials[q * D + d];
      }
      for (int64_t d = 0; d < D; ++d) o[f * D + d] = T(acc[d]);
      cs[f] = s;
    }
  });
  return {out, coef_sum, n_work, n_partials};
}

TORCH_LIBRARY_IMPL(fastclt, CPU, m) {
  m.impl("sparse_decode", &sparse_decode_cpu);
  m.impl("clt_decode_untied", &clt_decode_untied_cpu);
  m.impl("sparse_dot", &sparse_dot_cpu);
  m.impl("feature_scatter", &feature_scatter_cpu);
  m.impl("feature_scatter_dot", &feature_scatter_dot_cpu);
  m.impl("clt_by_target", &clt_by_target_cpu);
  m.impl("clt_by_target_backward", &clt_by_target_backward_cpu);
  m.impl("code_stats", &code_stats_cpu);
}

}  // namespace fastclt
