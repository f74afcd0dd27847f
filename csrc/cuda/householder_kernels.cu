// CUDA kernels of the Householder ops (declarations and contracts: householder_kernels.cuh).
//
// Two paths, chosen by the glue (householder_cuda.cpp):
//  * small d (m <= 160 rows, the matrix in shared memory): householder_small does the whole forward in one
//    launch, one thread block per matrix: start from X (or I[:, :n]) and apply H_{k-1}, ..., H_0 as rank-1
//    updates X <- X - tau y (yᵀ X), the backward accumulation of LAPACK's org2r (backward stable). The k
//    steps are sequential inside the block, which at this size costs less than the ~15 launches of the
//    level-3 path (d <= 64 is launch-latency bound: docs/performance.md).
//  * otherwise the level-3 UT form, H_0…H_{k-1} = I - Y T Yᵀ, T = (I + D N)⁻¹ D, N = striu(YᵀY): the
//    products are cuBLAS batched GEMMs in the glue; these kernels do what cuBLAS cannot: the unit-lower
//    extraction, tau from the Gram diagonal, T's diagonal leaves by substitution, I - Q, and the
//    elementwise tails of the backward. Each is one launch over the whole batch.
// Dot products and substitutions accumulate in double (also for float data): it costs little here and
// keeps the float32 error at or below that of torch's own float32 routines.
#include "householder_kernels.cuh"

#include "cuda_utils.cuh"

namespace opt_fast {
namespace cuda {

namespace {

constexpr int kThreads = 256;

// ---- small-d path ---------------------------------------------------------------------------------

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

// ---- level-3 path pieces -----------------------------------------------------------------------------

template <typename T>
__global__ void unit_lower_kernel(const T* __restrict__ V, int64_t vsb, int64_t vsr, int64_t vsc, T* __restrict__ Y,
                                  int64_t B, int64_t m, int64_t k) {
  const int64_t total = B * m * k;
  for (int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; e < total; e += int64_t(gridDim.x) * blockDim.x) {
    const int64_t j = e % k, i = (e / k) % m, b = e / (m * k);
    Y[e] = i < j ? T(0) : (i == j ? T(1) : V[b * vsb + i * vsr + j * vsc]);
  }
}

template <typename T>
__global__ void tau_from_gram_kernel(const T* __restrict__ N, T* __restrict__ tau, int64_t B, int64_t k) {
  const int64_t total = B * k;
  for (int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; e < total; e += int64_t(gridDim.x) * blockDim.x) {
    const int64_t b = e / k, i = e % k;
    const T sq = N[b * k * k + i * k + i];
    tau[e] = sq > T(0) ? T(2) / sq : T(0);
  }
}

// One warp-sized block per leaf (b, p); rows from the bottom up, one thread per column.
template <typename T>
__global__ void __launch_bounds__(kTLeafMax) t_leaf_kernel(const T* __restrict__ N, const T* __restrict__ tau,
                                                           T* __restrict__ Tm, int64_t K, int64_t s) {
  __shared__ double Ns[kTLeafMax][kTLeafMax + 1];
  __shared__ double Ts[kTLeafMax][kTLeafMax + 1];
  const int64_t P = K / s, b = blockIdx.x / P, o = (blockIdx.x % P) * s;
  const int j = threadIdx.x;
  const T* Nb = N + b * K * K + o * K + o;
  const T* tb = tau + b * K + o;
  for (int64_t i = 0; i < s; ++i) Ns[i][j] = j < s ? static_cast<double>(Nb[i * K + j]) : 0.0;
  __syncthreads();
  for (int64_t i = s - 1; i >= 0; --i) {
    const double t = static_cast<double>(tb[i]);
    if (j < s) {
      if (j > i) {
        double acc = 0.0;
        for (int64_t l = i + 1; l <= j; ++l) acc += Ns[i][l] * Ts[l][j];  // T[l, j] = 0 for l > j
        Ts[i][j] = -t * acc;
      } else {
        Ts[i][j] = j == i ? t : 0.0;
      }
    }
    __syncthreads();  // row i is read by the rows above it
  }
  T* Tb = Tm + b * K * K + o * K + o;
  if (j < s)
    for (int64_t i = 0; i < s; ++i) Tb[i * K + j] = static_cast<T>(Ts[i][j]);
}

template <typename T>
__global__ void eye_minus_kernel(T* __restrict__ Q, int64_t B, int64_t m, int64_t n) {
  const int64_t total = B * m * n;
  for (int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; e < total; e += int64_t(gridDim.x) * blockDim.x) {
    const int64_t c = e % n, i = (e / n) % m;
    Q[e] = (i == c ? T(1) : T(0)) - Q[e];
  }
}

// One block per row (b, i).
template <typename T>
__global__ void __launch_bounds__(kThreads) t_backward_tail_kernel(const T* __restrict__ S, const T* __restrict__ P,
                                                                   const T* __restrict__ N, const T* __restrict__ tau,
                                                                   T* __restrict__ dtau, T* __restrict__ sym,
                                                                   int64_t B, int64_t k) {
  __shared__ double scratch[34];
  for (int64_t r = blockIdx.x; r < B * k; r += gridDim.x) {  // uniform over the block: block_sum is safe
    const int64_t b = r / k, i = r % k, kk = k * k;
    const T* Pb = P + b * kk;
    const T* Nb = N + b * kk;
    const T* tb = tau + b * k;
    T* symb = sym + b * kk;
    const double ti = static_cast<double>(tb[i]);
    double acc = 0.0;
    for (int64_t j = threadIdx.x; j < k; j += blockDim.x) {
      double v = 0.0;
      if (j > i) {
        acc += static_cast<double>(Pb[i * k + j]) * static_cast<double>(Nb[i * k + j]);
        v = -ti * static_cast<double>(Pb[i * k + j]);
      } else if (j < i) {
        v = -static_cast<double>(tb[j]) * static_cast<double>(Pb[j * k + i]);
      }
      symb[i * k + j] = static_cast<T>(v);
    }
    acc = block_sum(acc, scratch);
    if (threadIdx.x == 0) dtau[r] = static_cast<T>(static_cast<double>(S[b * kk + i * k + i]) - acc);
  }
}

template <typename T>
__global__ void product_dV_kernel(const T* __restrict__ dY, const T* __restrict__ dW1, T* __restrict__ dV, int64_t B,
                                  int64_t m, int64_t n, int64_t k) {
  const int64_t total = B * m * n;
  for (int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; e < total; e += int64_t(gridDim.x) * blockDim.x) {
    const int64_t c = e % n, i = (e / n) % m, b = e / (m * n);
    T v = T(0);
    if (c < k && i > c) {
      v = dY[b * m * k + i * k + c];
      if (i < n) v += dW1[b * k * n + c * n + i];
    }
    dV[e] = v;
  }
}

template <typename T>
__global__ void dense_dV_kernel(const T* __restrict__ A, const T* __restrict__ Bt, const T* __restrict__ V,
                                const T* __restrict__ dtau, const T* __restrict__ tau, T* __restrict__ dV, int64_t B,
                                int64_t d, int64_t k) {
  const int64_t total = B * d * k;
  for (int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; e < total; e += int64_t(gridDim.x) * blockDim.x) {
    const int64_t c = e % k, i = (e / k) % d, b = e / (d * k);
    const T t = tau[b * k + c];
    T v = A[e] - dtau[b * k + c] * t * t * V[e];
    if (Bt) v += Bt[b * k * d + c * d + i];
    dV[e] = v;
  }
}

}  // namespace

// ---- launchers ----------------------------------------------------------------------------------------

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

template <typename T>
cudaError_t unit_lower(const T* V, int64_t vsb, int64_t vsr, int64_t vsc, T* Y, int64_t B, int64_t m, int64_t k,
                       cudaStream_t stream) {
  if (B * m * k <= 0) return cudaSuccess;
  unit_lower_kernel<T><<<grid_for(B * m * k, kThreads), kThreads, 0, stream>>>(V, vsb, vsr, vsc, Y, B, m, k);
  return cudaGetLastError();
}

template <typename T>
cudaError_t tau_from_gram(const T* N, T* tau, int64_t B, int64_t k, cudaStream_t stream) {
  if (B * k <= 0) return cudaSuccess;
  tau_from_gram_kernel<T><<<grid_for(B * k, kThreads), kThreads, 0, stream>>>(N, tau, B, k);
  return cudaGetLastError();
}

template <typename T>
cudaError_t t_leaf(const T* N, const T* tau, T* Tm, int64_t B, int64_t K, int64_t s, cudaStream_t stream) {
  if (B <= 0 || K <= 0) return cudaSuccess;
  if (s <= 0 || s > kTLeafMax || K % s != 0) return cudaErrorInvalidValue;
  const int64_t blocks = B * (K / s);
  if (blocks > 0x7fffffff) return cudaErrorInvalidValue;
  t_leaf_kernel<T><<<static_cast<unsigned>(blocks), kTLeafMax, 0, stream>>>(N, tau, Tm, K, s);
  return cudaGetLastError();
}

template <typename T>
cudaError_t eye_minus(T* Q, int64_t B, int64_t m, int64_t n, cudaStream_t stream) {
  if (B * m * n <= 0) return cudaSuccess;
  eye_minus_kernel<T><<<grid_for(B * m * n, kThreads), kThreads, 0, stream>>>(Q, B, m, n);
  return cudaGetLastError();
}

template <typename T>
cudaError_t t_backward_tail(const T* S, const T* P, const T* N, const T* tau, T* dtau, T* sym, int64_t B, int64_t k,
                            cudaStream_t stream) {
  if (B * k <= 0) return cudaSuccess;
  const int threads = k <= 64 ? 64 : (k <= 128 ? 128 : kThreads);
  const int blocks = static_cast<int>(std::min<int64_t>(B * k, int64_t(1) << 20));
  t_backward_tail_kernel<T><<<blocks, threads, 0, stream>>>(S, P, N, tau, dtau, sym, B, k);
  return cudaGetLastError();
}

template <typename T>
cudaError_t product_dV(const T* dY, const T* dW1, T* dV, int64_t B, int64_t m, int64_t n, int64_t k,
                       cudaStream_t stream) {
  if (B * m * n <= 0) return cudaSuccess;
  product_dV_kernel<T><<<grid_for(B * m * n, kThreads), kThreads, 0, stream>>>(dY, dW1, dV, B, m, n, k);
  return cudaGetLastError();
}

template <typename T>
cudaError_t dense_dV(const T* A, const T* Bt, const T* V, const T* dtau, const T* tau, T* dV, int64_t B, int64_t d,
                     int64_t k, cudaStream_t stream) {
  if (B * d * k <= 0) return cudaSuccess;
  dense_dV_kernel<T><<<grid_for(B * d * k, kThreads), kThreads, 0, stream>>>(A, Bt, V, dtau, tau, dV, B, d, k);
  return cudaGetLastError();
}

#define OPT_FAST_INSTANTIATE(T)                                                                                    \
  template cudaError_t householder_small<T>(SmallMode, const T*, int64_t, int64_t, int64_t, const T*, int64_t,    \
                                            int64_t, const T*, int64_t, int64_t, int64_t, T*, int64_t, int64_t,   \
                                            int64_t, int64_t, cudaStream_t);                                      \
  template cudaError_t unit_lower<T>(const T*, int64_t, int64_t, int64_t, T*, int64_t, int64_t, int64_t,          \
                                     cudaStream_t);                                                               \
  template cudaError_t tau_from_gram<T>(const T*, T*, int64_t, int64_t, cudaStream_t);                           \
  template cudaError_t t_leaf<T>(const T*, const T*, T*, int64_t, int64_t, int64_t, cudaStream_t);                \
  template cudaError_t eye_minus<T>(T*, int64_t, int64_t, int64_t, cudaStream_t);                                 \
  template cudaError_t t_backward_tail<T>(const T*, const T*, const T*, const T*, T*, T*, int64_t, int64_t,       \
                                          cudaStream_t);                                                          \
  template cudaError_t product_dV<T>(const T*, const T*, T*, int64_t, int64_t, int64_t, int64_t, cudaStream_t);   \
  template cudaError_t dense_dV<T>(const T*, const T*, const T*, const T*, const T*, T*, int64_t, int64_t,        \
                                   int64_t, cudaStream_t);

OPT_FAST_INSTANTIATE(float)
OPT_FAST_INSTANTIATE(double)
#undef OPT_FAST_INSTANTIATE

}  // namespace cuda
}  // namespace opt_fast
