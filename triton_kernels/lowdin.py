"""Triton launchers for ``opt_fast::lowdin`` and ``opt_fast::lowdin_backward`` (the CUDA kernels of the ops).

Forward: the reference's Newton–Schulz-type iteration (opt_fast/reference/lowdin.py, whose docstring has the
derivation and the measurements), on batched [b, d, d] matrices, every product one launch of
``matmul.mm`` over batch × tiles programs, on the input's device and its current stream (``_device``):

* Gram A = XᵀX: upper-triangle tiles only, mirrored in the epilogue, which also writes each tile's share
  of ||A - I||_F² (the stopping measurement costs no extra pass);
* step X <- a X + b X A: one kernel, the axpy fused into the product's epilogue.

Schedule (imported from the reference, not duplicated): X0 = P / s with s = ||PᵀP||_F^(1/2) after dividing
P by its largest |entry|; then the greedy composition of minimax odd cubics for [1e-5, 1] with the design
lower end cushioned at 0.1 hi (17 steps to [1 - 1e-15, 1 + 1e-15], then the Newton–Schulz cubic), and in
the converging mode the interval tightened by the measured ||XᵀX - I||_F, stopping at
||XᵀX - I||_F / sqrt(d) <= 1e-6 (float32) / 1e-13 (float64), the last step taken unmeasured when it provably
lands below tol / 4. Cost for N(0,1) P: 16 steps in float32 (17 in float64) at d = 27 ... 1024, i.e.
16 products + 15 half-FLOP Gram matrices ≈ 23.5 GEMM-equivalents. A spectral-norm scaling does not pay
under this schedule (scripts/lowdin_scaling_sim.py, float64 simulation of the scalar map): even the exact
σ_max gives the same 16 / 17 steps for d <= 1024 (the schedule is designed for the fixed bound 1e-5, not
for the matrix) and saves 0-2 steps only at d = 2304, while 5-10 power iterations underestimate σ_max
for most N(0,1) matrices (clustered top singular values), which is unsafe for the cubic.

Precision: float32 products use ``input_precision="ieee"`` in every step (``OPT_FAST_TRITON_F32_PRECISION=
tf32x3`` selects three TF32 passes instead: about float32 accuracy on tensor cores, to be judged by the
benchmark's accuracy gate on a GPU; see matmul.py). The iteration corrects the singular values, not the
singular vectors: X_k = R f_k(H) only while every product is exact, and a
rounding of X or A at TF32's 2^-11 in an early step, when σ_min / s ~ 1e-5, changes the polar factor
of the iterate in the small-σ directions by far more than 1e-5 (the same amplification that defeats the
stale warm start in the reference docstring). TF32/bf16 is therefore only used in the approximate mode
(``orthogonalize_approx``).

R0 (warm start): the reference's certified reuse (``_warm_start``), with its two products on the same kernel.

Backward: dP = R Y with H Y + Y H = C, C = RᵀG - GᵀR, H = sym(RᵀP), without eigh. For H SPD,
sign([[H, C], [0, -H]]) = [[I, 2Y], [0, -I]] (conjugate diag(H, -H) by [[I, -Y], [0, I]]). An odd
polynomial step X <- X (a + b X²) keeps the block form [[D, E], [0, -D]]:
    X² = [[S, F], [0, S]],  S = D²,  F = D E - E D,
    D' = a D + b D S,       E' = a E + b (E S + S E - (D E) D).
Scaled by 1 / s with s² = ||H²||_F (= the forward's s: H² = PᵀP), D follows exactly the forward's scalar
map on the singular values of P, so the same schedule, tightening and stopping rule apply with
||S - I||_F as the measurement; in H's eigenbasis E_ij = C_ij (f(λ_i) + f(λ_j)) / (λ_i + λ_j) -> 2 Y_ij
with relative error <= max |f - 1|. D and S are symmetric, E, ES + SE and DED are skew: each of them is
computed on the upper-triangle tiles only. Per step: S (½), D' (½), W = DE (1),
E' = aE + b(ES + SE - WD) (3 products, ½ each)
= 3.5 GEMM-equivalents (forward: 1.5); six d×d buffers, independent of the iteration count.

Nothing here ran on a GPU when this was written: the kernels were checked under TRITON_INTERPRET=1
(float32 computed exactly, so TF32 and bf16 effects are invisible there) and the block sizes are untuned.
"""
import math
from typing import Callable, Optional, Tuple

import torch
from torch import Tensor

from opt_fast import _checks
from opt_fast.reference import lowdin as _ref

from . import INTERPRET
from ._device import on_input_device
from .matmul import mm

__all__ = ["lowdin", "lowdin_backward", "orthogonalize_approx"]


def _gram(out: Tensor, X: Tensor) -> Tensor:
    """out = XᵀX (triangle tiles); returns ||out - I||_F² per matrix."""
    return mm(out, [(X.mT, X, 1.0)], sym=1, err=True)


def _worst(err2: Tensor, d: int) -> float:
    """max over the finite matrices of ||A - I||_F / sqrt(d) (NaN/inf matrices cannot converge: left out)."""
    e = torch.where(torch.isfinite(err2), err2, torch.zeros_like(err2))
    return math.sqrt(float(e.max())) / math.sqrt(d) if e.numel() else 0.0


def _drive(step: Callable[[Tuple[float, float], bool], Optional[Tensor]], err2: Optional[Tensor], iters: int,
           lo: float, hi: float, d: int, dtype) -> Optional[Tensor]:
    """The reference's ``_iterate`` control flow; ``step((a, b), measure)`` does one polynomial step on the
    caller's state and returns the new ||A - I||_F² when ``measure``.

    A fixed ``iters`` never synchronises with the host (the coefficients are kernel arguments). The
    converging mode reads one number per step (the worst measured error): its stopping rule and the
    interval tightening need it, as in the reference. Returns the last ||A - I||_F² if the step cap stopped
    it short of the tolerance (for ``_ref.finish_unconverged``), else None."""
    if iters > 0:
        for k in range(iters):
            a, b, lo, hi = _ref._design_step(lo, hi)
            step((a, b), k + 1 < iters)   # the next step needs the Gram matrix; nothing is measured
        return None
    tol = _ref._tolerance(dtype)
    cap = len(_ref._SCHEDULE) + _ref._TAIL_STEPS
    k = 0
    while True:
        worst = _worst(err2, d)   # the one host synchronisation per step
        if worst <= tol:
            return None
        if k >= cap:
            return err2
        if _ref._last_step_suffices(worst, d, tol):
            step(_ref._TAYLOR, False)
            return None
        lo, hi = _ref._tighten(lo, hi, math.sqrt(d) * worst)
        a, b, lo, hi = _ref._design_step(lo, hi)
        err2 = step((a, b), True)
        k += 1


# ---- forward ---------------------------------------------------------------------------------------------

def _eye_err2(A: Tensor) -> Tensor:
    eye = torch.eye(A.shape[-1], dtype=A.dtype, device=A.device)
    return torch.linalg.matrix_norm(A - eye) ** 2


def _cold_start(P: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """X0 = P / (m s), A0 = X0ᵀX0, m = max |entry| (no overflow in the Gram), s² = ||(P/m)ᵀ(P/m)||_F."""
    tiny = torch.finfo(P.dtype).tiny
    X = P / P.abs().amax(dim=(-2, -1), keepdim=True).clamp_min(tiny)   # NaN stays NaN; 0 stays 0
    A = torch.empty_like(X)
    mm(A, [(X.mT, X, 1.0)], sym=1)
    s2 = torch.linalg.matrix_norm(A).clamp_min(tiny)[..., None, None]
    X.div_(s2.sqrt())
    A.div_(s2)
    return X, A, _eye_err2(A)


def _warm_start(P: Tensor, R0: Tensor) -> Optional[Tuple[Tensor, Tensor, Tensor]]:
    """The reference's certified reuse: R0 if ||skew(R0ᵀP)||_F <= 10 eps ||P||_F, sym(R0ᵀP) is positive
    definite (a symmetric R0ᵀP alone also holds for R0 = -R) and R0 is orthogonal to 1e-3, else None (cold
    start)."""
    if not bool(torch.isfinite(R0).all()):
        return None
    K = torch.empty_like(P)
    mm(K, [(R0.mT, P, 1.0), (P.mT, R0, -1.0)], sym=-1)   # R0ᵀP - PᵀR0 = 2 skew(R0ᵀP)
    skew = torch.linalg.matrix_norm(K) / 2
    bound = _ref._WARM_RESIDUAL * torch.finfo(P.dtype).eps * torch.linalg.matrix_norm(P)
    if not bool((skew <= bound).all()):
        return None
    mm(K, [(R0.mT, P, 1.0), (P.mT, R0, 1.0)], sym=1)    # 2 sym(R0ᵀP)
    if not bool((torch.linalg.cholesky_ex(K).info == 0).all()):
        return None
    A = torch.empty_like(P)
    err2 = _gram(A, R0)
    if _worst(err2, P.shape[-1]) > 1e-3:
        return None
    return R0.clone(), A, err2


@on_input_device
def lowdin(P: Tensor, iters: int = 0, R0: Optional[Tensor] = None) -> Tensor:
    """``opt_fast::lowdin`` on CUDA (or under TRITON_INTERPRET=1): the reference's semantics exactly."""
    _checks.lowdin(P, iters, R0)
    if P.shape[-2] != P.shape[-1]:   # tall m × n: the reference (its SVD through ATen); the kernels are square
        return _ref.lowdin_ref(P, iters, R0)
    shape = P.shape
    d = shape[-1]
    if P.numel() == 0:
        return torch.empty(shape, dtype=P.dtype, device=P.device)
    P3 = P.reshape(-1, d, d).contiguous()
    start = None
    if R0 is not None:
        start = _warm_start(P3, R0.detach().reshape(-1, d, d).to(P.dtype).contiguous())
    if start is not None:
        X, A, err2 = start
        lo = 1.0
    else:
        X, A, err2 = _cold_start(P3)
        lo = _ref._ELL0
    Xn = torch.empty_like(X)
    state = [X, Xn]

    def step(coef, measure):
        X, Xn = state
        a, b = coef
        mm(Xn, [(X, A, 1.0)], xin=X, alpha=a, beta=b)
        state[0], state[1] = Xn, X
        return _gram(A, Xn) if measure else None

    capped = _drive(step, err2, iters, lo, 1.0, d, P.dtype)
    X = state[0]
    if capped is not None:
        X = _ref.finish_unconverged(X, capped.sqrt() / math.sqrt(d), _ref._tolerance(P.dtype))
    return X.reshape(shape)


# ---- backward --------------------------------------------------------------------------------------------

@on_input_device
def lowdin_backward(grad: Tensor, P: Tensor, R: Tensor) -> Tensor:
    """``opt_fast::lowdin_backward``: dP = R Y, H Y + Y H = RᵀG - GᵀR, H = sym(RᵀP), by the sign iteration
    of [[H, C], [0, -H]] on the forward's schedule (module docstring)."""
    _checks.lowdin_backward(grad, P, R)
    if P.shape[-2] != P.shape[-1]:   # tall P: the reference's formula (the kernels are square)
        return _ref.lowdin_backward_ref(grad, P, R)
    if grad.numel() == 0:
        return torch.zeros_like(P)
    shape = P.shape
    d = shape[-1]
    G3 = grad.reshape(-1, d, d).contiguous()   # contiguous: an expanded grad has stride 0
    P3 = P.reshape(-1, d, d).contiguous()
    R3 = R.reshape(-1, d, d).contiguous()
    D, E, S = torch.empty_like(P3), torch.empty_like(P3), torch.empty_like(P3)
    mm(D, [(R3.mT, P3, 1.0), (P3.mT, R3, 1.0)], beta=0.5, sym=1)   # H
    mm(E, [(R3.mT, G3, 1.0), (G3.mT, R3, -1.0)], sym=-1)           # C
    # Y is invariant under (H, C) -> (H, C) / c: divide by max |H| (no overflow in H²), then by
    # s = ||H²||_F^(1/2) >= σ_max, the forward's s.
    tiny = torch.finfo(P.dtype).tiny
    m = D.abs().amax(dim=(-2, -1), keepdim=True).clamp_min(tiny)
    D.div_(m)
    E.div_(m)
    mm(S, [(D, D, 1.0)], sym=1)
    s2 = torch.linalg.matrix_norm(S).clamp_min(tiny)[..., None, None]
    s = s2.sqrt()
    D.div_(s)
    E.div_(s)
    S.div_(s2)
    W, Dn, En = torch.empty_like(D), torch.empty_like(D), torch.empty_like(D)
    state = [D, E, Dn, En]

    def step(coef, measure):
        D, E, Dn, En = state
        a, b = coef
        mm(W, [(D, E, 1.0)])
        mm(En, [(E, S, 1.0), (S, E, 1.0), (W, D, -1.0)], xin=E, alpha=a, beta=b, sym=-1)
        mm(Dn, [(D, S, 1.0)], xin=D, alpha=a, beta=b, sym=1)
        state[:] = [Dn, En, D, E]
        return _gram(S, Dn) if measure else None   # D symmetric: DᵀD = D²

    _drive(step, _eye_err2(S), 0, _ref._ELL0, 1.0, d, P.dtype)
    out = torch.empty_like(P3)
    mm(out, [(R3, state[1], 1.0)], beta=0.5)   # R Y, Y = E / 2
    return out.reshape(shape)


# ---- approximate mode (Muon-style) -----------------------------------------------------------------------

from opt_fast.functional import MUON_COEFS  # noqa: E402  (one definition)


@on_input_device
def orthogonalize_approx(G: Tensor, steps: int = 5, lowp: Optional[bool] = None) -> Tensor:
    """Muon's quintic Newton–Schulz on [..., m, n]: APPROXIMATE (see opt_fast.functional.orthogonalize_approx).
    ``lowp`` (default: on a GPU) takes the products in bfloat16 with float32 accumulation, else in float32
    (``F32_PRECISION``); the interpreter always computes float32 (its bfloat16 is broken)."""
    a, b, c = MUON_COEFS
    shape = G.shape
    m, n = shape[-2], shape[-1]
    if G.numel() == 0:
        return torch.empty(shape, dtype=G.dtype, device=G.device)
    X = G.reshape(-1, m, n).float()
    if m > n:   # iterate on the smaller Gram side
        X = X.mT
    X = (X / (torch.linalg.matrix_norm(X)[..., None, None] + 1e-7)).contiguous()
    lowp = (not INTERPRET) if lowp is None else (lowp and not INTERPRET)
    k = X.shape[-2]
    A, B, Xn = X.new_empty(X.shape[0], k, k), X.new_empty(X.shape[0], k, k), torch.empty_like(X)
    for _ in range(steps):
        mm(A, [(X, X.mT, 1.0)], sym=1, lowp=lowp)
        mm(B, [(A, A, 1.0)], xin=A, alpha=b, beta=c, sym=1, lowp=lowp)   # b A + c A²
        mm(Xn, [(B, X, 1.0)], xin=X, alpha=a, beta=1.0, lowp=lowp)
        X, Xn = Xn, X
    if m > n:
        X = X.mT
    return X.to(G.dtype).reshape(shape)
