// householder_apply (H(v_1) ... H(v_k) X without forming the d×d product) and householder_apply_backward on
// the CPU. Spec: opt_fast/reference/householder.py; the shared UT form is householder_ut.h, the structured
// products householder_panels.h, the small-d path householder_small.h. A panel of reflectors whose vᵀv
// over- or underflows is rescaled by powers of two (reflectors_with_gram, householder_ut.h).
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
#include "../householder_checks.h"
#include "../opt_fast.h"
#include "householder_panels.h"
#include "householder_small.h"
#include "householder_ut.h"

#include <ATen/Dispatch.h>

#include <algorithm>
#include <cstdint>
#include <tuple>

namespace opt_fast {
namespace {

using at::Tensor;
using namespace householder;

constexpr int64_t kApplyPanel = 64;

// Y <- A_1 ... A_p Y in place (Y contiguous [B, d, n]); with Xin ([p, B, d, n]) defined, Xin[I] receives
// the input of panel I, and the last panel's product (the output itself) is skipped.
// The Gram matrix of one panel of reflectors.
Tensor gram(const Tensor& VI) { return at::bmm(VI.mT(), VI); }

void apply_panels(const Tensor& V3, const Tensor& Y, const Tensor& Xin) {
  const int64_t B = Y.size(0), k = V3.size(2), n = Y.size(2), w = std::min(kApplyPanel, k);
  const int64_t p = (k + w - 1) / w;
  auto W = at::empty({B, w, n}, Y.options());
  auto Z = at::empty({B, w, n}, Y.options());
  for (int64_t I = p - 1; I >= 0; --I) {
    const int64_t i0 = I * w, i1 = std::min(k, i0 + w);
    if (Xin.defined()) {
      Xin[I].copy_(Y);
      if (I == 0) break;
    }
    // T_I reads N's strict upper part; diag = ||v||² gives tau
    const auto [scaled, N] = reflectors_with_gram(cols(V3, i0, i1), gram);
    const auto& VI = scaled.V;
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
// the full UT backward of one panel (t_backward), then on to the panel before it. A panel whose reflectors
// are rescaled (as in the forward) runs at the rescaled V_I; its dV_I is then divided by the scale.
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
    const auto [scaled, N] = reflectors_with_gram(cols(V3, i0, i1), gram);
    const auto& VI = scaled.V;
    const auto& XI = Xin[I];
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
    unscale_grad_(dVI, scaled);  // the gradient at the rescaled V_I, divided by the scale
  }
  return {dV.view(V.sizes()), G.view(X.sizes())};
}


}  // namespace

TORCH_LIBRARY_IMPL(opt_fast, CPU, m) {
  m.impl("householder_apply", OPT_FAST_KERNEL(householder_apply_cpu));
  m.impl("householder_apply_backward", OPT_FAST_KERNEL(householder_apply_backward_cpu));
}

}  // namespace opt_fast
