// The UT / compact-WY form shared by the CPU Householder kernels (householder_product.cpp,
// householder_orthogonal.cpp, householder_apply.cpp); the spec is opt_fast/reference/householder.py:
//     H_1 ... H_k = I - Y T Yᵀ,   T = (I + D N)⁻¹ D = A⁻¹ D,   D = diag(tau),  N = striu(YᵀY),
// level 3 throughout (no loop over reflectors), never dividing by tau (tau = 0 needs no special case),
// and exploiting the triangular structure with a few wide panels (householder_panels.h).
//   * N: upper triangle of YᵀY only, in column panels (SYRK-like).
//   * T is never formed in a forward: only its diagonal blocks T_II (96×96, one substitution pass per block
//     straight from N, compute_T_diag), then products with T by block substitution on A W = D Yᵀ,
//         W_I = T_II (Yᵀ_I - N_{I,>I} W_{>I}),   last block first   (apply_T_right),
//     which costs the same as a TRMM with the full T and saves forming T's off-diagonal blocks (~10% faster
//     than full T + TRMM; T_II of 64, 96, 128: 96 marginally best).
//   * backward: recomputes N and, in one batched call, the full T and A⁻¹ = (I + D N)⁻¹ (T_and_Ainv:
//     leaves of 32 by substitution, then T12 = -T11 N12 T22 level by level as batched GEMMs over all sibling
//     pairs); memory O(batch·(d·k + k²)) beyond inputs/outputs, nothing saved per reflector. Then the
//     reverse of the same steps (_ut_backward of the reference, t_backward here): S = A⁻ᵀ dT (block-upper
//     part only), P = S Tᵀ (upper part only), dtau = diag(S) - rowsum(P ∘ N), dN = -striu(D P), all without
//     a TRSM.
// Measured against a blocked orgqr-like backward accumulation (Q_{>=I} = Q_{>I} - Y_I T_II (Y_Iᵀ Q_{>I})):
// the same GEMM flops (~2.25 GEMMs for householder_orthogonal, ~1.1 for householder_product with panels of
// 128), and the UT form 5-10% faster (AMD EPYC, 2 shared cores, MKL, float32, batch 1, d = k = 512).
//
// The dense ops (H(v) = I - 2vvᵀ/vᵀv) rescale a reflector by a power of two where its vᵀv over- or
// underflows (reflectors_with_gram): H(v) does not depend on ||v||, vᵀv does.
#pragma once

#include "householder_panels.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <utility>

namespace opt_fast {
namespace householder {

// Diagonal blocks of T formed for the forward substitution (apply_T_right).
constexpr int64_t kTDiagBlock = 96;
constexpr int64_t kMaxTDiagBlock = 128;

// T = (I + D N)⁻¹ D for each of a batch: N [B, k, k] (strict upper triangle used), tau [B, k]; a new
// contiguous [B, k, k] (zero below the diagonal).
Tensor compute_T(const Tensor& N, const Tensor& tau);

// The diagonal blocks T_II (size bs <= 128; the last one zero-padded) of T, as [B, P, bs, bs]: all that the
// block substitution of apply_T_right needs. N's diagonal blocks are read (strict upper triangles, N with
// unit stride along its last dimension). tau: [B, k], or undefined for the dense ops, where
// tau_i = 2 / N_ii (0 when N_ii is not > 0) is formed on the fly.
Tensor compute_T_diag(const Tensor& N, const Tensor& tau, int64_t bs);

// Z = sign · C Tᵀ (= sign · (T Cᵀ)ᵀ) for T = (I + D N)⁻¹ D given only its diagonal blocks T_II (Td from
// compute_T_diag), by block substitution on A T = D (A = I + D N, A_IJ = D_I N_IJ), last block column first:
//     Z_:I = (C_:I - Z_:>I N_{I,>I}ᵀ) T_IIᵀ,
// so that T's off-diagonal blocks are never formed. C [B, c, k] is only read. With trap, C (and so Z) is
// lower trapezoidal and the zero blocks are skipped (Z is then returned with its zeros).
Tensor apply_T_right(const Tensor& Td, const Tensor& N, const Tensor& C, bool trap, double sign);

// tau = 2/||v||² (0 for v = 0, also for a NaN column, as in the reference's torch.where(sq > 0, ...)).
Tensor tau_from_norms(const Tensor& sq);

// N = upper triangle of VᵀV for dense V (the diagonal holds ||v||²; below the diagonal blocks: anything).
Tensor gram_upper(const Tensor& V3, int64_t nb);

// The backward's factors: T = (I + D N)⁻¹ D and A⁻¹ = (I + D N)⁻¹, in one batched compute_T call
// (A⁻¹ is T for N -> D N, tau -> 1).
std::pair<Tensor, Tensor> T_and_Ainv(const Tensor& N, const Tensor& tau);

// From dT (upper triangle used; dT is overwritten) to (dtau, dN + dNᵀ), the reverse of T = A⁻¹ D with
// A = I + D N:  S = A⁻ᵀ dT, P = S Tᵀ (= -dA), dtau = diag(S) - rowsum(P ∘ N), dN = -striu(D P).
// Only the block-upper part of S and the upper triangle of P are formed. All inputs contiguous.
std::pair<Tensor, Tensor> t_backward(const Tensor& dT, const Tensor& N, const Tensor& T, const Tensor& Ainv,
                                     const Tensor& tau, int64_t nb);

// ---- reflector scaling (the dense ops) ------------------------------------------------------------
//
// H(v) does not depend on ||v||, but vᵀv over- or underflows long before v does (float32 from |v| ~ 1e±19).
// The rule (the reference's _reflector_scale): each reflector v is divided by the power of two
// p = 2^(e-1), max_i |v_i| = m·2^e with m in [1/2, 1) (frexp), so that max |v/p| lies in [1, 2); p is at
// least the smallest normal number (so 1/p is representable), and p = 1 for a zero or non-finite column.
// Multiplying by a power of two is exact, so rescaling changes no bit of the result while the products stay
// in the normal range: the CPU kernels form vᵀv as they always do (the Gram matrix N, or the small path's
// sum), and rescale only the reflectors whose vᵀv left the range in which the UT form is safe, then form it
// again. The common case pays one comparison per reflector: about 1% at d = 27 and within noise at
// d = 144 and 576, where rescaling on every call (a copy of V, a frexp per column) cost 2-5% at d = 27 and
// 144 and 3-17% for a batch of 64 at d = 27 (float32, 1 thread, interleaved in one process). The gradient
// w.r.t. v is the gradient at v/p divided by p.

// 1/p for a reflector whose largest |entry| is amax.
template <typename T>
inline T reflector_inv_scale(T amax) {
  if (!(amax > T(0)) || !std::isfinite(amax)) return T(1);
  int e = 0;
  std::frexp(amax, &e);
  // 2^(min_exponent - 1) is the smallest normal number: p = 2^(e-1) >= it
  return std::ldexp(T(1), 1 - std::max(e, std::numeric_limits<T>::min_exponent));
}

// 2^n as a constant.
template <typename T>
constexpr T pow2(int n) {
  T r = 1;
  for (; n > 0; --n) r *= 2;
  for (; n < 0; ++n) r /= 2;
  return r;
}

// Whether a computed vᵀv = sq calls for rescaling: outside [2^-s, 2^s], s = max_exponent / 3 (float32: 42,
// float64: 341), where the most extreme quantity of the forward and backward, tau² ~ (vᵀv)⁻², stays inside
// the normal range and the squares lost to underflow weigh < 2^-s. A NaN (a NaN entry: p = 1) is left as
// it is; 0 is fine for the zero vector only, which the caller checks.
template <typename T>
inline bool norm2_out_of_range(T sq) {
  constexpr int s = std::numeric_limits<T>::max_exponent / 3;
  constexpr T lo = pow2<T>(-s), hi = pow2<T>(s);
  return (sq < lo || sq > hi) && !std::isnan(sq);
}

struct Scaled {
  Tensor V;    // [B, d, k]: V as it was, or V with column j multiplied by 1/p_j (a contiguous copy)
  Tensor inv;  // [B, 1, k]: 1/p per reflector, or undefined where V was not rescaled
};

// V3 [B, d, k] rescaled by the rule: a contiguous copy.
Scaled rescale_reflectors(const Tensor& V3);

// Whether some reflector of V3 has a diagonal entry N_jj = vᵀv (N [B, k, k], any strides) out of range
// (norm2_out_of_range), a zero only counting where the column of V3 is not zero.
bool gram_needs_rescale(const Tensor& N, const Tensor& V3);

// The reflectors for the UT form and their Gram matrix N = gram(V) (at least the upper triangle): V3 as it
// is when every vᵀv is in range, else V3 rescaled and N formed again.
template <class Gram>
std::pair<Scaled, Tensor> reflectors_with_gram(const Tensor& V3, const Gram& gram) {
  Scaled s{V3, Tensor()};
  Tensor N = gram(V3);
  if (gram_needs_rescale(N, V3)) {
    s = rescale_reflectors(V3);
    N = gram(s.V);
  }
  return {s, N};
}

// dV *= inv (the gradient at the rescaled reflectors -> the gradient at V), where V was rescaled.
inline void unscale_grad_(const Tensor& dV, const Scaled& s) {
  if (s.inv.defined()) dV.mul_(s.inv);
}

}  // namespace householder
}  // namespace opt_fast
