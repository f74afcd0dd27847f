// Torch glue of householder_product and householder_product_backward on CUDA (LAPACK orgqr convention:
// V [..., m, n] from geqrf, tau [..., k]). Paths and shared pieces: householder_ut_cuda.h.
#include "householder_ut_cuda.h"

#include <tuple>

namespace opt_fast {
namespace householder_cuda {
namespace {

Tensor householder_product_cuda(const Tensor& V, const Tensor& tau) {
  check_product("householder_product", V, tau);
  CudaScope scope(V);
  const int64_t m = V.size(-2), n = V.size(-1), kk = tau.size(-1), B = batch_numel(V, 2);
  if (kk == 0 || B == 0 || m == 0) return at::eye(m, n, V.options()).expand({B, m, n}).contiguous().view(V.sizes());
  const auto V3 = V.reshape({B, m, n});
  const auto tau2 = tau.reshape({B, kk}).contiguous();
  if (use_small(m, n, V)) return small_forward(k::SmallMode::kProduct, V3, tau2, Tensor(), n, kk, scope.stream).view(V.sizes());
  const auto Y = unit_lower(V3, kk, scope.stream);
  const auto N = at::bmm(Y.mT(), Y);
  const auto T = compute_T(N, tau2, scope.stream);
  const auto W = at::bmm(T, Y.narrow(1, 0, n).mT());  // T Y[:n]ᵀ, k × n
  auto Q = at::bmm(Y, W);
  eye_minus_(Q, scope.stream);
  return Q.view(V.sizes());
}

std::tuple<Tensor, Tensor> householder_product_backward_cuda(const Tensor& grad, const Tensor& V, const Tensor& tau) {
  const char* op = "householder_product_backward";
  check_product(op, V, tau);
  check_grad(op, grad, V, V.sizes());
  CudaScope scope(V);
  const int64_t m = V.size(-2), n = V.size(-1), kk = tau.size(-1), B = batch_numel(V, 2);
  if (kk == 0 || B == 0 || m == 0) return {at::zeros(V.sizes(), V.options()), at::zeros(tau.sizes(), tau.options())};
  const auto G = grad.reshape({B, m, n});
  const auto Y = unit_lower(V.reshape({B, m, n}), kk, scope.stream);
  const auto tau2 = tau.reshape({B, kk}).contiguous();
  const auto N = at::bmm(Y.mT(), Y);
  const auto W1 = Y.narrow(1, 0, n).mT();  // Yᵀ I[:, :n] = Y[:n]ᵀ
  auto g = ut_backward(G, Y, tau2, W1, N, scope.stream);
  auto dV = at::empty({B, m, n}, V.options());
  const auto dY = g.dY.contiguous(), dW1 = g.dW1.contiguous();
  AT_DISPATCH_FLOATING_TYPES(V.scalar_type(), "householder_product_dV_cuda", [&] {
    C10_CUDA_CHECK(k::product_dV<scalar_t>(dY.const_data_ptr<scalar_t>(), dW1.const_data_ptr<scalar_t>(),
                                           dV.data_ptr<scalar_t>(), B, m, n, kk, scope.stream));
  });
  return {dV.view(V.sizes()), g.dtau.view(tau.sizes())};
}

}  // namespace

TORCH_LIBRARY_IMPL(opt_fast, CUDA, m) {
  m.impl("householder_product", OPT_FAST_KERNEL(householder_product_cuda));
  m.impl("householder_product_backward", OPT_FAST_KERNEL(householder_product_backward_cuda));
}

}  // namespace householder_cuda
}  // namespace opt_fast
