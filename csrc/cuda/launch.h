// Host entry points of the CUDA kernels. Plain C++ (no CUDA or torch headers) so that the .cu files
// compile with nvcc alone and the torch glue (ops_cuda.cpp) with the host compiler alone.
// Pointers are device pointers; `stream` is a cudaStream_t. Inputs are validated by the glue.
#pragma once

#include <cstdint>

namespace fastclt {
namespace cuda {

enum class DType : int { F32 = 0, BF16 = 1 };

// h [B, F] -> index int32 [B, k] (ascending per row), value [B, k] = relu(h) at the top k.
// *nan_count (zeroed by the caller) += the NaNs of h; rows with NaN get fewer than k entries written.
void topk_rows(const void* h, DType dtype, int64_t B, int64_t F, int64_t k, int32_t* index,
               void* value, unsigned int* nan_count, void* stream);

// counts [2^digit_bits + 1] (zeroed by the caller) += histogram of the next digit_bits of the keys
// of h [n] that match prefix on their top prefix_bits; counts[2^digit_bits] += NaN count.
void key_histogram(const void* h, DType dtype, int64_t n, uint32_t prefix, int prefix_bits,
                   int digit_bits, int64_t* counts, void* stream);

// Per row of h [R, F]: n_greater[r] = #{key > threshold}, n_equal[r] = #{key == threshold}.
void compact_count(const void* h, DType dtype, int64_t R, int64_t F, uint32_t threshold,
                   int64_t* n_greater, int64_t* n_equal, void* stream);

// Writes the kept entries of each row of h [R, F] at row_ptr[r] in ascending feature order:
// key > threshold, or key == threshold with flat equal-rank (equal_before[r] + rank in row) in
// [equal_skip, equal_skip + equal_take).
void compact_write(const void* h, DType dtype, int64_t R, int64_t F, uint32_t threshold,
                   const int64_t* equal_before, int64_t equal_skip, int64_t equal_take,
                   const int64_t* row_ptr, int32_t* index, void* value, void* stream);

// y [B, D] = sum_j value[j] * W[index[j]] (+ bias [D] if not null); W, bias, y in `dtype`, value
// in `value_dtype` (the same, or F32 with BF16 weights).
void sparse_decode(const int64_t* row_ptr, const int32_t* index, const void* value, DType value_dtype,
                   const void* W, const void* bias, DType dtype, int64_t B, int64_t F, int64_t D, void* y,
                   void* stream);

// out [nnz]: out[j] = <G[row(j)], W[index[j]]>, G [B, D], W [F, D].
void sparse_dot(const int64_t* row_ptr, const int32_t* index, const void* G, const void* W,
                DType dtype, int64_t B, int64_t F, int64_t D, void* out, void* stream);

// row_of [nnz]: the row of each CSR entry.
void entry_rows(const int64_t* row_ptr, int64_t B, int64_t* row_of, void* stream);

// out [F, D]: out[f] = sum_{p in [feat_ptr[f], feat_ptr[f+1])} coef[j] * X[row_of[j]], j = order[p];
// coef_sum [F] fp32 likewise. Work split by the scatter plan (csrc/scatter_plan.h: chunk_ptr,
// partial_ptr, chunk, n_work = its bound on the work items): a feature of at most `chunk` entries is
// one warp that writes its row; a hot one is several warps writing fp32 partial rows (partials
// [>= partial_ptr[F], D], partial_coef [same]) that a second kernel sums in chunk order, so the
// result is deterministic. Every row of out is written (zero for unused features).
void feature_scatter(const int64_t* feat_ptr, const int64_t* chunk_ptr, const int64_t* partial_ptr, int64_t chunk,
                     int64_t n_work, const int64_t* order, const int64_t* row_of, const void* coef, const void* X,
                     DType dtype, int64_t F, int64_t D, void* out, float* coef_sum, float* partials,
                     float* partial_coef, void* stream);

}  // namespace cuda
}  // namespace fastclt
