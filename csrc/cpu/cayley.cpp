// Cayley transform on the CPU through ATen (LAPACK): Q = (I + S)(I - S)^-1.
// Same algorithm as opt_fast/reference/cayley.py (the spec): one inverse forward, using
// I + Q = 2 (I - S)^-1, and a backward of two matmuls on the saved output,
// grad_S = 1/2 (I + Q)^T G (I + Q)^T.
#include "../opt_fast.h"

namespace opt_fast {
namespace {

at::Tensor cayley_cpu(const at::Tensor& S) {
  check_square("cayley", "S", S);
  const int64_t d = S.size(-1);
  auto eye = eye_like(S, d);
  auto [M, info] = at::linalg_inv_ex(eye - S);
  if (S.numel() > 0) {
    TORCH_CHECK(!(info > 0).any().item<bool>(), "opt_fast.cayley: I - S is singular ",
                "(S must be skew-symmetric, or at least have no eigenvalue 1)");
  }
  M.mul_(2.0);
  M.diagonal(0, -2, -1).sub_(1.0);  // Q = 2 (I - S)^-1 - I, in place
  return M.contiguous();
}

at::Tensor cayley_backward_cpu(const at::Tensor& grad, const at::Tensor& Q) {
  check_grad_shape("cayley_backward", grad, Q.sizes());
  auto B = Q.mT() + eye_like(Q, Q.size(-1));  // (I + Q)^T, a new tensor: never write into Q
  return at::matmul(at::matmul(B, grad), B).mul_(0.5).contiguous();
}

}  // namespace

TORCH_LIBRARY_IMPL(opt_fast, CPU, m) {
  m.impl("cayley", &cayley_cpu);
  m.impl("cayley_backward", &cayley_backward_cpu);
}

}  // namespace opt_fast
