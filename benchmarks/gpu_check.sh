#!/usr/bin/env bash
# The one-command GPU check, for a fresh GPU machine without network (nothing pre-built, nothing
# installed: the system python3 with torch, Triton, pytest). It fits in 540 s (GPU_CHECK_TOTAL_S).
#
#   bash benchmarks/gpu_check.sh [OUT_DIR] [--dry-run] [--only STAGE,...]   (OUT_DIR default: $OUT, else gpu_check_out/)
#
# What a GPU run does, in this order (each stage has a time budget; when it is spent the stage stops
# cleanly, and a stage with too little time left is skipped — the summary says which):
#   1. build              build fastclt._C with its CUDA kernels (sm_90a), in place        ≤ 210 s
#   2. tests-ops          every op on every implementation on CUDA, real sizes, against the
#                         reference: the extension's CUDA kernels (never run before), Triton ≤ 160 s
#   3. tests-ext-cuda     the extension's own CUDA checks: vs the CPU kernels, hot features  ≤  40 s
#   4. tests-triton       the Triton kernels' own checks (FASTCLT_AUTOTUNE_CONFIGS=2)        ≤  60 s
#   5. tests-models-cuda  the models' default path on CUDA, and the captured step (graph)   ≤  60 s
#   6. bench-goals        benchmarks of the goal cases (--quick)                           ≤ 120 s
#   7. bench-density      the density sweep (sparse / dense / adaptive) and the crossover   ≤ 100 s
#   8. bench-profile      the step's phases beside their floors (sae-2304, gpt2-clt); demo loop ≤ 100 s
#   9. tests-rest         the rest of the test suite                                        ≤ 120 s
#  10. bench-rest         the other benchmark cases, while time remains
# Exit status 1 when the build fails or any test fails. Outputs in OUT_DIR (at most 8 files):
# summary.txt (plain: device, versions, each stage's status and counts, what was skipped, the
# goal table, the verdict), build.log, tests.log, junit.xml, results.csv, results.md, bench.tar.gz.
# --dry-run walks every stage on the CPU at tiny sizes (CI runs it: tests/test_gpu_check.py).
# The stage table and its budgets live in benchmarks/gpu_check.py (STAGES). Never changes GPU settings.
# In a copy of the tree without git, FASTCLT_COMMIT=<sha> names the commit in the summary and results.
set -u
cd "$(dirname "$0")/.."
exec "${PYTHON:-python3}" benchmarks/gpu_check.py "$@"
