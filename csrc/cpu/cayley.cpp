// Cayley transform on the CPU: Q = (I + S)(I - S)^-1.
// Same algorithm as opt_fast/reference/cayley.py (the spec): one inverse forward, using
// I + Q = 2 (I - S)^-1, and a backward of two matmuls on the saved output,
// grad_S = 1/2 (I + Q)^T G (I + Q)^T.
// Forward: d <= 64 by a Gauss-Jordan inverse per matrix in double (cayley_small.h, where the measurements
// are), larger d through ATen (LAPACK), one matrix at a time; float32 beyond d = 768 with one orthogonality
// polishing step (polish_orthogonality).
#include "../opt_fast.h"
#include <cmath>
#include "cayley_small.h"

#include <ATen/Dispatch.h>

namespace opt_fast {
namespace {

constexpr const char* kSingular =
    "opt_fast.cayley: I - S is singular (S must be skew-symmetric, or at least have no eigenvalue 1)";

// Batched LU (torch runs the batch's LAPACK calls in parallel, one matrix per thread) against one
// multithreaded LAPACK call per matrix, 2 threads, float32 (ms, medians of 50):
//   [6, 144, 144]: 2.2 against 3.1;   [64, 100, 100]: 12.8 against 18.8;   [4, 256, 256]: 7.2 against 6.8.
// With torch 2.13 + MKL 2024.2 on our CI machine, batched LU after torch.set_num_threads(n > 1) returned
// garbage pivots (out of range, info = 0) for every [6, d, d] batch with d >= 160 and never for d <= 144
// (30 batches each; README, limitations). So: batched up to d = 144, where it also pays, with the pivots
// validated and the per-matrix loop as the fallback; per matrix beyond.
constexpr int64_t kBatchedLuMaxD = 144;

bool use_batched_lu(int64_t d, int64_t batch) { return batch > 1 && d <= kBatchedLuMaxD; }

// A^-1 from A's LU (one matrix or a batch): solving Aᵀ X = I gives X = A^-T in LAPACK's column-major layout,
// i.e. A^-1 row-major, with no transposing copy (15-25% faster than at::linalg_inv_ex at d = 256-1024).
at::Tensor lu_inverse(const at::Tensor& LU, const at::Tensor& pivots, const at::Tensor& eye) {
  return at::linalg_lu_solve(LU, pivots, eye.expand_as(LU), /*left=*/true, /*adjoint=*/true).mT().contiguous();
}

// (I - S)^-1 for the whole batch, or an undefined tensor if LAPACK returned pivots outside [1, d].
at::Tensor batched_inverse(const at::Tensor& A, const at::Tensor& eye) {
  auto [LU, pivots, info] = at::linalg_lu_factor_ex(A);
  const int64_t d = A.size(-1);
  const auto [lo, hi] = at::aminmax(pivots);
  const bool valid = lo.item<int64_t>() >= 1 && hi.item<int64_t>() <= d;
  if (!valid) return at::Tensor();
  TORCH_CHECK_LINALG(info.max().item<int64_t>() == 0, kSingular);
  return lu_inverse(LU, pivots, eye);
}

// (I - S)^-1 one matrix at a time (LAPACK threads inside each call).
at::Tensor looped_inverse(const at::Tensor& A, const at::Tensor& eye) {
  const int64_t batch = A.size(0);
  at::Tensor M;
  bool singular = false;
  for (int64_t b = 0; b < batch; ++b) {
    auto [LU, pivots, info] = at::linalg_lu_factor_ex(A[b]);
    singular = singular || info.item<int64_t>() > 0;
    auto Mb = lu_inverse(LU, pivots, eye);
    if (batch == 1) {
      M = Mb.unsqueeze(0);
    } else {
      if (b == 0) M = at::empty_like(A, at::MemoryFormat::Contiguous);
      M[b].copy_(Mb);
    }
  }
  TORCH_CHECK_LINALG(!singular, kSingular);
  return M;
}

// An infinite entry of S gives that matrix's Q as NaN, as torch.linalg.solve(I - S, I + S) does: the LU of
// I - S absorbs it into a finite, non-orthogonal Q that would hide an overflowed parameter.
at::Tensor nan_where_not_finite(at::Tensor Q, const at::Tensor& S) {
  // one vectorised sum first (3 us at d = 27, 0.1% of a [5, 576, 576] call): it is finite unless an entry
  // is inf or NaN (or finite entries overflow it); only then the per-matrix test
  if (std::isfinite(S.sum().item<double>())) return Q;
  const auto finite = at::isfinite(S).flatten(-2).all(-1);
  if (!finite.all().item<bool>()) Q.masked_fill_(finite.logical_not().unsqueeze(-1).unsqueeze(-1), NAN);
  return Q;
}

// float32, d > 768: one Newton–Schulz step toward the nearest orthogonal matrix, Q <- Q - ½ Q (QᵀQ - I), two
// GEMMs. The LU inverse leaves ‖QᵀQ - I‖_F/√d growing with d (OPT's N(0, 1) P, measured 2026-12-07: 5.4e-6
// at d = 576, 9.7e-6 at 1024, 1.1e-5 at 1152, 1.8e-5 at 2048, against the 1e-5 OPT needs); after the step
// 2.2e-7 - 2.4e-7 at every d, and the largest error against the float64 map drops too (1.8e-6 -> 1.2e-6 at
// 2048), as the step removes only the non-orthogonal part. It costs 50-90 % of the forward, so below d = 768
// (errors <= 7.5e-6, CNN-6's layers) it is left out.
constexpr int64_t kPolishMinD = 769;

at::Tensor polish_orthogonality(const at::Tensor& Q3, const at::Tensor& eye) {
  const auto E = at::baddbmm(eye.expand_as(Q3), Q3.mT(), Q3, /*beta=*/-1.0);   // QᵀQ - I
  return at::baddbmm(Q3, Q3, E, /*beta=*/1.0, /*alpha=*/-0.5);
}

at::Tensor cayley_cpu(const at::Tensor& S) {
  check_square("cayley", "S", S);
  const int64_t d = S.size(-1);
  if (S.numel() == 0) return at::empty(S.sizes(), S.options());
  if (small::use_for_cayley(d)) {
    auto Q = at::empty(S.sizes(), S.options());
    bool ok = true;
    AT_DISPATCH_FLOATING_TYPES(S.scalar_type(), "cayley_small", [&] {
      ok = small::cayley<scalar_t>(Q, S.reshape({-1, d, d}));
    });
    TORCH_CHECK_LINALG(ok, kSingular);
    return nan_where_not_finite(Q, S);
  }
  auto eye = eye_like(S, d);
  auto A = (eye - S).reshape({-1, d, d});
  auto M = use_batched_lu(d, A.size(0)) ? batched_inverse(A, eye) : at::Tensor();
  if (!M.defined()) M = looped_inverse(A, eye);
  M.mul_(2.0);
  M.diagonal(0, -2, -1).sub_(1.0);  // Q = 2 (I - S)^-1 - I, in place
  if (d >= kPolishMinD && M.scalar_type() == at::kFloat) M = polish_orthogonality(M, eye);
  return nan_where_not_finite(M.view(S.sizes()), S);
}

// grad_S = ½ (I + Q)ᵀ G (I + Q)ᵀ as two batched GEMMs with the identity and the ½ folded in:
// W = (I + Q)ᵀ G = G + QᵀG, then grad_S = ½ W (I + Q)ᵀ = ½ (W + W Qᵀ): no eye, no sum, no scaling pass.
// Measured 2026-11-23 (1 thread, float32, kernel alone, ranges over 10 interleaved repeats) against the former
// matmul(matmul(Qᵀ + I, G), Qᵀ + I).mul_(0.5): d = 27: 12-23 µs against 18-39 µs; batch 128 of d = 32:
// 0.39-0.52 ms against 0.48-0.66 ms; batch 64 of d = 64: 1.0-1.3 ms against 1.2-2.0 ms. A direct loop per
// matrix in double (as the forward) lost from d = 32 on (d = 27: 18-29 µs; d = 64: 0.21-0.29 ms against
// 0.03-0.05 ms; batch 128 of d = 32: 3.7-4.2 ms): MKL's GEMMs use AVX2, this build's loops SSE2. float32
// error against float64: 1.1-1.3x the former's (max over 10 seeds, d = 27 to 64), within the 2x rule.
at::Tensor cayley_backward_cpu(const at::Tensor& grad, const at::Tensor& Q) {
  check_square("cayley_backward", "Q", Q);
  check_like("cayley_backward", "grad", grad, Q.sizes(), "Q", Q);
  if (Q.numel() == 0) return at::empty(Q.sizes(), Q.options());
  const int64_t d = Q.size(-1);
  const auto Q3 = Q.reshape({-1, d, d}), G3 = grad.reshape({-1, d, d});
  const auto W = at::baddbmm(G3, Q3.mT(), G3);
  return at::baddbmm(W, W, Q3.mT(), 0.5, 0.5).view(Q.sizes());
}

}  // namespace

TORCH_LIBRARY_IMPL(opt_fast, CPU, m) {
  m.impl("cayley", OPT_FAST_KERNEL(cayley_cpu));
  m.impl("cayley_backward", OPT_FAST_KERNEL(cayley_backward_cpu));
}

}  // namespace opt_fast
