"""Timing and reporting core of the fastclt benchmarks.

A benchmark is a list of ``Case`` objects. ``Case.make(seed)`` builds one input set and returns a
zero-argument callable that runs the measured region once. ``Runner.run(case)`` then

- builds one input set, or several when they would fit in the last-level cache (L2 on a GPU), and
  rotates among them so that repeated runs do not measure the cache;
- warms up (compilation, autotuning and handle creation stay out of the numbers), then times many
  runs: CUDA events around each run on a GPU, ``time.perf_counter`` on a CPU; reports the median
  and the 20th/80th percentiles;
- measures the peak memory of one run on a GPU (``torch.cuda.max_memory_allocated`` minus what was
  allocated before the run: the op's *extra* memory; the memory held before the run is reported
  beside it). On a CPU memory is not measured (PyTorch's CPU allocator is invisible to
  tracemalloc, and the resident set size only grows): the columns are empty there;
- turns counted FLOPs and minimal bytes into TFLOP/s, GB/s and the roofline floor
  ``max(flops / peak_flops, bytes / peak_bw)`` with peaks measured once per run on this machine
  (``measure_peaks``), and the fraction of that floor achieved (floor / measured time).

Every row is stamped with the device, the torch / triton / CUDA versions, the git commit and the date.
"""
from __future__ import annotations

import csv
import datetime as _dt
import gc
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
import traceback
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch

__all__ = [
    "Case", "Runner", "Timing", "ROW_FIELDS", "TimingPolicy",
    "git_commit", "device_name", "device_slug", "environment", "measure_peaks",
    "free_memory_bytes", "cache_bytes", "add_speedups", "write_csv", "read_csv", "write_markdown",
    "write_plots", "fmt",
]

ROW_FIELDS = [
    "suite", "op", "variant", "mode", "shape", "impl", "status", "note", "dtype",
    "median_ms", "p20_ms", "p80_ms", "n_runs", "n_input_sets",
    "peak_extra_mb", "mem_before_mb", "flops", "bytes", "tflops", "gbps", "floor_ms", "frac_roofline",
    "eager_impl", "speedup_vs_eager",
    "device", "device_name", "torch", "triton", "cuda", "commit", "date",
]

# ---------------------------------------------------------------------------------------- stamps


def git_commit(repo: Optional[Path] = None) -> str:
    """``git rev-parse HEAD`` of the repository holding this file; in a copy without git, the
    ``FASTCLT_COMMIT`` environment variable (set by whoever copied the tree), else "unknown"."""
    repo = repo or Path(__file__).resolve().parent.parent
    fallback = os.environ.get("FASTCLT_COMMIT") or "unknown"
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, timeout=10)
        sha = out.stdout.strip()
        if out.returncode != 0 or not re.fullmatch(r"[0-9a-f]{40}", sha):
            return fallback
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return fallback


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{_cpu_model()} ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"


def device_slug(device: torch.device) -> str:
    """A folder name for the device: ``nvidia-h100-80gb-hbm3``, ``cpu-intel-r-xeon-r-processor-2c``."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"cpu-{_cpu_model()}-{os.cpu_count()}c"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def _versions() -> dict:
    try:
        import triton  # noqa: F401  (version only)
        triton_version = triton.__version__
    except Exception:  # triton missing or broken: benchmarks still run
        triton_version = "none"
    return {"torch": torch.__version__, "triton": triton_version, "cuda": torch.version.cuda or "none"}


def environment(device: torch.device) -> dict:
    """The stamp every row carries."""
    return {
        "device": device_slug(device), "device_name": device_name(device), **_versions(),
        "commit": git_commit(), "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


# ------------------------------------------------------------------------------------- memory


def free_memory_bytes(device: torch.device) -> int:
    """Memory a case may still allocate: free device memory on a GPU, MemAvailable on a CPU."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 40


def cache_bytes(device: torch.device) -> int:
    """Size of the cache that repeated runs could hit: the GPU's L2, or the CPU's largest cache."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return int(getattr(props, "L2_cache_size", 50 << 20) or (50 << 20))
    best = 32 << 20
    base = Path("/sys/devices/system/cpu/cpu0/cache")
    try:
        for idx in base.glob("index*"):
            text = (idx / "size").read_text().strip()
            m = re.fullmatch(r"(\d+)([KMG]?)", text)
            if m:
                best = max(best, int(m.group(1)) * {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}[m.group(2)])
    except OSError:
        pass
    return best


def release(device: torch.device, big: bool = True) -> None:
    """Free what a case left behind. A full gc pass costs ~0.2 s with torch loaded: only for big cases."""
    if big:
        gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------- timing


@dataclass
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float
    n: int


@dataclass
class TimingPolicy:
    """How long to warm up and how many runs to time, from the duration of one run."""
    warmup_s: float
    rep_s: float
    min_rep: int
    max_rep: int
    max_warmup: int = 10

    @staticmethod
    def for_device(device: torch.device, quick: bool) -> "TimingPolicy":
        if device.type == "cuda":
            return TimingPolicy(0.02, 0.1, 3, 50) if quick else TimingPolicy(0.05, 0.4, 10, 200)
        return TimingPolicy(0.0, 0.05, 3, 5, max_warmup=0) if quick else TimingPolicy(0.0, 1.0, 3, 25, max_warmup=1)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    if len(xs) == 1:
        return xs[0]
    pos = q * (len(xs) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def time_fns(fns: list[Callable[[], Any]], device: torch.device, policy: TimingPolicy,
             memory: Optional[list] = None) -> Timing:
    """Median / p20 / p80 in milliseconds of running ``fns`` in rotation (one call per sample).
    When ``memory`` is a list, the (peak extra MB, MB before) of the second call is appended to it."""
    # two calls outside the statistics: the first compiles / autotunes, the second estimates one
    # run's duration (and its peak memory, free of the first call's compile-time workspaces)
    fns[0]()
    _sync(device)
    if memory is not None and device.type == "cuda":
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    fns[1 % len(fns)]()
    _sync(device)
    est = max(time.perf_counter() - t0, 1e-6)
    if memory is not None:
        memory.append(((torch.cuda.max_memory_allocated(device) - before) / 2**20, before / 2**20)
                      if device.type == "cuda" else (None, None))
    n_warm = min(policy.max_warmup, int(policy.warmup_s / est))
    for i in range(n_warm):
        fns[i % len(fns)]()
    n = max(policy.min_rep, min(policy.max_rep, int(policy.rep_s / est)))
    times: list[float] = []
    if device.type == "cuda":
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
        torch.cuda.synchronize(device)
        for i in range(n):
            starts[i].record()
            fns[i % len(fns)]()
            ends[i].record()
        torch.cuda.synchronize(device)
        times = [s.elapsed_time(e) for s, e in zip(starts, ends)]
    else:
        for i in range(n):
            t = time.perf_counter()
            fns[i % len(fns)]()
            times.append((time.perf_counter() - t) * 1e3)
    return Timing(statistics.median(times), _percentile(times, 0.2), _percentile(times, 0.8), n)


# ------------------------------------------------------------------------------------- peaks


def measure_peaks(device: torch.device, quick: bool = False) -> dict:
    """Measured ceilings of this machine: a large GEMM (bf16 on a GPU, fp32 on a CPU) through
    ``torch.matmul`` for FLOP/s, and a large copy (bytes read + bytes written) for bandwidth."""
    policy = TimingPolicy.for_device(device, quick=True)
    if device.type == "cuda":  # cheap on a GPU even in quick mode: always the full size
        n, dtype, copy_bytes = 8192, torch.bfloat16, 1 << 30
    else:  # the copy must not fit in the CPU's last-level cache
        llc = cache_bytes(device)
        n, dtype = (1024 if quick else 4096), torch.float32
        copy_bytes = min(max(2 * llc, 256 << 20), 512 << 20) if quick else min(max(4 * llc, 256 << 20), 1 << 30)
    g = torch.Generator(device=device).manual_seed(0)
    def gemm_s() -> float:  # the operands are freed on return
        a = torch.randn(n, n, device=device, dtype=dtype, generator=g)
        b = torch.randn(n, n, device=device, dtype=dtype, generator=g)
        c = torch.empty(n, n, device=device, dtype=dtype)
        return time_fns([lambda: torch.matmul(a, b, out=c)], device, policy).median_ms / 1e3

    def copy_s() -> float:
        src = torch.arange(copy_bytes // 4, device=device, dtype=torch.float32)  # cheap to make, not zeros
        dst = torch.empty_like(src)
        return time_fns([lambda: dst.copy_(src)], device, policy).median_ms / 1e3

    t_gemm, t_copy = gemm_s(), copy_s()
    release(device)
    return {
        "peak_flops": 2 * n**3 / t_gemm, "peak_flops_dtype": str(dtype).replace("torch.", ""),
        "peak_flops_how": f"torch.matmul {n}x{n}x{n} {str(dtype).replace('torch.', '')}",
        "peak_bw": 2 * copy_bytes / t_copy,
        "peak_bw_how": f"copy of {copy_bytes >> 20} MiB, read + write counted",
    }


# ---------------------------------------------------------------------------------------- cases


@dataclass
class Case:
    """One benchmark row. ``make(seed)`` builds an input set and returns the measured callable."""
    suite: str
    op: str
    variant: str
    mode: str
    shape: str
    impl: str
    make: Optional[Callable[[int], Callable[[], Any]]]
    dtype: str = ""
    flops: Optional[float] = None
    bytes: Optional[float] = None
    input_bytes: int = 0  # bytes of one input set (decides rotation)
    need_bytes: int = 0  # rough total memory the case needs (decides "does not fit")
    note: str = ""
    skip: Optional[str] = None  # a reason to skip without running
    priority: int = 1  # 0: a goal of the README depends on it: run first
    rotate: bool = True


class Runner:
    """Runs cases on one device and turns them into stamped result rows."""

    def __init__(self, device: torch.device, peaks: dict, quick: bool = False, max_input_sets: int = 4,
                 stamp: Optional[dict] = None):
        self.device = device
        self.peaks = peaks
        self.quick = quick
        self.policy = TimingPolicy.for_device(device, quick)
        self.max_input_sets = min(max_input_sets, 2) if quick else max_input_sets
        self.stamp = stamp or environment(device)
        self.cache = cache_bytes(device)

    def n_input_sets(self, case: Case) -> int:
        if not case.rotate or case.input_bytes <= 0:
            return 1
        if case.input_bytes >= self.cache:
            return 1
        return max(2, min(self.max_input_sets, math.ceil(2 * self.cache / case.input_bytes)))

    def row(self, case: Case, status: str, note: str = "", timing: Optional[Timing] = None,
            mem: tuple = (None, None), n_sets: int = 0) -> dict:
        r = {f: None for f in ROW_FIELDS}
        r.update(suite=case.suite, op=case.op, variant=case.variant, mode=case.mode, shape=case.shape,
                 impl=case.impl, status=status, note="; ".join(x for x in (case.note, note) if x),
                 dtype=case.dtype, flops=case.flops, bytes=case.bytes, n_input_sets=n_sets or None)
        r.update(self.stamp)
        floor_s = None
        if case.flops or case.bytes:
            floor_s = max((case.flops or 0) / self.peaks["peak_flops"], (case.bytes or 0) / self.peaks["peak_bw"])
            r["floor_ms"] = floor_s * 1e3
        if timing is not None:
            t = timing.median_ms / 1e3
            r.update(median_ms=timing.median_ms, p20_ms=timing.p20_ms, p80_ms=timing.p80_ms, n_runs=timing.n)
            if case.flops:
                r["tflops"] = case.flops / t / 1e12
            if case.bytes:
                r["gbps"] = case.bytes / t / 1e9
            if floor_s:
                r["frac_roofline"] = floor_s / t
        r["peak_extra_mb"], r["mem_before_mb"] = mem
        return r

    def run(self, case: Case) -> dict:
        if case.skip:
            return self.row(case, "skipped", case.skip)
        free = free_memory_bytes(self.device)
        if case.need_bytes and case.need_bytes > 0.9 * free:
            return self.row(case, "skipped", f"needs ~{case.need_bytes / 2**30:.1f} GiB, "
                                             f"{free / 2**30:.1f} GiB free")
        fns: list = []
        try:
            n_sets = self.n_input_sets(case)
            fns = [case.make(seed) for seed in range(n_sets)]
            if len(fns) == 1:
                fns = fns * 2
            mem: list = []
            before = _encode_stats()
            timing = time_fns(fns, self.device, self.policy, memory=mem)
            return self.row(case, "ok", _stats_note(before, _encode_stats()), timing=timing, mem=mem[0],
                            n_sets=n_sets)
        except torch.OutOfMemoryError:
            return self.row(case, "skipped", "out of memory")
        except Exception as e:  # a broken impl is a row with a note, never a crashed run
            where = traceback.extract_tb(e.__traceback__)[-1]
            msg = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
            return self.row(case, "error", f"{type(e).__name__}: {msg} ({Path(where.filename).name}:{where.lineno})")
        finally:
            del fns
            release(self.device, big=case.need_bytes > (256 << 20))


def _encode_stats() -> Counter:
    """The Triton encode's fallback counters (``fastclt.ops.triton.encode.STATS``) if it is loaded."""
    mod = sys.modules.get("fastclt.ops.triton.encode")
    return Counter(mod.STATS) if mod is not None else Counter()


def _stats_note(before: Counter, after: Counter) -> str:
    """The fallbacks the Triton encode took during a case (overflow reruns, τ samples and retries,
    dense rows): each one costs a launch or more, so a steady state should show few."""
    diff = after - before
    if not diff:
        return ""
    return "triton encode fallbacks: " + ", ".join(f"{k}={v}" for k, v in sorted(diff.items()))


# ---------------------------------------------------------------------------------------- output


def add_speedups(rows: list[dict]) -> None:
    """speed-up vs eager = time of the group's eager row / time of the row, per (suite, op, variant,
    mode, shape); the eager row is impl "reference" (the pure-PyTorch implementation)."""
    eager = {}
    for r in rows:
        if r["impl"] == "reference" and r["status"] == "ok":
            eager[(r["suite"], r["op"], r["variant"], r["mode"], r["shape"])] = r["median_ms"]
    for r in rows:
        t = eager.get((r["suite"], r["op"], r["variant"], r["mode"], r["shape"]))
        if t is not None and r["status"] == "ok" and r["median_ms"]:
            r["eager_impl"] = "reference"
            r["speedup_vs_eager"] = t / r["median_ms"]


_OP_ORDER = ("train_step", "encode", "topk", "batch_topk", "batch_topk_layers", "sparse_decode", "clt_decode", "auxk",
             "molt")
_MODE_ORDER = ("fwd", "bwd", "fwd+bwd", "fwd+bwd+adam")
_IMPL_ORDER = ("reference", "auto", "cuda", "triton", "cpu")


def sort_rows(rows: list[dict]) -> list[dict]:
    """Table order: suite (train, ops), shape and variant as first seen, op, mode, then impl
    (reference, auto, kernels, baselines)."""
    first: dict = {}
    for i, r in enumerate(rows):
        first.setdefault(("shape", r["shape"]), i)
        first.setdefault(("variant", r["op"], r["variant"]), i)

    def rank(seq, x):
        return seq.index(x) if x in seq else len(seq)

    def key(ir):
        i, r = ir
        return (0 if r["suite"] == "train" else 1, first[("shape", r["shape"])], rank(_OP_ORDER, r["op"]),
                first[("variant", r["op"], r["variant"])], rank(_MODE_ORDER, r["mode"]),
                rank(_IMPL_ORDER, r["impl"]), i)
    return [r for _, r in sorted(enumerate(rows), key=key)]


def write_csv(rows: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=ROW_FIELDS)
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in ROW_FIELDS})


_NUMERIC = {"median_ms", "p20_ms", "p80_ms", "peak_extra_mb", "mem_before_mb", "flops", "bytes", "tflops",
            "gbps", "floor_ms", "frac_roofline", "speedup_vs_eager"}
_INT = {"n_runs", "n_input_sets"}


def read_csv(path: Path) -> list[dict]:
    rows = []
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            for k, v in r.items():
                if v == "":
                    r[k] = None
                elif k in _NUMERIC:
                    r[k] = float(v)
                elif k in _INT:
                    r[k] = int(v)
            rows.append(r)
    return rows


def fmt(x: Any, digits: int = 3) -> str:
    if x is None:
        return ""
    if isinstance(x, float):
        if x == 0:
            return "0"
        if abs(x) >= 1000:
            return f"{x:,.0f}"
        return f"{x:.{digits}g}"
    return str(x)


def _table(header: list[str], lines: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(c.replace("|", "/") for c in line) + " |" for line in lines]
    return out


def write_markdown(rows: list[dict], meta: dict, path: Path, goal_lines: Optional[list[str]] = None) -> None:
    """results.md: the stamp, the measured peaks, the goal table, then one table per suite and shape."""
    lines = [f"# fastclt benchmarks — {meta.get('device_name', '')}", ""]
    lines += [f"- device: `{meta.get('device')}` — {meta.get('device_name')}",
              f"- torch {meta.get('torch')}, triton {meta.get('triton')}, CUDA {meta.get('cuda')}",
              f"- commit `{meta.get('commit')}`, {meta.get('date')}",
              f"- measured peaks: {fmt((meta.get('peak_flops') or 0) / 1e12)} TFLOP/s "
              f"({meta.get('peak_flops_how')}), {fmt((meta.get('peak_bw') or 0) / 1e9)} GB/s "
              f"({meta.get('peak_bw_how')})",
              f"- timing: median of n runs after warm-up (p20–p80 beside it); "
              f"{meta.get('timer')}; quick={meta.get('quick')}; peak memory: {meta.get('memory')}",
              "- roofline % = max(FLOPs / peak FLOP/s, bytes / peak bandwidth) / median time; "
              "speed-up = the eager (reference) row's median / this row's median", ""]
    if goal_lines:
        lines += ["## Goals", ""] + goal_lines + [""]
    groups: dict = {}
    for r in rows:
        groups.setdefault((r["suite"], r["shape"]), []).append(r)
    for (suite, shape), rs in groups.items():
        lines += [f"## {suite} — {shape}", ""]
        if suite == "profile":
            lines += _profile_table(rs) + [""]
            continue
        body = []
        for r in rs:
            spread = f"{fmt(r['p20_ms'])}–{fmt(r['p80_ms'])}" if r.get("p20_ms") is not None else ""
            roof = f"{100 * r['frac_roofline']:.1f}%" if r.get("frac_roofline") is not None else ""
            sp = f"{r['speedup_vs_eager']:.2f}×" if r.get("speedup_vs_eager") is not None else ""
            mem = fmt(r.get("peak_extra_mb"))
            status = r["status"] if r["status"] != "ok" else ""
            note = "; ".join(x for x in (status, r.get("note") or "") if x)
            body.append([r["op"], r["variant"], r["mode"], r["impl"], fmt(r.get("median_ms")), spread,
                         fmt(r.get("tflops")), fmt(r.get("gbps")), roof, sp, mem, note])
        lines += _table(["op", "variant", "mode", "impl", "median ms", "p20–p80 ms", "TFLOP/s", "GB/s",
                         "% roofline", "vs eager", "peak extra MB", "note"], body)
        lines.append("")
    path.write_text("\n".join(lines) + "\n")


def _profile_table(rows: list[dict]) -> list[str]:
    """The profile suite's rows: per variant, each phase's median beside its floor."""
    body = []
    for r in rows:
        ratio = f"{r['median_ms'] / r['floor_ms']:.2f}×" if r.get("median_ms") and r.get("floor_ms") else ""
        status = r["status"] if r["status"] != "ok" else ""
        spread = f"{fmt(r['p20_ms'])}–{fmt(r['p80_ms'])}" if r.get("p20_ms") is not None else ""
        body.append([r["op"], r["variant"], r["mode"], r["impl"], fmt(r.get("median_ms")), spread,
                     fmt(r.get("floor_ms")), ratio, "; ".join(x for x in (status, r.get("note") or "") if x)])
    return _table(["op", "variant", "phase", "impl", "median ms", "spread ms", "floor ms", "× floor", "note"], body)


def write_plots(rows: list[dict], out_dir: Path) -> list[Path]:
    """One PNG per (suite, shape): median time per row (log scale) with p20–p80 whiskers.
    Returns the files written; warns and writes nothing when matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        import warnings
        warnings.warn("matplotlib is not installed: no plots written (pip install matplotlib)")
        return []
    groups: dict = {}
    for r in rows:
        if r["status"] == "ok" and r.get("median_ms") and r["suite"] != "profile":  # (bench_profile plots those)
            groups.setdefault((r["suite"], r["shape"]), []).append(r)
    written = []
    palette = {"reference": "#888888", "cuda": "#2a7ab9", "triton": "#d95f02", "cpu": "#1b9e77"}
    for (suite, shape), rs in groups.items():
        labels = [f"{r['op']} {r['variant']} {r['mode']} · {r['impl']}".replace("  ", " ") for r in rs]
        med = [r["median_ms"] for r in rs]
        lo = [max(r["median_ms"] - (r.get("p20_ms") or r["median_ms"]), 0) for r in rs]
        hi = [max((r.get("p80_ms") or r["median_ms"]) - r["median_ms"], 0) for r in rs]
        colors = [palette.get(r["impl"], "#7570b3") for r in rs]
        fig, ax = plt.subplots(figsize=(10, 0.28 * len(rs) + 1.5))
        y = list(range(len(rs)))
        ax.barh(y, med, xerr=[lo, hi], color=colors, ecolor="black", capsize=2)
        ax.set_yticks(y)
        ax.set_yticklabels(labels, fontsize=7)
        ax.invert_yaxis()
        ax.set_xscale("log")
        ax.set_xlabel("median time per call, ms (log scale; whiskers p20–p80)")
        ax.set_title(f"fastclt {suite} — {shape} — {rs[0].get('device_name', '')}", fontsize=9)
        fig.tight_layout()
        path = out_dir / f"{suite}_{shape}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def write_meta(meta: dict, path: Path) -> None:
    path.write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
