#!/usr/bin/env bash
# Compile every GPU kernel of opt_fast for sm_80 (A100) and sm_90 (H100) on a machine without a GPU: the CI
# stage "GPU compile check" of scripts/run_tests.sh. Prints one line per kernel × config × target and exits
# non-zero if anything fails.
#
# 1. Triton (python -m opt_fast.triton_kernels.aot; how it works: triton_kernels/aot.py). A stub Triton
#    driver reports the target and its limits; the real launchers run on CPU tensors, so each kernel they
#    launch is compiled for the target with the block sizes, warps, stages and dtypes they pick (Triton's
#    bundled ptxas). Fails on a compile error, on shared memory over the target's opt-in limit (sm_80:
#    166,912 B, sm_90: 232,448 B per block), on register spills (local memory in the cubin: what a GPU
#    reports as Triton's n_spills), and on a launch grid over CUDA's limits.
#    Adding a Triton kernel takes a few lines in triton_kernels/aot_cases.py:
#        register_kernel(my_module._my_kernel, "OUT")          # the kernel and the arguments it writes
#        @case("my_op", sizes=D_RANGE, dtypes=(F32, F64))       # called per size × dtype × target
#        def _my_op(d, dtype):
#            my_module.my_op(torch.randn(2, d, d, dtype=dtype))  # the launcher, as a user calls it
# 2. CUDA C++: the pure-CUDA kernels (csrc/cuda/*_kernels.cu, no torch headers) with nvcc for sm_80 and
#    sm_90, warnings as errors, ptxas -v read back (registers, stack, spills, static shared memory per
#    kernel and target; a spill fails); the torch glue (csrc/cuda/*.cpp: ATen, c10/cuda,
#    TORCH_LIBRARY_IMPL) with the host compiler, -fsyntax-only, against the installed torch's headers. A
#    CPU-only torch wheel ships ATen and c10/cuda headers but not the generated
#    c10/cuda/impl/cuda_cmake_macros.h (it only defines C10_CUDA_BUILD_SHARED_LIBS, for Windows exports),
#    so C10_CUDA_NO_CMAKE_CONFIGURE_FILE skips it; the CUDA runtime headers come from nvcc's toolkit.
#    Linking against libtorch_cuda is not checked here.
#
# Environment: PY (a Python with torch and triton; default .venv/bin/python, else python3), NVCC (default:
# nvcc on PATH), CXX (default c++), TRITON_CACHE_DIR (a warm Triton cache makes a rerun take seconds),
# SKIP_TRITON=1 / SKIP_CUDA=1 (run one half only).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
status=0

if [ "${SKIP_TRITON:-0}" != 1 ]; then
  echo "--- Triton kernels: ahead-of-time compile for sm_80 and sm_90 (stub driver)"
  start=$SECONDS
  env -u TRITON_INTERPRET "$PY" -m opt_fast.triton_kernels.aot || status=1
  echo "--- Triton kernels: $((SECONDS - start)) s"
fi

[ "${SKIP_CUDA:-0}" = 1 ] && exit "$status"
echo "--- CUDA sources: nvcc sm_80 + sm_90, torch glue syntax check"
start=$SECONDS
NVCC=${NVCC:-$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)}
if [ ! -x "$NVCC" ]; then echo "FAILED: nvcc not found: cannot check the CUDA sources" >&2; exit 1; fi
out=$(mktemp -d); trap 'rm -rf "$out"' EXIT
shopt -s nullglob
nvcc_bin=$(dirname "$(readlink -f "$NVCC")")
filt=$(command -v "$nvcc_bin/cu++filt" || command -v c++filt || echo cat)

# one line per kernel × target from ptxas -v; spills fail
ptxas_report() {
  "$PY" - "$1" "$2" "$filt" <<'EOF'
import re, subprocess, sys
src, log, filt = sys.argv[1:4]
text = open(log).read()
rows, cur, bad = [], None, 0
for line in text.splitlines():
    m = re.search(r"Compiling entry function '(\S+)' for '(sm_\d+)'", line)
    if m:
        cur = {"name": m.group(1), "arch": m.group(2), "stack": 0, "spill": 0, "regs": 0, "smem": 0}
        rows.append(cur)
        continue
    if cur is None:
        continue
    m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
    if m:
        cur["stack"], cur["spill"] = int(m.group(1)), int(m.group(2)) + int(m.group(3))
    m = re.search(r"Used (\d+) registers", line)
    if m:
        cur["regs"] = int(m.group(1))
        s = re.search(r"(\d+) bytes smem", line)
        cur["smem"] = int(s.group(1)) if s else 0
names = [r["name"] for r in rows]
if names and filt != "cat":
    names = subprocess.run([filt], input="\n".join(names), capture_output=True, text=True).stdout.split("\n")
for r, name in zip(rows, names):
    name = re.sub(r"opt_fast::cuda::(\(anonymous namespace\)::)?", "", name)
    ok = r["spill"] == 0
    bad += not ok
    print(f"{'ok' if ok else 'FAIL':4} {r['arch']} {name} regs={r['regs']} stack={r['stack']} spill={r['spill']} "
          f"static_smem={r['smem']} [{src}]" + ("" if ok else "  <- register spills"))
if not rows:
    print(f"FAIL no ptxas report for {src}")
sys.exit(1 if bad or not rows else 0)
EOF
}

kernels=(csrc/cuda/*_kernels.cu)
for f in "${kernels[@]}"; do
  log="$out/$(basename "$f").log"
  if ! "$NVCC" -std=c++17 -O3 -Icsrc -c "$f" -o "$out/$(basename "$f").o" \
      -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90 -Xptxas -v \
      -Werror all-warnings -Xcompiler -Wall,-Wextra,-Werror > "$log" 2>&1; then
    cat "$log"; echo "FAILED: nvcc $f"; status=1; continue
  fi
  ptxas_report "$f" "$log" || status=1
done
echo "compiled ${#kernels[@]} pure-CUDA source(s) for sm_80 and sm_90"

glue=(csrc/cuda/*.cpp)
if [ ${#glue[@]} -gt 0 ]; then
  if ! torch_inc=$("$PY" -c "import torch.utils.cpp_extension as c; print(' '.join(c.include_paths()))"); then
    echo "FAILED: cannot find torch's headers with $PY (set PY to a Python with torch)" >&2; exit 1
  fi
  cuda_inc=
  for d in "${CUDA_HOME:-}/include" "$nvcc_bin/../include" /usr/local/cuda/include \
           "$nvcc_bin/../targets/x86_64-linux/include"; do
    if [ -f "$d/cuda_runtime_api.h" ]; then cuda_inc=$d; break; fi
  done
  if [ -z "$cuda_inc" ]; then echo "FAILED: cuda_runtime_api.h not found (set CUDA_HOME)" >&2; exit 1; fi
  isys=()
  for d in $torch_inc "$cuda_inc"; do isys+=(-isystem "$d"); done
  for f in "${glue[@]}"; do
    if "${CXX:-c++}" -std=c++17 -fsyntax-only -Wall -Wextra -Werror -Icsrc "${isys[@]}" \
        -DC10_CUDA_NO_CMAKE_CONFIGURE_FILE -DOPT_FAST_WITH_CUDA "$f"; then
      echo "ok   host ${f#csrc/cuda/} (torch glue, -fsyntax-only)"
    else
      echo "FAILED: torch glue $f"; status=1
    fi
  done
  echo "syntax-checked ${#glue[@]} torch glue source(s) against $("$PY" -c 'import torch; print("torch", torch.__version__)')"
fi
echo "--- CUDA sources: $((SECONDS - start)) s"
[ "$status" -eq 0 ] && echo "GPU compile check: passed" || echo "GPU compile check: FAILED"
exit "$status"
