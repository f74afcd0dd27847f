"""Reference truncated Cayley map (Cayley–Neumann), the block map of POET and PEFT's OFT.

    cayley_neumann(S, k) = (I + A) · Σ_{i=0..k} Aⁱ,     A = (S − Sᵀ) / 2

The exact Cayley transform (I + A)(I − A)⁻¹ with its inverse replaced by the first k + 1 terms of the
Neumann series (I − A)⁻¹ = Σ Aⁱ (converges for ‖A‖₂ < 1). Expanded, it is the polynomial
I + 2A + 2A² + … + 2Aᵏ + Aᵏ⁺¹. Its orthogonality error is about 2‖A‖₂^(k+1): small while the skew
parameters stay small, which is why block layers merge and reset them every few hundred steps.

Only the skew part A of S is read. For a skew-symmetric S (what the block layers pass: S = U − Uᵀ from
the strictly upper triangle U) A = S, and the result is the series of S itself. For any other S the op
is still a smooth function of S, and its gradient is the gradient with respect to S of that function:
skew(grad_A), which is what makes the fused backward cheap (see csrc/cpu/cayley_neumann.cpp).

Conventions of other codes, in terms of this op:
* POET writes (I + Q)(I + Σ_{i=1..k} Qⁱ): the same k.
* PEFT's OFT with ``num_cayley_neumann_terms = n`` computes I + 2Q + … + 2Q^(n−2) + Q^(n−1): k = n − 2
  (n ≥ 4; its n = 3 computes what n = 4 does, k = 2, and n = 2 gives I + 2Q, no k), for Q = skew from the
  upper triangle vector, i.e. S = Q.

``cayley_neumann_powers`` is the same map returning, besides R, the powers Yʲ = (A·A)ʲ for
j = 1 .. ⌊k/2⌋ (stacked on dim -3), which its backward reuses instead of recomputing them.
"""
from typing import Tuple

import torch
from torch import Tensor

from .. import _checks

HALF = (torch.float16, torch.bfloat16)


def _skew_part(S: Tensor) -> Tensor:
    A = S.float() if S.dtype in HALF else S
    return 0.5 * (A - A.mT)


def coefficients(terms: int):
    """Coefficients c_0..c_{k+1} of (1 + x) Σ_{i=0..k} xⁱ = 1 + 2x + … + 2xᵏ + xᵏ⁺¹."""
    if terms == 0:
        return [1.0, 1.0]
    return [1.0] + [2.0] * terms + [1.0]


def _series(A: Tensor, terms: int) -> Tensor:
    eye = torch.eye(A.shape[-1], dtype=A.dtype, device=A.device)
    power, total = eye, eye
    for _ in range(terms):
        power = power @ A
        total = total + power
    return (eye + A) @ total


def num_powers(terms: int) -> int:
    return terms // 2


def _powers(A: Tensor, terms: int) -> Tensor:
    Y = A @ A
    out, P = [], None
    for _ in range(num_powers(terms)):
        P = Y if P is None else P @ Y
        out.append(P)
    if not out:
        return A.new_empty(A.shape[:-2] + (0,) + A.shape[-2:])
    return torch.stack(out, dim=-3)


def cayley_neumann_ref(S: Tensor, terms: int = 5) -> Tensor:
    _checks.cayley_neumann(S, terms)
    return _series(_skew_part(S), terms).to(S.dtype)


def cayley_neumann_powers_ref(S: Tensor, terms: int = 5) -> Tuple[Tensor, Tensor]:
    _checks.cayley_neumann(S, terms, op="cayley_neumann_powers")
    A = _skew_part(S)
    return _series(A, terms).to(S.dtype), _powers(A, terms).to(S.dtype)


def cayley_neumann_backward_ref(grad: Tensor, S: Tensor, terms: int) -> Tensor:
    """grad_S = skew(grad_A), grad_A = Σ_i c_i Σ_{j<i} (Aᵀ)ʲ G (Aᵀ)^(i−1−j): the adjoint of the Fréchet
    derivative of the polynomial, term by term (readable, O(k²) matmuls)."""
    _checks.cayley_neumann_backward(grad, S, terms)
    A = _skew_part(S)
    G = grad.to(A.dtype)
    T = A.mT
    eye = torch.eye(A.shape[-1], dtype=A.dtype, device=A.device)
    powers = [eye]
    coefs = coefficients(terms)
    for _ in range(len(coefs) - 2):
        powers.append(powers[-1] @ T)
    grad_A = torch.zeros_like(G)
    for i in range(1, len(coefs)):
        for j in range(i):
            grad_A = grad_A + coefs[i] * (powers[j] @ G @ powers[i - 1 - j])
    return (0.5 * (grad_A - grad_A.mT)).to(S.dtype)


def cayley_neumann_powers_backward_ref(grad: Tensor, S: Tensor, powers: Tensor, terms: int) -> Tensor:
    """The same gradient; the saved powers are a speed-up only, so the spec ignores their values (it
    checks their shape, as the kernels that read them do)."""
    _checks.cayley_neumann_backward(grad, S, terms, powers)
    return cayley_neumann_backward_ref(grad, S, terms)
