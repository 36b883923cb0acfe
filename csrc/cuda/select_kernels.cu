// CUDA kernels of the selection ops: exact TopK per row (radix select in shared memory) and the
// histogram / compaction steps of exact BatchTopK. Algorithms: csrc/README.md.
#include "common.cuh"
#include "launch.h"

namespace fastclt {
namespace cuda {
namespace {

constexpr int kThreads = 256;

constexpr int kWarps = kThreads / kWarp;

// The radix digit of one value for a histogram pass, or -1 when it is not counted: NaN (counted in
// *nans instead), or a key whose top prefix_bits differ from prefix. shift = 32 - prefix_bits -
// digit_bits.
__device__ __forceinline__ int radix_bin(float v, uint32_t prefix, int prefix_bits, int shift, uint32_t mask,
                                         unsigned int* nans) {
  if (v != v) {
    ++*nans;
    return -1;
  }
  const uint32_t key = float_key(v);
  if (prefix_bits != 0 && (key >> (32 - prefix_bits)) != prefix) return -1;
  return int((key >> shift) & mask);
}

// One block per row. Radix select over the 8-bit digits of the keys (4 passes for fp32, 2 for bf16,
// whose low 16 key bits are zero) finds the k-th largest key and how many keys equal to it to keep;
// an ordered block compaction then writes the kept entries in ascending feature order, taking
// threshold-equal entries lowest index first. Each pass reads the row with 16-byte loads into
// per-warp histograms (warp-aggregated atomics), summed per bin afterwards. The first pass counts
// the row's NaNs into *nan_count (the glue raises on any); NaN entries are never kept, so a row with
// NaN writes fewer than k entries but never out of bounds.
template <typename T, int NPASS>
__global__ void __launch_bounds__(kThreads) topk_rows_kernel(const T* __restrict__ h, int64_t F, int k,
                                                              int32_t* __restrict__ out_index,
                                                              T* __restrict__ out_value,
                                                              unsigned int* __restrict__ nan_count) {
  __shared__ unsigned int sub[kWarps][256];
  __shared__ unsigned int hist[256];
  __shared__ int warp_counts[kWarps];
  __shared__ uint32_t s_prefix;
  __shared__ int s_remaining;
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const int64_t row = blockIdx.x;
  const T* x = h + row * F;
  uint32_t prefix = 0;
  int remaining = k;  // keys still to take at or below the current prefix
  unsigned int nans = 0;
  for (int pass = 0; pass < NPASS; ++pass) {
    const int shift = 24 - 8 * pass;
    for (int i = threadIdx.x; i < kWarps * 256; i += blockDim.x) (&sub[0][0])[i] = 0u;
    __syncthreads();
    unsigned int pass_nans = 0;
    for_each_vec(x, F, int64_t(warp) * kWarp, kThreads, [&](const float(&v)[Vec<T>::kSize], int count) {
#pragma unroll
      for (int s = 0; s < Vec<T>::kSize; ++s) {
        const int bin = s < count ? radix_bin(v[s], prefix, 8 * pass, shift, 255u, &pass_nans) : -1;
        warp_histogram_add(sub[warp], bin);
      }
    });
    if (pass == 0) nans = pass_nans;
    __syncthreads();
    for (int i = threadIdx.x; i < 256; i += blockDim.x) {
      unsigned int c = 0;
#pragma unroll
      for (int w = 0; w < kWarps; ++w) c += sub[w][i];
      hist[i] = c;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      int above = 0, d = 255;
      for (; d > 0; --d) {
        if (above + int(hist[d]) >= remaining) break;
        above += int(hist[d]);
      }
      s_prefix = (prefix << 8) | uint32_t(d);
      s_remaining = remaining - above;
    }
    __syncthreads();
    prefix = s_prefix;
    remaining = s_remaining;
  }
  nans = warp_sum_u32(nans);
  if (lane == 0 && nans != 0) atomicAdd(nan_count, nans);
  // bf16 (2 passes) fixes only the top 16 key bits; the low 16 are those of the value's key: zero
  // for a non-negative float, all ones (inverted zero bits) for a negative one.
  uint32_t threshold = prefix << (32 - 8 * NPASS);
  if (NPASS == 2 && !(threshold & 0x80000000u)) threshold |= 0xFFFFu;
  int32_t* idx_out = out_index + row * k;
  T* val_out = out_value + row * k;
  int written = 0, equal_seen = 0;
  for (int64_t base = 0; base < F && written < k; base += blockDim.x) {
    const int64_t i = base + threadIdx.x;
    const float v = i < F ? to_f32(x[i]) : 0.f;
    const bool valid = i < F && v == v;
    const uint32_t key = valid ? float_key(v) : 0u;
    int equal_total, kept_total;
    const bool equal = valid && key == threshold;
    const int equal_rank = equal_seen + block_exclusive_count(equal, &equal_total, warp_counts);
    const bool keep = (valid && key > threshold) || (equal && equal_rank < remaining);
    const int pos = written + block_exclusive_count(keep, &kept_total, warp_counts);
    if (keep) {
      idx_out[pos] = int32_t(i);
      val_out[pos] = relu(x[i]);
    }
    written += kept_total;
    equal_seen += equal_total;
  }
}

// Histogram of one radix pass over h [n] (grid-stride, 16-byte loads): n_sub per-block copies of the
// 2^digit_bits + 1 bins in shared memory (warp w adds into copy w % n_sub with warp-aggregated
// atomics), summed per bin at the end into one global atomic add per bin per block. The last bin
// counts NaNs.
template <typename T>
__global__ void __launch_bounds__(kThreads) key_histogram_kernel(const T* __restrict__ h, int64_t n, uint32_t prefix,
                                                                  int prefix_bits, int digit_bits, int n_sub,
                                                                  unsigned long long* __restrict__ counts) {
  extern __shared__ unsigned int bins[];  // n_sub x (2^digit_bits digit bins + 1 NaN bin)
  const int n_bins = 1 << digit_bits, width = n_bins + 1;
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  for (int i = threadIdx.x; i < n_sub * width; i += blockDim.x) bins[i] = 0u;
  __syncthreads();
  unsigned int* mine = bins + (warp % n_sub) * width;
  const int shift = 32 - prefix_bits - digit_bits;
  const uint32_t mask = uint32_t(n_bins - 1);
  unsigned int nans = 0;
  const int64_t first = int64_t(blockIdx.x) * blockDim.x + int64_t(warp) * kWarp;
  for_each_vec(h, n, first, int64_t(gridDim.x) * blockDim.x, [&](const float(&v)[Vec<T>::kSize], int count) {
#pragma unroll
    for (int s = 0; s < Vec<T>::kSize; ++s) {
      const int bin = s < count ? radix_bin(v[s], prefix, prefix_bits, shift, mask, &nans) : -1;
      warp_histogram_add(mine, bin);
    }
  });
  nans = warp_sum_u32(nans);
  if (lane == 0 && nans != 0) atomicAdd(&mine[n_bins], nans);
  __syncthreads();
  for (int i = threadIdx.x; i < width; i += blockDim.x) {
    unsigned long long c = 0;
    for (int s = 0; s < n_sub; ++s) c += bins[s * width + i];
    if (c) atomicAdd(&counts[i], c);
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) compact_count_kernel(const T* __restrict__ h, int64_t F, uint32_t threshold,
                                                                  int64_t* __restrict__ n_greater,
                                                                  int64_t* __restrict__ n_equal) {
  __shared__ unsigned long long s_gt, s_eq;
  if (threadIdx.x == 0) s_gt = s_eq = 0ull;
  __syncthreads();
  const T* x = h + int64_t(blockIdx.x) * F;
  unsigned long long gt = 0, eq = 0;
  for (int64_t i = threadIdx.x; i < F; i += blockDim.x) {
    const uint32_t key = float_key(to_f32(x[i]));
    gt += key > threshold;
    eq += key == threshold;
  }
  atomicAdd(&s_gt, gt);
  atomicAdd(&s_eq, eq);
  __syncthreads();
  if (threadIdx.x == 0) {
    n_greater[blockIdx.x] = int64_t(s_gt);
    n_equal[blockIdx.x] = int64_t(s_eq);
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) compact_write_kernel(const T* __restrict__ h, int64_t F, uint32_t threshold,
                                                                  const int64_t* __restrict__ equal_before,
                                                                  int64_t equal_skip, int64_t equal_take,
                                                                  const int64_t* __restrict__ row_ptr,
                                                                  int32_t* __restrict__ out_index,
                                                                  T* __restrict__ out_value) {
  __shared__ int warp_counts[kThreads / kWarp];
  const int64_t row = blockIdx.x;
  const T* x = h + row * F;
  const int64_t end = row_ptr[row + 1];
  int64_t written = row_ptr[row], equal_seen = equal_before[row];
  for (int64_t base = 0; base < F && written < end; base += blockDim.x) {
    const int64_t i = base + threadIdx.x;
    const bool valid = i < F;
    const uint32_t key = valid ? float_key(to_f32(x[i])) : 0u;
    int equal_total, kept_total;
    const bool equal = valid && key == threshold;
    const int64_t equal_rank = equal_seen + block_exclusive_count(equal, &equal_total, warp_counts);
    const bool keep = (valid && key > threshold) ||
                      (equal && equal_rank >= equal_skip && equal_rank < equal_skip + equal_take);
    const int64_t pos = written + block_exclusive_count(keep, &kept_total, warp_counts);
    if (keep) {
      out_index[pos] = int32_t(i);
      out_value[pos] = relu(x[i]);
    }
    written += kept_total;
    equal_seen += equal_total;
  }
}

template <typename Fn>
void with_dtype(DType dtype, Fn&& fn) {
  if (dtype == DType::F32) {
    fn(float{});
  } else {
    fn(__nv_bfloat16{});
  }
}

}  // namespace

void topk_rows(const void* h, DType dtype, int64_t B, int64_t F, int64_t k, int32_t* index, void* value,
               unsigned int* nan_count, void* stream) {
  if (B == 0) return;
  auto s = static_cast<cudaStream_t>(stream);
  with_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    constexpr int npass = sizeof(T) == 2 ? 2 : 4;
    topk_rows_kernel<T, npass><<<unsigned(B), kThreads, 0, s>>>(static_cast<const T*>(h), F, int(k), index,
                                                                 static_cast<T*>(value), nan_count);
  });
}

// Per-block histogram copies that fit in 48 KiB of shared memory (the default limit), at most one per warp.
static int histogram_copies(int digit_bits) {
  const int bytes = ((1 << digit_bits) + 1) * int(sizeof(unsigned int));
  const int fit = (48 * 1024) / bytes;
  return fit < 1 ? 1 : (fit > kWarps ? kWarps : fit);
}

void key_histogram(const void* h, DType dtype, int64_t n, uint32_t prefix, int prefix_bits, int digit_bits,
                   int64_t* counts, void* stream) {
  if (n == 0) return;
  auto s = static_cast<cudaStream_t>(stream);
  const int n_sub = histogram_copies(digit_bits);
  const size_t smem = size_t(n_sub) * ((size_t(1) << digit_bits) + 1) * sizeof(unsigned int);
  with_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    const int64_t units = n / Vec<T>::kSize + Vec<T>::kSize;  // vectors plus at most 2 VEC scalar units
    const int64_t blocks = (units + kThreads - 1) / kThreads;
    const unsigned grid = unsigned(blocks < 2048 ? blocks : 2048);
    key_histogram_kernel<T><<<grid, kThreads, smem, s>>>(static_cast<const T*>(h), n, prefix, prefix_bits,
                                                         digit_bits, n_sub,
                                                         reinterpret_cast<unsigned long long*>(counts));
  });
}

void compact_count(const void* h, DType dtype, int64_t R, int64_t F, uint32_t threshold, int64_t* n_greater,
                   int64_t* n_equal, void* stream) {
  if (R == 0) return;
  auto s = static_cast<cudaStream_t>(stream);
  with_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    compact_count_kernel<T><<<unsigned(R), kThreads, 0, s>>>(static_cast<const T*>(h), F, threshold, n_greater,
                                                             n_equal);
  });
}

void compact_write(const void* h, DType dtype, int64_t R, int64_t F, uint32_t threshold,
                   const int64_t* equal_before, int64_t equal_skip, int64_t equal_take, const int64_t* row_ptr,
                   int32_t* index, void* value, void* stream) {
  if (R == 0) return;
  auto s = static_cast<cudaStream_t>(stream);
  with_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    compact_write_kernel<T><<<unsigned(R), kThreads, 0, s>>>(static_cast<const T*>(h), F, threshold, equal_before,
                                                             equal_skip, equal_take, row_ptr, index,
                                                             static_cast<T*>(value));
  });
}

}  // namespace cuda
}  // namespace fastclt
