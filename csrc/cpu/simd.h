// Hot inner loops of the CPU kernels over one row of D columns, accumulating in fp32.
//
// On x86-64 Linux with GCC each is compiled three times (x86-64-v4: AVX-512; x86-64-v3: AVX2+FMA;
// baseline x86-64) and the loader picks one for the machine (target_clones / ifunc), so a source
// build stays portable without -march=native. The clones are the same source vectorised by the
// compiler (no -ffast-math), so they compute the same results; the AVX-512 clone made the decode
// backward's scatter ~10% faster on a 2-core Sapphire Rapids VM.
#pragma once

#include <c10/util/BFloat16.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <vector>

#include "checks.h"

// GCC on x86-64 Linux: the clones below and the AVX-512 candidate scan.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define FASTCLT_GCC_X86_LINUX 1
#endif

#ifdef FASTCLT_GCC_X86_LINUX
#define FASTCLT_SIMD_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default"), unused))
#else
#define FASTCLT_SIMD_CLONES
#endif
// The loop bodies are templates inlined into each clone; out of line they would be compiled once,
// for the baseline, and the AVX2 clone would call that.
#if defined(__GNUC__)
#define FASTCLT_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define FASTCLT_ALWAYS_INLINE inline
#endif

namespace fastclt {
namespace simd {

// The bits of a float and back (memcpy: no aliasing rules broken; compiles to a register move).
FASTCLT_ALWAYS_INLINE uint32_t f32_bits(float x) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof(u));
  return u;
}

FASTCLT_ALWAYS_INLINE float bits_f32(uint32_t u) {
  float x;
  std::memcpy(&x, &u, sizeof(x));
  return x;
}

FASTCLT_ALWAYS_INLINE float bf16_bits_to_f32(uint16_t b) {
  uint32_t u = uint32_t(b) << 16;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

// acc[d] += sum_j coef[j] * W[rows[j] * ld + d] for d < D (ld >= D: W's row stride): the gather-sum
// of both decode (rows = feature indices) and the scatter by feature (rows = token rows). Four rows per sweep over acc:
// one read-modify-write of acc per four gathered rows, and four independent row streams in flight
// (measured 1.5-2x faster than one row per sweep; a register-blocked column-slice loop was slower).
template <typename W_t, typename Load>
FASTCLT_ALWAYS_INLINE void gather_axpy_rows(float* __restrict__ acc, const W_t* __restrict__ W, const int64_t* __restrict__ rows,
                             const float* __restrict__ coef, int64_t n, int64_t D, int64_t ld, Load load) {
  int64_t j = 0;
  for (; j + 4 <= n; j += 4) {
    const W_t* __restrict__ w0 = W + rows[j] * ld;
    const W_t* __restrict__ w1 = W + rows[j + 1] * ld;
    const W_t* __restrict__ w2 = W + rows[j + 2] * ld;
    const W_t* __restrict__ w3 = W + rows[j + 3] * ld;
    const float c0 = coef[j], c1 = coef[j + 1], c2 = coef[j + 2], c3 = coef[j + 3];
    for (int64_t d = 0; d < D; ++d)
      acc[d] += c0 * load(w0[d]) + c1 * load(w1[d]) + c2 * load(w2[d]) + c3 * load(w3[d]);
  }
  for (; j < n; ++j) {
    const W_t* __restrict__ w = W + rows[j] * ld;
    const float c = coef[j];
    for (int64_t d = 0; d < D; ++d) acc[d] += c * load(w[d]);
  }
}

FASTCLT_SIMD_CLONES static void gather_axpy(float* __restrict__ acc, const float* __restrict__ W,
                                            const int64_t* __restrict__ rows, const float* __restrict__ coef,
                                            int64_t n, int64_t D, int64_t ld) {
  gather_axpy_rows(acc, W, rows, coef, n, D, ld, [](float x) { return x; });
}

FASTCLT_SIMD_CLONES static void gather_axpy_bf16(float* __restrict__ acc, const uint16_t* __restrict__ W,
                                                 const int64_t* __restrict__ rows, const float* __restrict__ coef,
                                                 int64_t n, int64_t D, int64_t ld) {
  gather_axpy_rows(acc, W, rows, coef, n, D, ld, bf16_bits_to_f32);
}

inline void gather_axpy(float* acc, const at::BFloat16* W, const int64_t* rows, const float* coef, int64_t n,
                        int64_t D, int64_t ld) {
  gather_axpy_bf16(acc, reinterpret_cast<const uint16_t*>(W), rows, coef, n, D, ld);
}

// Both halves of a decode backward for one feature f: acc[d] += sum_j coef[j] * X[rows[j] * ld + d]
// (dW_dec[f]) and dots[j] = <X[rows[j]], w> (dvalue, with w = W_dec[f]) in the same sweep, so each
// gathered X row is read once for both and w once per feature. Four rows per sweep, as above.
template <typename X_t, typename Load>
FASTCLT_ALWAYS_INLINE void gather_axpy_dot_rows(float* __restrict__ acc, const X_t* __restrict__ X,
                                                const int64_t* __restrict__ rows, const float* __restrict__ coef,
                                                const X_t* __restrict__ w, float* __restrict__ dots, int64_t n,
                                                int64_t D, int64_t ld, Load load) {
  int64_t j = 0;
  for (; j + 4 <= n; j += 4) {
    const X_t* __restrict__ x0 = X + rows[j] * ld;
    const X_t* __restrict__ x1 = X + rows[j + 1] * ld;
    const X_t* __restrict__ x2 = X + rows[j + 2] * ld;
    const X_t* __restrict__ x3 = X + rows[j + 3] * ld;
    const float c0 = coef[j], c1 = coef[j + 1], c2 = coef[j + 2], c3 = coef[j + 3];
    float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
    for (int64_t d = 0; d < D; ++d) {
      const float a0 = load(x0[d]), a1 = load(x1[d]), a2 = load(x2[d]), a3 = load(x3[d]), wd = load(w[d]);
      acc[d] += c0 * a0 + c1 * a1 + c2 * a2 + c3 * a3;
      s0 += a0 * wd;
      s1 += a1 * wd;
      s2 += a2 * wd;
      s3 += a3 * wd;
    }
    dots[j] = s0;
    dots[j + 1] = s1;
    dots[j + 2] = s2;
    dots[j + 3] = s3;
  }
  for (; j < n; ++j) {
    const X_t* __restrict__ x = X + rows[j] * ld;
    const float c = coef[j];
    float s = 0.f;
#pragma omp simd reduction(+ : s)
    for (int64_t d = 0; d < D; ++d) {
      const float a = load(x[d]);
      acc[d] += c * a;
      s += a * load(w[d]);
    }
    dots[j] = s;
  }
}

FASTCLT_SIMD_CLONES static void gather_axpy_dot(float* __restrict__ acc, const float* __restrict__ X,
                                                const int64_t* __restrict__ rows, const float* __restrict__ coef,
                                                const float* __restrict__ w, float* __restrict__ dots, int64_t n,
                                                int64_t D, int64_t ld) {
  gather_axpy_dot_rows(acc, X, rows, coef, w, dots, n, D, ld, [](float v) { return v; });
}

FASTCLT_SIMD_CLONES static void gather_axpy_dot_bf16(float* __restrict__ acc, const uint16_t* __restrict__ X,
                                                     const int64_t* __restrict__ rows, const float* __restrict__ coef,
                                                     const uint16_t* __restrict__ w, float* __restrict__ dots,
                                                     int64_t n, int64_t D, int64_t ld) {
  gather_axpy_dot_rows(acc, X, rows, coef, w, dots, n, D, ld, bf16_bits_to_f32);
}

inline void gather_axpy_dot(float* acc, const at::BFloat16* X, const int64_t* rows, const float* coef,
                            const at::BFloat16* w, float* dots, int64_t n, int64_t D, int64_t ld) {
  gather_axpy_dot_bf16(acc, reinterpret_cast<const uint16_t*>(X), rows, coef, reinterpret_cast<const uint16_t*>(w),
                       dots, n, D, ld);
}

// out[j] = sum_d g[d] * W[rows[j] * D + d] for j < n: the latent gradient of one token row. Four rows
// per sweep, as in gather_axpy (g is read once per four rows; four row streams in flight).
template <typename W_t, typename Load>
FASTCLT_ALWAYS_INLINE void gather_dot_rows(const W_t* __restrict__ g, const W_t* __restrict__ W, const int64_t* __restrict__ rows,
                            float* __restrict__ out, int64_t n, int64_t D, Load load) {
  int64_t j = 0;
  for (; j + 4 <= n; j += 4) {
    const W_t* __restrict__ w0 = W + rows[j] * D;
    const W_t* __restrict__ w1 = W + rows[j + 1] * D;
    const W_t* __restrict__ w2 = W + rows[j + 2] * D;
    const W_t* __restrict__ w3 = W + rows[j + 3] * D;
    float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
    for (int64_t d = 0; d < D; ++d) {
      const float x = load(g[d]);
      s0 += x * load(w0[d]);
      s1 += x * load(w1[d]);
      s2 += x * load(w2[d]);
      s3 += x * load(w3[d]);
    }
    out[j] = s0;
    out[j + 1] = s1;
    out[j + 2] = s2;
    out[j + 3] = s3;
  }
  for (; j < n; ++j) {
    const W_t* __restrict__ w = W + rows[j] * D;
    float s = 0.f;
#pragma omp simd reduction(+ : s)
    for (int64_t d = 0; d < D; ++d) s += load(g[d]) * load(w[d]);
    out[j] = s;
  }
}

FASTCLT_SIMD_CLONES static void gather_dot(const float* __restrict__ g, const float* __restrict__ W,
                                           const int64_t* __restrict__ rows, float* __restrict__ out, int64_t n,
                                           int64_t D) {
  gather_dot_rows(g, W, rows, out, n, D, [](float x) { return x; });
}

FASTCLT_SIMD_CLONES static void gather_dot_bf16(const uint16_t* __restrict__ g, const uint16_t* __restrict__ W,
                                                const int64_t* __restrict__ rows, float* __restrict__ out, int64_t n,
                                                int64_t D) {
  gather_dot_rows(g, W, rows, out, n, D, bf16_bits_to_f32);
}

inline void gather_dot(const at::BFloat16* g, const at::BFloat16* W, const int64_t* rows, float* out, int64_t n,
                       int64_t D) {
  gather_dot_bf16(reinterpret_cast<const uint16_t*>(g), reinterpret_cast<const uint16_t*>(W), rows, out, n, D);
}

// ---------------------------------------------------------------- selection scans (float keys)

// The selection scans read entry i of a row or tensor through src(i) -> float: x[i] widened to
// fp32, or (the CPU encoder's TopK with its bias folded in) x[i] + bias[i] in fp32.

// keymax[b] = the largest order-preserving key (float_key) of src(i), i in [b*block, min(n, (b+1)*block)).
// Returns nonzero when some entry is NaN (its key is then meaningless). One vectorised pass.
template <typename Src>
FASTCLT_ALWAYS_INLINE uint32_t block_key_max_src(Src src, int64_t n, int64_t block, uint32_t* __restrict__ keymax) {
  uint32_t nan = 0;
  for (int64_t b0 = 0, b = 0; b0 < n; b0 += block, ++b) {
    const int64_t end = std::min(n, b0 + block);
    uint32_t m = 0;
    for (int64_t i = b0; i < end; ++i) {
      const float v = src(i);
      const uint32_t key = float_key(v);
      m = key > m ? key : m;
      nan |= uint32_t(v != v);
    }
    keymax[b] = m;
  }
  return nan;
}

// A selection candidate: an entry's key and its (flat or in-row) index.
struct Candidate {
  uint32_t key;
  int64_t index;
};

// Selection order: larger key first; among equal keys, lower index first. A function object, so
// that std::nth_element inlines it (a function pointer is not inlined there).
struct RanksBefore {
  bool operator()(const Candidate& a, const Candidate& b) const {
    return a.key > b.key || (a.key == b.key && a.index < b.index);
  }
};

// Appends {key, base + i} for every i < n with float_key(src(i)) >= thr, in index order, scanning
// only the blocks of `block` entries whose maximum key (keymax, from block_key_max) is >= thr; x is
// the storage src reads (for prefetching only). Three things keep this pass, which reads about a
// quarter of h in BatchTopK, from costing more than the full first pass:
//   - the blocks to read are listed first, a chunk at a time, and each is prefetched a few blocks
//     ahead: they are scattered, and each read otherwise waits on memory;
//   - groups of 16 entries are tested by a vectorised OR first, so the cost follows the number of
//     candidates;
//   - a group that holds some is written without branches (every entry stored into a local buffer,
//     the count advanced by the comparison): which entries pass is data-dependent, and a branch per
//     entry mispredicts often.
template <typename Src, typename Elem>
FASTCLT_ALWAYS_INLINE void collect_at_least_src(Src src, const Elem* x, int64_t n, int64_t block,
                                                const uint32_t* __restrict__ keymax, uint32_t thr, int64_t base,
                                                std::vector<Candidate>& out) {
  constexpr int64_t G = 16, kChunk = 256, kAhead = 8, kBuf = 512, kLine = 64;
  int32_t chosen[kChunk];
  Candidate buf[kBuf];
  int64_t held = 0;
  auto flush = [&] {
    out.insert(out.end(), buf, buf + held);
    held = 0;
  };
  auto prefetch = [&](int64_t b) {
    const char* p = reinterpret_cast<const char*>(x + b * block);
    const int64_t bytes = std::min(block, n - b * block) * int64_t(sizeof(Elem));
    for (int64_t o = 0; o < bytes; o += kLine) __builtin_prefetch(p + o);
  };
  const int64_t n_blocks = (n + block - 1) / block;
  for (int64_t c0 = 0; c0 < n_blocks; c0 += kChunk) {
    const int64_t c1 = std::min(n_blocks, c0 + kChunk);
    int64_t m = 0;
    for (int64_t b = c0; b < c1; ++b) {
      chosen[m] = int32_t(b - c0);
      m += keymax[b] >= thr;
    }
    for (int64_t j = 0; j < std::min(m, kAhead); ++j) prefetch(c0 + chosen[j]);
    for (int64_t j = 0; j < m; ++j) {
      if (j + kAhead < m) prefetch(c0 + chosen[j + kAhead]);
      const int64_t b0 = (c0 + chosen[j]) * block, end = std::min(n, b0 + block);
      int64_t i0 = b0;
      for (; i0 + G <= end; i0 += G) {
        uint32_t any = 0;
        for (int64_t i = 0; i < G; ++i) any |= uint32_t(float_key(src(i0 + i)) >= thr);
        if (!any) continue;
        if (held + G > kBuf) flush();
        for (int64_t i = 0; i < G; ++i) {
          const uint32_t key = float_key(src(i0 + i));
          buf[held] = {key, base + i0 + i};
          held += key >= thr;
        }
      }
      for (; i0 < end; ++i0) {
        const uint32_t key = float_key(src(i0));
        if (held == kBuf) flush();
        buf[held] = {key, base + i0};
        held += key >= thr;
      }
    }
  }
  flush();
}

FASTCLT_SIMD_CLONES static uint32_t block_key_max(const float* x, int64_t n, int64_t block, uint32_t* keymax) {
  return block_key_max_src([x](int64_t i) { return x[i]; }, n, block, keymax);
}

FASTCLT_SIMD_CLONES static uint32_t block_key_max_bf16(const uint16_t* x, int64_t n, int64_t block,
                                                       uint32_t* keymax) {
  return block_key_max_src([x](int64_t i) { return bf16_bits_to_f32(x[i]); }, n, block, keymax);
}

inline uint32_t block_key_max(const at::BFloat16* x, int64_t n, int64_t block, uint32_t* keymax) {
  return block_key_max_bf16(reinterpret_cast<const uint16_t*>(x), n, block, keymax);
}

FASTCLT_SIMD_CLONES static uint32_t block_key_max(const float* x, const float* bias, int64_t n, int64_t block,
                                                  uint32_t* keymax) {
  return block_key_max_src([x, bias](int64_t i) { return x[i] + bias[i]; }, n, block, keymax);
}

FASTCLT_SIMD_CLONES static void collect_at_least(const float* x, int64_t n, int64_t block, const uint32_t* keymax,
                                                 uint32_t thr, int64_t base, std::vector<Candidate>& out) {
  collect_at_least_src([x](int64_t i) { return x[i]; }, x, n, block, keymax, thr, base, out);
}

FASTCLT_SIMD_CLONES static void collect_at_least_bf16(const uint16_t* x, int64_t n, int64_t block,
                                                      const uint32_t* keymax, uint32_t thr, int64_t base,
                                                      std::vector<Candidate>& out) {
  collect_at_least_src([x](int64_t i) { return bf16_bits_to_f32(x[i]); }, x, n, block, keymax, thr, base, out);
}

inline void collect_at_least(const at::BFloat16* x, int64_t n, int64_t block, const uint32_t* keymax, uint32_t thr,
                             int64_t base, std::vector<Candidate>& out) {
  collect_at_least_bf16(reinterpret_cast<const uint16_t*>(x), n, block, keymax, thr, base, out);
}

FASTCLT_SIMD_CLONES static void collect_at_least(const float* x, const float* bias, int64_t n, int64_t block,
                                                 const uint32_t* keymax, uint32_t thr, int64_t base,
                                                 std::vector<Candidate>& out) {
  collect_at_least_src([x, bias](int64_t i) { return x[i] + bias[i]; }, x, n, block, keymax, thr, base, out);
}

// Appends every i < n with load(x[i]) - load(t[i]) > bound (in fp32), in index order: the
// candidates of a threshold pattern (ReLU, JumpReLU with its band), for an exact test after (a NaN
// difference is a candidate too). Groups of 16 are tested by a vectorised OR first; the test
// compares float keys, integers, because GCC does not vectorise that reduction over float compares.
template <typename X, typename Load>
FASTCLT_ALWAYS_INLINE void collect_above_rows(const X* __restrict__ x, const X* __restrict__ t, int64_t n, float bound,
                                              std::vector<int32_t>& out, Load load) {
  constexpr int64_t G = 16;
  const uint32_t bound_key = float_key(bound);
  int64_t i0 = 0;
  for (; i0 + G <= n; i0 += G) {
    uint32_t any = 0;
    for (int64_t i = 0; i < G; ++i) any |= uint32_t(float_key(load(x[i0 + i]) - load(t[i0 + i])) > bound_key);
    if (!any) continue;
    for (int64_t i = 0; i < G; ++i)
      if (float_key(load(x[i0 + i]) - load(t[i0 + i])) > bound_key) out.push_back(int32_t(i0 + i));
  }
  for (; i0 < n; ++i0)
    if (float_key(load(x[i0]) - load(t[i0])) > bound_key) out.push_back(int32_t(i0));
}

FASTCLT_SIMD_CLONES static void collect_above(const float* x, const float* t, int64_t n, float bound,
                                              std::vector<int32_t>& out) {
  collect_above_rows(x, t, n, bound, out, [](float v) { return v; });
}

FASTCLT_SIMD_CLONES static void collect_above_bf16(const uint16_t* x, const uint16_t* t, int64_t n, float bound,
                                                   std::vector<int32_t>& out) {
  collect_above_rows(x, t, n, bound, out, bf16_bits_to_f32);
}

inline void collect_above(const at::BFloat16* x, const at::BFloat16* t, int64_t n, float bound,
                          std::vector<int32_t>& out) {
  collect_above_bf16(reinterpret_cast<const uint16_t*>(x), reinterpret_cast<const uint16_t*>(t), n, bound, out);
}

// ---------------------------------------------------------------- AVX-512 candidate scan

// BatchTopK's one pass under a sampled bound: the entries x[i] (+ bias[i]) whose float_key is >= thr,
// reading all of them, sixteen per step: one fp32 compare against key_float(thr) into a mask (the
// same test for every non-NaN entry: float_key is monotone and maps -0 and +0 alike), and only
// where the mask is not empty the keys and two compress-stores (keys, indices) — the compiler's
// vectorisation of the scalar scans stops at the per-entry test and store, which made a full scan
// by them ~2x slower than a pass of block maxima. The hits wait in a ScanBuffer that spans any number
// of calls (the rows of one part of h) and goes to `out` 512 at a time; `total` counts the
// candidates of all the buffers sharing it, checked at each flush: past `cap` the scan stops and
// returns false (the bound was far too low: the caller falls back). nan |= 1 when some entry is
// NaN. Only where the CPU has AVX-512F (has_avx512_scan); GCC on x86-64 Linux, like the clones.
#ifdef FASTCLT_GCC_X86_LINUX
#define FASTCLT_AVX512_SCAN 1
}  // namespace simd
}  // namespace fastclt
#include <immintrin.h>
namespace fastclt {
namespace simd {

inline bool has_avx512_scan() {
  static const bool yes = __builtin_cpu_supports("avx512f");
  return yes;
}

struct ScanBuffer {
  static constexpr int64_t kSize = 512;
  alignas(64) uint32_t keys[kSize + 16];
  alignas(64) int32_t offs[kSize + 16];  // relative to `from`
  int64_t held = 0, from = 0;
  std::vector<Candidate>* out;
  std::atomic<int64_t>* total;
  int64_t cap;

  ScanBuffer(std::vector<Candidate>& out_, std::atomic<int64_t>& total_, int64_t cap_)
      : out(&out_), total(&total_), cap(cap_) {}
  // Hands the held candidates to `out`; false once all buffers together passed `cap`.
  bool flush() {
    for (int64_t j = 0; j < held; ++j) out->push_back({keys[j], from + offs[j]});
    const bool ok = total->fetch_add(held, std::memory_order_relaxed) + held <= cap;
    held = 0;
    return ok;
  }
  // Room for 16 more candidates at absolute positions up to pos + 15 (flushing first if needed).
  bool make_room(int64_t pos) {
    if (held + 16 <= kSize && pos + 16 - from <= INT32_MAX) return true;
    const bool ok = held == 0 || flush();
    from = pos;
    return ok;
  }
};

template <bool kBias>
__attribute__((target("avx512f"))) FASTCLT_ALWAYS_INLINE __m512 load16(const float* __restrict__ x,
                                                                     const float* __restrict__ bias, int64_t i) {
  const __m512 v = _mm512_loadu_ps(x + i);
  if constexpr (kBias) return _mm512_add_ps(v, _mm512_loadu_ps(bias + i));
  return v;
}

// In chunks of 64 vectors: first the compares alone, each vector's offset appended to a list
// without a branch (the list grows by one where the mask is not empty); then the listed vectors,
// read again from L1, compress-stored — instead of a branch per vector on its mask, taken at random
// for ~6% of the vectors at k_total = numel / 256. With the fp32 compare and the buffer across
// rows, the scan of a [1024, 4096] layer went from about 0.57 to 0.47 ms on two threads (2-core
// Xeon; each change alone within the noise).
template <bool kBias>
__attribute__((target("avx512f"))) bool collect_all_at_least_avx512(
    const float* __restrict__ x, const float* __restrict__ bias, int64_t n, uint32_t thr, int64_t base,
    ScanBuffer& buf, uint32_t& nan) {
  constexpr int64_t kChunk = 64;
  const __m512 vthr = _mm512_set1_ps(key_float(thr));
  const __m512i sign = _mm512_set1_epi32(int32_t(0x80000000u));
  const __m512i lanes = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  alignas(64) int32_t hit[kChunk];
  __mmask16 bad = 0;
  int64_t i = 0;
  const int64_t n16 = n - n % 16;
  while (i < n16) {
    const int64_t stop = std::min(n16, i + 16 * kChunk);
    int64_t n_hit = 0;
    for (int64_t j = i; j < stop; j += 16) {
      const __m512 v = load16<kBias>(x, bias, j);
      bad = _kor_mask16(bad, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q));
      hit[n_hit] = int32_t(j - i);
      n_hit += _mm512_cmp_ps_mask(v, vthr, _CMP_GE_OQ) != 0;
    }
    for (int64_t t = 0; t < n_hit; ++t) {
      const int64_t j = i + hit[t];
      // -0 + +0 = +0, as float_key
      const __m512 v = _mm512_add_ps(load16<kBias>(x, bias, j), _mm512_setzero_ps());
      const __mmask16 m = _mm512_cmp_ps_mask(v, vthr, _CMP_GE_OQ);
      if (!buf.make_room(base + j)) return false;
      const __m512i u = _mm512_castps_si512(v);
      const __m512i key = _mm512_xor_si512(u, _mm512_or_si512(_mm512_srai_epi32(u, 31), sign));
      _mm512_mask_compressstoreu_epi32(buf.keys + buf.held, m, key);
      _mm512_mask_compressstoreu_epi32(buf.offs + buf.held, m,
                                       _mm512_add_epi32(lanes, _mm512_set1_epi32(int32_t(base + j - buf.from))));
      buf.held += __builtin_popcount(uint32_t(m));
    }
    i = stop;
  }
  uint32_t tail_bad = 0;
  for (; i < n; ++i) {
    const float v = kBias ? x[i] + bias[i] : x[i];
    tail_bad |= uint32_t(v != v);
    const uint32_t key = float_key(v);
    if (key < thr) continue;
    if (!buf.make_room(base + i)) return false;
    buf.keys[buf.held] = key;
    buf.offs[buf.held++] = int32_t(base + i - buf.from);
  }
  nan |= uint32_t(bad != 0) | tail_bad;
  return true;
}
#endif

}  // namespace simd
}  // namespace fastclt
