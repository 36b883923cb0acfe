# fastclt: `make train` trains the default CLT, `make test` runs the test suite, `make lint` the linter.
# Each creates .venv (reusing a system-wide PyTorch when there is one) and installs what is missing.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
NPROC ?= 1
PYTEST_ARGS ?=

.PHONY: env install train test lint bench gpu-check gpu-check-dry clean

$(VENV)/.bootstrapped: tools/bootstrap.py
	$(PYTHON) -m venv --system-site-packages $(VENV)
	$(PY) tools/bootstrap.py
	touch $@

env: $(VENV)/.bootstrapped

install: env
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .

train: install
	$(PY) -m torch.distributed.run --standalone --nproc_per_node=$(NPROC) -m fastclt.train $(ARGS)

test: install
	$(PY) -m pytest tests -q $(PYTEST_ARGS)

# ruff (installed by tools/bootstrap.py with the test dependencies), configured in pyproject.toml
lint: env
	$(PY) -m ruff check .

bench: install
	$(PY) -m benchmarks.run --suite all

gpu-check:
	bash benchmarks/gpu_check.sh

gpu-check-dry: install
	PYTHON=$(PY) bash benchmarks/gpu_check.sh gpu_check_out --dry-run

clean:
	rm -rf $(VENV) build *.egg-info fastclt/*.so
