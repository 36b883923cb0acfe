"""The C++ training statistics of ``fastclt._C`` (csrc/cpu/sparse_cpu.cpp) as ``code_stats`` (impl
"cpu"; the math: ``fastclt/ops/reference/stats.py``): one pass over each layer's entries, the layers
in parallel — where the PyTorch formulation concatenates the layers' values and indices, offsets
the indices, masks, scatters and sums per layer (~12 small ops: 0.8 ms a step at the cpu-clt shape
on a 2-core Xeon)."""
from __future__ import annotations

import torch

from fastclt.ops.ext._common import ops

__all__ = ["code_stats"]


@torch.no_grad()
def code_stats(codes: list, n_features: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``fastclt.ops.code_stats`` on the C++ kernel (CPU; fp32 or bf16 values)."""
    return ops().code_stats([c.index.contiguous() for c in codes], [c.value.detach().contiguous() for c in codes],
                            n_features)
