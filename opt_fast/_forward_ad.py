"""Forward-mode AD (``torch.func.jvp``, ``torch.autograd.forward_ad``, ``torch.func.jacfwd``'s tangents) for
every opt_fast op.

torch runs a custom op's autograd kernel on forward-AD dual tensors as on plain ones: without a rule of its
own the output carries no tangent, which ``jvp`` reads as zero, silently. ``register_autograd`` below
therefore installs each op's Autograd kernel itself. Without tangents it is exactly what
``torch.library.register_autograd`` installs (the op's backward formula, no extra cost). With a tangent on
any input, the output's value comes from the op's own kernel (below autograd) and its derivatives from the
op's pure-PyTorch reference run in float64, a composition of torch ops that carry their own forward and
reverse derivatives:

    out = kernel(x) + (ref64(x) - ref64(x).detach()).to(dtype)

The bracket is exactly zero, so ``out`` is bit-for-bit the kernel's result; forward AD sees ref64's tangent,
and reverse mode from such an output (a dual input that also requires grad) runs through ref64's ops, so
the jvp of a gradient (Hessian-vector products) is exact too. A backward op reached with a tangent (a
gradient's tangent flowing into it) is served the same way, by its own reference. float64 keeps the
tangent's error at float32's rounding when the op runs in float32.

Per op, the differentiable stand-in is its reference except where that would not differentiate to the op's
derivative (``_STAND_INS``): lowdin's reference stops on the orthogonality of its iterate, not on the
tangent's convergence, but in float64 the tangent is then accurate to ~1e-13 (measured against the SVD
formula, d = 2..100); the warm start R0 is left out (an accepted R0 would make the output independent of P).
Outputs marked non-differentiable (lowdin_svd's U, S, Vh) carry no tangent, as they get no gradient.
"""
from typing import Callable, Optional, Tuple

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor, _C
from torch._library.autograd import Info, make_autograd_impl

from .reference import REFERENCE_KERNELS
from .reference.cayley_neumann import cayley_neumann_ref
from .reference.lowdin import lowdin_ref

__all__ = ["register_autograd", "has_tangent"]


def has_tangent(*args) -> bool:
    """True if a Tensor among ``args`` carries a forward-AD tangent (cheap outside a dual level)."""
    if fwAD._current_level < 0:
        return False
    return any(isinstance(a, Tensor) and fwAD.unpack_dual(a).tangent is not None for a in args)


def _lowdin(P, iters=0, R0=None):
    return lowdin_ref(P)  # the polar factor, whose derivative the op's backward uses for every iters / R0


def _lowdin_svd(P):
    return lowdin_ref(P), None, None, None  # only R is differentiable


def _cayley_neumann_powers(S, terms=5):
    return cayley_neumann_ref(S, terms), None  # the powers are non-differentiable (for the backward)


# op -> a function of the op's arguments whose derivatives are the op's (None: an output without one)
_STAND_INS = {"lowdin": _lowdin, "lowdin_svd": _lowdin_svd, "cayley_neumann_powers": _cayley_neumann_powers}


def _stand_in(op: str) -> Optional[Callable]:
    return _STAND_INS.get(op, REFERENCE_KERNELS.get(op))


def _upcast(a):
    if isinstance(a, Tensor) and a.dtype in (torch.float16, torch.bfloat16, torch.float32):
        return a.double()
    return a


def _dual_call(op: str, overload, keyset, args: Tuple, kwargs):
    stand_in = _stand_in(op)
    if stand_in is None:
        raise RuntimeError(f"opt_fast.{op}: forward-mode AD (a tangent on an input) is not supported by this op")
    with _C._AutoDispatchBelowAutograd():
        value = overload.redispatch(keyset & _C._after_autograd_keyset, *args, **kwargs)
    ref = stand_in(*(_upcast(a) for a in args), **kwargs)
    if not isinstance(value, tuple):
        return value + (ref - ref.detach()).to(value.dtype)
    return tuple(v if r is None else v + (r - r.detach()).to(v.dtype) for v, r in zip(value, ref))


def register_autograd(op: str, backward: Callable, setup_context: Callable, lib) -> None:
    """``torch.library.register_autograd(f"opt_fast::{op}", backward, setup_context=...)`` plus forward AD."""
    overload = getattr(torch.ops.opt_fast, op).default
    reverse = make_autograd_impl(overload, Info(backward, setup_context))

    def autograd_kernel(keyset, *args, **kwargs):
        if has_tangent(*args):
            return _dual_call(op, overload, keyset, args, kwargs)
        return reverse(keyset, *args, **kwargs)

    lib.impl(op, autograd_kernel, "Autograd", with_keyset=True)
