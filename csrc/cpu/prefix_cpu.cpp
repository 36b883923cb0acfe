// CPU kernels of the per_source tying's sum over sources (fastclt/ops/ext/clt_decode.py; the math:
// fastclt/ops/reference/clt_decode.py, prefix_sum):
//   prefix_sum           parts [L, R, d], bias fp32 [L, d] or none -> y [R, L, d],
//                        y[r, l] = (parts[0, r] + ... + parts[l, r]) + bias[l]
//   prefix_sum_backward  grad [R, L, d] -> dparts [L, R, d], dparts[l, r] = grad[r, L-1] + ... + grad[r, l],
//                        and (need_bias) dbias fp32 [L, d] = sum_r grad[r, l]
// With cumulative = false each y[r, l] is parts[l, r] + bias[l] alone (parts[l, r] itself, copied,
// without a bias) and dparts[l, r] = grad[r, l]: the per_target tying's bias and token-major layout.
// parts and grad fp32 or bf16 (contiguous); the outputs in the input's dtype. Each sum runs in fp32,
// one term after another in the order written (the bias added last), and is rounded once: the
// reference's numbers, bit for bit. dbias: each chunk of kRows rows sums its rows in fp32, in row
// order; the chunks are added in chunk order in fp64 and rounded once: deterministic, whatever the
// thread count. One pass over the input and one over the output, where the reference makes L - 1
// adds into strided rows of the output and a separate sum for the bias (about 1 ms each way at the
// cpu-clt shape, [4, 1024, 256], on the 2-core Xeon).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <vector>

#include "checks.h"
#include "simd.h"

namespace fastclt {
namespace {

constexpr int64_t kRows = 64;  // rows per chunk (the unit of the threads' work and of dbias' partials)

// acc[c] += x[c] in fp32 (acc[c] = x[c] when first: the first term is taken as it is, as the
// reference copies it, so that a -0.0 stays -0.0).
template <typename T, typename Load>
FASTCLT_ALWAYS_INLINE void add_row_impl(float* __restrict__ acc, const T* __restrict__ x, int64_t d, bool first,
                                        Load load) {
  if (first) {
    for (int64_t c = 0; c < d; ++c) acc[c] = load(x[c]);
  } else {
    for (int64_t c = 0; c < d; ++c) acc[c] += load(x[c]);
  }
}

FASTCLT_SIMD_CLONES static void add_row(float* __restrict__ acc, const float* __restrict__ x, int64_t d, bool first) {
  add_row_impl(acc, x, d, first, [](float v) { return v; });
}

FASTCLT_SIMD_CLONES static void add_row_bf16(float* __restrict__ acc, const uint16_t* __restrict__ x, int64_t d,
                                             bool first) {
  add_row_impl(acc, x, d, first, simd::bf16_bits_to_f32);
}

inline void add_row(float* acc, const at::BFloat16* x, int64_t d, bool first) {
  add_row_bf16(acc, reinterpret_cast<const uint16_t*>(x), d, first);
}

// out[c] = T(acc[c] + bias[c]) (bias may be null).
template <typename T>
inline void store_row(T* __restrict__ out, const float* __restrict__ acc, const float* __restrict__ bias, int64_t d) {
  if (bias == nullptr) {
    for (int64_t c = 0; c < d; ++c) out[c] = T(acc[c]);
  } else {
    for (int64_t c = 0; c < d; ++c) out[c] = T(acc[c] + bias[c]);
  }
}

template <typename T>
void forward_impl(const T* parts, const float* bias, T* y, int64_t L, int64_t R, int64_t d, bool cumulative) {
  const int64_t n_chunks = (R + kRows - 1) / kRows;
#pragma omp parallel if (R * L * d > (int64_t(1) << 16))
  {
    std::vector<float> acc(d);
#pragma omp for schedule(static)
    for (int64_t ch = 0; ch < n_chunks; ++ch) {
      for (int64_t r = ch * kRows; r < std::min(R, (ch + 1) * kRows); ++r) {
        for (int64_t l = 0; l < L; ++l) {
          const T* p = parts + (l * R + r) * d;
          T* out = y + (r * L + l) * d;
          const float* b = bias == nullptr ? nullptr : bias + l * d;
          if (!cumulative && b == nullptr) {
            std::copy(p, p + d, out);  // bit for bit, NaN payloads included
          } else {  // not cumulative: every term is a first one
            add_row(acc.data(), p, d, !cumulative || l == 0);
            store_row(out, acc.data(), b, d);
          }
        }
      }
    }
  }
}

template <typename T>
void backward_impl(const T* grad, T* dparts, double* dbias, int64_t L, int64_t R, int64_t d, bool cumulative) {
  const int64_t n_chunks = (R + kRows - 1) / kRows, N = L * d;
  std::vector<float> part(dbias != nullptr ? n_chunks * N : 0, 0.f);  // [chunk, L * d]: the chunk's sums
#pragma omp parallel if (R * N > (int64_t(1) << 16))
  {
    std::vector<float> acc(d);
#pragma omp for schedule(static)
    for (int64_t ch = 0; ch < n_chunks; ++ch) {
      for (int64_t r = ch * kRows; r < std::min(R, (ch + 1) * kRows); ++r) {
        const T* g = grad + r * N;
        for (int64_t l = L - 1; l >= 0; --l) {
          T* out = dparts + (l * R + r) * d;
          if (!cumulative) {
            std::copy(g + l * d, g + (l + 1) * d, out);
            continue;
          }
          add_row(acc.data(), g + l * d, d, l == L - 1);
          store_row(out, acc.data(), nullptr, d);
        }
        if (dbias != nullptr) add_row(part.data() + ch * N, g, N, false);
      }
    }
  }
  if (dbias == nullptr) return;
  for (int64_t i = 0; i < N; ++i) {
    double s = 0.0;
    for (int64_t ch = 0; ch < n_chunks; ++ch) s += double(part[ch * N + i]);
    dbias[i] = s;
  }
}

void check_input(const at::Tensor& t, const char* op, const char* name, const char* layout) {
  TORCH_CHECK(t.device().is_cpu(), "fastclt::", op, ": ", name, " must be on the CPU, got ", t.device());
  TORCH_CHECK(t.dim() == 3, "fastclt::", op, ": ", name, " must be 3-D ", layout, ", got shape ", t.sizes());
  check_float_tensor(t, op, name);
}

at::Tensor prefix_sum_cpu(const at::Tensor& parts, const std::optional<at::Tensor>& bias, bool cumulative) {
  const char* op = "prefix_sum";
  check_input(parts, op, "parts", "[L, R, d]");
  const int64_t L = parts.size(0), R = parts.size(1), d = parts.size(2);
  if (bias.has_value()) {
    TORCH_CHECK(bias->device().is_cpu(), "fastclt::", op, ": bias must be on the CPU, got ", bias->device());
    TORCH_CHECK(bias->scalar_type() == at::kFloat, "fastclt::", op, ": bias must be float32, got ",
                bias->scalar_type());
    TORCH_CHECK(bias->dim() == 2 && bias->size(0) == L && bias->size(1) == d, "fastclt::", op,
                ": bias must have shape [L=", L, ", d=", d, "], got ", bias->sizes());
    TORCH_CHECK(bias->is_contiguous(), "fastclt::", op, ": bias must be contiguous");
  }
  auto y = new_output({R, L, d}, parts.options());
  if (y.numel() == 0) return y;
  dispatch_float(parts.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    forward_impl<T>(parts.data_ptr<T>(), bias.has_value() ? bias->data_ptr<float>() : nullptr, y.data_ptr<T>(), L, R,
                    d, cumulative);
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor> prefix_sum_backward_cpu(const at::Tensor& grad, bool need_bias, bool cumulative) {
  const char* op = "prefix_sum_backward";
  check_input(grad, op, "grad", "[R, L, d]");
  const int64_t R = grad.size(0), L = grad.size(1), d = grad.size(2);
  auto dparts = new_output({L, R, d}, grad.options());
  at::Tensor dbias = need_bias ? new_output({L, d}, grad.options().dtype(at::kFloat))
                                   : at::empty({0}, grad.options().dtype(at::kFloat));
  if (need_bias && R == 0) dbias.zero_();
  if (R == 0 || L * d == 0) return {dparts, dbias};
  std::vector<double> db(need_bias ? L * d : 0);
  dispatch_float(grad.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    backward_impl<T>(grad.data_ptr<T>(), dparts.data_ptr<T>(), need_bias ? db.data() : nullptr, L, R, d,
                     cumulative);
  });
  if (need_bias) {
    float* out = dbias.data_ptr<float>();
    for (int64_t i = 0; i < L * d; ++i) out[i] = float(db[i]);
  }
  return {dparts, dbias};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastclt, CPU, m) {
  m.impl("prefix_sum", &prefix_sum_cpu);
  m.impl("prefix_sum_backward", &prefix_sum_backward_cpu);
}

}  // namespace fastclt
