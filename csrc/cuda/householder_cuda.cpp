// Torch glue of the CUDA Householder kernels: householder_product / householder_orthogonal /
// householder_apply and their backwards, registered for the CUDA dispatch key. Compiled only when torch has
// CUDA (setup.py); the kernels themselves are in householder_kernels.cu (pure CUDA).
//
// Same maths as csrc/cpu/householder.cpp (the UT / compact-WY form of opt_fast/reference/householder.py):
//     H_1 … H_k = I - Y T Yᵀ,   T = (I + D N)⁻¹ D,   D = diag(tau),   N = striu(YᵀY),
// never dividing by tau. Paths:
//   * forward, at most kSmallMaxRows rows and the matrix fits in shared memory: one launch for the whole
//     batch (householder_small: one block per matrix, rank-1 updates in shared memory);
//   * otherwise (and for every backward): level 3 — the products are batched cuBLAS GEMMs (at::bmm /
//     at::baddbmm), T is built by substitution on 32-wide diagonal leaves (one launch) and then one level at
//     a time, T12 = -T11 N12 T22 over all sibling pairs at once (two batched matmuls per level, log2(k/32)
//     levels), as in the CPU kernel. The backward recomputes N and T (nothing stored per reflector) and runs
//     the reference's _ut_backward with full matrices; its elementwise tails are one launch each.
// Everything runs on the current stream of the input's device; every launch is checked. Float32 GEMMs run
// with TF32 off (at::NoTF32Guard): the precision rule (docs/performance.md) allows no TF32 in a final result.
//
// OPT_FAST_CUDA_SMALL=0 in the environment disables the small-d path (tests use it to cover both paths).
#include "../householder_checks.h"
#include "../opt_fast.h"
#include "cuda_scope.h"
#include "householder_kernels.cuh"

#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cstdlib>
#include <cstring>
#include <tuple>
#include <utility>

namespace opt_fast {
namespace {

using at::Tensor;
namespace k = opt_fast::cuda;

constexpr int64_t kSmallMaxRows = 160;  // covers d = 27 and the stochastic-OPT blocks (m = 90-160)
constexpr int64_t kSmallMaxCols = 512;

bool small_path_enabled() {
  const char* v = std::getenv("OPT_FAST_CUDA_SMALL");
  return v == nullptr || std::strcmp(v, "0") != 0;
}

// The small-d forward applies to an m×n output with m <= kSmallMaxRows that fits in shared memory.
bool use_small(int64_t m, int64_t n, const Tensor& like) {
  if (!small_path_enabled() || m > kSmallMaxRows || n > kSmallMaxCols) return false;
  size_t limit = 0;
  C10_CUDA_CHECK(k::householder_small_smem_limit(&limit));
  return k::householder_small_smem_bytes(m, n, like.element_size()) <= limit;
}

// C = alpha A B for batches (beta = 0: the uninitialised output is never read).
Tensor bmm_scaled(const Tensor& A, const Tensor& B, double alpha) {
  return at::baddbmm(at::empty({A.size(0), A.size(1), B.size(2)}, A.options()), A, B, 0.0, alpha);
}

// ---- T = (I + D N)⁻¹ D ------------------------------------------------------------------------------

// [B, P, s, s] view of the blocks at (p·2s + r0, p·2s + c0), p < P, of a contiguous [B, K, K] tensor.
Tensor sibling_blocks(const Tensor& M, int64_t P, int64_t s, int64_t r0, int64_t c0) {
  const int64_t K = M.size(1);
  return M.as_strided({M.size(0), P, s, s}, {K * K, 2 * s * (K + 1), K, 1}, M.storage_offset() + r0 * K + c0);
}

// T for each of a batch: N [B, k, k] (strict upper triangle used), tau [B, k]; a new contiguous [B, k, k],
// zero below the diagonal. k is padded with identity reflectors (tau = 0) to leaf·2^levels: the leading
// k×k block of T does not depend on later reflectors.
Tensor compute_T(const Tensor& N, const Tensor& tau, cudaStream_t stream) {
  const int64_t B = N.size(0), kk = N.size(1);
  int64_t P = 1;
  while (P * k::kTLeafMax < kk) P *= 2;
  const int64_t s0 = (kk + P - 1) / P, K = s0 * P;
  Tensor Np, tp;
  if (K != kk) {
    Np = at::zeros({B, K, K}, N.options());
    Np.narrow(1, 0, kk).narrow(2, 0, kk).copy_(N);
    tp = at::zeros({B, K}, tau.options());
    tp.narrow(1, 0, kk).copy_(tau);
  } else {
    Np = N.contiguous();
    tp = tau.contiguous();
  }
  auto T = at::zeros({B, K, K}, N.options());
  AT_DISPATCH_FLOATING_TYPES(T.scalar_type(), "householder_t_leaf_cuda", [&] {
    C10_CUDA_CHECK(k::t_leaf<scalar_t>(Np.const_data_ptr<scalar_t>(), tp.const_data_ptr<scalar_t>(),
                                       T.data_ptr<scalar_t>(), B, K, s0, stream));
  });
  for (int64_t s = s0; s < K; s *= 2) {  // T12 = -T11 (N12 T22) for all sibling pairs of this level
    const int64_t Pl = K / (2 * s);
    const auto X = at::matmul(sibling_blocks(Np, Pl, s, 0, s), sibling_blocks(T, Pl, s, s, s));
    sibling_blocks(T, Pl, s, 0, s).copy_(at::matmul(sibling_blocks(T, Pl, s, 0, 0), X).neg_());
  }
  return K == kk ? T : T.narrow(1, 0, kk).narrow(2, 0, kk).contiguous();
}

// T = (I + D N)⁻¹ D and A⁻¹ = (I + D N)⁻¹ in one batched compute_T (A⁻¹ is T for N -> D N, tau -> 1).
std::pair<Tensor, Tensor> T_and_Ainv(const Tensor& N, const Tensor& tau, cudaStream_t stream) {
  const int64_t B = N.size(0);
  const auto Ns = at::cat({N, N * tau.unsqueeze(-1)}, 0);
  const auto taus = at::cat({tau, at::ones_like(tau)}, 0);
  const auto TA = compute_T(Ns, taus, stream);
  return {TA.narrow(0, 0, B), TA.narrow(0, B, B)};
}

Tensor tau_from_gram(const Tensor& N, cudaStream_t stream) {
  const int64_t B = N.size(0), kk = N.size(1);
  auto tau = at::empty({B, kk}, N.options());
  AT_DISPATCH_FLOATING_TYPES(N.scalar_type(), "householder_tau_cuda", [&] {
    C10_CUDA_CHECK(k::tau_from_gram<scalar_t>(N.const_data_ptr<scalar_t>(), tau.data_ptr<scalar_t>(), B, kk, stream));
  });
  return tau;
}

// Q <- I[:, :n] - Q (Q contiguous [B, m, n]).
void eye_minus_(const Tensor& Q, cudaStream_t stream) {
  AT_DISPATCH_FLOATING_TYPES(Q.scalar_type(), "householder_eye_minus_cuda", [&] {
    C10_CUDA_CHECK(k::eye_minus<scalar_t>(Q.data_ptr<scalar_t>(), Q.size(0), Q.size(1), Q.size(2), stream));
  });
}

Tensor unit_lower(const Tensor& V3, int64_t kk, cudaStream_t stream) {
  const int64_t B = V3.size(0), m = V3.size(1);
  auto Y = at::empty({B, m, kk}, V3.options());
  AT_DISPATCH_FLOATING_TYPES(V3.scalar_type(), "householder_unit_lower_cuda", [&] {
    C10_CUDA_CHECK(k::unit_lower<scalar_t>(V3.const_data_ptr<scalar_t>(), V3.stride(0), V3.stride(1), V3.stride(2),
                                           Y.data_ptr<scalar_t>(), B, m, kk, stream));
  });
  return Y;
}

// The small-d forward: out = H_0…H_{k-1} X (X undefined: I[:, :n]); tau undefined: dense tau.
Tensor small_forward(k::SmallMode mode, const Tensor& V3, const Tensor& tau2, const Tensor& X3, int64_t n,
                     int64_t kk, cudaStream_t stream) {
  const int64_t B = V3.size(0), m = V3.size(1);
  auto out = at::empty({B, m, n}, V3.options());
  AT_DISPATCH_FLOATING_TYPES(V3.scalar_type(), "householder_small_cuda", [&] {
    const scalar_t* tp = tau2.defined() ? tau2.const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* xp = X3.defined() ? X3.const_data_ptr<scalar_t>() : nullptr;
    C10_CUDA_CHECK(k::householder_small<scalar_t>(
        mode, V3.const_data_ptr<scalar_t>(), V3.stride(0), V3.stride(1), V3.stride(2), tp,
        tau2.defined() ? tau2.stride(0) : 0, tau2.defined() ? tau2.stride(1) : 0, xp, X3.defined() ? X3.stride(0) : 0,
        X3.defined() ? X3.stride(1) : 0, X3.defined() ? X3.stride(2) : 0, out.data_ptr<scalar_t>(), B, m, n, kk,
        stream));
  });
  return out;
}

// ---- the shared backward: reverse of out = X - Y T W1, W1 = Yᵀ X (reference _ut_backward) -----------

struct UTGrads {
  Tensor dY, dtau, dW1;  // dY without the path through W1
};

UTGrads ut_backward(const Tensor& G, const Tensor& Y, const Tensor& tau, const Tensor& W1, const Tensor& N,
                    cudaStream_t stream) {
  const int64_t B = Y.size(0), kk = Y.size(2);
  const auto [T, Ainv] = T_and_Ainv(N, tau, stream);
  const auto YtG = at::bmm(Y.mT(), G);                 // k × n
  const auto Z = at::bmm(T, W1);                       // k × n
  auto dY = bmm_scaled(G, Z.mT(), -1.0);               // -G Zᵀ: the left factor Y
  const auto dT = bmm_scaled(YtG, W1.mT(), -1.0);      // k × k
  auto dW1 = bmm_scaled(T.mT(), YtG, -1.0);            // k × n
  // T = A⁻¹ D: S = A⁻ᵀ dT, P = S Tᵀ (= -dA); dT's lower part contributes nothing to the upper part of dA
  // or to diag(S) (A⁻ᵀ is lower triangular), so it needs no masking.
  const auto S = at::bmm(Ainv.mT(), dT);
  const auto P = at::bmm(S, T.mT());
  auto dtau = at::empty({B, kk}, Y.options());
  auto sym = at::empty({B, kk, kk}, Y.options());
  const auto Nc = N.contiguous();
  const auto tc = tau.contiguous();
  AT_DISPATCH_FLOATING_TYPES(Y.scalar_type(), "householder_t_backward_cuda", [&] {
    C10_CUDA_CHECK(k::t_backward_tail<scalar_t>(S.const_data_ptr<scalar_t>(), P.const_data_ptr<scalar_t>(),
                                                Nc.const_data_ptr<scalar_t>(), tc.const_data_ptr<scalar_t>(),
                                                dtau.data_ptr<scalar_t>(), sym.data_ptr<scalar_t>(), B, kk, stream));
  });
  dY.baddbmm_(Y, sym);  // + Y (dN + dNᵀ), the path through N = striu(YᵀY)
  return {dY, dtau, dW1};
}

// ---- householder_product ---------------------------------------------------------------------------

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

// ---- householder_orthogonal --------------------------------------------------------------------------

Tensor householder_orthogonal_cuda(const Tensor& V) {
  check_reflectors("householder_orthogonal", V);
  CudaScope scope(V);
  const int64_t d = V.size(-2), kk = V.size(-1), B = batch_numel(V, 2);
  auto out_shape = V.sizes().vec();
  out_shape.back() = d;
  if (kk == 0 || B == 0 || d == 0) return at::eye(d, V.options()).expand({B, d, d}).contiguous().view(out_shape);
  const auto V3 = V.reshape({B, d, kk});
  if (use_small(d, d, V)) return small_forward(k::SmallMode::kDense, V3, Tensor(), Tensor(), d, kk, scope.stream).view(out_shape);
  const auto N = at::bmm(V3.mT(), V3);
  const auto T = compute_T(N, tau_from_gram(N, scope.stream), scope.stream);
  auto Q = at::bmm(V3, at::bmm(T, V3.mT()));
  eye_minus_(Q, scope.stream);
  return Q.view(out_shape);
}

// dV = A + (Bt ? Btᵀ : 0) - (dtau tau²) V, the dense ops' final step (A, V [B, d, k]; Bt [B, k, d]).
Tensor dense_dV(const Tensor& A, const Tensor& Bt, const Tensor& V3, const Tensor& dtau, const Tensor& tau,
                cudaStream_t stream) {
  const int64_t B = V3.size(0), d = V3.size(1), kk = V3.size(2);
  auto dV = at::empty({B, d, kk}, V3.options());
  const auto Ac = A.contiguous(), Vc = V3.contiguous(), dtc = dtau.contiguous(), tc = tau.contiguous();
  const Tensor Btc = Bt.defined() ? Bt.contiguous() : Tensor();
  AT_DISPATCH_FLOATING_TYPES(V3.scalar_type(), "householder_dense_dV_cuda", [&] {
    C10_CUDA_CHECK(k::dense_dV<scalar_t>(Ac.const_data_ptr<scalar_t>(),
                                         Btc.defined() ? Btc.const_data_ptr<scalar_t>() : nullptr,
                                         Vc.const_data_ptr<scalar_t>(), dtc.const_data_ptr<scalar_t>(),
                                         tc.const_data_ptr<scalar_t>(), dV.data_ptr<scalar_t>(), B, d, kk, stream));
  });
  return dV;
}

Tensor householder_orthogonal_backward_cuda(const Tensor& grad, const Tensor& V) {
  const char* op = "householder_orthogonal_backward";
  check_reflectors(op, V);
  const int64_t d = V.size(-2), kk = V.size(-1), B = batch_numel(V, 2);
  auto out_shape = V.sizes().vec();
  out_shape.back() = d;
  check_grad(op, grad, V, out_shape);
  CudaScope scope(V);
  if (kk == 0 || B == 0 || d == 0) return at::zeros(V.sizes(), V.options());
  const auto G = grad.reshape({B, d, d});
  const auto V3 = V.reshape({B, d, kk});
  const auto N = at::bmm(V3.mT(), V3);
  const auto tau = tau_from_gram(N, scope.stream);
  auto g = ut_backward(G, V3, tau, V3.mT(), N, scope.stream);
  // dV = dY + dW1ᵀ (W1 = Vᵀ) - (dtau tau²) V (tau = 2/||v||²)
  return dense_dV(g.dY, g.dW1, V3, g.dtau, tau, scope.stream).view(V.sizes());
}

// ---- householder_apply -------------------------------------------------------------------------------

Tensor householder_apply_cuda(const Tensor& V, const Tensor& X) {
  check_apply("householder_apply", V, X);
  CudaScope scope(V);
  const int64_t d = V.size(-2), kk = V.size(-1), n = X.size(-1), B = batch_numel(V, 2);
  const auto X3 = X.reshape({B, d, n});
  if (kk == 0 || B == 0 || n == 0 || d == 0) return X3.clone(at::MemoryFormat::Contiguous).view(X.sizes());
  const auto V3 = V.reshape({B, d, kk});
  if (use_small(d, n, V)) return small_forward(k::SmallMode::kDense, V3, Tensor(), X3, n, kk, scope.stream).view(X.sizes());
  const auto N = at::bmm(V3.mT(), V3);
  const auto T = compute_T(N, tau_from_gram(N, scope.stream), scope.stream);
  const auto Z = at::bmm(T, at::bmm(V3.mT(), X3));  // T (Vᵀ X)
  return at::baddbmm(X3, V3, Z, 1.0, -1.0).contiguous().view(X.sizes());
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
  const auto V3 = V.reshape({B, d, kk});
  const auto X3 = X.reshape({B, d, n});
  const auto N = at::bmm(V3.mT(), V3);
  const auto tau = tau_from_gram(N, scope.stream);
  const auto W1 = at::bmm(V3.mT(), X3);
  auto g = ut_backward(G, V3, tau, W1, N, scope.stream);
  g.dY.baddbmm_(X3, g.dW1.mT());                      // + X dW1ᵀ, the path through W1 = Vᵀ X
  auto dV = dense_dV(g.dY, Tensor(), V3, g.dtau, tau, scope.stream);
  auto dX = at::baddbmm(G, V3, g.dW1);                 // G + V dW1
  return {dV.view(V.sizes()), dX.contiguous().view(X.sizes())};
}

}  // namespace

TORCH_LIBRARY_IMPL(opt_fast, CUDA, m) {
  m.impl("householder_product", &householder_product_cuda);
  m.impl("householder_product_backward", &householder_product_backward_cuda);
  m.impl("householder_orthogonal", &householder_orthogonal_cuda);
  m.impl("householder_orthogonal_backward", &householder_orthogonal_backward_cuda);
  m.impl("householder_apply", &householder_apply_cuda);
  m.impl("householder_apply_backward", &householder_apply_backward_cuda);
}

}  // namespace opt_fast
