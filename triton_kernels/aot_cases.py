"""The calls the ahead-of-time compile check (aot.py, scripts/check_gpu_compile.sh) makes, per target.

Each case calls the real launchers on CPU tensors for every size × dtype it lists; whatever kernels they
launch get compiled for the target and checked. The sizes span the supported range where the launch
configuration or Triton's specialisation changes: d = 1 (sizes specialised to 1), small tiles aligned
and not (32, 27), large tiles not aligned and aligned (100, 1024), and a batch beyond the 65535 programs
of a grid's y axis.

Adding a kernel (e.g. for a new op) takes two things here:

    register_kernel(my_module._my_kernel, "OUT")          # the @triton.jit kernel and the args it writes

    @case("my_op", sizes=D_RANGE, dtypes=(F32, F64))
    def _my_op(d, dtype):
        my_module.my_op(torch.randn(2, d, d, dtype=dtype))  # the launcher, as a user calls it

The stub zero-fills the registered outputs at each launch (no kernel runs): write the case so that the
launcher's data-dependent branches (convergence loops, certificates) reach every kernel on zeros, as the
lowdin cases below do. A launcher that reads a tuning table per GPU should be called once per entry.
"""
import contextlib

import torch

from . import block_apply as BA
from . import cayley_neumann as CN
from . import cayley_neumann_resident as CNR
from . import lowdin as L
from . import matmul as MM
from .aot_registry import case, register_kernel

F32, F64, BF16, F16 = torch.float32, torch.float64, torch.bfloat16, torch.float16
D_RANGE = (1, 27, 32, 100, 1024)

register_kernel(MM.opt_fast_mm_kernel, "OUT", "PART")
register_kernel(CNR.opt_fast_cn_forward_kernel, "R", "POW", "WS")
register_kernel(CNR.opt_fast_cn_backward_kernel, "OUT", "WS")
register_kernel(BA.opt_fast_block_apply_kernel, "Y")
register_kernel(BA.opt_fast_block_grad_r_kernel, "OUT")


@contextlib.contextmanager
def f32_precision(prec: str):
    old = MM.F32_PRECISION
    MM.F32_PRECISION = prec
    try:
        yield
    finally:
        MM.F32_PRECISION = old


def _precisions(dtype):
    """float32 runs once per tl.dot precision a user can select (OPT_FAST_TRITON_F32_PRECISION)."""
    return MM.F32_PRECISIONS if dtype == F32 else ("ieee",)


# With zero-filled outputs the Gram matrices come back 0: the cold start measures ||0 - I|| (not
# converged), takes one measured step (whose Gram, 0 again, reads as converged); the warm start launches
# its certificate's products (skew(R0ᵀP) = 0 passes, sym(R0ᵀP) = 0 is not positive definite) and falls
# back to the cold start. Every kernel of each path is launched.

@case("lowdin", sizes=D_RANGE, dtypes=(F32, F64))
def _lowdin(d, dtype):
    P = torch.randn(2, d, d, dtype=dtype)
    for prec in _precisions(dtype):
        with f32_precision(prec):
            L.lowdin(P)               # converging mode, cold start
            L.lowdin(P, 2)            # fixed schedule
            L.lowdin(P, 0, P.mT)      # warm start (non-contiguous R0)


@case("lowdin_backward", sizes=D_RANGE, dtypes=(F32, F64))
def _lowdin_backward(d, dtype):
    P = torch.randn(2, d, d, dtype=dtype)
    for prec in _precisions(dtype):
        with f32_precision(prec):
            L.lowdin_backward(torch.randn_like(P), P, P)
            L.lowdin_backward(torch.ones(1, 1, 1, dtype=dtype).expand(2, d, d), P, P)   # stride-0 grad


@case("orthogonalize_approx", sizes=(1, 27, 100, 1024), dtypes=(F32,))
def _orthogonalize_approx(d, dtype):
    G = torch.randn(2, d, 2 * d + 1, dtype=dtype)
    L.orthogonalize_approx(G)             # bfloat16 products (the GPU default)
    L.orthogonalize_approx(G.mT)          # tall: iterates on the transpose
    for prec in MM.F32_PRECISIONS:
        with f32_precision(prec):
            L.orthogonalize_approx(G, lowp=False)


@case("lowdin batch 70000", sizes=(2,), dtypes=(F32,))
def _big_batch(d, dtype):
    P = torch.randn(70000, d, d, dtype=dtype)
    L.lowdin(P)
    L.lowdin_backward(P, P, P)


# Block sizes: 1 (specialised), 16 / 64 (divisible by 16), 27 / 100 (padded to 32 / 128), 200 (above the
# resident kernels: cayley_neumann's tiled path). terms: k = 0 and 2 (the even branches), 5 (the default,
# odd, h = 2: the backward recomputes the powers) and 6 (h = 3: the backward reads saved powers).
B_RANGE = (1, 16, 27, 64, 100, 200)


@case("cayley_neumann", sizes=B_RANGE, dtypes=(F32, F64, BF16))
def _cayley_neumann(b, dtype):
    S = torch.randn(3, b, b, dtype=dtype)
    for terms in (0, 2, 5, 6):
        CN.cayley_neumann(S, terms)
        _, powers = CN.cayley_neumann_powers(S, terms)
        CN.cayley_neumann_backward(S, S, terms)
        CN.cayley_neumann_powers_backward(S, S, powers, terms)


@case("block_apply", sizes=(1, 16, 27, 64, 100), dtypes=(F32, F64, BF16, F16))
def _block_apply(b, dtype):
    rdtype = dtype if dtype in (F32, F64) else F32      # half X runs with float32 R
    R = torch.randn(3, b, b, dtype=rdtype)
    X = torch.randn(5, 3 * b + 2, dtype=dtype)          # two columns of identity remainder
    perm = torch.randperm(X.shape[-1])
    for prec in _precisions(rdtype):
        with f32_precision(prec):
            for p in (None, perm):
                BA.block_apply(R, X, p)
                BA.block_apply_backward(X, R, X, p)
