// Shared input checks for the C++ kernels. Messages match opt_fast/_checks.py word for word up to the
// dtype spelling, so a user gets the same error whichever kernel serves the call.
#pragma once

#include <ATen/ATen.h>
#include <torch/library.h>

namespace opt_fast {

inline void check_float_matrix(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.defined(), "opt_fast.", op, ": expected ", name, " to be a Tensor, got None");
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, "opt_fast.", op,
              ": expected ", name, " to be float32 or float64, got ", t.scalar_type());
  TORCH_CHECK(t.dim() >= 2, "opt_fast.", op, ": expected ", name,
              " to have at least 2 dimensions [..., rows, cols], got shape ", t.sizes());
}

inline void check_square(const char* op, const char* name, const at::Tensor& t) {
  check_float_matrix(op, name, t);
  TORCH_CHECK(t.size(-1) == t.size(-2), "opt_fast.", op, ": expected ", name,
              " to be square [..., d, d], got shape ", t.sizes());
}

inline void check_same_device_dtype(const char* op, const char* a, const at::Tensor& ta, const char* b,
                                    const at::Tensor& tb) {
  TORCH_CHECK(ta.device() == tb.device(), "opt_fast.", op, ": expected ", a, " and ", b,
              " on the same device, got ", ta.device(), " and ", tb.device());
  TORCH_CHECK(ta.scalar_type() == tb.scalar_type(), "opt_fast.", op, ": expected ", a, " and ", b,
              " to have the same dtype, got ", ta.scalar_type(), " and ", tb.scalar_type());
}

// Upper bounds of the count arguments (opt_fast/_checks.py: MAX_TERMS, MAX_ITERS).
constexpr int64_t kMaxTerms = 1000;
constexpr int64_t kMaxIters = 1000;

inline void check_count(const char* op, const char* name, int64_t value, int64_t cap, const char* meaning) {
  TORCH_CHECK(value >= 0 && value <= cap, "opt_fast.", op, ": expected ", name, " >= 0 (", meaning,
              ") and at most ", cap, ", got ", value);
}

// A backward op's tensor ``t`` has the forward's shape and ``like``'s device and dtype.
inline void check_like(const char* op, const char* name, const at::Tensor& t, at::IntArrayRef shape,
                       const char* like_name, const at::Tensor& like) {
  TORCH_CHECK(t.defined(), "opt_fast.", op, ": expected ", name, " to be a Tensor, got None");
  TORCH_CHECK(t.sizes() == shape, "opt_fast.", op, ": expected ", name, " of shape ", shape, ", got ", t.sizes());
  check_same_device_dtype(op, name, t, like_name, like);
}

inline void check_grad_shape(const char* op, const at::Tensor& grad, at::IntArrayRef shape) {
  TORCH_CHECK(grad.sizes() == shape, "opt_fast.", op, ": expected grad of shape ", shape, ", got ",
              grad.sizes());
}

// Number of matrices in t: the product of its leading dims, all but the last nd.
inline int64_t batch_numel(const at::Tensor& t, int64_t nd = 2) {
  int64_t b = 1;
  for (int64_t i = 0; i + nd < t.dim(); ++i) b *= t.size(i);
  return b;
}

// Identity matrix of size d with t's dtype and device.
inline at::Tensor eye_like(const at::Tensor& t, int64_t d) { return at::eye(d, t.options()); }

// A kernel run below ADInplaceOrView: the views it makes internally (a reshape back to the caller's batch
// shape, a slice of a workspace) come back as plain tensors, so a caller may modify an op's output in
// place under autograd, as it may a matmul's (a tracked view made inside the op's autograd Function may
// not be). Register kernels as m.impl("op", OPT_FAST_KERNEL(op_cpu)).
template <auto F>
struct BelowInplaceOrView;
template <typename R, typename... A, R (*F)(A...)>
struct BelowInplaceOrView<F> {
  static R call(A... args) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return F(std::forward<A>(args)...);
  }
};
#define OPT_FAST_KERNEL(fn) (&::opt_fast::BelowInplaceOrView<&fn>::call)

}  // namespace opt_fast
