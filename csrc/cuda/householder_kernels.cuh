// Pure-CUDA kernels of the Householder ops (no torch headers): raw pointers, sizes, strides in elements,
// a stream; each launcher returns the launch's cudaError_t (cudaSuccess for empty work: nothing launched).
// Instantiated for float and double; the small-d path is householder_small_kernels.cu, the pieces of the
// level-3 path householder_ut_kernels.cu. The torch glue is householder_<op>_cuda.cpp with the shared
// householder_ut_cuda.h; the maths is the UT / compact-WY form of opt_fast/reference/householder.py and
// csrc/cpu/householder_ut.h. The dense ops rescale every reflector by a power of two first (the rule:
// householder_scale.cuh), on both paths.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

namespace opt_fast {
namespace cuda {

// ---- small-d path: the whole op, one launch, one thread block per matrix ---------------------------
enum class SmallMode : int {
  kProduct = 0,  // LAPACK reflectors: unit-lower V[:, :k] with tau given, X = I[:, :n]
  kDense = 1,    // dense V (each column rescaled), tau = 2/||v||² (0 unless > 0), X = I (orthogonal) or X given
                 // (apply)
};

// Shared-memory bytes of householder_small for an m×n output.
size_t householder_small_smem_bytes(int64_t m, int64_t n, size_t elem_size);
// The most dynamic shared memory one block may use on the current device (opt-in limit).
cudaError_t householder_small_smem_limit(size_t* bytes);

// out[b] (contiguous [B, m, n]) = H_0 ... H_{k-1} X[b] by backward accumulation of rank-1 reflections in
// shared memory. V: [B, m, >=k] with strides (vsb, vsr, vsc); tau: [B, k] (kProduct only, strides tsb,
// tsc); X: [B, m, n] with strides (xsb, xsr, xsc), or nullptr for the identity I[:, :n].
template <typename T>
cudaError_t householder_small(SmallMode mode, const T* V, int64_t vsb, int64_t vsr, int64_t vsc, const T* tau,
                              int64_t tsb, int64_t tsc, const T* X, int64_t xsb, int64_t xsr, int64_t xsc, T* out,
                              int64_t B, int64_t m, int64_t n, int64_t k, cudaStream_t stream);

// ---- pieces of the level-3 path (the GEMMs are cuBLAS calls in the glue) --------------------------

// Y (contiguous [B, m, k]) = the unit-lower-trapezoidal part of V[:, :, :k] (strides vsb, vsr, vsc).
template <typename T>
cudaError_t unit_lower(const T* V, int64_t vsb, int64_t vsr, int64_t vsc, T* Y, int64_t B, int64_t m, int64_t k,
                       cudaStream_t stream);

// out (contiguous [B, d, k]) = V (strides vsb, vsr, vsc) with column c multiplied by inv[b, c], the
// reciprocal of the power of two that brings amax[b, c] = max_i |V[b, i, c]| into [1, 2)
// (reflector_inv_scale); inv (contiguous [B, k]) is written too. amax: contiguous [B, k].
template <typename T>
cudaError_t rescale_reflectors(const T* V, int64_t vsb, int64_t vsr, int64_t vsc, const T* amax, T* out, T* inv,
                               int64_t B, int64_t d, int64_t k, cudaStream_t stream);

// tau[b, i] = 2 / N[b, i, i] where N[b, i, i] > 0, else 0 (N contiguous [B, k, k], tau contiguous [B, k]).
template <typename T>
cudaError_t tau_from_gram(const T* N, T* tau, int64_t B, int64_t k, cudaStream_t stream);

// Maximum leaf size of t_leaf.
constexpr int kTLeafMax = 32;

// Diagonal leaf blocks (size s <= kTLeafMax, P per matrix, K = s·P) of T = (I + D N)⁻¹ D by substitution:
// T[i, i] = tau_i, T[i, j] = -tau_i Σ_{i<l<=j} N[i, l] T[l, j]. N, T contiguous [B, K, K], tau [B, K];
// only N's strict upper triangle inside the leaves is read, only T's leaves are written.
template <typename T>
cudaError_t t_leaf(const T* N, const T* tau, T* Tm, int64_t B, int64_t K, int64_t s, cudaStream_t stream);

// Q (contiguous [B, m, n]) <- I[:, :n] - Q.
template <typename T>
cudaError_t eye_minus(T* Q, int64_t B, int64_t m, int64_t n, cudaStream_t stream);

// The reverse of T = A⁻¹ D (A = I + D N) given S = A⁻ᵀ dT and P = S Tᵀ (all contiguous [B, k, k]):
// dtau_i = S_ii - Σ_{j>i} P_ij N_ij;  sym = dN + dNᵀ with dN_ij = -tau_i P_ij for i < j (0 elsewhere).
template <typename T>
cudaError_t t_backward_tail(const T* S, const T* P, const T* N, const T* tau, T* dtau, T* sym, int64_t B, int64_t k,
                            cudaStream_t stream);

// householder_product's dV (contiguous [B, m, n]): dV[i, c] = dY[i, c] + (i < n ? dW1[c, i] : 0) for
// c < k and i > c, else 0 (dY [B, m, k], dW1 [B, k, n], contiguous).
template <typename T>
cudaError_t product_dV(const T* dY, const T* dW1, T* dV, int64_t B, int64_t m, int64_t n, int64_t k,
                       cudaStream_t stream);

// The dense ops' dV (contiguous [B, d, k]) from the gradient at the rescaled reflectors V:
// dV[i, c] = (A[i, c] + (Bt ? Bt[c, i] : 0) - dtau_c tau_c² V[i, c]) inv_c
// (A, V [B, d, k], Bt [B, k, d], dtau, tau, inv [B, k]; all contiguous).
template <typename T>
cudaError_t dense_dV(const T* A, const T* Bt, const T* V, const T* dtau, const T* tau, const T* inv, T* dV, int64_t B,
                     int64_t d, int64_t k, cudaStream_t stream);

}  // namespace cuda
}  // namespace opt_fast
