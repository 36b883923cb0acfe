"""Install what fastclt needs into the current environment, and nothing that is already there.

Run by ``make`` inside the project's virtual environment (created with --system-site-packages,
so a machine that already has PyTorch — a GPU box without network — reuses it and installs nothing).
On a machine without torch it installs the CPU build ``torch==2.13.0``.

    python tools/bootstrap.py            # runtime + test dependencies
    python tools/bootstrap.py --runtime  # runtime dependencies only
"""
from __future__ import annotations

import importlib.util
import subprocess
import sys

# (import name, pip requirement). Kept in step with pyproject.toml.
RUNTIME = [
    ("torch", "torch==2.13.0"),
    ("numpy", "numpy"),
    ("safetensors", "safetensors"),
    ("yaml", "pyyaml"),
    ("tqdm", "tqdm"),
    ("setuptools", "setuptools"),
    ("ninja", "ninja"),
    ("pybind11", "pybind11"),
]
TEST = [
    ("triton", "triton"),
    ("pytest", "pytest"),
    ("pytest_benchmark", "pytest-benchmark"),
    ("transformers", "transformers"),
    ("datasets", "datasets"),
    ("matplotlib", "matplotlib"),
]


def missing(pairs):
    return [req for name, req in pairs if importlib.util.find_spec(name) is None]


def main() -> int:
    pairs = RUNTIME if "--runtime" in sys.argv else RUNTIME + TEST
    # torch first, alone: other packages (triton, transformers) must not pull a CUDA build of it.
    for group in (pairs[:1], pairs[1:]):
        need = missing(group)
        if need:
            print("bootstrap: installing", " ".join(need), flush=True)
            subprocess.check_call([sys.executable, "-m", "pip", "install", "-q", *need])
    print("bootstrap: environment ready", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
