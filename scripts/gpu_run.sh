#!/usr/bin/env bash
# One call on a GPU machine (torch 2.11+cu130, triton 3.6, Python 3.12, no internet): build opt_fast with
# its CUDA kernels, run the tests (GPU markers included), the benchmark smoke test when pytest-benchmark is
# installed, and the full benchmark report on CUDA. Every stage runs even if an earlier one failed (except
# that nothing runs after a failed build but the report of the failure); logs and results go to OUTDIR.
#
#   scripts/gpu_run.sh OUTDIR
#
# Environment: PYTHON (default python3, the system Python: no venv), TORCH_CUDA_ARCH_LIST (default: the local
# GPU's compute capability from nvidia-smi, else 9.0), MAX_JOBS (default 16), SANITIZE (default 1: run the
# CUDA smoke test under compute-sanitizer memcheck and racecheck when compute-sanitizer is installed),
# LOWDIN_BUDGET_S (the lowdin report's cap, default 150 s), TOTAL_S (the wall time this script should fit in, default 570 s: the report gets
# what the earlier stages left, and covers the most important shapes first), BENCH_BUDGET_S (the report's
# wall-time cap in seconds instead; 0 = no cap), BENCH_ARGS (extra arguments for bench/report.py).
# Exit status: 0 if every stage passed, else 1; OUTDIR/stages.tsv lists each stage's exit code and time.
set -uo pipefail

OUT=${1:?usage: scripts/gpu_run.sh OUTDIR}
mkdir -p "$OUT" || exit 2
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.." || exit 2
PY=${PYTHON:-python3}
# build for the GPU that is here (no visible GPU at build time would otherwise give an empty arch list)
if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then
  TORCH_CUDA_ARCH_LIST=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n 1 | tr -d ' ')
  TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
fi
export TORCH_CUDA_ARCH_LIST
export MAX_JOBS=${MAX_JOBS:-16}
TOTAL_S=${TOTAL_S:-570}

status=0
: > "$OUT/summary.log"
printf 'stage\texit\tseconds\n' > "$OUT/stages.tsv"

# stage NAME CMD...: run CMD, tee its output into OUTDIR/NAME.log, record its exit code
stage() {
  local name=$1; shift
  local start=$SECONDS
  echo "=== ${name}: $*" | tee -a "$OUT/summary.log"
  "$@" 2>&1 | tee "$OUT/${name}.log"
  local rc=${PIPESTATUS[0]}
  printf '%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - start))" >> "$OUT/stages.tsv"
  echo "=== ${name}: exit ${rc} after $((SECONDS - start)) s" | tee -a "$OUT/summary.log"
  [ "$rc" -eq 0 ] || status=1
  return "$rc"
}

stage env bash -c "nvidia-smi; $PY -c 'import sys, torch; print(sys.version); print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"available\", torch.cuda.is_available()); print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else \"no GPU\")'; $PY -c 'import triton; print(\"triton\", triton.__version__)'; git rev-parse HEAD; git status --short"

# --no-deps --no-index: everything is preinstalled and there is no internet; pip must not try to fetch
# OPT_FAST_FORCE_CUDA=1: a build that silently leaves out the CUDA kernels is a failed build here
if stage build env OPT_FAST_FORCE_CUDA=1 "$PY" -m pip install --no-build-isolation --no-deps --no-index -e .; then
  built=1
else
  built=0
fi

if [ "$built" -eq 1 ]; then
  # which kernel serves each op; fails if the C++/CUDA extension does not load
  stage backends env OPT_FAST_REQUIRE_EXT=1 "$PY" -c "import opt_fast; opt_fast.backend_report()"
  # the CUDA kernels first (fast, and the part no CPU machine can test), then everything else, gpu markers
  # included; OPT_FAST_REQUIRE_EXT=1 makes a missing extension fail loudly
  stage cuda_tests env OPT_FAST_REQUIRE_EXT=1 "$PY" -m pytest tests/test_cuda_kernels.py -q -p no:cacheprovider -rs
  if [ "${SANITIZE:-1}" = "1" ] && command -v compute-sanitizer >/dev/null 2>&1; then
    # every CUDA kernel once, uncached allocations so that memcheck sees exact buffer ends
    for tool in memcheck racecheck; do
      stage "sanitize_${tool}" env PYTORCH_NO_CUDA_MEMORY_CACHING=1 OPT_FAST_REQUIRE_EXT=1 compute-sanitizer \
        --tool "$tool" --error-exitcode 1 "$PY" -m pytest tests/test_cuda_kernels.py -q -p no:cacheprovider -k smoke
    done
  fi
  # the Triton launchers on CUDA (interp- and gpu-marked tests; TRITON_INTERPRET must be unset here)
  stage triton_lowdin env -u TRITON_INTERPRET "$PY" -m pytest tests/test_triton_lowdin.py -q -p no:cacheprovider -rs
  stage tests env OPT_FAST_REQUIRE_EXT=1 "$PY" -m pytest tests -q -p no:cacheprovider -rs \
    --ignore=tests/test_cuda_kernels.py --ignore=tests/test_triton_lowdin.py
  # lowdin's grid (d × batch, cold / warm / reuse, fwd and fwd+bwd) first, with its own share of the time
  stage report_lowdin "$PY" bench/report.py --device cuda --full --ops lowdin --no-e2e --out "$OUT/lowdin" \
    --budget "${LOWDIN_BUDGET_S:-150}"
  if "$PY" -c "import pytest_benchmark" 2>/dev/null; then
    stage bench_smoke "$PY" -m pytest bench --benchmark-disable -q -p no:cacheprovider --bench-device cuda
  else
    echo "=== bench_smoke: skipped (pytest-benchmark is not installed; the report below does not need it)" \
      | tee -a "$OUT/summary.log"
    printf 'bench_smoke\tskipped\t0\n' >> "$OUT/stages.tsv"
  fi
  budget=${BENCH_BUDGET_S:-$(( TOTAL_S - SECONDS - 30 ))}
  [ "$budget" -lt 60 ] 2>/dev/null && budget=60
  budget_args=()
  [ "$budget" != "0" ] && budget_args=(--budget "$budget")
  # shellcheck disable=SC2086
  stage report "$PY" bench/report.py --device cuda --full --out "$OUT" "${budget_args[@]}" ${BENCH_ARGS:-}
else
  echo "=== build failed: tests and benchmarks not run (see $OUT/build.log)" | tee -a "$OUT/summary.log"
fi

echo "=== stages (exit codes):" | tee -a "$OUT/summary.log"
column -t -s $'\t' "$OUT/stages.tsv" 2>/dev/null | tee -a "$OUT/summary.log" || cat "$OUT/stages.tsv"
exit "$status"
