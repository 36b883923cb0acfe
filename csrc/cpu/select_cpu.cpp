// CPU kernels of the selection ops: exact TopK per row, and the two steps of exact BatchTopK
// (key histogram, compaction given the threshold key). Algorithms: csrc/README.md.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <functional>
#include <vector>

#include "checks.h"

namespace fastclt {
namespace {

// Entries per block in the scans that skip blocks holding nothing to keep.
constexpr int64_t kBlock = 64;
// Entries per block in the histogram's digit buffer.
constexpr int64_t kDigitBlock = 256;

template <typename T>
inline float to_f32(T x) {
  return static_cast<float>(x);
}

template <typename T>
inline T relu(T x) {
  return static_cast<float>(x) > 0.f ? x : T(0.f);
}

// Selection key of entry i: value bits in the high word, bitwise-inverted index in the low word, so
// that the largest key is the largest value and, among equal values, the lowest index.
inline uint64_t rank_key(float x, int64_t i) {
  return (uint64_t(float_key(x)) << 32) | uint64_t(0xFFFFFFFFu - uint32_t(i));
}

// Top-k of one row into `chosen` (k feature indices, ascending). Two exact strategies with the same
// result: a size-k min-heap when k is small (an entry below the heap's smallest value is rejected by
// one float compare, so most entries cost one compare), else nth_element over all F keys.
template <typename T>
void topk_row(const T* x, int64_t F, int64_t k, std::vector<uint64_t>& buf,
              std::vector<int32_t>& chosen, bool& saw_nan) {
  uint32_t nan = 0;  // not bool: GCC vectorises an |= over uint32 but not over bool
  for (int64_t i = 0; i < F; ++i) nan |= uint32_t(to_f32(x[i]) != to_f32(x[i]));
  saw_nan |= nan != 0;
  chosen.resize(k);
  if (k * 8 <= F) {
    buf.resize(k);
    for (int64_t i = 0; i < k; ++i) buf[i] = rank_key(to_f32(x[i]), i);
    std::make_heap(buf.begin(), buf.end(), std::greater<uint64_t>());
    float smallest = key_float(uint32_t(buf.front() >> 32));
    for (int64_t block = k; block < F; block += kBlock) {
      const int64_t end = std::min(F, block + kBlock);
      uint32_t any = 0;  // vectorised: skip blocks with nothing that can enter the heap
      for (int64_t i = block; i < end; ++i) any |= uint32_t(to_f32(x[i]) >= smallest);
      if (!any) continue;
      for (int64_t i = block; i < end; ++i) {
        const float v = to_f32(x[i]);
        if (v < smallest) continue;
        const uint64_t key = rank_key(v, i);
        if (key > buf.front()) {
          std::pop_heap(buf.begin(), buf.end(), std::greater<uint64_t>());
          buf.back() = key;
          std::push_heap(buf.begin(), buf.end(), std::greater<uint64_t>());
          smallest = key_float(uint32_t(buf.front() >> 32));
        }
      }
    }
  } else {
    buf.resize(F);
    for (int64_t i = 0; i < F; ++i) buf[i] = rank_key(to_f32(x[i]), i);
    if (k < F) std::nth_element(buf.begin(), buf.begin() + (k - 1), buf.end(), std::greater<uint64_t>());
  }
  for (int64_t i = 0; i < k; ++i) chosen[i] = int32_t(0xFFFFFFFFu - uint32_t(buf[i]));
  std::sort(chosen.begin(), chosen.end());
}

template <typename T>
void topk_impl(const T* h, int64_t B, int64_t F, int64_t k, int32_t* out_index, T* out_value,
               bool& saw_nan) {
  bool nan_any = false;
#pragma omp parallel reduction(|| : nan_any)
  {
    std::vector<uint64_t> buf;
    std::vector<int32_t> chosen;
    bool nan_here = false;
#pragma omp for schedule(static)
    for (int64_t b = 0; b < B; ++b) {
      const T* x = h + b * F;
      topk_row(x, F, k, buf, chosen, nan_here);
      for (int64_t i = 0; i < k; ++i) {
        out_index[b * k + i] = chosen[i];
        out_value[b * k + i] = relu(x[chosen[i]]);
      }
    }
    nan_any = nan_any || nan_here;
  }
  saw_nan = nan_any;
}

std::tuple<at::Tensor, at::Tensor> topk_cpu(const at::Tensor& h, int64_t k) {
  check_topk_args(h, k, "topk");
  TORCH_CHECK(h.device().is_cpu(), "fastclt::topk: h must be a CPU tensor for the CPU kernel");
  const int64_t B = h.size(0), F = h.size(1);
  auto index = new_output({B, k}, h.options().dtype(at::kInt));
  auto value = new_output({B, k}, h.options());
  bool saw_nan = false;
  dispatch_float(h.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    topk_impl<scalar_t>(h.data_ptr<scalar_t>(), B, F, k, index.data_ptr<int32_t>(),
                        value.data_ptr<scalar_t>(), saw_nan);
  });
  TORCH_CHECK(!saw_nan, "fastclt::topk: h contains NaN");
  return {index, value};
}

// counts[d] = #{i : key_i matches `prefix` on its top prefix_bits, and its next digit_bits are d};
// counts[2^digit_bits] = number of NaNs in h (NaNs are in no digit bin).
template <typename T>
void histogram_impl(const T* h, int64_t n, uint32_t prefix, int prefix_bits, int digit_bits,
                    int64_t* counts) {
  const int64_t nbins = int64_t(1) << digit_bits;
  const int shift = 32 - prefix_bits - digit_bits;
  const uint32_t mask = uint32_t(nbins - 1);
  const int prefix_shift = 32 - prefix_bits;  // used only when prefix_bits > 0 (a 32-bit shift is UB)
  std::fill(counts, counts + nbins + 1, int64_t(0));
  int64_t nan_total = 0;
#pragma omp parallel
  {
    std::vector<int64_t> local(nbins + 1, 0);
    // NaNs go to the last bin. (Every thread takes the same side of each `if`, as worksharing loops
    // require.)
    if (prefix_bits == 0) {
      // Digits of a block are computed first (a vectorised loop), then counted: faster than one
      // scalar loop. A NaN lands in some digit bin here; the rare input with NaNs is recounted
      // exactly below.
      uint16_t digits[kDigitBlock];
      int64_t nan_count = 0;
#pragma omp for schedule(static) nowait
      for (int64_t block = 0; block < n; block += kDigitBlock) {
        const int64_t m = std::min(n - block, kDigitBlock);
        for (int64_t i = 0; i < m; ++i) {
          const float v = to_f32(h[block + i]);
          digits[i] = uint16_t((float_key(v) >> shift) & mask);
          nan_count += v != v;
        }
        for (int64_t i = 0; i < m; ++i) ++local[digits[i]];
      }
#pragma omp atomic
      nan_total += nan_count;
#pragma omp barrier
      if (nan_total > 0) {  // the same on every thread (shared, read after the barrier)
        std::fill(local.begin(), local.end(), int64_t(0));
#pragma omp for schedule(static) nowait
        for (int64_t i = 0; i < n; ++i) {
          const float v = to_f32(h[i]);
          ++local[v != v ? nbins : int64_t((float_key(v) >> shift) & mask)];
        }
      }
    } else {
      // Few keys match a prefix: a vectorised test of each block of kBlock entries skips the blocks
      // with no match (or NaN) without touching the bins.
#pragma omp for schedule(static) nowait
      for (int64_t block = 0; block < n; block += kBlock) {
        const int64_t end = std::min(n, block + kBlock);
        uint32_t any = 0;  // not bool: GCC vectorises an |= over uint32 but not over bool
        for (int64_t i = block; i < end; ++i) {
          const float v = to_f32(h[i]);
          any |= uint32_t((float_key(v) >> prefix_shift) == prefix) | uint32_t(v != v);
        }
        if (!any) continue;
        for (int64_t i = block; i < end; ++i) {
          const float v = to_f32(h[i]);
          const uint32_t key = float_key(v);
          if ((key >> prefix_shift) == prefix || v != v) ++local[v != v ? nbins : int64_t((key >> shift) & mask)];
        }
      }
    }
#pragma omp critical
    for (int64_t d = 0; d <= nbins; ++d) counts[d] += local[d];
  }
}

at::Tensor batch_topk_histogram_cpu(const at::Tensor& h, int64_t prefix, int64_t prefix_bits,
                                    int64_t digit_bits) {
  check_float_tensor(h, "batch_topk_histogram", "h");
  check_radix_args(prefix, prefix_bits, digit_bits, 16, "batch_topk_histogram");
  auto counts = new_output({(int64_t(1) << digit_bits) + 1}, h.options().dtype(at::kLong));
  dispatch_float(h.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    histogram_impl<scalar_t>(h.data_ptr<scalar_t>(), h.numel(), uint32_t(prefix), int(prefix_bits),
                             int(digit_bits), counts.data_ptr<int64_t>());
  });
  return counts;
}

// Keeps, in flat (row-major) order, every entry whose key is > threshold and the threshold-equal
// entries whose rank among threshold-equal entries (flat order) lies in [equal_skip,
// equal_skip + equal_take). Writes CSR over the R = numel / F rows of h.
template <typename T>
void compact_impl(const T* h, int64_t R, int64_t F, uint32_t thr, int64_t equal_skip,
                  int64_t equal_take, int64_t nnz, int64_t* row_ptr, int32_t* out_index,
                  T* out_value) {
  std::vector<int64_t> n_gt(R), n_eq(R), eq_before(R);
  at::parallel_for(0, R, 1, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const T* x = h + r * F;
      int64_t gt = 0, eq = 0;
      for (int64_t i = 0; i < F; ++i) {
        uint32_t key = float_key(to_f32(x[i]));
        gt += key > thr;
        eq += key == thr;
      }
      n_gt[r] = gt;
      n_eq[r] = eq;
    }
  });
  const int64_t lo = equal_skip, hi = equal_skip + equal_take;
  int64_t eq_seen = 0;
  row_ptr[0] = 0;
  for (int64_t r = 0; r < R; ++r) {
    eq_before[r] = eq_seen;
    int64_t taken = std::min(eq_seen + n_eq[r], hi) - std::max(eq_seen, lo);
    row_ptr[r + 1] = row_ptr[r] + n_gt[r] + std::max<int64_t>(taken, 0);
    eq_seen += n_eq[r];
  }
  TORCH_CHECK(row_ptr[R] == nnz, "fastclt::batch_topk_compact: threshold_key/equal_skip/equal_take "
              "select ", row_ptr[R], " entries but nnz=", nnz, " was requested");
  at::parallel_for(0, R, 1, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const T* x = h + r * F;
      int64_t out = row_ptr[r], eq_rank = eq_before[r];
      for (int64_t block = 0; block < F; block += kBlock) {
        // Most blocks hold no key >= threshold: a vectorised test skips them.
        const int64_t end = std::min(F, block + kBlock);
        uint32_t any = 0;  // not bool: GCC vectorises an |= over uint32 but not over bool
        for (int64_t i = block; i < end; ++i) any |= uint32_t(float_key(to_f32(x[i])) >= thr);
        if (!any) continue;
        for (int64_t i = block; i < end; ++i) {
          const uint32_t key = float_key(to_f32(x[i]));
          bool keep = key > thr;
          if (key == thr) {
            keep = eq_rank >= lo && eq_rank < hi;
            ++eq_rank;
          }
          if (keep) {
            out_index[out] = int32_t(i);
            out_value[out] = relu(x[i]);
            ++out;
          }
        }
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_topk_compact_cpu(const at::Tensor& h,
                                                                      int64_t threshold_key,
                                                                      int64_t equal_skip,
                                                                      int64_t equal_take,
                                                                      int64_t nnz) {
  check_compact_args(h, threshold_key, equal_skip, equal_take, nnz, "batch_topk_compact");
  const int64_t F = h.size(-1);
  TORCH_CHECK(F <= INT32_MAX, "fastclt::batch_topk_compact: F must fit in int32, got ", F);
  const int64_t R = F == 0 ? 0 : h.numel() / F;
  auto row_ptr = new_output({R + 1}, h.options().dtype(at::kLong));
  auto index = new_output({nnz}, h.options().dtype(at::kInt));
  auto value = new_output({nnz}, h.options());
  if (R == 0) {
    row_ptr.zero_();
    TORCH_CHECK(nnz == 0, "fastclt::batch_topk_compact: h is empty but nnz=", nnz);
    return {row_ptr, index, value};
  }
  dispatch_float(h.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    compact_impl<scalar_t>(h.data_ptr<scalar_t>(), R, F, uint32_t(threshold_key), equal_skip,
                           equal_take, nnz, row_ptr.data_ptr<int64_t>(), index.data_ptr<int32_t>(),
                           value.data_ptr<scalar_t>());
  });
  return {row_ptr, index, value};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastclt, CPU, m) {
  m.impl("topk", &topk_cpu);
  m.impl("batch_topk_histogram", &batch_topk_histogram_cpu);
  m.impl("batch_topk_compact", &batch_topk_compact_cpu);
}

}  // namespace fastclt
