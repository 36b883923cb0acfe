// CPU kernels of the Matryoshka prefix errors (fastclt/ops/matryoshka.py has the math):
//   prefix_errors_forward   sq[g, m] = sum_b ||E_g[b, m]||^2 with E_g = y - base - (blocks[0] + ... + blocks[g]),
//                           y_hat = y - E_{G-1} (the full reconstruction)
//   prefix_errors_backward  dy, dbase, dblocks of sum_{g, m} dsq[g, m] * sq[g, m]
// y: [B, M, d], base: [M, d] (the same for every token: b_dec) or [B, M, d] (b_dec + a skip term),
// blocks: [G, B, M, d]; fp32 throughout.
//
// One pass over the tensors each way instead of a few whole-tensor passes per prefix: each (token,
// middle index) row keeps its running error e (d floats) in cache while the G blocks are applied
// (forward: e -= blocks[g]; backward, from the last prefix: grad += 2 dsq[g] e, dblocks[g] = -grad,
// e += blocks[g]). Token rows are cut into fixed chunks; the sums over tokens (sq, a shared base's
// gradient) are per-chunk partials added in chunk order: deterministic and independent of the
// thread count.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <vector>

#include "checks.h"
#include "simd.h"

namespace fastclt {
namespace {

constexpr const char* kFwd = "prefix_errors_forward";
constexpr const char* kBwd = "prefix_errors_backward";
constexpr int64_t kChunk = 16;  // token rows per chunk of the sums over tokens

// e = y - base; then for each g: e -= blocks_g, sq[g] = sum e^2; y_hat = y - e. Row of d floats.
FASTCLT_SIMD_CLONES static void forward_row(const float* __restrict__ y, const float* __restrict__ base,
                                            const float* __restrict__ blocks, int64_t block_stride, int64_t G,
                                            int64_t d, float* __restrict__ e, double* __restrict__ sq,
                                            float* __restrict__ y_hat) {
  for (int64_t c = 0; c < d; ++c) e[c] = y[c] - base[c];
  for (int64_t g = 0; g < G; ++g) {
    const float* bl = blocks + g * block_stride;
    float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f, s4 = 0.f, s5 = 0.f, s6 = 0.f, s7 = 0.f;
    int64_t c = 0;
    for (; c + 8 <= d; c += 8) {  // eight running sums: vectorised without reassociation
      float v0 = e[c] - bl[c], v1 = e[c + 1] - bl[c + 1], v2 = e[c + 2] - bl[c + 2], v3 = e[c + 3] - bl[c + 3];
      float v4 = e[c + 4] - bl[c + 4], v5 = e[c + 5] - bl[c + 5], v6 = e[c + 6] - bl[c + 6];
      float v7 = e[c + 7] - bl[c + 7];
      e[c] = v0, e[c + 1] = v1, e[c + 2] = v2, e[c + 3] = v3, e[c + 4] = v4, e[c + 5] = v5, e[c + 6] = v6;
      e[c + 7] = v7;
      s0 += v0 * v0, s1 += v1 * v1, s2 += v2 * v2, s3 += v3 * v3, s4 += v4 * v4, s5 += v5 * v5, s6 += v6 * v6;
      s7 += v7 * v7;
    }
    double s = ((double(s0) + s1) + (double(s2) + s3)) + ((double(s4) + s5) + (double(s6) + s7));
    for (; c < d; ++c) {
      e[c] -= bl[c];
      s += double(e[c]) * e[c];
    }
    sq[g] += s;
  }
  for (int64_t c = 0; c < d; ++c) y_hat[c] = y[c] - e[c];
}

// From the full error e = y - base - sum_g blocks_g: for g = G-1 .. 0: grad += coef[g] e,
// dblocks_g = -grad, e += blocks_g; then dy = grad and dbase (+)= -grad.
FASTCLT_SIMD_CLONES static void backward_row(const float* __restrict__ y, const float* __restrict__ base,
                                             const float* __restrict__ blocks, int64_t block_stride, int64_t G,
                                             int64_t d, const float* __restrict__ coef, float* __restrict__ e,
                                             float* __restrict__ grad, float* __restrict__ dblocks, float* __restrict__ dy,
                                             float* __restrict__ dbase, bool dbase_accumulate) {
  for (int64_t c = 0; c < d; ++c) e[c] = y[c] - base[c];
  for (int64_t g = 0; g < G; ++g) {
    const float* bl = blocks + g * block_stride;
    for (int64_t c = 0; c < d; ++c) e[c] -= bl[c];
  }
  for (int64_t c = 0; c < d; ++c) grad[c] = 0.f;
  for (int64_t g = G - 1; g >= 0; --g) {
    const float* bl = blocks + g * block_stride;
    const float k = coef[g];
    for (int64_t c = 0; c < d; ++c) {
      grad[c] += k * e[c];
      e[c] += bl[c];
    }
    if (dblocks) {
      float* db = dblocks + g * block_stride;
      for (int64_t c = 0; c < d; ++c) db[c] = -grad[c];
    }
  }
  if (dy)
    for (int64_t c = 0; c < d; ++c) dy[c] = grad[c];
  if (dbase) {
    if (dbase_accumulate) {
      for (int64_t c = 0; c < d; ++c) dbase[c] -= grad[c];
    } else {
      for (int64_t c = 0; c < d; ++c) dbase[c] = -grad[c];
    }
  }
}

void check_f32(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "fastclt::", op, ": ", name, " must be on the CPU, got ", t.device());
  TORCH_CHECK(t.scalar_type() == at::kFloat, "fastclt::", op, ": ", name, " must be float32, got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), "fastclt::", op, ": ", name, " must be contiguous");
}

// (B, M, d, G, per-token base) after checking the shapes.
std::tuple<int64_t, int64_t, int64_t, int64_t, bool> check_args(const at::Tensor& y, const at::Tensor& base,
                                                                 const at::Tensor& blocks, const char* op) {
  check_f32(y, op, "y");
  check_f32(base, op, "base");
  check_f32(blocks, op, "blocks");
  TORCH_CHECK(y.dim() == 3, "fastclt::", op, ": y must be [B, M, d], got ", y.sizes());
  const int64_t B = y.size(0), M = y.size(1), d = y.size(2);
  TORCH_CHECK(blocks.dim() == 4 && blocks.size(1) == B && blocks.size(2) == M && blocks.size(3) == d,
              "fastclt::", op, ": blocks must be [G, B=", B, ", M=", M, ", d=", d, "], got ", blocks.sizes());
  const bool per_token = base.dim() == 3;
  TORCH_CHECK((base.dim() == 2 && base.size(0) == M && base.size(1) == d) || (per_token && base.sizes() == y.sizes()),
              "fastclt::", op, ": base must be [M=", M, ", d=", d, "] or [B, M, d] like y, got ", base.sizes());
  return {B, M, d, blocks.size(0), per_token};
}

std::tuple<at::Tensor, at::Tensor> prefix_errors_forward_cpu(const at::Tensor& y, const at::Tensor& base,
                                                             const at::Tensor& blocks) {
  auto [B, M, d, G, per_token] = check_args(y, base, blocks, kFwd);
  auto y_hat = new_output(y.sizes(), y.options());
  const int64_t n_chunks = (B + kChunk - 1) / kChunk;
  std::vector<double> partial(n_chunks * G * M, 0.0);  // [chunk, M, G]
  const float* yp = y.data_ptr<float>();
  const float* bp = base.data_ptr<float>();
  const float* blp = blocks.data_ptr<float>();
  float* yh = y_hat.data_ptr<float>();
  const int64_t block_stride = B * M * d;
#pragma omp parallel
  {
    std::vector<float> e(d);
#pragma omp for schedule(static)
    for (int64_t ch = 0; ch < n_chunks; ++ch)
      for (int64_t b = ch * kChunk; b < std::min(B, (ch + 1) * kChunk); ++b)
        for (int64_t m = 0; m < M; ++m) {
          const int64_t row = (b * M + m) * d;
          forward_row(yp + row, bp + (per_token ? row : m * d), blp + row, block_stride, G, d, e.data(),
                      partial.data() + (ch * M + m) * G, yh + row);
        }
  }
  auto sq = new_output({G, M}, y.options());
  float* sp = sq.data_ptr<float>();
  for (int64_t g = 0; g < G; ++g)
    for (int64_t m = 0; m < M; ++m) {
      double s = 0.0;
      for (int64_t ch = 0; ch < n_chunks; ++ch) s += partial[(ch * M + m) * G + g];
      sp[g * M + m] = float(s);
    }
  return {sq, y_hat};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> prefix_errors_backward_cpu(
    const at::Tensor& y, const at::Tensor& base, const at::Tensor& blocks, const at::Tensor& dsq, bool need_y,
    bool need_base, bool need_blocks) {
  auto [B, M, d, G, per_token] = check_args(y, base, blocks, kBwd);
  check_f32(dsq, kBwd, "dsq");
  TORCH_CHECK(dsq.dim() == 2 && dsq.size(0) == G && dsq.size(1) == M, "fastclt::", kBwd, ": dsq must be [G=", G,
              ", M=", M, "], got ", dsq.sizes());
  std::vector<float> coef(M * G);  // [m, g]: d(dsq . sq)/dE_g = 2 dsq[g, m] E_g
  const float* dp = dsq.data_ptr<float>();
  for (int64_t g = 0; g < G; ++g)
    for (int64_t m = 0; m < M; ++m) coef[m * G + g] = 2.f * dp[g * M + m];
  at::Tensor dy, dbase, dblocks;
  if (need_y) dy = new_output(y.sizes(), y.options());
  if (need_blocks) dblocks = new_output(blocks.sizes(), blocks.options());
  const int64_t n_chunks = (B + kChunk - 1) / kChunk;
  std::vector<float> base_partial;  // [chunk, M, d] for a base shared by every token
  if (need_base) {
    if (per_token) {
      dbase = new_output(base.sizes(), base.options());
    } else {
      base_partial.assign(n_chunks * M * d, 0.f);
    }
  }
  const float* yp = y.data_ptr<float>();
  const float* bp = base.data_ptr<float>();
  const float* blp = blocks.data_ptr<float>();
  float* dyp = need_y ? dy.data_ptr<float>() : nullptr;
  float* dbl = need_blocks ? dblocks.data_ptr<float>() : nullptr;
  float* dbp = need_base && per_token ? dbase.data_ptr<float>() : nullptr;
  const int64_t block_stride = B * M * d;
#pragma omp parallel
  {
    std::vector<float> e(d), grad(d);
#pragma omp for schedule(static)
    for (int64_t ch = 0; ch < n_chunks; ++ch)
      for (int64_t b = ch * kChunk; b < std::min(B, (ch + 1) * kChunk); ++b)
        for (int64_t m = 0; m < M; ++m) {
          const int64_t row = (b * M + m) * d;
          float* db = !need_base ? nullptr : per_token ? dbp + row : base_partial.data() + (ch * M + m) * d;
          backward_row(yp + row, bp + (per_token ? row : m * d), blp + row, block_stride, G, d, coef.data() + m * G,
                       e.data(), grad.data(), dbl ? dbl + row : nullptr, dyp ? dyp + row : nullptr, db,
                       !per_token);
        }
  }
  if (need_base && !per_token) {
    dbase = new_output(base.sizes(), base.options());
    float* out = dbase.data_ptr<float>();
    for (int64_t i = 0; i < M * d; ++i) {
      float s = 0.f;
      for (int64_t ch = 0; ch < n_chunks; ++ch) s += base_partial[ch * M * d + i];
      out[i] = s;
    }
  }
  auto none = at::empty({0}, y.options());
  return {need_y ? dy : none, need_base ? dbase : none, need_blocks ? dblocks : none};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastclt, CPU, m) {
  m.impl("prefix_errors_forward", &prefix_errors_forward_cpu);
  m.impl("prefix_errors_backward", &prefix_errors_backward_cpu);
}

}  // namespace fastclt
