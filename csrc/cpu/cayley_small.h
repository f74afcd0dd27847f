// Cayley transform for small matrices, one Gauss-Jordan inverse per matrix (included by cayley.cpp).
//
// Why: at d = 27 the LAPACK path spends ~130 µs per matrix in ATen calls (linalg_inv_ex, eye, copies) around
// ~10 µs of arithmetic, and loops over the batch one matrix at a time. Here Q = 2 (I - S)⁻¹ - I per matrix:
// I - S is inverted in place by Gauss-Jordan elimination with partial pivoting (d³ multiply-adds, the same
// as getrf + getri), in double whatever the input dtype, and the batch is split across threads.
#pragma once

#include "small_matrix.h"

#include <atomic>
#include <cmath>
#include <cstdint>
#include <utility>

namespace opt_fast {
namespace small {

// When to take this path: d <= 64, any batch. Measured 2026-11-23 (AMD EPYC, 2 cores shared with other jobs,
// float32, the kernels alone (below autograd), medians of interleaved repeats, range over 10 repeats in two
// runs; old = the LAPACK path below, solve = torch.linalg.solve(I - S, I + S)):
//                          1 thread                                      2 threads
//   d = 27, batch 1:     12-20 µs   (old 91-153 µs, solve 45-99 µs)      13-21 µs   (old 91-160, solve 55-112)
//   d = 32, batch 128:   1.5-2.7 ms (old 6.7-13.5 ms, solve 4.1-6.6)     1.6-2.7 ms (old 7.5-13.1, solve 3.6-5.5)
//   d = 64, batch 1:     82-154 µs  (old 205-338 µs, solve 189-348)      77-152 µs  (old 178-255, solve 134-217)
//   d = 64, batch 64:    5.9-8.1 ms (old 11.3-21.0 ms, solve 11.4-17.8)  6.1-8.9 ms (old 10.2-15.1, solve 7.4-9.9)
//   above, batch 1:      d = 80: 419-451 µs against old 331-386 µs; d = 128: 1.0-1.6 ms against 0.92-0.96 ms.
// (The 2-thread column is one thread's work: until setup.py compiled with -fopenmp, at::parallel_for in
// this extension ran serially. Now the batch is split across threads: [2048, 32, 32] uses 2.0 cores of 2.)
constexpr int64_t kCayleyD = 64;
inline bool use_for_cayley(int64_t d) { return d <= kCayleyD; }

// Row of the pivot in column k of the d×d row-major A: the largest |A[r, k]| for r >= k. A NaN wins at once,
// so that NaN propagates through the elimination instead of being passed over for a zero pivot (which would
// report a NaN input as a singular matrix; with `>` alone NaN never compares greater).
inline int64_t pivot_row(const double* A, int64_t d, int64_t k) {
  int64_t p = k;
  double best = -1;
  for (int64_t r = k; r < d; ++r) {
    const double a = std::abs(A[r * d + k]);
    if (std::isnan(a)) return r;
    if (a > best) best = a, p = r;
  }
  return p;
}

// A (d×d row-major) <- A⁻¹ in place by Gauss-Jordan with partial pivoting; perm: d scratch entries. False
// for an exactly zero pivot, LAPACK getrf's info > 0 (A is then left half-eliminated). Zeros are never
// skipped, so a NaN or inf anywhere in A reaches every entry it touches, as in LAPACK.
inline bool invert_in_place(double* __restrict__ A, int64_t d, int64_t* __restrict__ perm) {
  for (int64_t k = 0; k < d; ++k) {
    const int64_t p = pivot_row(A, d, k);
    perm[k] = p;
    double* __restrict__ rk = A + k * d;
    if (p != k) std::swap_ranges(rk, rk + d, A + p * d);
    const double piv = rk[k];
    if (piv == 0) return false;
    // row k /= pivot, with column k becoming that of the inverse (1 / pivot)
    const double inv = 1 / piv;
    rk[k] = 1;
    for (int64_t c = 0; c < d; ++c) rk[c] *= inv;
    for (int64_t r = 0; r < d; ++r) {
      if (r == k) continue;
      double* __restrict__ rr = A + r * d;
      const double f = rr[k];
      rr[k] = 0;
      for (int64_t c = 0; c < d; ++c) rr[c] -= f * rk[c];
    }
  }
  // The row swaps of the elimination become column swaps of the inverse, undone in reverse order.
  for (int64_t k = d - 1; k >= 0; --k) {
    if (perm[k] == k) continue;
    for (int64_t r = 0; r < d; ++r) std::swap(A[r * d + k], A[r * d + perm[k]]);
  }
  return true;
}

// Q [B, d, d] (contiguous) = 2 (I - S)⁻¹ - I for each matrix of S3 [B, d, d] (any strides). False if some
// I - S has a zero pivot (the caller raises).
template <typename T>
bool cayley(const at::Tensor& Q, const at::Tensor& S3) {
  const int64_t B = S3.size(0), d = S3.size(1);
  const Batch3<T> S(S3);
  T* Qp = Q.data_ptr<T>();
  TORCH_INTERNAL_ASSERT(d <= kCayleyD);
  std::atomic<bool> singular{false};
  for_each(B, 2 * d * d * d, d * d, [&](int64_t b, double* A) {
    int64_t perm[kCayleyD];
    S.load(b, d, d, A);
    for (int64_t i = 0; i < d * d; ++i) A[i] = -A[i];
    for (int64_t i = 0; i < d; ++i) A[i * d + i] += 1;
    if (!invert_in_place(A, d, perm)) {
      singular = true;
      return;
    }
    T* out = Qp + b * d * d;
    for (int64_t i = 0; i < d * d; ++i) out[i] = static_cast<T>(2 * A[i]);
    for (int64_t i = 0; i < d; ++i) out[i * d + i] = static_cast<T>(2 * A[i * d + i] - 1);
  });
  return !singular;
}

}  // namespace small
}  // namespace opt_fast
