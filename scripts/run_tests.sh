#!/usr/bin/env bash
# The test job (`make test`, CI): each stage in its own process, all stages run, exit non-zero if any
# failed. pytest's exit code 5 (no tests collected) counts as a failure: a stage that runs nothing is a
# broken stage, not a green one. Ends with one line summing every stage's counts.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
log=$(mktemp)
trap 'rm -f "$log"' EXIT
status=0
passed=0; failed=0; skipped=0; xfailed=0; errors=0

stage() {
  local name=$1; shift
  echo "=== ${name}"
  local start=$SECONDS
  "$@" 2>&1 | tee "$log"
  local rc=${PIPESTATUS[0]}
  if [ "$rc" -eq 5 ]; then echo "!!! ${name}: no tests collected"; fi
  if [ "$rc" -ne 0 ]; then echo "!!! ${name}: FAILED (exit ${rc})"; status=1; fi
  local summary
  summary=$(grep -E '^[=]* ?[0-9]+ (passed|failed|error|skipped)' "$log" | tail -n 1)
  for kind in passed failed skipped xfailed; do
    local n; n=$(echo "$summary" | grep -oE "[0-9]+ ${kind}" | grep -oE '[0-9]+' || true)
    [ -n "$n" ] && eval "${kind}=\$(( ${kind} + n ))"
  done
  local ne; ne=$(echo "$summary" | grep -oE '[0-9]+ errors?' | grep -oE '[0-9]+' || true)
  [ -n "$ne" ] && errors=$((errors + ne))
  echo "=== ${name}: $((SECONDS - start)) s"
}

PYTEST="$PY -m pytest -q -p no:cacheprovider"

# 1. everything that runs on a CPU, with the C++ extension required to load
stage "tests (C++ extension required)" env OPT_FAST_REQUIRE_EXT=1 $PYTEST tests -m "not interp and not gpu"

# 2. Triton launchers under the interpreter, in their own process (the variable must be set before import)
if ls tests/test_triton_*.py >/dev/null 2>&1; then
  stage "triton kernels (TRITON_INTERPRET=1)" env TRITON_INTERPRET=1 $PYTEST tests -m "interp and not gpu"
fi

# 3. the op tests again on the pure-PyTorch references
stage "op tests (references only, OPT_FAST_DISABLE_EXT=1)" env OPT_FAST_DISABLE_EXT=1 $PYTEST tests -m "not interp and not gpu and not slow" -k "ops or fallback"

# 4. benchmarks as a smoke test (each benchmark runs once)
stage "benchmark smoke (pytest bench --benchmark-disable)" $PYTEST bench --benchmark-disable

# 5. every GPU kernel compiles for sm_80 and sm_90 within the targets' limits (Triton ahead of time through
#    the launchers, nvcc for the .cu files; no GPU or CUDA torch needed)
echo "=== GPU compile check (scripts/check_gpu_compile.sh)"
start=$SECONDS
PY=$PY bash scripts/check_gpu_compile.sh || { echo "!!! GPU compile check: FAILED"; status=1; }
echo "=== GPU compile check: $((SECONDS - start)) s"

# 6. the one-call GPU script, dry run: every stage that needs no GPU runs, the others are listed
echo "=== GPU script dry run (scripts/gpu_run.sh --dry-run)"
start=$SECONDS
dry=$(mktemp -d)
PYTHON=$PY bash scripts/gpu_run.sh --dry-run "$dry" || { echo "!!! GPU script dry run: FAILED"; status=1; }
rm -rf "$dry"
echo "=== GPU script dry run: $((SECONDS - start)) s"

echo
echo "all stages: ${passed} passed, ${failed} failed, ${skipped} skipped, ${xfailed} xfailed, ${errors} errors"
[ "$status" -eq 0 ] && [ "$((passed))" -gt 0 ] || status=1
echo "${passed} passed, $((failed + errors)) failed"
exit $status
