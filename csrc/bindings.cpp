// fastclt._C: schemas of the fastclt ops (implementations register per device in cpu/ and cuda/)
// and build_info() for the Python side. Op semantics: csrc/README.md.
#include <torch/extension.h>
#include <torch/library.h>

TORCH_LIBRARY(fastclt, m) {
  // h [B, F] -> index int32 [B, k] (ascending per row), value [B, k] = relu(h[b, index]).
  m.def("topk(Tensor h, int k) -> (Tensor index, Tensor value)");
  // topk of h + bias (fp32, bias [F]) without forming it; value = relu(h + bias). CPU.
  m.def("topk_bias(Tensor h, Tensor bias, int k) -> (Tensor index, Tensor value)");
  // h [...] -> int64 [2^digit_bits + 1]: histogram of the next digit_bits of the order-preserving
  // uint32 key of every entry whose top prefix_bits equal prefix; last bin = NaN count.
  m.def("batch_topk_histogram(Tensor h, int prefix, int prefix_bits, int digit_bits) -> Tensor");
  // h [..., F] -> CSR over the numel/F rows: entries with key > threshold_key, plus the threshold-
  // equal entries of flat rank in [equal_skip, equal_skip + equal_take); nnz must match.
  m.def("batch_topk_compact(Tensor h, int threshold_key, int equal_skip, int equal_take, int nnz)"
        " -> (Tensor row_ptr, Tensor index, Tensor value)");
  // h [..., F] -> CSR over the numel/F rows of the k_total largest entries (ties: lowest flat
  // index), value = relu(h): exact BatchTopK on one device (CPU: block-maximum bound + filter).
  m.def("batch_topk(Tensor h, int k_total) -> (Tensor row_ptr, Tensor index, Tensor value)");
  m.def("batch_topk_bias(Tensor h, Tensor bias, int k_total) -> (Tensor row_ptr, Tensor index, Tensor value)");
  // h fp32 [L, B, F], bias [L, F] -> CSR over the L·B rows: batch_topk_bias of each layer (k_total per
  // layer), the layers one after another. CPU.
  m.def("batch_topk_bias_layers(Tensor h, Tensor bias, int k_total)"
        " -> (Tensor row_ptr, Tensor index, Tensor value)");
  // h [B, F] -> CSR of the entries with h > threshold[f] or |h - threshold[f]| < half_band (the
  // difference rounded to h's dtype; no threshold: h > 0); value fp32 = h there. CPU.
  // a fp32 [R, d] -> (a rounded to bf16 [R, d], norms fp32 [2, R]: ‖â_r‖ and ‖a_r − â_r‖, rounded up). CPU.
  m.def("bf16_split(Tensor a) -> (Tensor hi, Tensor norms)");
  // TopK / BatchTopK of h = x Wᵀ + bias (fp32 x [B, d], W [F, d]) from A = bf16 product of bf16_split's
  // parts [B, F] and their norms: the entries whose bound reaches the k-th lower bound rescored in fp32;
  // outputs as topk_bias's / batch_topk_bias's, plus status (int32: 0 screened; 1 a bound not finite;
  // 2 a rescored entry outside its bounds — the outputs are then not valid). CPU.
  m.def("screened_topk(Tensor A, Tensor x, Tensor W, Tensor? bias, Tensor x_norms, Tensor w_norms, int k)"
        " -> (Tensor index, Tensor value, Tensor status)");
  m.def("screened_batch_topk(Tensor A, Tensor x, Tensor W, Tensor? bias, Tensor x_norms, Tensor w_norms,"
        " int k_total) -> (Tensor row_ptr, Tensor index, Tensor value, Tensor status)");
  m.def("threshold_compact(Tensor h, Tensor? threshold, float half_band)"
        " -> (Tensor row_ptr, Tensor index, Tensor value)");
  // out fp32 [n] (contiguous) = n draws of N(0, std^2) from the counter-based generator of (seed, stream):
  // value i depends only on (seed, stream, i) (cpu/random_cpu.cpp; the synthetic activations' noise). CPU.
  m.def("normal_philox_(Tensor(a!) out, int seed, int stream, float std) -> ()");
  // y [B, D] = sum_j value[j] * weight[index[j]] (+ bias).
  m.def("sparse_decode(Tensor row_ptr, Tensor index, Tensor value, Tensor weight, Tensor? bias)"
        " -> Tensor");
  // An untied CLT's decode (CPU): source i = sources[i] (increasing) with codes (row_ptr[i], index[i],
  // value[i]) and block weight[i] [F_i, (n_layers - sources[i]) * d] -> y [B, n_layers * d], whose columns
  // s*d: receive source s's sparse decode (+ bias [n_layers, d]), all in one fp32 sum per token.
  m.def("clt_decode_untied(Tensor[] row_ptr, Tensor[] index, Tensor[] value, Tensor[] weight, int[] sources,"
        " int n_layers, Tensor? bias) -> Tensor");
  // out [nnz]: out[j] = <grad[row(j)], weight[index[j]]>.
  m.def("sparse_dot(Tensor row_ptr, Tensor index, Tensor grad, Tensor weight) -> Tensor");
  // out [n_features, D]: out[f] = sum_{j: index[j]=f} coef[j] * x[row(j)]; coef_sum fp32 [n_features].
  // x [B, D], rows contiguous (a row stride allowed); on the CPU also [G, B', D], rows (g, b') in order.
  m.def("feature_scatter(Tensor row_ptr, Tensor index, Tensor coef, Tensor x, int n_features)"
        " -> (Tensor out, Tensor coef_sum)");
  // feature_scatter with n_features = weight.size(0), plus dot [nnz]: dot[j] = <x[row(j)], weight[index[j]]>
  // (a decode backward's dW and dvalue in one sweep over the entries grouped by feature). CPU.
  m.def("feature_scatter_dot(Tensor row_ptr, Tensor index, Tensor coef, Tensor x, Tensor weight)"
        " -> (Tensor out, Tensor coef_sum, Tensor dot)");
  // a per_target CLT's sources as one CSR over rows (target, token) (csrc/cpu/sparse_cpu.cpp; CPU only)
  m.def("clt_by_target(Tensor row_ptrs, Tensor index, Tensor value, int n_features) -> (Tensor row_ptr, Tensor index,"
        " Tensor value)");
  // its values' backward: grad [total] of every copy in that CSR -> dvalue [n_entries], each entry's L - s copies
  // summed in fp32, target after target (CPU)
  m.def("clt_by_target_backward(Tensor row_ptrs, Tensor grad, int n_entries) -> Tensor");
  // L layers' codes (index int32 [nnz_l], value [nnz_l] per layer) -> fmin fp32 [L, n_features]: each
  // feature's smallest value > 0 (+inf where none), and active int64 [L]: the entries > 0 per layer. CPU.
  m.def("code_stats(Tensor[] index, Tensor[] value, int n_features) -> (Tensor fmin, Tensor active)");
  // MOLT (cpu/molt_cpu.cpp): gates (row_ptr, index = transform, gate) over T transforms whose rank
  // rows are rank_ptr[i]:rank_ptr[i+1] of U [R, d_out] and V [R, d_in] -> y [B, d_out] =
  // sum_j gate[j] * U_i^T V_i x_b (+ bias), and h fp32 [sum_j r_{index[j]}]: V_i x_b of every
  // entry, grouped by transform (what the backward reads). CPU.
  m.def("molt_forward(Tensor row_ptr, Tensor index, Tensor gate, Tensor x, Tensor U, Tensor V, Tensor rank_ptr,"
        " Tensor? bias) -> (Tensor y, Tensor h)");
  // Its backward from h: (d_gate [nnz], dx, dU, dV); an output not asked for is empty. CPU.
  m.def("molt_backward(Tensor row_ptr, Tensor index, Tensor gate, Tensor x, Tensor U, Tensor V, Tensor rank_ptr,"
        " Tensor h, Tensor grad_y, bool need_gate, bool need_x, bool need_U, bool need_V)"
        " -> (Tensor d_gate, Tensor dx, Tensor dU, Tensor dV)");
  // Matryoshka prefix errors (cpu/matryoshka_cpu.cpp), fp32: y [B, M, d], base [M, d] or [B, M, d],
  // blocks [G, B, M, d] -> sq [G, M] = sum_b ||y - base - (blocks[0] + ... + blocks[g])||^2 and
  // y_hat = base + sum_g blocks[g]. CPU.
  m.def("prefix_errors_forward(Tensor y, Tensor base, Tensor blocks) -> (Tensor sq, Tensor y_hat)");
  // Its backward for the upstream gradient dsq [G, M]: (dy, dbase, dblocks); one not asked for is empty. CPU.
  m.def("prefix_errors_backward(Tensor y, Tensor base, Tensor blocks, Tensor dsq, bool need_y, bool need_base,"
        " bool need_blocks) -> (Tensor dy, Tensor dbase, Tensor dblocks)");
  // Total variance (cpu/losses_cpu.cpp), fp32: y [B, M, d] -> tv [M] = sum_b ||y[b, m] - mean_b y[:, m]||^2. CPU.
  m.def("total_variance(Tensor y) -> Tensor tv");
  // fvu_terms, fp32: y, y_hat [B, M, d] -> (sq [M] = sum_b ||y[b, m] - y_hat[b, m]||^2, tv [M] as total_variance),
  // one read of each. CPU.
  m.def("fvu_terms(Tensor y, Tensor y_hat) -> (Tensor sq, Tensor tv)");
  // The per_source tying's sum over sources (cpu/prefix_cpu.cpp), fp32|bf16, each sum in fp32 in order,
  // rounded once: parts [L, R, d], bias fp32 [L, d] or none -> y [R, L, d] = Σ_{j≤l} parts[j, r] + bias[l]
  // (not cumulative: parts[l, r] + bias[l], the per_target tying's bias). CPU.
  m.def("prefix_sum(Tensor parts, Tensor? bias, bool cumulative=True) -> Tensor y");
  // Its backward: grad [R, L, d] -> (dparts [L, R, d] = Σ_{j≥l} grad[r, j] (not cumulative: grad[r, l]),
  // dbias fp32 [L, d] = Σ_r grad[r, l] when need_bias, else empty). CPU.
  m.def("prefix_sum_backward(Tensor grad, bool need_bias, bool cumulative=True) -> (Tensor dparts, Tensor dbias)");
  // Dense JumpReLU (cpu/dense_cpu.cpp), one pass: h [B, F] (fp32|bf16), threshold fp32 [F] ->
  // value = h * 1[h > θ], stored bool = active | band, code uint8 (bit0 active, bit1 band), with
  // θ and half_band rounded to h's dtype and band = |h − θ| < half_band (difference rounded to it). CPU.
  m.def("jumprelu_dense(Tensor h, Tensor threshold, float half_band) -> (Tensor value, Tensor stored, Tensor code)");
  // Its backward from code: dh = grad * bit0 (grad's dtype), dthreshold fp32 [F] = (−θ/ε) Σ_b grad * bit1
  // (summed in a fixed order); one not asked for is empty. CPU.
  m.def("jumprelu_dense_backward(Tensor grad, Tensor code, Tensor threshold, float bandwidth, bool need_h,"
        " bool need_threshold) -> (Tensor dh, Tensor dthreshold)");
}

#include <atomic>

#include "host_pool.h"
#include "scatter_plan.h"

namespace fastclt {
std::atomic<bool> g_poison_outputs{false};
}  // namespace fastclt

#define FASTCLT_STR_(x) #x
#define FASTCLT_STR(x) FASTCLT_STR_(x)

namespace {

pybind11::dict build_info() {
  pybind11::dict info;
#ifdef FASTCLT_WITH_CPU
  info["cpu"] = true;
#else
  info["cpu"] = false;
#endif
#ifdef _OPENMP
  info["openmp"] = true;
#else
  info["openmp"] = false;
#endif
#ifdef FASTCLT_WITH_CUDA
  info["cuda"] = true;
  // Compute capabilities joined by "_" (e.g. "80_90a"), set by setup.py from FASTCLT_CUDA_ARCH_LIST.
  info["cuda_arch_list"] = FASTCLT_STR(FASTCLT_CUDA_ARCHS);
#else
  info["cuda"] = false;
  info["cuda_arch_list"] = "";
#endif
  return info;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastclt C++/CUDA kernels; ops are registered under torch.ops.fastclt";
  m.def("build_info", &build_info,
        "dict: what this build holds (cpu, openmp, cuda, cuda_arch_list)");
  m.def("set_poison_outputs", [](bool on) { fastclt::g_poison_outputs.store(on); },
        "Testing hook: when on, op outputs start as NaN (floats) / -1 (integers) before the kernels write them");
  namespace hp = fastclt::host_pool;
  m.def("host_empty", [](std::vector<int64_t> sizes, at::ScalarType dtype) {
          return hp::empty(sizes, at::TensorOptions().dtype(dtype).device(at::kCPU));
        }, pybind11::arg("sizes"), pybind11::arg("dtype"),
        "Uninitialised contiguous CPU tensor; from the host pool when it holds >= 2 MiB (csrc/host_pool.h)");
  m.def("host_pool_stats", []() {
          const hp::Stats s = hp::stats();
          pybind11::dict d;
          d["cached_bytes"] = s.cached_bytes;
          d["cached_blocks"] = s.cached_blocks;
          d["limit_bytes"] = s.limit_bytes;
          d["hits"] = s.hits;
          d["misses"] = s.misses;
          return d;
        }, "dict: the host pool's unused bytes and blocks, its limit, and its hit / miss counts");
  m.def("host_pool_release", &hp::release, "Free every unused block the host pool holds");
#ifdef FASTCLT_WITH_CPU
  m.def("_feature_scatter_replay", &fastclt::feature_scatter_replay, pybind11::arg("row_ptr"), pybind11::arg("index"),
        pybind11::arg("coef"), pybind11::arg("x"), pybind11::arg("n_features"), pybind11::arg("chunk"),
        "Testing hook: the CUDA feature_scatter's chunked work split (csrc/scatter_plan.h) replayed on the CPU "
        "-> (out, coef_sum, work items, partial rows)");
#endif
  m.def("host_pool_set_limit", &hp::set_limit, pybind11::arg("bytes"),
        "Limit the unused bytes the host pool may hold (0: no caching); frees what is over it");
}
