"""Attach kernels to the schemas of ``_ops``, in this order:

1. the reference kernels as CompositeExplicitAutograd: the fallback for every device;
2. fake kernels (shapes, dtypes and the same input checks) for torch.compile / meta tensors;
3. autograd formulas whose backward calls ``torch.ops.opt_fast.<op>_backward``, so that a fast backward
   kernel is used whenever one is registered; the backward ops are differentiable too (double backward)
   through the vector-Jacobian product of their reference, which is written in differentiable torch ops;
   forward-mode AD (a tangent on an input) takes its derivatives from the references too, and torch.func's
   grad transforms get an autograd.Function they accept (_forward_ad.py); vmap has batching rules that make
   one batched call (3b, _vmap.py); under torch.autocast every op runs as called, with autocast off inside (3c);
4. the C++ extension ``opt_fast._C`` (CPU, and CUDA when built), unless ``OPT_FAST_DISABLE_EXT=1``;
5. Triton launchers for CUDA, for ops that have no C++ CUDA kernel (or ``OPT_FAST_CUDA_BACKEND=triton``),
   and functional.orthogonalize_approx's Triton kernel (``_backends.triton_approx``).
"""
import functools
import importlib.util
import logging
import os
import warnings

import torch

from . import _backends, _checks, _forward_ad, _triton_glue, _vmap
from ._ops import SCHEMAS, lib
from .reference import REFERENCE_KERNELS
from .reference.lowdin import warm_start_accepted

log = logging.getLogger("opt_fast")


def _contiguous_outputs(fn):
    # Outputs are always contiguous (LAPACK routines hand back column-major results), so that every kernel
    # and the fake kernels agree on strides; and plain tensors, not tracked views of the kernel's own
    # tensors (run below ADInplaceOrView, as the C++ kernels: callers may modify them in place).
    @functools.wraps(fn)
    def wrapper(*args):
        with torch._C._AutoDispatchBelowADInplaceOrView():
            out = fn(*args)
        if isinstance(out, tuple):
            return tuple(o.contiguous() for o in out)
        return out.contiguous()
    return wrapper


# ---- 1. references ----------------------------------------------------------------------------------
for _name, _fn in REFERENCE_KERNELS.items():
    lib.impl(_name, _contiguous_outputs(_fn), "CompositeExplicitAutograd")


# ---- 2. fake kernels --------------------------------------------------------------------------------
def _empty(like, shape):
    return like.new_empty(tuple(shape))


@torch.library.register_fake("opt_fast::householder_product", lib=lib)
def _householder_product_fake(V, tau):
    _checks.householder_product(V, tau)
    return _empty(V, V.shape)


@torch.library.register_fake("opt_fast::householder_product_backward", lib=lib)
def _householder_product_backward_fake(grad, V, tau):
    return _empty(V, V.shape), _empty(tau, tau.shape)


@torch.library.register_fake("opt_fast::householder_orthogonal", lib=lib)
def _householder_orthogonal_fake(V):
    _checks.householder_orthogonal(V)
    return _empty(V, V.shape[:-1] + (V.shape[-2],))


@torch.library.register_fake("opt_fast::householder_orthogonal_backward", lib=lib)
def _householder_orthogonal_backward_fake(grad, V):
    return _empty(V, V.shape)


@torch.library.register_fake("opt_fast::householder_apply", lib=lib)
def _householder_apply_fake(V, X):
    _checks.householder_apply(V, X)
    return _empty(X, X.shape)


@torch.library.register_fake("opt_fast::householder_apply_backward", lib=lib)
def _householder_apply_backward_fake(grad, V, X):
    return _empty(V, V.shape), _empty(X, X.shape)


@torch.library.register_fake("opt_fast::gram_schmidt", lib=lib)
def _gram_schmidt_fake(P, block_size=0):
    _checks.gram_schmidt(P, block_size)
    return _empty(P, P.shape)


@torch.library.register_fake("opt_fast::gram_schmidt_backward", lib=lib)
def _gram_schmidt_backward_fake(grad, P, Q):
    return _empty(P, P.shape)


@torch.library.register_fake("opt_fast::lowdin", lib=lib)
def _lowdin_fake(P, iters=0, R0=None):
    _checks.lowdin(P, iters, R0)
    return _empty(P, P.shape)


@torch.library.register_fake("opt_fast::lowdin_backward", lib=lib)
def _lowdin_backward_fake(grad, P, R):
    _checks.lowdin_backward(grad, P, R)
    return _empty(P, P.shape)


@torch.library.register_fake("opt_fast::lowdin_svd", lib=lib)
def _lowdin_svd_fake(P):
    _checks.lowdin_svd(P)
    n = P.shape[-1]
    return _empty(P, P.shape), _empty(P, P.shape), _empty(P, P.shape[:-2] + (n,)), _empty(P, P.shape[:-2] + (n, n))


@torch.library.register_fake("opt_fast::lowdin_svd_backward", lib=lib)
def _lowdin_svd_backward_fake(grad, U, S, Vh):
    _checks.lowdin_svd_backward(grad, U, S, Vh)
    return _empty(U, U.shape)


@torch.library.register_fake("opt_fast::cayley", lib=lib)
def _cayley_fake(S):
    _checks.cayley(S)
    return _empty(S, S.shape)


@torch.library.register_fake("opt_fast::cayley_backward", lib=lib)
def _cayley_backward_fake(grad, Q):
    _checks.cayley_backward(grad, Q)
    return _empty(Q, Q.shape)


@torch.library.register_fake("opt_fast::cayley_neumann", lib=lib)
def _cayley_neumann_fake(S, terms=5):
    _checks.cayley_neumann(S, terms)
    return _empty(S, S.shape)


@torch.library.register_fake("opt_fast::cayley_neumann_backward", lib=lib)
def _cayley_neumann_backward_fake(grad, S, terms):
    _checks.cayley_neumann_backward(grad, S, terms)
    return _empty(S, S.shape)


@torch.library.register_fake("opt_fast::cayley_neumann_powers", lib=lib)
def _cayley_neumann_powers_fake(S, terms=5):
    _checks.cayley_neumann(S, terms, op="cayley_neumann_powers")
    return _empty(S, S.shape), _empty(S, S.shape[:-2] + (terms // 2,) + S.shape[-2:])


@torch.library.register_fake("opt_fast::cayley_neumann_powers_backward", lib=lib)
def _cayley_neumann_powers_backward_fake(grad, S, powers, terms):
    _checks.cayley_neumann_backward(grad, S, terms, powers)
    return _empty(S, S.shape)


@torch.library.register_fake("opt_fast::block_apply", lib=lib)
def _block_apply_fake(R, X, perm=None):
    _checks.block_apply(R, X, perm)
    return _empty(X, X.shape)


@torch.library.register_fake("opt_fast::block_apply_backward", lib=lib)
def _block_apply_backward_fake(grad, R, X, perm):
    return _empty(R, R.shape), _empty(X, X.shape)


# ---- 3. autograd -----------------------------------------------------------------------------------
def _register_autograd(op, saved, backward):
    """``saved(inputs, output)`` picks the tensors to keep; ``backward(grad, *saved)`` returns input grads."""
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*saved(inputs, output))

    def bw(ctx, grad):
        return backward(grad, *ctx.saved_tensors)

    _forward_ad.register_autograd(op, bw, setup_context, lib)


_ops = torch.ops.opt_fast
_register_autograd("householder_product", lambda i, o: (i[0], i[1]),
                   lambda g, V, tau: tuple(_ops.householder_product_backward(g, V, tau)))
_register_autograd("householder_orthogonal", lambda i, o: (i[0],),
                   lambda g, V: _ops.householder_orthogonal_backward(g, V))
_register_autograd("householder_apply", lambda i, o: (i[0], i[1]),
                   lambda g, V, X: tuple(_ops.householder_apply_backward(g, V, X)))
_register_autograd("gram_schmidt", lambda i, o: (i[0], o),
                   lambda g, P, Q: (_ops.gram_schmidt_backward(g, P, Q), None))


def _polar_gradient(op, dP, grad, P):
    """A singular P gives a non-finite polar-factor gradient: an error on the CPU, as gram_schmidt's (on a GPU
    the test would synchronise with the host at every backward)."""
    if dP.device.type == "cpu":
        _checks.finite_gradient(op, dP, grad, P, why=_checks.SINGULAR_POLAR)
    return dP


def _lowdin_setup(ctx, inputs, output):
    P, iters, R0 = inputs
    ctx.iters = iters
    ctx.save_for_backward(P, output, R0 if iters else None)


def _lowdin_bw(ctx, grad):
    P, R, R0 = ctx.saved_tensors
    if ctx.iters and R0 is not None and not _forward_ad.values_readable():
        _checks.fail("lowdin", "the gradient of lowdin(P, iters > 0, R0) depends on whether R0 was taken as the warm "
                               "start, a decision on values that torch.compile and torch.func's transforms cannot "
                               "trace; use iters=0 (the polar factor: its gradient does not depend on R0) there")
    if ctx.iters == 0 or warm_start_accepted(P, R0):
        # the polar factor, whatever R0 (a starting guess, not a differentiable input)
        return _polar_gradient("lowdin", _ops.lowdin_backward(grad, P, R), grad, P), None, None
    # a fixed number of steps from a cold start need not reach the polar factor: the derivative of those
    # steps, through the reference's torch ops; rarely used, correct rather than fast
    _, vjp = torch.func.vjp(lambda P: REFERENCE_KERNELS["lowdin"](P, ctx.iters, R0), P)
    return vjp(grad)[0], None, None


_forward_ad.register_autograd("lowdin", _lowdin_bw, _lowdin_setup, lib)
_register_autograd("cayley", lambda i, o: (o,),
                   lambda g, Q: _ops.cayley_backward(g, Q))


def _lowdin_svd_setup(ctx, inputs, output):
    R, U, S, Vh = output
    ctx.mark_non_differentiable(U, S, Vh)  # only R is differentiable: the factors are for the backward
    ctx.save_for_backward(inputs[0], R, U, S, Vh)


def _lowdin_svd_bw(ctx, grad, *_):
    P, R, U, S, Vh = ctx.saved_tensors
    if torch.is_grad_enabled():
        # create_graph: the factors carry no graph back to P, so take lowdin_backward (differentiable
        # through its reference's VJP) rather than a silently incomplete second derivative
        return _polar_gradient("lowdin_svd", _ops.lowdin_backward(grad, P, R), grad, P)
    return _polar_gradient("lowdin_svd", _ops.lowdin_svd_backward(grad, U, S, Vh), grad, P)


_forward_ad.register_autograd("lowdin_svd", _lowdin_svd_bw, _lowdin_svd_setup, lib)



def _cayley_neumann_setup(ctx, inputs, output):
    ctx.terms = inputs[1]
    ctx.save_for_backward(inputs[0])


def _cayley_neumann_bw(ctx, grad):
    return _ops.cayley_neumann_backward(grad, ctx.saved_tensors[0], ctx.terms), None


_forward_ad.register_autograd("cayley_neumann", _cayley_neumann_bw, _cayley_neumann_setup, lib)


def _cayley_neumann_powers_setup(ctx, inputs, output):
    ctx.mark_non_differentiable(output[1])  # the powers are for the backward
    ctx.set_materialize_grads(False)         # no zero-filled [..., h, b, b] gradient for them (measured 2-3%)
    ctx.terms = inputs[1]
    ctx.save_for_backward(inputs[0], output[1])


def _cayley_neumann_powers_bw(ctx, grad, _):
    if grad is None:
        return None, None
    S, powers = ctx.saved_tensors
    if torch.is_grad_enabled():  # create_graph: the op whose double backward is defined
        return _ops.cayley_neumann_backward(grad, S, ctx.terms), None
    return _ops.cayley_neumann_powers_backward(grad, S, powers, ctx.terms), None


_forward_ad.register_autograd("cayley_neumann_powers", _cayley_neumann_powers_bw, _cayley_neumann_powers_setup, lib)


def _block_apply_setup(ctx, inputs, output):
    R, X, perm = (list(inputs) + [None])[:3]
    ctx.save_for_backward(R, X, perm)


def _block_apply_bw(ctx, grad):
    R, X, perm = ctx.saved_tensors
    grad_R, grad_X = _ops.block_apply_backward(grad, R, X, perm)
    return grad_R, grad_X, None


_forward_ad.register_autograd("block_apply", _block_apply_bw, _block_apply_setup, lib)


def _register_double_backward(op):
    """Autograd for ``<op>_backward``: the VJP of its pure-PyTorch reference (rarely used; correct first),
    with respect to its floating-point tensor arguments (ints, index tensors and None pass through)."""
    ref = REFERENCE_KERNELS[op]

    def setup_context(ctx, inputs, output):
        ctx.diff = [isinstance(a, torch.Tensor) and a.is_floating_point() for a in inputs]
        ctx.save_for_backward(*[a for a, d in zip(inputs, ctx.diff) if d])
        ctx.others = [None if d else a for a, d in zip(inputs, ctx.diff)]

    def bw(ctx, *grads):
        it = iter(ctx.saved_tensors)
        args = [next(it) if d else other for d, other in zip(ctx.diff, ctx.others)]
        where = [i for i, d in enumerate(ctx.diff) if d]

        def f(*diff_args):
            full = list(args)
            for i, a in zip(where, diff_args):
                full[i] = a
            return ref(*full)

        out, vjp_fn = torch.func.vjp(f, *[args[i] for i in where])
        outs = out if isinstance(out, tuple) else (out,)
        grads = tuple(torch.zeros_like(o) if g is None else g for g, o in zip(grads, outs))
        diff_grads = vjp_fn(grads if isinstance(out, tuple) else grads[0])
        result = [None] * len(args)
        for i, g in zip(where, diff_grads):
            result[i] = g
        return tuple(result)

    _forward_ad.register_autograd(op, bw, setup_context, lib)


for _name in REFERENCE_KERNELS:
    if _name.endswith("_backward"):
        _register_double_backward(_name)


# ---- 3b. vmap: one batched call instead of torch's per-sample fallback (_vmap.py) ---------------------
_vmap.register()


# ---- 3c. autocast ---------------------------------------------------------------------------------
# Under torch.autocast every op runs as called, with autocast off inside: the maps need float32 (or
# float64) to stay orthogonal, and block_apply already takes half activations with float32 blocks.
# Without an Autocast kernel, autocast falls through to the kernels and then casts the matmuls *inside*
# them (a wrong-dtype error against the kernels' float32 buffers, or a bfloat16 map).
def _autocast_off(name, device_type):
    op = getattr(torch.ops.opt_fast, name).default

    def kernel(*args, **kwargs):
        with torch.autocast(device_type, enabled=False):
            return op(*args, **kwargs)
    return kernel


for _name in SCHEMAS:
    for _key, _device in (("AutocastCPU", "cpu"), ("AutocastCUDA", "cuda")):
        lib.impl(_name, _autocast_off(_name, _device), _key)


# ---- 4. the C++ extension ---------------------------------------------------------------------------
def _load_extension():
    """Load opt_fast._C. A failure is a warning (visible by default), not a log line: a user on a machine
    where the extension should work (a CUDA user above all) would otherwise get the slow reference kernels
    without knowing. OPT_FAST_DISABLE_EXT=1 skips the load, and so the warning (the pure-Python install's
    opt-out); OPT_FAST_REQUIRE_EXT=1 makes the failure an ImportError (CI)."""
    if _backends.env_flag("OPT_FAST_DISABLE_EXT"):
        return
    try:
        if importlib.util.find_spec(f"{__package__}._C") is None:
            # Python's own message here, "cannot import name '_C' ... (most likely due to a circular
            # import)", sends users the wrong way
            raise ModuleNotFoundError(f"{__package__}._C is not built or not installed")
        from . import _C  # noqa: F401  (loading the library runs its TORCH_LIBRARY_IMPL registrars)
    except Exception as e:  # ImportError, or an undefined symbol from a torch mismatch
        _backends.ext_error = e
        if _backends.env_flag("OPT_FAST_REQUIRE_EXT"):
            raise ImportError(
                f"opt_fast: the C++ extension opt_fast._C failed to load ({e}) and OPT_FAST_REQUIRE_EXT=1; "
                "rebuild with `pip install --no-build-isolation .`") from e
        if isinstance(e, ModuleNotFoundError) and not _in_source_tree():
            # an install without the extension (OPT_FAST_NO_EXT=1) chose the references: no warning
            _backends.ext_error = ModuleNotFoundError("installed without the C++ extension (pure Python): every op "
                                                      "is served by its reference")
            return
        warnings.warn(
            f"opt_fast: the C++/CUDA extension opt_fast._C did not load ({e}); every op falls back to its "
            "pure-PyTorch reference kernel (correct, but slow; Triton kernels still serve CUDA where they "
            "exist). Rebuild against the installed torch with `pip install --no-build-isolation .`, or set "
            "OPT_FAST_DISABLE_EXT=1 to use the references without this warning.", RuntimeWarning)


def _in_source_tree() -> bool:
    """A checkout (setup.py beside the package), where a missing _C means a forgotten build."""
    return os.path.exists(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "setup.py"))


# ---- 5. Triton ------------------------------------------------------------------------------------
def _load_triton():
    try:
        from .triton_kernels import HAS_TRITON, LAUNCHERS
    except ImportError as e:
        log.info("opt_fast.triton_kernels not available (%s)", e)
        return
    if HAS_TRITON:
        from .triton_kernels.lowdin import orthogonalize_approx
        _backends.triton_approx = orthogonalize_approx
    force = os.environ.get("OPT_FAST_CUDA_BACKEND", "").lower() == "triton"
    for op, launcher in LAUNCHERS.items():
        if force or not _backends.has_kernel(op, "CUDA"):
            torch.library.register_kernel(f"opt_fast::{op}", "cuda", _triton_glue.cuda_kernel(op, launcher), lib=lib)
            _backends.triton_ops.add(op)


_load_extension()
_load_triton()
