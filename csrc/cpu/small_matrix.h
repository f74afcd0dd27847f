// Shared pieces of the direct small-matrix CPU paths (householder_small.h, cayley_small.h,
// gram_schmidt_small.h): one tight loop nest per matrix, the batch split across threads by at::parallel_for.
//
// Why these paths exist: below d ~ 64 the ATen/LAPACK kernels spend most of their time in per-call overhead
// (allocations, dispatch, LAPACK workspace queries), not in the O(d³) arithmetic, which for one 27×27 matrix
// is a few µs. Each header measures its own threshold.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
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

// True if x[0..n) has no inf or NaN.
template <typename T>
inline bool all_finite(const T* x, int64_t n) {
  bool ok = true;
  for (int64_t i = 0; i < n; ++i) ok = ok && std::isfinite(x[i]);
  return ok;
}

// The products of the direct paths. Every inner loop is an axpy over a contiguous row (no dot products:
// without -ffast-math GCC does not vectorise reductions), four rank-1 terms per pass so that the output row is
// loaded and stored once per four multiply-adds: these loops are bound by loads and stores (Aᵀ B, 1 thread:
// 1.2-1.9x faster than one term per pass at d = 27, 2.4x at d = 64, where it reaches 14 GFlop/s).

// c[0:len] += x0 b[0] + x1 b[1] + x2 b[2] + x3 b[3], b[t] the rows b + t·ldb.
inline void axpy4(double* __restrict__ c, const double* __restrict__ b, int64_t ldb, double x0, double x1, double x2,
                  double x3, int64_t len) {
  const double *__restrict__ b0 = b, *__restrict__ b1 = b + ldb, *__restrict__ b2 = b + 2 * ldb,
                                    *__restrict__ b3 = b + 3 * ldb;
  for (int64_t j = 0; j < len; ++j) c[j] += x0 * b0[j] + x1 * b1[j] + x2 * b2[j] + x3 * b3[j];
}

inline void axpy(double* __restrict__ c, const double* __restrict__ b, double x, int64_t len) {
  for (int64_t j = 0; j < len; ++j) c[j] += x * b[j];
}

// C (n×p) += Aᵀ B for A (m×n) and B (m×p), all row-major: rank-1 updates over the rows of A and B; lower:
// only the lower triangle of C (j <= i) is formed.
inline void add_atb(double* __restrict__ C, const double* __restrict__ A, const double* __restrict__ B, int64_t m,
                    int64_t n, int64_t p, bool lower = false) {
  int64_t r = 0;
  for (; r + 4 <= m; r += 4) {
    const double* a = A + r * n;
    for (int64_t i = 0; i < n; ++i)
      axpy4(C + i * p, B + r * p, p, a[i], a[n + i], a[2 * n + i], a[3 * n + i], lower ? std::min(i + 1, p) : p);
  }
  for (; r < m; ++r)
    for (int64_t i = 0; i < n; ++i) axpy(C + i * p, B + r * p, A[r * n + i], lower ? std::min(i + 1, p) : p);
}

// C (m×p) += A B for A (m×n) and B (n×p), all row-major; strictly_lower: B is strictly lower triangular and
// stores zeros above (row k is read up to column k + 3 at most, not to p).
inline void add_ab(double* __restrict__ C, const double* __restrict__ A, const double* __restrict__ B, int64_t m,
                   int64_t n, int64_t p, bool strictly_lower = false) {
  for (int64_t i = 0; i < m; ++i) {
    double* c = C + i * p;
    const double* a = A + i * n;
    int64_t k = 0;
    for (; k + 4 <= n; k += 4)
      axpy4(c, B + k * p, p, a[k], a[k + 1], a[k + 2], a[k + 3], strictly_lower ? std::min(k + 3, p) : p);
    for (; k < n; ++k) axpy(c, B + k * p, a[k], strictly_lower ? std::min(k, p) : p);
  }
}

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
