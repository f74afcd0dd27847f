#!/usr/bin/env bash
# Everything a lent GPU machine should do for opt_fast, in ONE call of at most 8 minutes (the device tool
# allows 600 s per command and 15 minutes of device time per session, the machine's start included):
#
#   env        GPU, driver, Python, torch, triton, nvcc, compute-sanitizer versions; a digest of the sources
#              (the copy on the device machine may have no .git)
#   build      the extension with OPT_FAST_FORCE_CUDA=1 (a build without the CUDA kernels fails here)
#   cuda       tests/test_cuda_kernels.py (the CUDA C++ kernels against the float64 references)
#   triton     tests/test_triton_lowdin.py and tests/test_triton_blocks.py on CUDA (TRITON_INTERPRET unset)
#   probes     scripts/gpu_probes.py: batch > 65535, float64 lowdin backward at d = 64, the Householder path
#              boundaries, tf32x3 vs ieee at d = 1024, converge vs fixed steps, no host syncs, bf16 approx,
#              the Triton kernels' registers and spills as the driver reports them
#   sanitize   compute-sanitizer memcheck, racecheck and synccheck on the smoke tests, instrumenting only
#              the project's kernels (names containing "opt_fast": the CUDA kernels' namespace and the
#              Triton kernels' names); a host that refuses the tool gets a "skipped" line
#   gpu_rest   the other gpu-marked tests (layers, ops on CUDA)
#   bench      bench/report.py --device cuda --full with whatever time is left
#
# Each stage runs under `timeout` with its own cap, cut to the time left before TOTAL_S. Logs are written
# into OUTDIR while the stages run, so a command killed at the device tool's limit still returns them; at
# most 8 plain files (the device tool brings back no more), no subfolders:
#   summary.log  the environment, one line per stage (exit code, seconds), each failure's last lines
#   build.log  tests.log  probes.log  sanitize.log  bench.log    the stages' full output
#   bench.md  bench.json                                          the benchmark report, once it is written
#
# Usage:
#   bash scripts/gpu_run.sh OUTDIR             on the GPU machine (device tool: bash scripts/gpu_run.sh $OUT)
#   bash scripts/gpu_run.sh --dry-run OUTDIR   anywhere (CI): runs every stage that needs no GPU (env, the
#       probes' and pytest selections' imports and collection, the report's options) and prints the command
#       each GPU stage would run
# Environment: PYTHON (default python3: the device image has torch there, no venv), TOTAL_S (default 470),
# TORCH_CUDA_ARCH_LIST (default: the GPU's compute capability), MAX_JOBS (default 16), BENCH_ARGS (extra
# arguments for bench/report.py), PYTEST_WORKERS (default 8, when pytest-xdist is installed).
# Exit status: 0 if every stage that ran passed.
set -uo pipefail

DRY=0
if [ "${1:-}" = "--dry-run" ]; then DRY=1; shift; fi
OUT=${1:?usage: scripts/gpu_run.sh [--dry-run] OUTDIR}
mkdir -p "$OUT" || exit 2
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.." || exit 2
PY=${PYTHON:-python3}
TOTAL_S=${TOTAL_S:-470}
WORK=$(mktemp -d)
export PYTHONUNBUFFERED=1
status=0
SUMMARY="$OUT/summary.log"
: > "$SUMMARY"

say() { echo "$*" | tee -a "$SUMMARY"; }

# run NAME LOG CAP CMD...: CMD under `timeout`, output appended to OUTDIR/LOG as it comes; a summary line
run() {
  local name=$1 log=$2 cap=$3; shift 3
  local left=$((TOTAL_S - SECONDS - 10))
  local t=$((cap < left ? cap : left))
  if [ "$t" -lt 15 ]; then say "--- ${name}: skipped (${left} s left of TOTAL_S=${TOTAL_S})"; return 0; fi
  echo "=== ${name} (timeout ${t} s): $*" >> "$OUT/$log"
  say "--- ${name}: start at ${SECONDS} s, timeout ${t} s"
  local start=$SECONDS
  timeout --kill-after=10 "$t" "$@" 2>&1 | tee -a "$OUT/$log"
  local rc=${PIPESTATUS[0]}
  local note=""
  [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ] && note=" (timed out)"
  say "--- ${name}: exit ${rc}${note} after $((SECONDS - start)) s"
  if [ "$rc" -ne 0 ]; then
    status=1
    [ "$log" = summary.log ] || tail -n 15 "$OUT/$log" | sed 's/^/    /' >> "$SUMMARY"
  fi
  return "$rc"
}

# gpu NAME LOG CAP CHECK-CMD -- CMD...: CMD on a GPU; in a dry run, CHECK-CMD instead (or nothing: "-")
gpu() {
  local name=$1 log=$2 cap=$3 check=$4; shift 5
  if [ "$DRY" = 1 ]; then
    say "--- ${name}: would run (cap ${cap} s): $*"
    [ "$check" = "-" ] || run "${name} [dry-run check]" "$log" 120 bash -c "$check"
    return
  fi
  run "$name" "$log" "$cap" "$@"
}

PYTEST=("$PY" -m pytest -q -p no:cacheprovider -rs)
COLLECT="$PY -m pytest -q -p no:cacheprovider --collect-only"
SMOKE=(tests/test_cuda_kernels.py tests/test_triton_lowdin.py tests/test_triton_blocks.py -k smoke)

# ---- env ----------------------------------------------------------------------------------------------
env_report() {
  echo "date: $(date -u +%FT%TZ)  host: $(hostname)  cpus: $(nproc)  mode: $([ "$DRY" = 1 ] && echo dry-run || echo gpu)"
  nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv,noheader 2>/dev/null \
    || echo "nvidia-smi: not available"
  "$PY" -c 'import sys, torch; print("python", sys.version.split()[0], "| torch", torch.__version__, "cuda",
    torch.version.cuda, "| cuda available", torch.cuda.is_available())'
  "$PY" -c 'import triton; print("triton", triton.__version__)' 2>&1 | tail -n 1
  (nvcc --version 2>/dev/null | tail -n 1) || echo "nvcc: not available"
  (compute-sanitizer --version 2>/dev/null | tail -n 1) || echo "compute-sanitizer: not available"
  local digest
  digest=$(find csrc opt_fast triton_kernels tests scripts bench setup.py -type f \( -name '*.py' -o -name '*.cu' \
    -o -name '*.cuh' -o -name '*.cpp' -o -name '*.h' -o -name '*.sh' \) 2>/dev/null | LC_ALL=C sort | xargs sha1sum \
    | sha1sum | cut -c1-12)
  echo "source digest: ${digest}  git: $(git rev-parse --short HEAD 2>/dev/null || echo 'no .git')"
}
export -f env_report
export PY DRY WORK OUT
run env summary.log 90 bash -c env_report

# ---- build --------------------------------------------------------------------------------------------
if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then
  TORCH_CUDA_ARCH_LIST=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n 1 | tr -d ' ')
  TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
fi
export TORCH_CUDA_ARCH_LIST MAX_JOBS=${MAX_JOBS:-16}
# --no-deps --no-index: the image has every dependency and no internet
gpu build build.log 240 "test -f setup.py && $PY -c 'import setuptools, torch.utils.cpp_extension'" -- \
  env OPT_FAST_FORCE_CUDA=1 "$PY" -m pip install --no-build-isolation --no-deps --no-index -e .
build_rc=$?
if [ "$DRY" = 0 ] && [ "$build_rc" -ne 0 ]; then
  say "--- build failed: nothing else can run (build.log)"
  exit 1
fi
gpu backends build.log 30 - -- env OPT_FAST_REQUIRE_EXT=1 "$PY" -c "import opt_fast; opt_fast.backend_report()"

# ---- tests --------------------------------------------------------------------------------------------
gpu cuda tests.log 100 "$COLLECT tests/test_cuda_kernels.py" -- \
  env OPT_FAST_REQUIRE_EXT=1 "${PYTEST[@]}" tests/test_cuda_kernels.py
TRITON_TESTS=(tests/test_triton_lowdin.py tests/test_triton_blocks.py)
gpu triton tests.log 150 "env -u TRITON_INTERPRET $COLLECT ${TRITON_TESTS[*]}" -- \
  env -u TRITON_INTERPRET "${PYTEST[@]}" "${TRITON_TESTS[@]}"

# ---- probes -------------------------------------------------------------------------------------------
gpu probes probes.log 100 "$PY scripts/gpu_probes.py --dry-run" -- "$PY" scripts/gpu_probes.py

# ---- compute-sanitizer ------------------------------------------------------------------------------
# only kernels whose name contains "opt_fast" are instrumented (cuBLAS/cuSOLVER would take minutes);
# uncached allocations so that memcheck sees the exact ends of buffers
sanitize() {
  local tool=$1 filter
  # SMOKE's list again: this runs in a child bash (bash -c), which does not inherit arrays
  local pytest=("$PY" -m pytest -q -p no:cacheprovider -rs tests/test_cuda_kernels.py tests/test_triton_lowdin.py
                tests/test_triton_blocks.py -k smoke)
  if ! command -v compute-sanitizer >/dev/null 2>&1; then echo "skipped: compute-sanitizer not installed"; return 0; fi
  if compute-sanitizer --help 2>&1 | grep -q -- "--kernel-name"; then filter=(--kernel-name kns=opt_fast)
  else filter=(--filter kns=opt_fast); fi
  local log="$WORK/sanitize-$tool.log"
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 OPT_FAST_REQUIRE_EXT=1 compute-sanitizer --tool "$tool" "${filter[@]}" \
    --error-exitcode 1 --print-limit 20 "${pytest[@]}" 2>&1 | tee "$log"   # (live: a timeout keeps what came)
  local rc=${PIPESTATUS[0]}
  local refusal="device not supported|error 999|not supported on this|unable to (find|load)|failed to initialize"
  if [ "$rc" -ne 0 ] && grep -qiE "$refusal" "$log"; then
    echo "skipped: this host refuses compute-sanitizer ${tool} (exit ${rc})"
    return 0
  fi
  return "$rc"
}
export -f sanitize
check="$COLLECT ${SMOKE[*]}"   # (the three tools run the same selection: checked once in a dry run)
for tool in memcheck racecheck synccheck; do
  gpu "sanitize_${tool}" sanitize.log 60 "$check" -- bash -c "sanitize $tool"
  check=-
done

# ---- the other gpu-marked tests -----------------------------------------------------------------------
xdist=()
"$PY" -c "import xdist" 2>/dev/null && xdist=(-n "${PYTEST_WORKERS:-8}")
REST=(tests -m gpu --ignore=tests/test_cuda_kernels.py --ignore=tests/test_triton_lowdin.py
      --ignore=tests/test_triton_blocks.py)
gpu gpu_rest tests.log 60 "$COLLECT ${REST[*]}" -- \
  env OPT_FAST_REQUIRE_EXT=1 "${PYTEST[@]}" ${xdist[@]+"${xdist[@]}"} "${REST[@]}"

# ---- benchmark ----------------------------------------------------------------------------------------
budget=$((TOTAL_S - SECONDS - 60))   # the report stops starting cases at its budget, then writes its files
report() {
  # shellcheck disable=SC2086
  "$PY" bench/report.py --device cuda --full --out "$WORK/bench" --budget "$budget" ${BENCH_ARGS:-} || return $?
  for f in "$WORK"/bench/*.md "$WORK"/bench/*.json; do
    [ -f "$f" ] && cp "$f" "$OUT/bench.${f##*.}"
  done
  return 0
}
bench_check="$PY bench/report.py --help > $WORK/help.txt && for o in --device --full --out --budget; do \
  grep -q -- \"\$o\" $WORK/help.txt || { echo \"bench/report.py lost option \$o\"; exit 1; }; done"
if [ "$DRY" = 1 ] || [ "$budget" -ge 60 ]; then
  export -f report
  export budget BENCH_ARGS=${BENCH_ARGS:-}
  gpu bench bench.log $((budget + 45)) "$bench_check" -- bash -c report
else
  say "--- bench: skipped (${budget} s of budget left)"
fi

# ---- the device tool brings back at most 8 plain files, no deeper than OUTDIR/a/b ---------------------
n=$(find "$OUT" -mindepth 1 | wc -l)
if [ "$n" -gt 8 ] || [ -n "$(find "$OUT" -mindepth 1 -type d)" ]; then
  say "--- OUTDIR holds ${n} entries or a folder: the device tool would not return them all"; status=1
fi
rm -rf "$WORK"
say "--- done after ${SECONDS} s: $([ "$status" -eq 0 ] && echo 'every stage passed' || echo 'FAILURES above')"
exit "$status"
