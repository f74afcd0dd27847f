// Shared pieces of the direct small-matrix CPU paths (householder_small.h, cayley_small.h): one tight loop nest
// per matrix, the batch split across threads by at::parallel_for.
//
// Why these paths exist: below d ~ 64 the ATen/LAPACK kernels spend most of their time in per-call overhead
// (allocations, dispatch, LAPACK workspace queries), not in the O(d³) arithmetic, which for one 27×27 matrix
// is a few µs. Each header measures its own threshold.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace opt_fast {
namespace small {

// Grain of at::parallel_for over matrices: about 64k flops per task.
inline int64_t grain(int64_t flops_per_matrix) { return std::max<int64_t>(1, 65536 / (flops_per_matrix + 1)); }

// Read access to the matrices of a [B, rows, cols] tensor of any strides (transposed and sliced inputs are
// read in place: no .contiguous() copy).
template <typename T>
struct Batch3 {
  const T* p;
  int64_t sb, sr, sc;
  explicit Batch3(const at::Tensor& t3)
      : p(t3.const_data_ptr<T>()), sb(t3.stride(0)), sr(t3.stride(1)), sc(t3.stride(2)) {}

  // dst (row-major rows×cols, double) = matrix b. The working copy is double whatever T: float32 inputs are
  // rounded once, on the way out.
  void load(int64_t b, int64_t rows, int64_t cols, double* __restrict__ dst) const {
    const T* src = p + b * sb;
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t c = 0; c < cols; ++c) dst[r * cols + c] = static_cast<double>(src[r * sr + c * sc]);
  }
};

// at::parallel_for over the B matrices with grain(flops_per_matrix); f(b, buf) with `scratch` entries of S
// in buf, allocated once per task rather than per matrix.
template <typename S = double, class F>
void for_each(int64_t B, int64_t flops_per_matrix, int64_t scratch, const F& f) {
  at::parallel_for(0, B, grain(flops_per_matrix), [&](int64_t b0, int64_t b1) {
    std::vector<S> buf(scratch);
    for (int64_t b = b0; b < b1; ++b) f(b, buf.data());
  });
}

}  // namespace small
}  // namespace opt_fast
