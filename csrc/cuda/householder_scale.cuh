// The reflector rescaling of the dense Householder ops in device code (no torch headers), shared by
// householder_small_kernels.cu and householder_ut_kernels.cu. The same rule as the CPU
// (csrc/cpu/householder_ut.h, reflector_inv_scale) and the reference (_reflector_scale): H(v) does not
// depend on ||v||, but vᵀv over- or underflows long before v does, so each reflector is divided by the power
// of two p = 2^(e-1), max_i |v_i| = m·2^e with m in [1/2, 1), which brings max |v/p| into [1, 2); p is at
// least the smallest normal number (1/p representable), and p = 1 for a zero or non-finite column.
// Multiplying by a power of two is exact: inputs in the normal range give the same bits as without it. The
// level-3 path rescales every reflector (deciding from the data would cost a device-to-host sync); the
// small path, which accumulates vᵀv in double, only the reflectors whose vᵀv leaves the safe range.
#pragma once

#include <cuda_runtime.h>

namespace opt_fast {
namespace cuda {

// 1/p for a reflector whose largest |entry| is amax.
template <typename T>
__device__ __forceinline__ T reflector_inv_scale(T amax) {
  if (!(amax > T(0)) || !isfinite(amax)) return T(1);
  constexpr int kMinExponent = sizeof(T) == sizeof(float) ? -125 : -1021;  // std::numeric_limits<T>::min_exponent
  int e = 0;
  frexp(static_cast<double>(amax), &e);
  return static_cast<T>(ldexp(1.0, 1 - (e > kMinExponent ? e : kMinExponent)));  // exact: a power of two
}

// Whether a vᵀv = sq accumulated in double calls for rescaling (the rule of norm2_out_of_range in
// csrc/cpu/householder_ut.h for double: outside [2^-341, 2^341]; NaN is left as it is; 0 only matters for a
// nonzero v, and rescaling the zero vector changes nothing).
__device__ __forceinline__ bool norm2_out_of_range(double sq) { return (sq < 0x1p-341 || sq > 0x1p341) && !isnan(sq); }

}  // namespace cuda
}  // namespace opt_fast
