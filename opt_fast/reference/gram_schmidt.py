"""Reference Gram-Schmidt: the columns of P orthonormalised in order, i.e. Q of P = QR with diag(R) > 0.

Classical Gram-Schmidt (what OPT's released code unrolls, docs/methods.md#gram_schmidt) loses orthogonality like
O(u κ²) on the square N(0,1) matrices OPT starts from (κ ~ d), so the reference computes the same
mathematical result with Householder QR (LAPACK geqrf/orgqr: orthogonality O(u) whatever κ) and flips
signs so that diag(R) > 0. ``block_size`` belongs to the blockwise kernels; the reference ignores it.

Rank deficiency: the forward stays finite (Householder QR of a singular matrix is defined; where
R_jj = 0 the sign is taken as +1), but Q is then not unique and not differentiable: the backward, which
solves with R, raises "opt_fast.gram_schmidt_backward: P is rank deficient ..." when finite inputs give a
non-finite gradient (an exact zero, or an underflowing R_jj). Non-finite inputs are no error: their NaN
propagates to the output, in both directions. OPT's parameters are full rank with probability 1. The C++
kernel (csrc/cpu/gram_schmidt.cpp) follows both rules.

Backward by the QR adjoint (no unrolling). For P = QR (m >= n), an upstream gradient G on Q and none on R:

    M = -Gᵀ Q,   grad_P = (G + Q copyltu(M)) R⁻ᵀ,   copyltu(M) = tril(M) + tril(M, -1)ᵀ

one triangular solve and three matmuls; R = triu(Qᵀ P) is recomputed rather than stored. The sign flip
needs no term of its own: Q' = QS, R' = SR is again a QR factorisation and the formula only uses that.
"""
import torch
from torch import Tensor

from .. import _checks


def gram_schmidt_ref(P: Tensor, block_size: int = 0) -> Tensor:
    _checks.gram_schmidt(P, block_size)
    Q, R = torch.linalg.qr(P)
    diag = R.diagonal(dim1=-2, dim2=-1)
    # +1 where R_jj >= 0 (also for R_jj = 0), -1 where negative; "+ 0 * diag" keeps a NaN of R as NaN
    # (torch.sign(nan) is 0, and geqrf never reads the last column of a square P beyond R_nn).
    sign = torch.where(diag < 0, -1.0, 1.0).to(diag.dtype) + 0.0 * diag
    return Q * sign.unsqueeze(-2)


def gram_schmidt_backward_ref(grad: Tensor, P: Tensor, Q: Tensor) -> Tensor:
    _checks.gram_schmidt_backward(grad, P, Q)
    R = (Q.mT @ P).triu()
    M = -(grad.mT @ Q)
    M = M.tril() + M.tril(-1).mT
    B = grad + Q @ M
    out = torch.linalg.solve_triangular(R.mT, B, upper=False, left=False)
    _checks.finite_gradient("gram_schmidt_backward", out, grad, P, Q)
    return out
