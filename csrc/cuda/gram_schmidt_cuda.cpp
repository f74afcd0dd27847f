// Torch glue of the CUDA gram_schmidt kernels (forward and backward), registered for the CUDA dispatch key.
// Compiled only when torch has CUDA (setup.py). Algorithm and stability: gram_schmidt_kernels.cu.
//
// Forward: Qt = Pᵀ (contiguous [B, n, m], so that each column of P is a contiguous row being orthonormalised
// in place), then per block of b columns: projections against the finished columns as batched GEMMs
// (at::bmm / at::baddbmm_, TF32 off), and the intra-block CGS2 kernel; Q = Qtᵀ at the end.
// Backward: the QR adjoint of opt_fast/reference/gram_schmidt.py,
//     R = triu(Qᵀ P),  M = -Gᵀ Q,  grad_P = (G + Q copyltu(M)) R⁻ᵀ,
// three GEMMs, one kernel and one triangular solve (at::linalg_solve_triangular), all batched.
// Neither direction reads a value back to the host (outside anomaly mode, below), so both run ahead of the
// GPU and inside CUDA graph capture.
#include "../opt_fast.h"
#include "cuda_scope.h"
#include "gram_schmidt_kernels.cuh"

#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/csrc/autograd/anomaly_mode.h>

#include <algorithm>

namespace opt_fast {
namespace {

using at::Tensor;
namespace k = opt_fast::cuda;

// block_size 0: one panel (one kernel, no GEMM) up to 64 columns, else panels of 32: the panel kernel runs
// one thread block per matrix, so wider panels move work from cuBLAS onto one SM per matrix.
constexpr int64_t kAutoSinglePanel = 64;
constexpr int64_t kAutoPanel = 32;

// Wording of opt_fast/_checks.py.
void check_gs_input(const char* op, const Tensor& P) {
  check_float_matrix(op, "P", P);
  TORCH_CHECK(P.size(-1) <= P.size(-2), "opt_fast.", op,
              ": expected P [..., m, n] with m >= n (a wide matrix has no n orthonormal columns), got shape ",
              P.sizes());
}

// The columns Wt[:, c, :] (rows of the [B, jb, m] view Wt, unit stride along m; column j0 + c of P)
// orthonormalised in place.
void panel_qr_(const Tensor& Wt, int64_t j0, cudaStream_t stream) {
  TORCH_INTERNAL_ASSERT(Wt.size(2) <= 1 || Wt.stride(2) == 1);
  AT_DISPATCH_FLOATING_TYPES(Wt.scalar_type(), "gram_schmidt_panel_cuda", [&] {
    C10_CUDA_CHECK(k::gs_panel_qr<scalar_t>(Wt.data_ptr<scalar_t>(), Wt.stride(0), Wt.stride(1), 1, Wt.size(0),
                                            Wt.size(2), Wt.size(1), j0, stream));
  });
}

// Wt <- Wt - (Qp_t Wtᵀ)ᵀ Qp_t, i.e. W <- W - Q_< (Q_<ᵀ W) in the transposed layout. Wt and Qpt are views of
// one tensor, so the product goes to a new tensor first (an in-place GEMM reading its own storage is
// avoided, whatever ATen's overlap checks say).
void project_out_(const Tensor& Wt, const Tensor& Qpt) {
  const auto C = at::bmm(Qpt, Wt.mT());  // [B, j0, jb] = Q_<ᵀ W
  Wt.sub_(at::bmm(C.mT(), Qpt));
}

// Rank-deficient P (documented in opt_fast/reference/gram_schmidt.py): the forward stays finite by
// construction (the panel kernel replaces an exactly dependent column by an orthonormalised stand-in, see
// gram_schmidt_kernels.cu); the backward's R then has a zero diagonal entry and its solve gives inf/NaN.
// The CPU raises there, which here would need the result on the host: a synchronisation on every backward
// call. So the check only runs under torch.autograd.set_detect_anomaly(True) (the mode whose job is to
// stop at a non-finite gradient, and which synchronises anyway), and otherwise the gradient stays
// non-finite. Skipped during CUDA graph capture.
bool capturing() { return c10::cuda::currentStreamCaptureStatusMayInitCtx() != c10::cuda::CaptureStatus::None; }

bool all_finite(const Tensor& t) { return at::isfinite(t).all().item<bool>(); }

Tensor gram_schmidt_cuda(const Tensor& P, int64_t block_size) {
  const char* op = "gram_schmidt";
  check_gs_input(op, P);
  TORCH_CHECK(block_size >= 0, "opt_fast.", op, ": expected block_size >= 0 (0 = automatic), got ", block_size);
  CudaScope scope(P);
  const int64_t m = P.size(-2), n = P.size(-1), B = batch_numel(P);
  if (B == 0 || n == 0) return at::empty(P.sizes(), P.options());
  int64_t b = block_size > 0 ? block_size : (n <= kAutoSinglePanel ? n : kAutoPanel);
  b = std::min({b, n, k::kGsMaxPanel});
  auto Qt = P.reshape({B, m, n}).mT().contiguous();  // [B, n, m]
  for (int64_t j0 = 0; j0 < n; j0 += b) {
    const auto Wt = Qt.narrow(1, j0, std::min(b, n - j0));
    if (j0 > 0) {
      const auto Qpt = Qt.narrow(1, 0, j0);
      project_out_(Wt, Qpt);
      panel_qr_(Wt, j0, scope.stream);
      project_out_(Wt, Qpt);
    }
    panel_qr_(Wt, j0, scope.stream);
  }
  return Qt.mT().contiguous().view(P.sizes());
}

Tensor gram_schmidt_backward_cuda(const Tensor& grad, const Tensor& P, const Tensor& Q) {
  const char* op = "gram_schmidt_backward";
  check_gs_input(op, P);
  check_grad_shape(op, grad, Q.sizes());
  TORCH_CHECK(Q.sizes() == P.sizes(), "opt_fast.", op, ": expected Q of shape ", P.sizes(), ", got ", Q.sizes());
  check_same_device_dtype(op, "grad", grad, "P", P);
  check_same_device_dtype(op, "Q", Q, "P", P);
  CudaScope scope(P);
  const int64_t m = P.size(-2), n = P.size(-1), B = batch_numel(P);
  if (B == 0 || n == 0) return at::zeros(P.sizes(), P.options());
  const auto G = grad.reshape({B, m, n});
  const auto P3 = P.reshape({B, m, n});
  const auto Q3 = Q.reshape({B, m, n});
  const auto R = at::bmm(Q3.mT(), P3).triu_();
  const auto M = at::bmm(G.mT(), Q3).contiguous();
  auto Msym = at::empty({B, n, n}, P.options());
  AT_DISPATCH_FLOATING_TYPES(P.scalar_type(), "gram_schmidt_copyltu_cuda", [&] {
    C10_CUDA_CHECK(k::neg_copyltu<scalar_t>(M.const_data_ptr<scalar_t>(), Msym.data_ptr<scalar_t>(), B, n,
                                            scope.stream));
  });
  const auto rhs = at::baddbmm(G, Q3, Msym);  // G + Q copyltu(-GᵀQ)
  // X Rᵀ = rhs
  const auto dP = at::linalg_solve_triangular(R.mT(), rhs, /*upper=*/false, /*left=*/false);
  const bool check = torch::autograd::AnomalyMode::is_enabled() && !capturing();
  TORCH_CHECK(!check || all_finite(dP) || !(all_finite(grad) && all_finite(P) && all_finite(Q)), "opt_fast.", op,
              ": P is rank deficient (R = QᵀP has a zero diagonal entry), so Q is not a differentiable ",
              "function of P there and the gradient is undefined");
  return dP.contiguous().view(P.sizes());
}

}  // namespace

TORCH_LIBRARY_IMPL(opt_fast, CUDA, m) {
  m.impl("gram_schmidt", OPT_FAST_KERNEL(gram_schmidt_cuda));
  m.impl("gram_schmidt_backward", OPT_FAST_KERNEL(gram_schmidt_backward_cuda));
}

}  // namespace opt_fast
