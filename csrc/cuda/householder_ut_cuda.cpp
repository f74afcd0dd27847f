// Torch glue shared by the CUDA Householder ops (declarations, paths and contracts: householder_ut_cuda.h).
#include "householder_ut_cuda.h"

#include <cmath>
#include <cstdlib>
#include <cstring>

namespace opt_fast {
namespace householder_cuda {
namespace {

constexpr int64_t kSmallMaxRows = 160;  // covers d = 27 and the stochastic-OPT blocks (m = 90-160)
constexpr int64_t kSmallMaxCols = 512;

bool small_path_enabled() {
  const char* v = std::getenv("OPT_FAST_CUDA_SMALL");
  return v == nullptr || std::strcmp(v, "0") != 0;
}

// [B, P, s, s] view of the blocks at (p·2s + r0, p·2s + c0), p < P, of a contiguous [B, K, K] tensor.
Tensor sibling_blocks(const Tensor& M, int64_t P, int64_t s, int64_t r0, int64_t c0) {
  const int64_t K = M.size(1);
  return M.as_strided({M.size(0), P, s, s}, {K * K, 2 * s * (K + 1), K, 1}, M.storage_offset() + r0 * K + c0);
}

}  // namespace

bool use_small(int64_t m, int64_t n, const Tensor& like) {
  if (!small_path_enabled() || m > kSmallMaxRows || n > kSmallMaxCols) return false;
  size_t limit = 0;
  C10_CUDA_CHECK(k::householder_small_smem_limit(&limit));
  return k::householder_small_smem_bytes(m, n, like.element_size()) <= limit;
}

Tensor bmm_scaled(const Tensor& A, const Tensor& B, double alpha) {
  return at::baddbmm(at::empty({A.size(0), A.size(1), B.size(2)}, A.options()), A, B, 0.0, alpha);
}

// ---- T = (I + D N)⁻¹ D ------------------------------------------------------------------------------

// k is padded with identity reflectors (tau = 0) to leaf·2^levels: the leading k×k block of T does not
// depend on later reflectors.
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

// ---- reflector scaling -------------------------------------------------------------------------------

Scaled rescale_reflectors(const Tensor& V3, cudaStream_t stream) {
  const int64_t B = V3.size(0), d = V3.size(1), kk = V3.size(2);
  const auto amax = at::linalg_vector_norm(V3, INFINITY, at::IntArrayRef{1}).contiguous();  // max |v_i| per reflector, [B, k]
  Scaled s{at::empty({B, d, kk}, V3.options()), at::empty({B, kk}, V3.options())};
  AT_DISPATCH_FLOATING_TYPES(V3.scalar_type(), "householder_rescale_cuda", [&] {
    C10_CUDA_CHECK(k::rescale_reflectors<scalar_t>(V3.const_data_ptr<scalar_t>(), V3.stride(0), V3.stride(1),
                                                   V3.stride(2), amax.const_data_ptr<scalar_t>(),
                                                   s.V.data_ptr<scalar_t>(), s.inv.data_ptr<scalar_t>(), B, d, kk,
                                                   stream));
  });
  return s;
}

// ---- the shared backward: reverse of out = X - Y T W1, W1 = Yᵀ X (reference _ut_backward) -----------

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

Tensor dense_dV(const Tensor& A, const Tensor& Bt, const Scaled& s, const Tensor& dtau, const Tensor& tau,
                cudaStream_t stream) {
  const int64_t B = s.V.size(0), d = s.V.size(1), kk = s.V.size(2);
  auto dV = at::empty({B, d, kk}, s.V.options());
  const auto Ac = A.contiguous(), dtc = dtau.contiguous(), tc = tau.contiguous();
  const Tensor Btc = Bt.defined() ? Bt.contiguous() : Tensor();
  AT_DISPATCH_FLOATING_TYPES(s.V.scalar_type(), "householder_dense_dV_cuda", [&] {
    C10_CUDA_CHECK(k::dense_dV<scalar_t>(Ac.const_data_ptr<scalar_t>(),
                                         Btc.defined() ? Btc.const_data_ptr<scalar_t>() : nullptr,
                                         s.V.const_data_ptr<scalar_t>(), dtc.const_data_ptr<scalar_t>(),
                                         tc.const_data_ptr<scalar_t>(), s.inv.const_data_ptr<scalar_t>(),
                                         dV.data_ptr<scalar_t>(), B, d, kk, stream));
  });
  return dV;
}

}  // namespace householder_cuda
}  // namespace opt_fast
