"""The fastclt._C extension's kernels as ops (impl "cpu": C++ with OpenMP; impl "cuda": CUDA).

Python wrappers with autograd over ``torch.ops.fastclt.*``; the same file names as the reference
(``fastclt/ops/reference/``). The extension is imported on first use, so these modules import
fine when it is not built. Which C++/CUDA source computes what:

    select.py       topk, batch_topk, batch_topk_layers   csrc/cpu/select_cpu.cpp, csrc/cuda/select_kernels.cu
    encode.py       encode, encode_layers                 a dense GEMM + select.py's selections (+ threshold_compact,
                                                          topk_bias: csrc/cpu/select_cpu.cpp) + the sparse
                                                          encoder backward on sparse_cpu.cpp / sparse_kernels.cu
    auxk.py         auxk_select                           as encode.py, over the dead features
    decode.py       sparse_decode                         csrc/cpu/sparse_cpu.cpp, csrc/cuda/sparse_kernels.cu
    clt_decode.py   clt_decode                            decode.py's sparse_decode per (source, target) block;
                                                          per_source's sum over sources: csrc/cpu/prefix_cpu.cpp
    molt.py         molt_decode                           csrc/cpu/molt_cpu.cpp
    matryoshka.py   prefix_errors                         csrc/cpu/matryoshka_cpu.cpp
    losses.py       total_variance, fvu_terms             csrc/cpu/losses_cpu.cpp
    stats.py        code_stats                            csrc/cpu/sparse_cpu.cpp
    dense.py        jumprelu_masked (the dense encode's    csrc/cpu/dense_cpu.cpp
                    JumpReLU, fastclt/ops/dense/encode.py)
    _common.py      loading the extension, the encoder backward's kernels, host-pool buffers

Op schemas: csrc/bindings.cpp; CUDA glue: csrc/cuda/ops_cuda.cpp; algorithms: csrc/README.md.
"""
