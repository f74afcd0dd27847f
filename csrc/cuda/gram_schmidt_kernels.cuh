// Pure-CUDA kernels of gram_schmidt (no torch headers); the algorithm and its stability argument are at the
// top of gram_schmidt_kernels.cu, the torch glue is gram_schmidt_cuda.cpp. Launchers return the launch's
// cudaError_t (cudaSuccess for empty work: nothing launched). Instantiated for float and double.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace opt_fast {
namespace cuda {

constexpr int64_t kGsMaxPanel = 128;  // widest panel gs_panel_qr takes

// In place, for each b < B: the jb (<= kGsMaxPanel) columns W[b][c] (c < jb) of length m, element i at
// W + b·sb + c·sc + i·si, are replaced by the Q of their QR factorisation with positive diag(R), by
// classical Gram-Schmidt with one re-orthogonalisation per column (CGS2), accumulating in double. col0 is
// the index of column 0 in the whole matrix: an exactly dependent column c is replaced by a pseudo-random
// vector seeded by col0 + c (see the .cu file), so Q stays finite without a host-side check.
template <typename T>
cudaError_t gs_panel_qr(T* W, int64_t sb, int64_t sc, int64_t si, int64_t B, int64_t m, int64_t jb, int64_t col0,
                        cudaStream_t stream);

// out[b, i, j] = -M[b, i, j] for i >= j and -M[b, j, i] for i < j (M, out contiguous [B, n, n]): the
// "copyltu" of the QR backward, negated (M = Gᵀ Q there).
template <typename T>
cudaError_t neg_copyltu(const T* M, T* out, int64_t B, int64_t n, cudaStream_t stream);

}  // namespace cuda
}  // namespace opt_fast
