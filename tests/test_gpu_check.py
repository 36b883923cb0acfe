"""benchmarks/gpu_check.sh, the one-command GPU check, kept from rotting: its dry run (CPU, tiny
sizes) walks every stage here, and failures, budgets and output limits behave as its header says."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from benchmarks import gpu_check  # noqa: E402

SCRIPT = REPO / "benchmarks" / "gpu_check.sh"


def _run(out: Path, *args, env=None, timeout=300):
    env = dict(os.environ, PYTHON=sys.executable, **(env or {}))
    env.pop("OUT", None)
    return subprocess.run(["bash", str(SCRIPT), str(out), *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


def _stage_lines(summary: str) -> dict:
    lines = summary.split("== stages (in the order they ran)\n", 1)[1].split("\n\n", 1)[0].splitlines()[1:]
    return {ln.split()[0]: ln.split()[1] for ln in lines if ln and not ln.startswith(" ")}


def _check_outputs(out: Path) -> None:
    entries = list(out.iterdir())
    assert len(entries) <= 8
    for p in entries:
        assert p.is_file() and re.fullmatch(r"[A-Za-z0-9._-]+", p.name) and p.stat().st_size <= 16 << 20, p


def test_header_lists_the_stages_in_order():
    """A reader of gpu_check.sh sees the stage table of gpu_check.py, in its order."""
    header = [ln for ln in SCRIPT.read_text().splitlines() if re.match(r"#\s+\d+\. ", ln)]
    assert [ln.split()[2] for ln in header] == [s.name for s in gpu_check.STAGES]


def test_dry_run_walks_every_stage(tmp_path):
    r = _run(tmp_path / "out", "--dry-run")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out = tmp_path / "out"
    _check_outputs(out)
    assert {p.name for p in out.iterdir()} == set(gpu_check.OUT_FILES)
    summary = (out / "summary.txt").read_text()
    assert _stage_lines(summary) == {s.name: "ok" for s in gpu_check.STAGES}, summary
    assert "verdict: PASS" in summary and "skipped for time: nothing" in summary
    for s in gpu_check.STAGES:
        if s.kind == "tests":
            assert re.search(rf"{s.name}\s+ok\s+\d+s\s+[1-9]\d* tests collected", summary), s.name
    assert "## Goals" in summary
    assert "<testsuite " in (out / "junit.xml").read_text()


@pytest.mark.parametrize("stage", ["build", "tests-models-cuda"])
def test_a_failure_fails_the_check(tmp_path, stage):
    r = _run(tmp_path / "out", "--dry-run", "--only", stage, env={"GPU_CHECK_FAIL": stage})
    assert r.returncode == 1, r.stdout[-3000:]
    summary = (tmp_path / "out" / "summary.txt").read_text()
    assert _stage_lines(summary)[stage] == "FAILED" and "verdict: FAIL" in summary
    if stage.startswith("tests"):
        assert "test_made_to_fail" in summary
    _check_outputs(tmp_path / "out")


def test_out_of_time_stages_are_skipped_and_said(tmp_path):
    r = _run(tmp_path / "out", "--dry-run", "--total-s", "25")
    assert r.returncode == 0, r.stdout[-3000:]
    summary = (tmp_path / "out" / "summary.txt").read_text()
    assert set(_stage_lines(summary).values()) == {"skipped"}
    assert "skipped for time: " + ", ".join(s.name for s in gpu_check.STAGES) in summary


def test_a_stage_stops_cleanly_at_its_budget(tmp_path):
    """pytest stopped by the budget (SIGINT) still writes its report; the check reads it."""
    (tmp_path / "test_slow.py").write_text("import time\n\ndef test_fast():\n    pass\n\n"
                                           "def test_slow():\n    time.sleep(60)\n")
    check = gpu_check.Check(tmp_path / "out", dry=True, total_s=100)
    junit = tmp_path / "junit.xml"
    cmd = [sys.executable, "-m", "pytest", str(tmp_path / "test_slow.py"), "-q", "-p", "no:cacheprovider",
           f"--junitxml={junit}"]
    rc, stopped = check.run(cmd, tmp_path / "log.txt", 10, check.env())  # time for pytest to start on a loaded machine
    assert stopped
    n = gpu_check._junit_counts(junit)
    assert n is not None and n["passed"] >= 1


def test_oversized_logs_are_cut(tmp_path):
    big = tmp_path / "big.log"
    big.write_bytes(b"x" * (17 << 20))
    gpu_check._copy_capped(big, tmp_path / "cut.log")
    assert (tmp_path / "cut.log").stat().st_size <= 16 << 20


def test_bench_select_and_append(tmp_path):
    from benchmarks.run import main
    args = ["--suite", "ops", "--ops", "batch_topk", "--shapes", "tiny", "--quick", "--device", "cpu",
            "--out", str(tmp_path)]
    assert main(args + ["--select", "goals"]) == 0
    assert len((tmp_path / "results.csv").read_text().splitlines()) == 1  # no goal reads the tiny shape
    assert main(args + ["--select", "rest"]) == 0
    n = len((tmp_path / "results.csv").read_text().splitlines())
    assert n > 1
    assert main(args + ["--select", "rest", "--append"]) == 0
    assert len((tmp_path / "results.csv").read_text().splitlines()) == 2 * n - 1
