"""fastclt._C CUDA kernels: the cases of tests/test_ext_cpu.py, run on a GPU when there is one.

Nothing here touches CUDA at import time: the skip conditions only ask whether CUDA is available.
"""
from __future__ import annotations

import importlib.util
import pathlib

import pytest
import torch

from fastclt import _ext
from fastclt.ops import ext_ops

# Loaded by path so that this works under any pytest import mode.
_spec = importlib.util.spec_from_file_location("_fastclt_test_ext_cpu", pathlib.Path(__file__).with_name("test_ext_cpu.py"))
_cases = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_cases)

poison_outputs = _cases.poison_outputs  # the autouse NaN-poisoning fixture


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.skipif(not _ext.has_cuda_ext(), reason=_ext.missing_message("cuda"))
class TestExtCUDA(_cases.ExtCases):
    device = "cuda"

    def test_cuda_matches_cpu_kernels(self):
        """Same selection and (to fp32 rounding) the same decode on both devices."""
        if not _ext.has_cpu_ext():
            pytest.skip("CPU kernels not built")
        h = torch.randn(64, 1001)
        for fn, k in ((ext_ops.topk, 17), (ext_ops.batch_topk, 17)):
            a, b = fn(h, k), fn(h.cuda(), k)
            assert torch.equal(a.to_dense(1001), b.to_dense(1001).cpu())
        codes = ext_ops.topk(h, 17)
        W = torch.randn(1001, 96)
        y_cpu = ext_ops.sparse_decode(codes, W)
        gpu_codes = type(codes)(codes.row_ptr.cuda(), codes.index.cuda(), codes.value.cuda(), 1001, 17)
        y_gpu = ext_ops.sparse_decode(gpu_codes, W.cuda())
        assert _cases.rel_err(y_gpu.cpu(), y_cpu) < 1e-6

    def test_feature_scatter_deterministic(self):
        codes = ext_ops.batch_topk(torch.randn(512, 257, device="cuda"), 16)
        g = torch.randn(512, 64, device="cuda")
        first = torch.ops.fastclt.feature_scatter(codes.row_ptr, codes.index, codes.value, g, 257)[0]
        for _ in range(3):
            again = torch.ops.fastclt.feature_scatter(codes.row_ptr, codes.index, codes.value, g, 257)[0]
            assert torch.equal(first, again)

    def test_large_batch_topk(self):
        h = torch.randn(2048, 4096, device="cuda")
        codes = ext_ops.batch_topk(h, 32)
        mask = _cases.brute_batch_topk_mask(h.cpu(), 32 * 2048)
        assert torch.equal(_cases.kept_mask(codes, 2048, 4096), mask)
