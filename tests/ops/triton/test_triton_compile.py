"""Every Triton kernel compiles for the GPUs it targets (sm_90, sm_80) without a GPU, and the hot
path fits: no register spills, shared memory within the chip's limit.

The interpreter (TRITON_INTERPRET=1, how the other tests run the kernels on a CPU) executes a
kernel as Python: code that the real compiler rejects — a name from the caller's scope, a
constexpr misuse, a tile that does not fit in shared memory — passes there unseen, and nothing
there says whether a kernel spills registers to local memory (a GEMM whose epilogue spills cannot
keep up with cuBLAS). So this test records every launch that a small workload makes under the
interpreter, at aligned and at odd sizes, with the specialisation a GPU launch of the same
arguments compiles (unit strides as constants, 16-byte alignment), adds the encode GEMM's GPU
autotune configs, compiles each ahead of time for sm_90 and sm_80 without the interpreter
(``triton.compile`` with an explicit target needs no driver) and reads the resource usage that
Triton's bundled ptxas reports. This is ``python -m benchmarks.kernel_resources --quick`` (the
CI subset; the full report, every config in every mode, is run by hand: see
benchmarks/results/ptxas-*/). What it cannot see: numerics and speed on a real GPU.
"""
import csv
import json
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

triton = pytest.importorskip("triton")

from benchmarks import kernel_resources as kr  # noqa: E402

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                reason="records launches under the interpreter "
                                       "(on a GPU the other tests compile every kernel)")

KERNELS = {"_encode_kernel", "_gather_decode_kernel", "_gather_dot_kernel", "_feature_scatter_kernel",
           "_chunk_reduce_kernel", "_clt_tied_decode_kernel", "_clt_tied_dot_kernel",
           "_rows_kernel", "_apply_kernel", "_wgrad_kernel"}  # the last three: MOLT transforms


@pytest.mark.slow
def test_every_triton_kernel_compiles_and_the_hot_path_does_not_spill(tmp_path):
    specs = kr.recorded_specs(quick=True)
    assert {s["kernel"] for s in specs} >= KERNELS
    rows = kr.compile_specs(specs, jobs=2)
    n = sum(len(s["targets"]) for s in specs)
    assert len(rows) == n
    failed = [kr.format_row(r) for r in rows if r["status"] == "FAIL"]
    assert not failed, f"{len(failed)} of {n} compiles failed:\n" + "\n".join(failed[:20])
    bad = [kr.format_row(r) for r in kr.failures(rows)]
    assert not bad, f"{len(bad)} hot-path specialisations spill or exceed shared memory:\n" + "\n".join(bad[:20])

    # the hot path is covered: the bf16 encode in every mode (aligned sizes) and every small
    # kernel, on both targets
    for target in kr.TARGETS:
        modes = {r["mode"] for r in rows if r["target"] == target and r["kernel"] == kr.ENCODE and r["hot"]
                 and r["sizes"] == "aligned"}
        assert modes == set(kr.ENCODE_MODES.values()), (target, modes)
        assert {r["kernel"] for r in rows if r["target"] == target} >= KERNELS
    assert all(isinstance(r["registers"], int) and 0 < r["registers"] <= 255 for r in rows)

    # the report's files, as the CLI writes them
    folders = kr.write_report(rows, tmp_path, kr.stamp())
    assert sorted(f.name for f in folders) == sorted(kr.report_folder(t, triton.__version__) for t in kr.TARGETS)
    for folder in folders:
        with open(folder / "resources.csv") as f:
            written = list(csv.DictReader(f))
        assert len(written) == sum(1 for r in rows if kr.report_folder(r["target"], triton.__version__) == folder.name)
        assert set(written[0]) == set(kr.ROW_FIELDS)
        meta = json.loads((folder / "meta.json").read_text())
        assert meta["hot_path_failures"] == 0 and meta["triton"] == triton.__version__
        assert "no spills, within shared memory" in (folder / "resources.md").read_text()
