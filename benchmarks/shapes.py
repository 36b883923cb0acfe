"""Named benchmark shapes: the one table every suite reads.

    B  tokens per step        d  d_in = d_out          F  features per layer
    k  active per token (TopK / BatchTopK average)     L  layers (CLT; 1 for SAEs and PLTs)
    k_aux  AuxK selection size          dead_frac  fraction of features marked dead for AuxK

``models`` says which model families the train suite builds for a shape ("sae": SAE TopK and
BatchTopK (plain and with 5 Matryoshka prefixes) and PLT JumpReLU; "clt": CLT with every decoder
tying, BatchTopK and JumpReLU, and the untied BatchTopK CLT with 5 Matryoshka prefixes; "molt": a
one-layer MOLT with T = F transforms in the default rank groups, TopK gates with k open per token and
JumpReLU gates with the norm penalty; "loop": the trainer's loop against a bare eager loop, in the
profile suite) and which ops the ops suite runs (the dictionary ops for
"sae" / "clt", the MOLT layer for "molt"). ``ops`` limits the ops suite to a few op names (None:
those of the model families). ``device`` is where the shape is a default ("cuda", "cpu", "ci").
``density``: a shape of the density sweep only (benchmarks/bench_density.py; the ops and train
suites skip it); the sweep also runs at ``tiny``.
"""
from __future__ import annotations

from dataclasses import dataclass, asdict
from typing import Optional

__all__ = ["Shape", "SHAPES", "get_shapes", "default_shapes"]


@dataclass(frozen=True)
class Shape:
    name: str
    B: int
    d: int
    F: int
    k: int
    L: int = 1
    models: tuple[str, ...] = ("sae",)
    k_aux: int = 512
    dead_frac: float = 0.1
    ops: Optional[tuple[str, ...]] = None
    device: str = "cuda"
    note: str = ""
    density: bool = False

    def as_dict(self) -> dict:
        return asdict(self)


SHAPES: dict[str, Shape] = {s.name: s for s in [
    Shape("gpt2-clt", B=4096, d=768, F=32768, k=16, L=12, models=("clt",), k_aux=384,
          note="GPT-2 small CLT: 12 layers, 32768 features per layer"),
    Shape("sae-2304", B=8192, d=2304, F=65536, k=64, k_aux=512, note="Gemma-2-2B width SAE"),
    Shape("sae-4096", B=4096, d=4096, F=131072, k=64, k_aux=512, note="Llama-8B width SAE"),
    Shape("btk-8192", B=8192, d=4096, F=131072, k=64, ops=("topk", "batch_topk"),
          note="the BatchTopK goal: h of 8192 x 131072"),
    Shape("cpu-small", B=2048, d=768, F=16384, k=32, L=4, k_aux=256, device="cpu",
          note="the CPU goals of the README; L is used by the CLT ops only"),
    Shape("cpu-clt", B=1024, d=256, F=4096, k=16, L=4, models=("clt",), device="cpu",
          note="the CPU CLT step goals: 4 layers of a small model, every tying"),
    Shape("demo", B=512, d=32, F=128, k=4, L=4, models=("loop",), device="cpu",
          note="the default demo's CLT (python -m fastclt.train): the trainer's loop vs a bare eager loop"),
    Shape("demo-gpu", B=512, d=32, F=128, k=4, L=4, models=("loop",),
          note="the demo's loop on a GPU, where launches dominate: also the step captured in a CUDA graph"),
    Shape("molt-768", B=4096, d=768, F=992, k=20, models=("molt",),
          note="MOLT goals: d = 768, N = 32 (992 transforms of rank 512 ... 32), 20 open per token (2%)"),
    Shape("molt-cpu", B=1024, d=768, F=992, k=20, models=("molt",), device="cpu",
          note="the MOLT goals on a CPU: molt-768 with a batch the dense eager reference runs in seconds"),
    Shape("density-cpu", B=1024, d=256, F=4096, k=16, L=4, models=("clt",), device="cpu", density=True,
          note="the density sweep on a CPU: the shape of the density issue (CLT L=4, d=256, F=4096, B=1024)"),
    Shape("density-gpu", B=4096, d=1024, F=16384, k=64, L=4, models=("clt",), device="cuda", density=True,
          note="the density sweep on a GPU"),
    Shape("tiny", B=64, d=32, F=256, k=4, L=3, models=("sae", "clt", "molt"), k_aux=16, device="ci",
          note="CI: every suite in seconds on a CPU"),
]}


def get_shapes(names: str | list[str]) -> list[Shape]:
    """'a,b' or ['a', 'b'] → the Shapes; unknown names are an error that lists the known ones."""
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    unknown = [n for n in names if n not in SHAPES]
    if unknown:
        raise ValueError(f"shapes: unknown {unknown}; known: {sorted(SHAPES)}")
    return [SHAPES[n] for n in names]


def default_shapes(device_type: str) -> list[Shape]:
    """The shapes a run uses when none are named: the GPU shapes on CUDA, cpu-small elsewhere."""
    want = "cuda" if device_type == "cuda" else "cpu"
    return [s for s in SHAPES.values() if s.device == want]
