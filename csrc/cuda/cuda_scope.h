// Torch-side helper shared by the CUDA glue files (not the pure kernels): the device, stream and math
// mode of one op call.
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

namespace opt_fast {

// Every op call runs on the input's device and current stream, with TF32 off: the precision rule
// (docs/performance.md) allows no TF32 in a final float32 result.
struct CudaScope {
  c10::cuda::CUDAGuard device;
  at::NoTF32Guard no_tf32;
  cudaStream_t stream;
  explicit CudaScope(const at::Tensor& t)
      : device(t.device()), stream(c10::cuda::getCurrentCUDAStream().stream()) {}
};

}  // namespace opt_fast
