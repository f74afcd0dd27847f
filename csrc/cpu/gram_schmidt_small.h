// Gram-Schmidt (Q of P = QR, diag(R) > 0) for small matrices, forward and backward, one matrix at a time in
// double (included by gram_schmidt.cpp).
//
// Why: at d = 27 the LAPACK path costs ~120-160 µs, nearly all of it ATen/LAPACK per-call overhead around
// ~10 µs of arithmetic. Here each matrix is copied once into a double working buffer (float32 inputs are
// rounded once, at the end: more accurate than a float32 QR), factored by unblocked Householder QR (LAPACK
// dgeqr2/dlarfg semantics: tau = 0 for a column already zero below the diagonal, so R_jj = 0 for a zero
// column), Q formed explicitly by orgqr (householder_small.h), and the sign fix fused into the store.
// The backward is the adjoint of gram_schmidt.cpp (the same formulas, see there) as direct loops.
#pragma once

#include "householder_small.h"
#include "small_matrix.h"

#include <atomic>
#include <cmath>
#include <cstdint>
#include <limits>

namespace opt_fast {
namespace small {

// When to take these paths: by the number of entries m·n, so that tall P count by their size (the loops run
// along rows of n entries: skinny P pay more per flop), up to a 64×64 matrix (its double copy, 32 KB, fills
// L1), forward and backward alike (the backward only while batch·m·n² <= 2e5: beyond that gram_schmidt.cpp's
// batched BLAS calls are faster, measured there). Measured 2026-11-23 (AMD EPYC, 2 cores shared with other
// jobs, float32, the kernels alone, medians of interleaved repeats, ranges over 5-10 repeats; old = the LAPACK path of
// gram_schmidt.cpp, qr = torch.linalg.qr + sign fix), 1 thread:
//   forward   d = 27, batch 1:    15-26 µs   (old 64-104 µs, qr 56-112 µs)
//             d = 32, batch 128:  2.0-3.7 ms (old 6.2-12.2 ms, qr 3.1-5.3 ms)
//             d = 64, batch 1:    129-220 µs (old 153-233 µs, qr 134-303 µs)
//             d = 64, batch 64:   7.0-12.6 ms (old 9.7-17.3 ms, qr 8.7-14.0 ms)
//             tall 100×8: 27-30 µs (old 79-113); 400×8: 74-79 µs (old 93-104)
//             above: 128×64 524-537 µs (old 322-337); 201×27 204-233 (old 158-209); 1000×8 167-181 (old 130-145)
//   backward  d = 27, batch 1:    24-43 µs   (old 109-157 µs)
//             d = 32, batch 128:  3.2-4.1 ms (old 7.3-13.4 ms)
//             d = 64, batch 1:    156-217 µs (old 165-279 µs); batch 64: 11.6-13.8 ms (old 8.8-15.1: a tie)
//             tall 128×16: 44-73 µs (old 84-157); 100×40: 157-209 (old 164-200)
//             above: 80×80 274-380 µs (old 230-317)
// "2 threads" (at::parallel_for then ran serially: no -fopenmp until 2026-12-07): forward d = 27 14-30 µs,
// batch 128 of d = 32 1.8-3.6 ms (qr 2.9-5.2 ms); backward d = 27 20-26 µs (old 130-146), batch 128 of
// d = 32 2.4-3.4 ms (old 7.9-14.1).
constexpr int64_t kMaxEntries = 64 * 64;
inline bool use_for_gram_schmidt(int64_t m, int64_t n) { return m * n <= kMaxEntries; }

// ‖x‖₂ of x[0], x[s], ..., x[(len-1)s], safe from overflow and underflow of the squares (float64 inputs near
// 1e±200: LAPACK's dnrm2 is safe too). The plain sum is used when it is in range; a NaN in it is returned as
// is (NaN propagates), an inf (overflow or an inf entry) or a tiny sum (underflow) is redone scaled by max|x|.
inline double norm2(const double* x, int64_t len, int64_t s) {
  double ss = 0;
  for (int64_t i = 0; i < len; ++i) ss += x[i * s] * x[i * s];
  if ((ss >= 1e-280 && ss <= 1e280) || std::isnan(ss)) return std::sqrt(ss);
  double big = 0;
  for (int64_t i = 0; i < len; ++i) big = std::max(big, std::abs(x[i * s]));
  if (big == 0 || std::isinf(big)) return big;
  ss = 0;
  for (int64_t i = 0; i < len; ++i) ss += (x[i * s] / big) * (x[i * s] / big);
  return big * std::sqrt(ss);
}

// Householder QR in place of A (m×n row-major, m >= n): R in the upper triangle, v_j below the diagonal
// (v_j[j] = 1 implied), tau [n]; v (m) and w (n) are scratch. LAPACK dgeqr2 with dlarfg's conventions:
// beta = -sign(alpha) ‖x‖, and tau = 0 (the identity, R_jj = alpha) when x is zero below the diagonal.
inline void geqrf(double* __restrict__ A, int64_t m, int64_t n, double* __restrict__ tau, double* __restrict__ v,
                  double* __restrict__ w) {
  for (int64_t j = 0; j < n; ++j) {
    double* a = A + j * n + j;  // column j from the diagonal down, stride n
    bool zero_below = true;
    for (int64_t r = 1; r < m - j; ++r) zero_below = zero_below && a[r * n] == 0;  // NaN is not zero
    if (zero_below) {
      tau[j] = 0;
      continue;
    }
    const double alpha = a[0];
    const double beta = -std::copysign(norm2(a, m - j, n), alpha);
    tau[j] = (beta - alpha) / beta;
    const double scale = 1 / (alpha - beta);
    a[0] = beta;
    v[j] = 1;
    for (int64_t r = 1; r < m - j; ++r) v[j + r] = a[r * n] *= scale;
    reflect(A, n, j, m, j + 1, n, v, tau[j], w);
  }
}

// -1 where R_jj < 0, else +1 (R_jj = 0 included, as the reference); "+ 0·R_jj" keeps a NaN of R as NaN.
inline double qr_sign(double r) { return (r < 0 ? -1.0 : 1.0) + 0 * r; }

// Q [B, m, n] (contiguous) = Q of each matrix of P3 [B, m, n] (any strides), diag(R) > 0.
template <typename T>
void gram_schmidt(const at::Tensor& Q, const at::Tensor& P3) {
  const int64_t B = P3.size(0), m = P3.size(1), n = P3.size(2);
  const Batch3<T> P(P3);
  T* Qp = Q.data_ptr<T>();
  // geqrf and orgqr: two passes over each trailing block, about 4 (mn² - n³/3) flops each
  for_each(B, 8 * (m * n * n - n * n * n / 3), 2 * m * n + 2 * n + m, [&](int64_t b, double* buf) {
    double *A = buf, *M = A + m * n, *tau = M + m * n, *w = tau + n, *v = w + n;
    P.load(b, m, n, A);
    geqrf(A, m, n, tau, v, w);
    orgqr(M, A, tau, m, n, n, v, w);
    for (int64_t j = 0; j < n; ++j) w[j] = qr_sign(A[j * n + j]);
    T* out = Qp + b * m * n;
    for (int64_t r = 0; r < m; ++r)
      for (int64_t j = 0; j < n; ++j) out[r * n + j] = static_cast<T>(M[r * n + j] * w[j]);
  });
}

// y (a row of len entries) <- y R⁻ᵀ restricted to its first len columns, i.e. solves y Rᵀ = y for R upper
// triangular given as L = Rᵀ (n×n row-major, row k = R[:k+1, k]): last column first, y[:k] -= y[k] R[:k, k].
inline void solve_rt_row(double* __restrict__ y, const double* __restrict__ L, int64_t n, int64_t len) {
  for (int64_t k = len - 1; k >= 0; --k) {
    const double* __restrict__ lk = L + k * n;
    const double yk = y[k] /= lk[k];
    for (int64_t i = 0; i < k; ++i) y[i] -= yk * lk[i];
  }
}

// grad_P [B, m, n] (contiguous) for each matrix of G3, P3, Q3 [B, m, n] (any strides); the formulas of
// gram_schmidt.cpp's backward_one: with A = QᵀG, C = tril(A - Aᵀ, -1), R = triu(QᵀP),
//   square:  Q (C R⁻ᵀ)          (C R⁻ᵀ is strictly lower: row i solves only its first i columns)
//   tall:    (G + Q (C - A)) R⁻ᵀ
// A zero R_jj gives a NaN gradient for the whole matrix: the square formula never divides by R_nn, and the
// LAPACK path it stands in for does. Returns true if the gradient has a non-finite entry while every input is
// finite (the caller's rank-deficiency error; the same test over the whole batch as the LAPACK path's, without
// four more passes over the tensors).
template <typename T>
bool gram_schmidt_backward(const at::Tensor& out, const at::Tensor& G3, const at::Tensor& P3, const at::Tensor& Q3) {
  const int64_t B = G3.size(0), m = G3.size(1), n = G3.size(2);
  const Batch3<T> Gb(G3), Pb(P3), Qb(Q3);
  T* Op = out.data_ptr<T>();
  const bool square = m == n;
  const int64_t flops = square ? 5 * n * n * n : 6 * m * n * n;  // about 4.3 n³ (square) and 6 mn² (tall)
  std::atomic<bool> nonfinite_in{false}, nonfinite_out{false};
  for_each(B, flops, 3 * m * n + 3 * n * n, [&](int64_t b, double* buf) {
    double *G = buf, *P = G + m * n, *Q = P + m * n, *A = Q + m * n, *L = A + n * n, *X = L + n * n;
    Gb.load(b, m, n, G);
    Pb.load(b, m, n, P);
    Qb.load(b, m, n, Q);
    if (!all_finite(G, 3 * m * n)) nonfinite_in = true;
    // A = QᵀG and L = Rᵀ = tril(PᵀQ)
    std::fill(A, A + 2 * n * n, 0.0);
    add_atb(A, Q, G, m, n, n);
    add_atb(L, P, Q, m, n, n, /*lower=*/true);
    bool deficient = false;
    for (int64_t j = 0; j < n; ++j) deficient = deficient || L[j * n + j] == 0;
    T* o = Op + b * m * n;
    if (deficient) {
      std::fill(o, o + m * n, std::numeric_limits<T>::quiet_NaN());
      nonfinite_out = true;
      return;
    }
    // X = C (square) or C - A (tall), C = tril(A - Aᵀ, -1)
    for (int64_t i = 0; i < n; ++i) {
      for (int64_t j = 0; j < n; ++j) {
        const double c = j < i ? A[i * n + j] - A[j * n + i] : 0.0;
        X[i * n + j] = square ? c : c - A[i * n + j];
      }
    }
    double* Y = G;  // the result overwrites G
    if (square) {
      // X <- C R⁻ᵀ (strictly lower, row i solved on its first i columns), then Y = Q X
      for (int64_t i = 1; i < n; ++i) solve_rt_row(X + i * n, L, n, i);
      std::fill(Y, Y + m * n, 0.0);
      add_ab(Y, Q, X, m, n, n, /*strictly_lower=*/true);
    } else {
      // Y = (G + Q X) R⁻ᵀ
      add_ab(Y, Q, X, m, n, n);
      for (int64_t r = 0; r < m; ++r) solve_rt_row(Y + r * n, L, n, n);
    }
    for (int64_t i = 0; i < m * n; ++i) o[i] = static_cast<T>(Y[i]);
    if (!all_finite(o, m * n)) nonfinite_out = true;
  });
  return nonfinite_out && !nonfinite_in;
}

}  // namespace small
}  // namespace opt_fast
