"""Input validation at the op boundary, shared by the reference kernels and the fake kernels.

Every message starts with ``opt_fast.<op>:`` and says what was expected, so a user who passes a wrong
shape learns which op and which argument. The C++ kernels (csrc/opt_fast.h) use the same wording.
"""
from __future__ import annotations

import math
import numbers
from typing import Optional

import torch
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake

FLOAT_DTYPES = (torch.float32, torch.float64)


def fail(op: str, msg: str):
    raise RuntimeError(f"opt_fast.{op}: {msg}")


def _shape(t: Tensor) -> str:
    return "[" + ", ".join(str(s) for s in t.shape) + "]"


def float_matrix(op: str, name: str, t: Tensor, dtypes=FLOAT_DTYPES) -> None:
    """t is a (batched) matrix of one of ``dtypes`` (float32/float64 unless told)."""
    if not isinstance(t, Tensor):
        fail(op, f"expected {name} to be a Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        names = [str(d).removeprefix("torch.") for d in dtypes]
        fail(op, f"expected {name} to be {', '.join(names[:-1])} or {names[-1]}, got {t.dtype}")
    if t.dim() < 2:
        fail(op, f"expected {name} to have at least 2 dimensions [..., rows, cols], got shape {_shape(t)}")


def square(op: str, name: str, t: Tensor) -> None:
    float_matrix(op, name, t)
    if t.shape[-1] != t.shape[-2]:
        fail(op, f"expected {name} to be square [..., d, d], got shape {_shape(t)}")


def same_batch(op: str, a: str, ta: Tensor, a_nd: int, b: str, tb: Tensor, b_nd: int) -> None:
    """The leading (batch) dims of ta (all but its last a_nd) equal those of tb (all but its last b_nd)."""
    ba, bb = ta.shape[: ta.dim() - a_nd], tb.shape[: tb.dim() - b_nd]
    if ta.dim() - a_nd != tb.dim() - b_nd or ba != bb:
        fail(op, f"expected {a} and {b} to have the same batch dimensions, got {a} {_shape(ta)} and {b} {_shape(tb)}")


def same_device_dtype(op: str, a: str, ta: Tensor, b: str, tb: Tensor) -> None:
    if ta.device != tb.device:
        fail(op, f"expected {a} and {b} on the same device, got {ta.device} and {tb.device}")
    if ta.dtype != tb.dtype:
        fail(op, f"expected {a} and {b} to have the same dtype, got {ta.dtype} and {tb.dtype}")


# ---- one validator per forward op ------------------------------------------------------------------

def householder_product(V: Tensor, tau: Tensor) -> None:
    op = "householder_product"
    float_matrix(op, "V", V)
    if not isinstance(tau, Tensor) or tau.dim() < 1:
        fail(op, "expected tau to be a Tensor with at least 1 dimension [..., k]")
    same_device_dtype(op, "V", V, "tau", tau)
    m, n, k = V.shape[-2], V.shape[-1], tau.shape[-1]
    if m < n:
        fail(op, f"expected V [..., m, n] with m >= n, got shape {_shape(V)}")
    if k > n:
        fail(op, f"expected k = tau.shape[-1] <= n = V.shape[-1], got k = {k} and V of shape {_shape(V)}")
    same_batch(op, "V", V, 2, "tau", tau, 1)


def householder_orthogonal(V: Tensor) -> None:
    op = "householder_orthogonal"
    float_matrix(op, "V", V)
    if V.shape[-1] > V.shape[-2]:
        fail(op, f"expected V [..., d, k] with k <= d reflectors, got shape {_shape(V)}")


def householder_apply(V: Tensor, X: Tensor) -> None:
    op = "householder_apply"
    float_matrix(op, "V", V)
    float_matrix(op, "X", X)
    same_device_dtype(op, "V", V, "X", X)
    if V.shape[-1] > V.shape[-2]:
        fail(op, f"expected V [..., d, k] with k <= d reflectors, got shape {_shape(V)}")
    if X.shape[-2] != V.shape[-2]:
        fail(op, f"expected X [..., d, n] with d = V.shape[-2] = {V.shape[-2]}, got X of shape {_shape(X)}")
    same_batch(op, "V", V, 2, "X", X, 2)


def gram_schmidt(P: Tensor, block_size: int) -> None:
    op = "gram_schmidt"
    float_matrix(op, "P", P)
    if P.shape[-1] > P.shape[-2]:
        fail(op, f"expected P [..., m, n] with m >= n (a wide matrix has no n orthonormal columns), got shape {_shape(P)}")
    if block_size < 0:
        fail(op, f"expected block_size >= 0 (0 = automatic), got {block_size}")


def _polar_input(op: str, P: Tensor) -> None:
    float_matrix(op, "P", P)
    if P.shape[-2] < P.shape[-1]:
        fail(op, f"expected P [..., m, n] with m >= n (for wide P take the polar factor of P.mT and "
                 f"transpose it), got shape {_shape(P)}")


# Upper bounds of the count arguments: far past any use (the series and the iterations converge in tens),
# short of a loop that would run for hours or a power chain that cannot be allocated. csrc/opt_fast.h too.
MAX_TERMS = 1000
MAX_ITERS = 1000


def count(op: str, name: str, value, cap: int, meaning: str) -> None:
    """An int argument (Python or numpy integer, not bool; a SymInt while tracing) in [0, cap]."""
    if isinstance(value, bool) or not isinstance(value, (numbers.Integral, torch.SymInt)) or not 0 <= value <= cap:
        fail(op, f"expected {name} >= 0 ({meaning}) and at most {cap}, got {value!r}")


def lowdin(P: Tensor, iters: int, R0: Optional[Tensor]) -> None:
    op = "lowdin"
    _polar_input(op, P)
    count(op, "iters", iters, MAX_ITERS, "0 = iterate to convergence")
    if R0 is not None:
        float_matrix(op, "R0", R0)
        same_device_dtype(op, "P", P, "R0", R0)
        if R0.shape != P.shape:
            fail(op, f"expected R0 with the shape of P {_shape(P)}, got {_shape(R0)}")


def lowdin_svd(P: Tensor) -> None:
    _polar_input("lowdin_svd", P)


APPROX_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.complex64, torch.complex128)


def orthogonalize_approx(G: Tensor, steps: int) -> None:
    op = "functional.orthogonalize_approx"
    float_matrix(op, "G", G, APPROX_DTYPES)
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 0:
        fail(op, f"expected steps to be an int >= 0, got {steps!r}")


def cayley(S: Tensor) -> None:
    square("cayley", "S", S)


HALF_DTYPES = (torch.float16, torch.bfloat16)


def cayley_neumann(S: Tensor, terms: int, op: str = "cayley_neumann") -> None:
    if not isinstance(S, Tensor):
        fail(op, f"expected S to be a Tensor, got {type(S).__name__}")
    if S.dtype not in FLOAT_DTYPES + HALF_DTYPES:
        fail(op, f"expected S to be float32, float64, float16 or bfloat16, got {S.dtype}")
    if S.dim() < 2 or S.shape[-1] != S.shape[-2]:
        fail(op, f"expected S to be square [..., b, b], got shape {_shape(S)}")
    count(op, "terms", terms, MAX_TERMS, "the number of Neumann terms after I")


def cayley_neumann_backward(grad: Tensor, S: Tensor, terms: int, powers: Optional[Tensor] = None) -> None:
    """cayley_neumann_backward, or cayley_neumann_powers_backward with the forward's ``powers``
    [..., terms // 2, b, b] (the kernels read them for every block: a wrong shape would read past them)."""
    op = "cayley_neumann_backward" if powers is None else "cayley_neumann_powers_backward"
    cayley_neumann(S, terms, op)
    grad_like(op, grad, S.shape)
    same_device_dtype(op, "grad", grad, "S", S)
    if powers is None:
        return
    want = tuple(S.shape[:-2]) + (terms // 2,) + tuple(S.shape[-2:])
    if not isinstance(powers, Tensor) or tuple(powers.shape) != want:
        got = _shape(powers) if isinstance(powers, Tensor) else type(powers).__name__
        fail(op, f"expected powers of shape {list(want)}, got {got}")
    same_device_dtype(op, "powers", powers, "S", S)


def cayley_backward(grad: Tensor, Q: Tensor) -> None:
    op = "cayley_backward"
    square(op, "Q", Q)
    grad_like(op, grad, Q.shape)
    same_device_dtype(op, "grad", grad, "Q", Q)


def lowdin_backward(grad: Tensor, P: Tensor, R: Tensor) -> None:
    op = "lowdin_backward"
    _polar_input(op, P)
    if not isinstance(R, Tensor) or R.shape != P.shape:
        fail(op, f"expected R with the shape of P {_shape(P)}, got "
                 f"{_shape(R) if isinstance(R, Tensor) else type(R).__name__}")
    grad_like(op, grad, P.shape)
    same_device_dtype(op, "R", R, "P", P)
    same_device_dtype(op, "grad", grad, "P", P)


def lowdin_svd_backward(grad: Tensor, U: Tensor, S: Tensor, Vh: Tensor) -> None:
    op = "lowdin_svd_backward"
    _polar_input(op, U)
    n = U.shape[-1]
    for name, t, want in (("S", S, U.shape[:-2] + (n,)), ("Vh", Vh, U.shape[:-2] + (n, n))):
        if not isinstance(t, Tensor) or t.shape != want:
            fail(op, f"expected {name} of shape {list(want)} (lowdin_svd's factors of U {_shape(U)}), got "
                     f"{_shape(t) if isinstance(t, Tensor) else type(t).__name__}")
        same_device_dtype(op, name, t, "U", U)
    grad_like(op, grad, U.shape)
    same_device_dtype(op, "grad", grad, "U", U)


def block_apply(R: Tensor, X: Tensor, perm: Optional[Tensor]) -> None:
    op = "block_apply"
    if not isinstance(R, Tensor) or not isinstance(X, Tensor):
        fail(op, "expected R and X to be Tensors")
    if R.dtype not in FLOAT_DTYPES:
        fail(op, f"expected R to be float32 or float64, got {R.dtype}")
    if R.dim() != 3 or R.shape[-1] != R.shape[-2]:
        fail(op, f"expected R of shape [nb, b, b] (nb square blocks), got {_shape(R)}")
    if X.dim() < 1:
        fail(op, "expected X with at least 1 dimension [..., n], got a 0-d tensor")
    if X.device != R.device:
        fail(op, f"expected R and X on the same device, got {R.device} and {X.device}")
    if X.dtype != R.dtype and not (X.dtype in HALF_DTYPES and R.dtype == torch.float32):
        fail(op, f"expected X to have R's dtype {R.dtype} (or float16/bfloat16 with float32 R), got {X.dtype}")
    n, covered = X.shape[-1], R.shape[0] * R.shape[-1]
    if covered > n:
        fail(op, f"expected nb·b <= n, got R {_shape(R)} ({covered} coordinates) for X of shape {_shape(X)}")
    if perm is None:
        return
    if not isinstance(perm, Tensor) or perm.dtype != torch.int64 or perm.dim() != 1 or perm.numel() != n:
        got = f"{perm.dtype} of shape {_shape(perm)}" if isinstance(perm, Tensor) else type(perm).__name__
        fail(op, f"expected perm to be an int64 tensor of shape [{n}] (a permutation of X's last dim), got {got}")
    if perm.device != X.device:
        fail(op, f"expected perm on X's device {X.device}, got {perm.device}")
    if _has_values(perm) and perm.device.type == "cpu" and n and not bool(
            (torch.bincount(perm.clamp(0, n - 1), minlength=n) == 1).all() & (perm.min() >= 0) & (perm.max() < n)):
        fail(op, f"expected perm to be a permutation of 0..{n - 1} (every index exactly once)")


def _has_values(t: Tensor) -> bool:
    from torch._subclasses.fake_tensor import is_fake

    return not (torch.compiler.is_compiling() or is_fake(t) or t.device.type == "meta")


def gram_schmidt_backward(grad: Tensor, P: Tensor, Q: Tensor) -> None:
    op = "gram_schmidt_backward"
    grad_like(op, grad, Q.shape)
    if P.shape != Q.shape:
        fail(op, f"expected P and Q of the same shape, got P {_shape(P)} and Q {_shape(Q)}")
    same_device_dtype(op, "grad", grad, "Q", Q)
    same_device_dtype(op, "P", P, "Q", Q)
    float_matrix(op, "Q", Q)


_RANK_DEFICIENT = ("P is rank deficient (R = QᵀP has a zero diagonal entry), so Q is not a differentiable "
                   "function of P there and the gradient is undefined")


def finite_gradient(op: str, out: Tensor, *inputs: Tensor, why: str = _RANK_DEFICIENT) -> None:
    """A non-finite gradient from finite inputs means a point where the map is not differentiable (a
    rank-deficient P): raise ``why`` rather than hand back inf/NaN. Non-finite inputs are not an error:
    their NaN propagates. Skipped while tracing (fake tensors: torch.compile, AOT autograd of the double
    backward) and under torch.func's transforms, where there are no plain values to test."""
    if torch.compiler.is_compiling() or out.device.type == "meta" or is_fake(out):
        return
    if torch._C._are_functorch_transforms_active():   # values are per-sample there (vmap): no .item()
        return
    if math.isfinite(out.sum().item()) or bool(torch.isfinite(out).all()):   # one reduction, the usual case
        return
    if all(bool(torch.isfinite(t).all()) for t in inputs):
        fail(op, why)


SINGULAR_POLAR = ("P is singular (a zero singular value), where its polar factor is not unique and not "
                  "differentiable: the gradient is undefined")


def grad_like(op: str, grad: Tensor, out_shape) -> None:
    """Backward ops: the incoming gradient has the forward output's shape."""
    if grad.shape != out_shape:
        fail(op, f"expected grad of shape {list(out_shape)}, got {_shape(grad)}")
