// CPU kernel of the total variance that normalises the reconstruction losses (FVU, AuxK):
//   total_variance   tv[m] = sum_b ||y[b, m] - ybar[m]||^2,  ybar[m] = mean_b y[b, m]
// y: [B, M, d] fp32 (contiguous); tv: fp32 [M]. Two reads of y and no temporary of its size, where
// the PyTorch formulation (fastclt/ops/reference/losses.py) writes y - ybar and its square: 0.33 and
// 0.42 ms against 0.70 and 0.87 ms at [1024, 4, 256] and [2048, 1, 768] on the 2-core Xeon. The
// column sums in fp64, each row's squared deviations in fp32 lanes then fp64; sums over fixed chunks
// of token rows added in chunk order: deterministic, independent of the thread count.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <vector>

#include "checks.h"
#include "simd.h"

namespace fastclt {
namespace {

constexpr int64_t kRows = 64;  // token rows per chunk

// acc[i] += y[i] for i < n, in fp64.
FASTCLT_SIMD_CLONES static void add_f64(double* __restrict__ acc, const float* __restrict__ y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) acc[i] += double(y[i]);
}

// sum_c (y[c] - mean[c])^2 over d entries (mean: the column means, or for fvu_terms y_hat), in fp32 lanes (an OpenMP simd reduction: the lanes are
// added in the clone's vector width, the same on every run on a machine).
FASTCLT_SIMD_CLONES static float squared_deviation(const float* __restrict__ y, const float* __restrict__ mean,
                                                   int64_t d) {
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int64_t c = 0; c < d; ++c) {
    const float v = y[c] - mean[c];
    s += v * v;
  }
  return s;
}

at::Tensor total_variance_cpu(const at::Tensor& y) {
  TORCH_CHECK(y.device().is_cpu(), "fastclt::total_variance: y must be on the CPU, got ", y.device());
  TORCH_CHECK(y.scalar_type() == at::kFloat, "fastclt::total_variance: y must be float32, got ", y.scalar_type());
  TORCH_CHECK(y.dim() == 3, "fastclt::total_variance: y must be [B, M, d], got ", y.sizes());
  TORCH_CHECK(y.is_contiguous(), "fastclt::total_variance: y must be contiguous");
  const int64_t B = y.size(0), M = y.size(1), d = y.size(2), N = M * d;
  auto tv = new_output({M}, y.options());
  float* out = tv.data_ptr<float>();
  if (B == 0 || N == 0) {
    for (int64_t m = 0; m < M; ++m) out[m] = 0.f;
    return tv;
  }
  const float* yp = y.data_ptr<float>();
  const int64_t n_chunks = (B + kRows - 1) / kRows;
  const bool parallel = B * N > (int64_t(1) << 16);
  std::vector<double> part(n_chunks * N, 0.0);  // [chunk, M * d]: column sums
#pragma omp parallel for schedule(static) if (parallel)
  for (int64_t ch = 0; ch < n_chunks; ++ch)
    for (int64_t b = ch * kRows; b < std::min(B, (ch + 1) * kRows); ++b) add_f64(part.data() + ch * N, yp + b * N, N);
  std::vector<float> mean(N);
  for (int64_t i = 0; i < N; ++i) {
    double s = 0.0;
    for (int64_t ch = 0; ch < n_chunks; ++ch) s += part[ch * N + i];
    mean[i] = float(s / double(B));
  }
  std::vector<double> sq(n_chunks * M, 0.0);  // [chunk, M]
#pragma omp parallel for schedule(static) if (parallel)
  for (int64_t ch = 0; ch < n_chunks; ++ch)
    for (int64_t b = ch * kRows; b < std::min(B, (ch + 1) * kRows); ++b)
      for (int64_t m = 0; m < M; ++m)
        sq[ch * M + m] += squared_deviation(yp + b * N + m * d, mean.data() + m * d, d);
  for (int64_t m = 0; m < M; ++m) {
    double s = 0.0;
    for (int64_t ch = 0; ch < n_chunks; ++ch) s += sq[ch * M + m];
    out[m] = float(s);
  }
  return tv;
}

// fvu_terms: sq[m] = sum_b ||y[b, m] - y_hat[b, m]||^2 and tv[m] (as total_variance) in one read of y
// and y_hat. Each chunk of kRows token rows (in cache after its first read) gives its column means
// mu_c (fp64 sums) and the squared deviations from them, M2_c[m]; the chunks combine as
// tv[m] = sum_c M2_c[m] + sum_c n_c ||mu_c[m] - mu[m]||^2 (the parallel variance formula, in fp64),
// in chunk order: deterministic and independent of the thread count.
std::tuple<at::Tensor, at::Tensor> fvu_terms_cpu(const at::Tensor& y, const at::Tensor& y_hat) {
  const char* op = "fvu_terms";
  for (const auto* t : {&y, &y_hat}) {
    const char* name = t == &y ? "y" : "y_hat";
    TORCH_CHECK(t->device().is_cpu(), "fastclt::", op, ": ", name, " must be on the CPU, got ", t->device());
    TORCH_CHECK(t->scalar_type() == at::kFloat, "fastclt::", op, ": ", name, " must be float32, got ", t->scalar_type());
    TORCH_CHECK(t->dim() == 3, "fastclt::", op, ": ", name, " must be [B, M, d], got ", t->sizes());
    TORCH_CHECK(t->is_contiguous(), "fastclt::", op, ": ", name, " must be contiguous");
  }
  TORCH_CHECK(y_hat.sizes() == y.sizes(), "fastclt::", op, ": y_hat must have y's shape ", y.sizes(), ", got ",
              y_hat.sizes());
  const int64_t B = y.size(0), M = y.size(1), d = y.size(2), N = M * d;
  auto sq = new_output({M}, y.options());
  auto tv = new_output({M}, y.options());
  float* sq_out = sq.data_ptr<float>();
  float* tv_out = tv.data_ptr<float>();
  if (B == 0 || N == 0) {
    for (int64_t m = 0; m < M; ++m) sq_out[m] = tv_out[m] = 0.f;
    return {sq, tv};
  }
  const float* yp = y.data_ptr<float>();
  const float* hp = y_hat.data_ptr<float>();
  const int64_t n_chunks = (B + kRows - 1) / kRows;
  std::vector<double> mean_c(n_chunks * N);        // [chunk, M * d]: the chunk's column means
  std::vector<double> part(n_chunks * M * 2, 0.0);  // [chunk, M, {sq, M2}]
#pragma omp parallel if (B * N > (int64_t(1) << 16))
  {
    std::vector<float> mu(N);
#pragma omp for schedule(static)
    for (int64_t ch = 0; ch < n_chunks; ++ch) {
      const int64_t b0 = ch * kRows, b1 = std::min(B, b0 + kRows);
      double* mc = mean_c.data() + ch * N;
      std::fill(mc, mc + N, 0.0);
      double* pc = part.data() + ch * M * 2;
      for (int64_t b = b0; b < b1; ++b) {
        add_f64(mc, yp + b * N, N);
        for (int64_t m = 0; m < M; ++m) pc[2 * m] += squared_deviation(yp + b * N + m * d, hp + b * N + m * d, d);
      }
      const double inv = 1.0 / double(b1 - b0);
      for (int64_t i = 0; i < N; ++i) {
        mc[i] *= inv;
        mu[i] = float(mc[i]);
      }
      for (int64_t b = b0; b < b1; ++b)
        for (int64_t m = 0; m < M; ++m) pc[2 * m + 1] += squared_deviation(yp + b * N + m * d, mu.data() + m * d, d);
    }
  }
  // the chunks' deviations were taken from mu_c rounded to fp32: M2_c is exact for that center, and
  // sum_b ||y - mu_c||^2 = M2(true mean of the chunk) + n_c ||mean_c - mu_c||^2; the correction is added
  // with the between-chunk term below, both against the fp64 means
  std::vector<double> mean(N, 0.0);
  for (int64_t ch = 0; ch < n_chunks; ++ch) {
    const double w = double(std::min(B, (ch + 1) * kRows) - ch * kRows);
    for (int64_t i = 0; i < N; ++i) mean[i] += w * mean_c[ch * N + i];
  }
  for (int64_t i = 0; i < N; ++i) mean[i] /= double(B);
  for (int64_t m = 0; m < M; ++m) {
    double s = 0.0, t = 0.0;
    for (int64_t ch = 0; ch < n_chunks; ++ch) {
      const double w = double(std::min(B, (ch + 1) * kRows) - ch * kRows);
      const double* mc = mean_c.data() + ch * N + m * d;
      double between = 0.0, rounding = 0.0;
      for (int64_t c = 0; c < d; ++c) {
        const double g = mc[c] - mean[m * d + c];
        const double r = mc[c] - double(float(mc[c]));
        between += g * g;
        rounding += r * r;
      }
      s += part[(ch * M + m) * 2];
      t += part[(ch * M + m) * 2 + 1] - w * rounding + w * between;
    }
    sq_out[m] = float(s);
    tv_out[m] = float(std::max(t, 0.0));
  }
  return {sq, tv};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastclt, CPU, m) {
  m.impl("total_variance", &total_variance_cpu);
  m.impl("fvu_terms", &fvu_terms_cpu);
}

}  // namespace fastclt
