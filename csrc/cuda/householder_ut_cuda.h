// Torch glue shared by the CUDA Householder ops (householder_product_cuda.cpp, householder_orthogonal_cuda.cpp,
// householder_apply_cuda.cpp). Compiled only when torch has CUDA (setup.py); the kernels themselves are pure
// CUDA (householder_kernels.cuh).
//
// Same maths as the CPU kernels (csrc/cpu/householder_ut.h, the UT / compact-WY form of
// opt_fast/reference/householder.py):
//     H_1 … H_k = I - Y T Yᵀ,   T = (I + D N)⁻¹ D,   D = diag(tau),   N = striu(YᵀY),
// never dividing by tau. Paths:
//   * forward, at most kSmallMaxRows rows and the matrix fits in shared memory: one launch for the whole
//     batch (householder_small: one block per matrix, rank-1 updates in shared memory);
//   * otherwise (and for every backward): level 3 — the products are batched cuBLAS GEMMs (at::bmm /
//     at::baddbmm), T is built by substitution on 32-wide diagonal leaves (one launch) and then one level at
//     a time, T12 = -T11 N12 T22 over all sibling pairs at once (two batched matmuls per level, log2(k/32)
//     levels), as in the CPU kernel. The backward recomputes N and T (nothing stored per reflector) and runs
//     the reference's _ut_backward with full matrices; its elementwise tails are one launch each.
// The dense ops rescale each reflector by a power of two first, on both paths (householder_scale.cuh), so
// that vᵀv neither over- nor underflows (in float32 through cuBLAS it underflowed to tau = 0 from |v| ~ 1e-19
// while the small path, accumulating in double, did not: the two paths disagreed).
// Everything runs on the current stream of the input's device; every launch is checked. Float32 GEMMs run
// with TF32 off (CudaScope): the project's precision rule allows no TF32 in a final result.
//
// OPT_FAST_CUDA_SMALL=0 in the environment disables the small-d path (tests use it to cover both paths).
#pragma once

#include "../householder_checks.h"
#include "../opt_fast.h"
#include "cuda_scope.h"
#include "householder_kernels.cuh"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>

#include <cstdint>
#include <utility>

namespace opt_fast {
namespace householder_cuda {

using at::Tensor;
namespace k = opt_fast::cuda;

// Whether the small-d forward serves an m×n output (m <= kSmallMaxRows, fits in shared memory, and not
// disabled by OPT_FAST_CUDA_SMALL=0).
bool use_small(int64_t m, int64_t n, const Tensor& like);

// The small-d forward: out = H_0…H_{k-1} X (X undefined: I[:, :n]); tau2 undefined: the dense ops.
Tensor small_forward(cuda::SmallMode mode, const Tensor& V3, const Tensor& tau2, const Tensor& X3, int64_t n,
                     int64_t kk, cudaStream_t stream);

// C = alpha A B for batches (beta = 0: the uninitialised output is never read).
Tensor bmm_scaled(const Tensor& A, const Tensor& B, double alpha);

// T for each of a batch: N [B, k, k] (strict upper triangle used), tau [B, k]; a new contiguous [B, k, k],
// zero below the diagonal.
Tensor compute_T(const Tensor& N, const Tensor& tau, cudaStream_t stream);

// tau = 2 / diag(N) where > 0, else 0 ([B, k]).
Tensor tau_from_gram(const Tensor& N, cudaStream_t stream);

// Q <- I[:, :n] - Q (Q contiguous [B, m, n]).
void eye_minus_(const Tensor& Q, cudaStream_t stream);

// Y = the unit-lower-trapezoidal part of V3[:, :, :kk], contiguous [B, m, kk].
Tensor unit_lower(const Tensor& V3, int64_t kk, cudaStream_t stream);

// The dense ops' reflectors rescaled by powers of two (the rule of householder_scale.cuh).
struct Scaled {
  Tensor V;    // [B, d, k] contiguous
  Tensor inv;  // [B, k] contiguous: 1/p per reflector, to scale gradients
};
Scaled rescale_reflectors(const Tensor& V3, cudaStream_t stream);

// The reverse of out = X - Y T W1, W1 = Yᵀ X (reference _ut_backward), for N = YᵀY.
struct UTGrads {
  Tensor dY, dtau, dW1;  // dY without the path through W1
};
UTGrads ut_backward(const Tensor& G, const Tensor& Y, const Tensor& tau, const Tensor& W1, const Tensor& N,
                    cudaStream_t stream);

// dV = (A + (Bt ? Btᵀ : 0) - (dtau tau²) V) · inv, the dense ops' final step, at the rescaled reflectors
// s.V (A [B, d, k]; Bt [B, k, d] or undefined).
Tensor dense_dV(const Tensor& A, const Tensor& Bt, const Scaled& s, const Tensor& dtau, const Tensor& tau,
                cudaStream_t stream);

}  // namespace householder_cuda
}  // namespace opt_fast
