"""Compile-only checks of the CUDA sources, so they cannot rot on machines without a GPU.

Every csrc/cuda/*.cu holds only CUDA code (the torch glue is csrc/cuda/ops_cuda.cpp), so nvcc
compiles each in seconds, for sm_80 and sm_90a. The glue is syntax-checked against torch's headers
by the host compiler (marked slow). Skipped when nvcc (or a C++ compiler) is absent.
"""
from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sysconfig

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
CUDA_DIR = ROOT / "csrc" / "cuda"
NVCC = shutil.which("nvcc")
GENCODE = ["-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90a,code=sm_90a"]
# The flags torch.utils.cpp_extension gives nvcc in the real build (no implicit half/bf16 conversions).
TORCH_NVCC_FLAGS = ["-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
                    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__", "--expt-relaxed-constexpr"]


def _cuda_includes() -> list[str]:
    """The toolkit's include flags, as nvcc itself reports them (nvcc may be a wrapper script)."""
    proc = subprocess.run([NVCC, "-v", "--dryrun", "-E", "-x", "cu", os.devnull], capture_output=True, text=True)
    for line in (proc.stdout + proc.stderr).splitlines():
        if "INCLUDES=" in line and "SYSTEM" not in line:
            return line.split("INCLUDES=", 1)[1].strip().strip('"').split()
    return []


@pytest.mark.skipif(NVCC is None, reason="nvcc not on PATH")
@pytest.mark.parametrize("source", sorted(p.name for p in CUDA_DIR.glob("*.cu")))
def test_nvcc_compiles(source, tmp_path):
    cmd = [NVCC, "-c", "-O3", "-std=c++17", *TORCH_NVCC_FLAGS, *GENCODE, "-Werror", "all-warnings",
           str(CUDA_DIR / source), "-o", str(tmp_path / "out.o")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"nvcc failed on {source}:\n{proc.stdout}\n{proc.stderr}"


@pytest.mark.slow
@pytest.mark.skipif(NVCC is None or shutil.which("c++") is None, reason="nvcc or c++ not on PATH")
def test_cuda_glue_syntax(tmp_path):
    """ops_cuda.cpp against torch's headers. A CPU-only torch wheel lacks the generated
    c10/cuda/impl/cuda_cmake_macros.h, so an empty stand-in is put on the include path."""
    pytest.importorskip("torch")
    from torch.utils.cpp_extension import include_paths

    stub = tmp_path / "c10" / "cuda" / "impl"
    stub.mkdir(parents=True)
    (stub / "cuda_cmake_macros.h").write_text("")
    # C++20 suits every torch we support (newer torch headers require it).
    cmd = ["c++", "-std=c++20", "-fsyntax-only", f"-I{tmp_path}", *(f"-I{p}" for p in include_paths()),
           *_cuda_includes(), f"-I{sysconfig.get_paths()['include']}", "-DFASTCLT_WITH_CUDA",
           str(CUDA_DIR / "ops_cuda.cpp")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"c++ -fsyntax-only failed on ops_cuda.cpp:\n{proc.stderr[-5000:]}"
