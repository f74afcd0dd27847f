// Input checks of the Householder ops, shared by the CPU (cpu/householder.cpp) and CUDA
// (cuda/householder_cuda.cpp) kernels; wording of opt_fast/_checks.py.
#pragma once

#include "opt_fast.h"

namespace opt_fast {

inline void check_same_batch(const char* op, const char* a, const at::Tensor& ta, int64_t a_nd, const char* b,
                             const at::Tensor& tb, int64_t b_nd) {
  const auto ba = ta.sizes().slice(0, ta.dim() - a_nd);
  const auto bb = tb.sizes().slice(0, tb.dim() - b_nd);
  TORCH_CHECK(ba == bb, "opt_fast.", op, ": expected ", a, " and ", b,
              " to have the same batch dimensions, got ", a, " ", ta.sizes(), " and ", b, " ", tb.sizes());
}

inline void check_product(const char* op, const at::Tensor& V, const at::Tensor& tau) {
  check_float_matrix(op, "V", V);
  TORCH_CHECK(tau.defined() && tau.dim() >= 1, "opt_fast.", op,
              ": expected tau to be a Tensor with at least 1 dimension [..., k]");
  check_same_device_dtype(op, "V", V, "tau", tau);
  const int64_t m = V.size(-2), n = V.size(-1), k = tau.size(-1);
  TORCH_CHECK(m >= n, "opt_fast.", op, ": expected V [..., m, n] with m >= n, got shape ", V.sizes());
  TORCH_CHECK(k <= n, "opt_fast.", op, ": expected k = tau.shape[-1] <= n = V.shape[-1], got k = ", k,
              " and V of shape ", V.sizes());
  check_same_batch(op, "V", V, 2, "tau", tau, 1);
}

inline void check_reflectors(const char* op, const at::Tensor& V) {
  check_float_matrix(op, "V", V);
  TORCH_CHECK(V.size(-1) <= V.size(-2), "opt_fast.", op,
              ": expected V [..., d, k] with k <= d reflectors, got shape ", V.sizes());
}

// householder_orthogonal's output shape for V [..., d, k]: [..., d, d].
inline std::vector<int64_t> orthogonal_shape(const at::Tensor& V) {
  auto shape = V.sizes().vec();
  shape.back() = V.size(-2);
  return shape;
}

inline void check_apply(const char* op, const at::Tensor& V, const at::Tensor& X) {
  check_float_matrix(op, "V", V);
  check_float_matrix(op, "X", X);
  check_same_device_dtype(op, "V", V, "X", X);
  TORCH_CHECK(V.size(-1) <= V.size(-2), "opt_fast.", op,
              ": expected V [..., d, k] with k <= d reflectors, got shape ", V.sizes());
  TORCH_CHECK(X.size(-2) == V.size(-2), "opt_fast.", op, ": expected X [..., d, n] with d = V.shape[-2] = ",
              V.size(-2), ", got X of shape ", X.sizes());
  check_same_batch(op, "V", V, 2, "X", X, 2);
}

inline void check_grad(const char* op, const at::Tensor& grad, const at::Tensor& like, at::IntArrayRef shape) {
  check_grad_shape(op, grad, shape);
  check_same_device_dtype(op, "grad", grad, "V", like);
}

}  // namespace opt_fast
