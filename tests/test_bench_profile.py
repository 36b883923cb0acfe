"""The per-phase step profile (benchmarks/bench_profile.py) and the trainer-loop benchmark
(benchmarks/bench_loop.py): the attribution rules on a hand-made graph, then one run of the profile
suite at tiny shapes on the CPU, its rows, plot and goals. No timing is asserted."""
from __future__ import annotations

import math

import pytest
import torch
from torch.profiler import ProfilerActivity, profile, record_function

from benchmarks import goals
from benchmarks.bench_profile import NO_SCREEN_MODE, PHASES, STEP_MODE, STEP_RANGE, alternated, attribute
from benchmarks.bench_train_step import _env
from benchmarks.harness import read_csv
from benchmarks.run import run_suites
from benchmarks.shapes import get_shapes
from fastclt.profiling import phase, phase_ranges, ranges_enabled


class _Slow(torch.autograd.Function):
    """y = 2x whose backward does measurable work (a matmul chain), to find it in the profile."""

    @staticmethod
    def forward(ctx, x):
        return x * 2

    @staticmethod
    def backward(ctx, g):
        m = torch.randn(256, 256)
        for _ in range(8):
            m = m @ m / 16
        return g * 2 + 0 * m.sum()


def test_alternated_rounds():
    """``alternated`` runs the functions round by round, in their order, each once untimed and then
    ``reps`` times timed per round, and returns every timed call's milliseconds."""
    calls = []
    fns = {name: (lambda name=name: calls.append(name)) for name in ("step", "gemm", "adam")}
    out = alternated(fns, torch.device("cpu"), rounds=3, reps=2)
    assert list(out) == ["step", "gemm", "adam"]
    assert all(len(v) == 6 and all(t >= 0 for t in v) for v in out.values())
    assert calls == (["step"] * 3 + ["gemm"] * 3 + ["adam"] * 3) * 3


def test_marks_are_free_outside_phase_ranges():
    assert not ranges_enabled()
    assert phase("encode") is phase("decode")  # the shared null context: no range, no allocation
    with phase_ranges():
        assert ranges_enabled()
        assert phase("encode") is not phase("encode")
    assert not ranges_enabled()


def test_attribute_follows_backward_nodes_to_their_forward_mark():
    """A node created under "decode" has its backward in decode_bwd, one under "encode" in
    encoder_bwd; nested marks go to the innermost; unmarked work is "other"; phases fit in the step."""
    x = torch.randn(64, requires_grad=True)
    with phase_ranges(), profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(2):
            with record_function(STEP_RANGE):
                with phase("encode"):
                    with phase("encoder_gemm"):
                        a = torch.randn(300, 300) @ torch.randn(300, 300)
                    h = x * 3 + a.sum() * 0
                with phase("decode"):
                    y = _Slow.apply(h)
                with phase("losses"):
                    loss = y.pow(2).sum()
                loss.backward()
                x.grad = None
    steps = attribute(prof.events(), "cpu")
    assert len(steps) == 2
    for d in steps:
        assert set(d) == set(PHASES) | {"total"}
        assert d["encoder_gemm"] > 0 and d["decode_fwd"] > 0 and d["losses"] > 0
        assert d["decode_bwd"] > d["encoder_bwd"]  # _Slow's backward is in decode_bwd
        assert d["decode_bwd"] > d["decode_fwd"]
        assert d["optimizer"] == 0
        assert d["other"] >= 0  # no self time counted twice: the named phases fit in the step
    with pytest.raises(ValueError, match="no step ranges"):
        attribute([], "cpu")


@pytest.fixture(scope="module")
def profile_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench_profile")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    # FASTCLT_IMPL as it was afterwards; the encoders' bf16 screen on at the tiny shape: its row too
    try:
        with _env("FASTCLT_IMPL", None), _env("FASTCLT_SCREEN", "1"):
            res = run_suites(["profile"], get_shapes("tiny,demo"), out, device=torch.device("cpu"), quick=True,
                             log=lambda line: None)
    finally:
        torch.set_num_threads(threads)
    return out, res


def test_profile_rows(profile_run):
    out, res = profile_run
    rows = read_csv(out / "results.csv")
    assert not [r for r in rows if r["status"] != "ok"], [r["note"] for r in rows if r["status"] != "ok"]
    variants = {"sae-topk", "clt-none-batchtopk", "clt-per_source-batchtopk", "clt-per_target-batchtopk"}
    for v in variants:
        by = {r["mode"]: r for r in rows if r["op"] == "step_phases" and r["variant"] == v}
        assert set(by) == set(PHASES) | {STEP_MODE, "step (profiled)", NO_SCREEN_MODE}, v
        # every named phase of the step was seen, and has a floor
        for p in PHASES[:-1]:
            assert by[p]["median_ms"] > 0, (v, p)
            assert by[p]["floor_ms"] > 0, (v, p)
        assert by["other"]["floor_ms"] is None
        # the medians of the parts need not add up exactly; their spreads bracket the profiled total
        assert sum(by[p]["median_ms"] for p in PHASES) == pytest.approx(by["step (profiled)"]["median_ms"], rel=0.5)
        step = by[STEP_MODE]
        assert step["floor_ms"] == pytest.approx(by["encoder_gemm"]["floor_ms"] + by["optimizer"]["floor_ms"])
        assert math.isfinite(step["median_ms"]) and step["median_ms"] > 0
        assert by[NO_SCREEN_MODE]["floor_ms"] == step["floor_ms"] and by[NO_SCREEN_MODE]["median_ms"] > 0
    loops = {r["impl"]: r for r in rows if r["op"] == "trainer_loop"}
    assert set(loops) == {"fastclt-trainer", "fastclt-trainer-auxk", "bare-eager"}
    assert all(r["median_ms"] > 0 for r in loops.values())
    md = (out / "results.md").read_text()
    assert "## profile — tiny" in md and "× floor" in md
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    for shape in ("tiny",):
        assert (out / f"profile_{shape}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _row(**kw) -> dict:
    return {"status": "ok", "note": "", "flops": None, "suite": "profile", "impl": "auto", **kw}


def test_floor_and_loop_goals_on_given_rows():
    meta = {"peak_flops": 1e11, "peak_bw": 1e10}

    def status(rows, name):
        return {g["goal"]: g for g in goals.evaluate(rows, meta, "cpu")}[name]
    name = "TopK SAE step vs its floor (encoder GEMM + Adam)"
    sae = lambda ms: [_row(op="step_phases", variant="sae-topk", mode="step", shape="cpu-small",  # noqa: E731
                           median_ms=ms, floor_ms=100.0)]
    assert status(sae(130.0), name)["status"] == "met"
    assert status(sae(131.0), name)["status"] == "not met"
    name = "CLT BatchTopK step vs its floor (encoder GEMMs + Adam), every tying"
    clt = [_row(op="step_phases", variant=f"clt-{t}-batchtopk", mode="step", shape="cpu-clt", median_ms=ms,
                floor_ms=10.0) for t, ms in (("none", 15.0), ("per_source", 12.0), ("per_target", 14.0))]
    assert status(clt, name)["status"] == "met"
    clt[2]["median_ms"] = 15.1
    assert status(clt, name)["status"] == "not met"
    assert status(clt[:2], name)["status"].startswith("not yet measured (no profile step row of clt-per_target")
    name = "the default demo's trainer loop vs a bare eager loop"
    loop = lambda t, a=None: [  # noqa: E731
        _row(op="trainer_loop", variant="demo-clt-none-batchtopk", mode="step", shape="demo", impl=i, median_ms=ms)
        for i, ms in (("fastclt-trainer", t), ("fastclt-trainer-auxk", a), ("bare-eager", 10.0)) if ms is not None]
    assert status(loop(10.0), name)["status"] == "met"  # a run from before the AuxK case
    assert "with AuxK active: not measured" in status(loop(10.0), name)["measured"]
    assert status(loop(10.5), name)["status"] == "not met"
    assert status(loop(9.0, 10.0), name)["status"] == "met"
    got = status(loop(9.0, 12.0), name)
    assert got["status"] == "not met" and "with AuxK active 1.20×" in got["measured"]



def test_loop_case_alternates_its_rows():
    """LoopCase: every implementation warms up twice, then runs once per round in a rotating order
    (STEPS_PER_RUN calls a run); one row each. A skipped or broken case gives a row per
    implementation with the reason. No timing is asserted."""
    from benchmarks.bench_loop import STEPS_PER_RUN, LoopCase
    from benchmarks.harness import Runner
    calls = []

    def maker(name):
        return lambda seed: (lambda: calls.append(name))
    impls = ("a", "b", "c")
    case = LoopCase(suite="profile", op="trainer_loop", variant="v", mode="step", shape="s", impl="a", make=None,
                    rounds=4, impls=impls, makes={i: maker(i) for i in impls}, notes={i: i for i in impls})
    runner = Runner(torch.device("cpu"), {"peak_flops": 1e12, "peak_bw": 1e11}, quick=False, stamp={})
    rows = case.run_rows(runner)
    assert [(r["impl"], r["status"], r["n_runs"]) for r in rows] == [(i, "ok", 4) for i in impls]
    runs = [calls[j] for j in range(0, len(calls), STEPS_PER_RUN)]
    assert runs == ["a", "a", "b", "b", "c", "c"] + ["a", "b", "c", "b", "c", "a", "c", "a", "b", "a", "b", "c"]
    assert all(0 < r["p20_ms"] <= r["median_ms"] <= r["p80_ms"] for r in rows)

    def broken(seed):
        raise RuntimeError("no trainer here")
    bad = LoopCase(suite="profile", op="trainer_loop", variant="v", mode="step", shape="s", impl="a", make=None,
                   impls=impls, makes={"a": maker("a"), "b": broken, "c": maker("c")}, notes={i: i for i in impls})
    assert [(r["impl"], r["status"]) for r in bad.run_rows(runner)] == [(i, "error") for i in impls]
    assert "no trainer here" in bad.run_rows(runner)[0]["note"]
    bad.skip = "time budget spent"
    assert [r["status"] for r in bad.run_rows(runner)] == ["skipped"] * 3
