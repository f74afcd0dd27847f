"""The torch-op compositions the benchmark times as "torch built-in" rows (and uses as references):
what a user writes today without opt_fast, one function per recipe."""
from typing import Optional

import torch

import opt_fast.functional as F

from .peers import NEUMANN_TERMS


def _eye(d, like):
    return torch.eye(d, dtype=like.dtype, device=like.device)


def _sign_fix(Q, diag):
    s = torch.sign(diag)
    s = torch.where(s == 0, torch.ones_like(s), s)
    return Q * s.unsqueeze(-2)


# ---- Householder ---------------------------------------------------------------------------------

def reflector_loop(V: torch.Tensor, X: Optional[torch.Tensor] = None) -> torch.Tensor:
    """H(v_1)…H(v_k) X (X = I if None) by k sequential rank-1 updates: the naive torch baseline."""
    d, k = V.shape[-2], V.shape[-1]
    M = _eye(d, V).expand(V.shape[:-2] + (d, d)) if X is None else X
    for j in reversed(range(k)):
        v = V[..., :, j:j + 1]
        vv = (v * v).sum(-2, keepdim=True)
        tau = torch.where(vv > 0, 2.0 / torch.where(vv > 0, vv, torch.ones_like(vv)), torch.zeros_like(vv))
        M = M - (tau * v) @ (v.mT @ M)
    return M


# ---- QR / Gram–Schmidt ---------------------------------------------------------------------------

def qr_sign(P):
    Q, R = torch.linalg.qr(P)
    return _sign_fix(Q, R.diagonal(dim1=-2, dim2=-1))


def geqrf_orgqr(P):
    a, tau = torch.geqrf(P)
    return _sign_fix(torch.linalg.householder_product(a, tau), a.diagonal(dim1=-2, dim2=-1))


def _cholqr(P, gram_dtype):
    Pg = P.to(gram_dtype)
    L, _ = torch.linalg.cholesky_ex(Pg.mT @ Pg)   # a failed Cholesky shows up as NaN in the accuracy
    return torch.linalg.solve_triangular(L.mT, Pg, upper=True, left=False).to(P.dtype)


def cholqr2(P):
    return _cholqr(_cholqr(P, P.dtype), P.dtype)


def cholqr2_fp64(P):
    return _cholqr(_cholqr(P, torch.float64), torch.float64)


# ---- polar (Löwdin) and Newton–Schulz ------------------------------------------------------------

def svd_polar(P):
    U, _, Vh = torch.linalg.svd(P)
    return U @ Vh


def eigh_polar(P):
    L, V = torch.linalg.eigh(P.mT @ P)
    return P @ (V * L.clamp_min(torch.finfo(P.dtype).tiny).rsqrt().unsqueeze(-2)) @ V.mT


def eigh64_polar(P):
    """The eigh route with the Gram matrix and eigh in float64 (accurate for κ(P)² u64 ≪ 1), result cast back."""
    P64 = P.double()
    L, V = torch.linalg.eigh(P64.mT @ P64)
    return (P64 @ (V * L.clamp_min(torch.finfo(torch.float64).tiny).rsqrt().unsqueeze(-2)) @ V.mT).to(P.dtype)


def linalg_polar(P):
    out = torch.linalg.polar(P)   # only in some torch builds; may return (U, H)
    return out[0] if isinstance(out, (tuple, list)) else out


def muon_ns5(P, steps: int = 5):
    """Muon's quintic Newton–Schulz in plain torch ops: bf16 on CUDA (as Muon), the input dtype elsewhere.
    Approximate by design (singular values end up in ~[0.5, 1.5])."""
    a, b, c = F.MUON_COEFS
    X = P.to(torch.bfloat16) if P.is_cuda else P
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    for _ in range(steps):
        A = X @ X.mT
        X = a * X + (b * A + c * (A @ A)) @ X
    return X.to(P.dtype)


def quintic_ns(P, steps: int = 5):
    """The same quintic in the input's precision on every device: the float64 reference of the approx rows."""
    a, b, c = F.MUON_COEFS
    X = P / (P.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    for _ in range(steps):
        A = X @ X.mT
        X = a * X + (b * A + c * (A @ A)) @ X
    return X


# ---- Cayley --------------------------------------------------------------------------------------

def cayley_solve(S):
    eye = _eye(S.shape[-1], S)
    return torch.linalg.solve(eye - S, eye + S)


def cayley_inv(S):
    eye = _eye(S.shape[-1], S)
    return (eye + S) @ torch.linalg.inv(eye - S)


def cayley_lu(S):
    eye = _eye(S.shape[-1], S)
    LU, piv = torch.linalg.lu_factor(eye - S)
    return torch.linalg.lu_solve(LU, piv, eye + S)


def neumann_series(S, terms: int = NEUMANN_TERMS):
    """(I + S)·Σ_{i=0..terms} Sⁱ in torch ops (terms 3: PEFT's default I + 2S + 2S² + 2S³ + S⁴); the skew
    part of S, as the op. Orthogonal only up to ~2‖S‖^(terms+1): diverges for ‖S‖ ≥ 1."""
    A = 0.5 * (S - S.mT)
    eye = _eye(S.shape[-1], S)
    power, total = eye, eye
    for _ in range(terms):
        power = power @ A
        total = total + power
    return (eye + A) @ total
