"""Typed Python entry points for the ``torch.ops.opt_fast`` ops (all batched over leading dims)."""
from typing import Optional

import torch
from torch import Tensor

from . import _backends, _checks

_ops = torch.ops.opt_fast


def householder_product(V: Tensor, tau: Tensor) -> Tensor:
    """Drop-in for ``torch.linalg.householder_product``: the first n columns of H_1…H_k,
    H_i = I - tau_i v_i v_iᵀ, v_i the i-th column of V below the diagonal with an implicit 1 on it.
    V: [..., m, n] (m >= n), tau: [..., k] (k <= n) -> [..., m, n]."""
    return _ops.householder_product(V, tau)


def householder_orthogonal(V: Tensor) -> Tensor:
    """H(v_1)…H(v_k) with H(v) = I - 2vvᵀ/vᵀv for the dense columns v_i of V: [..., d, k] -> [..., d, d].
    A zero column is the identity reflector. The length of a column does not matter, over the whole
    floating-point range (each is rescaled by a power of two before vᵀv is formed)."""
    return _ops.householder_orthogonal(V)


def householder_apply(V: Tensor, X: Tensor) -> Tensor:
    """H(v_1)…H(v_k) X without forming the d×d product. V: [..., d, k], X: [..., d, n] -> [..., d, n].
    Reflectors as in ``householder_orthogonal``."""
    return _ops.householder_apply(V, X)


def gram_schmidt(P: Tensor, block_size: int = 0) -> Tensor:
    """The columns of P orthonormalised in order: Q of P = QR with diag(R) > 0. P: [..., m, n], m >= n.
    Equivalent to ``Q, R = torch.linalg.qr(P); Q * sign(diag(R))``. block_size 0 = automatic."""
    return _ops.gram_schmidt(P, block_size)


def lowdin(P: Tensor, iters: int = 0, R0: Optional[Tensor] = None) -> Tensor:
    """The polar factor P (PᵀP)^(-1/2) of P [..., m, n], m >= n (Löwdin's symmetric orthogonalisation):
    orthogonal for square P, orthonormal columns for tall P (the orthonormal matrix nearest to P). By
    Newton–Schulz-type iterations; ``iters=0`` iterates to float-grade orthogonality, ``R0`` is a warm
    start for square P (e.g. the previous training step's result; tall P ignores it). Equivalent to
    ``U, S, Vh = svd(P, full_matrices=False); U @ Vh``; for wide P use ``lowdin(P.mT).mT``.

    On the CPU, when a gradient is needed (and ``iters=0``), this takes ``torch.ops.opt_fast.lowdin_svd``:
    the same SVD route that ``lowdin`` takes there, keeping its factors so that the backward is four
    matmuls instead of an eigendecomposition (R0 cannot help a changed P, see the reference docstring)."""
    if R0 is not None or not isinstance(P, Tensor):   # the R0 the SVD route below does not use (P: the op's)
        _checks.lowdin(P, iters, R0)
    try:
        if iters == 0 and P.device.type == "cpu" and P.requires_grad and torch.is_grad_enabled():
            return _ops.lowdin_svd(P)[0]
        return _ops.lowdin(P, iters, R0)
    except torch.linalg.LinAlgError:
        # Seen on the CPU (MKL's float32 SVD): a finite, near-orthogonal 288 x 288 P that OPT training with
        # R = I at the start produced, "failed to converge"; the float64 SVD of the same P converges.
        if P.dtype != torch.float32:
            raise
        return lowdin(P.double(), iters, None if R0 is None else R0.double()).to(P.dtype)


def orthogonalize_approx(G: Tensor, steps: int = 5) -> Tensor:
    """APPROXIMATE orthogonalisation for optimizers (Muon-style), NOT the polar factor: ``steps`` quintic
    Newton–Schulz steps X <- a X + (b A + c A²) X, A = X Xᵀ, with Muon's fixed (a, b, c) =
    (3.4445, -4.7750, 2.0315), after X0 = G / (||G||_F + 1e-7) as in Muon. G: [..., m, n] (any aspect
    ratio; float16, bfloat16, float32, float64, or complex64/128, where A = X Xᴴ) -> same shape and dtype.

    The quintic trades convergence for speed: singular values that start above ~3e-3 of ||G||_F land
    in about [0.68, 1.2] after 5 steps (scalar map, float64), not at 1; smaller ones are only multiplied
    by up to 3.4445 per step (1e-3 -> 0.47), so for
    square, ill-conditioned G (OPT's N(0,1) P has σ_min / ||P||_F ~ d^-1.5) the result is far from
    orthogonal (the benchmark reports its ||XᵀX - I||). Use ``lowdin`` where R must be orthogonal.
    On CUDA with Triton: the Triton kernels, products in bfloat16 with float32 accumulation (real input);
    elsewhere plain torch in the input's precision. Not differentiable (an optimizer update)."""
    _checks.orthogonalize_approx(G, steps)
    if G.is_cuda and not G.is_complex() and _backends.triton_approx is not None:
        return _backends.triton_approx(G, steps)
    return _orthogonalize_approx_torch(G, steps)


MUON_COEFS = (3.4445, -4.7750, 2.0315)


def _orthogonalize_approx_torch(G: Tensor, steps: int, matmul=torch.matmul) -> Tensor:
    """The plain-torch approximate mode; ``matmul`` computes every product (the tests pass one that rounds
    its operands to bfloat16, to emulate the Triton kernels on a GPU)."""
    a, b, c = MUON_COEFS
    X = G.detach()
    tall = X.shape[-2] > X.shape[-1]
    if tall:
        X = X.mH
    X = X / (torch.linalg.matrix_norm(X)[..., None, None] + 1e-7)
    for _ in range(steps):
        A = matmul(X, X.mH)  # Xᴴ: with Xᵀ a complex G's singular values are not what the polynomial maps
        X = a * X + matmul(b * A + c * matmul(A, A), X)
    return X.mH if tall else X


def cayley(S: Tensor) -> Tensor:
    """The Cayley transform (I + S)(I - S)⁻¹ of any square S with I - S invertible. Equivalent to
    ``torch.linalg.solve(I - S, I + S)``. The result is orthogonal exactly when S is skew-symmetric; S is
    not checked for that (a non-skew S gives the transform of that S, not an orthogonal matrix), so pass a
    skew matrix, e.g. ``skew(P)`` or ``A - A.mT``. Singular I - S raises."""
    return _ops.cayley(S)


def skew(P: Tensor) -> Tensor:
    """The skew matrix OPT-CP builds from its parameter: triu(P) - triu(P)ᵀ (docs/methods.md#cayley)."""
    U = P.triu()
    return U - U.mT


def cayley_neumann(S: Tensor, terms: int = 5) -> Tensor:
    """The truncated Cayley map (I + A) Σ_{i=0..terms} Aⁱ of the skew part A = (S − Sᵀ)/2 of each square block
    of S ([..., b, b]); for a skew-symmetric S, the Neumann-series approximation of the exact
    ``cayley(S)`` = (I + S)(I − S)⁻¹, orthogonal up to about 2‖S‖₂^(terms+1). PEFT's OFT with
    ``num_cayley_neumann_terms = n`` is ``terms = n − 2`` (n ≥ 4; its n = 3 computes n = 4); POET's ``k``
    terms are ``terms = k``.

    When a gradient is needed this takes ``torch.ops.opt_fast.cayley_neumann_powers``, the same map keeping
    the powers of A so that the backward does not recompute them."""
    _checks.cayley_neumann(S, terms)
    if S.requires_grad and torch.is_grad_enabled():
        return _ops.cayley_neumann_powers(S, terms)[0]
    return _ops.cayley_neumann(S, terms)


def block_apply(R: Tensor, X: Tensor, perm: Optional[Tensor] = None) -> Tensor:
    """The permuted block-diagonal product on the last dim of X: ``Y[..., perm] = blockdiag(R) @ X[..., perm]``
    for every row of X (chunk j of the permuted row times R_j). R: [nb, b, b]; X: [..., n] with nb·b <= n
    (the coordinates perm[nb·b:] pass through unchanged); perm: int64 [n] or None (identity).
    bfloat16/float16 X with float32 R: products in float32, result in X's dtype."""
    return _ops.block_apply(R, X, perm)

