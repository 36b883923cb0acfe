// The work split of the CUDA feature_scatter, shared by its kernels (nvcc), its torch glue and the
// CPU replay that tests it (fastclt._C._feature_scatter_replay): a feature's entries, grouped by a
// stable sort, are walked in chunks of at most `chunk` entries, one warp per chunk, so that a "hot"
// feature (active in many tokens) does not serialise on one warp.
//
//   chunks(f)   = max(1, ceil(n_f / chunk))      n_f: the entries of feature f
//   partials(f) = n_f > chunk ? chunks(f) : 0    fp32 partial rows of a hot feature
//   chunk_ptr, partial_ptr [F + 1]: their exclusive prefix sums (built on the device, no sync)
//
// Work item w (one warp) finds its feature f by binary search in chunk_ptr and its chunk
// c = w - chunk_ptr[f]; it covers the sorted entries [feat_ptr[f] + c*chunk, min(+chunk, feat_ptr[f+1]))
// and writes the output row itself (slot < 0: f has one chunk) or partial row
// partial_ptr[f] + c. A second pass sums each hot feature's partial rows in chunk order: every sum
// has a fixed order, so the result is deterministic. Host-side bounds (no device sync):
// work items <= F + nnz / chunk, partial rows <= nnz / chunk + nnz / (chunk + 1).
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define FASTCLT_HD __host__ __device__ __forceinline__
#else
#define FASTCLT_HD inline
#endif

namespace fastclt {
namespace plan {

// Entries per work item of the CUDA feature_scatter.
constexpr int64_t kScatterChunk = 512;

struct ScatterWork {
  int64_t feature, begin, end, slot;  // slot: partial row, or -1 to write the output row directly
};

// Work item w of the plan -> its chunk; false when w is past the last work item (chunk_ptr[F]).
FASTCLT_HD bool scatter_work(const int64_t* feat_ptr, const int64_t* chunk_ptr, const int64_t* partial_ptr,
                             int64_t F, int64_t chunk, int64_t w, ScatterWork* out) {
  if (F <= 0 || w < 0 || w >= chunk_ptr[F]) return false;
  int64_t lo = 0, hi = F;  // chunk_ptr[lo] <= w < chunk_ptr[hi]
  while (hi - lo > 1) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (chunk_ptr[mid] <= w) {
      lo = mid;
    } else {
      hi = mid;
    }
  }
  const int64_t c = w - chunk_ptr[lo];
  const int64_t begin = feat_ptr[lo] + c * chunk, last = feat_ptr[lo + 1];
  out->feature = lo;
  out->begin = begin;
  out->end = begin + chunk < last ? begin + chunk : last;
  out->slot = partial_ptr[lo + 1] > partial_ptr[lo] ? partial_ptr[lo] + c : -1;
  return true;
}

FASTCLT_HD int64_t scatter_work_bound(int64_t F, int64_t nnz, int64_t chunk) { return F + nnz / chunk; }

FASTCLT_HD int64_t scatter_partial_bound(int64_t nnz, int64_t chunk) { return nnz / chunk + nnz / (chunk + 1); }

}  // namespace plan
}  // namespace fastclt

#if !defined(__CUDACC__)
#include <ATen/ATen.h>

#include <tuple>

namespace fastclt {
namespace plan {

struct ScatterPlan {
  at::Tensor order;        // int64 [nnz]: entry positions sorted by feature (stable: flat order within one)
  at::Tensor feat_ptr;     // int64 [F + 1]: feature f owns order[feat_ptr[f]:feat_ptr[f+1]]
  at::Tensor chunk_ptr;    // int64 [F + 1]
  at::Tensor partial_ptr;  // int64 [F + 1]
};

// The plan of index [nnz] (int32) over n_features, on index's device, without a device sync.
// Indices outside [0, n_features) sort before feature 0 or after feature F-1 and belong to none.
inline ScatterPlan make_scatter_plan(const at::Tensor& index, int64_t n_features, int64_t chunk) {
  auto longs = index.options().dtype(at::kLong);
  auto sorted = at::sort(index.to(at::kLong), /*stable=*/true, /*dim=*/0, /*descending=*/false);
  ScatterPlan p;
  p.order = std::get<1>(sorted).contiguous();
  p.feat_ptr = at::searchsorted(std::get<0>(sorted), at::arange(n_features + 1, longs)).contiguous();
  auto counts = p.feat_ptr.slice(0, 1) - p.feat_ptr.slice(0, 0, n_features);
  auto chunks = at::div(counts + (chunk - 1), chunk, "floor").clamp_min(1);
  auto partials = at::where(counts > chunk, chunks, at::zeros_like(chunks));
  p.chunk_ptr = at::zeros({n_features + 1}, longs);
  p.partial_ptr = at::zeros({n_features + 1}, longs);
  if (n_features > 0) {
    p.chunk_ptr.slice(0, 1).copy_(at::cumsum(chunks, 0));
    p.partial_ptr.slice(0, 1).copy_(at::cumsum(partials, 0));
  }
  return p;
}

}  // namespace plan

// The CUDA feature_scatter's work split replayed on the CPU, serially, with `chunk` entries per work
// item (a test hook, fastclt._C._feature_scatter_replay; csrc/cpu/sparse_cpu.cpp): returns
// (out [F, D], coef_sum fp32 [F], work items used, partial rows used).
std::tuple<at::Tensor, at::Tensor, int64_t, int64_t> feature_scatter_replay(const at::Tensor& row_ptr,
                                                                            const at::Tensor& index,
                                                                            const at::Tensor& coef, const at::Tensor& x,
                                                                            int64_t n_features, int64_t chunk);

}  // namespace fastclt
#endif
