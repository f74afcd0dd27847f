// Gram-Schmidt on the CPU: Q of P = QR with diag(R) > 0 (opt_fast/reference/gram_schmidt.py is the spec),
// forward and backward, batched over leading dims, tall P (m >= n) included.
//
// Small matrices (m·n <= 64², forward and backward): direct loops per matrix in double, gram_schmidt_small.h
// (where the measurements for that choice are). Everything below is the path for larger matrices.
//
// Algorithm (chosen by measurement, below): Householder QR through LAPACK (ATen's geqrf + orgqr, i.e.
// blocked panels with level-3 trailing updates, panel width picked by LAPACK; block_size is accepted,
// validated and ignored, as in the reference), one matrix at a time, then the sign fix diag(R) > 0 fused into
// the write of the row-major output. Batches: whole matrices per thread (for_each_matrix).
//
// Stability: Householder QR gives ‖QᵀQ − I‖ = O(u) whatever κ(P) and a finite Q for rank-deficient P. OPT's
// N(0,1) square P have κ ~ d (3e3 at d = 576), so CholQR/CholQR2 in float32 (O(u κ²), breakdown at
// κ ≳ u^-1/2 ≈ 4e3) are out; CholQR2 with a float64 first Gram/Cholesky and BCGS2 are O(u) here too but
// slower on this CPU (below). A one-solve CholQR (Q = P (R2 R1)⁻¹) was measured at 3.4e-4: the second pass
// must re-orthogonalise Q1, not just refine R.
//
// Backward: the QR adjoint of the reference, no unrolling, R = triu(QᵀP) recomputed (the schema passes
// (grad, P, Q)). With A = QᵀG and C = tril(A − Aᵀ, −1), the reference's (G + Q copyltu(−GᵀQ)) R⁻ᵀ equals
// Q (C R⁻ᵀ) for square P (G − Q A = 0), so: one GEMM (A), triu(QᵀP) in column panels (half the flops),
// a triangular solve whose right side is strictly lower (row panels against leading blocks of R), and a
// product with a strictly lower X in column panels: about 4.3 d³ flops against 6-7 d³ for the reference's
// formula. Tall P: (G + Q (C − A)) R⁻ᵀ, one GEMM more and a full solve.
//
// Rank-deficient P: forward finite (R_jj = 0 takes sign +1, as the reference); the backward raises
// "opt_fast.gram_schmidt_backward: P is rank deficient ..." when finite inputs give a non-finite gradient
// (exactly what opt_fast/reference/gram_schmidt.py does). NaN/inf inputs propagate NaN, no error.
//
// Measured (AMD EPYC, 2 cores shared with other jobs (load average 3-5 during the runs), MKL, float32,
// batch 5 of d = 576 N(0,1) P; medians of 9-21 interleaved repeats; t_bmm = one [5, 576, 576] bmm):
//   alternatives, 1 thread, in torch (prototypes):        t / t_bmm   ‖QᵀQ − I‖_F/√d   max|Q − Q64|
//     torch.linalg.qr + sign fix (LAPACK Householder)     2.76        6.3e-7           1.7e-6
//     geqrf + householder_product                         2.68        6.3e-7           1.7e-6
//     BCGS2, Householder panels, block 64 / 128           4.7 / 5.0   3.2e-7 / 3.5e-7  0.9e-6 / 1.9e-6
//     CholQR2, float64 first Gram + Cholesky              7.3         3.0e-7           1.6e-6
//     CholQR2, float64 Grams in both passes               8.8         1.5e-7           1.6e-6
//   LAPACK QR from 1 to 2 threads: 1.41x (b = 1), 1.52x (b = 5), bmm 1.65-1.88x: hence matrices per thread
//   (for_each_matrix; effective only since the build has -fopenmp, 2026-12-07: before, at::parallel_for in
//   this extension ran serially and each LAPACK call threaded inside).
//   backward parts, 1 thread, one 576² matrix, in units of one 576² mm: A = QᵀG 1.0, triu(QᵀP) 0.79,
//   panel solve 0.89 (full solve 0.90: the panels save flops, not time, at this size), Q X 0.74.
//   This kernel vs torch (torch.linalg.qr + sign fix, forward under no_grad; fwd+bwd by autograd):
//     1 thread, three runs:  forward opt_fast / torch 0.80, 0.87, 0.87   (target <= 1.5)
//                            fwd+bwd torch / opt_fast 1.45, 1.50, 1.35    (target > 1; bwd alone 2.6-3.2 t_bmm)
//     2 threads, the run at load ~3:  forward 1.01, fwd+bwd 1.40x. Runs at load >= 2 cores gave 2-thread
//     times 10-60x the 1-thread ones for every implementation (OpenMP waiting on preempted threads, see
//     bench/README.md) with ratios anywhere from 0.3 to 1.6: not usable; re-measure on a quiet machine.
#include "../opt_fast.h"
#include "gram_schmidt_small.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>

namespace opt_fast {
namespace {

using at::Tensor;

// Panel width of the structured (triangular) products of the backward: GEMMs much narrower than 128 run
// far from peak on this machine, wider panels waste flops on zero triangles (as in householder_panels.h).
constexpr int64_t kPanel = 128;

void check_forward(const Tensor& P, int64_t block_size) {
  const char* op = "gram_schmidt";
  check_float_matrix(op, "P", P);
  TORCH_CHECK(P.size(-1) <= P.size(-2), "opt_fast.", op,
              ": expected P [..., m, n] with m >= n (a wide matrix has no n orthonormal columns), got shape ",
              P.sizes());
  TORCH_CHECK(block_size >= 0, "opt_fast.", op, ": expected block_size >= 0 (0 = automatic), got ", block_size);
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

// out = Q of P with positive diag(R), for one m×n matrix or a [B, m, n] batch (out: row-major, P's shape).
void qr_q_into(const Tensor& out, const Tensor& P) {
  const auto [a, tau] = at::geqrf(P);             // Householder QR; R is the upper triangle of a
  const auto diag = a.diagonal(0, -2, -1);
  // -1 where R_jj < 0, else +1 (R_jj = 0 included: the reference's choice for rank-deficient P); "+ 0·R_jj"
  // keeps a NaN of R as NaN (for a square P the last reflector is the identity: only R_nn sees P[n-1, n-1]).
  const auto sign = at::where(diag.lt(0), -1.0, 1.0).to(diag.scalar_type()).add_(diag, 0.0);
  at::mul_out(const_cast<Tensor&>(out), at::linalg_householder_product(a, tau), sign.unsqueeze(-2));
}

// Up to this many columns a batch goes to LAPACK in batched calls (torch runs the matrices in parallel, one
// per thread, as for_each_matrix does, with fewer calls). Measured (float32, 2 threads, medians of 41 calls
// interleaved with torch.linalg.qr + sign fix; time / qr's): [6, 100, 100] 1.10-1.23 (per matrix: 1.28);
// [5, 144, 144] 1.00-1.04 (1.23); [64, 144, 144] 1.02-1.05 (1.15); [5, 256, 256] 0.99-1.00 (1.05). At
// [5, 384, 384] and [5, 576, 576] both ways tie (per matrix / batched 0.98): per matrix stays there.
constexpr int64_t kBatchedForwardMaxN = 256;

Tensor gram_schmidt_cpu(const Tensor& P_in, int64_t block_size) {
  check_forward(P_in, block_size);
  const auto P = P_in.detach();
  const int64_t m = P.size(-2), n = P.size(-1), B = batch_numel(P);
  auto out = at::empty(P.sizes(), P.options());
  if (out.numel() == 0) return out;
  const auto P3 = P.reshape({B, m, n});
  if (small::use_for_gram_schmidt(m, n)) {
    AT_DISPATCH_FLOATING_TYPES(P.scalar_type(), "gram_schmidt_small", [&] { small::gram_schmidt<scalar_t>(out, P3); });
    return out;
  }
  const auto Q3 = out.view({B, m, n});
  if (B > 1 && n <= kBatchedForwardMaxN) {
    qr_q_into(Q3, P3);
  } else {
    for_each_matrix(B, [&](int64_t b) { qr_q_into(Q3.select(0, b), P3.select(0, b)); });
  }
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

// The same adjoint for a whole [B, m, n] batch in batched calls, with full (not panelled) products: more
// flops, far fewer calls. Measured (2 threads, float32, ms, medians of 15, two runs on the shared machine)
// against per-matrix backward_one: [6, 100, 100] 0.59-1.04 / 1.05-1.26; [5, 144, 144] 1.19-2.09 / 1.98-2.39;
// [64, 144, 144] 22.3-25.8 / 32.5-36.2; [5, 256, 256] 6.4-8.2 / 7.2-10.2; [5, 576, 576] 60-73 / 46-50;
// [1, 576, 576] 9.9-13.4 / 9.4-11.7 (the panels' saved flops win there).
constexpr int64_t kBatchedBackwardMaxN = 256;
// The small path's double loops (gram_schmidt_small.h) cost ~B·m·n² scalar flops, the batched calls ~80 µs of
// call overhead plus BLAS speed: measured (2 threads, float32, µs, small / batched) d = 27: B = 1 ~25 / 110,
// B = 8 218 / 250; d = 40, B = 4: 250 / 239; d = 48, B = 1: 117 / 132; d = 64, B = 1: 141 / 111; d = 32,
// B = 16: 458 / 320; d = 64, B = 64: 8.7 / 6.2 ms. Hence the small backward only up to B·m·n² = 2e5.
constexpr int64_t kSmallBackwardWork = 200000;

void backward_batched(Tensor out, const Tensor& G, const Tensor& P, const Tensor& Q) {
  const auto A = at::bmm(Q.mT(), G);
  // Rᵀ as the transposed view of a row-major R: already the column-major layout LAPACK's trsm takes
  const auto Rt = at::bmm(Q.mT(), P).triu_().mT();
  auto C = (A - A.mT()).tril_(-1);
  if (Q.size(-2) == Q.size(-1)) {
    at::bmm_out(out, Q, at::linalg_solve_triangular(Rt, C, /*upper=*/false, /*left=*/false));
  } else {
    const auto Bm = at::baddbmm(G, Q, C.sub_(A));
    out.copy_(at::linalg_solve_triangular(Rt, Bm, /*upper=*/false, /*left=*/false));
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
  // A zero (or underflowing) R_jj makes the solve divide by zero: say so instead of returning inf/NaN.
  // Non-finite inputs are not an error: their NaN propagates.
  bool deficient = false;
  if (small::use_for_gram_schmidt(m, n) && B * m * n * n <= kSmallBackwardWork) {
    AT_DISPATCH_FLOATING_TYPES(P.scalar_type(), "gram_schmidt_backward_small",
                               [&] { deficient = small::gram_schmidt_backward<scalar_t>(out, G3, P3, Q3); });
  } else {
    const auto O3 = out.view({B, m, n});
    if (n <= kBatchedBackwardMaxN) {
      backward_batched(O3, G3, P3, Q3);
    } else {
      for_each_matrix(B, [&](int64_t b) {
        backward_one(O3.select(0, b), G3.select(0, b), P3.select(0, b), Q3.select(0, b));
      });
    }
    deficient = !all_finite(out) && all_finite(G) && all_finite(P) && all_finite(Q);
  }
  TORCH_CHECK(!deficient, "opt_fast.", op,
              ": P is rank deficient (R = QᵀP has a zero diagonal entry), so Q is not a differentiable ",
              "function of P there and the gradient is undefined");
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(opt_fast, CPU, m) {
  m.impl("gram_schmidt", OPT_FAST_KERNEL(gram_schmidt_cpu));
  m.impl("gram_schmidt_backward", OPT_FAST_KERNEL(gram_schmidt_backward_cpu));
}

}  // namespace opt_fast
