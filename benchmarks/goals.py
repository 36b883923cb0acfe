"""The performance goals of the kernel issues, evaluated from result rows.

Each goal names its device type, shape and target; ``evaluate`` returns one dict per goal of the
run's device type with the measured value (or "not yet measured" and why) and a verdict. A goal
compares the fastest *kernel* row (impl cuda / triton / cpu) of an op, or the ``auto`` row of a
training step, with its baseline row; a run without such rows measures nothing for that goal.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

__all__ = ["GOALS", "evaluate", "goal_table"]

KERNEL_IMPLS = ("cuda", "triton", "cpu")


def _ok(rows, **want) -> list[dict]:
    out = []
    for r in rows:
        if r["status"] != "ok" or not r.get("median_ms"):
            continue
        if all((r.get(k) or "").startswith(v[:-1]) if v.endswith("*") else r.get(k) == v for k, v in want.items()):
            out.append(r)
    return out


def _one(rows, **want) -> Optional[dict]:
    found = _ok(rows, **want)
    return min(found, key=lambda r: r["median_ms"]) if found else None


def _kernel(rows, **want) -> Optional[dict]:
    found = [r for r in _ok(rows, **want) if r["impl"] in KERNEL_IMPLS]
    return min(found, key=lambda r: r["median_ms"]) if found else None


Result = tuple[Optional[str], Optional[bool], str]  # (measured, met, why not measured)


def _ratio(num: Optional[dict], den: Optional[dict], need_num: str, need_den: str) -> Optional[float]:
    if num is None or den is None:
        return None
    return den["median_ms"] / num["median_ms"]


def _missing(*pairs) -> str:
    return "; ".join(f"no {what} row" for row, what in pairs if row is None)


def _encode_vs_gemm(rows, meta) -> Result:
    k = _kernel(rows, suite="ops", op="encode", variant="topk", mode="fwd", shape="sae-2304")
    g = _one(rows, suite="ops", op="encode", impl="torch-gemm", variant="topk", mode="fwd", shape="sae-2304")
    if k is None or g is None:
        return None, None, _missing((k, "encode kernel (cuda/triton)"), (g, "torch-gemm"))
    r = g["median_ms"] / k["median_ms"]
    mem = f", peak extra {k['peak_extra_mb']:.0f} MB" if k.get("peak_extra_mb") is not None else ""
    return f"{r:.2f}× cuBLAS ({k['impl']} {k['median_ms']:.3g} ms vs {g['median_ms']:.3g} ms{mem})", r >= 0.9, ""


def _decode_bw(rows, meta) -> Result:
    k = _kernel(rows, suite="ops", op="sparse_decode", mode="fwd+bwd", shape="sae-2304")
    if k is None or not k.get("gbps"):
        return None, None, "no sparse_decode kernel (cuda/triton) row"
    frac = k["gbps"] * 1e9 / meta["peak_bw"]
    return f"{100 * frac:.0f}% of {meta['peak_bw'] / 1e9:.0f} GB/s ({k['impl']}, {k['gbps']:.0f} GB/s)", frac >= 0.7, ""


def _step_speedup(variant: str, shape: str, target: float) -> Callable:
    def f(rows, meta) -> Result:
        a = _one(rows, suite="train", variant=variant, shape=shape, impl="auto")
        ref = _one(rows, suite="train", variant=variant, shape=shape, impl="reference")
        if a is None or ref is None:
            return None, None, _missing((a, "auto train step"), (ref, "reference train step"))
        if "=reference" in (a.get("note") or "") and not any(f"={i}" in (a.get("note") or "") for i in KERNEL_IMPLS):
            return None, None, "auto resolves to the reference for every op here (no kernels registered)"
        r = ref["median_ms"] / a["median_ms"]
        return f"{r:.2f}× ({a['median_ms']:.3g} ms vs {ref['median_ms']:.3g} ms)", r >= target, ""
    return f


def _vs_sparsify_memory(rows, meta) -> Result:
    a = _one(rows, suite="train", variant="sae-topk", shape="sae-2304", impl="auto")
    sp = _one(rows, suite="train", variant="sae-topk", shape="sae-2304", impl="eai-sparsify")
    if a is None or sp is None or a.get("peak_extra_mb") is None or sp.get("peak_extra_mb") is None:
        return None, None, _missing((a, "auto train step"), (sp, "eai-sparsify train step")) or "no memory numbers"
    tot = lambda r: r["peak_extra_mb"] + (r.get("mem_before_mb") or 0)  # noqa: E731
    m = tot(a) / tot(sp)
    t = sp["median_ms"] / a["median_ms"]
    return (f"memory {m:.2f}× ({tot(a):.0f} vs {tot(sp):.0f} MB), speed {t:.2f}× sparsify",
            m <= 0.3 and t > 1.0, "")


def _topk_vs(op: str, shape: str, base_impl: str, target: float) -> Callable:
    def f(rows, meta) -> Result:
        k = _kernel(rows, suite="ops", op=op, shape=shape)
        b = _one(rows, suite="ops", op=op, shape=shape, impl=base_impl)
        if k is None or b is None:
            return None, None, _missing((k, f"{op} kernel"), (b, base_impl))
        r = b["median_ms"] / k["median_ms"]
        return f"{r:.1f}× ({k['impl']} {k['median_ms']:.3g} ms vs {b['median_ms']:.3g} ms)", r >= target, ""
    return f


def _btk_vs_read(rows, meta) -> Result:
    k = _kernel(rows, suite="ops", op="batch_topk", shape="btk-8192")
    if k is None:
        return None, None, "no batch_topk kernel row"
    read_ms = 8192 * 131072 * 2 / meta["peak_bw"] * 1e3
    r = k["median_ms"] / read_ms
    return f"{r:.2f}× one read ({k['median_ms']:.3g} ms vs {read_ms:.3g} ms)", r <= 2.0, ""


def _decode_vs(base_impl: str, target: float) -> Callable:
    def f(rows, meta) -> Result:
        k = _kernel(rows, suite="ops", op="sparse_decode", mode="fwd+bwd", shape="cpu-small")
        b = _one(rows, suite="ops", op="sparse_decode", mode="fwd+bwd", shape="cpu-small", impl=base_impl)
        if k is None or b is None:
            return None, None, _missing((k, "sparse_decode kernel (cpu)"), (b, base_impl))
        r = b["median_ms"] / k["median_ms"]
        return f"{r:.1f}× ({k['median_ms']:.3g} ms vs {b['median_ms']:.3g} ms)", r >= target, ""
    return f


def _cpu_step_vs_sparsify(target: float) -> Callable:
    def f(rows, meta) -> Result:
        a = _one(rows, suite="train", variant="sae-topk", shape="cpu-small", impl="auto")
        sp = _one(rows, suite="train", variant="sae-topk", shape="cpu-small", impl="eai-sparsify")
        if a is None or sp is None:
            return None, None, _missing((a, "auto train step"), (sp, "eai-sparsify train step"))
        r = sp["median_ms"] / a["median_ms"]
        return f"{r:.2f}× ({a['median_ms']:.4g} ms vs {sp['median_ms']:.4g} ms)", r >= target, ""
    return f


def _cpu_clt_vs_clc(target: float) -> Callable:
    """The auto BatchTopK CLT step of every tying at cpu-clt is ≥ ``target`` × faster than
    crosslayer-coding's (the train suite's rows)."""
    def f(rows, meta) -> Result:
        parts, ok = [], True
        for tying in ("none", "per_source", "per_target"):
            v = f"clt-{tying}-batchtopk"
            a = _one(rows, suite="train", variant=v, shape="cpu-clt", impl="auto")
            p = _one(rows, suite="train", variant=v, shape="cpu-clt", impl="crosslayer-coding")
            if a is None or p is None:
                return None, None, _missing((a, f"auto {v} train step"), (p, f"crosslayer-coding {v} train step"))
            r = p["median_ms"] / a["median_ms"]
            ok = ok and r >= target
            parts.append(f"{tying} {r:.1f}× ({a['median_ms']:.4g} vs {p['median_ms']:.4g} ms)")
        return "; ".join(parts), ok, ""
    return f


def _step_ratio(variant: str, base: str, shape: str, target: float) -> Callable:
    """The ``auto`` training step of ``variant`` costs at most ``target`` × that of ``base``."""
    def f(rows, meta) -> Result:
        a = _one(rows, suite="train", variant=variant, shape=shape, impl="auto")
        b = _one(rows, suite="train", variant=base, shape=shape, impl="auto")
        if a is None or b is None:
            return None, None, _missing((a, f"auto {variant} train step"), (b, f"auto {base} train step"))
        r = a["median_ms"] / b["median_ms"]
        return f"{r:.2f}× ({a['median_ms']:.4g} ms vs {b['median_ms']:.4g} ms)", r <= target, ""
    return f


def _molt_vs_floor(shape: str, target: float) -> Callable:
    """The fastest MOLT-layer kernel row (gates + transforms, fwd+bwd) against the floor: the
    measured gate GEMM (``gate-gemm`` row, forward) plus the other counted FLOPs at the measured
    peak FLOP/s (bench_ops.molt_flops: the transforms forward and backward, the sparse gate backward)."""
    def f(rows, meta) -> Result:
        k = _kernel(rows, suite="ops", op="molt", mode="fwd+bwd", shape=shape)
        g = _one(rows, suite="ops", op="molt", mode="fwd", shape=shape, impl="gate-gemm")
        if k is None or g is None or not k.get("flops") or not g.get("flops"):
            return None, None, _missing((k, "molt kernel (cpu/triton)"), (g, "gate-gemm")) or "no FLOP counts"
        active_ms = (k["flops"] - g["flops"]) / meta["peak_flops"] * 1e3
        floor = g["median_ms"] + active_ms
        r = k["median_ms"] / floor
        return (f"{r:.2f}× the floor ({k['impl']} {k['median_ms']:.4g} ms vs {g['median_ms']:.3g} ms gate GEMM + "
                f"{active_ms:.3g} ms of transforms at {meta['peak_flops'] / 1e12:.3g} TFLOP/s)"), r <= target, ""
    return f


def _adaptive_within(shape: str) -> Callable:
    def f(rows, meta) -> Result:
        from benchmarks.bench_density import adaptive_gaps
        gaps = adaptive_gaps(rows, shape)
        if not gaps:
            return None, None, "no density sweep rows (sparse, dense and adaptive)"
        worst = max(gaps, key=lambda g: g[2])
        n_bad = sum(g[2] > 1.10 for g in gaps)
        return (f"worst {worst[2]:.2f}× the better path ({worst[0]} at ρ={worst[1]:g}); "
                f"{n_bad} of {len(gaps)} points over 1.10×"), n_bad == 0, ""
    return f


def _vs_peer(shape: str) -> Callable:
    def f(rows, meta) -> Result:
        from benchmarks.bench_density import PEER
        a = _one(rows, suite="density", op="train_step", shape=shape, impl="adaptive", mode="alternating")
        p = _one(rows, suite="density", op="train_step", shape=shape, impl=PEER, mode="alternating")
        if a is None or p is None:
            return None, None, _missing((a, "fastclt step (alternating)"), (p, f"{PEER} step (alternating)"))
        r = p["median_ms"] / a["median_ms"]
        ma, mp = a.get("peak_extra_mb"), p.get("peak_extra_mb")
        mem = "memory not measured" if ma is None or mp is None else f"peak {ma:.0f} vs {mp:.0f} MiB"
        ok = r >= 1.5 and (ma is not None and mp is not None and ma <= mp)
        return f"{r:.2f}× ({a['median_ms']:.4g} ms vs {p['median_ms']:.4g} ms; {mem})", ok, ""
    return f


def dense_step_floor_ms(shape, peak_flops: float) -> float:
    """The dense-GEMM floor of an untied CLT step: the GEMMs of the dense formulation alone,
    (4L + 6·L(L+1)/2)·B·F·d FLOPs (encoder forward and dW_enc; decoder forward, dA and dW_dec)."""
    L = shape.L
    return (4 * L + 3 * L * (L + 1)) * shape.B * shape.F * shape.d / peak_flops * 1e3


def _vs_dense_floor(shape_name: str) -> Callable:
    def f(rows, meta) -> Result:
        from benchmarks.shapes import SHAPES
        a = [r for r in _ok(rows, suite="density", op="train_step", shape=shape_name, impl="adaptive")
             if r["variant"].startswith("clt-none") and r["variant"].endswith("rho=0.5") and r["mode"] != "alternating"]
        if not a:
            return None, None, "no adaptive CLT step row at ρ = 0.5"
        floor = dense_step_floor_ms(SHAPES[shape_name], meta["peak_flops"])
        r = a[0]["median_ms"] / floor
        return f"{r:.2f}× the floor ({a[0]['median_ms']:.4g} ms vs {floor:.3g} ms)", r <= 1.3, ""
    return f


def _crossover_measured(shape: str) -> Callable:
    def f(rows, meta) -> Result:
        from benchmarks.bench_density import calibrate
        c = calibrate(rows, shape)
        if not c:
            return None, None, "no sparse and dense sweep rows"
        return ", ".join(f"{op} {v:.3g}" for op, v in c.items()), True, ""
    return f


def _step_vs_floor(variants: tuple, shape: str, target: float) -> Callable:
    """The profile suite's ``step`` row (the step timed without the profiler) of each variant against
    its floor (``floor_ms``: the bare encoder GEMM + the bare Adam step, benchmarks/bench_profile.py);
    met when every variant is within ``target`` × its floor."""
    def f(rows, meta) -> Result:
        found, missing = [], []
        for v in variants:
            r = _one(rows, suite="profile", variant=v, shape=shape, mode="step")
            if r is None or not r.get("floor_ms"):
                missing.append(v)
            else:
                found.append((v, r["median_ms"] / r["floor_ms"], r))
        if missing:
            return None, None, f"no profile step row of {', '.join(missing)}"
        text = "; ".join(f"{v}: {q:.2f}× ({r['median_ms']:.4g} ms vs {r['floor_ms']:.4g} ms)" for v, q, r in found)
        return text, all(q <= target for _, q, _ in found), ""
    return f


def _loop_vs_bare(rows, meta) -> Result:
    b = _one(rows, suite="profile", op="trainer_loop", shape="demo", impl="bare-eager")
    t = _one(rows, suite="profile", op="trainer_loop", shape="demo", impl="fastclt-trainer")
    a = _one(rows, suite="profile", op="trainer_loop", shape="demo", impl="fastclt-trainer-auxk")
    if t is None or b is None:
        return None, None, _missing((t, "trainer loop"), (b, "bare eager loop"))
    r = t["median_ms"] / b["median_ms"]
    text = f"{r:.2f}× ({t['median_ms']:.3g} ms vs {b['median_ms']:.3g} ms per step)"
    if a is None:  # a run from before the AuxK case existed: the first steps only
        return text + "; with AuxK active: not measured", r <= 1.0, ""
    ra = a["median_ms"] / b["median_ms"]
    return text + f"; with AuxK active {ra:.2f}× ({a['median_ms']:.3g} ms)", max(r, ra) <= 1.0, ""


@dataclass(frozen=True)
class Goal:
    name: str
    device: str  # "cuda" | "cpu"
    shape: str
    target: str
    check: Callable


GOALS = [
    Goal("fused encode fwd vs cuBLAS GEMM", "cuda", "sae-2304", "≥ 0.9× cuBLAS, peak extra memory O(nnz)",
         _encode_vs_gemm),
    Goal("sparse decode fwd+bwd bandwidth", "cuda", "sae-2304", "≥ 70% of HBM bandwidth on gathered bytes", _decode_bw),
    Goal("SAE TopK step vs eager", "cuda", "sae-2304", "≥ 4× eager", _step_speedup("sae-topk", "sae-2304", 4.0)),
    Goal("SAE TopK step vs eai-sparsify", "cuda", "sae-2304", "≤ 0.3× its peak memory, and faster",
         _vs_sparsify_memory),
    Goal("CLT step (untied, BatchTopK) vs eager", "cuda", "gpt2-clt", "≥ 20× eager",
         _step_speedup("clt-none-batchtopk", "gpt2-clt", 20.0)),
    Goal("BatchTopK 8192×131072 bf16 vs one read", "cuda", "btk-8192", "≤ 2× one read of h", _btk_vs_read),
    Goal("BatchTopK 8192×131072 vs torch.topk flattened", "cuda", "btk-8192", "≥ 10× torch.topk",
         _topk_vs("batch_topk", "btk-8192", "torch.topk-flat", 10.0)),
    Goal("sparse decode fwd+bwd vs dense eager", "cpu", "cpu-small", "≥ 30× a_dense @ W",
         _decode_vs("dense-matmul", 30.0)),
    Goal("sparse decode fwd+bwd vs embedding_bag", "cpu", "cpu-small", "≥ 1.5× embedding_bag",
         _decode_vs("embedding_bag", 1.5)),
    Goal("exact BatchTopK [2048, 16384] vs torch.topk flattened", "cpu", "cpu-small", "≥ 10× torch.topk",
         _topk_vs("batch_topk", "cpu-small", "torch.topk-flat", 10.0)),
    Goal("TopK SAE step vs eai-sparsify", "cpu", "cpu-small", "≥ 1.8× eai-sparsify", _cpu_step_vs_sparsify(1.8)),
    # the step at its floor: the floor is the bare encoder GEMM + the bare Adam step (profile suite)
    Goal("TopK SAE step vs its floor (encoder GEMM + Adam)", "cpu", "cpu-small", "≤ 1.3× the floor",
         _step_vs_floor(("sae-topk",), "cpu-small", 1.3)),
    Goal("TopK SAE step vs eai-sparsify, at the floor", "cpu", "cpu-small", "≥ 2.5× eai-sparsify",
         _cpu_step_vs_sparsify(2.5)),
    Goal("CLT BatchTopK step vs its floor (encoder GEMMs + Adam), every tying", "cpu", "cpu-clt", "≤ 1.5× the floor",
         _step_vs_floor(tuple(f"clt-{t}-batchtopk" for t in ("none", "per_source", "per_target")), "cpu-clt", 1.5)),
    Goal("CLT BatchTopK step vs crosslayer-coding, every tying", "cpu", "cpu-clt", "≥ 12× crosslayer-coding",
         _cpu_clt_vs_clc(12.0)),
    Goal("the default demo's trainer loop vs a bare eager loop", "cpu", "demo",
         "≤ 1× the bare loop per step, with and without AuxK", _loop_vs_bare),
    # the same step profile on a GPU (gpu_check.sh's bench-profile stage), read against the CPU targets
    Goal("TopK SAE step vs its floor (encoder GEMM + Adam)", "cuda", "sae-2304", "≤ 1.3× the floor",
         _step_vs_floor(("sae-topk",), "sae-2304", 1.3)),
    Goal("CLT BatchTopK step vs its floor (encoder GEMMs + Adam), every tying", "cuda", "gpt2-clt",
         "≤ 1.5× the floor",
         _step_vs_floor(tuple(f"clt-{t}-batchtopk" for t in ("none", "per_source", "per_target")), "gpt2-clt", 1.5)),
    # Matryoshka (5 prefixes) and MOLT (d = 768, N = 32, 2% of the transforms open)
    Goal("Matryoshka (G = 5) SAE step vs the plain BatchTopK SAE step", "cuda", "sae-2304", "≤ 1.25× the plain step",
         _step_ratio("sae-batchtopk-matryoshka5", "sae-batchtopk", "sae-2304", 1.25)),
    Goal("Matryoshka (G = 5) CLT step vs the plain BatchTopK CLT step", "cuda", "gpt2-clt", "≤ 1.25× the plain step",
         _step_ratio("clt-none-batchtopk-matryoshka5", "clt-none-batchtopk", "gpt2-clt", 1.25)),
    Goal("MOLT step (TopK gates) vs the dense eager reference", "cuda", "molt-768", "≥ 10× eager",
         _step_speedup("molt-topk", "molt-768", 10.0)),
    Goal("MOLT layer fwd+bwd vs gate GEMM + active FLOPs", "cuda", "molt-768", "≤ 2× the floor",
         _molt_vs_floor("molt-768", 2.0)),
    Goal("Matryoshka (G = 5) SAE step vs the plain BatchTopK SAE step", "cpu", "cpu-small", "≤ 1.25× the plain step",
         _step_ratio("sae-batchtopk-matryoshka5", "sae-batchtopk", "cpu-small", 1.25)),
    Goal("MOLT step (TopK gates) vs the dense eager reference", "cpu", "molt-cpu", "≥ 10× eager",
         _step_speedup("molt-topk", "molt-cpu", 10.0)),
    Goal("MOLT layer fwd+bwd vs gate GEMM + active FLOPs", "cpu", "molt-cpu", "≤ 2× the floor",
         _molt_vs_floor("molt-cpu", 2.0)),
    # density-adaptive ops (ReLU/JumpReLU dictionaries from 0.1% to 50% density)
    Goal("density sweep: adaptive vs the better of sparse and dense", "cpu", "density-cpu",
         "≤ 1.10× at every density", _adaptive_within("density-cpu")),
    Goal("JumpReLU CLT step at 48% density vs crosslayer-coding", "cpu", "density-cpu",
         "≥ 1.5× its speed, peak memory ≤ its", _vs_peer("density-cpu")),
    Goal("density crossover measured", "cpu", "density-cpu", "recorded", _crossover_measured("density-cpu")),
    Goal("density sweep: adaptive vs the better of sparse and dense", "cuda", "density-gpu",
         "≤ 1.10× at every density", _adaptive_within("density-gpu")),
    Goal("density crossover measured", "cuda", "density-gpu", "recorded", _crossover_measured("density-gpu")),
    Goal("CLT step (untied, JumpReLU) at 50% density vs the dense-GEMM floor", "cuda", "density-gpu",
         "≤ 1.3× the floor", _vs_dense_floor("density-gpu")),
]


def goal_shapes() -> set[str]:
    return {g.shape for g in GOALS}


def evaluate(rows: list[dict], meta: dict, device_type: str) -> list[dict]:
    out = []
    shapes = {r["shape"] for r in rows}
    for g in GOALS:
        if g.device != device_type:
            continue
        if g.shape not in shapes:
            measured, met, why = None, None, f"shape {g.shape} not in this run"
        else:
            try:
                measured, met, why = g.check(rows, meta)
            except Exception as e:  # a malformed row never breaks the report
                measured, met, why = None, None, f"{type(e).__name__}: {e}"
        out.append({"goal": g.name, "device": g.device, "shape": g.shape, "target": g.target,
                    "measured": measured or "not yet measured", "status":
                    ("met" if met else "not met") if measured else f"not yet measured ({why})"})
    return out


def goal_table(results: list[dict]) -> list[str]:
    lines = ["| goal | shape | target | measured | status |", "|---|---|---|---|---|"]
    for g in results:
        lines.append(f"| {g['goal']} | {g['shape']} | {g['target']} | {g['measured']} | {g['status']} |")
    return lines
