// householder_product (LAPACK orgqr convention: V [..., m, n] from geqrf, tau [..., k]) and
// householder_product_backward on the CPU. Spec: opt_fast/reference/householder.py; the shared UT form is
// householder_ut.h, the structured products householder_panels.h, the small-m path householder_small.h.
//
//   * Y = the unit-lower-trapezoidal part of V, copied in V's own orientation (LAPACK's geqrf hands out
//     column-major V), so that the copy never transposes; N = striu(YᵀY) skips the zero rows above each
//     column panel.
//   * Y[:n]ᵀ is upper trapezoidal, so W = T Y[:n]ᵀ is; Q = I[:, :n] - Y W is an LU-like product done as
//     rank-nb updates into the output (the first one writes it, so no zero fill), and the identity is never
//     multiplied (Yᵀ I[:, :n] = Y[:n]ᵀ).
//   * backward: only the strictly lower part of dY is formed (the rest of V is not read by the forward).
// Measured 2026-11-23 (AMD EPYC, 2 cores shared with other jobs, MKL, 2 threads, float32, batch 1,
// d = k = 512; ad-hoc script, not a committed benchmark): per run, medians of 51 interleaved forward repeats
// and of 7 torch / 21 opt_fast forward+backward repeats; six runs under a light load from other jobs (load
// average 0.8-1.3), range over the runs:
//   (a) householder_product fwd / torch.linalg.householder_product (MKL orgqr):   0.80 - 0.95   (target <= 1)
//   (b) torch.linalg.householder_product fwd+bwd (autograd) / opt_fast fwd+bwd:  11.4x - 15.4x (target >= 10x)
//       (torch 211-321 ms, opt_fast 16.5-23 ms)
// Under heavier contention the many mid-size GEMMs suffer more than one mm or LAPACK call: margins shrink.
#include "../householder_checks.h"
#include "../opt_fast.h"
#include "householder_panels.h"
#include "householder_small.h"
#include "householder_ut.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <tuple>

namespace opt_fast {
namespace {

using at::Tensor;
using namespace householder;

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

// W = alpha T Y[:n]ᵀ [B, k, n] (upper trapezoidal) from the full T.
Tensor product_W(const Tensor& T, const Tensor& Y, int64_t n, double alpha, int64_t nb) {
  const int64_t B = Y.size(0), k = Y.size(2);
  auto W = at::zeros({B, k, n}, Y.options());
  mul(cols(W, 0, k), T, kUpper, rows(Y, 0, k).mT(), kUpper, alpha, nb);
  if (n > k) mul(cols(W, k, n), T, kUpper, rows(Y, k, n).mT(), kFull, alpha, nb);
  return W;
}

// ---- forward and backward ---------------------------------------------------------------------------

// The level-3 UT form does ~2x orgqr's flops and wins only where its large GEMMs thread better than
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

}  // namespace

TORCH_LIBRARY_IMPL(opt_fast, CPU, m) {
  m.impl("householder_product", OPT_FAST_KERNEL(householder_product_cpu));
  m.impl("householder_product_backward", OPT_FAST_KERNEL(householder_product_backward_cpu));
}

}  // namespace opt_fast
