// The small-d path of the Householder forwards (declarations and contracts: householder_kernels.cuh).
//
// For m <= 160 rows (the matrix in shared memory; the glue decides), householder_small does the whole
// forward in one launch, one thread block per matrix: start from X (or I[:, :n]) and apply H_{k-1}, ..., H_0
// as rank-1 updates X <- X - tau y (yᵀ X), the backward accumulation of LAPACK's org2r (backward stable).
// The k steps are sequential inside the block, which at this size costs less than the ~15 launches of the
// level-3 path (d <= 64 is launch-latency bound). Dot products accumulate in double (also for float data):
// it costs little here and keeps the float32 error at or below that of torch's own float32 routines. A
// dense reflector whose vᵀv (in double) leaves the safe range is rescaled by a power of two
// (householder_scale.cuh), as the level-3 path rescales every reflector, so that the two paths agree on
// tiny and huge reflectors.
#include "householder_kernels.cuh"

#include "cuda_utils.cuh"
#include "householder_scale.cuh"

namespace opt_fast {
namespace cuda {

namespace {

constexpr int kThreads = 256;

// Shared memory layout (doubles first, for alignment): scratch[34] | w[n] (double) | y[m] | Q[m·n] (T).
template <typename T>
__global__ void __launch_bounds__(kThreads) householder_small_kernel(
    SmallMode mode, const T* __restrict__ V, int64_t vsb, int64_t vsr, int64_t vsc, const T* __restrict__ tau,
    int64_t tsb, int64_t tsc, const T* __restrict__ X, int64_t xsb, int64_t xsr, int64_t xsc, T* __restrict__ out,
    int64_t m, int64_t n, int64_t k) {
  extern __shared__ double smem[];
  double* scratch = smem;
  double* w = smem + 34;
  T* y = reinterpret_cast<T*>(w + n);
  T* Q = y + m;
  const int64_t b = blockIdx.x, mn = m * n;
  const T* Vb = V + b * vsb;

  for (int64_t e = threadIdx.x; e < mn; e += blockDim.x) {
    const int64_t i = e / n, c = e % n;
    Q[e] = X ? X[b * xsb + i * xsr + c * xsc] : T(i == c ? 1 : 0);
  }
  for (int64_t j = k - 1; j >= 0; --j) {
    double tj;
    if (mode == SmallMode::kProduct) {
      for (int64_t i = threadIdx.x; i < m; i += blockDim.x)
        y[i] = i < j ? T(0) : (i == j ? T(1) : Vb[i * vsr + j * vsc]);
      tj = static_cast<double>(tau[b * tsb + j * tsc]);
      __syncthreads();
    } else {
      double sq = 0.0;
      for (int64_t i = threadIdx.x; i < m; i += blockDim.x) {
        const T v = Vb[i * vsr + j * vsc];
        y[i] = v;
        sq += static_cast<double>(v) * static_cast<double>(v);
      }
      sq = block_sum(sq, scratch);  // synchronises: y is complete afterwards
      if (norm2_out_of_range(sq)) {  // the same for the whole block; only double data at |v| beyond ~1e±100
        double amax = 0.0;
        for (int64_t i = threadIdx.x; i < m; i += blockDim.x) amax = fmax(amax, fabs(static_cast<double>(y[i])));
        const T s = reflector_inv_scale(static_cast<T>(block_max(amax, scratch)));
        sq = 0.0;
        for (int64_t i = threadIdx.x; i < m; i += blockDim.x) {  // the entries this thread loaded
          const T v = y[i] * s;
          y[i] = v;
          sq += static_cast<double>(v) * static_cast<double>(v);
        }
        sq = block_sum(sq, scratch);
      }
      tj = sq > 0.0 ? 2.0 / sq : 0.0;  // NaN column: tau 0, and the NaN still reaches Q through y
    }
    // w = yᵀ Q, one thread per column (consecutive threads, consecutive addresses)
    for (int64_t c = threadIdx.x; c < n; c += blockDim.x) {
      double acc = 0.0;
      for (int64_t i = 0; i < m; ++i) acc += static_cast<double>(y[i]) * static_cast<double>(Q[i * n + c]);
      w[c] = acc;
    }
    __syncthreads();
    for (int64_t e = threadIdx.x; e < mn; e += blockDim.x) {
      const int64_t i = e / n, c = e % n;
      Q[e] = static_cast<T>(static_cast<double>(Q[e]) - tj * static_cast<double>(y[i]) * w[c]);
    }
    __syncthreads();  // Q complete before the next w; y and w free to overwrite
  }
  T* ob = out + b * mn;
  for (int64_t e = threadIdx.x; e < mn; e += blockDim.x) ob[e] = Q[e];
}

}  // namespace

size_t householder_small_smem_bytes(int64_t m, int64_t n, size_t elem_size) {
  return sizeof(double) * static_cast<size_t>(34 + n) + elem_size * static_cast<size_t>(m + m * n);
}

cudaError_t householder_small_smem_limit(size_t* bytes) {
  int dev = 0, v = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err != cudaSuccess) return err;
  err = cudaDeviceGetAttribute(&v, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
  if (err != cudaSuccess) return err;
  *bytes = static_cast<size_t>(v);
  return cudaSuccess;
}

template <typename T>
cudaError_t householder_small(SmallMode mode, const T* V, int64_t vsb, int64_t vsr, int64_t vsc, const T* tau,
                              int64_t tsb, int64_t tsc, const T* X, int64_t xsb, int64_t xsr, int64_t xsc, T* out,
                              int64_t B, int64_t m, int64_t n, int64_t k, cudaStream_t stream) {
  if (B <= 0 || m <= 0 || n <= 0) return cudaSuccess;
  if (B > 0x7fffffff) return cudaErrorInvalidValue;  // one block per matrix
  const size_t smem = householder_small_smem_bytes(m, n, sizeof(T));
  if (smem > 48 * 1024) {  // above the default limit a kernel must opt in
    const cudaError_t err = cudaFuncSetAttribute(householder_small_kernel<T>,
                                                 cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
    if (err != cudaSuccess) return err;
  }
  householder_small_kernel<T><<<static_cast<unsigned>(B), kThreads, smem, stream>>>(
      mode, V, vsb, vsr, vsc, tau, tsb, tsc, X, xsb, xsr, xsc, out, m, n, k);
  return cudaGetLastError();
}

template cudaError_t householder_small<float>(SmallMode, const float*, int64_t, int64_t, int64_t, const float*,
                                              int64_t, int64_t, const float*, int64_t, int64_t, int64_t, float*,
                                              int64_t, int64_t, int64_t, int64_t, cudaStream_t);
template cudaError_t householder_small<double>(SmallMode, const double*, int64_t, int64_t, int64_t, const double*,
                                               int64_t, int64_t, const double*, int64_t, int64_t, int64_t, double*,
                                               int64_t, int64_t, int64_t, int64_t, cudaStream_t);

}  // namespace cuda
}  // namespace opt_fast
