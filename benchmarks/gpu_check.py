"""The one-command GPU check (run by benchmarks/gpu_check.sh; the stage table below is the plan).

    python3 benchmarks/gpu_check.py [OUT_DIR] [--dry-run] [--total-s SECONDS] [--only STAGE,...]

Runs STAGES in order, each under its own time budget — min(its cap, what the whole check has left
after the stages' reserve) — and stops a stage cleanly when its budget is spent (pytest gets SIGINT
and still writes its report; the benchmark runner gets SIGTERM and writes the rows it measured).
A stage with less than its minimum left is skipped and the summary says so. Exit status: 1 when the
build failed or any test failed or errored, else 0.

Outputs in OUT_DIR (default $OUT, else gpu_check_out/), all at its top level, at most 8 files of
at most 16 MiB with names of [A-Za-z0-9._-] (what a GPU machine sends back): summary.txt (plain:
device, versions, commit, one line per stage, the verdict, the goal table), build.log, tests.log,
junit.xml (every test stage, one <testsuite> each), results.csv, results.md, bench.tar.gz (the
benchmark folder: meta.json, PNGs, bench.log). The benchmark results also stay in
benchmarks/results/<device-slug>/ for committing.

``--dry-run`` (CPU, used by CI through tests/test_gpu_check.py) walks the same stages at tiny sizes:
the build stage only imports the extension already built, test stages collect their tests without
running them, benchmark stages run the ``tiny`` shape on the CPU. Knobs: GPU_CHECK_TOTAL_S,
FASTCLT_CUDA_ARCH_LIST (default 9.0a), MAX_JOBS (default 16), PYTHON (default this interpreter),
FASTCLT_COMMIT (the commit, for a copy of the tree without git);
GPU_CHECK_FAIL=<stage> makes that stage fail on purpose (tests of this script).
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parent.parent
TESTS = REPO / "tests"
MAX_FILES, MAX_BYTES = 8, 16 << 20
OUT_NAME = re.compile(r"^[A-Za-z0-9._-]+$")


@dataclass
class Stage:
    name: str
    what: str
    kind: str                 # "build" | "tests" | "bench"
    cap_s: int                # the most this stage may take
    min_s: int                # skipped when less than this is left
    files: list = field(default_factory=list)   # tests: the test files (globs under tests/); None: the rest
    bench: list = field(default_factory=list)   # bench: benchmarks.run arguments
    dry_bench: list = field(default_factory=list)


OP_TESTS = ["ops/test_*.py"]  # every op on every implementation: the CUDA extension's and Triton's at real sizes
EXT_TESTS = ["ops/ext/test_*.py"]
TRITON_TESTS = ["ops/triton/test_*.py"]
MODEL_TESTS = ["test_model_kernels.py", "test_clt_decoder_norms.py", "training/test_graphed.py"]
TINY = ["--shapes", "tiny", "--device", "cpu"]

# The plan, in order of value: what has never run on a GPU first, then the goal benchmarks, then the rest.
STAGES = [
    Stage("build", "build fastclt._C with its CUDA kernels in place (nvcc, FASTCLT_CUDA_ARCH_LIST)", "build", 210, 60),
    Stage("tests-ops", "every op on every implementation on CUDA (the extension's CUDA kernels, never run "
          "before, and Triton's), real sizes, against the reference", "tests", 160, 30, files=OP_TESTS),
    Stage("tests-ext-cuda", "the extension's own CUDA checks: against the CPU kernels, hot features, opcheck",
          "tests", 40, 15, files=EXT_TESTS),
    Stage("tests-triton", "the Triton kernels' own checks at real sizes (autotune limited to 2 configs)", "tests",
          60, 20, files=TRITON_TESTS),
    Stage("tests-models-cuda", "the models' default path, decoder norms and the captured step on CUDA", "tests", 60, 20,
          files=MODEL_TESTS),
    Stage("bench-goals", "benchmarks of the goal cases (--quick)", "bench", 120, 40,
          bench=["--suite", "ops,train", "--select", "goals"],
          dry_bench=TINY + ["--suite", "ops,train", "--select", "goals"]),
    Stage("bench-density", "the density sweep (sparse / dense / adaptive, 0.3% to 50%) and the crossover", "bench",
          100, 30, bench=["--suite", "density", "--shapes", "density-gpu", "--append"],
          dry_bench=TINY + ["--suite", "density", "--append"]),
    Stage("bench-profile", "the training step's phases beside their floors (SAE at sae-2304, the CLT's three "
          "tyings at gpt2-clt), and the demo's loop eager and captured in a CUDA graph", "bench", 100, 30,
          bench=["--suite", "profile", "--shapes", "sae-2304,gpt2-clt,demo-gpu", "--append"],
          dry_bench=TINY + ["--suite", "profile", "--append"]),
    Stage("tests-rest", "the rest of the test suite (its CPU cases already ran in CI)", "tests", 120, 30,
          files=None),
    Stage("bench-rest", "the other benchmark cases, while time remains", "bench", 10 ** 6, 30,
          bench=["--suite", "ops,train", "--select", "rest", "--append"],
          dry_bench=TINY + ["--suite", "ops", "--ops", "batch_topk", "--select", "rest", "--append"]),
]
SUMMARY_RESERVE_S = 20  # kept back for packing the outputs and the summary
NOT_HERE = {"test_gpu_check.py"}  # CI's check of this script: not run inside it
OUT_FILES = ("summary.txt", "build.log", "tests.log", "junit.xml", "results.csv", "results.md", "bench.tar.gz")


@dataclass
class Result:
    stage: Stage
    status: str = "skipped"  # ok | FAILED | stopped | skipped
    seconds: float = 0.0
    detail: str = ""
    failures: list = field(default_factory=list)


def _default_sigint() -> None:
    """In the child before exec: SIGINT back to its default action. A shell that starts this script
    in the background (``cmd &``) passes SIGINT on as ignored, and a Python started with SIGINT
    ignored keeps ignoring it: pytest would then not stop at its budget nor write its report."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class Check:
    def __init__(self, out: Path, dry: bool, total_s: float, only: Optional[set] = None) -> None:
        self.out, self.dry, self.total_s, self.only = out, dry, total_s, only
        self.t0 = time.monotonic()
        self.py = os.environ.get("PYTHON", sys.executable)
        self.work = Path(tempfile.mkdtemp(prefix="gpu_check_"))
        self.results: list[Result] = []
        self.fail_stage = os.environ.get("GPU_CHECK_FAIL", "")
        self.device = "cpu" if dry else "cuda"
        self.res_dir: Optional[Path] = None

    # ------------------------------------------------------------------ helpers
    def left(self) -> float:
        return self.total_s - (time.monotonic() - self.t0)

    def say(self, msg: str) -> None:
        print(f"[gpu_check {time.monotonic() - self.t0:5.0f}s] {msg}", flush=True)

    def env(self, **extra) -> dict:
        env = dict(os.environ, PYTHONUNBUFFERED="1", PIP_NO_INDEX="1", **extra)
        env.pop("GPU_CHECK_FAIL", None)
        return env

    def run(self, cmd: list, log: Path, budget: float, env: dict, stop_signal=signal.SIGINT) -> tuple[int, bool]:
        """Run cmd (its own process group) into log; at the budget send stop_signal, 30 s later kill.
        → (exit status, stopped by the budget)."""
        with log.open("a") as f:
            f.write(f"$ {' '.join(cmd)}\n")
            f.flush()
            p = subprocess.Popen(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True,
                                 preexec_fn=_default_sigint)
            try:
                return p.wait(timeout=max(budget, 1)), False
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, stop_signal)
                try:
                    return p.wait(timeout=30), True
                except subprocess.TimeoutExpired:
                    os.killpg(p.pid, signal.SIGKILL)
                    return p.wait(), True

    # ------------------------------------------------------------------ stages
    def build(self, stage: Stage, budget: float, r: Result) -> None:
        log = self.work / "build.log"
        if self.dry:  # the extension CI built: import it, as the tests will
            cmd = [self.py, "-c", "from fastclt import _ext; i = _ext.build_info(); print(i); "
                   "raise SystemExit(0 if i['loaded'] else 1)"]
            env = self.env()
        else:
            cmd = [self.py, "setup.py", "build_ext", "--inplace"]
            env = self.env(FASTCLT_BUILD_CUDA="1",
                           FASTCLT_CUDA_ARCH_LIST=os.environ.get("FASTCLT_CUDA_ARCH_LIST", "9.0a"),
                           MAX_JOBS=os.environ.get("MAX_JOBS", "16"))
        if self.fail_stage == stage.name:
            cmd = [self.py, "-c", "raise SystemExit('GPU_CHECK_FAIL: build made to fail')"]
        rc, stopped = self.run(cmd, log, budget, env, stop_signal=signal.SIGTERM)
        r.status = "stopped" if stopped else ("ok" if rc == 0 else "FAILED")
        r.detail = "built" if rc == 0 else f"exit status {rc}" + (" (time budget)" if stopped else "")
        avail = subprocess.run([self.py, "-c", _AVAILABLE], cwd=REPO, capture_output=True, text=True, timeout=120,
                               env=self.env())
        with log.open("a") as f:
            f.write("\n=== implementations available after the build ===\n" + avail.stdout + avail.stderr)
        self.available = avail.stdout.strip()

    def tests(self, stage: Stage, budget: float, r: Result) -> None:
        log = self.work / "tests.log"
        junit = self.work / f"junit-{stage.name}.xml"
        files = self._test_files(stage)
        with log.open("a") as f:
            f.write(f"\n=== {stage.name}: {stage.what} ===\n")
        cmd = [self.py, "-m", "pytest", *files, "-q", "-rfE", "--maxfail=50", "-p", "no:cacheprovider",
               f"--junitxml={junit}"]
        if self.dry:
            cmd.append("--collect-only")
        elif _has_module(self.py, "pytest_timeout"):
            cmd.append("--timeout=90")
        if self.fail_stage == stage.name:  # a test that fails, to check that failures fail the check
            fail = self.work / "test_gpu_check_fails.py"
            fail.write_text("def test_made_to_fail():\n    assert False, 'GPU_CHECK_FAIL'\n")
            cmd = [self.py, "-m", "pytest", str(fail), "-q", "-p", "no:cacheprovider", f"--junitxml={junit}"]
        rc, stopped = self.run(cmd, log, budget, self.env(FASTCLT_AUTOTUNE_CONFIGS="2"))
        n = _junit_counts(junit)
        if n is None:
            r.status = "stopped" if stopped else "FAILED"
            r.detail = f"no junit report (pytest exit status {rc})"
            return
        r.failures = n["failed_ids"]
        if self.dry:
            r.detail = f"{n['tests'] + _collected(log)} tests collected"
            r.status = "ok" if rc == 0 and _collected(log) > 0 else "FAILED"
            return
        r.detail = f"{n['passed']} passed, {n['failures']} failed, {n['errors']} errors, {n['skipped']} skipped"
        if n["failures"] or n["errors"]:
            r.status = "FAILED"
        elif stopped:
            r.status, r.detail = "stopped", r.detail + " before the budget ran out"
        else:
            r.status = "ok" if rc in (0, 5) else "FAILED"

    def bench(self, stage: Stage, budget: float, r: Result) -> None:
        log = self.work / "bench.log"
        if self.res_dir is None:
            slug = subprocess.run([self.py, "-c", "import torch; from benchmarks.harness import device_slug; "
                                   f"print(device_slug(torch.device('{self.device}')))"],
                                  cwd=REPO, capture_output=True, text=True,
                                  timeout=120).stdout.strip() or "unknown-device"
            root = self.work / "bench_results" if self.dry else REPO / "benchmarks" / "results"
            self.res_dir = root / slug
        args = stage.dry_bench if self.dry else stage.bench
        cmd = [self.py, "-m", "benchmarks.run", "--suite", "all", "--quick", "--out", str(self.res_dir),
               "--budget-s", str(int(max(budget - 40, 5))), *args]
        if self.fail_stage == stage.name:
            cmd = [self.py, "-c", "raise SystemExit('GPU_CHECK_FAIL')"]
        with log.open("a") as f:
            f.write(f"\n=== {stage.name}: {stage.what} ===\n")
        rc, stopped = self.run(cmd, log, budget, self.env(), stop_signal=signal.SIGTERM)
        rows = _count_rows(self.res_dir / "results.csv")
        r.detail = f"{rows} rows in results.csv" + (" (stopped by the budget)" if stopped else "")
        r.status = "stopped" if stopped else ("ok" if rc == 0 else "FAILED")

    def _test_files(self, stage: Stage) -> list:
        if stage.files is not None:
            return sorted({str(p.relative_to(REPO)) for pat in stage.files for p in TESTS.glob(pat)})
        ran = {str(p.relative_to(REPO)) for s in STAGES if s.kind == "tests" and s.files for pat in s.files
               for p in TESTS.glob(pat)}
        return sorted(str(p.relative_to(REPO)) for p in TESTS.rglob("test_*.py")
                      if str(p.relative_to(REPO)) not in ran and p.name not in NOT_HERE)

    # ------------------------------------------------------------------ driver
    def main(self) -> int:
        self.available = ""
        self.say(f"{'dry run (CPU, tiny)' if self.dry else 'GPU check'}: {len(STAGES)} stages in {self.total_s:.0f} s")
        for i, stage in enumerate(STAGES):
            r = Result(stage)
            self.results.append(r)
            if self.only is not None and stage.name not in self.only:
                r.detail = "not selected (--only)"
                continue
            budget = min(stage.cap_s, self.left() - SUMMARY_RESERVE_S)
            if budget < stage.min_s:
                r.detail = f"skipped for time ({max(budget, 0):.0f} s left, needs {stage.min_s} s)"
                self.say(f"{i + 1}/{len(STAGES)} {stage.name}: {r.detail}")
                continue
            if self.dry:
                budget = min(budget, 120)
            self.say(f"{i + 1}/{len(STAGES)} {stage.name} (budget {budget:.0f} s): {stage.what}")
            t = time.monotonic()
            getattr(self, stage.kind)(stage, budget, r)
            r.seconds = time.monotonic() - t
            self.say(f"    {stage.name}: {r.status} in {r.seconds:.0f} s — {r.detail}")
        failed = [r for r in self.results if r.status == "FAILED" and (r.stage.kind != "bench")]
        code = 1 if failed else 0
        self.pack(code)
        print((self.out / "summary.txt").read_text())
        return code

    def pack(self, code: int) -> None:
        """Write the outputs into OUT (within the limits of what comes back from the device)."""
        self.out.mkdir(parents=True, exist_ok=True)
        for name in ("build.log", "tests.log"):
            src = self.work / name
            _copy_capped(src if src.exists() else None, self.out / name)
        _merge_junit(sorted(self.work.glob("junit-*.xml")), self.out / "junit.xml")
        if self.res_dir is not None and self.res_dir.exists():
            for name in ("results.csv", "results.md"):
                if (self.res_dir / name).exists():
                    shutil.copy(self.res_dir / name, self.out / name)
            with tarfile.open(self.out / "bench.tar.gz", "w:gz") as tar:
                tar.add(self.res_dir, arcname=self.res_dir.name)
                if (self.work / "bench.log").exists():
                    tar.add(self.work / "bench.log", arcname="bench.log")
            if (self.out / "bench.tar.gz").stat().st_size > MAX_BYTES:  # without the plots
                with tarfile.open(self.out / "bench.tar.gz", "w:gz") as tar:
                    for p in self.res_dir.iterdir():
                        if p.suffix != ".png":
                            tar.add(p, arcname=f"{self.res_dir.name}/{p.name}")
        (self.out / "summary.txt").write_text(self.summary(code))
        _check_out_limits(self.out)

    def summary(self, code: int) -> str:
        lines = [f"fastclt GPU check{' — DRY RUN (CPU, tiny sizes)' if self.dry else ''} — "
                 f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}", ""]
        lines += ["== device and versions", _probe(self.py), ""]
        lines += ["== implementations after the build", self.available or "(not probed)", ""]
        lines += ["== stages (in the order they ran)", f"{'stage':<18} {'status':<8} {'time':>6}  detail"]
        for r in self.results:
            lines.append(f"{r.stage.name:<18} {r.status:<8} {r.seconds:5.0f}s  {r.detail}")
            lines += [f"{'':<18}   FAILED {f}" for f in r.failures[:30]]
        skipped = [r.stage.name for r in self.results if r.status == "skipped" and "--only" not in r.detail]
        stopped = [r.stage.name for r in self.results if r.status == "stopped"]
        lines.append("")
        lines.append(f"skipped for time: {', '.join(skipped) or 'nothing'}; stopped by their budget: "
                     f"{', '.join(stopped) or 'nothing'}")
        md = self.out / "results.md"
        if md.exists():
            text = md.read_text()
            goals = text[text.find("## Goals"):] if "## Goals" in text else ""
            goals = goals.split("\n## ", 1)[0].strip()
            lines += ["", goals or "(no goal table)"]
        failed = [r.stage.name for r in self.results if r.status == "FAILED"]
        lines += ["", f"verdict: {'FAIL' if code else 'PASS'}"
                  + (f" — failed: {', '.join(failed)}" if failed else "")
                  + f" — done in {time.monotonic() - self.t0:.0f} s (exit status {code})"]
        return "\n".join(lines) + "\n"


_AVAILABLE = """
import torch
import fastclt.ops as ops
dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
for op in ("encode", "topk", "batch_topk", "batch_topk_layers", "sparse_decode", "clt_decode", "auxk_select"):
    impls = []
    for impl in ops.implementations(op):
        try:
            ops.resolve(op, impl, dev)
            impls.append(impl)
        except Exception:
            impls.append(impl + "(unavailable)")
    try:
        auto = ops.resolve(op, "auto", dev)[0]
    except Exception as e:
        auto = "error: " + str(e)
    print(f"{op}: {', '.join(impls)}; auto -> {auto}")
"""


def _probe(py: str) -> str:
    code = ("import sys, subprocess, torch\n"
            "print('python', sys.version.split()[0], '| torch', torch.__version__, '| CUDA', torch.version.cuda,"
            " '| cuda available', torch.cuda.is_available())\n"
            "if torch.cuda.is_available(): print('device', torch.cuda.get_device_name(0))\n"
            "try:\n    import triton; print('triton', triton.__version__)\n"
            "except Exception as e: print('triton: not importable')\n")
    out = subprocess.run([py, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    commit = subprocess.run([py, "-c", "from benchmarks.harness import git_commit; print(git_commit())"], cwd=REPO,
                            capture_output=True, text=True, timeout=120).stdout.strip()
    return (out.stdout + out.stderr[-500:]).strip() + f"\ncommit {commit or 'unknown'}"


def _has_module(py: str, name: str) -> bool:
    return subprocess.run([py, "-c", f"import {name}"], capture_output=True).returncode == 0


def _junit_counts(path: Path) -> Optional[dict]:
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return None
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    n = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    n["passed"] = n["tests"] - n["failures"] - n["errors"] - n["skipped"]
    n["failed_ids"] = [f"{c.get('classname')}::{c.get('name')}" for c in root.iter("testcase")
                       if c.find("failure") is not None or c.find("error") is not None]
    return n


def _collected(log: Path) -> int:
    """The count pytest --collect-only printed last ("N tests collected")."""
    found = re.findall(r"(\d+) tests? collected", log.read_text(errors="replace"))
    return int(found[-1]) if found else 0


def _count_rows(csv_path: Path) -> int:
    try:
        return max(0, len(csv_path.read_text().splitlines()) - 1)
    except OSError:
        return 0


def _merge_junit(parts: list, dest: Path) -> None:
    root = ET.Element("testsuites")
    for p in parts:
        try:
            r = ET.parse(p).getroot()
        except (OSError, ET.ParseError):
            continue
        for s in ([r] if r.tag == "testsuite" else list(r.iter("testsuite"))):
            s.set("name", p.stem.replace("junit-", ""))
            root.append(s)
    ET.ElementTree(root).write(dest, encoding="utf-8", xml_declaration=True)


def _copy_capped(src: Optional[Path], dest: Path, limit: int = MAX_BYTES - (1 << 20)) -> None:
    """src → dest, keeping the first 1 MiB and the last (limit − 1 MiB) bytes of a larger file."""
    if src is None:
        dest.write_text("(this stage did not run)\n")
        return
    data = src.read_bytes()
    if len(data) > limit:
        head = 1 << 20
        data = data[:head] + b"\n... [cut to stay under 16 MiB] ...\n" + data[-(limit - head):]
    dest.write_bytes(data)


def _check_out_limits(out: Path) -> None:
    entries = list(out.iterdir())
    bad = [p.name for p in entries if not p.is_file() or not OUT_NAME.match(p.name) or p.stat().st_size > MAX_BYTES]
    if len(entries) > MAX_FILES or bad:
        raise SystemExit(f"gpu_check: outputs exceed what comes back from the device: {len(entries)} entries, "
                         f"bad: {bad}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", nargs="?", default=os.environ.get("OUT") or "gpu_check_out")
    p.add_argument("--dry-run", action="store_true", help="walk every stage on the CPU at tiny sizes")
    p.add_argument("--total-s", type=float, default=float(os.environ.get("GPU_CHECK_TOTAL_S", 540)))
    p.add_argument("--only", default=None, help="comma-separated stage names: run only these (e.g. a rerun)")
    a = p.parse_args(argv)
    only = None if a.only is None else {n.strip() for n in a.only.split(",") if n.strip()}
    if only is not None and only - {s.name for s in STAGES}:
        p.error(f"--only: unknown stages {sorted(only - {s.name for s in STAGES})}; known: {[s.name for s in STAGES]}")
    out = Path(a.out).resolve()
    for name in OUT_FILES:  # a fresh set of outputs each run
        (out / name).unlink(missing_ok=True)
    return Check(out, a.dry_run, a.total_s, only).main()


if __name__ == "__main__":
    sys.exit(main())
