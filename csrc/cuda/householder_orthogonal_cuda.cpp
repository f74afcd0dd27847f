// Torch glue of householder_orthogonal (Q = H(v_1) ... H(v_k), H(v) = I - 2vvᵀ/vᵀv) and
// householder_orthogonal_backward on CUDA. Paths, reflector rescaling and shared pieces: householder_ut_cuda.h.
#include "householder_ut_cuda.h"

#include <tuple>

namespace opt_fast {
namespace householder_cuda {
namespace {

Tensor householder_orthogonal_cuda(const Tensor& V) {
  check_reflectors("householder_orthogonal", V);
  CudaScope scope(V);
  const int64_t d = V.size(-2), kk = V.size(-1), B = batch_numel(V, 2);
  const auto out_shape = orthogonal_shape(V);
  if (kk == 0 || B == 0 || d == 0) return at::eye(d, V.options()).expand({B, d, d}).contiguous().view(out_shape);
  const auto V3 = V.reshape({B, d, kk});
  if (use_small(d, d, V)) return small_forward(k::SmallMode::kDense, V3, Tensor(), Tensor(), d, kk, scope.stream).view(out_shape);
  const auto Vs = rescale_reflectors(V3, scope.stream).V;
  const auto N = at::bmm(Vs.mT(), Vs);
  const auto T = compute_T(N, tau_from_gram(N, scope.stream), scope.stream);
  auto Q = at::bmm(Vs, at::bmm(T, Vs.mT()));
  eye_minus_(Q, scope.stream);
  return Q.view(out_shape);
}


Tensor householder_orthogonal_backward_cuda(const Tensor& grad, const Tensor& V) {
  const char* op = "householder_orthogonal_backward";
  check_reflectors(op, V);
  const int64_t d = V.size(-2), kk = V.size(-1), B = batch_numel(V, 2);
  const auto out_shape = orthogonal_shape(V);
  check_grad(op, grad, V, out_shape);
  CudaScope scope(V);
  if (kk == 0 || B == 0 || d == 0) return at::zeros(V.sizes(), V.options());
  const auto G = grad.reshape({B, d, d});
  const auto s = rescale_reflectors(V.reshape({B, d, kk}), scope.stream);
  const auto N = at::bmm(s.V.mT(), s.V);
  const auto tau = tau_from_gram(N, scope.stream);
  auto g = ut_backward(G, s.V, tau, s.V.mT(), N, scope.stream);
  // dV = (dY + dW1ᵀ (W1 = Vᵀ) - (dtau tau²) V) / p (tau = 2/||v||², all at the rescaled V)
  return dense_dV(g.dY, g.dW1, s, g.dtau, tau, scope.stream).view(V.sizes());
}

}  // namespace

TORCH_LIBRARY_IMPL(opt_fast, CUDA, m) {
  m.impl("householder_orthogonal", OPT_FAST_KERNEL(householder_orthogonal_cuda));
  m.impl("householder_orthogonal_backward", OPT_FAST_KERNEL(householder_orthogonal_backward_cuda));
}

}  // namespace householder_cuda
}  // namespace opt_fast
