"""Reference Householder products in the compact-WY / UT form (level 3: no loop over reflectors).

For reflectors H_i = I - tau_i y_i y_iᵀ (i = 1..k, columns of Y [m, k]),

    H_1 H_2 ... H_k = I - Y T Yᵀ,   T upper triangular with  T⁻¹ = diag(1/tau) + striu(YᵀY)

(Joffrain, Low, Quintana-Ortí, van de Geijn, van Zee 2006; Schreiber & Van Loan 1989). We never divide by
tau: with D = diag(tau) and N = striu(YᵀY), T = (I + D N)⁻¹ D, and I + D N is *unit* upper triangular, so
tau_i = 0 (an identity reflector, allowed by LAPACK) needs no special case. Cost: one YᵀY, one
triangular solve of size k, and two matmuls.

All three ops are one computation, out = X - Y T (Yᵀ X):
  householder_product(V, tau)  Y = unit-lower-trapezoidal part of V, X = I[:, :n]   (LAPACK orgqr)
  householder_orthogonal(V)    Y = V dense, tau = 2/||v||² (0 for v = 0), X = I      (H(v) = I - 2vvᵀ/vᵀv)
  householder_apply(V, X)      Y = V dense, tau = 2/||v||², X given                  (never forms the d×d product)

H(v) does not depend on ||v||, but vᵀv over- or underflows long before v does (float32 from |v| ~ 1e±19):
the dense ops first divide each reflector by a power of two p that brings max_i |v_i| into [1, 2)
(`_reflector_scale`; LAPACK's larfg rescales tiny reflectors likewise). Dividing by a power of two is exact,
so inputs in the normal range give the same bits as without it; the gradient of a scale-invariant function
is the gradient at v/p divided by p. The kernels apply the same rule: CUDA's level-3 path to every
reflector, the CPU kernels and CUDA's small path only where vᵀv leaves the range in which it is safe (the
same bits either way).

The backward recomputes T from Y (k² extra memory, nothing stored per reflector) and differentiates the
same four level-3 steps in reverse: see `_ut_backward`.
"""
from typing import Tuple

import torch
from torch import Tensor

from .. import _checks


# ---- the shared UT form -----------------------------------------------------------------------------

def _ut_factor(Y: Tensor, tau: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """T of H_1…H_k = I - Y T Yᵀ, plus A = I + D N and N = striu(YᵀY) for the backward."""
    k = Y.shape[-1]
    N = (Y.mT @ Y).triu(1)
    eye = torch.eye(k, dtype=Y.dtype, device=Y.device)
    A = eye + tau.unsqueeze(-1) * N
    T = torch.linalg.solve_triangular(A, torch.diag_embed(tau), upper=True, unitriangular=True)
    return T, A, N


def _ut_backward(G: Tensor, Y: Tensor, tau: Tensor, W1: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """Reverse of out = X - Y T W1 with W1 = Yᵀ X and T = T(Y, tau).

    Returns (dY without the path through W1, dtau, dW1); the caller adds X dW1ᵀ to dY and, when X is an
    input, G + Y dW1 to dX.
    """
    T, A, N = _ut_factor(Y, tau)
    YtG = Y.mT @ G                                   # k × n
    dY = -(G @ (T @ W1).mT)                          # the left factor Y
    dT = -(YtG @ W1.mT)                              # k × k
    dW1 = -(T.mT @ YtG)                              # k × n
    # T = A⁻¹ D:  dA = -A⁻ᵀ dT Tᵀ,  dD = diag(A⁻ᵀ dT)
    At_dT = torch.linalg.solve_triangular(A.mT, dT, upper=False, unitriangular=True)
    dA = -(At_dT @ T.mT)
    dtau = At_dT.diagonal(dim1=-2, dim2=-1) + (dA * N).sum(-1)  # A = I + D N: row i carries tau_i
    dN = (tau.unsqueeze(-1) * dA).triu(1)            # N = striu(YᵀY)
    dY = dY + Y @ (dN + dN.mT)
    return dY, dtau, dW1


def _unit_lower(V: Tensor, k: int) -> Tensor:
    """LAPACK reflector vectors: the first k columns of V below the diagonal, with an implicit unit diagonal."""
    m = V.shape[-2]
    return V[..., :k].tril(-1) + torch.eye(m, k, dtype=V.dtype, device=V.device)


def _reflector_scale(V: Tensor) -> Tensor:
    """p [..., 1, k]: per reflector the power of two 2^(e-1) with max_i |v_i| = m·2^e, m in [1/2, 1) (frexp),
    so that max |v/p| lies in [1, 2); at least the smallest normal number (a column of subnormals still
    scales exactly), and 1 for a zero or non-finite column (the identity or NaN, as without scaling).
    Piecewise constant in V, so it carries no gradient."""
    V = V.detach()
    if V.shape[-2] == 0:
        return torch.ones_like(V[..., :1, :])
    amax = V.abs().amax(-2, keepdim=True)
    ok = torch.isfinite(amax) & (amax > 0)
    mant, _ = torch.frexp(torch.where(ok, amax, torch.ones_like(amax)))
    p = torch.where(ok, amax / (2 * mant), torch.ones_like(amax))  # exact: amax / (2m) = 2^(e-1)
    return p.clamp_min(torch.finfo(V.dtype).tiny)


def _dense_tau(V: Tensor) -> Tensor:
    """tau = 2/||v||² for H(v) = I - 2vvᵀ/vᵀv; a zero vector gives tau = 0, the identity reflector."""
    sq = (V * V).sum(-2)
    return torch.where(sq > 0, 2.0 / torch.where(sq > 0, sq, torch.ones_like(sq)), torch.zeros_like(sq))


# ---- householder_product: drop-in for torch.linalg.householder_product -------------------------------

def householder_product_ref(V: Tensor, tau: Tensor) -> Tensor:
    _checks.householder_product(V, tau)
    m, n, k = V.shape[-2], V.shape[-1], tau.shape[-1]
    Y = _unit_lower(V, k)
    T, _, _ = _ut_factor(Y, tau)
    eye = torch.eye(m, n, dtype=V.dtype, device=V.device)
    return eye - Y @ (T @ Y[..., :n, :].mT)


def householder_product_backward_ref(grad: Tensor, V: Tensor, tau: Tensor) -> Tuple[Tensor, Tensor]:
    _checks.grad_like("householder_product_backward", grad, V.shape)
    n, k = V.shape[-1], tau.shape[-1]
    Y = _unit_lower(V, k)
    dY, dtau, dW1 = _ut_backward(grad, Y, tau, Y[..., :n, :].mT)
    dY = dY.clone()
    dY[..., :n, :] += dW1.mT                         # W1 = Yᵀ I[:, :n] = Y[:n]ᵀ
    dV = torch.zeros_like(V)
    dV[..., :k] = dY.tril(-1)                        # the diagonal and upper part of V are not read
    return dV, dtau


# ---- householder_orthogonal: H(v_1)…H(v_k) as a d×d matrix -------------------------------------------

def householder_orthogonal_ref(V: Tensor) -> Tensor:
    _checks.householder_orthogonal(V)
    d = V.shape[-2]
    V = V / _reflector_scale(V)
    T, _, _ = _ut_factor(V, _dense_tau(V))
    return torch.eye(d, dtype=V.dtype, device=V.device) - V @ (T @ V.mT)


def _dense_tau_backward(V: Tensor, tau: Tensor, dtau: Tensor) -> Tensor:
    # d(2/||v||²)/dv = -4 v/||v||⁴ = -tau² v  (0 for the zero vector, whose tau is constant 0)
    return -(dtau * tau * tau).unsqueeze(-2) * V


def householder_orthogonal_backward_ref(grad: Tensor, V: Tensor) -> Tensor:
    d = V.shape[-2]
    _checks.grad_like("householder_orthogonal_backward", grad, V.shape[:-1] + (d,))
    p = _reflector_scale(V)
    V = V / p
    tau = _dense_tau(V)
    dY, dtau, dW1 = _ut_backward(grad, V, tau, V.mT)
    return (dY + dW1.mT + _dense_tau_backward(V, tau, dtau)) / p


# ---- householder_apply: H(v_1)…H(v_k) X -------------------------------------------------------------

def householder_apply_ref(V: Tensor, X: Tensor) -> Tensor:
    _checks.householder_apply(V, X)
    V = V / _reflector_scale(V)
    T, _, _ = _ut_factor(V, _dense_tau(V))
    return X - V @ (T @ (V.mT @ X))


def householder_apply_backward_ref(grad: Tensor, V: Tensor, X: Tensor) -> Tuple[Tensor, Tensor]:
    _checks.grad_like("householder_apply_backward", grad, X.shape)
    p = _reflector_scale(V)
    V = V / p
    tau = _dense_tau(V)
    dY, dtau, dW1 = _ut_backward(grad, V, tau, V.mT @ X)
    dV = (dY + X @ dW1.mT + _dense_tau_backward(V, tau, dtau)) / p
    dX = grad + V @ dW1
    return dV, dX
