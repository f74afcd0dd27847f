// The UT form of the CPU Householder kernels: T and its diagonal blocks, products with T by block
// substitution, the backward of T = (I + D N)⁻¹ D, and the rescaling of the dense ops' reflectors
// (declarations and contracts: householder_ut.h).
#include "householder_ut.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

namespace opt_fast {
namespace householder {
namespace {

// ---- T = (I + D N)⁻¹ D ---------------------------------------------------------------------------
//
// Leaf blocks (<= 32) by substitution, then one level at a time over all blocks of that level at once:
// T12 = -T11 (N12 T22) for every pair of sibling blocks, as two batched matmuls on strided views of the
// diagonal blocks (k is padded with identity reflectors, tau = 0, to leaf·2^levels: the leading k×k block
// of T does not depend on later reflectors).

// Substitution, bottom row first: T[i, i] = tau_i, T[i, i+1:] = -tau_i N[i, i+1:] T[i+1:, i+1:], on the
// diagonal blocks of size s. Reads only the strict upper triangle of N; T's lower part stays zero.
template <typename scalar_t>
void t_leaf_kernel(const Tensor& T, const Tensor& N, const Tensor& tau, int64_t s) {
  const int64_t B = T.size(0), K = T.size(1), P = K / s;
  TORCH_INTERNAL_ASSERT(T.is_contiguous() && N.is_contiguous() && tau.is_contiguous());
  scalar_t* const Tp = T.data_ptr<scalar_t>();
  const scalar_t* const Np = N.const_data_ptr<scalar_t>();
  const scalar_t* const tp = tau.const_data_ptr<scalar_t>();
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 18) / (s * s * s / 6 + 1));  // ~256k FMA per task
  at::parallel_for(0, B * P, grain, [&](int64_t w0, int64_t w1) {
    for (int64_t w = w0; w < w1; ++w) {
      const int64_t b = w / P, o = (w % P) * s;  // block offset on the diagonal
      scalar_t* Tb = Tp + b * K * K + o * K + o;
      const scalar_t* Nb = Np + b * K * K + o * K + o;
      const scalar_t* tb = tp + b * K + o;
      for (int64_t i = s - 1; i >= 0; --i) {
        scalar_t* __restrict__ Ti = Tb + i * K;
        const scalar_t* Ni = Nb + i * K;
        for (int64_t j = i + 1; j < s; ++j) Ti[j] = scalar_t(0);
        for (int64_t l = i + 1; l < s; ++l) {
          const scalar_t a = Ni[l];
          const scalar_t* __restrict__ Tl = Tb + l * K;
          for (int64_t j = l; j < s; ++j) Ti[j] += a * Tl[j];
        }
        const scalar_t t = tb[i];
        for (int64_t j = i + 1; j < s; ++j) Ti[j] *= -t;
        Ti[i] = t;
      }
    }
  });
}

// [B, P, s, s] view of the blocks at (p·2s + r0, p·2s + c0), p < P, of a contiguous [B, K, K] tensor.
inline Tensor sibling_blocks(const Tensor& M, int64_t P, int64_t s, int64_t r0, int64_t c0) {
  const int64_t K = M.size(1);
  return M.as_strided({M.size(0), P, s, s}, {K * K, 2 * s * (K + 1), K, 1}, M.storage_offset() + r0 * K + c0);
}

}  // namespace

Tensor compute_T(const Tensor& N, const Tensor& tau) {
  const int64_t B = N.size(0), k = N.size(1);
  constexpr int64_t leaf_max = 32;
  int64_t P = 1;
  while (P * leaf_max < k) P *= 2;
  const int64_t s0 = k == 0 ? 0 : (k + P - 1) / P, K = s0 * P;
  Tensor Np = N, tp = tau;
  if (K != k) {  // pad with identity reflectors
    Np = at::zeros({B, K, K}, N.options());
    blk(Np, 0, k, 0, k).copy_(N);
    tp = at::zeros({B, K}, tau.options());
    tp.narrow(1, 0, k).copy_(tau);
  } else {
    Np = N.contiguous();
    tp = tau.contiguous();
  }
  auto T = at::zeros({B, K, K}, N.options());
  if (B > 0 && K > 0) {
    AT_DISPATCH_FLOATING_TYPES(T.scalar_type(), "householder_T", [&] { t_leaf_kernel<scalar_t>(T, Np, tp, s0); });
    for (int64_t s = s0; s < K; s *= 2) {
      const int64_t Pl = K / (2 * s);
      // T12 = -T11 (N12 T22), for all Pl sibling pairs at once
      if (Pl == 1 && s > kPanel) {  // the top level: large enough for the triangles to pay
        const auto T11 = blk(T, 0, s, 0, s), T22 = blk(T, s, K, s, K);
        auto X = at::zeros({B, s, s}, T.options());
        mul(X, blk(Np, 0, s, s, K), kFull, T22, kUpper, 1.0, kPanel);
        mul(blk(T, 0, s, s, K), T11, kUpper, X, kFull, -1.0, kPanel);
        continue;
      }
      auto X = at::matmul(sibling_blocks(Np, Pl, s, 0, s), sibling_blocks(T, Pl, s, s, s));
      X.neg_();
      sibling_blocks(T, Pl, s, 0, s).copy_(at::matmul(sibling_blocks(T, Pl, s, 0, 0), X));
    }
  }
  return K == k ? T : blk(T, 0, k, 0, k).contiguous();
}

namespace {

// compute_T_diag: one pass of substitution per diagonal block, straight from N's diagonal blocks.
template <typename scalar_t>
void t_diag_kernel(const Tensor& Td, const Tensor& N, const Tensor& tau) {
  const int64_t B = Td.size(0), P = Td.size(1), bs = Td.size(2), k = N.size(1);
  const int64_t sNb = N.stride(0), sNr = N.stride(1);
  // A dimension of size 1 is only ever indexed at 0, so its stride does not matter (.contiguous() keeps it).
  TORCH_INTERNAL_ASSERT((N.size(2) <= 1 || N.stride(2) == 1) && Td.is_contiguous() &&
                        (!tau.defined() || tau.size(1) <= 1 || tau.stride(1) == 1));
  const scalar_t* const Np = N.const_data_ptr<scalar_t>();
  const scalar_t* const tp = tau.defined() ? tau.const_data_ptr<scalar_t>() : nullptr;
  const int64_t stb = tau.defined() ? tau.stride(0) : 0;
  scalar_t* const Tp = Td.data_ptr<scalar_t>();
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 17) / (bs * bs * bs / 6 + 1));
  at::parallel_for(0, B * P, grain, [&](int64_t w0, int64_t w1) {
    for (int64_t w = w0; w < w1; ++w) {
      const int64_t b = w / P, o = (w % P) * bs, n = std::min(bs, k - o);
      const scalar_t* Nb = Np + b * sNb + o * sNr + o;
      scalar_t* Tb = Tp + w * bs * bs;
      std::fill(Tb, Tb + bs * bs, scalar_t(0));
      scalar_t acc[kMaxTDiagBlock];
      for (int64_t i = n - 1; i >= 0; --i) {
        scalar_t* Ti = Tb + i * bs;
        const scalar_t* Ni = Nb + i * sNr;
        // acc = N[i, i+1:] T[i+1:, i+1:]; T's rows below are zero left of their diagonal, so every
        // axpy runs over the same range (more flops than needed, but plain vectorizable loops)
        const int64_t len = n - i - 1;
        std::fill(acc, acc + len, scalar_t(0));
        for (int64_t l = i + 1; l < n; ++l) {
          const scalar_t a = Ni[l];
          const scalar_t* Tl = Tb + l * bs + i + 1;
          for (int64_t j = 0; j < len; ++j) acc[j] += a * Tl[j];
        }
        scalar_t t;
        if (tp) {
          t = tp[b * stb + o + i];
        } else {
          const scalar_t sq = Ni[i];
          t = sq > scalar_t(0) ? scalar_t(2) / sq : scalar_t(0);
        }
        for (int64_t j = 0; j < len; ++j) Ti[i + 1 + j] = -t * acc[j];
        Ti[i] = t;
      }
    }
  });
}

}  // namespace

Tensor compute_T_diag(const Tensor& N, const Tensor& tau, int64_t bs) {
  const int64_t B = N.size(0), k = N.size(1);
  bs = std::max<int64_t>(1, std::min({bs, k, kMaxTDiagBlock}));
  const int64_t P = (k + bs - 1) / bs;
  auto Td = at::empty({B, P, bs, bs}, N.options());
  if (Td.numel() > 0) {
    AT_DISPATCH_FLOATING_TYPES(N.scalar_type(), "householder_T_diag", [&] { t_diag_kernel<scalar_t>(Td, N, tau); });
  }
  return Td;
}

Tensor apply_T_right(const Tensor& Td, const Tensor& N, const Tensor& C, bool trap, double sign) {
  const int64_t B = C.size(0), c = C.size(1), k = C.size(2), bs = Td.size(2);
  auto Z = trap ? at::zeros({B, c, k}, C.options()) : at::empty({B, c, k}, C.options());
  auto tmp = empty_oriented(B, c, std::min(bs, k), C);
  for (int64_t I = Td.size(1) - 1; I >= 0; --I) {
    const int64_t i0 = I * bs, i1 = std::min(k, i0 + bs), r0 = trap ? i0 : 0;
    Tensor R = blk(C, r0, c, i0, i1);
    if (i1 < k) {  // R = C_:I - Z_:>I N_{I,>I}ᵀ (rows >= i1 only when trap)
      R = blk(tmp, r0, c, 0, i1 - i0);
      R.copy_(blk(C, r0, c, i0, i1));
      const int64_t u0 = trap ? i1 : 0;
      gemm(rows(R, u0 - r0, c - r0), blk(Z, u0, c, i1, k), blk(N, i0, i1, i1, k).mT(), -sign);
    }
    const auto TII = Td.select(1, I).narrow(1, 0, i1 - i0).narrow(2, 0, i1 - i0);
    gemm(blk(Z, r0, c, i0, i1), R, TII.mT(), sign, 0.0);
  }
  return Z;
}

Tensor tau_from_norms(const Tensor& sq) {
  return at::where(sq > 0, 2.0 / sq, at::zeros_like(sq)).contiguous();
}

Tensor gram_upper(const Tensor& V3, int64_t nb) {
  auto N = at::empty({V3.size(0), V3.size(2), V3.size(2)}, V3.options());
  mul_upper(N, V3.mT(), V3, 1.0, nb);
  return N;
}

std::pair<Tensor, Tensor> T_and_Ainv(const Tensor& N, const Tensor& tau) {
  const int64_t B = N.size(0), k = N.size(1);
  auto Ns = at::empty({2 * B, k, k}, N.options());
  Ns.narrow(0, 0, B).copy_(N);
  auto Ns2 = Ns.narrow(0, B, B);
  at::mul_out(Ns2, N, tau.unsqueeze(-1));  // only the strict upper part is read
  auto taus = at::cat({tau, at::ones_like(tau)}, 0);
  auto TA = compute_T(Ns, taus);
  return {TA.narrow(0, 0, B), TA.narrow(0, B, B)};
}

namespace {

template <typename scalar_t>
void zero_strict_lower_kernel(const Tensor& M) {
  const int64_t k = M.size(1);
  scalar_t* const p = M.data_ptr<scalar_t>();
  at::parallel_for(0, M.size(0) * k, std::max<int64_t>(1, 32768 / (k + 1)), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) std::fill(p + r * k, p + r * k + r % k, scalar_t(0));
  });
}

// dtau_i = S_ii - Σ_{j>i} P_ij N_ij;  sym = dN + dNᵀ with dN_ij = -tau_i P_ij (i < j).
template <typename scalar_t>
void t_backward_tail_kernel(const Tensor& dtau, const Tensor& sym, const Tensor& S, const Tensor& P,
                            const Tensor& N, const Tensor& tau) {
  const int64_t k = S.size(1), kk = k * k;
  const scalar_t *Sp = S.const_data_ptr<scalar_t>(), *Pp = P.const_data_ptr<scalar_t>();
  const scalar_t *Np = N.const_data_ptr<scalar_t>(), *tp = tau.const_data_ptr<scalar_t>();
  scalar_t *dp = dtau.data_ptr<scalar_t>(), *Yp = sym.data_ptr<scalar_t>();
  at::parallel_for(0, S.size(0) * k, std::max<int64_t>(1, 16384 / (k + 1)), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t b = r / k, i = r % k;
      const scalar_t* Pi = Pp + b * kk + i * k;
      const scalar_t* Ni = Np + b * kk + i * k;
      scalar_t* sym_b = Yp + b * kk;
      const scalar_t t = tp[r];
      scalar_t acc = 0;
      for (int64_t j = i + 1; j < k; ++j) {
        acc += Pi[j] * Ni[j];
        sym_b[i * k + j] = -t * Pi[j];
      }
      sym_b[i * k + i] = 0;
      dp[r] = Sp[b * kk + i * k + i] - acc;
    }
  });
  // mirror the strict upper triangle into the lower one, in 32×32 tiles
  constexpr int64_t tile = 32;
  const int64_t nt = (k + tile - 1) / tile;
  at::parallel_for(0, S.size(0) * nt, std::max<int64_t>(1, 64 / (nt + 1)), [&](int64_t w0, int64_t w1) {
    for (int64_t w = w0; w < w1; ++w) {
      scalar_t* sym_b = Yp + (w / nt) * kk;
      const int64_t j0 = (w % nt) * tile, j1 = std::min(k, j0 + tile);  // rows j of the lower triangle
      for (int64_t i0 = 0; i0 < j1; i0 += tile) {
        const int64_t i1 = std::min(i0 + tile, j1);
        for (int64_t j = j0; j < j1; ++j)
          for (int64_t i = i0; i < std::min(i1, j); ++i) sym_b[j * k + i] = sym_b[i * k + j];
      }
    }
  });
}

}  // namespace

std::pair<Tensor, Tensor> t_backward(const Tensor& dT, const Tensor& N, const Tensor& T, const Tensor& Ainv,
                                     const Tensor& tau, int64_t nb) {
  const int64_t B = dT.size(0), k = dT.size(1);
  AT_DISPATCH_FLOATING_TYPES(dT.scalar_type(), "householder_zero_lower", [&] { zero_strict_lower_kernel<scalar_t>(dT); });
  auto S = at::empty({B, k, k}, dT.options());
  const auto AinvT = Ainv.mT();
  for (int64_t i0 = 0; i0 < k; i0 += nb) {  // S[i, i0:] = A⁻ᵀ[i, :i1] dT[:i1, i0:]
    const int64_t i1 = std::min(k, i0 + nb);
    gemm(blk(S, i0, i1, i0, k), blk(AinvT, i0, i1, 0, i1), blk(dT, 0, i1, i0, k), 1.0, 0.0);
  }
  auto P = at::empty({B, k, k}, dT.options());
  mul_upper_lower_trap(P, S, T.mT(), 1.0, nb);
  auto dtau = at::empty({B, k}, dT.options());
  auto sym = at::empty({B, k, k}, dT.options());
  AT_DISPATCH_FLOATING_TYPES(dT.scalar_type(), "householder_t_backward", [&] {
    t_backward_tail_kernel<scalar_t>(dtau, sym, S, P, N.contiguous(), tau.contiguous());
  });
  return {dtau, sym};
}

// ---- reflector scaling ------------------------------------------------------------------------------

namespace {

template <typename scalar_t>
bool gram_needs_rescale_kernel(const Tensor& N, const Tensor& V3) {
  const int64_t B = V3.size(0), d = V3.size(1), k = V3.size(2);
  const scalar_t* const Np = N.const_data_ptr<scalar_t>();
  const scalar_t* const Vp = V3.const_data_ptr<scalar_t>();
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t j = 0; j < k; ++j) {
      const scalar_t sq = Np[b * N.stride(0) + j * (N.stride(1) + N.stride(2))];
      if (!norm2_out_of_range(sq)) continue;
      if (sq != scalar_t(0)) return true;
      const scalar_t* v = Vp + b * V3.stride(0) + j * V3.stride(2);
      for (int64_t i = 0; i < d; ++i)
        if (v[i * V3.stride(1)] != scalar_t(0)) return true;  // vᵀv underflowed to 0
    }
  }
  return false;
}

}  // namespace

bool gram_needs_rescale(const Tensor& N, const Tensor& V3) {
  bool need = false;
  AT_DISPATCH_FLOATING_TYPES(V3.scalar_type(), "householder_gram_check", [&] {
    need = gram_needs_rescale_kernel<scalar_t>(N, V3);
  });
  return need;
}

Scaled rescale_reflectors(const Tensor& V3) {
  auto inv = at::amax(V3.abs(), {1}, /*keepdim=*/true).contiguous();  // max |v_i| per reflector
  AT_DISPATCH_FLOATING_TYPES(V3.scalar_type(), "householder_rescale", [&] {
    scalar_t* const a = inv.data_ptr<scalar_t>();
    for (int64_t i = 0; i < inv.numel(); ++i) a[i] = reflector_inv_scale(a[i]);
  });
  return {V3 * inv, inv};  // exact: multiplications by powers of two
}

}  // namespace householder
}  // namespace opt_fast
