// Structured products of the CPU Householder kernels (declarations and contracts: householder_panels.h).
#include "householder_panels.h"

namespace opt_fast {
namespace householder {

Tensor empty_oriented(int64_t B, int64_t r, int64_t c, const Tensor& like) {
  if (is_colmajor(like)) return at::empty({B, c, r}, like.options()).mT();
  return at::empty({B, r, c}, like.options());
}

void gemm(const Tensor& C, const Tensor& A, const Tensor& B, double alpha, double beta) {
  if (C.numel() == 0) return;
  if (A.size(2) == 0) {
    if (beta == 0.0) C.zero_();
    return;
  }
  C.baddbmm_(A, B, beta, alpha);
}

void mul(const Tensor& C, const Tensor& A, Kind ka, const Tensor& B, Kind kb, double alpha, int64_t nb) {
  const int64_t r = A.size(1), q = A.size(2), c = B.size(2);
  if (C.size(0) == 0 || r == 0 || q == 0 || c == 0) return;
  if ((ka == kFull && kb == kFull) || q <= nb) {
    gemm(C, A, B, alpha);
    return;
  }
  if (kb == kFull) {  // A q×q triangular
    for (int64_t i0 = 0; i0 < q; i0 += nb) {
      const int64_t i1 = std::min(q, i0 + nb);
      if (ka == kUpper) gemm(rows(C, i0, i1), blk(A, i0, i1, i0, q), rows(B, i0, q), alpha);
      else gemm(rows(C, i0, i1), blk(A, i0, i1, 0, i1), rows(B, 0, i1), alpha);
    }
  } else if (ka == kFull) {  // B q×q triangular
    for (int64_t j0 = 0; j0 < q; j0 += nb) {
      const int64_t j1 = std::min(q, j0 + nb);
      if (kb == kUpper) gemm(cols(C, j0, j1), cols(A, 0, j1), blk(B, 0, j1, j0, j1), alpha);
      else gemm(cols(C, j0, j1), cols(A, j0, q), blk(B, j0, q, j0, j1), alpha);
    }
  } else {  // both triangular (q×q)
    for (int64_t l0 = 0; l0 < q; l0 += nb) {
      const int64_t l1 = std::min(q, l0 + nb);
      const int64_t ra0 = ka == kUpper ? 0 : l0, ra1 = ka == kUpper ? l1 : r;
      const int64_t cb0 = kb == kUpper ? l0 : 0, cb1 = kb == kUpper ? c : l1;
      gemm(blk(C, ra0, ra1, cb0, cb1), blk(A, ra0, ra1, l0, l1), blk(B, l0, l1, cb0, cb1), alpha);
    }
  }
}

void mul_upper(const Tensor& C, const Tensor& A, const Tensor& B, double alpha, int64_t nb) {
  const int64_t k = C.size(1);
  for (int64_t j0 = 0; j0 < k; j0 += nb) {
    const int64_t j1 = std::min(k, j0 + nb);
    gemm(blk(C, 0, j1, j0, j1), rows(A, 0, j1), cols(B, j0, j1), alpha, 0.0);
  }
}

void syrk_upper_lower_trap(const Tensor& C, const Tensor& Y, int64_t nb) {
  const int64_t m = Y.size(1), k = Y.size(2);
  for (int64_t j0 = 0; j0 < k; j0 += nb) {
    const int64_t j1 = std::min(k, j0 + nb);
    gemm(blk(C, 0, j1, j0, j1), blk(Y, j0, m, 0, j1).mT(), blk(Y, j0, m, j0, j1), 1.0, 0.0);
  }
}

void mul_upper_lower_trap(const Tensor& C, const Tensor& A, const Tensor& B, double alpha, int64_t nb) {
  const int64_t q = B.size(1), k = B.size(2);
  for (int64_t j0 = 0; j0 < k; j0 += nb) {
    const int64_t j1 = std::min(k, j0 + nb);
    gemm(blk(C, 0, j1, j0, j1), blk(A, 0, j1, j0, q), blk(B, j0, q, j0, j1), alpha, 0.0);
  }
}

}  // namespace householder
}  // namespace opt_fast
