"""Install what fastclt needs into the current environment, and nothing that is already there.

Run by ``make`` inside the project's virtual environment (created with --system-site-packages,
so a machine that already has PyTorch — a GPU box without network — reuses it and installs nothing).
On a machine without torch it installs the CPU build ``torch==2.13.0``; everything installed after
it is constrained to the torch found (so no package pulls another, CUDA, build of it).

    python tools/bootstrap.py            # runtime + test dependencies (+ the interoperability extras)
    python tools/bootstrap.py --runtime  # runtime dependencies only

The interoperability extras are the other libraries the tests check fastclt's formats against.
They are optional: when one cannot be installed (no network, another Python), bootstrap says so and
the tests that need it skip. circuit-tracer is installed without its dependencies: with them it pins
transformers <= 4.57.3 and pulls transformer-lens, nnsight and wandb, none of which its transcoder
loaders (all the tests use) import; they need torch, safetensors, pyyaml, transformers,
huggingface_hub and pydantic.
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import tempfile

# (import name, pip requirement). Kept in step with pyproject.toml.
RUNTIME = [
    ("torch", "torch==2.13.0"),
    ("numpy", "numpy"),
    ("safetensors", "safetensors"),
    ("yaml", "pyyaml"),
    ("tqdm", "tqdm"),
    ("jsonargparse", "jsonargparse>=4.40"),
    ("docstring_parser", "docstring-parser"),
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
    ("ruff", "ruff"),
]
# (import name, pip arguments): optional; see the module docstring.
INTEROP = [
    ("sparsify", ["eai-sparsify==1.3.3"]),
    ("pydantic", ["pydantic"]),
    ("circuit_tracer", ["--no-deps", "circuit-tracer==0.5.0"]),
    ("sae_lens", ["sae-lens==6.54.12"]),
]


def missing(pairs):
    return [req for name, req in pairs if importlib.util.find_spec(name) is None]


def pip(args, constraints=None) -> int:
    cmd = [sys.executable, "-m", "pip", "install", "-q", *(["-c", constraints] if constraints else []), *args]
    return subprocess.call(cmd)


def torch_constraint() -> str:
    """A constraints file pinning the installed torch (its public version: a +cpu/+cu build matches it)."""
    out = subprocess.check_output([sys.executable, "-c", "import torch; print(torch.__version__.split('+')[0])"],
                                  text=True).strip()
    fd, path = tempfile.mkstemp(prefix="fastclt-constraints-", suffix=".txt")
    with os.fdopen(fd, "w") as f:
        f.write(f"torch=={out}\n")
    return path


def main() -> int:
    runtime_only = "--runtime" in sys.argv
    pairs = RUNTIME if runtime_only else RUNTIME + TEST
    # torch first, alone: other packages (triton, transformers) must not pull a CUDA build of it.
    need = missing(pairs[:1])
    if need:
        print("bootstrap: installing", " ".join(need), flush=True)
        subprocess.check_call([sys.executable, "-m", "pip", "install", "-q", *need])
    constraints = torch_constraint()
    try:
        need = missing(pairs[1:])
        if need:
            print("bootstrap: installing", " ".join(need), flush=True)
            if pip(need, constraints):
                raise SystemExit("bootstrap: pip failed (see above)")
        if not runtime_only:
            for name, args in INTEROP:
                if importlib.util.find_spec(name) is None:
                    print("bootstrap: installing", " ".join(args), "(optional)", flush=True)
                    # fail fast without a network (a GPU box): no retries, a short timeout
                    if pip(["--retries", "0", "--timeout", "20", *args], constraints):
                        print(f"bootstrap: warning: could not install {args[-1]}; the tests that check fastclt "
                              f"against it will skip", flush=True)
    finally:
        os.unlink(constraints)
    print("bootstrap: environment ready", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
