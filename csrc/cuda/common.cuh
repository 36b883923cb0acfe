// Device helpers shared by the fastclt CUDA kernels (CUDA headers only).
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace fastclt {
namespace cuda {

constexpr int kWarp = 32;

__device__ __forceinline__ float to_f32(float x) { return x; }
__device__ __forceinline__ float to_f32(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_f32(float x);
template <>
__device__ __forceinline__ float from_f32<float>(float x) { return x; }
template <>
__device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float x) { return __float2bfloat16(x); }

// Order-preserving uint32 key of a float, branch-free; adding +0.0 folds -0.0 onto +0.0 (same map
// as csrc/cpu/checks.h; correct only without fast-math, which setup.py does not use).
__device__ __forceinline__ uint32_t float_key(float x) {
  const uint32_t u = __float_as_uint(__fadd_rn(x, 0.0f));
  return u ^ (uint32_t(int32_t(u) >> 31) | 0x80000000u);
}

template <typename T>
__device__ __forceinline__ T relu(T x) {
  return to_f32(x) > 0.f ? x : from_f32<T>(0.f);
}

// 16-byte vector width in elements: 4 fp32 or 8 bf16.
template <typename T>
struct Vec {
  static constexpr int kSize = 16 / sizeof(T);
};

// Loads VEC consecutive elements as fp32; one 16-byte load when VEC fills 16 bytes (the caller
// guarantees alignment), else scalar loads.
template <typename T, int VEC>
__device__ __forceinline__ void load_f32(const T* __restrict__ p, float (&out)[VEC]) {
  if constexpr (VEC * sizeof(T) == 16) {
    alignas(16) T tmp[VEC];
    *reinterpret_cast<uint4*>(tmp) = __ldg(reinterpret_cast<const uint4*>(p));
#pragma unroll
    for (int i = 0; i < VEC; ++i) out[i] = to_f32(tmp[i]);
  } else {
#pragma unroll
    for (int i = 0; i < VEC; ++i) out[i] = to_f32(p[i]);
  }
}

template <typename T, int VEC>
__device__ __forceinline__ void store_f32(T* __restrict__ p, const float (&in)[VEC]) {
  if constexpr (VEC * sizeof(T) == 16) {
    alignas(16) T tmp[VEC];
#pragma unroll
    for (int i = 0; i < VEC; ++i) tmp[i] = from_f32<T>(in[i]);
    *reinterpret_cast<uint4*>(p) = *reinterpret_cast<const uint4*>(tmp);
  } else {
#pragma unroll
    for (int i = 0; i < VEC; ++i) p[i] = from_f32<T>(in[i]);
  }
}

// Visits x[0, n) with 16-byte loads: the elements before the first 16-byte boundary (the
// "head") and after the last whole vector (the "tail") one per unit, the body VEC per unit. Unit u
// goes to lane u % 32 of the warp whose loop reaches it: the calling warp starts at unit `first`
// and advances by `stride` units (both the same for every lane of the warp, `first` a multiple of
// 32), so every lane runs the same iterations and fn(v, count) may use warp collectives; lanes past
// the end get count = 0. fn receives float v[Vec<T>::kSize] with count valid entries.
template <typename T, typename Fn>
__device__ __forceinline__ void for_each_vec(const T* __restrict__ x, int64_t n, int64_t first, int64_t stride,
                                             Fn&& fn) {
  constexpr int VEC = Vec<T>::kSize;
  const int lane = threadIdx.x % kWarp;
  const uintptr_t misaligned = reinterpret_cast<uintptr_t>(x) % 16;
  int64_t head = misaligned == 0 ? 0 : int64_t((16 - misaligned) / sizeof(T));
  if (head > n) head = n;
  const int64_t n_vec = (n - head) / VEC;
  const int64_t body_end = head + n_vec * VEC;
  const int64_t units = head + n_vec + (n - body_end);
  for (int64_t base = first; base < units; base += stride) {
    const int64_t u = base + lane;
    float v[VEC];
    int count = 0;
    if (u < head) {
      v[0] = to_f32(x[u]);
      count = 1;
    } else if (u < head + n_vec) {
      load_f32<T, VEC>(x + head + (u - head) * VEC, v);
      count = VEC;
    } else if (u < units) {
      v[0] = to_f32(x[body_end + (u - head - n_vec)]);
      count = 1;
    }
    fn(v, count);
  }
}

// bins[bin] += 1 for every lane with bin >= 0, as one shared-memory atomic per distinct bin of the
// warp (lanes with equal bins are counted together): radix digits of real data crowd into a few
// bins, where per-lane atomics would serialise. Every lane of the warp must call it.
__device__ __forceinline__ void warp_histogram_add(unsigned int* bins, int bin) {
  const unsigned peers = __match_any_sync(0xffffffffu, bin);
  if (bin >= 0 && int(threadIdx.x % kWarp) == __ffs(peers) - 1) atomicAdd(&bins[bin], unsigned(__popc(peers)));
}

__device__ __forceinline__ unsigned int warp_sum_u32(unsigned int x) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o /= 2) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o /= 2) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

// Block-wide exclusive prefix count of `flag` in thread order; *total = the block's count.
// Every thread of the block must call it; `warp_counts` is shared scratch of blockDim/32 ints.
__device__ __forceinline__ int block_exclusive_count(bool flag, int* total, int* warp_counts) {
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp, n_warps = blockDim.x / kWarp;
  const unsigned mask = __ballot_sync(0xffffffffu, flag);
  const int in_warp = __popc(mask & ((1u << lane) - 1u));
  if (lane == 0) warp_counts[warp] = __popc(mask);
  __syncthreads();
  int before = 0, sum = 0;
  for (int w = 0; w < n_warps; ++w) {
    const int c = warp_counts[w];
    before += w < warp ? c : 0;
    sum += c;
  }
  __syncthreads();  // warp_counts is reused by the next call
  *total = sum;
  return before + in_warp;
}

}  // namespace cuda
}  // namespace fastclt
