"""Build fastclt and, when it can, its C++/CUDA extension ``fastclt._C``.

    pip install --no-build-isolation .        # or: pip install --no-build-isolation -e .
    python setup.py build_ext --inplace       # development build next to the sources

``--no-build-isolation`` makes the build use the installed PyTorch (the extension must be built
against the torch it runs with). Environment switches, each ``auto`` (default) | ``0`` | ``1``:

    FASTCLT_BUILD_CPU       C++ kernels (OpenMP); auto: built when a C++ compiler is found.
    FASTCLT_BUILD_CUDA      CUDA kernels; auto: built when PyTorch has CUDA and nvcc is found.
    FASTCLT_CUDA_ARCH_LIST  compute capabilities for nvcc, default "8.0;9.0a"; "+PTX" after one
                            also embeds its PTX. Written out as -gencode flags: the build never
                            queries a GPU, runs nvidia-smi, or reaches the network.
    MAX_JOBS                parallel compile jobs (ninja).

``1`` fails the install loudly when that part cannot be built; ``0`` skips it; in ``auto`` a failed
build is a warning and the pure-Python package is installed (every op has a PyTorch reference).
"""
import os
import re
import shutil
import warnings

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
CSRC = "csrc"
CPU_SOURCES = [f"{CSRC}/cpu/select_cpu.cpp", f"{CSRC}/cpu/sparse_cpu.cpp", f"{CSRC}/cpu/molt_cpu.cpp",
               f"{CSRC}/cpu/matryoshka_cpu.cpp", f"{CSRC}/cpu/dense_cpu.cpp", f"{CSRC}/cpu/random_cpu.cpp",
               f"{CSRC}/cpu/losses_cpu.cpp", f"{CSRC}/cpu/prefix_cpu.cpp"]
CUDA_SOURCES = [f"{CSRC}/cuda/ops_cuda.cpp", f"{CSRC}/cuda/select_kernels.cu", f"{CSRC}/cuda/sparse_kernels.cu"]
DEFAULT_CUDA_ARCH_LIST = "8.0;9.0a"


def _switch(name):
    value = os.environ.get(name, "auto").strip().lower()
    if value not in ("auto", "0", "1"):
        raise SystemExit(f"{name}: expected auto, 0 or 1, got {value!r}")
    return value


def _warn(msg):
    warnings.warn(f"fastclt: {msg}", stacklevel=2)
    print(f"WARNING fastclt: {msg}", flush=True)


def gencode_flags(arch_list):
    """"8.0;9.0a+PTX" -> (nvcc -gencode flags, tag "80_90a_ptx" recorded in build_info)."""
    flags, tags = [], []
    for arch in re.split(r"[;, ]+", arch_list.strip()):
        if not arch:
            continue
        ptx = arch.upper().endswith("+PTX")
        num = (arch[:-4] if ptx else arch).replace(".", "")
        if not re.fullmatch(r"\d{2,3}[af]?", num):
            raise SystemExit(f"FASTCLT_CUDA_ARCH_LIST: cannot read {arch!r} (expected e.g. 8.0, 9.0a, 9.0+PTX)")
        flags.append(f"-gencode=arch=compute_{num},code=sm_{num}")
        if ptx:
            flags.append(f"-gencode=arch=compute_{num},code=compute_{num}")
        tags.append(num + ("_ptx" if ptx else ""))
    if not flags:
        raise SystemExit("FASTCLT_CUDA_ARCH_LIST: empty")
    return flags, "_".join(tags)


def _has_cxx():
    cxx = os.environ.get("CXX", "c++").split()
    return bool(cxx) and shutil.which(cxx[0]) is not None


def _variant(cpp_extension, with_cpu, with_cuda, openmp):
    """One way to build fastclt._C; setup falls back along a list of these in auto mode."""
    # Both defines are added by BuildExtension too; set here so a fallback variant has them.
    defines = ["-DTORCH_API_INCLUDE_EXTENSION_H", "-DTORCH_EXTENSION_NAME=_C"]
    # torch adds the -std= its headers need (C++17 or C++20). -fno-math-errno -fno-trapping-math change
    # no value (no kernel reads errno or the floating-point exception flags); they let the compiler
    # inline sqrt and if-convert float selects, so that loops such as the Box-Muller loop of
    # cpu/random_cpu.cpp vectorise.
    cxx = ["-O3", "-fno-math-errno", "-fno-trapping-math"] + defines
    link = []
    if openmp:
        # Links libgomp.so.1; at run time the loader reuses the libgomp.so.1 that torch already
        # loaded (same soname), so the extension and torch share one OpenMP runtime.
        cxx.append("-fopenmp")
        link.append("-fopenmp")
    sources = [f"{CSRC}/bindings.cpp", f"{CSRC}/host_pool.cpp"] + (CPU_SOURCES if with_cpu else [])
    if with_cpu:
        cxx.append("-DFASTCLT_WITH_CPU")
    if not with_cuda:
        return cpp_extension.CppExtension("fastclt._C", sources, extra_compile_args={"cxx": cxx, "nvcc": []},
                                          extra_link_args=link)
    flags, tag = gencode_flags(os.environ.get("FASTCLT_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCH_LIST))
    cxx += ["-DFASTCLT_WITH_CUDA", f"-DFASTCLT_CUDA_ARCHS={tag}"]
    nvcc = ["-O3", "-lineinfo"] + defines + flags
    return cpp_extension.CUDAExtension("fastclt._C", sources + CUDA_SOURCES,
                                       extra_compile_args={"cxx": cxx, "nvcc": nvcc}, extra_link_args=link)


def _plan():
    """(ext_modules, cmdclass): the variants to try, best first, and whether failure is fatal."""
    cpu_mode, cuda_mode = _switch("FASTCLT_BUILD_CPU"), _switch("FASTCLT_BUILD_CUDA")
    if cpu_mode == "0" and cuda_mode == "0":
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError as e:
        if "1" in (cpu_mode, cuda_mode):
            raise SystemExit(f"fastclt: building fastclt._C needs PyTorch installed first, and "
                             f"`pip install --no-build-isolation` ({e})")
        _warn(f"PyTorch is not importable ({e}); installing without fastclt._C")
        return [], {}

    want_cpu = cpu_mode != "0"
    if want_cpu and not _has_cxx():
        if cpu_mode == "1":
            raise SystemExit("fastclt: FASTCLT_BUILD_CPU=1 but no C++ compiler was found (set CXX)")
        _warn("no C++ compiler found; installing without fastclt._C")
        return [], {}

    want_cuda = False
    if cuda_mode != "0":
        nvcc = cpp_extension.CUDA_HOME and os.path.exists(os.path.join(cpp_extension.CUDA_HOME, "bin", "nvcc"))
        why = ("PyTorch has no CUDA (torch.version.cuda is None)" if torch.version.cuda is None
               else None if nvcc else "nvcc was not found (set CUDA_HOME)")
        if why is None:
            want_cuda = True
        elif cuda_mode == "1":
            raise SystemExit(f"fastclt: FASTCLT_BUILD_CUDA=1 but {why}")
        elif torch.version.cuda is not None:
            _warn(f"{why}; building fastclt._C without CUDA kernels")

    variants = []  # (extension, fatal_if_it_fails)
    if want_cuda:
        variants.append((_variant(cpp_extension, want_cpu, True, openmp=True), cuda_mode == "1"))
    if want_cpu:
        variants.append((_variant(cpp_extension, True, False, openmp=True), False))
        variants.append((_variant(cpp_extension, True, False, openmp=False), cpu_mode == "1"))
    if not variants:  # CPU part switched off and no CUDA to build
        return [], {}
    # The last variant's failure is fatal only if some part was forced.
    variants[-1] = (variants[-1][0], "1" in (cpu_mode, cuda_mode))

    class BuildExt(cpp_extension.BuildExtension):
        """BuildExtension that falls back along `variants` and, in auto mode, never fails."""

        def build_extensions(self):
            # Failures before any compile (torch's compiler and nvcc/CUDA version checks) land here;
            # compile failures are handled per variant in build_extension.
            self._compiling = False
            try:
                super().build_extensions()
                return
            except Exception as e:
                if self._compiling:
                    raise
                error = e
            if want_cuda and want_cpu and cuda_mode != "1":
                _warn(f"the CUDA build cannot start ({error}); building the CPU kernels only")
                del variants[0]
                self.extensions[0].__dict__.update(variants[0][0].__dict__)
                try:
                    super().build_extensions()
                    return
                except Exception as e:
                    if self._compiling:
                        raise
                    error = e
            if "1" in (cpu_mode, cuda_mode):
                raise error
            _warn(f"cannot build fastclt._C ({error}); installing the pure-Python package")
            self._failed = True

        def build_extension(self, ext):
            self._compiling = True
            while True:
                try:
                    super().build_extension(ext)
                    return
                except Exception as e:
                    if variants[0][1] or len(variants) == 1:
                        if variants[0][1]:
                            raise
                        _warn(f"building fastclt._C failed ({e}); installing the pure-Python package")
                        self._failed = True
                        return
                    _warn(f"building fastclt._C failed ({e}); trying a smaller build")
                    del variants[0]
                    ext.__dict__.update(variants[0][0].__dict__)

        def _built(self):
            return [] if getattr(self, "_failed", False) else self.extensions

        def copy_extensions_to_source(self):
            kept, self.extensions = self.extensions, self._built()
            try:
                super().copy_extensions_to_source()
            finally:
                self.extensions = kept

        def get_outputs(self):
            return super().get_outputs() if self._built() else []

        def get_output_mapping(self):
            return super().get_output_mapping() if self._built() else {}

    # MAX_JOBS is read by torch's ninja driver.
    return [variants[0][0]], {"build_ext": BuildExt.with_options(use_ninja=shutil.which("ninja") is not None)}


ext_modules, cmdclass = _plan()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
