// CUDA kernels of the three sparse shapes (csrc/README.md): gather-decode, dot at sparse indices,
// scatter by feature. One warp per output row (token or feature; a hot feature's chunk, see
// csrc/scatter_plan.h); each lane owns VEC consecutive columns per 32*VEC-wide chunk, read with
// 16-byte loads when D and the pointers allow; fp32 accumulation; no atomics, so results are
// deterministic.
#include <type_traits>

#include "../scatter_plan.h"
#include "common.cuh"
#include "launch.h"

namespace fastclt {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarpsPerBlock = kThreads / kWarp;

__device__ __forceinline__ int64_t warp_id() { return (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) / kWarp; }

// Indices outside [0, F) are skipped rather than read out of bounds: the CUDA path does not scan the
// codes on the host (that would cost a device sync); codes made by fastclt's ops are always in range.
// value: T, or fp32 with bf16 weights (an encoder backward's dh, not rounded before the sum).
template <typename T, typename V, int VEC>
__global__ void __launch_bounds__(kThreads) decode_kernel(const int64_t* __restrict__ row_ptr,
                                                           const int32_t* __restrict__ index,
                                                           const V* __restrict__ value, const T* __restrict__ W,
                                                           const T* __restrict__ bias, int64_t B, int64_t F,
                                                           int64_t D, T* __restrict__ y) {
  const int64_t row = warp_id();
  const int lane = threadIdx.x % kWarp;
  if (row >= B) return;
  const int64_t start = row_ptr[row], end = row_ptr[row + 1];
  for (int64_t d0 = int64_t(lane) * VEC; d0 - lane * VEC < D; d0 += kWarp * VEC) {
    const bool active = d0 < D;
    float acc[VEC];
#pragma unroll
    for (int i = 0; i < VEC; ++i) acc[i] = 0.f;
    if (bias != nullptr && active) load_f32<T, VEC>(bias + d0, acc);
    // Each lane loads one (index, value) pair of a 32-entry chunk; shuffles broadcast them.
    for (int64_t base = start; base < end; base += kWarp) {
      const int64_t j = base + lane;
      const int32_t my_index = j < end ? index[j] : -1;
      const float my_value = j < end ? to_f32(value[j]) : 0.f;
      const int n = int(end - base < kWarp ? end - base : kWarp);
      for (int t = 0; t < n; ++t) {
        const int32_t f = __shfl_sync(0xffffffffu, my_index, t);
        const float v = __shfl_sync(0xffffffffu, my_value, t);
        if (!active || f < 0 || f >= F) continue;
        float w[VEC];
        load_f32<T, VEC>(W + int64_t(f) * D + d0, w);
#pragma unroll
        for (int i = 0; i < VEC; ++i) acc[i] += v * w[i];
      }
    }
    if (active) store_f32<T, VEC>(y + row * D + d0, acc);
  }
}

template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads) dot_kernel(const int64_t* __restrict__ row_ptr,
                                                        const int32_t* __restrict__ index, const T* __restrict__ G,
                                                        const T* __restrict__ W, int64_t B, int64_t F, int64_t D,
                                                        T* __restrict__ out) {
  const int64_t row = warp_id();
  const int lane = threadIdx.x % kWarp;
  if (row >= B) return;
  const T* g = G + row * D;
  for (int64_t j = row_ptr[row]; j < row_ptr[row + 1]; ++j) {
    const int32_t f = index[j];
    float s = 0.f;
    if (f >= 0 && f < F) {
      const T* w = W + int64_t(f) * D;
      for (int64_t d0 = int64_t(lane) * VEC; d0 < D; d0 += kWarp * VEC) {
        float a[VEC], b[VEC];
        load_f32<T, VEC>(g + d0, a);
        load_f32<T, VEC>(w + d0, b);
#pragma unroll
        for (int i = 0; i < VEC; ++i) s += a[i] * b[i];
      }
    }
    s = warp_sum(s);
    if (lane == 0) out[j] = from_f32<T>(s);
  }
}

__global__ void entry_rows_kernel(const int64_t* __restrict__ row_ptr, int64_t B, int64_t* __restrict__ row_of) {
  const int64_t row = warp_id();
  if (row >= B) return;
  for (int64_t j = row_ptr[row] + threadIdx.x % kWarp; j < row_ptr[row + 1]; j += kWarp) row_of[j] = row;
}

// One warp per work item of the scatter plan (csrc/scatter_plan.h): sums its chunk of a feature's
// entries (grouped by the caller, in flat order) and writes the feature's row, or, for a hot
// feature, an fp32 partial row.
template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads) scatter_chunks_kernel(
    const int64_t* __restrict__ feat_ptr, const int64_t* __restrict__ chunk_ptr,
    const int64_t* __restrict__ partial_ptr, int64_t chunk, int64_t n_work, const int64_t* __restrict__ order,
    const int64_t* __restrict__ row_of, const T* __restrict__ coef, const T* __restrict__ X, int64_t F, int64_t D,
    T* __restrict__ out, float* __restrict__ coef_sum, float* __restrict__ partials,
    float* __restrict__ partial_coef) {
  const int64_t w = warp_id();
  const int lane = threadIdx.x % kWarp;
  plan::ScatterWork work;
  if (w >= n_work || !plan::scatter_work(feat_ptr, chunk_ptr, partial_ptr, F, chunk, w, &work)) return;
  float cs = 0.f;  // lane-strided partial sums, then a fixed shuffle tree: deterministic
  for (int64_t p = work.begin + lane; p < work.end; p += kWarp) cs += to_f32(coef[order[p]]);
  cs = warp_sum(cs);
  if (lane == 0) {
    if (work.slot < 0) {
      coef_sum[work.feature] = cs;
    } else {
      partial_coef[work.slot] = cs;
    }
  }
  for (int64_t d0 = int64_t(lane) * VEC; d0 < D; d0 += kWarp * VEC) {
    float acc[VEC];
#pragma unroll
    for (int i = 0; i < VEC; ++i) acc[i] = 0.f;
    for (int64_t p = work.begin; p < work.end; ++p) {
      const int64_t j = order[p];
      const float c = to_f32(coef[j]);
      float x[VEC];
      load_f32<T, VEC>(X + row_of[j] * D + d0, x);
#pragma unroll
      for (int i = 0; i < VEC; ++i) acc[i] += c * x[i];
    }
    if (work.slot < 0) {
      store_f32<T, VEC>(out + work.feature * D + d0, acc);
    } else {
      store_f32<float, VEC>(partials + work.slot * D + d0, acc);
    }
  }
}

// One warp per feature: a hot feature's row = the sum of its partial rows in chunk order.
template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads) reduce_partials_kernel(const int64_t* __restrict__ partial_ptr,
                                                                    const float* __restrict__ partials,
                                                                    const float* __restrict__ partial_coef, int64_t F,
                                                                    int64_t D, T* __restrict__ out,
                                                                    float* __restrict__ coef_sum) {
  const int64_t f = warp_id();
  const int lane = threadIdx.x % kWarp;
  if (f >= F) return;
  const int64_t lo = partial_ptr[f], hi = partial_ptr[f + 1];
  if (lo == hi) return;
  if (lane == 0) {
    float s = 0.f;
    for (int64_t c = lo; c < hi; ++c) s += partial_coef[c];
    coef_sum[f] = s;
  }
  for (int64_t d0 = int64_t(lane) * VEC; d0 < D; d0 += kWarp * VEC) {
    float acc[VEC];
#pragma unroll
    for (int i = 0; i < VEC; ++i) acc[i] = 0.f;
    for (int64_t c = lo; c < hi; ++c) {
      float x[VEC];
      load_f32<float, VEC>(partials + c * D + d0, x);
#pragma unroll
      for (int i = 0; i < VEC; ++i) acc[i] += x[i];
    }
    store_f32<T, VEC>(out + f * D + d0, acc);
  }
}

inline bool aligned16(const void* p) { return p == nullptr || reinterpret_cast<uintptr_t>(p) % 16 == 0; }

inline unsigned warp_grid(int64_t rows) { return unsigned((rows + kWarpsPerBlock - 1) / kWarpsPerBlock); }

// Calls fn(T{}, std::integral_constant<int, VEC>{}) with the 16-byte vector width when D and all
// pointers allow it, else VEC = 1.
template <typename Fn>
void with_dtype_vec(DType dtype, int64_t D, bool aligned, Fn&& fn) {
  if (dtype == DType::F32) {
    if (aligned && D % Vec<float>::kSize == 0) fn(float{}, std::integral_constant<int, Vec<float>::kSize>{});
    else fn(float{}, std::integral_constant<int, 1>{});
  } else {
    if (aligned && D % Vec<__nv_bfloat16>::kSize == 0)
      fn(__nv_bfloat16{}, std::integral_constant<int, Vec<__nv_bfloat16>::kSize>{});
    else fn(__nv_bfloat16{}, std::integral_constant<int, 1>{});
  }
}

}  // namespace

void sparse_decode(const int64_t* row_ptr, const int32_t* index, const void* value, DType value_dtype, const void* W,
                   const void* bias, DType dtype, int64_t B, int64_t F, int64_t D, void* y, void* stream) {
  if (B == 0 || D == 0) return;
  auto s = static_cast<cudaStream_t>(stream);
  with_dtype_vec(dtype, D, aligned16(W) && aligned16(bias) && aligned16(y), [&](auto tag, auto vec) {
    using T = decltype(tag);
    auto launch = [&](auto value_tag) {
      using V = decltype(value_tag);
      decode_kernel<T, V, decltype(vec)::value><<<warp_grid(B), kThreads, 0, s>>>(
          row_ptr, index, static_cast<const V*>(value), static_cast<const T*>(W), static_cast<const T*>(bias), B, F,
          D, static_cast<T*>(y));
    };
    if (value_dtype == DType::F32) {
      launch(float{});
    } else {
      launch(T{});
    }
  });
}

void sparse_dot(const int64_t* row_ptr, const int32_t* index, const void* G, const void* W, DType dtype, int64_t B,
                int64_t F, int64_t D, void* out, void* stream) {
  if (B == 0) return;
  auto s = static_cast<cudaStream_t>(stream);
  with_dtype_vec(dtype, D, aligned16(G) && aligned16(W), [&](auto tag, auto vec) {
    using T = decltype(tag);
    dot_kernel<T, decltype(vec)::value><<<warp_grid(B), kThreads, 0, s>>>(
        row_ptr, index, static_cast<const T*>(G), static_cast<const T*>(W), B, F, D, static_cast<T*>(out));
  });
}

void entry_rows(const int64_t* row_ptr, int64_t B, int64_t* row_of, void* stream) {
  if (B == 0) return;
  entry_rows_kernel<<<warp_grid(B), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(row_ptr, B, row_of);
}

void feature_scatter(const int64_t* feat_ptr, const int64_t* chunk_ptr, const int64_t* partial_ptr, int64_t chunk,
                     int64_t n_work, const int64_t* order, const int64_t* row_of, const void* coef, const void* X,
                     DType dtype, int64_t F, int64_t D, void* out, float* coef_sum, float* partials,
                     float* partial_coef, void* stream) {
  if (F == 0) return;
  auto s = static_cast<cudaStream_t>(stream);
  with_dtype_vec(dtype, D, aligned16(X) && aligned16(out) && aligned16(partials), [&](auto tag, auto vec) {
    using T = decltype(tag);
    constexpr int VEC = decltype(vec)::value;
    if (n_work > 0) {
      scatter_chunks_kernel<T, VEC><<<warp_grid(n_work), kThreads, 0, s>>>(
          feat_ptr, chunk_ptr, partial_ptr, chunk, n_work, order, row_of, static_cast<const T*>(coef),
          static_cast<const T*>(X), F, D, static_cast<T*>(out), coef_sum, partials, partial_coef);
    }
    reduce_partials_kernel<T, VEC><<<warp_grid(F), kThreads, 0, s>>>(partial_ptr, partials, partial_coef, F, D,
                                                                    static_cast<T*>(out), coef_sum);
  });
}

}  // namespace cuda
}  // namespace fastclt
