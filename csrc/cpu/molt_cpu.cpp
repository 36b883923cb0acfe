// CPU kernels of the MOLT transforms (fastclt/ops/molt.py has the math):
//   molt_forward   y[b] = sum_{j in row b} g_j * U_i^T (V_i x_b)  (+ bias),  i = index[j]
//   molt_backward  d_gate, d_x, dU, dV of that map
// V: [R, d_in] and U: [R, d_out] hold the r_i rows rank_ptr[i] : rank_ptr[i+1] of each transform.
//
// Only the active (token, transform) pairs cost anything. The entries are grouped by transform
// with a stable counting sort (tokens in ascending order within a transform); each transform's
// low-rank products are then dense GEMMs over its n_i tokens:
//   H_i  = X_i V_i^T        [n_i, r_i]   (kept for the backward, fp32, "h")
//   y   += diag(g) H_i U_i  scattered to the tokens' rows
//   T_i  = dY_i U_i^T       dg = rowwise <T_i, H_i>      dU_i = H_i^T diag(g) dY_i
//   dH_i = diag(g) T_i      dV_i = dH_i^T X_i            dx  += dH_i V_i  scattered
// One task per transform (dynamic schedule; the groups come largest rank first) for everything a
// transform owns (H_i, its rows of the products, dU_i, dV_i, its entries' dg). The sums into token
// rows (y, dx) are not scattered from those tasks: each transform writes its entries' product rows
// ([n_i, d] of an fp32 [nnz, d] workspace from the host pool), and one task per token then sums
// its own entries' rows in their order. Every output element has one writer and a fixed
// summation order: deterministic, and independent of the thread count. GEMMs go through
// at::mm_out on views of thread-local fp32 buffers (single-threaded inside the parallel region);
// bf16 inputs are widened per transform.
#include <ATen/ATen.h>
#include <c10/core/InferenceMode.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "checks.h"

namespace fastclt {
namespace {

constexpr const char* kFwd = "molt_forward";
constexpr const char* kBwd = "molt_backward";

// C[m, n] (row stride ldc) = A @ op(B) (+ C when accumulate); A [m, k] or, with ta, A^T of a
// [k, m] matrix; B [k, n] or, with tb, B^T of an [n, k] matrix. Row-major fp32, unit column stride.
void gemm(const float* A, int64_t lda, bool ta, const float* B, int64_t ldb, bool tb, float* C, int64_t ldc,
          int64_t m, int64_t n, int64_t k, bool accumulate = false) {
  if (m == 0 || n == 0) return;
  const auto opts = at::TensorOptions().dtype(at::kFloat);
  auto a = ta ? at::from_blob(const_cast<float*>(A), {k, m}, {lda, 1}, opts).t()
              : at::from_blob(const_cast<float*>(A), {m, k}, {lda, 1}, opts);
  auto b = tb ? at::from_blob(const_cast<float*>(B), {n, k}, {ldb, 1}, opts).t()
              : at::from_blob(const_cast<float*>(B), {k, n}, {ldb, 1}, opts);
  auto c = at::from_blob(C, {m, n}, {ldc, 1}, opts);
  if (k == 0) {
    if (!accumulate) c.zero_();
    return;
  }
  if (accumulate) {
    at::addmm_out(c, c, a, b);
  } else {
    at::mm_out(c, a, b);
  }
}

// rows [r, D] of a T matrix (row stride ld) as fp32: the rows themselves for fp32, else widened into buf.
template <typename T>
const float* as_float(const T* src, int64_t rows, int64_t D, int64_t ld, std::vector<float>& buf) {
  if constexpr (std::is_same_v<T, float>) {
    return src;
  } else {
    buf.resize(rows * D);
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t d = 0; d < D; ++d) buf[r * D + d] = static_cast<float>(src[r * ld + d]);
    return buf.data();
  }
}

// dst [n, D] fp32 = src rows rows[0..n) (row stride D), widened.
template <typename T>
void gather_rows(const T* src, const int64_t* rows, int64_t n, int64_t D, float* dst) {
  for (int64_t e = 0; e < n; ++e) {
    const T* s = src + rows[e] * D;
    float* o = dst + e * D;
    for (int64_t d = 0; d < D; ++d) o[d] = static_cast<float>(s[d]);
  }
}

template <typename T>
void store_rows(const float* src, int64_t n, int64_t D, T* dst) {
  for (int64_t i = 0; i < n * D; ++i) dst[i] = T(src[i]);
}

// The entries grouped by transform: order[seg[i] : seg[i+1]] are transform i's entries in flat
// (token) order, rows[j] the token of flat entry j, hoff[i] where H_i starts in the packed h.
struct Plan {
  int64_t B = 0, nnz = 0, T = 0;
  std::vector<int64_t> rows, seg, order, hoff;
  const int64_t* rank = nullptr;  // rank_ptr [T + 1]

  int64_t r(int64_t i) const { return rank[i + 1] - rank[i]; }
};

void check_contents(const at::Tensor& row_ptr, const at::Tensor& index, const at::Tensor& rank_ptr, int64_t R,
                    const char* op) {
  const int64_t* rp = row_ptr.data_ptr<int64_t>();
  const int64_t B = row_ptr.size(0) - 1, nnz = index.size(0), T = rank_ptr.size(0) - 1;
  TORCH_CHECK(rp[0] == 0 && rp[B] == nnz, "fastclt::", op, ": row_ptr must start at 0 and end at nnz=", nnz,
              ", got ", rp[0], " and ", rp[B]);
  for (int64_t b = 0; b < B; ++b)
    TORCH_CHECK(rp[b] <= rp[b + 1], "fastclt::", op, ": row_ptr must be non-decreasing (row ", b, ")");
  const int64_t* rk = rank_ptr.data_ptr<int64_t>();
  TORCH_CHECK(rk[0] == 0 && rk[T] == R, "fastclt::", op, ": rank_ptr must start at 0 and end at R=", R,
              " (the rows of U and V), got ", rk[0], " and ", rk[T]);
  for (int64_t i = 0; i < T; ++i)
    TORCH_CHECK(rk[i] <= rk[i + 1], "fastclt::", op, ": rank_ptr must be non-decreasing (transform ", i, ")");
  const int32_t* idx = index.data_ptr<int32_t>();
  for (int64_t j = 0; j < nnz; ++j)
    TORCH_CHECK(idx[j] >= 0 && idx[j] < T, "fastclt::", op, ": index must lie in [0, T=", T, "), got ", idx[j],
                " at entry ", j);
}

Plan make_plan(const at::Tensor& row_ptr, const at::Tensor& index, const at::Tensor& rank_ptr) {
  Plan p;
  p.B = row_ptr.size(0) - 1;
  p.nnz = index.size(0);
  p.T = rank_ptr.size(0) - 1;
  p.rank = rank_ptr.data_ptr<int64_t>();
  const int64_t* rp = row_ptr.data_ptr<int64_t>();
  const int32_t* idx = index.data_ptr<int32_t>();
  p.rows.resize(p.nnz);
  for (int64_t b = 0; b < p.B; ++b)
    for (int64_t j = rp[b]; j < rp[b + 1]; ++j) p.rows[j] = b;
  p.seg.assign(p.T + 1, 0);
  for (int64_t j = 0; j < p.nnz; ++j) ++p.seg[idx[j] + 1];
  for (int64_t i = 0; i < p.T; ++i) p.seg[i + 1] += p.seg[i];
  p.order.resize(p.nnz);
  std::vector<int64_t> fill(p.seg.begin(), p.seg.end() - 1);
  for (int64_t j = 0; j < p.nnz; ++j) p.order[fill[idx[j]]++] = j;
  p.hoff.assign(p.T + 1, 0);
  for (int64_t i = 0; i < p.T; ++i) p.hoff[i + 1] = p.hoff[i] + (p.seg[i + 1] - p.seg[i]) * p.r(i);
  return p;
}

// out[b] = bias + sum over b's entries j of coef_j * O[pos_j]: the token-major sum of per-entry rows
// O [nnz, D] (grouped by transform: pos_j is entry j's row there), one task per token (fixed
// order: deterministic), fp32 accumulation; coef = gate values (or none: 1).
template <typename T, typename G>
void reduce_rows(const Plan& p, const int64_t* row_ptr, const std::vector<int64_t>& pos, const float* O, int64_t D,
                 const G* coef, const T* bias, T* out) {
#pragma omp parallel
  {
    std::vector<float> acc(D);
#pragma omp for schedule(static)
    for (int64_t b = 0; b < p.B; ++b) {
      for (int64_t d = 0; d < D; ++d) acc[d] = bias ? static_cast<float>(bias[d]) : 0.f;
      for (int64_t j = row_ptr[b]; j < row_ptr[b + 1]; ++j) {
        const float c = coef ? static_cast<float>(coef[j]) : 1.f;
        const float* o = O + pos[j] * D;
        for (int64_t d = 0; d < D; ++d) acc[d] += c * o[d];
      }
      T* y = out + b * D;
      for (int64_t d = 0; d < D; ++d) y[d] = T(acc[d]);
    }
  }
}

// pos[j]: the row of flat entry j in the grouped order (the inverse of order).
std::vector<int64_t> grouped_positions(const Plan& p) {
  std::vector<int64_t> pos(p.nnz);
  for (int64_t e = 0; e < p.nnz; ++e) pos[p.order[e]] = e;
  return pos;
}

void check_args(const at::Tensor& row_ptr, const at::Tensor& index, const at::Tensor& gate, const at::Tensor& x,
                const at::Tensor& U, const at::Tensor& V, const at::Tensor& rank_ptr, const char* op) {
  const int64_t B = check_codes(row_ptr, index, gate, op, "gate");
  check_matrix(x, row_ptr, op, "x");
  check_matrix(U, row_ptr, op, "U");
  check_matrix(V, row_ptr, op, "V");
  check_same_dtype(U, x, op, "U", "x");
  check_same_dtype(V, x, op, "V", "x");
  TORCH_CHECK(gate.scalar_type() == x.scalar_type() || gate.scalar_type() == at::kFloat, "fastclt::", op,
              ": gate (", gate.scalar_type(), ") must have x's dtype (", x.scalar_type(), ") or be float32");
  TORCH_CHECK(x.size(0) == B, "fastclt::", op, ": x must have B=", B, " rows (one per codes row), got ", x.sizes());
  TORCH_CHECK(V.size(0) == U.size(0) && V.size(1) == x.size(1), "fastclt::", op, ": V must be [R=", U.size(0),
              ", d_in=", x.size(1), "], got ", V.sizes());
  TORCH_CHECK(rank_ptr.scalar_type() == at::kLong && rank_ptr.dim() == 1 && rank_ptr.size(0) >= 1 &&
                  rank_ptr.is_contiguous(),
              "fastclt::", op, ": rank_ptr must be a contiguous 1-D int64 tensor of length T+1, got ",
              rank_ptr.scalar_type(), " ", rank_ptr.sizes());
  TORCH_CHECK(row_ptr.device().is_cpu() && rank_ptr.device().is_cpu(), "fastclt::", op,
              ": CPU kernel called on ", row_ptr.device());
  check_contents(row_ptr, index, rank_ptr, U.size(0), op);
}

template <typename T, typename G>
void forward_impl(const Plan& p, const int64_t* row_ptr, const G* gate, const T* x, const T* U, const T* V,
                  const T* bias, int64_t d_in, int64_t d_out, float* h, T* y) {
  // O_i = H_i U_i for every transform, rows in grouped order; then y[b] = bias + sum_j g_j O[pos_j]
  auto O = host_pool::empty({std::max<int64_t>(p.nnz, 1), d_out}, at::TensorOptions().dtype(at::kFloat));
  float* o = O.data_ptr<float>();
#pragma omp parallel
  {
    c10::InferenceMode guard;
    std::vector<float> xs, vbuf, ubuf;
    std::vector<int64_t> rows;
#pragma omp for schedule(dynamic, 1)
    for (int64_t i = 0; i < p.T; ++i) {
      const int64_t n = p.seg[i + 1] - p.seg[i], r = p.r(i);
      if (n == 0) continue;
      rows.resize(n);
      for (int64_t e = 0; e < n; ++e) rows[e] = p.rows[p.order[p.seg[i] + e]];
      xs.resize(n * d_in);
      gather_rows(x, rows.data(), n, d_in, xs.data());
      float* Hi = h + p.hoff[i];
      const float* Vi = as_float(V + p.rank[i] * d_in, r, d_in, d_in, vbuf);
      gemm(xs.data(), d_in, false, Vi, d_in, true, Hi, r, n, r, d_in);  // H_i = X_i V_i^T
      const float* Ui = as_float(U + p.rank[i] * d_out, r, d_out, d_out, ubuf);
      gemm(Hi, r, false, Ui, d_out, false, o + p.seg[i] * d_out, d_out, n, d_out, r);  // O_i = H_i U_i
    }
  }
  reduce_rows<T, G>(p, row_ptr, grouped_positions(p), o, d_out, gate, bias, y);
}

std::tuple<at::Tensor, at::Tensor> molt_forward_cpu(
    const at::Tensor& row_ptr, const at::Tensor& index, const at::Tensor& gate, const at::Tensor& x,
    const at::Tensor& U, const at::Tensor& V, const at::Tensor& rank_ptr, const std::optional<at::Tensor>& bias) {
  check_args(row_ptr, index, gate, x, U, V, rank_ptr, kFwd);
  const int64_t d_in = x.size(1), d_out = U.size(1);
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == d_out, "fastclt::molt_forward: bias must have shape [d_out=",
                d_out, "], got ", bias->sizes());
    check_float_tensor(*bias, kFwd, "bias");
    check_same_dtype(*bias, U, kFwd, "bias", "U");
  }
  const Plan p = make_plan(row_ptr, index, rank_ptr);
  auto y = new_output({p.B, d_out}, U.options());
  auto h = new_output({p.hoff[p.T]}, U.options().dtype(at::kFloat));
  dispatch_float(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    auto run = [&](auto gate_tag) {
      using G = decltype(gate_tag);
      forward_impl<T, G>(p, row_ptr.data_ptr<int64_t>(), gate.data_ptr<G>(), x.data_ptr<T>(), U.data_ptr<T>(), V.data_ptr<T>(),
                         bias.has_value() ? bias->data_ptr<T>() : nullptr, d_in, d_out, h.data_ptr<float>(),
                         y.data_ptr<T>());
    };
    if (gate.scalar_type() == at::kFloat) {
      run(float{});
    } else {
      run(T{});
    }
  });
  return {y, h};
}

// ox (when dx is wanted): the rows dH_e V_i of every entry, grouped by transform ([nnz, d_in]).
template <typename T, typename G>
void backward_impl(const Plan& p, const G* gate, const T* x, const T* U, const T* V, const float* h,
                   const T* grad, int64_t d_in, int64_t d_out, G* d_gate, T* dU, T* dV, float* ox) {
#pragma omp parallel
  {
    c10::InferenceMode guard;
    std::vector<float> gy, xs, t, ubuf, vbuf, wout;
    std::vector<int64_t> rows;
#pragma omp for schedule(dynamic, 1)
    for (int64_t i = 0; i < p.T; ++i) {
      const int64_t n = p.seg[i + 1] - p.seg[i], r = p.r(i), r0 = p.rank[i];
      if (n == 0 || r == 0) {  // an unused transform: zero gradient rows
        if (dU) std::fill(dU + r0 * d_out, dU + (r0 + r) * d_out, T(0.f));
        if (dV) std::fill(dV + r0 * d_in, dV + (r0 + r) * d_in, T(0.f));
        continue;
      }
      const int64_t* ord = p.order.data() + p.seg[i];
      const float* Hi = h + p.hoff[i];
      rows.resize(n);
      for (int64_t e = 0; e < n; ++e) rows[e] = p.rows[ord[e]];
      gy.resize(n * d_out);
      gather_rows(grad, rows.data(), n, d_out, gy.data());
      const float* Ui = as_float(U + r0 * d_out, r, d_out, d_out, ubuf);
      t.resize(n * r);
      gemm(gy.data(), d_out, false, Ui, d_out, true, t.data(), r, n, r, d_out);  // T_i = dY_i U_i^T
      if (d_gate) {
        for (int64_t e = 0; e < n; ++e) {
          float s = 0.f;
          for (int64_t k = 0; k < r; ++k) s += t[e * r + k] * Hi[e * r + k];
          d_gate[ord[e]] = G(s);
        }
      }
      if (dU) {  // dU_i = H_i^T diag(g) dY_i
        for (int64_t e = 0; e < n; ++e) {
          const float c = static_cast<float>(gate[ord[e]]);
          for (int64_t d = 0; d < d_out; ++d) gy[e * d_out + d] *= c;
        }
        if constexpr (std::is_same_v<T, float>) {
          gemm(Hi, r, true, gy.data(), d_out, false, dU + r0 * d_out, d_out, r, d_out, n);
        } else {
          wout.resize(r * d_out);
          gemm(Hi, r, true, gy.data(), d_out, false, wout.data(), d_out, r, d_out, n);
          store_rows(wout.data(), r, d_out, dU + r0 * d_out);
        }
      }
      if (!dV && !ox) continue;
      for (int64_t e = 0; e < n; ++e) {  // dH_i = diag(g) T_i
        const float c = static_cast<float>(gate[ord[e]]);
        for (int64_t k = 0; k < r; ++k) t[e * r + k] *= c;
      }
      if (dV) {  // dV_i = dH_i^T X_i
        xs.resize(n * d_in);
        gather_rows(x, rows.data(), n, d_in, xs.data());
        if constexpr (std::is_same_v<T, float>) {
          gemm(t.data(), r, true, xs.data(), d_in, false, dV + r0 * d_in, d_in, r, d_in, n);
        } else {
          wout.resize(r * d_in);
          gemm(t.data(), r, true, xs.data(), d_in, false, wout.data(), d_in, r, d_in, n);
          store_rows(wout.data(), r, d_in, dV + r0 * d_in);
        }
      }
      if (ox) {  // dx rows: dH_i V_i
        const float* Vi = as_float(V + r0 * d_in, r, d_in, d_in, vbuf);
        gemm(t.data(), r, false, Vi, d_in, false, ox + p.seg[i] * d_in, d_in, n, d_in, r);
      }
    }
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> molt_backward_cpu(
    const at::Tensor& row_ptr, const at::Tensor& index, const at::Tensor& gate, const at::Tensor& x,
    const at::Tensor& U, const at::Tensor& V, const at::Tensor& rank_ptr, const at::Tensor& h,
    const at::Tensor& grad_y, bool need_gate, bool need_x, bool need_U, bool need_V) {
  check_args(row_ptr, index, gate, x, U, V, rank_ptr, kBwd);
  const int64_t d_in = x.size(1), d_out = U.size(1);
  check_matrix(grad_y, row_ptr, kBwd, "grad_y");
  check_same_dtype(grad_y, U, kBwd, "grad_y", "U");
  TORCH_CHECK(grad_y.size(0) == x.size(0) && grad_y.size(1) == d_out, "fastclt::molt_backward: grad_y must be [B=",
              x.size(0), ", d_out=", d_out, "], got ", grad_y.sizes());
  const Plan p = make_plan(row_ptr, index, rank_ptr);
  TORCH_CHECK(h.scalar_type() == at::kFloat && h.dim() == 1 && h.size(0) == p.hoff[p.T] && h.is_contiguous(),
              "fastclt::molt_backward: h must be the contiguous fp32 [", p.hoff[p.T], "] of molt_forward, got ",
              h.scalar_type(), " ", h.sizes());
  at::Tensor d_gate, dx, dU, dV, ox;
  if (need_gate) d_gate = new_output({p.nnz}, gate.options());
  if (need_U) dU = new_output(U.sizes(), U.options());
  if (need_V) dV = new_output(V.sizes(), V.options());
  if (need_x) {
    dx = new_output(x.sizes(), x.options());
    ox = host_pool::empty({std::max<int64_t>(p.nnz, 1), d_in}, h.options());
  }
  dispatch_float(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    auto run = [&](auto gate_tag) {
      using G = decltype(gate_tag);
      backward_impl<T, G>(p, gate.data_ptr<G>(), x.data_ptr<T>(), U.data_ptr<T>(), V.data_ptr<T>(),
                          h.data_ptr<float>(), grad_y.data_ptr<T>(), d_in, d_out,
                          need_gate ? d_gate.data_ptr<G>() : nullptr, need_U ? dU.data_ptr<T>() : nullptr,
                          need_V ? dV.data_ptr<T>() : nullptr, need_x ? ox.data_ptr<float>() : nullptr);
      if (need_x)  // dx_b = sum over b's entries of dH_e V_i
        reduce_rows<T, G>(p, row_ptr.data_ptr<int64_t>(), grouped_positions(p), ox.data_ptr<float>(), d_in,
                          nullptr, nullptr, dx.data_ptr<T>());
    };
    if (gate.scalar_type() == at::kFloat) {
      run(float{});
    } else {
      run(T{});
    }
  });
  auto none = at::empty({0}, x.options());
  return {need_gate ? d_gate : none, need_x ? dx : none, need_U ? dU : none, need_V ? dV : none};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastclt, CPU, m) {
  m.impl("molt_forward", &molt_forward_cpu);
  m.impl("molt_backward", &molt_backward_cpu);
}

}  // namespace fastclt
