// householder_orthogonal (Q = H(v_1) ... H(v_k), H(v) = I - 2vvᵀ/vᵀv, as a d×d matrix) and
// householder_orthogonal_backward on the CPU. Spec: opt_fast/reference/householder.py; the shared UT form
// is householder_ut.h, the structured products householder_panels.h, the small-d path householder_small.h.
//
//   * a reflector whose vᵀv (the diagonal of N) over- or underflows is rescaled by a power of two
//     (reflectors_with_gram, householder_ut.h);
//   * Q = I - V W with the sign folded into W = -T Vᵀ (block substitution, apply_T_right): one GEMM, then +1
//     on the diagonal; tau = 2 / diag(VᵀV) comes for free from N.
// Measured 2026-11-23 (AMD EPYC, 2 cores shared with other jobs, MKL, 2 threads, float32, batch 1,
// d = k = 512; medians of 51 interleaved forward repeats, six runs, range over the runs):
//   householder_orthogonal fwd / torch.mm 512×512: 2.68 - 2.90 (target <= 3).
#include "../householder_checks.h"
#include "../opt_fast.h"
#include "householder_panels.h"
#include "householder_small.h"
#include "householder_ut.h"

#include <ATen/Dispatch.h>

namespace opt_fast {
namespace {

using at::Tensor;
using namespace householder;

Tensor householder_orthogonal_cpu(const Tensor& V) {
  check_reflectors("householder_orthogonal", V);
  const int64_t d = V.size(-2), k = V.size(-1), B = batch_numel(V, 2);
  const int64_t nb = panel_for(B);
  const auto out_shape = orthogonal_shape(V);
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
    const auto [scaled, N] = reflectors_with_gram(blas_view(V, B), [nb](const Tensor& A) { return gram_upper(A, nb); });
    const auto& V3 = scaled.V;
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
  const auto out_shape = orthogonal_shape(V);
  check_grad(op, grad, V, out_shape);
  const int64_t nb = panel_for(B);
  if (k == 0 || B == 0 || d == 0) return at::zeros(V.sizes(), V.options());
  const auto G = grad.reshape({B, d, d});
  const auto [scaled, N] = reflectors_with_gram(blas_view(V, B), [nb](const Tensor& A) { return gram_upper(A, nb); });
  const auto& V3 = scaled.V;
  const auto tau = tau_from_norms(N.diagonal(0, 1, 2));
  const auto [T, Ainv] = T_and_Ainv(N, tau);
  const auto GV = at::bmm(G, V3);
  const auto GtV = at::bmm(G.mT(), V3);
  // dT = -Vᵀ G V (upper triangle)
  auto dT = at::empty({B, k, k}, V.options());
  mul_upper(dT, V3.mT(), GV, -1.0, nb);
  auto [dtau, sym] = t_backward(dT, N, T, Ainv, tau, nb);
  // dV = V (dN + dNᵀ) - G V Tᵀ - Gᵀ V T - (dtau tau²) V, at the rescaled V; then divided by the scale
  auto dV = at::bmm(V3, sym);
  mul(dV, GV, kFull, T.mT(), kLower, -1.0, nb);
  mul(dV, GtV, kFull, T, kUpper, -1.0, nb);
  dV.sub_(V3 * (dtau * tau * tau).unsqueeze(1));
  unscale_grad_(dV, scaled);
  return dV.view(V.sizes());
}

}  // namespace

TORCH_LIBRARY_IMPL(opt_fast, CPU, m) {
  m.impl("householder_orthogonal", OPT_FAST_KERNEL(householder_orthogonal_cpu));
  m.impl("householder_orthogonal_backward", OPT_FAST_KERNEL(householder_orthogonal_backward_cpu));
}

}  // namespace opt_fast
