#!/usr/bin/env bash
# Compile the pure-CUDA kernel sources (csrc/cuda/*_kernels.cu: no torch headers) with nvcc for sm_80
# and sm_90, so that a CUDA compile error fails CI on machines without a GPU or a CUDA build of torch.
# The torch glue (csrc/cuda/*.cpp / *_glue.cu) is compiled only by `pip install` where torch has CUDA.
set -euo pipefail
cd "$(dirname "$0")/.."
NVCC=${NVCC:-$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)}
if [ ! -x "$NVCC" ]; then echo "nvcc not found: cannot check the CUDA sources" >&2; exit 1; fi
out=$(mktemp -d); trap 'rm -rf "$out"' EXIT
shopt -s nullglob
files=(csrc/cuda/*_kernels.cu)
if [ ${#files[@]} -eq 0 ]; then echo "no pure-CUDA sources (csrc/cuda/*_kernels.cu)"; exit 0; fi
for f in "${files[@]}"; do
  echo "nvcc sm_80+sm_90: $f"
  "$NVCC" -std=c++17 -O3 -Icsrc -c "$f" -o "$out/$(basename "$f").o" \
    -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90
done
echo "compiled ${#files[@]} CUDA source(s) for sm_80 and sm_90"
