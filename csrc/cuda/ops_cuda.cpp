// Torch glue of the CUDA kernels: validation, allocation, stream, launch. Compiled by the host
// compiler; the kernels (select_kernels.cu, sparse_kernels.cu) see only raw pointers (launch.h).
#include <ATen/ATen.h>
// c10/cuda only (not ATen/cuda/CUDAContext.h, which pulls in cuBLAS/cuSPARSE headers).
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../cpu/checks.h"
#include "../scatter_plan.h"
#include "launch.h"

namespace fastclt {
namespace {

cuda::DType kernel_dtype(const at::Tensor& t) {
  return t.scalar_type() == at::kFloat ? cuda::DType::F32 : cuda::DType::BF16;
}

void* current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

void check_cuda(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.is_cuda(), "fastclt::", op, ": ", name, " must be a CUDA tensor for the CUDA kernel, got ",
              t.device());
}

std::tuple<at::Tensor, at::Tensor> topk_cuda(const at::Tensor& h, int64_t k) {
  check_topk_args(h, k, "topk");
  check_cuda(h, "topk", "h");
  const c10::cuda::CUDAGuard guard(h.device());
  const int64_t B = h.size(0), F = h.size(1);
  auto index = new_output({B, k}, h.options().dtype(at::kInt));
  auto value = new_output({B, k}, h.options());
  // The kernel counts NaNs in its first pass over h; reading the 4-byte count back is the only sync.
  auto nan_count = at::zeros({1}, h.options().dtype(at::kInt));
  cuda::topk_rows(h.data_ptr(), kernel_dtype(h), B, F, k, index.data_ptr<int32_t>(), value.data_ptr(),
                  reinterpret_cast<unsigned int*>(nan_count.data_ptr<int32_t>()), current_stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  TORCH_CHECK(nan_count.item<int32_t>() == 0, "fastclt::topk: h contains NaN");
  return {index, value};
}

at::Tensor batch_topk_histogram_cuda(const at::Tensor& h, int64_t prefix, int64_t prefix_bits, int64_t digit_bits) {
  check_float_tensor(h, "batch_topk_histogram", "h");
  check_cuda(h, "batch_topk_histogram", "h");
  // Bins live in shared memory: 2^12 + 1 counters (16 KiB) at most.
  check_radix_args(prefix, prefix_bits, digit_bits, 12, "batch_topk_histogram");
  const c10::cuda::CUDAGuard guard(h.device());
  auto counts = at::zeros({(int64_t(1) << digit_bits) + 1}, h.options().dtype(at::kLong));
  cuda::key_histogram(h.data_ptr(), kernel_dtype(h), h.numel(), uint32_t(prefix), int(prefix_bits), int(digit_bits),
                      counts.data_ptr<int64_t>(), current_stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return counts;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_topk_compact_cuda(const at::Tensor& h, int64_t threshold_key,
                                                                       int64_t equal_skip, int64_t equal_take,
                                                                       int64_t nnz) {
  const char* op = "batch_topk_compact";
  check_compact_args(h, threshold_key, equal_skip, equal_take, nnz, op);
  check_cuda(h, op, "h");
  const c10::cuda::CUDAGuard guard(h.device());
  const int64_t F = h.size(-1);
  TORCH_CHECK(F <= INT32_MAX, "fastclt::batch_topk_compact: F must fit in int32, got ", F);
  const int64_t R = F == 0 ? 0 : h.numel() / F;
  auto longs = h.options().dtype(at::kLong);
  auto n_greater = at::empty({R}, longs), n_equal = at::empty({R}, longs);  // scratch
  cuda::compact_count(h.data_ptr(), kernel_dtype(h), R, F, uint32_t(threshold_key), n_greater.data_ptr<int64_t>(),
                      n_equal.data_ptr<int64_t>(), current_stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  // Rows' share of the threshold-equal window [equal_skip, equal_skip + equal_take), in flat order.
  auto equal_end = at::cumsum(n_equal, 0);
  auto equal_before = equal_end - n_equal;
  auto taken = (at::minimum(equal_end, at::full({}, equal_skip + equal_take, longs)) -
                at::maximum(equal_before, at::full({}, equal_skip, longs)))
                   .clamp_min(0);
  auto row_ptr = at::zeros({R + 1}, longs);
  row_ptr.slice(0, 1).copy_(at::cumsum(n_greater + taken, 0));
  const int64_t total = row_ptr[R].item<int64_t>();
  TORCH_CHECK(total == nnz, "fastclt::batch_topk_compact: threshold_key/equal_skip/equal_take select ", total,
              " entries but nnz=", nnz, " was requested");
  auto index = new_output({nnz}, h.options().dtype(at::kInt));
  auto value = new_output({nnz}, h.options());
  cuda::compact_write(h.data_ptr(), kernel_dtype(h), R, F, uint32_t(threshold_key),
                      equal_before.data_ptr<int64_t>(), equal_skip, equal_take, row_ptr.data_ptr<int64_t>(),
                      index.data_ptr<int32_t>(), value.data_ptr(), current_stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {row_ptr, index, value};
}

at::Tensor sparse_decode_cuda(const at::Tensor& row_ptr, const at::Tensor& index, const at::Tensor& value,
                              const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  const char* op = "sparse_decode";
  const int64_t B = check_codes(row_ptr, index, value, op, "value");
  check_cuda(row_ptr, op, "row_ptr");
  check_matrix(weight, row_ptr, op, "weight");
  check_value_dtype(value, weight, op);
  const int64_t F = weight.size(0), D = weight.size(1);
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == D, "fastclt::sparse_decode: bias must have shape [D=", D,
                "], got ", bias->sizes());
    check_float_tensor(*bias, op, "bias");
    check_same_dtype(*bias, weight, op, "bias", "weight");
    check_device(*bias, row_ptr, op, "bias", "row_ptr");
  }
  const c10::cuda::CUDAGuard guard(row_ptr.device());
  auto y = new_output({B, D}, weight.options());
  cuda::sparse_decode(row_ptr.data_ptr<int64_t>(), index.data_ptr<int32_t>(), value.data_ptr(), kernel_dtype(value),
                      weight.data_ptr(), bias.has_value() ? bias->data_ptr() : nullptr, kernel_dtype(weight), B, F, D,
                      y.data_ptr(), current_stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return y;
}

at::Tensor sparse_dot_cuda(const at::Tensor& row_ptr, const at::Tensor& index, const at::Tensor& grad,
                           const at::Tensor& weight) {
  const char* op = "sparse_dot";
  TORCH_CHECK(row_ptr.scalar_type() == at::kLong && row_ptr.dim() == 1 && row_ptr.size(0) >= 1 &&
                  row_ptr.is_contiguous(),
              "fastclt::sparse_dot: row_ptr must be a contiguous 1-D int64 tensor of length B+1 >= 1, got ",
              row_ptr.scalar_type(), " ", row_ptr.sizes());
  TORCH_CHECK(index.scalar_type() == at::kInt && index.dim() == 1 && index.is_contiguous(),
              "fastclt::sparse_dot: index must be a contiguous 1-D int32 tensor, got ", index.scalar_type(), " ",
              index.sizes());
  check_cuda(row_ptr, op, "row_ptr");
  check_device(index, row_ptr, op, "index", "row_ptr");
  check_matrix(grad, row_ptr, op, "grad");
  check_matrix(weight, row_ptr, op, "weight");
  check_same_dtype(grad, weight, op, "grad", "weight");
  const int64_t B = row_ptr.size(0) - 1, D = weight.size(1);
  TORCH_CHECK(grad.size(0) == B && grad.size(1) == D, "fastclt::sparse_dot: grad must have shape [B=", B, ", D=", D,
              "], got ", grad.sizes());
  const c10::cuda::CUDAGuard guard(row_ptr.device());
  auto out = new_output({index.size(0)}, weight.options());
  cuda::sparse_dot(row_ptr.data_ptr<int64_t>(), index.data_ptr<int32_t>(), grad.data_ptr(), weight.data_ptr(),
                   kernel_dtype(weight), B, weight.size(0), D, out.data_ptr(), current_stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

std::tuple<at::Tensor, at::Tensor> feature_scatter_cuda(const at::Tensor& row_ptr, const at::Tensor& index,
                                                        const at::Tensor& coef, const at::Tensor& x,
                                                        int64_t n_features) {
  const char* op = "feature_scatter";
  const int64_t B = check_codes(row_ptr, index, coef, op, "coef");
  check_cuda(row_ptr, op, "row_ptr");
  check_matrix(x, row_ptr, op, "x");
  check_same_dtype(coef, x, op, "coef", "x");
  TORCH_CHECK(x.size(0) == B, "fastclt::feature_scatter: x must have B=", B, " rows, got ", x.size(0));
  TORCH_CHECK(n_features >= 0 && n_features <= INT32_MAX,
              "fastclt::feature_scatter: n_features must be in [0, 2^31), got ", n_features);
  const c10::cuda::CUDAGuard guard(row_ptr.device());
  const int64_t nnz = index.size(0), D = x.size(1);
  // Entries grouped by feature (stable sort: flat order within a feature) and split into chunks of
  // at most kScatterChunk, hot features over several warps (csrc/scatter_plan.h); no device sync.
  const int64_t chunk = plan::kScatterChunk;
  const auto p = plan::make_scatter_plan(index, n_features, chunk);
  auto row_of = new_output({nnz}, row_ptr.options());
  cuda::entry_rows(row_ptr.data_ptr<int64_t>(), B, row_of.data_ptr<int64_t>(), current_stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  auto out = new_output({n_features, D}, x.options());
  auto coef_sum = new_output({n_features}, x.options().dtype(at::kFloat));
  const int64_t n_partials = plan::scatter_partial_bound(nnz, chunk);
  auto partials = at::empty({n_partials, D}, x.options().dtype(at::kFloat));
  auto partial_coef = at::empty({n_partials}, x.options().dtype(at::kFloat));
  cuda::feature_scatter(p.feat_ptr.data_ptr<int64_t>(), p.chunk_ptr.data_ptr<int64_t>(),
                        p.partial_ptr.data_ptr<int64_t>(), chunk, plan::scatter_work_bound(n_features, nnz, chunk),
                        p.order.data_ptr<int64_t>(), row_of.data_ptr<int64_t>(), coef.data_ptr(), x.data_ptr(),
                        kernel_dtype(x), n_features, D, out.data_ptr(), coef_sum.data_ptr<float>(),
                        partials.data_ptr<float>(), partial_coef.data_ptr<float>(), current_stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {out, coef_sum};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastclt, CUDA, m) {
  m.impl("topk", &topk_cuda);
  m.impl("batch_topk_histogram", &batch_topk_histogram_cuda);
  m.impl("batch_topk_compact", &batch_topk_compact_cuda);
  m.impl("sparse_decode", &sparse_decode_cuda);
  m.impl("sparse_dot", &sparse_dot_cuda);
  m.impl("feature_scatter", &feature_scatter_cuda);
}

}  // namespace fastclt
