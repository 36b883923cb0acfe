// Gaussian noise for the synthetic activations (fastclt/training/synthetic.py has the math and the
// pure-PyTorch version of the same generator):
//   normal_philox_(out fp32 [n], seed, stream, std): out = n draws of N(0, std^2)
// Counter-based: block j of four values is Philox4x32-10 of the counter (j mod 2^32, j / 2^32,
// stream, 0) under the key (seed mod 2^32, seed / 2^32); its four words are two pairs of uniforms
// u = (2 (w >> 9) + 1) 2^-24 in (0, 1), and each pair gives two normals by Box-Muller,
// r cos(theta), r sin(theta) with r = sqrt(-2 ln u1), theta = 2 pi (u2 - 1/2). A value depends only
// on (seed, stream, its index): the output is the same whatever the thread count or split, and a
// draw never waits on a shared generator state. torch.Tensor.normal_ on the CPU steps one
// Mersenne twister per value (~2.7 ns each on a 2-core Xeon); this is a few times faster there,
// on both cores, because the lanes are independent: the rounds, ln, sin and cos are branch-free
// loops over 16 lanes that the compiler vectorises (ln, sin, cos by short polynomials after range
// reduction, within a few ulp of the float functions). The Box-Muller loop vectorises only because
// the extension is built with -fno-math-errno -fno-trapping-math (setup.py).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>

#include "checks.h"
#include "simd.h"

namespace fastclt {
namespace {

constexpr uint32_t kMul0 = 0xD2511F53u, kMul1 = 0xCD9E8D57u;  // Philox4x32 multipliers
constexpr uint32_t kWeyl0 = 0x9E3779B9u, kWeyl1 = 0xBB67AE85u;  // key increments per round
constexpr int kLanes = 16;  // Philox blocks per sweep (64 values)

// ln(x) for x in (0, 1) normal floats (the uniforms here): x = m 2^e with m in [sqrt(1/2), sqrt(2)),
// ln(1 + f) of f = m - 1 by a degree-9 polynomial (the classic single-precision minimax), e ln 2
// in two parts.
FASTCLT_ALWAYS_INLINE float log_unit(float x) {
  const uint32_t i = simd::f32_bits(x);
  int32_t e = int32_t((i >> 23) & 0xFFu) - 126;
  float m = simd::bits_f32((i & 0x007FFFFFu) | 0x3F000000u);  // [0.5, 1)
  const bool low = m < 0.70710678118654752f;
  e = low ? e - 1 : e;
  const float f = low ? m + m - 1.0f : m - 1.0f;
  const float z = f * f;
  float y = 7.0376836292e-2f;
  y = y * f - 1.1514610310e-1f;
  y = y * f + 1.1676998740e-1f;
  y = y * f - 1.2420140846e-1f;
  y = y * f + 1.4249322787e-1f;
  y = y * f - 1.6668057665e-1f;
  y = y * f + 2.0000714765e-1f;
  y = y * f - 2.4999993993e-1f;
  y = y * f + 3.3333331174e-1f;
  y = y * f * z;
  const float fe = float(e);
  y += -2.12194440e-4f * fe;
  y += -0.5f * z;
  return f + y + 0.693359375f * fe;
}

// A word's uniform in (0, 1): (2 (w >> 9) + 1) 2^-24, exact in fp32.
FASTCLT_ALWAYS_INLINE float unit_of(uint32_t w) {
  return (float(int32_t(w >> 9)) * 2.0f + 1.0f) * 5.9604644775390625e-8f;
}

// sin and cos of 2 pi v for v in [-1/2, 1/2]: quarter turns q = round(4 v), the rest
// r = (4 v - q) pi/2 in [-pi/4, pi/4] by polynomials, then the quadrant's swap and signs.
FASTCLT_ALWAYS_INLINE void sincos_turn(float v, float& s, float& c) {
  const float t = 4.0f * v;
  const float qf = (t + 12582912.0f) - 12582912.0f;  // round to nearest (|t| <= 2 here): 1.5 * 2^23
  const int32_t q = int32_t(qf);
  const float r = (t - qf) * 1.57079632679489662f;
  const float r2 = r * r;
  const float sr = r + r * r2 * (-1.6666654611e-1f + r2 * (8.3321608736e-3f + r2 * -1.9515295891e-4f));
  const float cr = 1.0f - 0.5f * r2 + r2 * r2 * (4.166664568298827e-2f + r2 * (-1.388731625493765e-3f +
                                                                             r2 * 2.443315711809948e-5f));
  const bool swap = (q & 1) != 0;
  const float s0 = swap ? cr : sr, c0 = swap ? sr : cr;
  s = (q & 2) != 0 ? -s0 : s0;
  c = ((q + 1) & 2) != 0 ? -c0 : c0;
}

// Blocks first, first + 1, ... (kLanes of them) into out[4 first ...], the last one cut at n values.
FASTCLT_SIMD_CLONES static void philox_normal_sweep(float* __restrict__ out, int64_t first, int64_t n,
                                                     uint32_t key0, uint32_t key1, uint32_t stream, float stddev) {
  uint32_t c0[kLanes], c1[kLanes], c2[kLanes], c3[kLanes];
  for (int j = 0; j < kLanes; ++j) {
    const uint64_t block = uint64_t(first + j);
    c0[j] = uint32_t(block);
    c1[j] = uint32_t(block >> 32);
    c2[j] = stream;
    c3[j] = 0;
  }
  uint32_t k0 = key0, k1 = key1;
  for (int round = 0; round < 10; ++round) {
#pragma GCC unroll 1  // kept a loop over the lanes, which is vectorised (fully unrolled, it is not)
    for (int j = 0; j < kLanes; ++j) {
      const uint64_t p0 = uint64_t(kMul0) * c0[j], p1 = uint64_t(kMul1) * c2[j];
      const uint32_t n0 = uint32_t(p1 >> 32) ^ c1[j] ^ k0, n2 = uint32_t(p0 >> 32) ^ c3[j] ^ k1;
      c1[j] = uint32_t(p1);
      c3[j] = uint32_t(p0);
      c0[j] = n0;
      c2[j] = n2;
    }
    k0 += kWeyl0;
    k1 += kWeyl1;
  }
  // the four values of block j at buf[4 j ...]: two Box-Muller pairs, words (c0, c1) and (c2, c3)
  float buf[4 * kLanes];
  for (int j = 0; j < kLanes; ++j) {
    float s, c;
    const float ra = std::sqrt(-2.0f * log_unit(unit_of(c0[j]))) * stddev;
    sincos_turn(unit_of(c1[j]) - 0.5f, s, c);
    buf[4 * j] = ra * c;
    buf[4 * j + 1] = ra * s;
    const float rb = std::sqrt(-2.0f * log_unit(unit_of(c2[j]))) * stddev;
    sincos_turn(unit_of(c3[j]) - 0.5f, s, c);
    buf[4 * j + 2] = rb * c;
    buf[4 * j + 3] = rb * s;
  }
  const int64_t start = 4 * first;
  std::memcpy(out + start, buf, sizeof(float) * std::min<int64_t>(4 * kLanes, n - start));
}

void normal_philox_cpu(at::Tensor& out, int64_t seed, int64_t stream, double stddev) {
  TORCH_CHECK(out.device().is_cpu(), "fastclt::normal_philox_: CPU kernel called on ", out.device());
  TORCH_CHECK(out.scalar_type() == at::kFloat, "fastclt::normal_philox_: out must be float32, got ",
              out.scalar_type());
  TORCH_CHECK(out.is_contiguous(), "fastclt::normal_philox_: out must be contiguous");
  TORCH_CHECK_VALUE(stream >= 0 && stream <= int64_t(UINT32_MAX),
                    "normal_philox_: stream must be in [0, 2^32), got ", stream);
  TORCH_CHECK_VALUE(stddev >= 0.0, "normal_philox_: std must be >= 0, got ", stddev);
  const int64_t n = out.numel();
  float* o = out.data_ptr<float>();
  const uint64_t key = uint64_t(seed);
  const int64_t sweeps = (n + 4 * kLanes - 1) / (4 * kLanes);
  at::parallel_for(0, sweeps, 256, [&](int64_t s0, int64_t s1) {
    for (int64_t s = s0; s < s1; ++s)
      philox_normal_sweep(o, s * kLanes, n, uint32_t(key), uint32_t(key >> 32), uint32_t(stream), float(stddev));
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(fastclt, CPU, m) {
  m.impl("normal_philox_", &normal_philox_cpu);
}

}  // namespace fastclt
