#!/usr/bin/env bash
# The one-command GPU check: build the CUDA extension, run the tests, run the benchmarks, summarise.
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]        (default: $OUT if set, else gpu_check_out/)
#
# For a GPU machine without network: uses the system python3 with torch, installs nothing.
# Knobs (for dry runs elsewhere): GPU_CHECK_SKIP_BUILD=1, GPU_CHECK_TESTS (default "tests"),
# GPU_CHECK_BENCH_ARGS (extra benchmarks.run arguments, e.g. "--shapes tiny"), GPU_CHECK_RESULTS_ROOT.
# Never changes GPU settings (nvidia-smi is only queried). Every step has its own `timeout`, and
# the whole check fits in GPU_CHECK_TOTAL_S seconds (default 560). Top-level files in OUT_DIR
# (7, for tools that fetch only a few): summary.txt build.log tests.log junit.xml results.csv
# results.md bench_results.tar.gz (the benchmark folder with its PNGs and meta.json, plus bench.log).
# The benchmark results also stay in benchmarks/results/<device-slug>/ for committing.
set -u
cd "$(dirname "$0")/.."
REPO=$(pwd)
OUT_DIR="${1:-${OUT:-gpu_check_out}}"
mkdir -p "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
PY="${PYTHON:-python3}"
TOTAL="${GPU_CHECK_TOTAL_S:-560}"
T0=$(date +%s)
export PIP_NO_INDEX=1 PYTHONUNBUFFERED=1
elapsed() { echo $(( $(date +%s) - T0 )); }
left() { echo $(( TOTAL - $(date +%s) + T0 )); }
min() { if [ "$1" -lt "$2" ]; then echo "$1"; else echo "$2"; fi; }
say() { echo "[gpu_check $(elapsed)s] $*"; }

# ---------------------------------------------------------------------------------------- 1. build
BUILD_T=$(min "${BUILD_TIMEOUT:-200}" $(( TOTAL * 2 / 5 )))
say "1/4 building the extension with CUDA (timeout ${BUILD_T}s) -> build.log"
tb=$(date +%s)
if [ "${GPU_CHECK_SKIP_BUILD:-0}" = 1 ]; then
  echo "build skipped (GPU_CHECK_SKIP_BUILD=1)" > "$OUT_DIR/build.log"; rc=0
else
timeout -k 10 "$BUILD_T" env FASTCLT_BUILD_CUDA=1 FASTCLT_CUDA_ARCH_LIST="${FASTCLT_CUDA_ARCH_LIST:-9.0a}" \
    MAX_JOBS="${MAX_JOBS:-16}" "$PY" setup.py build_ext --inplace > "$OUT_DIR/build.log" 2>&1
rc=$?
fi
BUILD_S=$(( $(date +%s) - tb ))
case $rc in
  0) BUILD="ok (${BUILD_S}s)";;
  124|137) BUILD="TIMED OUT after ${BUILD_S}s (carrying on)";;
  *) BUILD="FAILED rc=$rc after ${BUILD_S}s (carrying on)";;
esac
{
  echo; echo "=== which implementations are available on this device after the build ==="
  timeout -k 5 60 "$PY" - <<'EOF' 2>&1
import torch
import fastclt, fastclt.ops as ops
dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
for op in ("encode", "topk", "batch_topk", "batch_topk_layers", "sparse_decode", "clt_decode", "auxk_select"):
    avail = []
    for impl in ops.implementations(op):
        try:
            ops.resolve(op, impl, dev); avail.append(impl)
        except Exception as e:
            avail.append(f"{impl}(unavailable)")
    try:
        auto = ops.resolve(op, "auto", dev)[0]
    except Exception as e:
        auto = f"error: {e}"
    print(f"{op}: {', '.join(avail)}; auto -> {auto}")
EOF
} >> "$OUT_DIR/build.log"
say "build: $BUILD"

# ---------------------------------------------------------------------------------------- 2. tests
TEST_T=$(min "${TEST_TIMEOUT:-160}" $(( $(left) - 200 )))
[ "$TEST_T" -lt 30 ] && TEST_T=30
TIMEOUT_ARGS=()
if "$PY" -c "import pytest_timeout" 2>/dev/null; then TIMEOUT_ARGS=(--timeout=120); fi
say "2/4 running the test suite (timeout ${TEST_T}s, per-test timeout: ${TIMEOUT_ARGS[*]+${TIMEOUT_ARGS[*]}}) -> tests.log, junit.xml"
tt=$(date +%s)
rm -f "$OUT_DIR/junit.xml"
# SIGINT on timeout: pytest stops like on Ctrl-C and still writes junit.xml and its summary
timeout -s INT -k 20 "$TEST_T" "$PY" -m pytest ${GPU_CHECK_TESTS:-tests} -q -rfE --maxfail=25 ${TIMEOUT_ARGS[@]+"${TIMEOUT_ARGS[@]}"} \
    --junitxml="$OUT_DIR/junit.xml" -p no:cacheprovider > "$OUT_DIR/tests.log" 2>&1
trc=$?
TEST_S=$(( $(date +%s) - tt ))
[ "$trc" = 124 ] || [ "$trc" = 137 ] && echo "=== pytest stopped by the ${TEST_T}s timeout ===" >> "$OUT_DIR/tests.log"
TESTS=$("$PY" - "$OUT_DIR/junit.xml" "$OUT_DIR/tests.log" "$trc" <<'EOF'
import re, sys, xml.etree.ElementTree as ET
junit, log, rc = sys.argv[1], sys.argv[2], sys.argv[3]
try:
    root = ET.parse(junit).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    n = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    passed = n["tests"] - n["failures"] - n["errors"] - n["skipped"]
    print(f"{passed} passed, {n['failures']} failed, {n['errors']} errors, {n['skipped']} skipped (pytest rc={rc})")
    for case in root.iter("testcase"):
        if case.find("failure") is not None or case.find("error") is not None:
            print(f"  FAILED {case.get('classname')}::{case.get('name')}")
except Exception:
    tail = open(log, errors="replace").read().strip().splitlines()[-3:]
    print(f"no junit.xml (pytest rc={rc}); log tail: " + " | ".join(tail))
EOF
)
say "tests (${TEST_S}s): $(echo "$TESTS" | head -1)"

# ------------------------------------------------------------------------------------ 3. benchmarks
SLUG=$("$PY" -c "import torch; from benchmarks.harness import device_slug as s; print(s(torch.device('cuda' if torch.cuda.is_available() else 'cpu')))" 2>/dev/null || echo unknown-device)
RES_ROOT="${GPU_CHECK_RESULTS_ROOT:-$REPO/benchmarks/results}"
mkdir -p "$RES_ROOT"; RES_ROOT=$(cd "$RES_ROOT" && pwd)
RES="$RES_ROOT/$SLUG"
BENCH_T=$(( $(left) - 15 ))
[ "$BENCH_T" -lt 60 ] && BENCH_T=60
say "3/4 running the benchmarks (timeout ${BENCH_T}s, budget $(( BENCH_T - 45 ))s) -> $RES/"
tbn=$(date +%s)
timeout -k 15 "$BENCH_T" "$PY" -m benchmarks.run --suite all --quick --budget-s $(( BENCH_T - 45 )) --out "$RES" ${GPU_CHECK_BENCH_ARGS:-} \
    > "$OUT_DIR/bench.log" 2>&1
brc=$?
BENCH_S=$(( $(date +%s) - tbn ))
case $brc in
  0) BENCH="ok (${BENCH_S}s)";;
  124|137) BENCH="TIMED OUT after ${BENCH_S}s (results.csv holds the rows measured before)";;
  *) BENCH="FAILED rc=$brc after ${BENCH_S}s (see bench.log in bench_results.tar.gz)";;
esac
for f in results.csv results.md; do [ -f "$RES/$f" ] && cp "$RES/$f" "$OUT_DIR/$f"; done
if [ -d "$RES" ]; then
  tar -czf "$OUT_DIR/bench_results.tar.gz" -C "$RES_ROOT" "$SLUG" -C "$OUT_DIR" bench.log
else
  tar -czf "$OUT_DIR/bench_results.tar.gz" -C "$OUT_DIR" bench.log
fi
rm -f "$OUT_DIR/bench.log"
say "benchmarks: $BENCH"

# --------------------------------------------------------------------------------------- 4. summary
# The verdict (build, tests, goals) comes last: tools that show only the end of the output keep it.
say "4/4 writing summary.txt"
{
  echo "fastclt GPU check — $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo
  echo "== device"
  (nvidia-smi -L 2>/dev/null || echo "nvidia-smi: not found")
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader 2>/dev/null
  echo
  echo "== versions"
  "$PY" -c "import sys, torch; print('python', sys.version.split()[0]); print('torch', torch.__version__, '| CUDA', torch.version.cuda, '| cuda available', torch.cuda.is_available())" 2>&1
  "$PY" -c "import triton; print('triton', triton.__version__)" 2>/dev/null || echo "triton: not importable"
  (command -v nvcc >/dev/null && nvcc --version | tail -2) || echo "nvcc: not found"
  echo "commit $(git -C "$REPO" rev-parse HEAD 2>/dev/null || echo unknown)$(git -C "$REPO" status --porcelain --untracked-files=no 2>/dev/null | grep -q . && echo ' (dirty)')"
  echo
  echo "== benchmark tables (results.md)"
  if [ -f "$OUT_DIR/results.md" ]; then sed '/^## Goals/,/^## [^G]/{/^## [^G]/!d}' "$OUT_DIR/results.md"; else echo "(no results.md)"; fi
  echo
  echo "================================================================ verdict"
  echo "== 1. build: $BUILD"
  sed -n '/=== which implementations/,$p' "$OUT_DIR/build.log" | tail -n +2
  if [ "$rc" != 0 ]; then echo "-- build.log errors:"; grep -iE "error|fatal" "$OUT_DIR/build.log" | head -15; fi
  echo
  echo "== 2. tests (${TEST_S}s): $TESTS"
  echo
  echo "== 3. benchmarks: $BENCH -> $RES/"
  [ -f "$OUT_DIR/results.md" ] && sed -n '/^## Goals/,/^## [^G]/p' "$OUT_DIR/results.md" | sed '$d'
  echo "done in $(elapsed)s"
} > "$OUT_DIR/summary.txt" 2>&1
cat "$OUT_DIR/summary.txt"
