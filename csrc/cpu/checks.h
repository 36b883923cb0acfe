// Input validation shared by the CPU and CUDA implementations of the fastclt ops.
//
// Every op validates its arguments here before touching memory, so that a bad call is a
// RuntimeError naming the op and the argument, never a crash or a silent wrong answer.
// Device-agnostic (ATen only); it lives in cpu/ because the CPU part is always built.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "../host_pool.h"

namespace fastclt {

// Testing hook (fastclt._C.set_poison_outputs): when set, every output the ops allocate starts as
// NaN (floats) or -1 (integers), so a test sees any element a kernel forgot to write.
extern std::atomic<bool> g_poison_outputs;

// An op's uninitialised output; large CPU outputs come from the host pool (no page faults when a
// block of that size was freed before, e.g. last step's gradient).
inline at::Tensor new_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  auto t = options.device().is_cpu() ? host_pool::empty(sizes, options) : at::empty(sizes, options);
  if (g_poison_outputs.load(std::memory_order_relaxed)) {
    if (at::isFloatingType(options.dtype().toScalarType())) {
      t.fill_(NAN);
    } else {
      t.fill_(-1);
    }
  }
  return t;
}

// Order-preserving map from fp32 bits to uint32: a < b as floats  <=>  key(a) < key(b) as
// unsigned integers (for non-NaN a, b). Negative floats get all bits inverted, the others the sign
// bit set; branch-free (a branch on the sign mispredicts on half of the entries of random data).
// Adding +0.0 folds -0.0 onto +0.0 (IEEE: -0 + +0 = +0), so the two zeros tie and the lowest-index
// rule decides between them, as for torch.topk; this needs no -ffast-math (which would drop it).
inline uint32_t float_key(float x) {
  x += 0.0f;
  uint32_t u;
  std::memcpy(&u, &x, sizeof(u));
  return u ^ (uint32_t(int32_t(u) >> 31) | 0x80000000u);
}

// The float whose float_key is `key` (-0.0 comes back as +0.0): lets a selection write the values
// it kept from their keys, without reading the entries again.
inline float key_float(uint32_t key) {
  const uint32_t u = key ^ (uint32_t(int32_t(~key) >> 31) | 0x80000000u);
  float x;
  std::memcpy(&x, &u, sizeof(x));
  return x;
}

// Calls fn(scalar_t{}) with scalar_t = float or at::BFloat16 (the two dtypes the kernels take).
template <typename Fn>
inline void dispatch_float(at::ScalarType dtype, Fn&& fn) {
  if (dtype == at::kFloat) {
    fn(float{});
  } else {
    fn(at::BFloat16{});
  }
}

inline void check_float_tensor(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16, "fastclt::", op,
              ": ", name, " must be float32 or bfloat16, got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), "fastclt::", op, ": ", name, " must be contiguous");
}

inline void check_device(const at::Tensor& t, const at::Tensor& ref, const char* op,
                         const char* name, const char* ref_name) {
  TORCH_CHECK(t.device() == ref.device(), "fastclt::", op, ": ", name, " is on ", t.device(),
              " but ", ref_name, " is on ", ref.device());
}

// row_ptr int64 [B+1], index int32 [nnz], value [nnz] (float32|bfloat16), all contiguous and on
// one device. Returns B.
inline int64_t check_codes(const at::Tensor& row_ptr, const at::Tensor& index,
                           const at::Tensor& value, const char* op, const char* value_name) {
  TORCH_CHECK(row_ptr.scalar_type() == at::kLong && row_ptr.dim() == 1 && row_ptr.size(0) >= 1,
              "fastclt::", op, ": row_ptr must be a 1-D int64 tensor of length B+1 >= 1, got ",
              row_ptr.scalar_type(), " of shape ", row_ptr.sizes());
  TORCH_CHECK(row_ptr.is_contiguous(), "fastclt::", op, ": row_ptr must be contiguous");
  TORCH_CHECK(index.scalar_type() == at::kInt && index.dim() == 1, "fastclt::", op,
              ": index must be a 1-D int32 tensor, got ", index.scalar_type(), " of shape ",
              index.sizes());
  TORCH_CHECK(index.is_contiguous(), "fastclt::", op, ": index must be contiguous");
  TORCH_CHECK(value.dim() == 1 && value.size(0) == index.size(0), "fastclt::", op, ": ",
              value_name, " must be 1-D with one entry per index (", index.size(0), "), got shape ",
              value.sizes());
  check_float_tensor(value, op, value_name);
  check_device(index, row_ptr, op, "index", "row_ptr");
  check_device(value, row_ptr, op, value_name, "row_ptr");
  return row_ptr.size(0) - 1;
}

// A 2-D [rows, cols] float32|bfloat16 contiguous matrix on the device of `ref`.
inline void check_matrix(const at::Tensor& t, const at::Tensor& ref, const char* op,
                         const char* name) {
  TORCH_CHECK(t.dim() == 2, "fastclt::", op, ": ", name, " must be 2-D, got shape ", t.sizes());
  check_float_tensor(t, op, name);
  check_device(t, ref, op, name, "row_ptr");
}

inline void check_same_dtype(const at::Tensor& a, const at::Tensor& b, const char* op,
                             const char* a_name, const char* b_name) {
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), "fastclt::", op, ": ", a_name, " (",
              a.scalar_type(), ") and ", b_name, " (", b.scalar_type(),
              ") must have the same dtype");
}

// A decode's coefficients: weight's dtype, or float32 with bfloat16 weights (not rounded to bf16
// before the fp32 sum).
inline void check_value_dtype(const at::Tensor& value, const at::Tensor& weight, const char* op) {
  TORCH_CHECK(value.scalar_type() == weight.scalar_type() ||
                  (value.scalar_type() == at::kFloat && weight.scalar_type() == at::kBFloat16),
              "fastclt::", op, ": value (", value.scalar_type(), ") must have weight's dtype (",
              weight.scalar_type(), ") or be float32");
}

// digit_bits <= max_digit_bits, 0 <= prefix_bits, prefix_bits + digit_bits <= 32,
// 0 <= prefix < 2^prefix_bits.
inline void check_radix_args(int64_t prefix, int64_t prefix_bits, int64_t digit_bits,
                             int64_t max_digit_bits, const char* op) {
  TORCH_CHECK(digit_bits >= 1 && digit_bits <= max_digit_bits, "fastclt::", op,
              ": digit_bits must be in [1, ", max_digit_bits, "], got ", digit_bits);
  TORCH_CHECK(prefix_bits >= 0 && prefix_bits + digit_bits <= 32, "fastclt::", op,
              ": prefix_bits must be in [0, 32 - digit_bits], got ", prefix_bits);
  TORCH_CHECK(prefix >= 0 && (prefix_bits == 32 || prefix < (int64_t(1) << prefix_bits)),
              "fastclt::", op, ": prefix must be in [0, 2^prefix_bits), got ", prefix);
}

// Validation of batch_topk_compact's scalar arguments against the input h [..., F].
inline void check_compact_args(const at::Tensor& h, int64_t threshold_key, int64_t equal_skip,
                               int64_t equal_take, int64_t nnz, const char* op) {
  TORCH_CHECK(h.dim() >= 2, "fastclt::", op, ": h must have at least 2 dims [..., F], got shape ",
              h.sizes());
  check_float_tensor(h, op, "h");
  TORCH_CHECK(threshold_key >= 0 && threshold_key <= 0xFFFFFFFFLL, "fastclt::", op,
              ": threshold_key must be a uint32 key in [0, 2^32), got ", threshold_key);
  TORCH_CHECK(equal_skip >= 0 && equal_take >= 0, "fastclt::", op,
              ": equal_skip and equal_take must be >= 0, got ", equal_skip, " and ", equal_take);
  TORCH_CHECK(nnz >= 0 && nnz <= h.numel(), "fastclt::", op, ": nnz must be in [0, h.numel()=",
              h.numel(), "], got ", nnz);
}

inline void check_topk_args(const at::Tensor& h, int64_t k, const char* op) {
  TORCH_CHECK(h.dim() == 2, "fastclt::", op, ": h must be 2-D [B, F], got shape ", h.sizes());
  check_float_tensor(h, op, "h");
  TORCH_CHECK(k >= 1 && k <= h.size(1), "fastclt::", op, ": k must be in [1, F=", h.size(1),
              "], got ", k);
  TORCH_CHECK(h.size(1) <= INT32_MAX, "fastclt::", op, ": F must fit in int32, got ", h.size(1));
}

}  // namespace fastclt
