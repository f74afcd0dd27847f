#!/usr/bin/env bash
# Compile-check the CUDA sources on machines without a GPU or a CUDA build of torch (CI stage 5):
#   1. the pure-CUDA kernels (csrc/cuda/*_kernels.cu: no torch headers) with nvcc for sm_80 and sm_90;
#   2. the torch glue (csrc/cuda/*.cpp: ATen, c10/cuda, TORCH_LIBRARY_IMPL) with the host compiler,
#      -fsyntax-only, against the installed torch's headers. A CPU-only torch wheel ships ATen and c10/cuda
#      headers but not the generated c10/cuda/impl/cuda_cmake_macros.h (it only defines
#      C10_CUDA_BUILD_SHARED_LIBS, for Windows exports), so C10_CUDA_NO_CMAKE_CONFIGURE_FILE skips it; the CUDA
#      runtime headers come from the toolkit of nvcc. Linking against libtorch_cuda is not checked here.
# Warnings in our own files are errors (torch's and CUDA's headers are -isystem).
# Environment: NVCC (default: nvcc on PATH), PY (a Python with torch; default .venv/bin/python, else python3),
# CXX (default c++).
set -euo pipefail
cd "$(dirname "$0")/.."
NVCC=${NVCC:-$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)}
if [ ! -x "$NVCC" ]; then echo "nvcc not found: cannot check the CUDA sources" >&2; exit 1; fi
out=$(mktemp -d); trap 'rm -rf "$out"' EXIT
shopt -s nullglob

kernels=(csrc/cuda/*_kernels.cu)
for f in "${kernels[@]}"; do
  echo "nvcc sm_80+sm_90: $f"
  "$NVCC" -std=c++17 -O3 -Icsrc -c "$f" -o "$out/$(basename "$f").o" \
    -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90 \
    -Werror all-warnings -Xcompiler -Wall,-Wextra,-Werror
done
echo "compiled ${#kernels[@]} pure-CUDA source(s) for sm_80 and sm_90"

glue=(csrc/cuda/*.cpp)
if [ ${#glue[@]} -gt 0 ]; then
  PY=${PY:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
  if ! torch_inc=$("$PY" -c "import torch.utils.cpp_extension as c; print(' '.join(c.include_paths()))"); then
    echo "cannot find torch's headers with $PY (set PY to a Python with torch): glue not checked" >&2; exit 1
  fi
  # the toolkit's headers (nvcc may be a wrapper script elsewhere, e.g. /usr/local/bin/nvcc)
  cuda_inc=
  for d in "${CUDA_HOME:-}/include" "$(dirname "$(readlink -f "$NVCC")")/../include" /usr/local/cuda/include \
           "$(dirname "$(readlink -f "$NVCC")")/../targets/x86_64-linux/include"; do
    if [ -f "$d/cuda_runtime_api.h" ]; then cuda_inc=$d; break; fi
  done
  if [ -z "$cuda_inc" ]; then echo "cuda_runtime_api.h not found (set CUDA_HOME): glue not checked" >&2; exit 1; fi
  isys=()
  for d in $torch_inc "$cuda_inc"; do isys+=(-isystem "$d"); done
  for f in "${glue[@]}"; do
    echo "${CXX:-c++} -fsyntax-only (torch glue): $f"
    "${CXX:-c++}" -std=c++17 -fsyntax-only -Wall -Wextra -Werror -Icsrc "${isys[@]}" \
      -DC10_CUDA_NO_CMAKE_CONFIGURE_FILE -DOPT_FAST_WITH_CUDA "$f"
  done
  echo "syntax-checked ${#glue[@]} torch glue source(s) against $("$PY" -c 'import torch; print("torch", torch.__version__)')"
fi
