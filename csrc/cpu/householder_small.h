// Householder forwards for small matrices, one reflector at a time (included by householder_product.cpp,
// householder_orthogonal.cpp and householder_apply.cpp).
//
// Why: at d = 27 the level-3 UT form (householder_ut.h) spends ~120 µs in about twenty ATen calls around
// ~10 µs of arithmetic (torch's orgqr: 22 µs). Below kSmallD one tight pass per matrix wins: the same
// O(d²k) flops, level 2, but each matrix and its work vector stay in L1 (64×64 doubles = 32 KB), and the
// batch is split across threads with at::parallel_for. Backward ops keep the UT form (its cost there is
// dominated by the same GEMMs at every size).
//
// All three apply H_1 ... H_k to a matrix from the last reflector to the first: M <- M - tau v (vᵀ M).
#pragma once

#include "householder_ut.h"
#include "small_matrix.h"

#include <algorithm>
#include <cstdint>

namespace opt_fast {
namespace small {

// When to take these paths (1 thread, float32, measured 2026-11-23 against the UT form just above the
// threshold, d = 65): householder_product up to m = 64 at any batch (batch 64 of d = 64: 1.7 ms against
// 4.0 ms; d = 27, batch 1: 16 µs against 121 µs); the dense ops, whose reflectors are full length (4d²k
// flops, 3x the product's), only for small batches: at batch 64 batched GEMMs catch up (d = 27: 0.78 ms
// against 0.72 ms; d = 64: 4.5 ms against 3.8 ms), while at batch 1 the direct loop still wins (d = 27:
// 17 µs against 102 µs; d = 64: 70 µs against 91 µs).
constexpr int64_t kSmallD = 64;
inline bool use_for_product(int64_t m) { return m <= kSmallD; }
inline bool use_for_dense(int64_t d, int64_t n, int64_t batch) { return d <= kSmallD && n <= 4 * kSmallD && batch <= 8; }

// M[r0:, c0:] -= t v wᵀ with w = M[r0:, c0:]ᵀ v; v[r] for r >= r0 (v[r0] may be 1 implicitly via v0).
// M is row-major with leading dimension ld; w is a scratch of n entries.
// (__restrict__: M, v and w never overlap, so both inner loops vectorise without runtime alias checks.)
template <typename T>
inline void reflect(T* __restrict__ M, int64_t ld, int64_t r0, int64_t r1, int64_t c0, int64_t c1,
                    const T* __restrict__ v, T t, T* __restrict__ w) {
  std::fill(w + c0, w + c1, T(0));
  for (int64_t r = r0; r < r1; ++r) {
    const T vr = v[r];
    const T* __restrict__ row = M + r * ld;
    for (int64_t j = c0; j < c1; ++j) w[j] += vr * row[j];
  }
  for (int64_t r = r0; r < r1; ++r) {
    const T c = t * v[r];
    T* __restrict__ row = M + r * ld;
    for (int64_t j = c0; j < c1; ++j) row[j] -= c * w[j];
  }
}

// M [m, n] row-major = H_0 ... H_{k-1} I[:, :n] (LAPACK orgqr), v_i = (0, ..., 0, 1, V[i+1:, i]) from V [m, n]
// row-major (the geqrf layout), tau [k]; v (m entries) and w (n) are scratch. Only M[i:, i:] changes when H_i
// is applied (columns < i are still e_j there, and v_i is zero above row i).
template <typename T>
inline void orgqr(T* __restrict__ M, const T* __restrict__ V, const T* __restrict__ tau, int64_t m, int64_t n,
                  int64_t k, T* __restrict__ v, T* __restrict__ w) {
  std::fill(M, M + m * n, T(0));
  for (int64_t j = 0; j < n; ++j) M[j * n + j] = T(1);
  for (int64_t i = k - 1; i >= 0; --i) {
    v[i] = T(1);
    for (int64_t r = i + 1; r < m; ++r) v[r] = V[r * n + i];
    reflect(M, n, i, m, i, n, v, tau[i], w);
  }
}

// Q [B, m, n] = orgqr of each matrix of V3 [B, m, n] and tau2 [B, k], both contiguous.
template <typename T>
void product(const at::Tensor& Q, const at::Tensor& V3, const at::Tensor& tau2) {
  const int64_t B = V3.size(0), m = V3.size(1), n = V3.size(2), k = tau2.size(1);
  const T* Vp = V3.const_data_ptr<T>();
  const T* tp = tau2.const_data_ptr<T>();
  T* Qp = Q.data_ptr<T>();
  for_each<T>(B, 4 * m * n * k, m + n, [&](int64_t b, T* buf) {
    orgqr(Qp + b * m * n, Vp + b * m * n, tp + b * k, m, n, k, buf, buf + m);
  });
}

// v = column i of V and its tau = 2/‖v‖² (0 for the zero vector: the identity reflector), as the
// reference's _dense_tau; where ‖v‖² over- or underflows, v is first rescaled by a power of two
// (householder_ut.h), as the reference's _reflector_scale.
template <typename T>
inline T dense_tau(const T* V, int64_t d, int64_t k, int64_t i, T* v) {
  T sq = 0;
  for (int64_t r = 0; r < d; ++r) {
    v[r] = V[r * k + i];
    sq += v[r] * v[r];
  }
  if (householder::norm2_out_of_range(sq)) {
    T amax = 0;
    for (int64_t r = 0; r < d; ++r) amax = std::max(amax, std::abs(v[r]));
    const T s = householder::reflector_inv_scale(amax);
    sq = 0;
    for (int64_t r = 0; r < d; ++r) {
      v[r] *= s;
      sq += v[r] * v[r];
    }
  }
  return sq > 0 ? T(2) / sq : T(0);
}

// out [B, d, n] = H(v_1) ... H(v_k) X with H(v) = I - 2 v vᵀ/vᵀv; V3 [B, d, k] contiguous. X3 = nullptr:
// X = I (householder_orthogonal, n = d).
template <typename T>
void apply(const at::Tensor& out, const at::Tensor& V3, const at::Tensor* X3) {
  const int64_t B = V3.size(0), d = V3.size(1), k = V3.size(2), n = out.size(2);
  const T* Vp = V3.const_data_ptr<T>();
  const T* Xp = X3 ? X3->const_data_ptr<T>() : nullptr;
  T* Op = out.data_ptr<T>();
  for_each<T>(B, 4 * d * n * k, d + n, [&](int64_t b, T* buf) {
    T *v = buf, *w = buf + d;
    const T* V = Vp + b * d * k;
    T* M = Op + b * d * n;
    if (Xp) {
      std::copy(Xp + b * d * n, Xp + (b + 1) * d * n, M);
    } else {
      std::fill(M, M + d * n, T(0));
      for (int64_t j = 0; j < d; ++j) M[j * n + j] = T(1);
    }
    for (int64_t i = k - 1; i >= 0; --i) {
      const T t = dense_tau(V, d, k, i, v);
      reflect(M, n, 0, d, 0, n, v, t, w);
    }
  });
}

}  // namespace small
}  // namespace opt_fast
