"""CI keeps the benchmark scripts alive: every suite runs at the ``tiny`` shape on the CPU (through
``benchmarks.run``, into a temporary folder) and its outputs must exist and be well formed.
No timing is asserted: this machine's numbers mean nothing here.
"""
from __future__ import annotations

import csv
import json
import math
import os

import pytest
import torch

from benchmarks import goals
from benchmarks.bench_ops import OPS, molt_config, ops_cases, shape_ops
from benchmarks.bench_train_step import NO_SCREEN, fastclt_impl, train_cases
from benchmarks.harness import ROW_FIELDS, read_csv
from benchmarks.run import main, run_suites
from benchmarks.shapes import SHAPES, default_shapes, get_shapes

STAMP = ("device", "device_name", "torch", "triton", "cuda", "commit", "date")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One run of every suite at the tiny shape on the CPU (one thread: CI machines are shared)."""
    out = tmp_path_factory.mktemp("bench_tiny")
    threads = torch.get_num_threads()
    env = {k: os.environ.get(k) for k in ("FASTCLT_IMPL", "SPARSIFY_DISABLE_TRITON")}
    torch.set_num_threads(1)
    try:
        res = run_suites(["ops", "train"], get_shapes("tiny"), out, device=torch.device("cpu"), quick=True,
                         log=lambda line: None)
    finally:  # leave no trace for the tests that run after: threads, environment
        torch.set_num_threads(threads)
        for k, v in env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return out, res


def test_outputs_exist(tiny_run):
    out, res = tiny_run
    for name in ("results.csv", "results.md", "meta.json"):
        assert (out / name).stat().st_size > 0, name
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    for suite in ("ops", "train"):
        png = out / f"{suite}_tiny.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png


def test_csv_well_formed(tiny_run):
    out, res = tiny_run
    with open(out / "results.csv", newline="") as f:
        assert next(csv.reader(f)) == ROW_FIELDS
    rows = read_csv(out / "results.csv")
    assert len(rows) == len(res["rows"]) > 0
    errors = [(r["op"], r["variant"], r["mode"], r["impl"], r["note"]) for r in rows if r["status"] == "error"]
    assert not errors, f"benchmark cases failed: {errors}"
    for r in rows:
        assert r["status"] in ("ok", "skipped"), r
        assert all(r[k] for k in STAMP), r
        if r["status"] == "skipped":
            assert r["note"], f"a skipped row must say why: {r}"
            continue
        assert math.isfinite(r["median_ms"]) and r["median_ms"] > 0, r
        assert r["p20_ms"] <= r["median_ms"] <= r["p80_ms"], r
        assert r["n_runs"] >= 1, r
        if r["flops"] or r["bytes"]:
            assert r["floor_ms"] > 0 and r["frac_roofline"] > 0, r
        if r["impl"] == "reference":
            assert r["speedup_vs_eager"] == pytest.approx(1.0), r


def test_every_op_and_model_is_covered(tiny_run):
    _, res = tiny_run
    ok = [r for r in res["rows"] if r["status"] == "ok"]
    ops_done = {r["op"] for r in ok if r["suite"] == "ops" and r["impl"] == "reference"}
    assert ops_done == set(OPS)
    assert {r["impl"] for r in ok if r["op"] == "sparse_decode"} >= {"reference", "dense-matmul", "embedding_bag"}
    assert {r["variant"] for r in ok if r["op"] == "clt_decode"} == {"none", "per_source", "per_target"}
    train = {(r["variant"], r["impl"]) for r in ok if r["suite"] == "train"}
    for variant in ("sae-topk", "sae-batchtopk", "plt-jumprelu", "clt-none-batchtopk", "clt-per_source-jumprelu",
                    "clt-per_target-batchtopk", "molt-topk", "molt-jumprelu"):
        assert {(variant, "reference"), (variant, "auto")} <= train, variant
    for variant in ("sae-batchtopk-matryoshka5", "clt-none-batchtopk-matryoshka5"):  # compared with the plain step
        assert (variant, "auto") in train and (variant, "reference") not in train, variant
    molt = {(r["mode"], r["impl"]) for r in ok if r["op"] == "molt"}
    assert {(m, i) for m in ("fwd", "bwd", "fwd+bwd") for i in ("reference", "cpu")} | {("fwd", "gate-gemm")} <= molt


def test_meta_and_markdown(tiny_run):
    out, res = tiny_run
    meta = json.loads((out / "meta.json").read_text())
    assert meta["peak_flops"] > 0 and meta["peak_bw"] > 0
    assert all(meta[k] for k in STAMP)
    assert [g["goal"] for g in meta["goals"]] == [g.name for g in goals.GOALS if g.device == "cpu"]
    md = (out / "results.md").read_text()
    assert "## Goals" in md and "## ops — tiny" in md and "## train — tiny" in md
    assert "% roofline" in md


def test_budget_and_cli(tmp_path, capsys):
    """A spent time budget turns every case into a skipped row with a note, through the CLI."""
    assert main(["--suite", "ops", "--shapes", "tiny", "--quick", "--device", "cpu", "--budget-s", "0",
                 "--out", str(tmp_path)]) == 0
    rows = read_csv(tmp_path / "results.csv")
    assert rows and all(r["status"] == "skipped" and "budget" in r["note"] for r in rows)
    assert "| goal |" in capsys.readouterr().out


def test_fastclt_impl_restores_env(monkeypatch):
    monkeypatch.setenv("FASTCLT_IMPL", "auto")
    with fastclt_impl("reference"):
        assert os.environ["FASTCLT_IMPL"] == "reference"
    assert os.environ["FASTCLT_IMPL"] == "auto"
    monkeypatch.delenv("FASTCLT_IMPL")
    with pytest.raises(RuntimeError):
        with fastclt_impl("reference"):
            raise RuntimeError
    assert "FASTCLT_IMPL" not in os.environ


def test_shapes_table():
    assert [s.name for s in default_shapes("cpu")] == ["cpu-small", "cpu-clt", "demo", "molt-cpu", "density-cpu"]
    assert [s.name for s in default_shapes("cuda") if s.density] == ["density-gpu"]
    assert {"gpt2-clt", "sae-2304", "sae-4096", "molt-768"} <= {s.name for s in default_shapes("cuda")}
    s = SHAPES["gpt2-clt"]
    assert (s.L, s.d, s.F, s.k, s.B) == (12, 768, 32768, 16, 4096)
    for name in ("molt-768", "molt-cpu"):  # d = 768, N = 32 (31·N transforms in 5 rank groups), ~2% open
        s = SHAPES[name]
        assert molt_config(s).rank_groups == ((32, 512), (64, 256), (128, 128), (256, 64), (512, 32)), name
        assert s.d == 768 and 0.015 < s.k / s.F < 0.025, name
    # a MOLT shape runs the MOLT layer alone, a dictionary shape never does
    assert shape_ops(SHAPES["molt-cpu"]) == ("molt",) and "molt" not in shape_ops(SHAPES["cpu-small"])
    assert {c.op for c in ops_cases(SHAPES["molt-cpu"], torch.device("cpu"), torch.float32)} == {"molt"}
    assert not [c for c in ops_cases(SHAPES["cpu-small"], torch.device("cpu"), torch.float32, ops=("molt",))]
    with pytest.raises(ValueError, match="unknown"):
        get_shapes("tiny,nope")


def test_variants_filter(tmp_path):
    assert main(["--suite", "all", "--shapes", "tiny", "--quick", "--device", "cpu", "--budget-s", "0",
                 "--variants", "sae-batchtopk-matryoshka5,molt-topk", "--out", str(tmp_path)]) == 0
    rows = read_csv(tmp_path / "results.csv")
    assert {r["variant"] for r in rows} == {"sae-batchtopk-matryoshka5", "molt-topk"}


def _row(**kw) -> dict:
    return {"status": "ok", "note": "", "flops": None, **kw}


def test_matryoshka_and_molt_goals_on_given_rows():
    """The new goals' arithmetic on hand-made rows: met, and missed, at the edges of their targets."""
    meta = {"peak_flops": 1e11, "peak_bw": 1e10}

    def status(rows, name):
        return {g["goal"]: g for g in goals.evaluate(rows, meta, "cpu")}[name]

    def steps(mat_ms):
        return [_row(suite="train", op="train_step", variant=v, mode="fwd+bwd+adam", shape="cpu-small", impl="auto",
                     median_ms=ms) for v, ms in (("sae-batchtopk", 100.0), ("sae-batchtopk-matryoshka5", mat_ms))]
    name = "Matryoshka (G = 5) SAE step vs the plain BatchTopK SAE step"
    assert status(steps(125.0), name)["status"] == "met"
    assert status(steps(126.0), name)["status"] == "not met"

    def layer(kernel_ms):  # floor: 10 ms of gate GEMM + 2e9 other FLOPs at 1e11 FLOP/s = 30 ms
        return [_row(suite="ops", op="molt", variant="topk k=20", mode="fwd", shape="molt-cpu", impl="gate-gemm",
                     median_ms=10.0, flops=1e9),
                _row(suite="ops", op="molt", variant="topk k=20", mode="fwd+bwd", shape="molt-cpu", impl="cpu",
                     median_ms=kernel_ms, flops=3e9),
                _row(suite="ops", op="molt", variant="topk k=20", mode="fwd+bwd", shape="molt-cpu", impl="reference",
                     median_ms=1000.0, flops=3e9)]
    name = "MOLT layer fwd+bwd vs gate GEMM + active FLOPs"
    assert status(layer(60.0), name)["status"] == "met" and "2.00×" in status(layer(60.0), name)["measured"]
    assert status(layer(61.0), name)["status"] == "not met"
    assert status(layer(60.0)[1:], name)["status"].startswith("not yet measured (no gate-gemm row")


# ----------------------------------------------------------------------------- density suite
def test_density_suite_at_tiny(tmp_path):
    """The density sweep at tiny: every op in every mode at the lowest and highest density, the
    plot and crossover.json; the modes really take their formulations (the fastclt.ops.density counts)."""
    from benchmarks.bench_density import MODES, OP_MODES, QUICK_DENSITIES, calibrate
    from fastclt.ops import density
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    density.STATS.clear()
    try:
        res = run_suites(["density"], get_shapes("tiny"), tmp_path, device=torch.device("cpu"), quick=True,
                         log=lambda line: None)
    finally:
        torch.set_num_threads(threads)
    ok = [r for r in res["rows"] if r["status"] == "ok"]
    # (the single ops in the three op modes, the train step in all four)
    assert len(ok) == len(res["rows"]) == 2 * (3 * len(OP_MODES) + len(MODES)), \
        [(r["op"], r["note"]) for r in res["rows"] if r["status"] != "ok"]
    rhos = (f"rho={QUICK_DENSITIES[0]:g}", f"rho={QUICK_DENSITIES[-1]:g}")
    assert {(r["op"], r["variant"].split()[-1], r["impl"]) for r in ok} == {
        (op, rho, m) for op in ("sparse_decode", "clt_decode", "encode_backward") for rho in rhos
        for m in OP_MODES} | {("train_step", rho, m) for rho in rhos for m in MODES}
    assert density.STATS[("clt_decode", "dense")] > 0 and density.STATS[("clt_decode", "sparse")] > 0
    assert density.STATS[("encode_backward", "dense")] > 0 and density.STATS[("encode_backward", "sparse")] > 0
    assert density.STATS[("codes", "dense")] > 0 and density.STATS[("codes", "sparse")] > 0
    cross = json.loads((tmp_path / "crossover.json").read_text())["crossover"]["tiny"]
    assert set(cross) == {"sparse_decode", "clt_decode", "encode_backward", "codes"}
    assert cross == {op: (round(v, 4) if math.isfinite(v) else "never")
                     for op, v in calibrate(res["rows"], "tiny").items()}
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    assert (tmp_path / "density_tiny.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_density_calibration_and_gaps():
    """calibrate: the crossing of dense and sparse interpolated on log ρ; adaptive_gaps: adaptive
    over the better of the two; the goal reads them."""
    from benchmarks.bench_density import adaptive_gaps, calibrate

    def row(op, rho, mode, ms):
        return {"suite": "density", "shape": "density-cpu", "op": op, "variant": f"rho={rho}", "impl": mode,
                "mode": "fwd+bwd", "status": "ok", "median_ms": ms}
    rows = [row("sparse_decode", 0.01, "sparse", 1.0), row("sparse_decode", 0.01, "dense", 4.0),
            row("sparse_decode", 0.1, "sparse", 10.0), row("sparse_decode", 0.1, "dense", 2.5),
            row("sparse_decode", 0.01, "adaptive", 1.05), row("sparse_decode", 0.1, "adaptive", 3.0),
            row("clt_decode", 0.01, "sparse", 1.0), row("clt_decode", 0.01, "dense", 0.5),
            row("encode_backward", 0.01, "sparse", 1.0), row("encode_backward", 0.01, "dense", 2.0)]
    c = calibrate(rows, "density-cpu")
    assert c["sparse_decode"] == pytest.approx(10 ** -1.5)  # log ratios +log 4 and −log 4: the midpoint
    assert c["clt_decode"] == 0.01 and c["encode_backward"] == math.inf
    gaps = {(op, rho): g for op, rho, g in adaptive_gaps(rows, "density-cpu")}
    assert gaps[("sparse_decode", 0.01)] == pytest.approx(1.05) and gaps[("sparse_decode", 0.1)] == pytest.approx(1.2)
    res = {g.name: g.check(rows, {"peak_flops": 1e11}) for g in goals.GOALS if g.shape == "density-cpu"}
    assert res["density sweep: adaptive vs the better of sparse and dense"][1] is False  # 1.2× at ρ = 0.1
    assert "crosslayer-coding" in res["JumpReLU CLT step at 48% density vs crosslayer-coding"][2]


def test_train_cases_add_a_screen_off_row_where_the_encoders_screen(monkeypatch):
    """Beside "auto", the train suite times the same step with the CPU encoders' bf16 screen off where
    they screen (TopK / BatchTopK; forced on here at the tiny shape), and only there."""
    from benchmarks.shapes import get_shapes

    tiny = get_shapes("tiny")[0]
    monkeypatch.setenv("FASTCLT_SCREEN", "1")
    impls = {(c.variant, c.impl) for c in train_cases(tiny, torch.device("cpu"))}
    assert {("sae-topk", NO_SCREEN), ("sae-batchtopk", NO_SCREEN), ("clt-none-batchtopk", NO_SCREEN)} <= impls
    assert ("plt-jumprelu", NO_SCREEN) not in impls and ("clt-none-jumprelu", NO_SCREEN) not in impls
    assert not any(i == NO_SCREEN and "matryoshka" in v for v, i in impls)
    monkeypatch.setenv("FASTCLT_SCREEN", "0")
    assert not any(c.impl == NO_SCREEN for c in train_cases(tiny, torch.device("cpu")))
