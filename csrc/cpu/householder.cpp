// Householder products on the CPU through ATen: householder_product (LAPACK orgqr convention),
// householder_orthogonal and householder_apply, forward and backward.
//
// Algorithm: the UT / compact-WY form of opt_fast/reference/householder.py (the spec),
//     H_1 ... H_k = I - Y T Yᵀ,   T = (I + D N)⁻¹ D = A⁻¹ D,   D = diag(tau),  N = striu(YᵀY),
// level 3 throughout (no loop over reflectors), never dividing by tau (tau = 0 needs no special case),
// and exploiting the triangular structure with a few wide panels (nb = 128; 256 for batches > 4) rather
// than a deep recursion: on this machine GEMMs below ~128 run far from peak, so every call is kept large.
//   * N: upper triangle of YᵀY only, in column panels (SYRK-like); for the unit-lower-trapezoidal Y of
//     householder_product the zero rows above each panel are skipped too.
//   * T is never formed in the forward: only its diagonal blocks T_II (96×96, one substitution pass per
//     block straight from N), then W = T Yᵀ by block substitution on A W = D Yᵀ,
//         W_I = T_II (Yᵀ_I - N_{I,>I} W_{>I}),   last block first,
//     which costs the same as a TRMM with the full T and saves forming T's off-diagonal blocks.
//   * householder_product: Y[:n]ᵀ is upper trapezoidal, so W is; Q = I[:, :n] - Y W is an LU-like
//     product done as rank-nb updates into the output (the first one writes it, so no zero fill), and the
//     identity is never multiplied (Yᵀ I[:, :n] = Y[:n]ᵀ). Y is copied in V's own orientation (LAPACK's
//     geqrf hands out column-major V), so the copy never transposes.
//   * householder_orthogonal: Q = I - V W with the sign folded into W: one GEMM, then +1 on the diagonal;
//     tau = 2 / diag(VᵀV) comes for free from N.
//   * householder_apply: X - V_I (T_I (V_Iᵀ X)) panel by panel (ormqr's scheme, see its section): neither
//     the d×d product nor the k×k T.
//   * backward: recomputes N and, in one batched call, the full T and A⁻¹ = (I + D N)⁻¹ (leaves of 32 by
//     substitution, then T12 = -T11 N12 T22 level by level as batched GEMMs over all sibling pairs); memory
//     O(batch·(d·k + k²)) beyond inputs/outputs, nothing saved per reflector. Then the reverse of the same
//     steps (_ut_backward of the reference): S = A⁻ᵀ dT (block-upper part only), P = S Tᵀ (upper part
//     only), dtau = diag(S) - rowsum(P ∘ N), dN = -striu(D P), all without a TRSM; for householder_product
//     only the strictly lower part of dY is formed.
//
// Choices, by measurement (AMD EPYC, 2 cores shared with other jobs, MKL, 2 threads, float32, batch 1,
// d = k = 512; ratios of medians, interleaved in one process):
//   * UT form vs a blocked orgqr-like backward accumulation (Q_{>=I} = Q_{>I} - Y_I T_II (Y_Iᵀ Q_{>I})):
//     the same GEMM flops here (~2.25 GEMMs for householder_orthogonal, ~1.1 for householder_product with
//     panels of 128), and the UT form measured 5-10% faster.
//   * Deep recursion (triangles split down to 64, T down to 32 with ATen calls at every node): 2x slower
//     than the panels, from ~150 small GEMM calls per op.
//   * Panels 64 / 128 / 256: 128 best (64: too narrow; 256: too many flops on zero triangles).
//   * Forward T: full T + TRMM vs diagonal blocks + substitution: the latter ~10% faster; T_II of 64, 96,
//     128: 96 marginally best.
// Measured 2026-11-23 (ad-hoc script, not a committed benchmark): per run, medians of 51 interleaved
// forward repeats and of 7 torch / 21 opt_fast forward+backward repeats; six runs under a light load from
// other jobs (load average 0.8-1.3), range over the runs:
//   (a) householder_product fwd / torch.linalg.householder_product (MKL orgqr):   0.80 - 0.95   (target <= 1)
//   (b) torch.linalg.householder_product fwd+bwd (autograd) / opt_fast fwd+bwd:  11.4x - 15.4x (target >= 10x)
//       (torch 211-321 ms, opt_fast 16.5-23 ms)
//   (c) householder_orthogonal fwd / torch.mm 512×512:                           2.68 - 2.90   (target <= 3)
// Under heavier contention the many mid-size GEMMs suffer more than one mm or LAPACK call: margins shrink.
#include "../householder_checks.h"
#include "../opt_fast.h"
#include "householder_small.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <utility>

namespace opt_fast {
namespace {

using at::Tensor;

// ---- structured products on batches of matrices [B, rows, cols] ------------------------------------

enum Kind { kFull, kUpper, kLower };  // a triangular operand is square and stores zeros in its other half

// Panel width of the structured products: GEMMs much narrower than 128 run far from peak here, wider
// panels waste flops on zero triangles. Sub-block outputs are not contiguous, so for a batch baddbmm_ loops
// over it: there, prefer fewer and larger calls.
constexpr int64_t kPanel = 128;
inline int64_t panel_for(int64_t batch) { return batch <= 4 ? kPanel : 2 * kPanel; }

// Diagonal blocks of T formed for the forward substitution (apply_T_right).
constexpr int64_t kTDiagBlock = 96;
constexpr int64_t kMaxTDiagBlock = 128;

inline Tensor rows(const Tensor& t, int64_t a, int64_t b) { return t.narrow(1, a, b - a); }
inline Tensor cols(const Tensor& t, int64_t a, int64_t b) { return t.narrow(2, a, b - a); }
inline Tensor blk(const Tensor& t, int64_t r0, int64_t r1, int64_t c0, int64_t c1) {
  return t.narrow(1, r0, r1 - r0).narrow(2, c0, c1 - c0);
}

// C += alpha A B (full operands).
// A layout MKL takes without a copy: unit stride along one matrix dimension.
inline bool is_blas_layout(const Tensor& t) {
  return (t.stride(2) == 1 && t.stride(1) >= std::max<int64_t>(1, t.size(2))) ||
         (t.stride(1) == 1 && t.stride(2) >= std::max<int64_t>(1, t.size(1)));
}
inline bool is_colmajor(const Tensor& t) { return t.stride(1) == 1 && t.stride(2) != 1; }

// An empty [B, r, c] tensor, column-major when like is.
Tensor empty_oriented(int64_t B, int64_t r, int64_t c, const Tensor& like) {
  if (is_colmajor(like)) return at::empty({B, c, r}, like.options()).mT();
  return at::empty({B, r, c}, like.options());
}

// C = beta C + alpha A B (beta = 0: C is only written, whatever it held).
void gemm(const Tensor& C, const Tensor& A, const Tensor& B, double alpha, double beta = 1.0) {
  if (C.numel() == 0) return;
  if (A.size(2) == 0) {
    if (beta == 0.0) C.zero_();
    return;
  }
  C.baddbmm_(A, B, beta, alpha);
}

// C += alpha A B where A (kind ka) and/or B (kind kb) may be triangular, in panels of nb so that the zero
// blocks are skipped while every call stays a large GEMM (a few panels, not a deep recursion: GEMMs
// below ~128 run far from peak here).
//   triangular A, full B: row panels of A,  C[i] += A[i, nz] B[nz, :];
//   full A, triangular B: column panels of B, C[:, j] += A[:, nz] B[nz, j];
//   both triangular:      inner panels (rank-nb updates), C[rowsA(l), colsB(l)] += A[.., l] B[l, ..].
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

// Upper triangle of C = alpha A B (C square k×k), in column panels C[:j1, j] = A[:j1, :] B[:, j]: the part
// of C below the diagonal blocks is neither read nor written (it may hold anything).
void mul_upper(const Tensor& C, const Tensor& A, const Tensor& B, double alpha, int64_t nb) {
  const int64_t k = C.size(1);
  for (int64_t j0 = 0; j0 < k; j0 += nb) {
    const int64_t j1 = std::min(k, j0 + nb);
    gemm(blk(C, 0, j1, j0, j1), rows(A, 0, j1), cols(B, j0, j1), alpha, 0.0);
  }
}

// Upper triangle of C = YᵀY for a lower-trapezoidal Y [B, m, k] (m >= k, zeros above the diagonal):
// column panels C[:j1, j] = Y[j0:, :j1]ᵀ Y[j0:, j], skipping the zero rows of Y[:, j]. As mul_upper, the
// part of C below the diagonal blocks is left as it was.
void syrk_upper_lower_trap(const Tensor& C, const Tensor& Y, int64_t nb) {
  const int64_t m = Y.size(1), k = Y.size(2);
  for (int64_t j0 = 0; j0 < k; j0 += nb) {
    const int64_t j1 = std::min(k, j0 + nb);
    gemm(blk(C, 0, j1, j0, j1), blk(Y, j0, m, 0, j1).mT(), blk(Y, j0, m, j0, j1), 1.0, 0.0);
  }
}

// ---- T = (I + D N)⁻¹ D ---------------------------------------------------------------------------
//
// Leaf blocks (<= 32) by substitution, then one level at a time over all blocks of that level at once:
// T12 = -T11 (N12 T22) for every pair of sibling blocks, as two batched matmuls on strided views of the
// diagonal blocks (k is padded with identity reflectors, tau = 0, to leaf·2^levels: the leading k×k block
// of T does not depend on later reflectors).

// Substitution, bottom row first: T[i, i] = tau_i, T[i, i+1:] = -tau_i N[i, i+1:] T[i+1:, i+1:], on the
// diagonal blocks of size s. Reads only the strict upper triangle of N; T's lower part stays zero.
template <typename scalar_t>
void t_leaf_kernel(const Tensor& T, const Tensor& N, const Tensor& tau, int64_t s) {
  const int64_t B = T.size(0), K = T.size(1), P = K / s;
  TORCH_INTERNAL_ASSERT(T.is_contiguous() && N.is_contiguous() && tau.is_contiguous());
  scalar_t* const Tp = T.data_ptr<scalar_t>();
  const scalar_t* const Np = N.const_data_ptr<scalar_t>();
  const scalar_t* const tp = tau.const_data_ptr<scalar_t>();
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 18) / (s * s * s / 6 + 1));  // ~256k FMA per task
  at::parallel_for(0, B * P, grain, [&](int64_t w0, int64_t w1) {
    for (int64_t w = w0; w < w1; ++w) {
      const int64_t b = w / P, o = (w % P) * s;  // block offset on the diagonal
      scalar_t* Tb = Tp + b * K * K + o * K + o;
      const scalar_t* Nb = Np + b * K * K + o * K + o;
      const scalar_t* tb = tp + b * K + o;
      for (int64_t i = s - 1; i >= 0; --i) {
        scalar_t* __restrict__ Ti = Tb + i * K;
        const scalar_t* Ni = Nb + i * K;
        for (int64_t j = i + 1; j < s; ++j) Ti[j] = scalar_t(0);
        for (int64_t l = i + 1; l < s; ++l) {
          const scalar_t a = Ni[l];
          const scalar_t* __restrict__ Tl = Tb + l * K;
          for (int64_t j = l; j < s; ++j) Ti[j] += a * Tl[j];
        }
        const scalar_t t = tb[i];
        for (int64_t j = i + 1; j < s; ++j) Ti[j] *= -t;
        Ti[i] = t;
      }
    }
  });
}

// [B, P, s, s] view of the blocks at (p·2s + r0, p·2s + c0), p < P, of a contiguous [B, K, K] tensor.
inline Tensor sibling_blocks(const Tensor& M, int64_t P, int64_t s, int64_t r0, int64_t c0) {
  const int64_t K = M.size(1);
  return M.as_strided({M.size(0), P, s, s}, {K * K, 2 * s * (K + 1), K, 1}, M.storage_offset() + r0 * K + c0);
}

// T = (I + D N)⁻¹ D for each of a batch: N [B, k, k] (strict upper triangle used), tau [B, k]; a new
// contiguous [B, k, k] (zero below the diagonal).
Tensor compute_T(const Tensor& N, const Tensor& tau) {
  const int64_t B = N.size(0), k = N.size(1);
  constexpr int64_t leaf_max = 32;
  int64_t P = 1;
  while (P * leaf_max < k) P *= 2;
  const int64_t s0 = k == 0 ? 0 : (k + P - 1) / P, K = s0 * P;
  Tensor Np = N, tp = tau;
  if (K != k) {  // pad with identity reflectors
    Np = at::zeros({B, K, K}, N.options());
    blk(Np, 0, k, 0, k).copy_(N);
    tp = at::zeros({B, K}, tau.options());
    tp.narrow(1, 0, k).copy_(tau);
  } else {
    Np = N.contiguous();
    tp = tau.contiguous();
  }
  auto T = at::zeros({B, K, K}, N.options());
  if (B > 0 && K > 0) {
    AT_DISPATCH_FLOATING_TYPES(T.scalar_type(), "householder_T", [&] { t_leaf_kernel<scalar_t>(T, Np, tp, s0); });
    for (int64_t s = s0; s < K; s *= 2) {
      const int64_t Pl = K / (2 * s);
      // T12 = -T11 (N12 T22), for all Pl sibling pairs at once
      if (Pl == 1 && s > kPanel) {  // the top level: large enough for the triangles to pay
        const auto T11 = blk(T, 0, s, 0, s), T22 = blk(T, s, K, s, K);
        auto X = at::zeros({B, s, s}, T.options());
        mul(X, blk(Np, 0, s, s, K), kFull, T22, kUpper, 1.0, kPanel);
        mul(blk(T, 0, s, s, K), T11, kUpper, X, kFull, -1.0, kPanel);
        continue;
      }
      auto X = at::matmul(sibling_blocks(Np, Pl, s, 0, s), sibling_blocks(T, Pl, s, s, s));
      X.neg_();
      sibling_blocks(T, Pl, s, 0, s).copy_(at::matmul(sibling_blocks(T, Pl, s, 0, 0), X));
    }
  }
  return K == k ? T : blk(T, 0, k, 0, k).contiguous();
}

// The diagonal blocks T_II (size bs <= 128; the last one zero-padded) of T, as [B, P, bs, bs]: all that
// the block substitution of apply_T_right needs. One pass of substitution per block, straight from N's
// diagonal blocks (strict upper triangles; N contiguous). tau: [B, k], or undefined for the dense ops,
// where tau_i = 2 / N_ii (0 when N_ii is not > 0) is formed on the fly.
template <typename scalar_t>
void t_diag_kernel(const Tensor& Td, const Tensor& N, const Tensor& tau) {
  const int64_t B = Td.size(0), P = Td.size(1), bs = Td.size(2), k = N.size(1);
  const int64_t sNb = N.stride(0), sNr = N.stride(1);
  // A dimension of size 1 is only ever indexed at 0, so its stride does not matter (.contiguous() keeps it).
  TORCH_INTERNAL_ASSERT((N.size(2) <= 1 || N.stride(2) == 1) && Td.is_contiguous() &&
                        (!tau.defined() || tau.size(1) <= 1 || tau.stride(1) == 1));
  const scalar_t* const Np = N.const_data_ptr<scalar_t>();
  const scalar_t* const tp = tau.defined() ? tau.const_data_ptr<scalar_t>() : nullptr;
  const int64_t stb = tau.defined() ? tau.stride(0) : 0;
  scalar_t* const Tp = Td.data_ptr<scalar_t>();
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 17) / (bs * bs * bs / 6 + 1));
  at::parallel_for(0, B * P, grain, [&](int64_t w0, int64_t w1) {
    for (int64_t w = w0; w < w1; ++w) {
      const int64_t b = w / P, o = (w % P) * bs, n = std::min(bs, k - o);
      const scalar_t* Nb = Np + b * sNb + o * sNr + o;
      scalar_t* Tb = Tp + w * bs * bs;
      std::fill(Tb, Tb + bs * bs, scalar_t(0));
      scalar_t acc[kMaxTDiagBlock];
      for (int64_t i = n - 1; i >= 0; --i) {
        scalar_t* Ti = Tb + i * bs;
        const scalar_t* Ni = Nb + i * sNr;
        // acc = N[i, i+1:] T[i+1:, i+1:]; T's rows below are zero left of their diagonal, so every
        // axpy runs over the same range (more flops than needed, but plain vectorizable loops)
        const int64_t len = n - i - 1;
        std::fill(acc, acc + len, scalar_t(0));
        for (int64_t l = i + 1; l < n; ++l) {
          const scalar_t a = Ni[l];
          const scalar_t* Tl = Tb + l * bs + i + 1;
          for (int64_t j = 0; j < len; ++j) acc[j] += a * Tl[j];
        }
        scalar_t t;
        if (tp) {
          t = tp[b * stb + o + i];
        } else {
          const scalar_t sq = Ni[i];
          t = sq > scalar_t(0) ? scalar_t(2) / sq : scalar_t(0);
        }
        for (int64_t j = 0; j < len; ++j) Ti[i + 1 + j] = -t * acc[j];
        Ti[i] = t;
      }
    }
  });
}

Tensor compute_T_diag(const Tensor& N, const Tensor& tau, int64_t bs) {
  const int64_t B = N.size(0), k = N.size(1);
  bs = std::max<int64_t>(1, std::min({bs, k, kMaxTDiagBlock}));
  const int64_t P = (k + bs - 1) / bs;
  auto Td = at::empty({B, P, bs, bs}, N.options());
  if (Td.numel() > 0) {
    AT_DISPATCH_FLOATING_TYPES(N.scalar_type(), "householder_T_diag", [&] { t_diag_kernel<scalar_t>(Td, N, tau); });
  }
  return Td;
}

// Z = sign · C Tᵀ (= sign · (T Cᵀ)ᵀ) for T = (I + D N)⁻¹ D given only its diagonal blocks T_II (Td from
// compute_T_diag), by block substitution on A T = D (A = I + D N, A_IJ = D_I N_IJ), last block column first:
//     Z_:I = (C_:I - Z_:>I N_{I,>I}ᵀ) T_IIᵀ,
// so that T's off-diagonal blocks are never formed. C [B, c, k] is only read. With trap, C (and so Z) is
// lower trapezoidal and the zero blocks are skipped (Z is then returned with its zeros).
Tensor apply_T_right(const Tensor& Td, const Tensor& N, const Tensor& C, bool trap, double sign) {
  const int64_t B = C.size(0), c = C.size(1), k = C.size(2), bs = Td.size(2);
  auto Z = trap ? at::zeros({B, c, k}, C.options()) : at::empty({B, c, k}, C.options());
  auto tmp = empty_oriented(B, c, std::min(bs, k), C);
  for (int64_t I = Td.size(1) - 1; I >= 0; --I) {
    const int64_t i0 = I * bs, i1 = std::min(k, i0 + bs), r0 = trap ? i0 : 0;
    Tensor R = blk(C, r0, c, i0, i1);
    if (i1 < k) {  // R = C_:I - Z_:>I N_{I,>I}ᵀ (rows >= i1 only when trap)
      R = blk(tmp, r0, c, 0, i1 - i0);
      R.copy_(blk(C, r0, c, i0, i1));
      const int64_t u0 = trap ? i1 : 0;
      gemm(rows(R, u0 - r0, c - r0), blk(Z, u0, c, i1, k), blk(N, i0, i1, i1, k).mT(), -sign);
    }
    const auto TII = Td.select(1, I).narrow(1, 0, i1 - i0).narrow(2, 0, i1 - i0);
    gemm(blk(Z, r0, c, i0, i1), R, TII.mT(), sign, 0.0);
  }
  return Z;
}

// ---- shared pieces --------------------------------------------------------------------------------

// tau = 2/||v||² (0 for v = 0, also for a NaN column, as in the reference's torch.where(sq > 0, ...)).
Tensor tau_from_norms(const Tensor& sq) {
  return at::where(sq > 0, 2.0 / sq, at::zeros_like(sq)).contiguous();
}

// N = upper triangle of VᵀV for dense V (the diagonal holds ||v||²; below the diagonal blocks: anything).
Tensor gram_upper(const Tensor& V3, int64_t nb) {
  auto N = at::empty({V3.size(0), V3.size(2), V3.size(2)}, V3.options());
  mul_upper(N, V3.mT(), V3, 1.0, nb);
  return N;
}

// The backward's factors: T = (I + D N)⁻¹ D and A⁻¹ = (I + D N)⁻¹, in one batched compute_T call
// (A⁻¹ is T for N -> D N, tau -> 1).
std::pair<Tensor, Tensor> T_and_Ainv(const Tensor& N, const Tensor& tau) {
  const int64_t B = N.size(0), k = N.size(1);
  auto Ns = at::empty({2 * B, k, k}, N.options());
  Ns.narrow(0, 0, B).copy_(N);
  auto Ns2 = Ns.narrow(0, B, B);
  at::mul_out(Ns2, N, tau.unsqueeze(-1));  // only the strict upper part is read
  auto taus = at::cat({tau, at::ones_like(tau)}, 0);
  auto TA = compute_T(Ns, taus);
  return {TA.narrow(0, 0, B), TA.narrow(0, B, B)};
}

// C[:j1, j] = alpha A[:j1, j0:] B[j0:, j] for the column panels j: the upper triangle (diagonal blocks in
// full) of alpha A B when B [q, k] (q >= k) is lower trapezoidal; below the diagonal blocks, C is untouched.
void mul_upper_lower_trap(const Tensor& C, const Tensor& A, const Tensor& B, double alpha, int64_t nb) {
  const int64_t q = B.size(1), k = B.size(2);
  for (int64_t j0 = 0; j0 < k; j0 += nb) {
    const int64_t j1 = std::min(k, j0 + nb);
    gemm(blk(C, 0, j1, j0, j1), blk(A, 0, j1, j0, q), blk(B, j0, q, j0, j1), alpha, 0.0);
  }
}

template <typename scalar_t>
void zero_strict_lower_kernel(const Tensor& M) {
  const int64_t k = M.size(1);
  scalar_t* const p = M.data_ptr<scalar_t>();
  at::parallel_for(0, M.size(0) * k, std::max<int64_t>(1, 32768 / (k + 1)), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) std::fill(p + r * k, p + r * k + r % k, scalar_t(0));
  });
}

// dtau_i = S_ii - Σ_{j>i} P_ij N_ij;  sym = dN + dNᵀ with dN_ij = -tau_i P_ij (i < j).
template <typename scalar_t>
void t_backward_tail_kernel(const Tensor& dtau, const Tensor& sym, const Tensor& S, const Tensor& P,
                            const Tensor& N, const Tensor& tau) {
  const int64_t k = S.size(1), kk = k * k;
  const scalar_t *Sp = S.const_data_ptr<scalar_t>(), *Pp = P.const_data_ptr<scalar_t>();
  const scalar_t *Np = N.const_data_ptr<scalar_t>(), *tp = tau.const_data_ptr<scalar_t>();
  scalar_t *dp = dtau.data_ptr<scalar_t>(), *Yp = sym.data_ptr<scalar_t>();
  at::parallel_for(0, S.size(0) * k, std::max<int64_t>(1, 16384 / (k + 1)), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t b = r / k, i = r % k;
      const scalar_t* Pi = Pp + b * kk + i * k;
      const scalar_t* Ni = Np + b * kk + i * k;
      scalar_t* sym_b = Yp + b * kk;
      const scalar_t t = tp[r];
      scalar_t acc = 0;
      for (int64_t j = i + 1; j < k; ++j) {
        acc += Pi[j] * Ni[j];
        sym_b[i * k + j] = -t * Pi[j];
      }
      sym_b[i * k + i] = 0;
      dp[r] = Sp[b * kk + i * k + i] - acc;
    }
  });
  // mirror the strict upper triangle into the lower one, in 32×32 tiles
  constexpr int64_t tile = 32;
  const int64_t nt = (k + tile - 1) / tile;
  at::parallel_for(0, S.size(0) * nt, std::max<int64_t>(1, 64 / (nt + 1)), [&](int64_t w0, int64_t w1) {
    for (int64_t w = w0; w < w1; ++w) {
      scalar_t* sym_b = Yp + (w / nt) * kk;
      const int64_t j0 = (w % nt) * tile, j1 = std::min(k, j0 + tile);  // rows j of the lower triangle
      for (int64_t i0 = 0; i0 < j1; i0 += tile) {
        const int64_t i1 = std::min(i0 + tile, j1);
        for (int64_t j = j0; j < j1; ++j)
          for (int64_t i = i0; i < std::min(i1, j); ++i) sym_b[j * k + i] = sym_b[i * k + j];
      }
    }
  });
}

// From dT (upper triangle used; dT is overwritten) to (dtau, dN + dNᵀ), the reverse of T = A⁻¹ D with
// A = I + D N:  S = A⁻ᵀ dT, P = S Tᵀ (= -dA), dtau = diag(S) - rowsum(P ∘ N), dN = -striu(D P).
// Only the block-upper part of S and the upper triangle of P are formed. All inputs contiguous.
std::pair<Tensor, Tensor> t_backward(const Tensor& dT, const Tensor& N, const Tensor& T, const Tensor& Ainv,
                                     const Tensor& tau, int64_t nb) {
  const int64_t B = dT.size(0), k = dT.size(1);
  AT_DISPATCH_FLOATING_TYPES(dT.scalar_type(), "householder_zero_lower", [&] { zero_strict_lower_kernel<scalar_t>(dT); });
  auto S = at::empty({B, k, k}, dT.options());
  const auto AinvT = Ainv.mT();
  for (int64_t i0 = 0; i0 < k; i0 += nb) {  // S[i, i0:] = A⁻ᵀ[i, :i1] dT[:i1, i0:]
    const int64_t i1 = std::min(k, i0 + nb);
    gemm(blk(S, i0, i1, i0, k), blk(AinvT, i0, i1, 0, i1), blk(dT, 0, i1, i0, k), 1.0, 0.0);
  }
  auto P = at::empty({B, k, k}, dT.options());
  mul_upper_lower_trap(P, S, T.mT(), 1.0, nb);
  auto dtau = at::empty({B, k}, dT.options());
  auto sym = at::empty({B, k, k}, dT.options());
  AT_DISPATCH_FLOATING_TYPES(dT.scalar_type(), "householder_t_backward", [&] {
    t_backward_tail_kernel<scalar_t>(dtau, sym, S, P, N.contiguous(), tau.contiguous());
  });
  return {dtau, sym};
}

// Y = the unit-lower-trapezoidal part of V[..., :k], as a new [B, m, k] in V's orientation: row-major, or
// column-major when V is (LAPACK's geqrf returns column-major V), so that the copy never transposes.
template <typename scalar_t>
void unit_lower_kernel(const Tensor& Y, const Tensor& V3) {
  const int64_t m = Y.size(1), k = Y.size(2);
  const bool colmajor = Y.stride(1) == 1;
  // walk "lines": rows of Y (row-major) or columns (column-major); line r of batch b, element e
  const int64_t lines = colmajor ? k : m, len = colmajor ? m : k;
  const int64_t yl = colmajor ? Y.stride(2) : Y.stride(1), vl = colmajor ? V3.stride(2) : V3.stride(1);
  const int64_t ve = colmajor ? V3.stride(1) : V3.stride(2);
  const scalar_t* const Vp = V3.const_data_ptr<scalar_t>();
  scalar_t* const Yp = Y.data_ptr<scalar_t>();
  const int64_t vb = V3.stride(0), yb = Y.stride(0);
  at::parallel_for(0, Y.size(0) * lines, std::max<int64_t>(1, 16384 / (len + 1)), [&](int64_t w0, int64_t w1) {
    for (int64_t w = w0; w < w1; ++w) {
      const int64_t b = w / lines, r = w % lines;
      const scalar_t* v = Vp + b * vb + r * vl;
      scalar_t* y = Yp + b * yb + r * yl;
      // column-major: column r holds zeros above r, 1 at r, V below; row-major: row r holds V left of r, 1, zeros
      const int64_t lo = colmajor ? std::min(r + 1, len) : 0, hi = colmajor ? len : std::min(r, len);
      if (colmajor) std::fill(y, y + lo, scalar_t(0));
      if (ve == 1) std::copy(v + lo, v + hi, y + lo);
      else for (int64_t e = lo; e < hi; ++e) y[e] = v[e * ve];
      if (!colmajor && r < len) {
        y[r] = scalar_t(1);
        std::fill(y + r + 1, y + len, scalar_t(0));
      }
      if (colmajor && r < len) y[r] = scalar_t(1);
    }
  });
}


Tensor unit_lower(const Tensor& V3, int64_t k) {
  auto Y = empty_oriented(V3.size(0), V3.size(1), k, V3);
  AT_DISPATCH_FLOATING_TYPES(Y.scalar_type(), "householder_unit_lower", [&] { unit_lower_kernel<scalar_t>(Y, V3); });
  return Y;
}

// V as [B, d, k] in a layout MKL takes directly (a view when possible).
Tensor blas_view(const Tensor& V, int64_t B) {
  auto V3 = V.reshape({B, V.size(-2), V.size(-1)});
  return is_blas_layout(V3) ? V3 : V3.contiguous();
}

// W = alpha T Y[:n]ᵀ [B, k, n] (upper trapezoidal) from the full T.
Tensor product_W(const Tensor& T, const Tensor& Y, int64_t n, double alpha, int64_t nb) {
  const int64_t B = Y.size(0), k = Y.size(2);
  auto W = at::zeros({B, k, n}, Y.options());
  mul(cols(W, 0, k), T, kUpper, rows(Y, 0, k).mT(), kUpper, alpha, nb);
  if (n > k) mul(cols(W, k, n), T, kUpper, rows(Y, k, n).mT(), kFull, alpha, nb);
  return W;
}

// ---- householder_product -------------------------------------------------------------------------

// The level-3 UT form above does ~2x orgqr's flops and wins only where its large GEMMs thread better than
// LAPACK's panels: one large matrix. Elsewhere LAPACK's orgqr (through ATen; batches run one matrix per
// thread) is faster. Measured (float32, householder_product fwd time / torch.linalg.householder_product's,
// medians of 21 interleaved calls, this shared 2-core machine), 2 threads / 1 thread:
//   batch 1: d = 144 2.06 / 1.90; 256 1.03 / 1.44; 384 0.94 / 1.38; 512 0.86 / 0.91; 1024 0.66 / 0.87
//   batches: [2, 512] 0.99 / 1.10; [5, 576] 1.35 / 1.27; [64, 144] 2.0 (2 threads)
bool use_level3_product(int64_t B, int64_t k) { return B == 1 && k >= 512; }

Tensor householder_product_cpu(const Tensor& V, const Tensor& tau) {
  check_product("householder_product", V, tau);
  const int64_t m = V.size(-2), n = V.size(-1), k = tau.size(-1), B = batch_numel(V, 2);
  const int64_t nb = panel_for(B);
  const auto V3 = V.reshape({B, m, n});
  const auto tau2 = tau.reshape({B, k}).contiguous();
  Tensor Q;
  if (k > 0 && B > 0 && small::use_for_product(m)) {
    Q = at::empty({B, m, n}, V.options());
    const auto Vc = V3.contiguous();
    AT_DISPATCH_FLOATING_TYPES(Q.scalar_type(), "householder_product_small", [&] { small::product<scalar_t>(Q, Vc, tau2); });
    return Q.view(V.sizes());
  }
  if (k > 0 && B > 0 && !use_level3_product(B, k)) {
    // LAPACK hands Q out column-major; the op's output is row-major (one d² copy against orgqr's d³ work)
    return at::linalg_householder_product(V3, tau2).contiguous().view(V.sizes());
  }
  if (k == 0 || B == 0) {
    Q = at::zeros({B, m, n}, V.options());
  } else {
    const auto Y = unit_lower(V3, k);
    auto N = at::empty({B, k, k}, V.options());
    syrk_upper_lower_trap(N, Y, nb);
    const auto Td = compute_T_diag(N, tau2, kTDiagBlock);
    // W = T Y[:n]ᵀ (upper trapezoidal), as Wᵀ = Y[:n] Tᵀ
    const auto W = apply_T_right(Td, N, rows(Y, 0, n), /*trap=*/true, 1.0).mT();
    // Q = I[:, :n] - Y W: rank-nb updates over the reflector panels l, each touching only Q[l0:, l0:]
    // (Y[:, l] is zero above row l0, W[l, :] left of column l0); the first one writes all of Q.
    Q = at::empty({B, m, n}, V.options());
    for (int64_t l0 = 0; l0 < k; l0 += nb) {
      const int64_t l1 = std::min(k, l0 + nb);
      gemm(blk(Q, l0, m, l0, n), blk(Y, l0, m, l0, l1), blk(W, l0, l1, l0, n), -1.0, l0 == 0 ? 0.0 : 1.0);
    }
  }
  Q.diagonal(0, 1, 2).add_(1);
  return Q.view(V.sizes());
}

// dV[..., :k] = strictly lower part of dY [B, m, k]; zero elsewhere ([B, m, n]).
template <typename scalar_t>
void assemble_dV_kernel(const Tensor& dV, const Tensor& dY) {
  const int64_t m = dV.size(1), n = dV.size(2), k = dY.size(2);
  TORCH_INTERNAL_ASSERT(dV.is_contiguous() && dY.is_contiguous());
  scalar_t* const o = dV.data_ptr<scalar_t>();
  const scalar_t* const y = dY.const_data_ptr<scalar_t>();
  at::parallel_for(0, dV.size(0) * m, std::max<int64_t>(1, 16384 / (n + 1)), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t c = std::min(r % m, k);
      std::copy(y + r * k, y + r * k + c, o + r * n);
      std::fill(o + r * n + c, o + (r + 1) * n, scalar_t(0));
    }
  });
}

std::tuple<Tensor, Tensor> householder_product_backward_cpu(const Tensor& grad, const Tensor& V,
                                                            const Tensor& tau) {
  const char* op = "householder_product_backward";
  check_product(op, V, tau);
  check_grad(op, grad, V, V.sizes());
  const int64_t m = V.size(-2), n = V.size(-1), k = tau.size(-1), B = batch_numel(V, 2);
  const int64_t nb = panel_for(B);
  if (k == 0 || B == 0 || m == 0) return {at::zeros(V.sizes(), V.options()), at::zeros(tau.sizes(), tau.options())};
  const auto G = grad.reshape({B, m, n});
  const auto Y = unit_lower(V.reshape({B, m, n}), k);
  const auto tau2 = tau.reshape({B, k}).contiguous();
  auto N = at::empty({B, k, k}, V.options());
  syrk_upper_lower_trap(N, Y, nb);
  const auto [T, Ainv] = T_and_Ainv(N, tau2);
  const auto Z = product_W(T, Y, n, 1.0, nb);  // T W1 with W1 = Y[:n]ᵀ, upper trapezoidal [k, n]
  // YtG = Yᵀ G [k, n], row panels (Y[:, i] is zero above row i0). Both uses below (dT and YtGᵀ T) read
  // only its block-upper part, YtG[i, j] for j >= i0, so only that is formed.
  auto YtG = at::empty({B, k, n}, V.options());
  for (int64_t i0 = 0; i0 < k; i0 += nb) {
    const int64_t i1 = std::min(k, i0 + nb);
    gemm(blk(YtG, i0, i1, i0, n), blk(Y, i0, m, i0, i1).mT(), blk(G, i0, m, i0, n), 1.0, 0.0);
  }
  // dT = -YtG W1ᵀ = -YtG Y[:n] (upper triangle)
  auto dT = at::empty({B, k, k}, V.options());
  mul_upper_lower_trap(dT, YtG, rows(Y, 0, n), -1.0, nb);
  // dY = -G Zᵀ - [YtGᵀ T; 0] (the second term: the path through W1 = Y[:n]ᵀ) + Y (dN + dNᵀ). Only the strict
  // lower part of dY is used, so in column panel j only rows >= j0 are formed (the rest is never read).
  auto dY = at::empty({B, m, k}, V.options());
  const auto Zt = Z.mT(), YtGt = YtG.mT();
  for (int64_t j0 = 0; j0 < k; j0 += nb) {
    const int64_t j1 = std::min(k, j0 + nb);
    // Zᵀ [n, k] is lower trapezoidal, T upper triangular
    gemm(blk(dY, j0, m, j0, j1), blk(G, j0, m, j0, n), blk(Zt, j0, n, j0, j1), -1.0, 0.0);
    gemm(blk(dY, j0, n, j0, j1), blk(YtGt, j0, n, 0, j1), blk(T, 0, j1, j0, j1), -1.0);
  }
  auto [dtau, sym] = t_backward(dT, N, T, Ainv, tau2, nb);
  for (int64_t i0 = 0; i0 < k; i0 += nb) {  // rows i < k: columns < i1 of Y[i, :i1] (dN + dNᵀ)[:i1, :]
    const int64_t i1 = std::min(k, i0 + nb);
    gemm(blk(dY, i0, i1, 0, i1), blk(Y, i0, i1, 0, i1), blk(sym, 0, i1, 0, i1), 1.0);
  }
  gemm(rows(dY, k, m), rows(Y, k, m), sym, 1.0);
  auto dV = at::empty({B, m, n}, V.options());
  AT_DISPATCH_FLOATING_TYPES(dV.scalar_type(), "householder_assemble", [&] { assemble_dV_kernel<scalar_t>(dV, dY); });
  return {dV.view(V.sizes()), dtau.view(tau.sizes())};
}

// ---- householder_orthogonal ----------------------------------------------------------------------

Tensor householder_orthogonal_cpu(const Tensor& V) {
  check_reflectors("householder_orthogonal", V);
  const int64_t d = V.size(-2), k = V.size(-1), B = batch_numel(V, 2);
  const int64_t nb = panel_for(B);
  auto out_shape = V.sizes().vec();
  out_shape.back() = d;
  Tensor Q;
  if (k > 0 && B > 0 && small::use_for_dense(d, d, B)) {
    Q = at::empty({B, d, d}, V.options());
    const auto Vc = V.reshape({B, d, k}).contiguous();
    AT_DISPATCH_FLOATING_TYPES(Q.scalar_type(), "householder_orthogonal_small", [&] { small::apply<scalar_t>(Q, Vc, nullptr); });
    return Q.view(out_shape);
  }
  if (k == 0 || B == 0) {
    Q = at::zeros({B, d, d}, V.options());
  } else {
    const auto V3 = blas_view(V, B);
    const auto N = gram_upper(V3, nb);
    const auto Td = compute_T_diag(N, Tensor(), kTDiagBlock);  // tau = 2 / diag(N)
    Q = at::bmm(V3, apply_T_right(Td, N, V3, false, -1.0).mT());  // V (-T Vᵀ) = V (-V Tᵀ)ᵀ
  }
  Q.diagonal(0, 1, 2).add_(1);
  return Q.view(out_shape);
}

Tensor householder_orthogonal_backward_cpu(const Tensor& grad, const Tensor& V) {
  const char* op = "householder_orthogonal_backward";
  check_reflectors(op, V);
  const int64_t d = V.size(-2), k = V.size(-1), B = batch_numel(V, 2);
  auto out_shape = V.sizes().vec();
  out_shape.back() = d;
  check_grad(op, grad, V, out_shape);
  const int64_t nb = panel_for(B);
  if (k == 0 || B == 0 || d == 0) return at::zeros(V.sizes(), V.options());
  const auto G = grad.reshape({B, d, d});
  const auto V3 = blas_view(V, B);
  const auto N = gram_upper(V3, nb);
  const auto tau = tau_from_norms(N.diagonal(0, 1, 2));
  const auto [T, Ainv] = T_and_Ainv(N, tau);
  const auto GV = at::bmm(G, V3);
  const auto GtV = at::bmm(G.mT(), V3);
  // dT = -Vᵀ G V (upper triangle)
  auto dT = at::empty({B, k, k}, V.options());
  mul_upper(dT, V3.mT(), GV, -1.0, nb);
  auto [dtau, sym] = t_backward(dT, N, T, Ainv, tau, nb);
  // dV = V (dN + dNᵀ) - G V Tᵀ - Gᵀ V T - (dtau tau²) V
  auto dV = at::bmm(V3, sym);
  mul(dV, GV, kFull, T.mT(), kLower, -1.0, nb);
  mul(dV, GtV, kFull, T, kUpper, -1.0, nb);
  dV.sub_(V3 * (dtau * tau * tau).unsqueeze(1));
  return dV.view(V.sizes());
}

// ---- householder_apply ---------------------------------------------------------------------------
//
// In column panels of the reflectors, as LAPACK's ormqr: out = A_1 (A_2 (... (A_p X))) with
// A_I = I - V_I T_I V_Iᵀ and one T_I per panel of kApplyPanel reflectors. That is 4dkn + dk·w flops; one T
// of all k reflectors (the UT form of the other two ops) costs dk² for N = VᵀV plus k²n for the block
// substitution on top, which the OPT layer (n = C_out << d) would pay for nothing. The backward runs the
// panels in reverse on the recomputed panel inputs (kept: k/w copies of X).
// Measured against that single-T form (float32, 2 threads on a shared machine, t / t_bmm of a same-d bmm,
// ranges over 2-4 interleaved runs): d = k = 576, n = 64: forward 1.20-1.36 -> 0.45-0.56, forward+backward
// 5.9-8.5 -> 2.3-2.8 (batch 1 and 5; LAPACK ormqr, whose unit-lower V does half the flops: 0.29-0.39);
// d = k = 1024, n = 64: 0.86-0.94 -> 0.32, 4.6-5.0 -> 1.4-1.6; n = d = 576: no loss (2.0-2.8 / 8.8-14).
// Panel width 64 against 96 / 128: as fast or faster everywhere (128: forward 0.72 at d = 576, n = 64).
constexpr int64_t kApplyPanel = 64;

// Y <- A_1 ... A_p Y in place (Y contiguous [B, d, n]); with Xin ([p, B, d, n]) defined, Xin[I] receives
// the input of panel I, and the last panel's product (the output itself) is skipped.
void apply_panels(const Tensor& V3, const Tensor& Y, const Tensor& Xin) {
  const int64_t B = Y.size(0), k = V3.size(2), n = Y.size(2), w = std::min(kApplyPanel, k);
  const int64_t p = (k + w - 1) / w;
  auto W = at::empty({B, w, n}, Y.options());
  auto Z = at::empty({B, w, n}, Y.options());
  for (int64_t I = p - 1; I >= 0; --I) {
    const int64_t i0 = I * w, i1 = std::min(k, i0 + w);
    const auto VI = cols(V3, i0, i1);
    if (Xin.defined()) {
      Xin[I].copy_(Y);
      if (I == 0) break;
    }
    const auto N = at::bmm(VI.mT(), VI);  // T_I reads its strict upper part; diag = ||v||² gives tau
    const auto T = compute_T_diag(N, Tensor(), i1 - i0).select(1, 0);
    const auto WI = rows(W, 0, i1 - i0), ZI = rows(Z, 0, i1 - i0);
    gemm(WI, VI.mT(), Y, 1.0, 0.0);
    gemm(ZI, T, WI, 1.0, 0.0);
    gemm(Y, VI, ZI, -1.0);
  }
}

Tensor householder_apply_cpu(const Tensor& V, const Tensor& X) {
  check_apply("householder_apply", V, X);
  const int64_t d = V.size(-2), k = V.size(-1), n = X.size(-1), B = batch_numel(V, 2);
  const auto X3 = X.reshape({B, d, n});
  if (k == 0 || B == 0 || n == 0) return X3.clone(at::MemoryFormat::Contiguous).view(X.sizes());
  if (small::use_for_dense(d, n, B)) {
    auto out = at::empty({B, d, n}, X.options());
    const auto Vc = V.reshape({B, d, k}).contiguous();
    const auto Xc = X3.contiguous();
    AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "householder_apply_small", [&] { small::apply<scalar_t>(out, Vc, &Xc); });
    return out.view(X.sizes());
  }
  auto Y = X3.clone(at::MemoryFormat::Contiguous);
  apply_panels(blas_view(V, B), Y, Tensor());
  return Y.view(X.sizes());
}

// Panel I maps its input X_I to Y = X_I - V_I Z, Z = T_I W1, W1 = V_Iᵀ X_I. With G = dL/dY:
//     dT_I = -U W1ᵀ and dW1 = -T_Iᵀ U (U = V_Iᵀ G),  dV_I = V_I (dN + dNᵀ) - G Zᵀ + X_I dW1ᵀ - (dtau tau²) V_I,
//     dL/dX_I = G + V_I dW1,
// the full UT backward of one panel (t_backward), then on to the panel before it.
std::tuple<Tensor, Tensor> householder_apply_backward_cpu(const Tensor& grad, const Tensor& V, const Tensor& X) {
  const char* op = "householder_apply_backward";
  check_apply(op, V, X);
  check_grad(op, grad, V, X.sizes());
  const int64_t d = V.size(-2), k = V.size(-1), n = X.size(-1), B = batch_numel(V, 2);
  const int64_t nb = panel_for(B);
  auto G = grad.reshape({B, d, n}).clone(at::MemoryFormat::Contiguous);  // becomes dX
  if (k == 0 || B == 0 || d == 0) return {at::zeros(V.sizes(), V.options()), G.view(X.sizes())};
  const auto V3 = blas_view(V, B);
  const int64_t w = std::min(kApplyPanel, k), p = (k + w - 1) / w;
  auto Xin = at::empty({p, B, d, n}, X.options());
  apply_panels(V3, X.reshape({B, d, n}).clone(at::MemoryFormat::Contiguous), Xin);
  auto dV = at::empty({B, d, k}, V.options());
  for (int64_t I = 0; I < p; ++I) {
    const int64_t i0 = I * w, i1 = std::min(k, i0 + w), wi = i1 - i0;
    const auto VI = cols(V3, i0, i1);
    const auto& XI = Xin[I];
    const auto N = at::bmm(VI.mT(), VI);
    const auto tau = tau_from_norms(N.diagonal(0, 1, 2));
    const auto [T, Ainv] = T_and_Ainv(N, tau);
    const auto W1 = at::bmm(VI.mT(), XI);  // wi×n
    auto Z = at::zeros({B, wi, n}, V.options());
    mul(Z, T, kUpper, W1, kFull, 1.0, nb);  // T W1
    const auto U = at::bmm(VI.mT(), G);
    auto dT = at::empty({B, wi, wi}, V.options());
    mul_upper(dT, U, W1.mT(), -1.0, nb);  // -U W1ᵀ (upper triangle)
    auto dW1 = at::zeros({B, wi, n}, V.options());
    mul(dW1, T.mT(), kLower, U, kFull, -1.0, nb);  // -Tᵀ U
    const auto [dtau, sym] = t_backward(dT, N, T, Ainv, tau, nb);
    auto dVI = cols(dV, i0, i1);
    gemm(dVI, VI, sym, 1.0, 0.0);
    gemm(dVI, G, Z.mT(), -1.0);
    gemm(dVI, XI, dW1.mT(), 1.0);
    dVI.sub_(VI * (dtau * tau * tau).unsqueeze(1));
    gemm(G, VI, dW1, 1.0);  // dL/dX_I, the next panel's G
  }
  return {dV.view(V.sizes()), G.view(X.sizes())};
}

}  // namespace

TORCH_LIBRARY_IMPL(opt_fast, CPU, m) {
  m.impl("householder_product", &householder_product_cpu);
  m.impl("householder_product_backward", &householder_product_backward_cpu);
  m.impl("householder_orthogonal", &householder_orthogonal_cpu);
  m.impl("householder_orthogonal_backward", &householder_orthogonal_backward_cpu);
  m.impl("householder_apply", &householder_apply_cpu);
  m.impl("householder_apply_backward", &householder_apply_backward_cpu);
}

}  // namespace opt_fast
