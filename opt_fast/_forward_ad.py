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
With iters > 0 from a cold start the op is that many steps, not the polar factor yet: their own derivative.
Under torch.func's transforms (vmap of jvp / jacfwd) a stand-in may not branch on values: lowdin's then runs
its whole step budget instead of stopping on a measured error, and cayley's is the bare 2 (I − S)⁻¹ − I.
Outputs marked non-differentiable (lowdin_svd's U, S, Vh) carry no tangent, as they get no gradient.

Reverse mode under torch.func transforms (``grad``, ``vjp``, ``jacrev``, ``functional_call`` + ``grad``)
goes through an ``autograd.Function`` with a separate ``setup_context`` (which functorch requires and the
Function ``torch.library.register_autograd`` generates lacks), with the same context and backward as above.
It is used only under a grad transform, so plain autograd keeps torch's own path.
"""
from typing import Callable, Optional, Tuple

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor, _C
from torch.autograd.forward_ad import _set_fwd_grad_enabled
from torch._C._functorch import TransformType
from torch._functorch.autograd_function import enable_single_level_autograd_function
from torch._functorch.pyfunctorch import retrieve_current_functorch_interpreter
from torch._library import utils as _library_utils
from torch._library.autograd import Info, make_autograd_impl

from .reference import REFERENCE_KERNELS
from .reference.cayley_neumann import cayley_neumann_ref
from .reference import lowdin as _lowdin_ref_module
from .reference.lowdin import lowdin_ref, warm_start_accepted

_POLAR_STEPS = len(_lowdin_ref_module._SCHEDULE) + _lowdin_ref_module._TAIL_STEPS

__all__ = ["register_autograd", "has_tangent"]


def values_readable() -> bool:
    """False while torch.compile traces or under torch.func's transforms: no branching on tensor values."""
    return not (torch.compiler.is_compiling() or _C._are_functorch_transforms_active())


def has_tangent(*args) -> bool:
    """True if a Tensor among ``args`` carries a forward-AD tangent (cheap outside a dual level)."""
    if fwAD._current_level < 0:
        return False
    return any(isinstance(a, Tensor) and fwAD.unpack_dual(a).tangent is not None for a in args)


def _lowdin(P, iters=0, R0=None):
    # iters = 0: the polar factor, whose derivative the op's backward uses for every R0; else those steps.
    # Under torch.func's transforms (vmap of jvp / jacfwd) nothing may branch on values: the converging
    # loop's stopping rule is replaced by its whole step budget (the polar factor of any P it converges on)
    if iters == 0 and not values_readable():
        return lowdin_ref(P, _POLAR_STEPS)
    return lowdin_ref(P) if iters == 0 or warm_start_accepted(P, R0) else lowdin_ref(P, iters)


def _cayley(S):
    # 2 (I − S)⁻¹ − I, the reference's formula without its value checks (the op raises or gives NaN itself)
    eye = torch.eye(S.shape[-1], dtype=S.dtype, device=S.device)
    return 2.0 * torch.linalg.inv(eye - S) - eye


def _lowdin_svd(P):
    return _lowdin(P), None, None, None  # only R is differentiable


def _cayley_neumann_powers(S, terms=5):
    return cayley_neumann_ref(S, terms), None  # the powers are non-differentiable (for the backward)


# op -> a function of the op's arguments whose derivatives are the op's (None: an output without one)
_STAND_INS = {"lowdin": _lowdin, "lowdin_svd": _lowdin_svd, "cayley_neumann_powers": _cayley_neumann_powers,
              "cayley": _cayley}


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


def _functorch_function(op: str, overload, backward: Callable, setup_context: Callable):
    """The op's autograd as an ``autograd.Function`` that torch.func's grad transform accepts. It is applied
    inside the dispatcher at the transform's level (as ATen's autograd kernels record there) and its forward
    is the op below autograd at that level; the levels below get the grad mode they had when this one began
    (nested grad records there too) and forward AD back on (jvp / jacfwd over grad see their tangents)."""
    schema = overload._schema

    def forward(*args):
        *args, keyset, grad_mode = args
        with _C._AutoDispatchBelowAutograd(), torch.set_grad_enabled(grad_mode), _set_fwd_grad_enabled(True):
            return overload.redispatch(keyset & _C._after_autograd_keyset, *args)

    def setup(ctx, inputs, output):
        # the dispatcher drops arguments equal to their defaults; the op's setup_context reads them all
        setup_context(ctx, _library_utils.fill_defaults(schema, inputs[:-2], {})[0], output)

    def bw(ctx, *grads):
        result = backward(ctx, *grads)
        return (*result, None, None) if isinstance(result, tuple) else (result, None, None)

    return type(f"{op}_functorch", (torch.autograd.function._SingleLevelFunction,), {
        "forward": staticmethod(forward), "setup_context": staticmethod(setup), "backward": staticmethod(bw)})


def _grad_transform():
    """The innermost torch.func transform if it is a grad-type one (grad, vjp, jacrev), else None."""
    if not _C._are_functorch_transforms_active():
        return None
    interpreter = retrieve_current_functorch_interpreter()
    return interpreter if interpreter.key() == TransformType.Grad else None


def register_autograd(op: str, backward: Callable, setup_context: Callable, lib) -> None:
    """``torch.library.register_autograd(f"opt_fast::{op}", backward, setup_context=...)`` plus forward AD
    and torch.func's reverse-mode transforms."""
    overload = getattr(torch.ops.opt_fast, op).default
    reverse = make_autograd_impl(overload, Info(backward, setup_context))
    functorch = _functorch_function(op, overload, backward, setup_context)

    def autograd_kernel(keyset, *args, **kwargs):
        if has_tangent(*args):
            return _dual_call(op, overload, keyset, args, kwargs)
        transform = _grad_transform() if _C.is_grad_enabled() and not kwargs else None
        if transform is not None and _C._any_requires_grad(*args):
            # (autograd.Function.apply would re-enter the transforms from the top: a single-level apply)
            with enable_single_level_autograd_function():
                return functorch.apply(*args, keyset, transform.prev_grad_mode())
        return reverse(keyset, *args, **kwargs)

    lib.impl(op, autograd_kernel, "Autograd", with_keyset=True)
