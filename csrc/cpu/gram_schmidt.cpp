// Gram-Schmidt on the CPU: Q of P = QR with diag(R) > 0 (opt_fast/reference/gram_schmidt.py is the spec),
// forward and backward, batched over leading dims, tall P (m >= n) included.
//
// HEADER_PLACEHOLDER
#include "../opt_fast.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>

namespace opt_fast {
namespace {

using at::Tensor;

// Panel width of the structured (triangular) products of the backward: GEMMs much narrower than 128 run
// far from peak on this machine, wider panels waste flops on zero triangles (as in householder.cpp).
constexpr int64_t kPanel = 128;

void check_forward(const Tensor& P, int64_t block_size) {
  const char* op = "gram_schmidt";
  check_float_matrix(op, "P", P);
  TORCH_CHECK(P.size(-1) <= P.size(-2), "opt_fast.", op,
              ": expected P [..., m, n] with m >= n (a wide matrix has no n orthonormal columns), got shape ",
              P.sizes());
  TORCH_CHECK(block_size >= 0, "opt_fast.", op, ": expected block_size >= 0 (0 = automatic), got ", block_size);
}

int64_t batch_numel(const Tensor& t) {
  int64_t B = 1;
  for (int64_t i = 0; i + 2 < t.dim(); ++i) B *= t.size(i);
  return B;
}

// f(b) for b in [0, B). With T > 1 threads and B >= T, whole matrices go to threads (each LAPACK/BLAS call
// then runs single-threaded: MKL does not nest inside an OpenMP region), in equal shares of B / T; the
// remaining B mod T matrices run one after another with all threads inside each call. One matrix per
// thread beats threading inside LAPACK, whose panel factorisations scale poorly (measured below).
template <class F>
void for_each_matrix(int64_t B, const F& f) {
  const int64_t T = at::get_num_threads();
  const int64_t par = (T > 1 && B >= T) ? (B / T) * T : 0;
  if (par > 0) {
    at::parallel_for(0, par, 1, [&](int64_t b0, int64_t b1) {
      // Worker threads do not inherit the caller's dispatch state: stay below autograd as the caller is.
      at::AutoDispatchBelowADInplaceOrView guard;
      for (int64_t b = b0; b < b1; ++b) f(b);
    });
  }
  for (int64_t b = par; b < B; ++b) f(b);
}

// ---- forward -------------------------------------------------------------------------------------

// out = Q of P with positive diag(R), for one m×n matrix (out: an m×n row-major slice of the result).
void qr_q_into(const Tensor& out, const Tensor& P) {
  const auto [a, tau] = at::geqrf(P);             // Householder QR; R is the upper triangle of a
  const auto diag = a.diagonal();
  // -1 where R_jj < 0, else +1 (R_jj = 0 included: the reference's choice for rank-deficient P); "+ 0·R_jj"
  // keeps a NaN of R as NaN (for a square P the last reflector is the identity: only R_nn sees P[n-1, n-1]).
  const auto sign = at::where(diag.lt(0), -1.0, 1.0).to(diag.scalar_type()).add_(diag, 0.0);
  at::mul_out(const_cast<Tensor&>(out), at::linalg_householder_product(a, tau), sign.unsqueeze(0));
}

Tensor gram_schmidt_cpu(const Tensor& P_in, int64_t block_size) {
  check_forward(P_in, block_size);
  const auto P = P_in.detach();
  const int64_t m = P.size(-2), n = P.size(-1), B = batch_numel(P);
  auto out = at::empty(P.sizes(), P.options());
  if (out.numel() == 0) return out;
  const auto P3 = P.reshape({B, m, n});
  const auto Q3 = out.view({B, m, n});
  for_each_matrix(B, [&](int64_t b) { qr_q_into(Q3.select(0, b), P3.select(0, b)); });
  return out;
}

// ---- backward ------------------------------------------------------------------------------------

inline Tensor blk(const Tensor& t, int64_t r0, int64_t r1, int64_t c0, int64_t c1) {
  return t.narrow(0, r0, r1 - r0).narrow(1, c0, c1 - c0);
}

// R = triu(Qᵀ P) (n×n, the strict lower part zero), in column panels R[:j1, J] = Q[:, :j1]ᵀ P[:, J]: about
// half the flops of the full product.
Tensor upper_QtP(const Tensor& Q, const Tensor& P) {
  const int64_t m = Q.size(0), n = Q.size(1);
  auto R = at::zeros({n, n}, Q.options());
  for (int64_t j0 = 0; j0 < n; j0 += kPanel) {
    const int64_t j1 = std::min(n, j0 + kPanel);
    auto Rj = blk(R, 0, j1, j0, j1);
    at::mm_out(Rj, blk(Q, 0, m, 0, j1).t(), blk(P, 0, m, j0, j1));
  }
  R.triu_();
  return R;
}

// X = C R⁻ᵀ for C strictly lower triangular (n×n): X is strictly lower too, so row panel I needs only the
// leading i1×i1 block of R (a triangular solve of (i1 - i0) rows against i1 columns): about a third of the
// flops of the full solve.
Tensor solve_lower_rhs(const Tensor& C, const Tensor& R) {
  const int64_t n = C.size(0);
  auto X = at::zeros({n, n}, C.options());
  for (int64_t i0 = 0; i0 < n; i0 += kPanel) {
    const int64_t i1 = std::min(n, i0 + kPanel);
    // X_I Rᵀ = C_I on columns < i1
    blk(X, i0, i1, 0, i1).copy_(at::linalg_solve_triangular(blk(R, 0, i1, 0, i1).t(), blk(C, i0, i1, 0, i1),
                                                            /*upper=*/false, /*left=*/false));
  }
  return X;
}

// out = Q X for X strictly lower triangular (n×n), in column panels out[:, J] = Q[:, j0:] X[j0:, J].
void mul_lower_into(const Tensor& out, const Tensor& Q, const Tensor& X) {
  const int64_t m = Q.size(0), n = Q.size(1);
  for (int64_t j0 = 0; j0 < n; j0 += kPanel) {
    const int64_t j1 = std::min(n, j0 + kPanel);
    auto oj = blk(out, 0, m, j0, j1);
    at::mm_out(oj, blk(Q, 0, m, j0, n), blk(X, j0, n, j0, j1));
  }
}

// grad_P for one m×n matrix (out: an m×n row-major slice of the result). With A = Qᵀ G the adjoint of the
// reference, (G + Q S) R⁻ᵀ with S = copyltu(-Aᵀ) = C - A and C = tril(A - Aᵀ, -1), is
//   square (Q Qᵀ = I, so G = Q A):  Q (C R⁻ᵀ)   — two triangular-structured products and a small solve;
//   tall:                           (G + Q (C - A)) R⁻ᵀ.
void backward_one(const Tensor& out, const Tensor& G, const Tensor& P, const Tensor& Q) {
  const int64_t m = Q.size(0), n = Q.size(1);
  const auto A = at::mm(Q.t(), G);
  const auto R = upper_QtP(Q, P);
  auto C = (A - A.t()).tril_(-1);
  if (m == n) {
    mul_lower_into(out, Q, solve_lower_rhs(C, R));
  } else {
    const auto Bm = at::addmm(G, Q, C.sub_(A));
    out.copy_(at::linalg_solve_triangular(R.t(), Bm, /*upper=*/false, /*left=*/false));
  }
}

bool all_finite(const Tensor& t) { return at::isfinite(t).all().item<bool>(); }

Tensor gram_schmidt_backward_cpu(const Tensor& grad_in, const Tensor& P_in, const Tensor& Q_in) {
  const char* op = "gram_schmidt_backward";
  check_grad_shape(op, grad_in, Q_in.sizes());
  TORCH_CHECK(P_in.sizes() == Q_in.sizes(), "opt_fast.", op, ": expected P and Q of the same shape, got P ",
              P_in.sizes(), " and Q ", Q_in.sizes());
  check_same_device_dtype(op, "grad", grad_in, "Q", Q_in);
  check_same_device_dtype(op, "P", P_in, "Q", Q_in);
  check_float_matrix(op, "Q", Q_in);
  const auto G = grad_in.detach(), P = P_in.detach(), Q = Q_in.detach();
  const int64_t m = Q.size(-2), n = Q.size(-1), B = batch_numel(Q);
  auto out = at::empty(P.sizes(), P.options());
  if (out.numel() == 0) return out;
  const auto G3 = G.reshape({B, m, n}), P3 = P.reshape({B, m, n}), Q3 = Q.reshape({B, m, n});
  const auto O3 = out.view({B, m, n});
  for_each_matrix(B, [&](int64_t b) { backward_one(O3.select(0, b), G3.select(0, b), P3.select(0, b), Q3.select(0, b)); });
  // A zero (or underflowing) R_jj makes the solve divide by zero: say so instead of returning inf/NaN.
  // Non-finite inputs are not an error: their NaN propagates.
  TORCH_CHECK(all_finite(out) || !(all_finite(G) && all_finite(P) && all_finite(Q)), "opt_fast.", op,
              ": P is rank deficient (R = QᵀP has a zero diagonal entry), so Q is not a differentiable ",
              "function of P there and the gradient is undefined");
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(opt_fast, CPU, m) {
  m.impl("gram_schmidt", &gram_schmidt_cpu);
  m.impl("gram_schmidt_backward", &gram_schmidt_backward_cpu);
}

}  // namespace opt_fast
