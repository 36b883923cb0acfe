"""Triton kernels of the ops (impl "triton"; see README.md and README_encode.md in this folder).

The same file names as the reference (``fastclt/ops/reference/``): each module holds an op's
kernels, launchers and ``autograd.Function``; ``_common.py`` the kernels several ops share (the
gather-decode, the dot at sparse indices and the scatter by feature) and the autotune limit.

    encode.py       encode, encode_layers (fused GEMM + activation epilogue; the encode backward)
    auxk.py         auxk_select (the fused encode over the dead features)
    decode.py       sparse_decode
    clt_decode.py   clt_decode
    molt.py         molt_decode (grouped GEMMs over the open (token, transform) pairs)

Imported lazily by the op table (``fastclt/ops/_registry.py``): ``import fastclt.ops.triton`` does
not import Triton. Kernels run on CUDA tensors, or on the CPU under ``TRITON_INTERPRET=1`` (set
before the op modules are imported) for testing.
"""
