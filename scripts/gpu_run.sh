#!/usr/bin/env bash
# Build, test and benchmark opt_fast on a GPU machine (the lent device: torch 2.11+cu130, triton 3.6,
# Python 3.12, no internet, at most 600 s per call and 8 files back from $OUT).
#
#   scripts/gpu_run.sh OUTDIR [all|check|bench]
#
#   check  env, build (CUDA kernels required), backend table, CUDA tests, Triton tests on CUDA,
#          compute-sanitizer memcheck/racecheck on the CUDA smoke tests, then the rest of the test suite
#   bench  build if the extension is not importable (a warm machine keeps the build), the lowdin grid
#          (Triton float32 products in "ieee", then in "tf32x3"), the full report on CUDA, the
#          pytest-benchmark smoke test
#   all    (default) both in one call, the report getting whatever time is left of TOTAL_S
#
# Device time is short, so the usual pair is two calls on the same warm machine:
#   run: bash scripts/gpu_run.sh $OUT check      then      run: bash scripts/gpu_run.sh $OUT bench
# Logs and results are written to WORK_DIR (default /tmp/opt_fast_gpu_run; kept between calls) and packed
# at the end into OUTDIR/gpu_run-<mode>.tgz; OUTDIR also gets summary-<mode>.log and the reports'
# .md/.json (at most 8 files, so that every one of them comes back from the device machine).
#
# Environment: PYTHON (default python3, the system Python: no venv), TORCH_CUDA_ARCH_LIST (default: the local
# GPU's compute capability from nvidia-smi, else 9.0), MAX_JOBS (default 16), SANITIZE (default 1: run the
# CUDA smoke tests under compute-sanitizer when it is installed), LOWDIN_BUDGET_S (the lowdin grid's cap,
# default 150 s), LOWDIN_TF32X3_BUDGET_S (its tf32x3 rerun's cap, default 90 s in bench mode, 0 = skipped
# in all mode), TOTAL_S (the wall time this call should fit in, default 570 s: the report gets what the
# earlier stages left), BENCH_BUDGET_S (the report's cap in seconds instead; 0 = no cap), BENCH_ARGS (extra
# arguments for bench/report.py), PYTEST_WORKERS (default 8: the CPU-side test suite runs under
# pytest-xdist when it is installed).
# Exit status: 0 if every stage passed, else 1; summary-<mode>.log lists each stage's exit code and time.
set -uo pipefail

OUTDIR=${1:?usage: scripts/gpu_run.sh OUTDIR [all|check|bench]}
MODE=${2:-all}
case "$MODE" in all|check|bench) ;; *) echo "unknown mode '$MODE' (all, check or bench)"; exit 2 ;; esac
mkdir -p "$OUTDIR" || exit 2
OUTDIR=$(cd "$OUTDIR" && pwd)
WORK=${WORK_DIR:-/tmp/opt_fast_gpu_run}
LOG="$WORK/$MODE"
rm -rf "$LOG" && mkdir -p "$LOG" || exit 2
cd "$(dirname "$0")/.." || exit 2
PY=${PYTHON:-python3}
if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then   # build for the GPU that is here
  TORCH_CUDA_ARCH_LIST=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n 1 | tr -d ' ')
  TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
fi
export TORCH_CUDA_ARCH_LIST
export MAX_JOBS=${MAX_JOBS:-16}
TOTAL_S=${TOTAL_S:-570}

status=0
printf 'stage\texit\tseconds\n' > "$LOG/stages.tsv"

# stage NAME CMD...: run CMD, tee its output into NAME.log, record its exit code and time
stage() {
  local name=$1; shift
  local start=$SECONDS
  echo "=== ${name}: $*" | tee -a "$LOG/summary.log"
  "$@" 2>&1 | tee "$LOG/${name}.log"
  local rc=${PIPESTATUS[0]}
  printf '%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - start))" >> "$LOG/stages.tsv"
  echo "=== ${name}: exit ${rc} after $((SECONDS - start)) s" | tee -a "$LOG/summary.log"
  [ "$rc" -eq 0 ] || status=1
  return "$rc"
}

# pack everything into OUTDIR (few files: the device tool returns at most 8)
finish() {
  echo "=== stages (exit codes):" | tee -a "$LOG/summary.log"
  column -t -s $'\t' "$LOG/stages.tsv" 2>/dev/null | tee -a "$LOG/summary.log" || cat "$LOG/stages.tsv"
  tar -czf "$OUTDIR/gpu_run-$MODE.tgz" -C "$WORK" "$MODE"
  cp "$LOG/summary.log" "$OUTDIR/summary-$MODE.log"
  # reports from the same minute share a name: prefix each with its folder (report, lowdin, lowdin_tf32x3)
  for f in "$LOG"/*/*.md "$LOG"/*/*.json; do
    [ -f "$f" ] && cp "$f" "$OUTDIR/$(basename "$(dirname "$f")")-$(basename "$f")"
  done
  exit "$status"
}

# OPT_FAST_FORCE_CUDA=1: a build that silently leaves out the CUDA kernels is a failed build here;
# --no-deps --no-index: everything is preinstalled and there is no internet
build() {
  stage build env OPT_FAST_FORCE_CUDA=1 "$PY" -m pip install --no-build-isolation --no-deps --no-index -e .
}

if [ "$MODE" != bench ]; then
  stage env bash -c "nvidia-smi; $PY -c 'import sys, torch; print(sys.version); print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"available\", torch.cuda.is_available()); print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else \"no GPU\")'; $PY -c 'import triton; print(\"triton\", triton.__version__)'; git rev-parse HEAD; git status --short"
  build || { echo "=== build failed: nothing else runs (see build.log)" | tee -a "$LOG/summary.log"; finish; }
  # which kernel serves each op; fails if the C++/CUDA extension does not load
  stage backends env OPT_FAST_REQUIRE_EXT=1 "$PY" -c "import opt_fast; opt_fast.backend_report()"
  # the part no CPU machine can test first
  stage cuda_tests env OPT_FAST_REQUIRE_EXT=1 "$PY" -m pytest tests/test_cuda_kernels.py -q -p no:cacheprovider -rs
  # the Triton launchers on CUDA (interp- and gpu-marked tests; TRITON_INTERPRET must be unset)
  stage triton_lowdin env -u TRITON_INTERPRET "$PY" -m pytest tests/test_triton_lowdin.py -q -p no:cacheprovider -rs
  if [ "${SANITIZE:-1}" = "1" ] && command -v compute-sanitizer >/dev/null 2>&1; then
    # every CUDA kernel once, uncached allocations so that memcheck sees exact buffer ends
    for tool in memcheck racecheck; do
      stage "sanitize_${tool}" env PYTORCH_NO_CUDA_MEMORY_CACHING=1 OPT_FAST_REQUIRE_EXT=1 compute-sanitizer \
        --tool "$tool" --error-exitcode 1 "$PY" -m pytest tests/test_cuda_kernels.py -q -p no:cacheprovider -k smoke
    done
  fi
  xdist=()
  "$PY" -c "import xdist" 2>/dev/null && xdist=(-n "${PYTEST_WORKERS:-8}")
  stage tests env OPT_FAST_REQUIRE_EXT=1 "$PY" -m pytest tests -q -p no:cacheprovider -rs ${xdist[@]+"${xdist[@]}"} \
    --ignore=tests/test_cuda_kernels.py --ignore=tests/test_triton_lowdin.py
fi

if [ "$MODE" != check ]; then
  if ! OPT_FAST_REQUIRE_EXT=1 "$PY" -c "import opt_fast, torch; assert torch.cuda.is_available()" 2>/dev/null; then
    build || { echo "=== build failed: no benchmarks (see build.log)" | tee -a "$LOG/summary.log"; finish; }
  fi
  # lowdin's grid (d × batch, cold / warm / reuse, fwd and fwd+bwd) first, with its own share of the time;
  # then the same grid with the Triton float32 products on tensor cores (tf32x3), whose accuracy the
  # report's gate checks: the candidate for the CUDA targets
  stage report_lowdin "$PY" bench/report.py --device cuda --full --ops lowdin --no-e2e --out "$LOG/lowdin" \
    --budget "${LOWDIN_BUDGET_S:-150}"
  tf32x3_budget=${LOWDIN_TF32X3_BUDGET_S:-$([ "$MODE" = all ] && echo 0 || echo 90)}
  if [ "$tf32x3_budget" != 0 ]; then
    stage report_lowdin_tf32x3 env OPT_FAST_TRITON_F32_PRECISION=tf32x3 "$PY" bench/report.py --device cuda \
      --full --ops lowdin --no-e2e --no-targets --out "$LOG/lowdin_tf32x3" --budget "$tf32x3_budget"
  fi
  budget=${BENCH_BUDGET_S:-$(( TOTAL_S - SECONDS - 60 ))}
  [ "$budget" -lt 60 ] 2>/dev/null && budget=60
  budget_args=()
  [ "$budget" != "0" ] && budget_args=(--budget "$budget")
  # shellcheck disable=SC2086
  stage report "$PY" bench/report.py --device cuda --full --out "$LOG/report" ${budget_args[@]+"${budget_args[@]}"} ${BENCH_ARGS:-}
  if "$PY" -c "import pytest_benchmark" 2>/dev/null; then
    stage bench_smoke timeout 50 "$PY" -m pytest bench --benchmark-disable -q -p no:cacheprovider --bench-device cuda
  fi
fi
finish
