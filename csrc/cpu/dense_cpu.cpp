// CPU kernels of a dense JumpReLU with the band mask of its backward (fastclt/ops/ext/dense.py has the
// autograd wrapper; fastclt/ops/reference/activation.py the math), one memory pass each way:
//   jumprelu_dense           h [B, F], θ fp32 [F], half_band -> value = h·1[h > θ], stored = active | band,
//                            code uint8 (bit0 = active, bit1 = band)
//   jumprelu_dense_backward  grad, code -> dh = grad·bit0, dθ[f] = (−θ[f]/ε)·Σ_b grad[b, f]·bit1 (fp32)
//
// With h in dtype T (float32 or bfloat16) and θ_T = θ rounded to T (θ itself for fp32):
//   active = h > θ_T;  band = |T(h − θ_T)| < T(half_band), the difference taken in fp32 and rounded
//   to T (one rounding), half_band rounded to T
// — exactly PyTorch's `u = h - θ.to(h.dtype); u > 0; u.abs() < half_band` (a Python scalar is
// compared in the tensor's dtype), i.e. `band_mask(h, θ.to(h.dtype), 2·half_band)`. The value and
// dh are products with the 0/1 mask, as `h * active` and `g * active` are: NaN and ±Inf outside the
// mask give NaN there, as in PyTorch, and the band sum sees grad·bit1 the same way.
//
// The forward is elementwise (rows in parallel). The backward walks tiles of one row chunk
// (max(kMinRowChunk, ⌈B / kMaxRowChunks⌉) rows) by kColBlock columns: each tile writes its dh and
// sums its rows' grad·bit1 per column, in row order, into its row chunk's partial row; the partials
// are then added in chunk order. The chunk size depends on B only, so dθ is bit-identical whatever
// the thread count (and with or without dh).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstring>
#include <tuple>
#include <vector>

#include "checks.h"
#include "simd.h"

namespace fastclt {
namespace {

constexpr const char* kFwd = "jumprelu_dense";
constexpr const char* kBwd = "jumprelu_dense_backward";
constexpr int64_t kColBlock = 512;     // columns per backward tile (its fp32 band sums stay in L1)
constexpr int64_t kMaxRowChunks = 64;  // row chunks of the backward's band sums, at most
constexpr int64_t kMinRowChunk = 64;   // rows per chunk, at least
constexpr int64_t kGrain = 16384;      // elements per parallel task, about

// x rounded to the nearest bfloat16 (ties to even), widened back to fp32: c10::BFloat16's rounding
// for every non-NaN x, branch-free so that it vectorises (the callers mask NaN themselves).
FASTCLT_ALWAYS_INLINE float round_bf16(float x) {
  const uint32_t u = simd::f32_bits(x);
  return simd::bits_f32((u + 0x7FFFu + ((u >> 16) & 1u)) & 0xFFFF0000u);
}

// One row of the forward. The stores of value are products with 1 or 0: exact, so a bfloat16 result
// is the top half of the fp32 product's bits (a NaN keeps a nonzero payload there).
template <typename T, typename Load, typename Store>
FASTCLT_ALWAYS_INLINE void forward_row_impl(const T* __restrict__ h, const float* __restrict__ th, float half,
                                            int64_t F, T* __restrict__ value, uint8_t* __restrict__ stored,
                                            uint8_t* __restrict__ code, bool bf16, Load load, Store store) {
  for (int64_t f = 0; f < F; ++f) {
    const float x = load(h[f]), t = th[f];
    const float d = x - t;
    const float r = bf16 ? round_bf16(d) : d;
    // (ternaries, not bool arithmetic: GCC 12 vectorises this form)
    const uint8_t act = x > t ? 1 : 0;
    const uint8_t band = std::fabs(r) < half && d == d ? 2 : 0;  // d NaN: no band (r need not be NaN)
    value[f] = store(x * (x > t ? 1.f : 0.f));
    stored[f] = (act | band) != 0;
    code[f] = act | band;
  }
}

FASTCLT_SIMD_CLONES static void forward_row(const float* __restrict__ h, const float* __restrict__ th, float half,
                                            int64_t F, float* __restrict__ value, uint8_t* __restrict__ stored,
                                            uint8_t* __restrict__ code) {
  forward_row_impl(h, th, half, F, value, stored, code, false, [](float v) { return v; }, [](float v) { return v; });
}

FASTCLT_SIMD_CLONES static void forward_row_bf16(const uint16_t* __restrict__ h, const float* __restrict__ th,
                                                 float half, int64_t F, uint16_t* __restrict__ value,
                                                 uint8_t* __restrict__ stored, uint8_t* __restrict__ code) {
  forward_row_impl(h, th, half, F, value, stored, code, true, simd::bf16_bits_to_f32,
                   [](float v) { return uint16_t(simd::f32_bits(v) >> 16); });
}

// One backward tile: `rows` rows of n columns (row stride F) from g and code; dh = g·bit0 (when dh),
// acc[c] = Σ_rows g·bit1 in row order (when acc; overwritten, not accumulated).
template <typename T, typename Load, typename Store>
FASTCLT_ALWAYS_INLINE void backward_tile_impl(const T* __restrict__ g, const uint8_t* __restrict__ code, int64_t F,
                                              int64_t rows, int64_t n, T* __restrict__ dh, float* __restrict__ acc,
                                              Load load, Store store) {
  if (acc) {
    for (int64_t c = 0; c < n; ++c) acc[c] = 0.f;
  }
  for (int64_t r = 0; r < rows; ++r) {
    const T* __restrict__ gr = g + r * F;
    const uint8_t* __restrict__ cr = code + r * F;
    if (dh && acc) {
      T* __restrict__ dr = dh + r * F;
      for (int64_t c = 0; c < n; ++c) {
        const float x = load(gr[c]);
        const uint8_t k = cr[c];
        dr[c] = store(x * (k & 1u ? 1.f : 0.f));
        acc[c] += x * (k & 2u ? 1.f : 0.f);
      }
    } else if (dh) {
      T* __restrict__ dr = dh + r * F;
      for (int64_t c = 0; c < n; ++c) dr[c] = store(load(gr[c]) * (cr[c] & 1u ? 1.f : 0.f));
    } else {
      for (int64_t c = 0; c < n; ++c) acc[c] += load(gr[c]) * (cr[c] & 2u ? 1.f : 0.f);
    }
  }
}

FASTCLT_SIMD_CLONES static void backward_tile(const float* __restrict__ g, const uint8_t* __restrict__ code,
                                              int64_t F, int64_t rows, int64_t n, float* __restrict__ dh,
                                              float* __restrict__ acc) {
  backward_tile_impl(g, code, F, rows, n, dh, acc, [](float v) { return v; }, [](float v) { return v; });
}

FASTCLT_SIMD_CLONES static void backward_tile_bf16(const uint16_t* __restrict__ g, const uint8_t* __restrict__ code,
                                                   int64_t F, int64_t rows, int64_t n, uint16_t* __restrict__ dh,
                                                   float* __restrict__ acc) {
  backward_tile_impl(g, code, F, rows, n, dh, acc, simd::bf16_bits_to_f32,
                     [](float v) { return uint16_t(simd::f32_bits(v) >> 16); });
}

void check_cpu_matrix(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.dim() == 2, "fastclt::", op, ": ", name, " must be 2-D [B, F], got shape ", t.sizes());
  TORCH_CHECK(t.device().is_cpu(), "fastclt::", op, ": ", name, " must be on the CPU, got ", t.device());
  check_float_tensor(t, op, name);
}

void check_threshold(const at::Tensor& threshold, int64_t F, const char* op) {
  TORCH_CHECK(threshold.dim() == 1 && threshold.size(0) == F, "fastclt::", op, ": threshold must have shape [F=", F,
              "], got ", threshold.sizes());
  TORCH_CHECK(threshold.device().is_cpu(), "fastclt::", op, ": threshold must be on the CPU, got ",
              threshold.device());
  TORCH_CHECK(threshold.scalar_type() == at::kFloat, "fastclt::", op, ": threshold must be float32, got ",
              threshold.scalar_type());
  TORCH_CHECK(threshold.is_contiguous(), "fastclt::", op, ": threshold must be contiguous");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> jumprelu_dense_cpu(const at::Tensor& h, const at::Tensor& threshold,
                                                                  double half_band) {
  check_cpu_matrix(h, kFwd, "h");
  const int64_t B = h.size(0), F = h.size(1);
  check_threshold(threshold, F, kFwd);
  TORCH_CHECK(std::isfinite(half_band) && half_band >= 0, "fastclt::", kFwd,
              ": half_band must be a finite number >= 0, got ", half_band);
  const bool bf16 = h.scalar_type() == at::kBFloat16;
  auto value = new_output(h.sizes(), h.options());
  auto stored = new_output(h.sizes(), h.options().dtype(at::kBool));
  auto code = new_output(h.sizes(), h.options().dtype(at::kByte));
  if (B == 0 || F == 0) return {value, stored, code};
  // θ and half_band in h's dtype, as PyTorch compares them (see the top of the file)
  const float* thp = threshold.data_ptr<float>();
  std::vector<float> th_rounded;
  float half = float(half_band);
  if (bf16) {
    th_rounded.resize(F);
    for (int64_t f = 0; f < F; ++f) th_rounded[f] = float(c10::BFloat16(thp[f]));
    thp = th_rounded.data();
    half = float(c10::BFloat16(half));
  }
  uint8_t* sp = reinterpret_cast<uint8_t*>(stored.data_ptr<bool>());
  uint8_t* cp = code.data_ptr<uint8_t>();
  const void* hp = h.data_ptr();
  void* vp = value.data_ptr();
  at::parallel_for(0, B, std::max<int64_t>(1, kGrain / F), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      if (bf16) {
        forward_row_bf16(static_cast<const uint16_t*>(hp) + b * F, thp, half, F, static_cast<uint16_t*>(vp) + b * F,
                         sp + b * F, cp + b * F);
      } else {
        forward_row(static_cast<const float*>(hp) + b * F, thp, half, F, static_cast<float*>(vp) + b * F, sp + b * F,
                    cp + b * F);
      }
    }
  });
  return {value, stored, code};
}

std::tuple<at::Tensor, at::Tensor> jumprelu_dense_backward_cpu(const at::Tensor& grad, const at::Tensor& code,
                                                               const at::Tensor& threshold, double bandwidth,
                                                               bool need_h, bool need_threshold) {
  check_cpu_matrix(grad, kBwd, "grad");
  const int64_t B = grad.size(0), F = grad.size(1);
  TORCH_CHECK(code.scalar_type() == at::kByte, "fastclt::", kBwd, ": code must be uint8, got ", code.scalar_type());
  TORCH_CHECK(code.sizes() == grad.sizes(), "fastclt::", kBwd, ": code must have grad's shape ", grad.sizes(),
              ", got ", code.sizes());
  TORCH_CHECK(code.device().is_cpu(), "fastclt::", kBwd, ": code must be on the CPU, got ", code.device());
  TORCH_CHECK(code.is_contiguous(), "fastclt::", kBwd, ": code must be contiguous");
  check_threshold(threshold, F, kBwd);
  TORCH_CHECK(std::isfinite(bandwidth) && bandwidth > 0, "fastclt::", kBwd,
              ": bandwidth must be a finite number > 0, got ", bandwidth);
  const bool bf16 = grad.scalar_type() == at::kBFloat16;
  at::Tensor dh = need_h ? new_output(grad.sizes(), grad.options()) : at::empty({0}, grad.options());
  at::Tensor dthreshold = need_threshold ? new_output({F}, threshold.options()) : at::empty({0}, threshold.options());
  if (!need_h && !need_threshold) return {dh, dthreshold};

  // Row chunks: a function of B alone (never of the thread count), so dθ's sums are fixed.
  const int64_t row_chunk = std::max(kMinRowChunk, (B + kMaxRowChunks - 1) / kMaxRowChunks);
  const int64_t n_rc = (B + row_chunk - 1) / row_chunk;
  const int64_t n_cb = (F + kColBlock - 1) / kColBlock;
  std::vector<float> partial(need_threshold ? n_rc * F : 0);  // [row chunk, F]
  const uint8_t* cp = code.data_ptr<uint8_t>();
  const void* gp = grad.data_ptr();
  void* dp = need_h ? dh.data_ptr() : nullptr;
  const int64_t tile = std::min(row_chunk, B) * std::min(kColBlock, F);
  at::parallel_for(0, n_rc * n_cb, std::max<int64_t>(1, kGrain / std::max<int64_t>(1, tile)), [&](int64_t t0,
                                                                                                   int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t rc = t / n_cb, cb = t % n_cb;
      const int64_t r0 = rc * row_chunk, rows = std::min(B, r0 + row_chunk) - r0;
      const int64_t c0 = cb * kColBlock, n = std::min(F, c0 + kColBlock) - c0;
      const int64_t off = r0 * F + c0;
      float* acc = need_threshold ? partial.data() + rc * F + c0 : nullptr;
      if (bf16) {
        backward_tile_bf16(static_cast<const uint16_t*>(gp) + off, cp + off, F, rows, n,
                           dp ? static_cast<uint16_t*>(dp) + off : nullptr, acc);
      } else {
        backward_tile(static_cast<const float*>(gp) + off, cp + off, F, rows, n,
                      dp ? static_cast<float*>(dp) + off : nullptr, acc);
      }
    }
  });
  if (need_threshold) {
    const float* thp = threshold.data_ptr<float>();
    float* out = dthreshold.data_ptr<float>();
    const float eps = float(bandwidth);
    // each column's partials added in chunk order (B = 0: no chunks, dθ = 0·(−θ/ε))
    at::parallel_for(0, F, std::max<int64_t>(1, kGrain / std::max<int64_t>(1, n_rc)), [&](int64_t f0, int64_t f1) {
      for (int64_t f = f0; f < f1; ++f) {
        float s = 0.f;
        for (int64_t rc = 0; rc < n_rc; ++rc) s += partial[rc * F + f];
        out[f] = s * (-thp[f] / eps);
      }
    });
  }
  return {dh, dthreshold};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastclt, CPU, m) {
  m.impl("jumprelu_dense", &jumprelu_dense_cpu);
  m.impl("jumprelu_dense_backward", &jumprelu_dense_backward_cpu);
}

}  // namespace fastclt
