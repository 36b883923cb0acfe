"""Shared test set-up.

Without a GPU, Triton kernels run under the interpreter: TRITON_INTERPRET must be set before any
Triton kernel is defined, so it is set here, before the test modules import them.
``torch.cuda.is_available()`` asks the driver without creating a CUDA context.
"""
import os
import zlib

import pytest
import torch

from fastclt import _ext

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


# The devices the extension's kernels run on here: the CPU kernels, and CUDA when built and present.
EXT_DEVICES = [
    pytest.param("cpu", marks=pytest.mark.skipif(not _ext.has_cpu_ext(), reason=_ext.missing_message("cpu"))),
    pytest.param("cuda", marks=pytest.mark.skipif(not (_ext.has_cuda_ext() and torch.cuda.is_available()),
                                                  reason="needs the CUDA kernels of fastclt._C and a GPU")),
]


@pytest.fixture(params=EXT_DEVICES)
def ext_device(request) -> str:
    """Each device the extension's kernels run on (tests of fastclt.ops.ext)."""
    return request.param


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tiny models (language models, whole training runs): more
    threads only add synchronisation there, and stall on a loaded machine. Modules ask for it with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def poisoned(monkeypatch):
    """Kernel outputs start as NaN (-1 for indices), so an element a kernel forgets to write fails
    the test: fastclt._C's (set_poison_outputs) and the Triton launchers' (FASTCLT_POISON=1)."""
    monkeypatch.setenv("FASTCLT_POISON", "1")
    if _ext._C is None:  # not built: the tests that use it skip on their own
        yield
        return
    _ext._C.set_poison_outputs(True)
    yield
    _ext._C.set_poison_outputs(False)


@pytest.fixture
def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture
def gen(request) -> torch.Generator:
    """A CPU generator seeded from the test's name: fresh, different inputs per test, reproducible."""
    g = torch.Generator()
    g.manual_seed(zlib.crc32(request.node.nodeid.encode()))  # str hash() is salted per process
    return g
