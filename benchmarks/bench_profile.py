"""Per-phase profile of a training step beside the floor of each phase.

The step is the train suite's (``bench_train_step``: ``opt.zero_grad(); model.loss(x, y).loss.backward();
opt.step()``, fused Adam, fp32 on a CPU, bf16 autocast on a GPU) with ``impl="auto"``, for

    sae-topk                 the TopK SAE                                    (shapes with "sae")
    clt-<tying>-batchtopk    the BatchTopK CLT, tying none | per_source | per_target  (shapes with "clt")

Phases are measured on the real code path: the models and ops mark them
(``fastclt.profiling.phase``: ``encode``, ``encoder_gemm`` nested in it, ``decode``, ``losses``; the
step marks ``optimizer``) and a ``torch.profiler`` run of a few steps attributes every op to the
innermost mark around it. A backward node is attributed through its autograd sequence number to
the mark under which its forward ran, so the backward of the encode is ``encoder_bwd`` and that of
the decode ``decode_bwd``, whatever kernels run there. Times are self times (CPU) or self device
times (CUDA) summed per phase and step; the median over the profiled steps is reported:

    encoder_gemm   the dense encoder GEMM (on the fused Triton encode: the GEMM kernel with its
                   candidate stores)
    selection      the rest of the encode: TopK / BatchTopK, compaction, building the codes
    decode_fwd     the decoder forward
    decode_bwd     its backward (dvalue and dW_dec)
    encoder_bwd    the sparse encoder backward (dW_enc, db_enc, dx)
    losses         reconstruction errors and penalties, forward and backward
    optimizer      the Adam step
    other          the profiled step's time minus all of the above: checks, normalisation,
                   bookkeeping (fired features, cut statistics, L0), zero_grad, gradient
                   accumulation, Python between the phases

Floors: ``encoder_gemm`` is the bare GEMM of the same operands (``torch.mm`` into a preallocated
output, one per layer), ``optimizer`` the bare fused Adam step over the same parameters and
gradients; the others are roofline floors (max(FLOPs / peak FLOP/s, bytes / peak bandwidth), with
the peaks measured at the start of the run and the counting conventions of benchmarks/README.md);
``other`` has none. The ``step`` row is the step timed without the profiler; its floor is the
goal's: bare encoder GEMM + bare Adam. The step and the two floors are timed alternating, round by
round (``alternated``), so that the ratio the goal reads compares times from the same stretches of
the run (timed one after another, a few seconds each, the per_source CLT step's ratio ranged
1.35–1.59× over three runs in one hour on the 2-core Xeon, its floor 31–35 ms). The harness's
median of the step alone is in the row's note.

Rows go to results.csv like every suite's (suite "profile", op "step_phases", mode = phase), with the
phase's time in ``median_ms`` and its floor in ``floor_ms``; ``write_profile_plot`` draws one
PNG per shape, each phase beside its floor.
"""
from __future__ import annotations

import statistics
import time
from typing import Callable, Optional

import torch

from benchmarks.bench_train_step import _adam, _autocast, _build_fastclt, _env, _name, _resolved, fastclt_impl, screens
from benchmarks.harness import Case, Runner, _percentile, time_fns
from benchmarks.shapes import Shape

__all__ = ["PHASES", "ProfileCase", "profile_cases", "attribute", "write_profile_plot", "STEP_MODE", "NO_SCREEN_MODE"]

PHASES = ("encoder_gemm", "selection", "decode_fwd", "decode_bwd", "encoder_bwd", "losses", "optimizer", "other")
STEP_MODE = "step"
PROFILED_MODE = "step (profiled)"
NO_SCREEN_MODE = "step (screen off)"
STEP_RANGE = "fastclt.profile::step"
_EVAL = "autograd::engine::evaluate_function: "
# a mark → (its forward phase, the phase of the backward of what ran under it)
_FORWARD = {"encoder_gemm": ("encoder_gemm", "encoder_bwd"), "encode": ("selection", "encoder_bwd"),
            "decode": ("decode_fwd", "decode_bwd"), "losses": ("losses", "losses"),
            "optimizer": ("optimizer", "other")}


def _variants(s: Shape) -> list[tuple[str, str, str]]:
    out = []
    if "sae" in s.models:
        out.append(("sae", "topk", ""))
    if "clt" in s.models:
        out += [("clt", "batchtopk", tying) for tying in ("none", "per_source", "per_target")]
    return out


# ----------------------------------------------------------------------------------- attribution


def _self_us(e, device_type: str) -> float:
    if device_type == "cuda":
        v = getattr(e, "self_device_time_total", None)
        return float(v if v is not None else getattr(e, "self_cuda_time_total", 0.0))
    return float(e.self_cpu_time_total)


def attribute(events, device_type: str = "cpu") -> list[dict]:
    """``torch.profiler`` events of steps run inside ``STEP_RANGE`` ranges → one dict per step,
    {phase: ms} over ``PHASES`` plus "total" (the step range's duration; "other" is the total
    minus the named phases). See the module docstring for the rules."""
    from fastclt.profiling import PREFIX
    events = [e for e in events if getattr(e.device_type, "name", "CPU") == "CPU"]
    steps = sorted((e for e in events if e.name == STEP_RANGE), key=lambda e: e.time_range.start)
    if not steps:
        raise ValueError("attribute: no step ranges in the profile")

    def mark_of(e) -> Optional[str]:
        """The innermost phase mark enclosing e (itself included), or None."""
        while e is not None:
            if e.name.startswith(PREFIX):
                return e.name[len(PREFIX):]
            e = e.cpu_parent
        return None

    # forward events with an autograd sequence number → the mark they ran under
    fwd_mark = {}
    for e in events:
        if e.sequence_nr >= 0 and not e.name.startswith(_EVAL):
            fwd_mark.setdefault((e.thread, e.sequence_nr), mark_of(e))

    def phase_of(e) -> str:
        node = e
        while node is not None:
            if node.name.startswith(PREFIX):
                return _FORWARD.get(node.name[len(PREFIX):], ("other",))[0]
            if node.name.startswith(_EVAL):  # a backward node: the mark of its forward
                m = fwd_mark.get((node.fwd_thread, node.sequence_nr))
                return _FORWARD[m][1] if m in _FORWARD else "other"
            node = node.cpu_parent
        return "other"

    out = [dict.fromkeys(PHASES, 0.0) for _ in steps]
    for i, s in enumerate(steps):
        out[i]["total"] = (s.time_range.end - s.time_range.start) / 1e3
    bounds = [(s.time_range.start, s.time_range.end) for s in steps]
    for e in events:
        if e.name == STEP_RANGE:
            continue
        t0 = e.time_range.start
        i = next((j for j, (a, b) in enumerate(bounds) if a <= t0 <= b), None)
        if i is None:
            continue
        p = phase_of(e)
        if p != "other":
            out[i][p] += _self_us(e, device_type) / 1e3
    for d in out:
        d["other"] = d["total"] - sum(d[p] for p in PHASES if p != "other")
    return out


# ----------------------------------------------------------------------------------- floors


def _roofline_floors(family: str, tying: str, s: Shape, e: int, peaks: dict) -> dict:
    """ms per phase from counted FLOPs and bytes (benchmarks/README.md's conventions)."""
    L = s.L if family == "clt" else 1
    pairs = L * (L + 1) / 2
    G = {"": 1, "none": pairs, "per_source": L, "per_target": pairs}[tying] if family == "clt" else 1
    nnz = s.B * s.k  # per layer
    B, d, F = s.B, s.d, s.F
    pf, pb = peaks["peak_flops"], peaks["peak_bw"]

    def roof(flops, byts):
        return max(flops / pf, byts / pb) * 1e3
    return {
        "selection": roof(0, L * B * F * e),
        "decode_fwd": roof(2 * G * nnz * d, G * nnz * d * e + L * nnz * (e + 4) + B * L * d * e),
        "decode_bwd": roof(4 * G * nnz * d, 2 * G * nnz * d * e + B * L * d * e + L * nnz * (2 * e + 4)),
        "encoder_bwd": roof(4 * L * nnz * d, L * (2 * B * d + 2 * F * d + F) * e),
        "losses": roof(0, 3 * B * L * d * e),
    }


def _bare_gemm(model, x: torch.Tensor, device: torch.device) -> Callable[[], None]:
    """The bare encoder GEMM of the model's operands: torch.mm per layer into preallocated outputs."""
    dt = torch.bfloat16 if device.type == "cuda" else model.param_dtype
    W = model.W_enc.detach().to(dt)
    W = W if W.dim() == 3 else W[None]
    xs = (x if x.dim() == 3 else x[:, None]).to(dt)
    xs = [xs[:, l].contiguous() for l in range(W.shape[0])]
    outs = [torch.empty(x.shape[0], W.shape[1], dtype=dt, device=device) for _ in xs]

    def gemm():
        for l, (x_l, o) in enumerate(zip(xs, outs)):
            torch.mm(x_l, W[l].t(), out=o)
    return gemm


def alternated(fns: dict, device: torch.device, rounds: int, reps: int) -> dict:
    """{name: fn} → {name: [ms of each call]}: ``rounds`` rounds, each calling every fn once untimed
    and then ``reps`` times timed, the fns one after another in a round. Times of different fns then
    come from the same stretches of the run: a drift of the machine (another process, its clock)
    shifts them together instead of skewing a ratio of medians timed minutes apart."""
    out = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            fn()
            _sync_device(device)
            for _ in range(reps):
                t = time.perf_counter()
                fn()
                _sync_device(device)
                out[name].append((time.perf_counter() - t) * 1e3)
    return out


def _sync_device(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class ProfileCase(Case):
    """One variant's profile: ``run_rows(runner)`` returns its rows (one per phase, ``step (profiled)``
    and ``step``); a skipped case is one row (``Runner.run`` then writes it)."""

    n_profiled: int = 3
    goal_rounds: int = 9  # alternated rounds of step, bare GEMM and bare Adam for the goal's row
    goal_rounds_quick: int = 2
    goal_reps: int = 3

    def run_rows(self, runner: Runner) -> list[dict]:
        if self.skip:
            return [runner.run(self)]
        try:
            return self._measure(runner)
        except torch.OutOfMemoryError:
            self.skip = "out of memory"
            return [runner.run(self)]
        except Exception as e:  # a broken case is a row with a note, never a crashed run
            return [runner.row(self, "error", f"{type(e).__name__}: {str(e).strip()[:200]}")]

    def _measure(self, runner: Runner) -> list[dict]:
        from torch.profiler import ProfilerActivity, profile, record_function

        from fastclt.profiling import phase, phase_ranges
        device, s, (family, act, tying) = self.device, self.shape_obj, self.spec
        model, x, y, _ = _build_fastclt(family, act, tying, s, device, 0)
        opt = _adam(model.parameters())
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

        def step():
            opt.zero_grad(set_to_none=True)
            with fastclt_impl(self.impl):
                with _autocast(device):
                    out = model.loss(x, y)
                out.loss.backward()
            with phase("optimizer"):
                opt.step()

        total = time_fns([step, step], device, runner.policy)  # the step without the profiler (warms up too)
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        n = 2 if runner.quick else self.n_profiled
        with phase_ranges(), profile(activities=acts) as prof:
            for _ in range(n):
                with record_function(STEP_RANGE):
                    step()
                    sync()
        per_step = attribute(prof.events(), device.type)
        # floors: the bare GEMM and the bare Adam step (the model's own optimizer on the gradients the
        # step left), timed alternating with the step, round by round
        rounds = self.goal_rounds_quick if runner.quick else self.goal_rounds
        fns = {"step": step, "gemm": _bare_gemm(model, x, device), "adam": opt.step}
        screened = screens(family, act, s, device)
        if screened:  # the same step with the encoders' fp32 GEMM (FASTCLT_SCREEN=0), in the same rounds
            def step_no_screen():
                with _env("FASTCLT_SCREEN", "0"):
                    step()
            fns["no_screen"] = step_no_screen
        alt = alternated(fns, device, rounds, self.goal_reps)
        gemm_ms, adam_ms = statistics.median(alt["gemm"]), statistics.median(alt["adam"])
        e = 2 if device.type == "cuda" else 4
        floors = {"encoder_gemm": gemm_ms, "optimizer": adam_ms, **_roofline_floors(family, tying, s, e, runner.peaks)}
        how = {"encoder_gemm": "bare torch.mm per layer", "optimizer": "bare fused Adam step, same parameters",
               "other": "no floor"}
        rows = []
        for p in PHASES:
            med = statistics.median(d[p] for d in per_step)
            r = runner.row(self, "ok", how.get(p, "roofline"))
            frac = floors[p] / med if p in floors and med > 0 else None
            r.update(mode=p, median_ms=med, p20_ms=min(d[p] for d in per_step), p80_ms=max(d[p] for d in per_step),
                     n_runs=n, floor_ms=floors.get(p), frac_roofline=frac)
            rows.append(r)
        prof_total = statistics.median(d["total"] for d in per_step)
        r = runner.row(self, "ok", f"the profiled steps (min–max of {n}); phases sum to it")
        r.update(mode=PROFILED_MODE, median_ms=prof_total, p20_ms=min(d["total"] for d in per_step),
                 p80_ms=max(d["total"] for d in per_step), n_runs=n)
        rows.append(r)
        # the goal's row: the step and its floor (bare GEMM + bare Adam) from the alternated rounds
        step_ms, goal_floor = statistics.median(alt["step"]), gemm_ms + adam_ms
        r = runner.row(self, "ok", f"floor = bare encoder GEMM + bare Adam, timed alternating with the step "
                                   f"({rounds} rounds of {self.goal_reps}); "
                                   f"step alone, harness: {total.median_ms:.4g} ms; all phase floors: "
                                   f"{sum(floors.values()):.4g} ms; {self.note}".rstrip("; "))
        r.update(mode=STEP_MODE, median_ms=step_ms, p20_ms=_percentile(alt["step"], 0.2),
                 p80_ms=_percentile(alt["step"], 0.8), n_runs=len(alt["step"]), floor_ms=goal_floor,
                 frac_roofline=goal_floor / step_ms)
        rows.append(r)
        if screened:
            ns_ms = statistics.median(alt["no_screen"])
            r = runner.row(self, "ok", "the step with the encoders' bf16 screen off (FASTCLT_SCREEN=0: their fp32 "
                                       "GEMM), timed in the same rounds; the same floor")
            r.update(mode=NO_SCREEN_MODE, median_ms=ns_ms, p20_ms=_percentile(alt["no_screen"], 0.2),
                     p80_ms=_percentile(alt["no_screen"], 0.8), n_runs=len(alt["no_screen"]), floor_ms=goal_floor,
                     frac_roofline=goal_floor / ns_ms)
            rows.append(r)
        return rows


def profile_cases(shape: Shape, device: torch.device, *, priority_of: Callable[..., int] = lambda *a: 1) -> list:
    """One ProfileCase per profiled variant of the shape."""
    dname = "bf16-autocast" if device.type == "cuda" else "fp32"
    cases = []
    for family, act, tying in _variants(shape):
        variant = _name(family, act, tying)
        L = shape.L if family == "clt" else 1
        n_dec = shape.F * shape.d * (L * (L + 1) // 2 if tying == "none" else L)
        P = L * shape.F * shape.d + n_dec
        c = ProfileCase(suite="profile", op="step_phases", variant=variant, mode="phases", shape=shape.name,
                        impl="auto", make=None, dtype=dname, need_bytes=16 * P + 16 * shape.B * shape.F * L,
                        note=_resolved(device), priority=priority_of("step_phases", variant, "", shape.name))
        c.device, c.shape_obj, c.spec = device, shape, (family, act, tying)
        cases.append(c)
    return cases


# ----------------------------------------------------------------------------------- plot


def write_profile_plot(rows: list[dict], out_dir) -> list:
    """One PNG per shape of the profile suite: per variant, each phase's time beside its floor."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    from pathlib import Path
    groups: dict = {}
    for r in rows:
        if r["suite"] == "profile" and r["status"] == "ok" and r["mode"] in PHASES:
            groups.setdefault(r["shape"], {}).setdefault(r["variant"], {})[r["mode"]] = r
    written = []
    colors = dict(zip(PHASES, ("#1b9e77", "#d95f02", "#7570b3", "#e7298a", "#66a61e", "#e6ab02", "#a6761d",
                               "#999999")))
    for shape, variants in groups.items():
        fig, ax = plt.subplots(figsize=(10, 1.1 * len(variants) + 1.6))
        labels, y = [], 0
        for variant, phases in variants.items():
            for k, (what, key) in enumerate((("measured", "median_ms"), ("floor", "floor_ms"))):
                left = 0.0
                for p in PHASES:
                    v = (phases.get(p) or {}).get(key) or 0.0
                    if v > 0:
                        ax.barh(y, v, left=left, color=colors[p], alpha=1.0 if k == 0 else 0.55,
                                label=p if y == 0 else None, edgecolor="white", linewidth=0.5)
                        left += v
                labels.append(f"{variant} · {what}")
                y += 1
        ax.set_yticks(range(y))
        ax.set_yticklabels(labels, fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel("ms per step (stacked phases)")
        ax.legend(fontsize=7, ncol=4, loc="lower right")
        first = next(iter(next(iter(variants.values())).values()))
        ax.set_title(f"fastclt step phases — {shape} — {first.get('device_name', '')}", fontsize=9)
        fig.tight_layout()
        path = Path(out_dir) / f"profile_{shape}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written
