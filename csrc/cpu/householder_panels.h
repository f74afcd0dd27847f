// Structured products on batches of matrices [B, rows, cols] for the CPU Householder kernels
// (householder_product.cpp, householder_orthogonal.cpp, householder_apply.cpp, householder_ut.cpp):
// GEMMs where one or both operands are triangular or trapezoidal, done in a few wide panels so that the
// zero blocks are skipped while every call stays a large GEMM.
//
// Why panels and not a deep recursion (AMD EPYC, 2 shared cores, MKL, float32, d = k = 512): GEMMs below
// ~128 run far from peak here; recursion down to 64 (T down to 32, ATen calls at every node) was 2x slower
// than the panels, from ~150 small GEMM calls per op. Panels 64 / 128 / 256: 128 best (64: too narrow;
// 256: too many flops on zero triangles).
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>

namespace opt_fast {
namespace householder {

using at::Tensor;

enum Kind { kFull, kUpper, kLower };  // a triangular operand is square and stores zeros in its other half

// Panel width of the structured products. Sub-block outputs are not contiguous, so for a batch baddbmm_
// loops over it: there, prefer fewer and larger calls.
constexpr int64_t kPanel = 128;
inline int64_t panel_for(int64_t batch) { return batch <= 4 ? kPanel : 2 * kPanel; }

inline Tensor rows(const Tensor& t, int64_t a, int64_t b) { return t.narrow(1, a, b - a); }
inline Tensor cols(const Tensor& t, int64_t a, int64_t b) { return t.narrow(2, a, b - a); }
inline Tensor blk(const Tensor& t, int64_t r0, int64_t r1, int64_t c0, int64_t c1) {
  return t.narrow(1, r0, r1 - r0).narrow(2, c0, c1 - c0);
}

// A layout MKL takes without a copy: unit stride along one matrix dimension.
inline bool is_blas_layout(const Tensor& t) {
  return (t.stride(2) == 1 && t.stride(1) >= std::max<int64_t>(1, t.size(2))) ||
         (t.stride(1) == 1 && t.stride(2) >= std::max<int64_t>(1, t.size(1)));
}
inline bool is_colmajor(const Tensor& t) { return t.stride(1) == 1 && t.stride(2) != 1; }

// V [..., r, c] as [B, r, c] in a layout MKL takes directly (a view when possible).
inline Tensor blas_view(const Tensor& V, int64_t B) {
  auto V3 = V.reshape({B, V.size(-2), V.size(-1)});
  return is_blas_layout(V3) ? V3 : V3.contiguous();
}

// An empty [B, r, c] tensor, column-major when like is.
Tensor empty_oriented(int64_t B, int64_t r, int64_t c, const Tensor& like);

// C = beta C + alpha A B (beta = 0: C is only written, whatever it held).
void gemm(const Tensor& C, const Tensor& A, const Tensor& B, double alpha, double beta = 1.0);

// C += alpha A B where A (kind ka) and/or B (kind kb) may be triangular, in panels of nb:
//   triangular A, full B: row panels of A,  C[i] += A[i, nz] B[nz, :];
//   full A, triangular B: column panels of B, C[:, j] += A[:, nz] B[nz, j];
//   both triangular:      inner panels (rank-nb updates), C[rowsA(l), colsB(l)] += A[.., l] B[l, ..].
void mul(const Tensor& C, const Tensor& A, Kind ka, const Tensor& B, Kind kb, double alpha, int64_t nb);

// Upper triangle of C = alpha A B (C square k×k), in column panels C[:j1, j] = A[:j1, :] B[:, j]: the part
// of C below the diagonal blocks is neither read nor written (it may hold anything).
void mul_upper(const Tensor& C, const Tensor& A, const Tensor& B, double alpha, int64_t nb);

// Upper triangle of C = YᵀY for a lower-trapezoidal Y [B, m, k] (m >= k, zeros above the diagonal):
// column panels C[:j1, j] = Y[j0:, :j1]ᵀ Y[j0:, j], skipping the zero rows of Y[:, j]. As mul_upper, the
// part of C below the diagonal blocks is left as it was.
void syrk_upper_lower_trap(const Tensor& C, const Tensor& Y, int64_t nb);

// C[:j1, j] = alpha A[:j1, j0:] B[j0:, j] for the column panels j: the upper triangle (diagonal blocks in
// full) of alpha A B when B [q, k] (q >= k) is lower trapezoidal; below the diagonal blocks, C is untouched.
void mul_upper_lower_trap(const Tensor& C, const Tensor& A, const Tensor& B, double alpha, int64_t nb);

}  // namespace householder
}  // namespace opt_fast
