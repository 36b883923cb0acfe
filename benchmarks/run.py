"""Run the fastclt benchmark suites and write their results.

    python -m benchmarks.run --suite ops|train|profile|all [--shapes tiny,cpu-small,...] [--out DIR] [--quick]
                             [--ops encode,sparse_decode,...] [--device cuda|cpu] [--budget-s SECONDS]
                             [--select all|goals|rest] [--variants V1,V2,...] [--append]

Default shapes: the named GPU shapes on a GPU, ``cpu-small`` on a CPU (benchmarks/shapes.py).
Default output: ``benchmarks/results/<device-slug>/``. Writes ``results.csv`` (one row per case,
rewritten after every case so that an interrupted run keeps what it measured), ``results.md``
(goal table, then one table per suite and shape), ``meta.json`` (device, versions, commit,
measured peaks, goals) and one PNG per suite and shape (skipped with a warning without matplotlib).
A case that does not fit in memory, or an implementation that is unavailable or fails, becomes a
row with a note; cases left when ``--budget-s`` runs out (or on SIGTERM) are rows "skipped".
``--select goals`` runs only the cases a goal reads (benchmarks/goals.py), ``--select rest`` the
others; ``--variants`` keeps only the cases of a few variants (e.g. ``sae-batchtopk-matryoshka5``);
``--append`` keeps the rows already in the output folder's results.csv (a later pass adds its rows to
an earlier one's, as ``benchmarks/gpu_check.sh`` does).
"""
from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from benchmarks import goals as goals_mod
from benchmarks.harness import (Runner, add_speedups, environment, fmt, measure_peaks, read_csv, sort_rows,
                                write_csv, write_markdown, write_meta, write_plots)
from benchmarks.shapes import Shape, default_shapes, get_shapes

__all__ = ["run_suites", "render", "main", "SUITES", "default_out_dir"]

SUITES = ("ops", "train", "density", "profile")
SELECTS = ("all", "goals", "rest")
REPO = Path(__file__).resolve().parent.parent

# cases a goal reads run first, so that a time budget cuts the least useful rows
_GOAL_KEYS = {
    ("encode", "topk", "fwd", "sae-2304"), ("sparse_decode", "", "fwd+bwd", "sae-2304"),
    ("batch_topk", "", "fwd", "btk-8192"), ("sparse_decode", "", "fwd+bwd", "cpu-small"),
    ("batch_topk", "", "fwd", "cpu-small"), ("train_step", "sae-topk", "", "sae-2304"),
    ("train_step", "clt-none-batchtopk", "", "gpt2-clt"), ("train_step", "sae-topk", "", "cpu-small"),
    ("train_step", "sae-batchtopk", "", "sae-2304"), ("train_step", "sae-batchtopk-matryoshka5", "", "sae-2304"),
    ("train_step", "clt-none-batchtopk-matryoshka5", "", "gpt2-clt"),
    ("train_step", "sae-batchtopk", "", "cpu-small"), ("train_step", "sae-batchtopk-matryoshka5", "", "cpu-small"),
    ("train_step", "molt-topk", "", "molt-768"), ("molt", "", "fwd+bwd", "molt-768"),
    ("molt", "gate-gemm", "fwd", "molt-768"),
    ("train_step", "molt-topk", "", "molt-cpu"), ("molt", "", "fwd+bwd", "molt-cpu"),
    ("molt", "gate-gemm", "fwd", "molt-cpu"),
    ("step_phases", "sae-topk", "", "cpu-small"),
    ("step_phases", "clt-none-batchtopk", "", "cpu-clt"), ("step_phases", "clt-per_source-batchtopk", "", "cpu-clt"),
    ("step_phases", "clt-per_target-batchtopk", "", "cpu-clt"), ("trainer_loop", "demo-clt-none-batchtopk", "", "demo"),
}


def _priority(op: str, variant: str, mode: str, shape: str) -> int:
    return 0 if (op, variant, mode, shape) in _GOAL_KEYS else 1


class _Stop(BaseException):  # not an Exception: Runner.run must not swallow it
    pass


def default_out_dir(device: torch.device) -> Path:
    from benchmarks.harness import device_slug
    return REPO / "benchmarks" / "results" / device_slug(device)


def _collect(suites: Sequence[str], shapes: Sequence[Shape], device: torch.device, dtype: torch.dtype,
             ops: Optional[Sequence[str]] = None, quick: bool = False) -> list:
    """Every case, in table order (shape, suite, op, variant, mode, impl)."""
    from benchmarks.bench_density import density_cases
    from benchmarks.bench_ops import ops_cases
    from benchmarks.bench_loop import loop_cases
    from benchmarks.bench_profile import profile_cases
    from benchmarks.bench_train_step import train_cases
    cases = []
    for s in shapes:
        if "density" in suites and (s.density or s.name == "tiny"):
            cases += density_cases(s, device, dtype, quick=quick, priority_of=_priority)
        if s.density:
            continue
        if "train" in suites and s.ops is None:
            cases += train_cases(s, device, priority_of=_priority)
        if "profile" in suites and s.ops is None:
            cases += profile_cases(s, device, priority_of=_priority) + loop_cases(s, device, priority_of=_priority)
        if "ops" in suites:
            cases += ops_cases(s, device, dtype, ops=tuple(ops) if ops else None, priority_of=_priority)
    return cases


def run_suites(suites: Sequence[str] = SUITES, shapes: Optional[Sequence[Shape]] = None, out_dir: Optional[Path] = None,
               *, device: Optional[torch.device] = None, dtype: Optional[torch.dtype] = None, quick: bool = False,
               budget_s: Optional[float] = None, ops: Optional[Sequence[str]] = None,
               select: str = "all", variants: Optional[Sequence[str]] = None, append: bool = False,
               log: Callable[[str], None] = print) -> dict:
    """Run ``suites`` on ``shapes`` (the ops suite restricted to ``ops`` when given; ``select``: all
    cases, only those a goal reads, or the rest; ``variants``: only the cases of those variants) and
    write the outputs into ``out_dir`` (``append``: after the rows of its results.csv). Returns
    {"rows", "meta", "goals", "files"}."""
    for s in suites:
        if s not in SUITES:
            raise ValueError(f"suite: expected one of {SUITES}, got {s!r}")
    if select not in SELECTS:
        raise ValueError(f"select: expected one of {SELECTS}, got {select!r}")
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    shapes = list(shapes) if shapes is not None else default_shapes(device.type)
    out_dir = Path(out_dir) if out_dir is not None else default_out_dir(device)
    out_dir.mkdir(parents=True, exist_ok=True)
    t_start = time.monotonic()

    stamp = environment(device)
    log(f"[bench] {stamp['device_name']} | torch {stamp['torch']} triton {stamp['triton']} CUDA {stamp['cuda']} "
        f"| commit {stamp['commit']}")
    peaks = measure_peaks(device, quick=quick)
    log(f"[bench] measured peaks: {peaks['peak_flops'] / 1e12:.3g} TFLOP/s ({peaks['peak_flops_how']}), "
        f"{peaks['peak_bw'] / 1e9:.4g} GB/s ({peaks['peak_bw_how']})")
    meta = {**stamp, **peaks, "quick": quick, "dtype": str(dtype).replace("torch.", ""), "suites": list(suites),
            "shapes": [s.as_dict() for s in shapes],
            "timer": "CUDA events per run" if device.type == "cuda" else "time.perf_counter per run",
            "memory": ("torch.cuda.max_memory_allocated minus memory allocated before the run (extra); "
                       "mem_before_mb: memory held before it" if device.type == "cuda"
                       else "not measured on CPU (empty columns)"),
            "argv": sys.argv[1:], "select": select, "variants": list(variants) if variants else None}

    cases = sorted(_collect(suites, shapes, device, dtype, ops, quick), key=lambda c: c.priority)  # goal cases first
    if select != "all":
        cases = [c for c in cases if (c.priority == 0) == (select == "goals")]
    if variants:
        cases = [c for c in cases if c.variant in set(variants)]
    runner = Runner(device, peaks, quick=quick, stamp=stamp)
    csv_path = out_dir / "results.csv"
    rows: list[dict] = read_csv(csv_path) if append and csv_path.exists() else []
    log(f"[bench] {len(cases)} cases ({select})" + (f" after {len(rows)} rows already in {csv_path}" if rows else ""))

    def on_term(signum, frame):
        raise _Stop(f"signal {signum}")
    old_handler = None
    try:
        old_handler = signal.signal(signal.SIGTERM, on_term)
    except ValueError:  # not the main thread: no handler, the budget still applies
        pass
    stop_reason = ""
    try:
        for i, case in enumerate(cases):
            if not stop_reason and budget_s is not None and time.monotonic() - t_start > budget_s:
                stop_reason = f"time budget of {budget_s:.0f} s spent"
            if stop_reason:
                case.skip = stop_reason
            t0 = time.monotonic()
            run_case = getattr(case, "run_rows", None) or (lambda r, c=case: [r.run(c)])  # a profile: many rows
            try:
                new = run_case(runner)
            except _Stop as e:
                stop_reason = f"interrupted ({e})"
                case.skip = stop_reason
                new = [runner.run(case)]
            rows += new
            for row in new:
                if row["status"] != "skipped" or not stop_reason:
                    log(f"[bench] {i + 1}/{len(cases)} {case.suite} {case.shape} {case.op} {case.variant} "
                        f"{row['mode']} {case.impl}: {row['status']} {fmt(row['median_ms'])} ms "
                        f"({time.monotonic() - t0:.1f} s) {row['note'] or ''}")
            write_csv(rows, csv_path)
        if "density" in suites and select != "rest" and not stop_reason:
            # fastclt against crosslayer-coding at the densest point, timed in alternation
            from benchmarks.bench_density import peer_comparison
            for s in shapes:
                if s.density and (budget_s is None or time.monotonic() - t_start < budget_s):
                    try:
                        rows += peer_comparison(s, device, runner, rounds=5 if quick else 9, log=log)
                    except _Stop as e:
                        stop_reason = f"interrupted ({e})"
                    write_csv(rows, csv_path)
    finally:
        if old_handler is not None:
            signal.signal(signal.SIGTERM, old_handler)
    if stop_reason:
        log(f"[bench] stopped early: {stop_reason}; {sum(r['status'] == 'skipped' for r in rows)} rows skipped")
    if not rows:
        log("[bench] no cases to run")

    meta["wall_s"] = round(time.monotonic() - t_start, 1)
    res = _report(rows, meta, out_dir, device.type)
    log(f"[bench] wrote {len(rows)} rows to {out_dir} in {meta['wall_s']} s")
    return res


def _report(rows: list[dict], meta: dict, out_dir: Path, device_type: str) -> dict:
    """Speed-ups, goals, then results.csv / results.md / meta.json / PNGs, rows in table order."""
    rows = sort_rows(rows)
    add_speedups(rows)
    goal_results = goals_mod.evaluate(rows, meta, device_type)
    meta["goals"] = goal_results
    write_csv(rows, out_dir / "results.csv")
    write_markdown(rows, meta, out_dir / "results.md", goals_mod.goal_table(goal_results))
    write_meta(meta, out_dir / "meta.json")
    from benchmarks.bench_profile import write_profile_plot
    files = [out_dir / "results.csv", out_dir / "results.md", out_dir / "meta.json"] + write_plots(rows, out_dir)
    if any(r["suite"] == "density" for r in rows):
        from benchmarks.bench_density import write_crossovers, write_density_plots
        files += write_density_plots(rows, out_dir)
        cross = write_crossovers(rows, out_dir, meta.get("device", ""), meta.get("dtype", ""))
        files += [cross] if cross else []
    files += write_profile_plot(rows, out_dir)
    return {"rows": rows, "meta": meta, "goals": goal_results, "files": files}


def render(out_dir: Path) -> dict:
    """Rewrite results.md, meta.json's goals and the PNGs of an existing results folder from its
    results.csv and meta.json (after editing goals or the report format; nothing is re-measured)."""
    out_dir = Path(out_dir)
    meta = json.loads((out_dir / "meta.json").read_text())
    rows = read_csv(out_dir / "results.csv")
    return _report(rows, meta, out_dir, "cpu" if meta["device"].startswith("cpu") else "cuda")


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n\n")[0])
    p.add_argument("--suite", default="all", help="ops | train | density | profile | all, or several joined by commas")
    p.add_argument("--calibrate", action="store_true", help="density suite: print the crossover of each op "
                   "measured by the sweep (also written to crossover.json)")
    p.add_argument("--shapes", default=None, help="comma-separated names from benchmarks/shapes.py")
    p.add_argument("--out", default=None, help="output folder (default benchmarks/results/<device-slug>/)")
    p.add_argument("--ops", default=None, help="comma-separated op names: restrict the ops suite "
                   "(encode, topk, batch_topk, batch_topk_layers, sparse_decode, clt_decode, auxk, molt)")
    p.add_argument("--quick", action="store_true", help="fewer runs per case (for CI and tight budgets)")
    p.add_argument("--device", default=None, choices=("cuda", "cpu"))
    p.add_argument("--dtype", default=None, choices=("bfloat16", "float16", "float32"))
    p.add_argument("--budget-s", type=float, default=None, help="stop starting cases after this many seconds")
    p.add_argument("--select", default="all", choices=SELECTS, help="all cases, only those a goal reads, or the rest")
    p.add_argument("--variants", default=None, help="comma-separated variant names: run only their cases "
                   "(e.g. sae-batchtopk,sae-batchtopk-matryoshka5)")
    p.add_argument("--append", action="store_true", help="keep the rows already in the output folder's results.csv")
    p.add_argument("--render", default=None, metavar="DIR", help="re-render the report of an existing results "
                   "folder from its results.csv and meta.json, measuring nothing")
    a = p.parse_args(argv)
    if a.render:
        res = render(Path(a.render))
        print("\n".join(goals_mod.goal_table(res["goals"])))
        return 0
    device = torch.device(a.device) if a.device else None
    if device is not None and device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device here")
    suites = SUITES if a.suite == "all" else tuple(x.strip() for x in a.suite.split(",") if x.strip())
    if set(suites) - set(SUITES):
        p.error(f"--suite: unknown {sorted(set(suites) - set(SUITES))}; known: {list(SUITES)} or all")
    shapes = get_shapes(a.shapes) if a.shapes else None
    dtype = getattr(torch, a.dtype) if a.dtype else None
    ops = [o.strip() for o in a.ops.split(",") if o.strip()] if a.ops else None
    from benchmarks.bench_ops import OPS
    if ops and set(ops) - set(OPS):
        p.error(f"--ops: unknown {sorted(set(ops) - set(OPS))}; known: {list(OPS)}")
    res = run_suites(suites, shapes, Path(a.out) if a.out else None, device=device, dtype=dtype, quick=a.quick,
                     budget_s=a.budget_s, ops=ops, select=a.select, append=a.append,
                     variants=[v.strip() for v in a.variants.split(",") if v.strip()] if a.variants else None)
    print("\n".join(goals_mod.goal_table(res["goals"])))
    if a.calibrate:
        from benchmarks.bench_density import calibrate
        for shape in sorted({r["shape"] for r in res["rows"] if r["suite"] == "density"}):
            print(f"crossover at {shape}: {calibrate(res['rows'], shape)} (fastclt/ops/density.py DEFAULTS)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
