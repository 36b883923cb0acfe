"""Set-up of the op tests: every test starts and ends with fresh Triton encode state (its cached
speculative thresholds and capacities), without importing Triton where no test did."""
import sys

import pytest


def _clear_triton_state() -> None:
    encode = sys.modules.get("fastclt.ops.triton.encode")
    if encode is not None:
        encode.clear_caches()


@pytest.fixture(autouse=True)
def _fresh_triton_state():
    _clear_triton_state()
    yield
    _clear_triton_state()
