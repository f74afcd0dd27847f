// Small device helpers shared by the pure-CUDA kernel files (no torch headers).
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

namespace opt_fast {
namespace cuda {

constexpr int kWarp = 32;

// Grid size for a grid-stride loop over `total` items with `threads` per block (total > 0).
inline int grid_for(int64_t total, int threads) {
  const int64_t blocks = (total + threads - 1) / threads;
  return static_cast<int>(std::min<int64_t>(blocks, int64_t(1) << 20));
}

struct SumOp {
  __device__ __forceinline__ double operator()(double a, double b) const { return a + b; }
};
struct MaxOp {  // fmax: a NaN is skipped
  __device__ __forceinline__ double operator()(double a, double b) const { return fmax(a, b); }
};

template <class Op>
__device__ __forceinline__ double warp_reduce(double v, Op op) {
  for (int off = kWarp / 2; off > 0; off /= 2) v = op(v, __shfl_down_sync(0xffffffffu, v, off));
  return v;
}

__device__ __forceinline__ double warp_sum(double v) { return warp_reduce(v, SumOp{}); }

// op-reduction of v over the block (identity: op's neutral element), returned to every thread. blockDim.x
// must be a multiple of 32 (<= 1024) and every thread must call it (it synchronises). scratch: >= 33 doubles
// of shared memory.
template <class Op>
__device__ __forceinline__ double block_reduce(double v, double* scratch, double identity, Op op) {
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp, nwarps = blockDim.x / kWarp;
  v = warp_reduce(v, op);
  __syncthreads();  // scratch may still be read by a previous call
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  if (warp == 0) {
    double s = lane < nwarps ? scratch[lane] : identity;
    s = warp_reduce(s, op);
    if (lane == 0) scratch[32] = s;
  }
  __syncthreads();
  return scratch[32];
}

// Sum / maximum of v over the block, with the contract of block_reduce.
__device__ __forceinline__ double block_sum(double v, double* scratch) { return block_reduce(v, scratch, 0.0, SumOp{}); }
__device__ __forceinline__ double block_max(double v, double* scratch) {
  return block_reduce(v, scratch, -HUGE_VAL, MaxOp{});
}

}  // namespace cuda
}  // namespace opt_fast
