"""Reference Cayley transform: Q = (I + S)(I - S)^-1, the map of OPT-CP (docs/methods.md#cayley).

Forward with one inverse, using the identity I + Q = 2 (I - S)^-1, i.e. Q = 2 M - I with M = (I - S)^-1
(docs/performance.md).

Backward from the saved output alone. With dQ = dS M + (I + S) dM and dM = M dS M we get
dQ = (I + Q) dS M = 2 M dS M, so for an upstream gradient G

    grad_S = 2 Mᵀ G Mᵀ = ½ (I + Q)ᵀ G (I + Q)ᵀ        (two matmuls, no second solve).

This is the full gradient with respect to S: it holds for any S with I - S invertible, so the caller's
own map P -> S (e.g. triu(P) - triu(P)ᵀ) is differentiated by autograd around the op. For skew S,
I - S is never singular (its symmetric part is I).

S is deliberately not checked for skew-symmetry: the op is the Cayley transform of any S with I - S
invertible (forward and backward above hold for all of them), and Q is orthogonal exactly when S is skew.
Only a singular I - S raises (torch.linalg.LinAlgError, as torch's solve); an infinite entry gives NaN.

float32 from d = POLISH_MIN_D on: the inverse's rounding leaves ‖QᵀQ − I‖_F/√d growing with d (1.8e-5 at
d = 2048 for OPT's N(0, 1) init, past the 1e-5 OPT needs), so one Newton–Schulz step follows,
Q ← Q − ½ Q (QᵀQ − I) (docs/performance.md): ~2e-7 after it, and no further from the exact map. Skipped
where float32 products may run in TF32 (torch.set_float32_matmul_precision other than "highest", or
torch.backends.cuda.matmul.allow_tf32 on a GPU): their rounding is larger than what the step removes.
"""
import torch
from torch import Tensor

from .. import _checks


POLISH_MIN_D = 769   # the C++ kernel's kPolishMinD (csrc/cpu/cayley.cpp)


def _full_float32_products(Q: Tensor) -> bool:
    if torch.get_float32_matmul_precision() != "highest":
        return False
    return Q.device.type != "cuda" or not torch.backends.cuda.matmul.allow_tf32


def cayley_ref(S: Tensor) -> Tensor:
    _checks.cayley(S)
    eye = torch.eye(S.shape[-1], dtype=S.dtype, device=S.device)
    M, info = torch.linalg.inv_ex(eye - S)
    if S.numel() and bool((info > 0).any()):
        raise torch.linalg.LinAlgError(
            "opt_fast.cayley: I - S is singular (S must be skew-symmetric, or at least have no eigenvalue 1)")
    Q = 2.0 * M - eye
    if Q.dtype == torch.float32 and Q.shape[-1] >= POLISH_MIN_D and _full_float32_products(Q):
        Q = Q - 0.5 * (Q @ (Q.mT @ Q - eye))
    # an infinite entry gives NaN, as torch.linalg.solve(I - S, I + S): not a finite non-orthogonal Q
    if S.numel() == 0 or bool(torch.isfinite(S.sum())):   # one reduction; the per-matrix test only if needed
        return Q
    finite = torch.isfinite(S).flatten(-2).all(-1)[..., None, None]
    return torch.where(finite, Q, torch.nan)


def cayley_backward_ref(grad: Tensor, Q: Tensor) -> Tensor:
    _checks.cayley_backward(grad, Q)
    B = Q.mT + torch.eye(Q.shape[-1], dtype=Q.dtype, device=Q.device)  # (I + Q)ᵀ
    return 0.5 * (B @ grad @ B)
