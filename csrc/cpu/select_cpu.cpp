// CPU kernels of the selection ops: exact TopK per row, and the two steps of exact BatchTopK
// (key histogram, compaction given the threshold key). Algorithms: csrc/README.md.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <optional>
#include <functional>
#include <tuple>
#include <type_traits>
#include <vector>

#include "checks.h"
#include "simd.h"

namespace fastclt {
namespace {

// Below this many entries of h a pass runs on one thread: waking the others costs tens of
// microseconds (far more when another process holds a core), the pass less (the demo's BatchTopK
// of 512 x 128 took 1.16 ms on two threads, 0.39 ms on one, with the second core busy).
constexpr int64_t kParallelEntries = int64_t(1) << 18;

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

// Per-thread buffers of topk_row.
struct RowScratch {
  std::vector<uint32_t> keymax, order;
  std::vector<simd::Candidate> cand;
  std::vector<uint64_t> keys;
};

// Selection key of entry i: value bits in the high word, bitwise-inverted index in the low word, so
// that the largest key is the largest value and, among equal values, the lowest index.
inline uint64_t rank_key(float x, int64_t i) {
  return (uint64_t(float_key(x)) << 32) | uint64_t(0xFFFFFFFFu - uint32_t(i));
}

// Entry i of a row: x[i] in fp32, plus bias[i] when there is a bias (fp32 rows only: topk_bias).
template <typename T>
inline float entry(const T* x, const float* bias, int64_t i) {
  return bias != nullptr ? to_f32(x[i]) + bias[i] : to_f32(x[i]);
}

// The block scans over n entries of x, plus bias[i] when there is a bias (fp32 x only), dispatched
// once for topk_row and batch_topk_impl. Candidates' indices are base + i.
template <typename T>
uint32_t row_block_key_max(const T* x, const float* bias, int64_t n, int64_t block, uint32_t* keymax) {
  if constexpr (std::is_same_v<T, float>) {
    if (bias != nullptr) return simd::block_key_max(x, bias, n, block, keymax);
  }
  return simd::block_key_max(x, n, block, keymax);
}

template <typename T>
void row_collect_at_least(const T* x, const float* bias, int64_t n, int64_t block, const uint32_t* keymax,
                          uint32_t thr, int64_t base, std::vector<simd::Candidate>& out) {
  if constexpr (std::is_same_v<T, float>) {
    if (bias != nullptr) return simd::collect_at_least(x, bias, n, block, keymax, thr, base, out);
  }
  simd::collect_at_least(x, n, block, keymax, thr, base, out);
}

// Top-k of one row into `chosen` (k feature indices, ascending). When k is small next to F: the
// key maxima of m >= k disjoint blocks (one vectorised pass) belong to m distinct entries, so their
// k-th largest, t, is a lower bound on the row's k-th largest key; a second pass over only the
// blocks whose maximum is >= t (about k of the m) collects the entries with key >= t (about 1.3 k
// on random data, never fewer than k) and the exact top k is chosen among those. Otherwise
// nth_element over all F keys. Same result either way.
template <typename T>
void topk_row(const T* x, const float* bias, int64_t F, int64_t k, RowScratch& s, std::vector<int32_t>& chosen,
              bool& saw_nan) {
  chosen.resize(k);
  if (k * 16 <= F) {
    const int64_t m = std::min(4 * k, F / 16), block = F / m, n_blocks = (F + block - 1) / block;
    s.keymax.resize(n_blocks);
    if (row_block_key_max(x, bias, F, block, s.keymax.data())) {
      saw_nan = true;  // the op fails; any valid indices will do
      for (int64_t i = 0; i < k; ++i) chosen[i] = int32_t(i);
      return;
    }
    s.order.assign(s.keymax.begin(), s.keymax.end());
    std::nth_element(s.order.begin(), s.order.begin() + (k - 1), s.order.end(), std::greater<uint32_t>());
    s.cand.clear();
    row_collect_at_least(x, bias, F, block, s.keymax.data(), s.order[k - 1], 0, s.cand);
    std::nth_element(s.cand.begin(), s.cand.begin() + (k - 1), s.cand.end(), simd::RanksBefore{});
    for (int64_t i = 0; i < k; ++i) chosen[i] = int32_t(s.cand[i].index);
  } else {
    uint32_t nan = 0;  // not bool: GCC vectorises an |= over uint32 but not over bool
    s.keys.resize(F);
    for (int64_t i = 0; i < F; ++i) {
      const float v = entry(x, bias, i);
      nan |= uint32_t(v != v);
      s.keys[i] = rank_key(v, i);
    }
    saw_nan |= nan != 0;
    if (k < F) std::nth_element(s.keys.begin(), s.keys.begin() + (k - 1), s.keys.end(), std::greater<uint64_t>());
    for (int64_t i = 0; i < k; ++i) chosen[i] = int32_t(0xFFFFFFFFu - uint32_t(s.keys[i]));
  }
  std::sort(chosen.begin(), chosen.end());
}

template <typename T>
void topk_impl(const T* h, const float* bias, int64_t B, int64_t F, int64_t k, int32_t* out_index, T* out_value,
               bool& saw_nan) {
  bool nan_any = false;
#pragma omp parallel reduction(|| : nan_any) if (B * F > kParallelEntries)
  {
    RowScratch scratch;
    std::vector<int32_t> chosen;
    bool nan_here = false;
#pragma omp for schedule(static)
    for (int64_t b = 0; b < B; ++b) {
      const T* x = h + b * F;
      topk_row(x, bias, F, k, scratch, chosen, nan_here);
      for (int64_t i = 0; i < k; ++i) {
        const float v = entry(x, bias, chosen[i]);
        out_index[b * k + i] = chosen[i];
        out_value[b * k + i] = T(v > 0.f ? v : 0.f);
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
    topk_impl<scalar_t>(h.data_ptr<scalar_t>(), nullptr, B, F, k, index.data_ptr<int32_t>(),
                        value.data_ptr<scalar_t>(), saw_nan);
  });
  TORCH_CHECK(!saw_nan, "fastclt::topk: h contains NaN");
  return {index, value};
}

// The selections over h + bias (topk_bias, batch_topk_bias): h fp32 [B, F] on the CPU, bias [F] of
// h's dtype and device.
void check_row_bias(const at::Tensor& h, const at::Tensor& bias, const char* op) {
  TORCH_CHECK(h.scalar_type() == at::kFloat, "fastclt::", op, ": h must be float32, got ", h.scalar_type());
  TORCH_CHECK(h.device().is_cpu(), "fastclt::", op, ": CPU kernel called on ", h.device());
  TORCH_CHECK(bias.dim() == 1 && bias.size(0) == h.size(1), "fastclt::", op, ": bias must have shape [F=",
              h.size(1), "], got ", bias.sizes());
  check_float_tensor(bias, op, "bias");
  check_same_dtype(bias, h, op, "bias", "h");
  check_device(bias, h, op, "bias", "h");
}

// topk of h + bias (fp32; bias [F] broadcast over rows) without forming it: the CPU encoder runs its
// GEMM with no bias (the bias broadcast and beta = 1 cost ~12 ms at the cpu-small shape) and folds
// the bias in here. value = relu(h + bias) at the kept entries (the sum rounded once, in fp32).
std::tuple<at::Tensor, at::Tensor> topk_bias_cpu(const at::Tensor& h, const at::Tensor& bias, int64_t k) {
  check_topk_args(h, k, "topk_bias");
  check_row_bias(h, bias, "topk_bias");
  const int64_t B = h.size(0), F = h.size(1);
  auto index = new_output({B, k}, h.options().dtype(at::kInt));
  auto value = new_output({B, k}, h.options());
  bool saw_nan = false;
  topk_impl<float>(h.data_ptr<float>(), bias.data_ptr<float>(), B, F, k, index.data_ptr<int32_t>(),
                   value.data_ptr<float>(), saw_nan);
  TORCH_CHECK(!saw_nan, "fastclt::topk_bias: h + bias contains NaN");
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
#pragma omp parallel if (n > kParallelEntries)
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
  at::parallel_for(0, R, R * F > kParallelEntries ? 1 : R, [&](int64_t r0, int64_t r1) {
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
  at::parallel_for(0, R, R * F > kParallelEntries ? 1 : R, [&](int64_t r0, int64_t r1) {
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

// The k-th largest of keys (1 <= k <= keys.size()), keys left as they are: the bin that holds it in
// a histogram of 4096 equal bins over [min key, max key] (cleared and scanned in cache; bins as fine
// as the keys' spread allows, so that a selection's candidates, all within a narrow band above
// their bound, do not crowd into one bin as they would under the top 12 bits), then nth_element
// among the keys of that bin.
uint32_t kth_largest_key(const std::vector<uint32_t>& keys, int64_t k) {
  constexpr int kBits = 12;
  uint32_t lo = UINT32_MAX, hi = 0;
  for (uint32_t key : keys) {
    lo = std::min(lo, key);
    hi = std::max(hi, key);
  }
  int shift = 0;
  while (((hi - lo) >> shift) >> kBits) ++shift;
  std::vector<int64_t> hist(int64_t(1) << kBits, 0);
  for (uint32_t key : keys) ++hist[(key - lo) >> shift];
  int64_t above = 0, bin = int64_t(hist.size()) - 1;
  for (; bin > 0 && above + hist[bin] < k; --bin) above += hist[bin];
  std::vector<uint32_t> in_bin;
  in_bin.reserve(hist[bin]);
  for (uint32_t key : keys)
    if (int64_t((key - lo) >> shift) == bin) in_bin.push_back(key);
  const int64_t r = k - above;  // rank of the k-th largest within its bin, 1-based
  std::nth_element(in_bin.begin(), in_bin.begin() + (r - 1), in_bin.end(), std::greater<uint32_t>());
  return in_bin[r - 1];
}

// A lower bound for BatchTopK's one-pass path, from a sample of h's rows: rows = ceil(kSampleAbove
// R / k_total) evenly spaced rows of the R (each + bias where there is one) hold on average
// s = k_total rows / R >= kSampleAbove of the k_total largest keys; the bound is the sample's
// r = ceil(1.25 s)-th largest key, so about 1.25 k_total entries of h are at or above it — and,
// when the rows are exchangeable, fewer than k_total only with a chance of ~3e-5 (4 standard
// deviations). The sample's r-th largest is found as batch_topk's two passes find theirs: the key
// maxima of about 4 r blocks of the sampled rows, their r-th largest t (a lower bound: the maxima
// belong to distinct entries), then the entries >= t of the blocks that reach it (about 1.1 r) and
// the r-th largest of those — a few vectorised reads of the sample, not a histogram of all of its
// keys. False when the sample would be more than an eighth of h or holds a NaN: the caller then
// takes the two passes.
constexpr int64_t kSampleAbove = 256;

template <typename T>
bool sampled_bound(const T* h, const float* bias, int64_t R, int64_t F, int64_t k_total, uint32_t& bound) {
  const int64_t rows = (kSampleAbove * R + k_total - 1) / k_total;
  if (rows * 8 > R) return false;
  const int64_t stride = R / rows;
  const double above = double(k_total) * double(rows) / double(R);  // expected in the sample
  const int64_t r = std::clamp<int64_t>(int64_t(std::ceil(1.25 * above)), 1, rows * F);
  const int64_t block = std::clamp<int64_t>(rows * F / (4 * r), 1, 64), row_blocks = (F + block - 1) / block;
  auto row = [&](int64_t i) { return h + (i * stride + stride / 2) * F; };
  std::vector<uint32_t> keymax(rows * row_blocks);
  for (int64_t i = 0; i < rows; ++i)
    if (row_block_key_max(row(i), bias, F, block, keymax.data() + i * row_blocks)) return false;
  std::vector<uint32_t> order(keymax);
  std::nth_element(order.begin(), order.begin() + (r - 1), order.end(), std::greater<uint32_t>());
  std::vector<simd::Candidate> cand;
  for (int64_t i = 0; i < rows; ++i)
    row_collect_at_least(row(i), bias, F, block, keymax.data() + i * row_blocks, order[r - 1], 0, cand);
  std::nth_element(cand.begin(), cand.begin() + (r - 1), cand.end(), simd::RanksBefore{});
  bound = cand[r - 1].key;
  return true;
}

// The candidates of batch_topk_impl: per part of h (kParts fixed parts, so that their order does
// not depend on the threads), its entries at or above a bound, in flat order.
constexpr int64_t kParts = 64;
using Parts = std::vector<std::vector<simd::Candidate>>;

// The entries of a [R, F] h over a flat range [start, start + len), as spans fn(first entry,
// entries): one span without a bias, else one per row, each with its row's bias (bias_at).
struct RowSpans {
  const float* bias;
  int64_t F;
  template <typename Fn>
  void each(int64_t start, int64_t len, Fn&& fn) const {
    if (bias == nullptr) return fn(start, len);
    for (int64_t pos = start, end = start + len; pos < end;) {
      const int64_t stop = std::min(end, (pos / F + 1) * F);
      fn(pos, stop - pos);
      pos = stop;
    }
  }
  const float* bias_at(int64_t pos) const { return bias == nullptr ? nullptr : bias + pos % F; }
};

bool all_zero(const std::vector<uint32_t>& flags) {
  return std::all_of(flags.begin(), flags.end(), [](uint32_t f) { return f == 0; });
}

// Path a. of batch_topk_impl: true when `parts` then hold the candidates of a sampled bound (fp32,
// AVX-512F, h above the parallel size; else false and `parts` left empty).
template <typename T>
bool sampled_candidates(const T* h, const RowSpans& spans, int64_t n, int64_t k_total, int64_t grain,
                        const char* nan_msg, Parts& parts) {
#ifdef FASTCLT_AVX512_SCAN
  if constexpr (std::is_same_v<T, float>) {
    uint32_t bound = 0;
    if (n <= kParallelEntries || !simd::has_avx512_scan() || !sampled_bound(h, spans.bias, n / spans.F, spans.F,
                                                                            k_total, bound))
      return false;
    std::atomic<int64_t> total{0};
    std::vector<uint32_t> part_ok(kParts, 1), part_nan(kParts, 0);
    const int64_t part_len = (n + kParts - 1) / kParts;
    at::parallel_for(0, kParts, grain, [&](int64_t p0, int64_t p1) {
      for (int64_t p = p0; p < p1; ++p) {
        const int64_t start = std::min(n, p * part_len), len = std::min(n, start + part_len) - start;
        parts[p].reserve(size_t(2.0 * double(k_total) * double(len) / double(n)) + 64);  // ~1.25x that expected
        simd::ScanBuffer buf(parts[p], total, 4 * k_total);
        spans.each(start, len, [&](int64_t pos, int64_t m) {
          if (!part_ok[p]) return;
          const float* b = spans.bias_at(pos);
          part_ok[p] = b != nullptr ? simd::collect_all_at_least_avx512<true>(h + pos, b, m, bound, pos, buf,
                                                                              part_nan[p])
                                    : simd::collect_all_at_least_avx512<false>(h + pos, nullptr, m, bound, pos, buf,
                                                                               part_nan[p]);
        });
        if (part_ok[p]) part_ok[p] = buf.flush();
      }
    });
    const bool complete = !std::count(part_ok.begin(), part_ok.end(), uint32_t(0));
    if (complete) TORCH_CHECK_VALUE(all_zero(part_nan), nan_msg);
    if (complete && total.load() >= k_total) return true;
    for (auto& part : parts) part = std::vector<simd::Candidate>();
  }
#endif
  return false;
}

// Path b. of batch_topk_impl: the two passes (block key maxima, then the blocks that reach the
// k_total-th largest of them).
template <typename T>
void two_pass_candidates(const T* h, const RowSpans& spans, int64_t n, int64_t k_total, int64_t grain,
                         const char* nan_msg, Parts& parts) {
  // n_blocks >= k_total (the bound needs k_total block maxima), and about 4 k_total where blocks of
  // 64 would give fewer: with only k_total maxima the bound is their minimum, which lets a third of
  // h through as candidates at k_total = numel / 32; with 4 k_total it lets about 1.1 k_total through.
  int64_t block = std::clamp<int64_t>(n / (4 * k_total), 1, 64);
  if (spans.bias != nullptr)
    while (spans.F % block != 0) --block;
  const int64_t n_blocks = (n + block - 1) / block, part_blocks = (n_blocks + kParts - 1) / kParts;
  std::vector<uint32_t> keymax(n_blocks), part_nan(kParts, 0);
  auto part_span = [&](int64_t p) {  // [start, start + len) entries of part p
    const int64_t b0 = std::min(n_blocks, p * part_blocks), start = b0 * block;
    return std::make_pair(start, std::min(n, (b0 + part_blocks) * block) - start);
  };
  at::parallel_for(0, kParts, grain, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      auto [start, len] = part_span(p);
      spans.each(start, len, [&](int64_t pos, int64_t m) {
        part_nan[p] |= row_block_key_max(h + pos, spans.bias_at(pos), m, block, keymax.data() + pos / block);
      });
    }
  });
  TORCH_CHECK_VALUE(all_zero(part_nan), nan_msg);
  const uint32_t bound = kth_largest_key(keymax, k_total);
  at::parallel_for(0, kParts, grain, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      auto [start, len] = part_span(p);
      spans.each(start, len, [&](int64_t pos, int64_t m) {
        row_collect_at_least(h + pos, spans.bias_at(pos), m, block, keymax.data() + pos / block, bound, pos,
                             parts[p]);
      });
    }
  });
}

// The end of an exact BatchTopK from its candidates (each part's in flat order, the parts in order,
// their keys those of the entries' values): the k_total-th largest key K, then CSR over the R rows
// of every candidate above K and the first ones equal to K in flat order; values from the keys.
template <typename T>
void keep_top_candidates(const std::vector<std::vector<simd::Candidate>>& parts, int64_t R, int64_t F,
                         int64_t k_total, int64_t* row_ptr, int32_t* out_index, T* out_value) {
  // the k_total-th largest candidate key K; the kept: every candidate above K, and the first
  // (k_total - those) candidates equal to K in flat order (the lowest indices)
  size_t n_cand = 0;
  for (const auto& part : parts) n_cand += part.size();
  std::vector<uint32_t> keys;
  keys.reserve(n_cand);
  for (const auto& part : parts)
    for (const simd::Candidate& c : part) keys.push_back(c.key);
  TORCH_CHECK(int64_t(keys.size()) >= k_total, "fastclt::batch_topk: internal error: ", keys.size(),
              " candidates for k_total=", k_total);
  const uint32_t kth = kth_largest_key(keys, k_total);
  int64_t equal_left = k_total;
  for (uint32_t key : keys) equal_left -= key > kth;
  keys = std::vector<uint32_t>();

  // candidates come in flat order: the row advances with them (no division per kept entry), and
  // row_ptr[r + 1] is written once row r is passed. Every candidate is written at the next output
  // slot, which advances only for a kept one: no branch on the keep test, which goes either way at
  // random (about a third of the candidates are dropped). The selection's serial end (the keys, the
  // k-th key and this loop) of a [1024, 4096] h keeping 16384 took 0.21 ms with the branch, 0.17 ms
  // without (2-core Xeon).
  int64_t out = 0, row = 0, row_start = 0;
  row_ptr[0] = 0;
  for (const auto& part : parts) {
    for (const simd::Candidate& c : part) {
      if (out == k_total) break;  // the rest are ranked after the k_total-th
      while (c.index >= row_start + F) {
        row_ptr[++row] = out;
        row_start += F;
      }
      const int64_t tie = c.key == kth;
      const int64_t keep = int64_t(c.key > kth) | (tie & int64_t(equal_left > 0));
      equal_left -= tie & keep;
      out_index[out] = int32_t(c.index - row_start);
      out_value[out] = T(relu(key_float(c.key)));  // h[c.index] (+ its bias), from its key
      out += keep;
    }
  }
  TORCH_CHECK(out == k_total, "fastclt::batch_topk: internal error: kept ", out, " of k_total=", k_total);
  while (row < R) row_ptr[++row] = out;
}

// Exact BatchTopK on one device in about one read of h (csrc/README.md). The candidates are the
// entries whose key is at or above a lower bound t of the k_total-th largest key, in flat order
// (fixed parts of h, so the order does not depend on the threads). t and the candidates come from
//   a. (fp32 h of more than 2^18 entries, on a CPU with AVX-512F) a bound sampled from h's rows
//      (sampled_bound) and one pass over h collecting the entries >= t (collect_all_at_least_avx512).
//      When they are at least k_total (nearly always) they hold the top k_total — exact whatever
//      the sample; otherwise, or past 4 k_total of them (t far too low), b. runs;
//   b. two passes: 1. the key maxima of the numel/64 blocks of 64 entries (one vectorised pass):
//      they belong to distinct entries, so their k_total-th largest is such a bound t; 2. the
//      entries >= t, read from only the blocks whose maximum is >= t (about k_total blocks: ~1/8 of
//      h at k = 32 of 16384): about 1.1 k_total candidates on random data, never fewer than k_total;
// then the k_total-th largest candidate key K (kth_largest_key), and the candidates above K and
// the first ones equal to K in flat order (ties to the lowest flat index: the rule of
// batch_topk_compact) are written as CSR, k_total in all. The path changes the time, never the
// result. In b., blocks are smaller when k_total > numel / 256 (about 4 k_total blocks), down to
// one entry.
// With a bias (fp32 only: batch_topk_bias) the keys are those of h + bias[column]; in b. the block
// is the largest divisor of F not above that size, so that no block straddles two rows: each
// row's span of a part is then one aligned call of the biased block scans.
template <typename T>
void batch_topk_impl(const T* h, const float* bias, int64_t n, int64_t F, int64_t k_total, int64_t* row_ptr,
                     int32_t* out_index, T* out_value) {
  const int64_t R = n / F, grain = n > kParallelEntries ? 1 : kParts;
  const char* nan_msg = bias != nullptr ? "batch_topk: h + bias contains NaN" : "batch_topk: h contains NaN";
  const RowSpans spans{bias, F};
  Parts parts(kParts);
  if (!sampled_candidates(h, spans, n, k_total, grain, nan_msg, parts))
    two_pass_candidates(h, spans, n, k_total, grain, nan_msg, parts);

  keep_top_candidates(parts, R, F, k_total, row_ptr, out_index, out_value);
}

// batch_topk and batch_topk_bias after their own checks: the outputs, then batch_topk_impl (bias:
// nullptr, or fp32 [F] with fp32 h).
std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_topk_run(const at::Tensor& h, const float* bias, int64_t k_total,
                                                              const char* op) {
  const int64_t n = h.numel(), F = h.size(-1);
  TORCH_CHECK(F <= INT32_MAX, "fastclt::", op, ": F must fit in int32, got ", F);
  TORCH_CHECK_VALUE(k_total >= 0 && k_total <= n, "batch_topk: k_total must be in [0, h.numel()=", n,
                    "], got ", k_total);
  const int64_t R = F == 0 ? 0 : n / F;
  auto row_ptr = new_output({R + 1}, h.options().dtype(at::kLong));
  auto index = new_output({k_total}, h.options().dtype(at::kInt));
  auto value = new_output({k_total}, h.options());
  if (k_total == 0) {
    row_ptr.zero_();
    return {row_ptr, index, value};
  }
  dispatch_float(h.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    batch_topk_impl<scalar_t>(h.data_ptr<scalar_t>(), bias, n, F, k_total, row_ptr.data_ptr<int64_t>(),
                              index.data_ptr<int32_t>(), value.data_ptr<scalar_t>());
  });
  return {row_ptr, index, value};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_topk_cpu(const at::Tensor& h, int64_t k_total) {
  TORCH_CHECK(h.dim() >= 2, "fastclt::batch_topk: h must have at least 2 dims [..., F], got shape ", h.sizes());
  check_float_tensor(h, "batch_topk", "h");
  TORCH_CHECK(h.device().is_cpu(), "fastclt::batch_topk: CPU kernel called on ", h.device());
  return batch_topk_run(h, nullptr, k_total, "batch_topk");
}

// batch_topk of h + bias (fp32; bias [F] broadcast over the rows) without forming it, as topk_bias
// does for TopK: the CPU encoder's GEMM then runs without its bias (no [B, F] broadcast copy before
// a beta = 1 GEMM). value = relu(h + bias) at the kept entries (the sum rounded once, in fp32).
std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_topk_bias_cpu(const at::Tensor& h, const at::Tensor& bias,
                                                                   int64_t k_total) {
  TORCH_CHECK(h.dim() == 2, "fastclt::batch_topk_bias: h must be 2-D [B, F], got shape ", h.sizes());
  TORCH_CHECK(h.is_contiguous(), "fastclt::batch_topk_bias: h must be contiguous");
  check_row_bias(h, bias, "batch_topk_bias");
  const at::Tensor b = bias.contiguous();
  return batch_topk_run(h, b.data_ptr<float>(), k_total, "batch_topk_bias");
}

// batch_topk_bias of each of L layers at once: h fp32 [L, R, F], bias fp32 [L, F] -> one CSR over the
// L·R rows (layer-major) holding exactly k_total entries per layer, layer l's as batch_topk_bias(h[l],
// bias[l], k_total) would give them. Small layers (R·F at most kParallelEntries, where one layer's
// selection runs on one thread) are selected in parallel, one layer per thread; larger ones one after
// another, each on every thread. A per-layer BatchTopK CLT's L selections are then one call, and at
// the default demo's shape (L = 4, [512, 128] per layer) run on both cores of a 2-core machine.
std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_topk_bias_layers_cpu(const at::Tensor& h, const at::Tensor& bias,
                                                                          int64_t k_total) {
  TORCH_CHECK(h.dim() == 3, "fastclt::batch_topk_bias_layers: h must be 3-D [L, B, F], got shape ", h.sizes());
  TORCH_CHECK(h.is_contiguous(), "fastclt::batch_topk_bias_layers: h must be contiguous");
  TORCH_CHECK(h.scalar_type() == at::kFloat, "fastclt::batch_topk_bias_layers: h must be float32, got ",
              h.scalar_type());
  TORCH_CHECK(h.device().is_cpu(), "fastclt::batch_topk_bias_layers: CPU kernel called on ", h.device());
  const int64_t L = h.size(0), R = h.size(1), F = h.size(2);
  TORCH_CHECK(bias.dim() == 2 && bias.size(0) == L && bias.size(1) == F,
              "fastclt::batch_topk_bias_layers: bias must have shape [L=", L, ", F=", F, "], got ", bias.sizes());
  check_float_tensor(bias, "batch_topk_bias_layers", "bias");
  check_same_dtype(bias, h, "batch_topk_bias_layers", "bias", "h");
  check_device(bias, h, "batch_topk_bias_layers", "bias", "h");
  TORCH_CHECK(F <= INT32_MAX, "fastclt::batch_topk_bias_layers: F must fit in int32, got ", F);
  const int64_t n = R * F;
  TORCH_CHECK_VALUE(k_total >= 0 && k_total <= n, "batch_topk: k_total must be in [0, B·F=", n,
                    "] (per layer), got ", k_total);
  const at::Tensor b = bias.contiguous();
  auto row_ptr = new_output({L * R + 1}, h.options().dtype(at::kLong));
  auto index = new_output({L * k_total}, h.options().dtype(at::kInt));
  auto value = new_output({L * k_total}, h.options());
  int64_t* rp = row_ptr.data_ptr<int64_t>();
  if (k_total == 0 || L == 0) {
    row_ptr.zero_();
    return {row_ptr, index, value};
  }
  // each layer's row_ptr [R + 1] from 0 in its own buffer (neighbouring layers share a boundary entry)
  std::vector<int64_t> local(L * (R + 1));
  const float* hp = h.data_ptr<float>();
  const float* bp = b.data_ptr<float>();
  int32_t* ip = index.data_ptr<int32_t>();
  float* vp = value.data_ptr<float>();
  auto layer = [&](int64_t l) {
    batch_topk_impl<float>(hp + l * n, bp + l * F, n, F, k_total, local.data() + l * (R + 1), ip + l * k_total,
                           vp + l * k_total);
  };
  if (n > kParallelEntries) {
    for (int64_t l = 0; l < L; ++l) layer(l);
  } else {
    at::parallel_for(0, L, 1, [&](int64_t l0, int64_t l1) {
      for (int64_t l = l0; l < l1; ++l) layer(l);
    });
  }
  for (int64_t l = 0; l < L; ++l)
    for (int64_t r = 0; r < R; ++r) rp[l * R + r] = l * k_total + local[l * (R + 1) + r];
  rp[L * R] = L * k_total;
  return {row_ptr, index, value};
}

// Threshold patterns (ReLU; JumpReLU with the band its backward visits): the entries of h [B, F]
// with h > θ[f] or |h − θ[f]| < half_band, the difference rounded to h's dtype as PyTorch's
// `(h - θ).abs() < half_band` does (θ = 0 and half_band = 0 give ReLU's h > 0). One read of h:
// a vectorised pass per row finds the candidates (h − θ > −2·half_band, a superset), each is
// tested exactly, and rows write into per-part buffers (fixed parts of rows, in order) that are
// then copied into CSR. NaN entries are never kept (every comparison with NaN is false).
template <typename T>
std::tuple<at::Tensor, at::Tensor, at::Tensor> threshold_compact_impl(const at::Tensor& h_t, const T* thr,
                                                                      float half_band) {
  const T* h = h_t.data_ptr<T>();
  const int64_t B = h_t.size(0), F = h_t.size(1);
  const int64_t n_parts = std::min<int64_t>(B, 64);
  std::vector<std::vector<int32_t>> cols(n_parts);
  std::vector<std::vector<float>> vals(n_parts);
  auto row_ptr = new_output({B + 1}, h_t.options().dtype(at::kLong));
  int64_t* rp = row_ptr.data_ptr<int64_t>();
  rp[0] = 0;
  const float bound = half_band > 0.f ? -2.f * half_band : 0.f;
  at::parallel_for(0, n_parts, B * F > kParallelEntries ? 1 : n_parts, [&](int64_t p0, int64_t p1) {
    std::vector<int32_t> cand;
    for (int64_t p = p0; p < p1; ++p) {
      for (int64_t b = B * p / n_parts; b < B * (p + 1) / n_parts; ++b) {
        const T* x = h + b * F;
        cand.clear();
        simd::collect_above(x, thr, F, bound, cand);
        int64_t kept = 0;
        for (int32_t i : cand) {
          const float v = to_f32(x[i]), t = to_f32(thr[i]);
          if (v > t || std::fabs(to_f32(T(v - t))) < half_band) {
            cols[p].push_back(i);
            vals[p].push_back(v);
            ++kept;
          }
        }
        rp[b + 1] = kept;  // a count for now
      }
    }
  });
  for (int64_t b = 0; b < B; ++b) rp[b + 1] += rp[b];
  const int64_t nnz = rp[B];
  auto index = new_output({nnz}, h_t.options().dtype(at::kInt));
  auto value = new_output({nnz}, h_t.options().dtype(at::kFloat));
  int32_t* out_index = index.data_ptr<int32_t>();
  float* out_value = value.data_ptr<float>();
  at::parallel_for(0, n_parts, B * F > kParallelEntries ? 1 : n_parts, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t start = rp[B * p / n_parts];
      std::copy(cols[p].begin(), cols[p].end(), out_index + start);
      std::copy(vals[p].begin(), vals[p].end(), out_value + start);
    }
  });
  return {row_ptr, index, value};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> threshold_compact_cpu(const at::Tensor& h,
                                                                     const std::optional<at::Tensor>& threshold,
                                                                     double half_band) {
  const char* op = "threshold_compact";
  TORCH_CHECK(h.dim() == 2, "fastclt::threshold_compact: h must be 2-D [B, F], got shape ", h.sizes());
  check_float_tensor(h, op, "h");
  TORCH_CHECK(h.device().is_cpu(), "fastclt::threshold_compact: CPU kernel called on ", h.device());
  TORCH_CHECK(h.size(1) <= INT32_MAX, "fastclt::threshold_compact: F must fit in int32, got ", h.size(1));
  TORCH_CHECK(std::isfinite(half_band) && half_band >= 0, "fastclt::threshold_compact: half_band must be a "
              "finite number >= 0, got ", half_band);
  at::Tensor thr;
  if (threshold.has_value()) {
    thr = *threshold;
    TORCH_CHECK(thr.dim() == 1 && thr.size(0) == h.size(1), "fastclt::threshold_compact: threshold must have "
                "shape [F=", h.size(1), "], got ", thr.sizes());
    check_float_tensor(thr, op, "threshold");
    check_same_dtype(thr, h, op, "threshold", "h");
    check_device(thr, h, op, "threshold", "h");
  } else {
    TORCH_CHECK(half_band == 0, "fastclt::threshold_compact: half_band needs a threshold, got ", half_band);
    thr = at::zeros({h.size(1)}, h.options());
  }
  std::tuple<at::Tensor, at::Tensor, at::Tensor> out;
  dispatch_float(h.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    out = threshold_compact_impl<scalar_t>(h, thr.data_ptr<scalar_t>(), float(half_band));
  });
  return out;
}


// ---------------------------------------------------------------- screened selections
// TopK / BatchTopK of h = x Wᵀ + bias (fp32) from a bf16 screen (csrc/README.md, docs/DESIGN.md):
// A = bf16(x̂ Ŵᵀ), with x̂, Ŵ the operands rounded to bf16 (bf16_split) and the product summed in fp32
// (the CPU's bf16 GEMM), is within E of h at every entry, E from the norms of the operands' bf16
// parts and remainders. The k-th (k_total-th) largest lower bound A + bias − E is a lower bound of
// the k-th largest h, so every entry of the top k has an upper bound A + bias + E at or above it:
// those candidates (about 1.5–2 k on random data) are rescored exactly in fp32 and the selection
// runs on them. Same entries and values as the selection of the fp32 product (its summation order
// aside: the rescored values are dot products of x and W's rows summed in another order).

// bf16_split: a fp32 [R, d] -> (â bf16 [R, d], a rounded to nearest even; norms fp32 [2, R]: ‖â_r‖
// and ‖a_r − â_r‖, each rounded up). NaN stays NaN (its remainder is NaN).
FASTCLT_SIMD_CLONES static void split_row(const float* __restrict__ a, uint16_t* __restrict__ hi, int64_t d,
                                          float* s_hi, float* s_lo) {
  float sh = 0.f, sl = 0.f;
#pragma omp simd reduction(+ : sh, sl)
  for (int64_t i = 0; i < d; ++i) {
    const uint32_t u = simd::f32_bits(a[i]);
    const uint32_t nan = uint32_t((u & 0x7FFFFFFFu) > 0x7F800000u);
    const uint32_t r = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    const uint16_t h = uint16_t(nan ? 0x7FC0u : r);
    hi[i] = h;
    const float hf = simd::bf16_bits_to_f32(h), lo = a[i] - hf;  // exact: a's low mantissa bits
    sh += hf * hf;
    sl += lo * lo;
  }
  *s_hi = sh;
  *s_lo = sl;
}

// A norm from an fp32 sum of d squares, rounded up: the sum's error is at most γ_d (~d·2^-24) of it
// (terms >= 0) plus, for squares below the normal range (rounded as denormals, or flushed to zero
// where the FPU flushes), 2^-126 each. A square past the fp32 range makes the norm Inf (the screen
// then hands back).
inline float norm_up(float sum_sq, int64_t d) {
  const double bound = double(sum_sq) * (1.0 + 1.01 * double(d + 1) * std::ldexp(1.0, -24)) +
                       double(d) * std::ldexp(1.0, -126);
  return std::nextafter(float(std::sqrt(bound)), INFINITY);
}

std::tuple<at::Tensor, at::Tensor> bf16_split_cpu(const at::Tensor& a) {
  TORCH_CHECK(a.dim() == 2, "fastclt::bf16_split: a must be 2-D [R, d], got shape ", a.sizes());
  TORCH_CHECK(a.scalar_type() == at::kFloat, "fastclt::bf16_split: a must be float32, got ", a.scalar_type());
  TORCH_CHECK(a.device().is_cpu(), "fastclt::bf16_split: CPU kernel called on ", a.device());
  // rows may lie apart (a layer of [B, L, d] activations): read in place when each row is contiguous
  const at::Tensor ac = a.size(1) <= 1 || a.stride(1) == 1 ? a : a.contiguous();
  const int64_t R = a.size(0), d = a.size(1);
  const int64_t lda = R <= 1 ? d : ac.stride(0);
  auto hi = new_output({R, d}, a.options().dtype(at::kBFloat16));
  auto norms = new_output({2, R}, a.options());
  const float* src = ac.data_ptr<float>();
  uint16_t* dst = reinterpret_cast<uint16_t*>(hi.data_ptr<at::BFloat16>());
  float* nrm = norms.data_ptr<float>();
  at::parallel_for(0, R, std::max<int64_t>(1, kParallelEntries / std::max<int64_t>(d, 1)), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      float sh, sl;
      split_row(src + r * lda, dst + r * d, d, &sh, &sl);
      nrm[r] = norm_up(sh, d);
      nrm[R + r] = norm_up(sl, d);
    }
  });
  return {hi, norms};
}

// The bound E(b, f) on |h − (A + bias)| (h: x_b · W_f + bias_f summed in fp32, in any order):
//   x·w − x̂·ŵ = x̂·(w − ŵ) + (x − x̂)·ŵ + (x − x̂)·(w − ŵ)    (Cauchy–Schwarz on each term: the norms)
//   + γ_d Σ|x̂ ŵ| for A's fp32 sum and γ_d Σ|x w| for h's, both ≤ γ_d (‖x̂‖ + ‖x − x̂‖)(‖ŵ‖ + ‖w − ŵ‖)
//   + 2^-8 |A| for A's rounding to bf16, + 2^-100 (‖x̂‖ + ‖ŵ‖ + 1) for denormals flushed to zero
//   (a bf16 GEMM may flush them), + 2^-21 (|A| + |bias|) for the fp32 roundings of h + bias, of
//   A + bias and of the bound's own terms and ± (with the factor 1.01 on the rest).
// Per feature the terms in ‖x̂‖ = p and ‖x − x̂‖ = q are folded into E = p·u_f + q·v_f + z_f +
// 2^-100 (p + 1) + (2^-8·1.01 + 2^-21)|A|, u_f = 1.01 (‖w̃‖ + 2γ(‖ŵ‖ + ‖w̃‖)), v_f = 1.01 (‖ŵ‖ + ‖w̃‖ +
// 2γ(‖ŵ‖ + ‖w̃‖)), z_f = 2^-100 ‖ŵ‖ + 2^-21 |bias_f| (the roundings of that folding are a few 2^-24
// of the terms, inside the 1.01).
constexpr float kBoundSlack = 1.01f;
constexpr float kAbsA = 0.00395f + 4.76837158e-07f;  // 2^-8 · 1.01 + 2^-21
constexpr float kRound32 = 4.76837158e-07f;           // 2^-21
constexpr float kTiny = 7.88860905e-31f;              // 2^-100
constexpr float kFiniteBound = 3.0e38f;               // |A + bias| + E below it: both bounds finite

// The screen's operands: A bf16 [B, F] (row-major), x fp32 [B, d] (rows ldx apart), W fp32 [F, d], bias fp32 [F] or
// null, xn [2, B] (bf16_split's norms of x), and the per-feature coefficients u, v, z [F] above.
struct Screen {
  const uint16_t* A;
  const float* x;
  const float* W;
  const float* bias;
  const float* xn;
  const float *u, *v, *z;
  int64_t B, F, d;
  int64_t ldx;  // x's row stride
};

// lo[i] = A + bias − E and hi[i] = A + bias + E for the N entries f0.. of row b; returns nonzero
// when one is not finite (NaN or ±Inf: the caller then hands back). N a constant (a full chunk) or
// n at run time (a partial one).
template <bool kBias, int64_t N>
FASTCLT_ALWAYS_INLINE uint32_t bounds_impl(const Screen& s, int64_t b, int64_t f0, int64_t n, float* __restrict__ lo,
                                           float* __restrict__ hi) {
  const float p = s.xn[b], q = s.xn[s.B + b];
  const float tiny_row = kTiny * (p + 1.f);
  const float* __restrict__ u = s.u + f0;
  const float* __restrict__ v = s.v + f0;
  const float* __restrict__ z = s.z + f0;
  const uint16_t* __restrict__ a = s.A + b * s.F + f0;
  const float* __restrict__ bias = kBias ? s.bias + f0 : nullptr;
  const int64_t m = N > 0 ? N : n;
  uint32_t bad = 0;
#pragma omp simd reduction(| : bad)
  for (int64_t i = 0; i < m; ++i) {
    const float av = simd::bf16_bits_to_f32(a[i]);
    const float c = kBias ? av + bias[i] : av;
    const float e = p * u[i] + q * v[i] + z[i] + tiny_row + kAbsA * std::fabs(av);
    lo[i] = c - e;
    hi[i] = c + e;
    bad |= uint32_t(!(std::fabs(c) + e <= kFiniteBound));
  }
  return bad;
}

// The screen works on chunks of kChunk entries of a row, each seen as kLanes lanes: lane i of the
// chunk at f0 holds the entries f0 + i + kLanes·t. A lane's largest lower bound (its "lane
// maximum") belongs to one entry, and lanes hold distinct entries: the k-th largest lane maximum is
// a lower bound of the k-th largest lower bound, hence of the k-th largest h (needs k lanes: k ≤ F
// / kLanes), and a chunk none of whose lanes' largest upper bounds reaches it holds no entry of the
// top k. The lane maxima are vertical maxima over the chunk's kChunk / kLanes vectors (no
// horizontal reduction per block).
constexpr int64_t kLanes = 8;
constexpr int64_t kChunk = 64;

// The bounds of the chunk at f0 (n = min(kChunk, F − f0) entries; the rest of lo / hi −Inf).
template <bool kBias>
FASTCLT_ALWAYS_INLINE uint32_t chunk_bounds_impl(const Screen& s, int64_t b, int64_t f0, float* lo, float* hi) {
  const int64_t n = std::min(kChunk, s.F - f0);
  if (n == kChunk) return bounds_impl<kBias, kChunk>(s, b, f0, n, lo, hi);
  std::fill(lo + n, lo + kChunk, -INFINITY);
  std::fill(hi + n, hi + kChunk, -INFINITY);
  return bounds_impl<kBias, 0>(s, b, f0, n, lo, hi);
}

FASTCLT_SIMD_CLONES static uint32_t chunk_bounds(const Screen& s, int64_t b, int64_t f0, float* lo, float* hi) {
  return s.bias != nullptr ? chunk_bounds_impl<true>(s, b, f0, lo, hi) : chunk_bounds_impl<false>(s, b, f0, lo, hi);
}

// Row b's lane maxima: lbmax / ubmax [n_chunks · kLanes], chunk after chunk. Nonzero when a bound of
// the row is not finite.
template <bool kBias>
FASTCLT_ALWAYS_INLINE uint32_t row_lane_maxima_impl(const Screen& s, int64_t b, float* __restrict__ lbmax,
                                                    float* __restrict__ ubmax) {
  alignas(64) float lo[kChunk], hi[kChunk];
  uint32_t bad = 0;
  for (int64_t f0 = 0, c = 0; f0 < s.F; f0 += kChunk, ++c) {
    bad |= chunk_bounds_impl<kBias>(s, b, f0, lo, hi);
    float* __restrict__ lm = lbmax + c * kLanes;
    float* __restrict__ um = ubmax + c * kLanes;
#pragma omp simd
    for (int64_t i = 0; i < kLanes; ++i) {
      float l = lo[i], h = hi[i];
      for (int64_t t = 1; t < kChunk / kLanes; ++t) {
        l = lo[t * kLanes + i] > l ? lo[t * kLanes + i] : l;
        h = hi[t * kLanes + i] > h ? hi[t * kLanes + i] : h;
      }
      lm[i] = l;
      um[i] = h;
    }
  }
  return bad;
}

FASTCLT_SIMD_CLONES static uint32_t row_lane_maxima(const Screen& s, int64_t b, float* lbmax, float* ubmax) {
  return s.bias != nullptr ? row_lane_maxima_impl<true>(s, b, lbmax, ubmax)
                           : row_lane_maxima_impl<false>(s, b, lbmax, ubmax);
}

// A lower bound of the k-th largest lower bound of a row from its lane maxima (lanes = n_chunks ·
// kLanes of them): the k-th largest chunk maximum when k <= n_chunks (the top k chunks each hold a
// lane at least that large; cheaper, and about as tight when k is small next to the chunks), else
// the k-th largest lane maximum when k <= lanes, else −Inf (every entry is then a candidate).
float row_bound(const float* lbmax, int64_t lanes, int64_t k, std::vector<float>& sel) {
  const int64_t chunks = lanes / kLanes;
  if (k <= chunks) {
    sel.resize(chunks);
    for (int64_t c = 0; c < chunks; ++c) {
      float m = lbmax[c * kLanes];
      for (int64_t i = 1; i < kLanes; ++i) m = lbmax[c * kLanes + i] > m ? lbmax[c * kLanes + i] : m;
      sel[c] = m;
    }
  } else if (k <= lanes) {
    sel.assign(lbmax, lbmax + lanes);
  } else {
    return -INFINITY;
  }
  std::nth_element(sel.begin(), sel.begin() + (k - 1), sel.end(), std::greater<float>());
  return sel[k - 1];
}

// Status of a screened selection (its last output): the selection is valid only with kScreened.
constexpr int32_t kScreened = 0, kNonFinite = 1, kBoundBroken = 2;

// Row b's candidates: in every chunk with a lane whose largest upper bound (ubmax, the row's) reaches
// tau, the entries whose upper bound does, rescored — h = x_b · W_f (fp32) + bias_f — and appended
// to `out` as (key of h, base + f) in increasing f. Returns kBoundBroken when a rescored h lies
// outside its bounds.
struct RescoreScratch {
  std::vector<int64_t> rows;
  std::vector<float> dots, lb, ub, sel;  // sel: row_bound's scratch
};

int32_t rescore_row(const Screen& s, int64_t b, const float* ubmax, float tau, int64_t base, RescoreScratch& t,
                    std::vector<simd::Candidate>& out) {
  alignas(64) float lo[kChunk], hi[kChunk];
  t.rows.clear();
  t.lb.clear();
  t.ub.clear();
  for (int64_t f0 = 0, c = 0; f0 < s.F; f0 += kChunk, ++c) {
    uint32_t lanes = 0;  // bit i: lane i's largest upper bound reaches tau
    for (int64_t i = 0; i < kLanes; ++i) lanes |= uint32_t(ubmax[c * kLanes + i] >= tau) << i;
    if (!lanes) continue;
    chunk_bounds(s, b, f0, lo, hi);
    uint64_t hits = 0;  // bit j: entry f0 + j reaches tau (only the reaching lanes' entries are tested)
    for (int64_t i = 0; i < kLanes; ++i)
      if (lanes >> i & 1u)
        for (int64_t j = i; j < kChunk; j += kLanes) hits |= uint64_t(hi[j] >= tau) << j;
    for (; hits; hits &= hits - 1) {  // in increasing f
      const int j = __builtin_ctzll(hits);
      t.rows.push_back(f0 + j);
      t.lb.push_back(lo[j]);
      t.ub.push_back(hi[j]);
    }
  }
  const int64_t n = int64_t(t.rows.size());
  t.dots.resize(n);
  simd::gather_dot(s.x + b * s.ldx, s.W, t.rows.data(), t.dots.data(), n, s.d);
  int32_t status = kScreened;
  for (int64_t j = 0; j < n; ++j) {
    const int64_t f = t.rows[j];
    const float h = s.bias != nullptr ? t.dots[j] + s.bias[f] : t.dots[j];
    if (!(h >= t.lb[j] && h <= t.ub[j])) status = kBoundBroken;
    out.push_back({float_key(h), base + f});
  }
  return status;
}

void check_screen_args(const at::Tensor& A, const at::Tensor& x, const at::Tensor& W,
                       const std::optional<at::Tensor>& bias, const at::Tensor& xn, const at::Tensor& wn,
                       const char* op) {
  TORCH_CHECK(A.dim() == 2 && A.scalar_type() == at::kBFloat16 && A.is_contiguous(), "fastclt::", op,
              ": A must be a contiguous bfloat16 [B, F] matrix, got ", A.scalar_type(), " of shape ", A.sizes());
  TORCH_CHECK(A.device().is_cpu(), "fastclt::", op, ": CPU kernel called on ", A.device());
  const int64_t B = A.size(0), F = A.size(1);
  TORCH_CHECK(x.dim() == 2 && x.size(0) == B && x.scalar_type() == at::kFloat &&
                  (x.size(1) <= 1 || x.stride(1) == 1) && (B <= 1 || x.stride(0) >= x.size(1)),
              "fastclt::", op, ": x must be a float32 [B=", B, ", d] matrix with contiguous, non-overlapping rows, got ",
              x.scalar_type(), " of shape ", x.sizes(), " and strides ", x.strides());
  TORCH_CHECK(W.dim() == 2 && W.size(0) == F && W.size(1) == x.size(1) && W.scalar_type() == at::kFloat &&
                  W.is_contiguous(),
              "fastclt::", op, ": W must be a contiguous float32 [F=", F, ", d=", x.size(1), "] matrix, got ",
              W.scalar_type(), " of shape ", W.sizes());
  TORCH_CHECK(x.size(1) <= (int64_t(1) << 16), "fastclt::", op, ": d must be at most 65536, got ", x.size(1));
  TORCH_CHECK(F <= INT32_MAX, "fastclt::", op, ": F must fit in int32, got ", F);
  if (bias.has_value())
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == F && bias->scalar_type() == at::kFloat && bias->is_contiguous(),
                "fastclt::", op, ": bias must be a contiguous float32 [F=", F, "] vector, got ", bias->scalar_type(),
                " of shape ", bias->sizes());
  TORCH_CHECK(xn.dim() == 2 && xn.size(0) == 2 && xn.size(1) == B && xn.scalar_type() == at::kFloat &&
                  xn.is_contiguous(),
              "fastclt::", op, ": x_norms must be a contiguous float32 [2, B=", B, "] (bf16_split's), got shape ",
              xn.sizes());
  TORCH_CHECK(wn.dim() == 2 && wn.size(0) == 2 && wn.size(1) == F && wn.scalar_type() == at::kFloat &&
                  wn.is_contiguous(),
              "fastclt::", op, ": w_norms must be a contiguous float32 [2, F=", F, "] (bf16_split's), got shape ",
              wn.sizes());
  for (const at::Tensor* t : {&x, &W, &xn, &wn}) check_device(*t, A, op, "x, W and the norms", "A");
  if (bias.has_value()) check_device(*bias, A, op, "bias", "A");
}

// The screen of a call, with the per-feature coefficients (u, v, z) in its own storage.
struct ScreenData {
  std::vector<float> u, v, z;
  Screen s;
};

void make_screen(const at::Tensor& A, const at::Tensor& x, const at::Tensor& W, const std::optional<at::Tensor>& bias,
                 const at::Tensor& xn, const at::Tensor& wn, ScreenData& out) {
  const int64_t F = A.size(1), d = x.size(1);
  const float g = float(2.02 * double(d) * std::ldexp(1.0, -24));  // 2γ_d with room
  const float* wh = wn.data_ptr<float>();
  const float* wl = wh + F;
  const float* bp = bias.has_value() ? bias->data_ptr<float>() : nullptr;
  out.u.resize(F);
  out.v.resize(F);
  out.z.resize(F);
  for (int64_t f = 0; f < F; ++f) {
    const float gw = g * (wh[f] + wl[f]);
    out.u[f] = kBoundSlack * (wl[f] + gw);
    out.v[f] = kBoundSlack * (wh[f] + wl[f] + gw);
    out.z[f] = kTiny * wh[f] + (bp != nullptr ? kRound32 * std::fabs(bp[f]) : 0.f);
  }
  out.s = Screen{reinterpret_cast<const uint16_t*>(A.data_ptr<at::BFloat16>()), x.data_ptr<float>(),
                 W.data_ptr<float>(), bp, xn.data_ptr<float>(), out.u.data(), out.v.data(), out.z.data(),
                 A.size(0), F, d, x.size(0) <= 1 ? d : x.stride(0)};
}

at::Tensor status_tensor(int32_t status) { return at::full({}, status, at::TensorOptions().dtype(at::kInt)); }

int64_t lane_count(int64_t F) { return (F + kChunk - 1) / kChunk * kLanes; }

// TopK of each row of h = x Wᵀ + bias from the screen: (index int32 [B, k] ascending, value fp32
// [B, k] = relu(h) there, status int32 []). Per row: its lane maxima, a lower bound t of its k-th
// largest lower bound (row_bound), the candidates of the chunks that reach t rescored (rescore_row),
// their top k (ties: lowest index).
std::tuple<at::Tensor, at::Tensor, at::Tensor> screened_topk_cpu(const at::Tensor& A, const at::Tensor& x,
                                                                 const at::Tensor& W,
                                                                 const std::optional<at::Tensor>& bias,
                                                                 const at::Tensor& x_norms, const at::Tensor& w_norms,
                                                                 int64_t k) {
  check_screen_args(A, x, W, bias, x_norms, w_norms, "screened_topk");
  check_topk_args(A, k, "screened_topk");
  ScreenData data;
  make_screen(A, x, W, bias, x_norms, w_norms, data);
  const Screen& s = data.s;
  const int64_t B = s.B, F = s.F, lanes = lane_count(F);
  auto index = new_output({B, k}, x.options().dtype(at::kInt));
  auto value = new_output({B, k}, x.options());
  int32_t* out_index = index.data_ptr<int32_t>();
  float* out_value = value.data_ptr<float>();
  std::atomic<int32_t> status{kScreened};
#pragma omp parallel if (B * F > kParallelEntries)
  {
    RescoreScratch t;
    std::vector<float> lbmax(lanes), ubmax(lanes);
    std::vector<simd::Candidate> cand;
#pragma omp for schedule(static)
    for (int64_t b = 0; b < B; ++b) {
      if (status.load(std::memory_order_relaxed) != kScreened) continue;
      if (row_lane_maxima(s, b, lbmax.data(), ubmax.data())) {
        status = kNonFinite;
        continue;
      }
      const float tau = row_bound(lbmax.data(), lanes, k, t.sel);
      cand.clear();
      if (rescore_row(s, b, ubmax.data(), tau, 0, t, cand) != kScreened || int64_t(cand.size()) < k) {
        status = kBoundBroken;
        continue;
      }
      std::nth_element(cand.begin(), cand.begin() + (k - 1), cand.end(), simd::RanksBefore{});
      std::sort(cand.begin(), cand.begin() + k, [](const simd::Candidate& u, const simd::Candidate& v) {
        return u.index < v.index;
      });
      for (int64_t i = 0; i < k; ++i) {
        out_index[b * k + i] = int32_t(cand[i].index);
        out_value[b * k + i] = relu(key_float(cand[i].key));
      }
    }
  }
  return {index, value, status_tensor(status.load())};
}

// BatchTopK (k_total over the batch) of h = x Wᵀ + bias from the screen: (row_ptr, index, value as
// batch_topk_bias's; status int32 []). Every row's lane maxima into [B, lanes] buffers, the
// k_total-th largest lower one t (batch_topk's own selection over them; −Inf when there are fewer
// lanes than k_total), then per row the candidates of the chunks that reach t rescored, and
// batch_topk's end on those (ties: lowest flat index).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> screened_batch_topk_cpu(
    const at::Tensor& A, const at::Tensor& x, const at::Tensor& W, const std::optional<at::Tensor>& bias,
    const at::Tensor& x_norms, const at::Tensor& w_norms, int64_t k_total) {
  check_screen_args(A, x, W, bias, x_norms, w_norms, "screened_batch_topk");
  ScreenData data;
  make_screen(A, x, W, bias, x_norms, w_norms, data);
  const Screen& s = data.s;
  const int64_t B = s.B, F = s.F, n = B * F, lanes = lane_count(F);
  TORCH_CHECK_VALUE(k_total >= 0 && k_total <= n, "fastclt::screened_batch_topk: k_total must be in [0, B·F=", n,
                    "], got ", k_total);
  auto row_ptr = new_output({B + 1}, x.options().dtype(at::kLong));
  auto index = new_output({k_total}, x.options().dtype(at::kInt));
  auto value = new_output({k_total}, x.options());
  if (k_total == 0) {
    row_ptr.zero_();
    return {row_ptr, index, value, status_tensor(kScreened)};
  }
  at::Tensor lbmax_t = new_output({B, lanes}, x.options()), ubmax_t = new_output({B, lanes}, x.options());
  float* lbmax = lbmax_t.data_ptr<float>();
  float* ubmax = ubmax_t.data_ptr<float>();
  std::atomic<int32_t> status{kScreened};
  at::parallel_for(0, B, n > kParallelEntries ? 1 : B, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b)
      if (row_lane_maxima(s, b, lbmax + b * lanes, ubmax + b * lanes)) status = kNonFinite;
  });
  if (status.load() != kScreened) return {row_ptr, index, value, status_tensor(status.load())};
  float tau = -INFINITY;
  if (k_total <= B * lanes) {
    std::vector<int64_t> rp(B + 1);
    std::vector<int32_t> idx(k_total);
    std::vector<float> val(k_total);
    batch_topk_impl<float>(lbmax, nullptr, B * lanes, lanes, k_total, rp.data(), idx.data(), val.data());
    tau = INFINITY;
    for (int64_t b = 0; b < B; ++b)
      for (int64_t j = rp[b]; j < rp[b + 1]; ++j) tau = std::min(tau, lbmax[b * lanes + idx[j]]);
  }
  std::vector<std::vector<simd::Candidate>> parts(B);
#pragma omp parallel if (n > kParallelEntries)
  {
    RescoreScratch t;
#pragma omp for schedule(static)
    for (int64_t b = 0; b < B; ++b) {
      if (status.load(std::memory_order_relaxed) != kScreened) continue;
      if (rescore_row(s, b, ubmax + b * lanes, tau, b * F, t, parts[b]) != kScreened) status = kBoundBroken;
    }
  }
  int64_t n_cand = 0;
  for (const auto& part : parts) n_cand += int64_t(part.size());
  if (status.load() == kScreened && n_cand < k_total) status = kBoundBroken;
  if (status.load() != kScreened) return {row_ptr, index, value, status_tensor(status.load())};
  keep_top_candidates(parts, B, F, k_total, row_ptr.data_ptr<int64_t>(), index.data_ptr<int32_t>(),
                      value.data_ptr<float>());
  return {row_ptr, index, value, status_tensor(kScreened)};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastclt, CPU, m) {
  m.impl("topk", &topk_cpu);
  m.impl("topk_bias", &topk_bias_cpu);
  m.impl("batch_topk_histogram", &batch_topk_histogram_cpu);
  m.impl("batch_topk_compact", &batch_topk_compact_cpu);
  m.impl("batch_topk", &batch_topk_cpu);
  m.impl("batch_topk_bias", &batch_topk_bias_cpu);
  m.impl("batch_topk_bias_layers", &batch_topk_bias_layers_cpu);
  m.impl("threshold_compact", &threshold_compact_cpu);
  m.impl("bf16_split", &bf16_split_cpu);
  m.impl("screened_topk", &screened_topk_cpu);
  m.impl("screened_batch_topk", &screened_batch_topk_cpu);
}

}  // namespace fastclt
