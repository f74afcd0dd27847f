// Torch glue of householder_apply (H(v_1) ... H(v_k) X without forming the d×d product) and
// householder_apply_backward on CUDA. Paths, reflector rescaling and shared pieces: householder_ut_cuda.h.
#include "householder_ut_cuda.h"

#include <tuple>

namespace opt_fast {
namespace householder_cuda {
namespace {

Tensor householder_apply_cuda(const Tensor& V, const Tensor& X) {
  check_apply("householder_apply", V, X);
  CudaScope scope(V);
  const int64_t d = V.size(-2), kk = V.size(-1), n = X.size(-1), B = batch_numel(V, 2);
  const auto X3 = X.reshape({B, d, n});
  if (kk == 0 || B == 0 || n == 0 || d == 0) return X3.clone(at::MemoryFormat::Contiguous).view(X.sizes());
  const auto V3 = V.reshape({B, d, kk});
  if (use_small(d, n, V)) return small_forward(k::SmallMode::kDense, V3, Tensor(), X3, n, kk, scope.stream).view(X.sizes());
  const auto Vs = rescale_reflectors(V3, scope.stream).V;
  const auto N = at::bmm(Vs.mT(), Vs);
  const auto T = compute_T(N, tau_from_gram(N, scope.stream), scope.stream);
  const auto Z = at::bmm(T, at::bmm(Vs.mT(), X3));  // T (Vᵀ X)
  return at::baddbmm(X3, Vs, Z, 1.0, -1.0).contiguous().view(X.sizes());
}

std::tuple<Tensor, Tensor> householder_apply_backward_cuda(const Tensor& grad, const Tensor& V, const Tensor& X) {
  const char* op = "householder_apply_backward";
  check_apply(op, V, X);
  check_grad(op, grad, V, X.sizes());
  CudaScope scope(V);
  const int64_t d = V.size(-2), kk = V.size(-1), n = X.size(-1), B = batch_numel(V, 2);
  const auto G = grad.reshape({B, d, n});
  if (kk == 0 || B == 0 || d == 0 || n == 0) {
    return {at::zeros(V.sizes(), V.options()), G.clone(at::MemoryFormat::Contiguous).view(X.sizes())};
  }
  const auto s = rescale_reflectors(V.reshape({B, d, kk}), scope.stream);
  const auto X3 = X.reshape({B, d, n});
  const auto N = at::bmm(s.V.mT(), s.V);
  const auto tau = tau_from_gram(N, scope.stream);
  const auto W1 = at::bmm(s.V.mT(), X3);
  auto g = ut_backward(G, s.V, tau, W1, N, scope.stream);
  g.dY.baddbmm_(X3, g.dW1.mT());                      // + X dW1ᵀ, the path through W1 = Vᵀ X
  auto dV = dense_dV(g.dY, Tensor(), s, g.dtau, tau, scope.stream);  // divided by p
  auto dX = at::baddbmm(G, s.V, g.dW1);                // G + V dW1 (scale-free)
  return {dV.view(V.sizes()), dX.contiguous().view(X.sizes())};
}

}  // namespace

TORCH_LIBRARY_IMPL(opt_fast, CUDA, m) {
  m.impl("householder_apply", OPT_FAST_KERNEL(householder_apply_cuda));
  m.impl("householder_apply_backward", OPT_FAST_KERNEL(householder_apply_backward_cuda));
}

}  // namespace householder_cuda
}  // namespace opt_fast
