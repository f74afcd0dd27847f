"""Reference Löwdin orthogonalisation: the orthogonal polar factor R = P (PᵀP)^(-1/2) of P [..., m, n], m >= n.

For square P, R is orthogonal; for tall P (m > n), R has orthonormal columns: it is U Vᵀ of the thin SVD
P = U diag(σ) Vᵀ, the orthonormal matrix nearest to P (what Muon-style optimizers approximate). Everything
below works on the n×n Gram side, so tall P costs what its n×n Gram matrices and m×n products cost.

Method (Newton–Schulz-type, matmuls only in the loop)
-----------------------------------------------------
With A = XᵀX, every step is X <- X p(A) for an odd polynomial, so X_k = R f_k(H) (H = (PᵀP)^(1/2))
and the singular values follow the scalar map x -> p(x) while R is untouched. Steps are odd cubics
X <- a X + b X (XᵀX): two matmuls each, one of them the Gram matrix the stopping rule measures anyway.

Scaling. X0 = P / s with s = ||PᵀP||_F^(1/2) = (Σ σᵢ⁴)^(1/4) >= σ_max. It is free (PᵀP is the first
step's Gram matrix). ||(PᵀP)²||_F^(1/4) is tighter (s/σ_max = 1.53-1.67 against 2.89-3.39 for
N(0,1) P, d = 576 / 1024) but costs a matmul a cubic step does not need; in the matmul counts below
the cheaper bound wins by one matmul.

Schedule. Step k uses the minimax odd cubic for the tracked interval [lo, hi] (closed form in
`_optimal_cubic`: y*² = (1 + r + r²)/3, ...), composed greedily as in Polar Express (Amsel et al.
2025), starting from the design interval [1e-5, 1] and with the design lower end cushioned at
0.1 hi: for small r the optimal cubic maps the top of the spectrum near 0 (p(1) -> 0 as r -> 0),
which in float32 costs accuracy (a cushion of 0.02 made the quintic variant diverge). 17 steps bring
[1e-5, 1] to [1 - 1e-15, 1 + 1e-15]; afterwards the Newton–Schulz cubic x (3 - x²)/2 is repeated, so
singular values below the design bound still converge (growing 1.5x per step). The automatic loop
also intersects [lo, hi] with the bound max |σᵢ² - 1| <= ||XᵀX - I||_F whenever that is < 1, so small
or well-conditioned batches leave the pessimistic schedule early (d = 2: 3-7 steps instead of 16).
It stops on ||XᵀX - I||_F / sqrt(d) <= tol (1e-6 float32, 1e-13 float64: near the rounding floor,
because X = R f(H) differs from R by about ||XᵀX - I||_F / 2) for every finite matrix of the batch,
or, in practice, one step earlier: when a last Newton–Schulz step provably lands below tol / 4 it is
taken without measuring its result (`_last_step_suffices`, saves a Gram matrix). The cap is 17 + 30
steps (singular P; NaN matrices are left out of the rule and come out NaN).

Measured (float32, N(0,1) P; "err" = ||R - R64||_F against the float64 SVD polar factor, relative to
the same error of float32 `U @ Vh` from torch.linalg.svd; matmuls include the Gram matrices):

  variant (design lower bound 1e-5)                     matmuls d=576 / 1024    err / SVD-err
  cubic, cushion 0.1 (this module)                      32 / 32                 0.35-0.56
  cubic, cushion 0.05                                   32 / 32                 0.56-0.63
  quintic minimax (Remez), cushion 0.1                  34 / -                  0.69-0.78
  quintic minimax (Remez), cushion 0.05                 31 / -                  0.91-1.03
  quintic minimax (Remez), cushion 0.02                 diverged in float32
  degree-9 odd (4 matmuls/step), cushion 0.1            33 / -                  6.9-7.8
  cubic, cushion 0.1, design bound 3e-6                 35 (d = 1024)           0.37-0.44
  cubic, cushion 0.1, design bound 3e-5                 33 typical, 55 worst (simulation, 2 of 20
                                                        seeds lie below 3e-5 and pay the tail)

(the quintic and degree-9 rows were measured without the final-step saving: subtract one). Counts
are worst cases over 10 seeds at d = 576 and 1024 (simulation of the scalar map on the float64
singular values, confirmed in float32 on 10 + 5 matrices). σ_min / s ranges 1.5e-5 .. 5e-4 there;
the design bound 1e-5 covers all of them; by Edelman's law for σ_min about 3% (d = 576) / 7%
(d = 1024) of N(0,1) matrices fall below it and pay ~2 matmuls per factor 1.5 of shortfall in the
tail. The cubic is chosen: as few matmuls as the best quintic, twice its accuracy margin, and
closed-form coefficients.
Float32 orthogonality at the end is 2-4e-7, float64 17 steps (34 matmuls) to 2-3e-15 (err 2-4e-13 at
d = 576-1024). At tiny d float32 SVD is nearly exact and the ratio rises (batches of 30 N(0,1):
d = 2 / 3 / 5 / 8 up to 5.7 / 5.7 / 1.9 / 1.6x; over 200 matrices each, the excess over 2x is below
7e-7 absolute).
Time, batch 5 x 576 float32, this 2-core shared CPU, min of 4: cold iteration 0.47 s, torch.linalg.svd
+ U @ Vh 0.22 s (1 thread, loaded machine: 1.1-1.8 s vs 0.48-0.91 s). On CPU LAPACK's SVD costs
about 8 matmuls, so 32 matmuls are ~2x slower; the iteration is meant for GPUs (the C++ CPU kernel,
csrc/cpu/lowdin.cpp, therefore takes the SVD route for iters = 0 and keeps this module's R0 reuse and
fixed schedule).

Warm start R0 (previous step's R) — measured outcome
----------------------------------------------------
Target was: P moved by 1e-3 (relative, Frobenius), same accuracy as the cold start, 3x faster than
the SVD route. Not achievable with R0 here; what R0 does now is a certified reuse (`_warm_start`).

Why. With R0 = R exp(-Ω) and E the change of P, Ωᵢⱼ ≈ (RᵀE - EᵀR)ᵢⱼ / (σᵢ + σⱼ) in H's eigenbasis: the
entries of RᵀE are ~1e-3 (E is 1e-3 of N(0,1) entries), the smallest σ are ~1/sqrt(d), so the rotation
concentrates in the small-σ directions. Measured (float64, d = 576, 4 seeds, P moved by 1e-3 relative):
||R - R0||_2 = 1.5-2.9e-2, ||R - R0||_F / sqrt(d) = 2.0-2.5e-3, i.e. ~1000x the float32 error of the SVD
route (2.3e-6): R0 is a good guess, but the correction must still be resolved to about 3 digits, and every
correction step is the Lyapunov solve ΩS + SΩ = 2 skew(R0ᵀP) (S = sym(R0ᵀP) ≈ H), conditioned like H
(κ ~ 1e3-1e5). It needs H's eigenbasis (eigh: 6.8 t_bmm at batch 5 × 576 here) or a matrix iteration of
about log2 κ steps (the cold iteration's work again); the 3x target against the SVD route (14.6 t_bmm)
leaves 4.9 t_bmm, of which R0ᵀP and the final product take 2. What was tried:
  * Cholesky route X0 = P H̃⁻¹, H̃ = sym(R0ᵀP), then Newton–Schulz: X0 = R H H̃⁻¹ converges to
    polar(H H̃⁻¹) ≠ I times R. To first order the result is R exp(c ∘ Ω) with cᵢⱼ = (σᵢ - σⱼ)²/(4σᵢσⱼ),
    i.e. the error of R0 is amplified up to κ/4. Measured (batch 5, d = 576, float32): error 5e3-3.5e4x
    the SVD route's at 1e-3 (one matrix NaN: X0 had singular values > sqrt(3), where the cubic
    diverges), 8-220x at 1e-6, and still 8-220x with R0 = the exact polar factor of the same P (its
    float32 rounding is amplified the same way); its time is 0.5-1.4x the SVD route's (NS steps
    from X0: 1-6), so it would miss the 3x target even if it were accurate.
  * Iterating X <- P sym(XᵀP)⁻¹ is the fixed-point map Ω -> -c ∘ Ω: it diverges for every pair with
    σᵢ/σⱼ > 3 + 2 sqrt(2) (measured: the second Cholesky fails / NaN).
  * Left/right combinations give the same c (same sign); no cancellation.
Certified reuse. R0 is returned (after Newton–Schulz polishing if needed, normally zero steps) only
if its backward residual ||skew(R0ᵀP)||_F <= 10 eps ||P||_F, ||R0ᵀR0 - I||_F / sqrt(d) <= 1e-3 and
sym(R0ᵀP) is positive definite (one Cholesky factorisation, only once the residual passed: without it
R0 = -R was accepted); otherwise the cold iteration runs. Square P only: tall P always starts cold.
Calibration (float32, d = 576 / 1024, in eps ||P||_F): SVD's U @ Vh 6.5-7.8, this module's cold
output 8.9-9.3 (7.8-8.3 at d = 128-256); the exact polar factor of P moved by 1e-6 / 1.5e-6 / 2e-6:
6.1 / 9.0 / 12, with errors 0.76-1.15x / 1.15-1.8x / 1.5-1.8x the SVD route's, so an accepted R0
stays within ~1.8x of it (the accuracy rule allows 2x). In float64 the cold output's residual grows
like sqrt(d) (18-37 at d = 256-1024) and is not accepted there.
Cost: one matmul (R0ᵀP) when R0 is stale (~3% of a cold solve); when P is unchanged (e.g. in
evaluation) 2 matmuls: 0.031 s against 0.22 s for the SVD route and 0.47 s cold (batch 5 x 576
float32; 1 thread: 0.075-0.14 s against 0.48-0.91 s and 1.1-1.8 s), plus the positivity check's
Cholesky, which about doubles it (same batch, C++ kernel, min of 5 interleaved on a heavily loaded
machine: 0.56 s with it, 0.25 s for the checks without it, 11.9 s for the SVD route). A stale,
non-orthogonal, sign-flipped or NaN R0 falls back to the cold iteration; R0 gets no gradient.
"""
import math
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from .. import _checks

__all__ = ["lowdin_ref", "lowdin_backward_ref", "lowdin_svd_ref", "lowdin_svd_backward_ref"]

# ---------------------------------------------------------------------------------------------------
# Polynomial schedule (computed once at import, in Python doubles)
# ---------------------------------------------------------------------------------------------------

_ELL0 = 1e-5  # design lower bound of sigma_min / s (s = the scaling below)
_CUSHION = 0.1  # never design a step for an interval [lo, hi] with lo < _CUSHION * hi
_TAYLOR = (1.5, -0.5)  # p(x) = x (3 - x²) / 2: the Newton–Schulz limit of the schedule
_TAIL_STEPS = 30  # steps allowed after the schedule before giving up (singular P, absurd conditioning)


def _optimal_cubic(lo: float, hi: float) -> Tuple[float, float, float]:
    """Odd cubic p(x) = a x + b x³ minimising max |1 - p| on [lo, hi]; returns (a, b, E).

    On the normalised interval [r, 1], r = lo / hi, write p(y) = α y + β y³. Equioscillation at
    y = r, y*, 1 (p(r) = p(1) = 1 - E, p(y*) = 1 + E, p'(y*) = 0) gives
        α = -β (1 + r + r²)                    from p(r) = p(1),
        y*² = -α / (3β) = (1 + r + r²) / 3      from p'(y*) = 0,
        p(y*) = 2 α y* / 3,  p(1) = α (r + r²) / (1 + r + r²),
        α = 2 / ((r + r²) / (1 + r + r²) + 2 y* / 3)   from p(1) + p(y*) = 2.
    r -> 1 gives the Newton–Schulz cubic (3/2, -1/2); r -> 0 gives α = 3√3, p(1) = 0 (E = 1).
    """
    r = lo / hi
    s = 1.0 + r + r * r
    ystar = math.sqrt(s / 3.0)
    alpha = 2.0 / ((r + r * r) / s + 2.0 * ystar / 3.0)
    beta = -alpha / s
    err = 2.0 * alpha * ystar / 3.0 - 1.0
    return alpha / hi, beta / hi ** 3, err


def _design_step(lo: float, hi: float) -> Tuple[float, float, float, float]:
    """The cubic for singular values believed to lie in [lo, hi], and the image interval.

    The step is designed for [max(lo, cushion * hi), hi]; values below that still grow (p increases
    up to y* hi, beyond the design's lower end), only not all the way to 1 - E.
    """
    a, b, err = _optimal_cubic(max(lo, _CUSHION * hi), hi)
    return a, b, min(a * lo + b * lo ** 3, 1.0 - err), 1.0 + err


def _build_schedule(ell0: float) -> List[Tuple[float, float]]:
    """The steps for [ell0, 1] with no measurements: the greedy composition of optimal cubics."""
    lo, hi = ell0, 1.0
    steps = []
    while (1.0 - lo > 1e-15 or hi - 1.0 > 1e-15) and len(steps) < 100:
        a, b, lo, hi = _design_step(lo, hi)
        steps.append((a, b))
    return steps


_SCHEDULE = _build_schedule(_ELL0)  # 17 steps; iters > 0 runs a prefix of it (then Newton–Schulz)


def _tolerance(dtype: torch.dtype) -> float:
    """Stopping tolerance on ||XᵀX - I||_F / sqrt(d), a few eps above the rounding floor.

    It has to be that small, not just <= 1e-5: X = R f(H) deviates from R by about
    ||XᵀX - I||_F / 2, which at tol = 5e-6 would already match float32 SVD's whole error at d = 576
    (and exceed it 50x at d = 2). In practice the loop ends through `_last_step_suffices` one
    Newton–Schulz step before reaching it.
    """
    if dtype == torch.float64:
        return 1e-13
    if dtype == torch.float32:
        return 1e-6
    return 10.0 * torch.finfo(dtype).eps  # half precisions: best effort


# ---------------------------------------------------------------------------------------------------
# Iteration
# ---------------------------------------------------------------------------------------------------


def _orth_error(A: Tensor) -> Tensor:
    """||A - I||_F / sqrt(d) per matrix, A = XᵀX."""
    d = A.shape[-1]
    eye = torch.eye(d, dtype=A.dtype, device=A.device)
    return torch.linalg.matrix_norm(A - eye) / math.sqrt(d)


def _cubic_step(X: Tensor, A: Tensor, coef: Tuple[float, float]) -> Tensor:
    """X (a I + b XᵀX), with A = XᵀX given: one matmul."""
    return torch.baddbmm(X, X, A, beta=coef[0], alpha=coef[1])


def _last_step_suffices(err: float, d: int, tol: float) -> bool:
    """True if one Newton–Schulz step from an iterate with error `err` provably lands below tol / 4.

    With δ = x² - 1 for each singular value x, p(x) = x (3 - x²)/2 gives p(x)² - 1 = -¾ δ² + ¼ δ³, so
    |δ'| <= ¾ |δ|² (1 + |δ|/3). Bounding max |δ| by ||δ||_F = sqrt(d) err:
    err' <= ¾ sqrt(d) err² (1 + sqrt(d) err / 3). Taking that step without measuring its result saves
    the Gram matrix the final check would cost. (Exact arithmetic; the computed result sits at the
    rounding floor, 2-4e-7 in float32 for d <= 1024.)
    """
    rho = math.sqrt(d) * err
    return rho < 1.0 and 0.75 * rho * err * (1.0 + rho / 3.0) <= 0.25 * tol


def _tighten(lo: float, hi: float, rho: float) -> Tuple[float, float]:
    """Intersect [lo, hi] with the guaranteed bound from rho = ||XᵀX - I||_F >= max |σᵢ² - 1|."""
    if rho < 1.0:
        lo, hi = max(lo, math.sqrt(1.0 - rho)), min(hi, math.sqrt(1.0 + rho))
    return min(lo, hi), hi


def finish_unconverged(X: Tensor, err: Tensor, tol: float) -> Tensor:
    """At the step cap (P singular, or so ill-conditioned that the schedule runs out: κ ≳ 1e11 in float64),
    the finite matrices of X [B, m, n] still short of ``tol`` (err [B]) are finished by an SVD of the iterate,
    whose singular vectors are P's, rather than returned non-orthogonal."""
    bad = torch.isfinite(err) & (err > tol)
    U, _, Vh = torch.linalg.svd(X[bad], full_matrices=False)
    return X.index_put((bad,), U @ Vh)


def _iterate(X: Tensor, A: Tensor, iters: int, lo: float, hi: float) -> Tensor:
    """Polynomial steps from X (A = XᵀX, singular values believed in [lo, hi]): `iters` of them, or
    until converged if iters == 0.

    The converging loop also tightens [lo, hi] with the measured error (`_tighten`): once
    ||XᵀX - I||_F < 1 the interval is known, so well-conditioned or small matrices leave the
    pessimistic schedule early (fewer steps, less rounding). iters > 0 measures nothing and runs the
    fixed schedule.
    """
    d = X.shape[-1]
    tol = _tolerance(X.dtype)
    cap = len(_SCHEDULE) + _TAIL_STEPS
    k = 0
    while True:
        if iters > 0:
            if k == iters:
                return X
        else:
            err = _orth_error(A.detach())  # a measurement: no derivative
            finite = torch.isfinite(err)
            # NaN/inf matrices cannot converge: they are left out of the rule (their output stays NaN).
            worst = float(err[finite].max()) if bool(finite.any()) else 0.0
            if worst <= tol:
                return X
            if k >= cap:
                return finish_unconverged(X, err, tol)
            if _last_step_suffices(worst, d, tol):
                return _cubic_step(X, A, _TAYLOR)
            lo, hi = _tighten(lo, hi, math.sqrt(d) * worst)
        a, b, lo, hi = _design_step(lo, hi)
        X = _cubic_step(X, A, (a, b))
        k += 1
        if iters == 0 or k < iters:
            A = X.mT @ X


def _cold_start(P: Tensor) -> Tuple[Tensor, Tensor]:
    """X0 = P / s and its Gram matrix, with s = ||PᵀP||_F^(1/2) = (Σ σᵢ⁴)^(1/4) >= σ_max.

    The bound is free: PᵀP is the first step's Gram matrix anyway. P is first divided by its largest
    |entry| so that PᵀP can neither overflow nor underflow (this does not change R).
    """
    tiny = torch.finfo(P.dtype).tiny
    m = P.abs().amax(dim=(-2, -1), keepdim=True).clamp_min(tiny)  # NaN stays NaN; 0 stays 0
    X = P / m
    A = X.mT @ X
    s2 = torch.linalg.matrix_norm(A).clamp_min(tiny)[..., None, None]  # s²
    return X / s2.sqrt(), A / s2


_WARM_RESIDUAL = 10.0  # accept R0 if ||skew(R0ᵀP)||_F <= this * eps ||P||_F (see _warm_start)


def _warm_start(P: Tensor, R0: Tensor) -> Optional[Tuple[Tensor, Tensor]]:
    """Use R0 only if it is already the polar factor of square P to working accuracy.

    R0 is accepted when it is orthogonal to 1e-3 (the Newton–Schulz tail polishes the rest), its
    backward residual ||skew(R0ᵀP)||_F is at the rounding level of a backward-stable polar
    decomposition (R0 is then the exact polar factor of P + δP with ||δP||_F ≲ that residual; in
    float32 SVD's U Vh leaves ≈ 7 eps ||P||_F, the cold iteration ≈ 9), and sym(R0ᵀP) is positive
    definite (a Cholesky factorisation exists): a symmetric R0ᵀP alone also holds for R0 = -R or any
    R Q with Q a symmetric orthogonal matrix commuting with H, which are not the polar factor.
    Otherwise None (cold start): see the module docstring for why no cheap correction of a stale R0
    is accurate enough. Tall P never gets here (lowdin_ref): its certificate would also have to show
    that R0 spans the column space of P.
    """
    if not bool(torch.isfinite(R0).all()):
        return None
    M = R0.mT @ P  # checked first: a stale R0 (the usual case in training) costs this one matmul
    skew = torch.linalg.matrix_norm(M - M.mT) / 2
    bound = _WARM_RESIDUAL * torch.finfo(P.dtype).eps * torch.linalg.matrix_norm(P)
    if not bool((skew <= bound).all()):
        return None
    if bool((torch.linalg.cholesky_ex(0.5 * (M + M.mT)).info != 0).any()):
        return None
    A = R0.mT @ R0
    if float(_orth_error(A).max()) > 1e-3:
        return None
    return R0, A


def warm_start_accepted(P: Tensor, R0: Optional[Tensor]) -> bool:
    """True if lowdin(P, iters, R0) starts from R0 (then its result is the polar factor for any iters)."""
    m, n = P.shape[-2], P.shape[-1]
    if R0 is None or m != n or P.numel() == 0:
        return False
    return _warm_start(P.reshape(-1, m, n), R0.detach().reshape(-1, m, n).to(P.dtype)) is not None


def lowdin_ref(P: Tensor, iters: int = 0, R0: Optional[Tensor] = None) -> Tensor:
    """Polar factor R = P (PᵀP)^(-1/2) of P [..., m, n] (m >= n) by a Newton–Schulz-type iteration.

    iters == 0: iterate until ||XᵀX - I||_F / sqrt(n) <= tol (1e-6 float32, 1e-13 float64) for every
    matrix of the batch, at most len(_SCHEDULE) + 30 steps (singular P, NaN). iters > 0: exactly that
    many polynomial steps (the fixed schedule, nothing measured). R0: optional previous polar factor
    (warm start) of square P; it is only used when it is still the polar factor of P to working
    accuracy, otherwise (and always for tall P) the cold iteration runs.
    """
    _checks.lowdin(P, iters, R0)
    shape = P.shape
    m, n = shape[-2], shape[-1]
    if P.numel() == 0:
        return torch.empty(shape, dtype=P.dtype, device=P.device)
    P3 = P.reshape(-1, m, n)  # copies non-contiguous input if needed
    start = None
    if R0 is not None and m == n:
        start = _warm_start(P3, R0.detach().reshape(-1, m, n).to(P.dtype))
    if start is not None:
        X, A = start
        X = _iterate(X.clone(), A, iters, 1.0, 1.0)  # converged: Newton–Schulz polish; never alias R0
    else:
        X, A = _cold_start(P3)
        X = _iterate(X, A, iters, _ELL0, 1.0)
    return X.reshape(shape)


# ---------------------------------------------------------------------------------------------------
# Backward
# ---------------------------------------------------------------------------------------------------


def _singular_as_zero(sigma: Tensor) -> Tensor:
    """Singular values at or below eps·σ_max are a singular P's zeros computed at rounding level (eigh or SVD
    of an exactly rank-deficient P gives ±1e-8·σ_max, not 0): made 0, so that the gradient there is
    non-finite (the op raises) instead of huge and meaningless."""
    eps = torch.finfo(sigma.dtype).eps
    return torch.where(sigma.abs() <= eps * sigma.abs().amax(-1, keepdim=True), torch.zeros_like(sigma), sigma)


def lowdin_backward_ref(grad: Tensor, P: Tensor, R: Tensor) -> Tensor:
    """VJP of P -> R = polar(P): dP = R Y + (G - R A) H⁻¹ with H Y + Y H = A - Aᵀ, H = sym(RᵀP),
    A = Rᵀ G (G = grad; the second term is zero for square P, where R Rᵀ = I).

    Derivation: P = R H with RᵀR = I gives Rᵀ dP = Ω H + dH with Ω = Rᵀ dR skew and dH symmetric, so
    the skew part Rᵀ dP - dPᵀ R = Ω H + H Ω; for tall P, dR also leaves the column space of R:
    (I - R Rᵀ) dR = (I - R Rᵀ) dP H⁻¹. For L = <G, dR> = <RᵀG, Ω> + <(I - R Rᵀ) G, dP H⁻¹> and the
    self-adjoint Lyapunov operator 𝓛(Ω) = Ω H + H Ω the first part is
    <𝓛⁻¹(skew(RᵀG)), Rᵀ dP - dPᵀ R> = <2 R 𝓛⁻¹(skew(RᵀG)), dP>, i.e. the formula above. Uses only P
    and R, so memory does not depend on the forward's iteration count.
    """
    _checks.lowdin_backward(grad, P, R)
    if grad.numel() == 0:
        return torch.zeros_like(P)
    RtP = R.mT @ P
    H = 0.5 * (RtP + RtP.mT)  # = (PᵀP)^(1/2) up to the forward's accuracy; SPD for nonsingular P
    A = R.mT @ grad
    lam, V = torch.linalg.eigh(H)  # H = V diag(σ) Vᵀ: σ are the singular values of P
    lam = _singular_as_zero(lam)
    C = V.mT @ (A - A.mT) @ V
    # In H's eigenbasis the Lyapunov equation is diagonal: Y_ij = C_ij / (σ_i + σ_j). The denominators
    # are >= 2 σ_min: the gradient of R is as ill-conditioned as R itself (infinite for singular P).
    # The diagonal of C is zero (C is skew), so n = 1 gives R Y = 0 (R = p / |p| only turns).
    Y = C / (lam.unsqueeze(-1) + lam.unsqueeze(-2))
    out = R @ (V @ Y @ V.mT)
    if P.shape[-2] > P.shape[-1]:
        out = out + (grad - R @ A) @ ((V / lam.unsqueeze(-2)) @ V.mT)
    return out


# ---------------------------------------------------------------------------------------------------
# The SVD route with its factors kept (lowdin_svd): a backward that reuses them
# ---------------------------------------------------------------------------------------------------


def lowdin_svd_ref(P: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """(R, U, S, Vh) with P = U diag(S) Vh the thin SVD (torch.linalg.svd) and R = U Vh, the polar factor
    lowdin computes; P [..., m, n] (m >= n) gives U [..., m, n], S [..., n], Vh [..., n, n].

    lowdin_backward must recompute an eigendecomposition of H = RᵀP; keeping the forward's factors makes
    the backward four matmuls (five for tall P; lowdin_svd_backward). Matrices with a non-finite entry give
    NaN in all four outputs (LAPACK is never handed one); the rest of the batch is unaffected.
    """
    _checks.lowdin_svd(P)
    finite = torch.isfinite(P).all(-1).all(-1)[..., None, None]
    eye = torch.eye(P.shape[-2], P.shape[-1], dtype=P.dtype, device=P.device)
    U, S, Vh = torch.linalg.svd(torch.where(finite, P, eye), full_matrices=False)
    nan = torch.tensor(float("nan"), dtype=P.dtype, device=P.device)
    U, Vh = torch.where(finite, U, nan), torch.where(finite, Vh, nan)
    S = torch.where(finite[..., 0], S, nan)
    return U @ Vh, U, S, Vh


def lowdin_svd_backward_ref(grad: Tensor, U: Tensor, S: Tensor, Vh: Tensor) -> Tensor:
    """lowdin_backward's formula in P's singular bases: with K = Uᵀ grad V, dP = U Y Vh, Y_ij = (K - Kᵀ)_ij /
    (σ_i + σ_j) (H = V diag(σ) Vᵀ and R V = U, so C = Vᵀ (Rᵀg - gᵀR) V = K - Kᵀ); tall P adds
    (I - U Uᵀ) grad H⁻¹ = (grad V - U K) diag(1/σ) Vh."""
    _checks.lowdin_svd_backward(grad, U, S, Vh)
    S = _singular_as_zero(S)
    GV = grad @ Vh.mT
    K = U.mT @ GV
    Y = U @ ((K - K.mT) / (S.unsqueeze(-1) + S.unsqueeze(-2)))
    if U.shape[-2] > U.shape[-1]:
        Y = Y + (GV - U @ K) / S.unsqueeze(-2)
    return Y @ Vh
