"""Bad input raises a RuntimeError that names the op and what it expected, on every path: torch.ops on
CPU (the C++ kernel for cayley when built, else the reference), the reference function called directly,
and meta tensors (the fake kernels torch.compile uses)."""
from typing import Callable, NamedTuple, Tuple

import pytest
import torch

import opt_fast
import opt_fast.reference as reference

ops = torch.ops.opt_fast
PATHS = ("ops", "ref", "meta")


class Case(NamedTuple):
    op: str
    id: str
    make: Callable[[], tuple]  # builds the arguments (at run time)
    match: str                 # regex for the message after "opt_fast.<op>: "
    paths: Tuple[str, ...] = PATHS


def rn(*s):
    return torch.randn(*s)


def i64(*s):
    return torch.randint(0, 5, s)


def f16(*s):
    return torch.randn(*s).half()


def meta(*s):
    return torch.randn(*s, device="meta")


NOT_META = ("ops", "ref")  # inputs that only make sense with real tensors (mixed devices, values)

DIMS = "to have at least 2 dimensions"
FLOAT = "to be float32 or float64"

CASES = [
    # householder_product(V [..., m, n], tau [..., k])
    Case("householder_product", "V-1d", lambda: (rn(4), torch.rand(2)), f"expected V {DIMS}"),
    Case("householder_product", "tau-0d", lambda: (rn(4, 3), torch.tensor(0.5)),
         "expected tau to be a Tensor with at least 1 dimension"),
    Case("householder_product", "m<n", lambda: (rn(3, 5), torch.rand(3)), r"expected V \[\.\.\., m, n\] with m >= n"),
    Case("householder_product", "k>n", lambda: (rn(5, 3), torch.rand(4)), r"expected k = tau\.shape\[-1\] <= n"),
    Case("householder_product", "batch-mismatch", lambda: (rn(2, 5, 3), torch.rand(3, 3)),
         "expected V and tau to have the same batch dimensions"),
    Case("householder_product", "batch-missing", lambda: (rn(2, 5, 3), torch.rand(3)),
         "expected V and tau to have the same batch dimensions"),
    Case("householder_product", "int64", lambda: (i64(5, 3), i64(3)), f"expected V {FLOAT}"),
    Case("householder_product", "float16", lambda: (f16(5, 3), f16(3)), f"expected V {FLOAT}"),
    Case("householder_product", "dtype-mismatch", lambda: (rn(5, 3), torch.rand(3, dtype=torch.float64)),
         "expected V and tau to have the same dtype"),
    Case("householder_product", "mixed-device", lambda: (rn(5, 3), meta(3)), "expected V and tau on the same device",
         NOT_META),
    # householder_orthogonal(V [..., d, k])
    Case("householder_orthogonal", "1d", lambda: (rn(4),), f"expected V {DIMS}"),
    Case("householder_orthogonal", "k>d", lambda: (rn(3, 5),), r"expected V \[\.\.\., d, k\] with k <= d"),
    Case("householder_orthogonal", "int64", lambda: (i64(4, 2),), f"expected V {FLOAT}"),
    Case("householder_orthogonal", "float16", lambda: (f16(4, 2),), f"expected V {FLOAT}"),
    # householder_apply(V [..., d, k], X [..., d, n])
    Case("householder_apply", "V-1d", lambda: (rn(4), rn(4, 3)), f"expected V {DIMS}"),
    Case("householder_apply", "X-1d", lambda: (rn(4, 2), rn(4)), f"expected X {DIMS}"),
    Case("householder_apply", "k>d", lambda: (rn(3, 5), rn(3, 2)), r"expected V \[\.\.\., d, k\] with k <= d"),
    Case("householder_apply", "d-mismatch", lambda: (rn(4, 2), rn(5, 3)),
         r"expected X \[\.\.\., d, n\] with d = V\.shape\[-2\] = 4"),
    Case("householder_apply", "batch-mismatch", lambda: (rn(2, 4, 2), rn(3, 4, 3)),
         "expected V and X to have the same batch dimensions"),
    Case("householder_apply", "int64", lambda: (i64(4, 2), i64(4, 3)), f"expected V {FLOAT}"),
    Case("householder_apply", "X-int64", lambda: (rn(4, 2), i64(4, 3)), f"expected X {FLOAT}"),
    Case("householder_apply", "float16", lambda: (f16(4, 2), f16(4, 3)), f"expected V {FLOAT}"),
    Case("householder_apply", "dtype-mismatch", lambda: (rn(4, 2), rn(4, 3).double()),
         "expected V and X to have the same dtype"),
    Case("householder_apply", "mixed-device", lambda: (rn(4, 2), meta(4, 3)), "expected V and X on the same device",
         NOT_META),
    # gram_schmidt(P [..., m, n], block_size)
    Case("gram_schmidt", "1d", lambda: (rn(4), 0), f"expected P {DIMS}"),
    Case("gram_schmidt", "wide", lambda: (rn(3, 5), 0), r"expected P \[\.\.\., m, n\] with m >= n"),
    Case("gram_schmidt", "int64", lambda: (i64(4, 4), 0), f"expected P {FLOAT}"),
    Case("gram_schmidt", "float16", lambda: (f16(4, 4), 0), f"expected P {FLOAT}"),
    Case("gram_schmidt", "block_size<0", lambda: (rn(4, 4), -1), "expected block_size >= 0"),
    # lowdin(P [..., d, d], iters, R0)
    Case("lowdin", "1d", lambda: (rn(4), 0, None), f"expected P {DIMS}"),
    Case("lowdin", "wide", lambda: (rn(3, 5), 0, None), r"expected P \[\.\.\., m, n\] with m >= n \(for wide P"),
    Case("lowdin", "int64", lambda: (i64(4, 4), 0, None), f"expected P {FLOAT}"),
    Case("lowdin", "float16", lambda: (f16(4, 4), 0, None), f"expected P {FLOAT}"),
    Case("lowdin", "iters<0", lambda: (rn(4, 4), -1, None), "expected iters >= 0"),
    Case("lowdin", "R0-shape", lambda: (rn(3, 3), 0, rn(4, 4)), r"expected R0 with the shape of P \[3, 3\]"),
    Case("lowdin", "R0-batch", lambda: (rn(2, 3, 3), 0, rn(3, 3)), r"expected R0 with the shape of P \[2, 3, 3\]"),
    Case("lowdin", "R0-tall", lambda: (rn(3, 3), 0, rn(4, 3)), r"expected R0 with the shape of P \[3, 3\]"),
    Case("lowdin", "R0-1d", lambda: (rn(5, 3), 0, rn(3)), f"expected R0 {DIMS}"),
    Case("lowdin", "R0-int64", lambda: (rn(3, 3), 0, i64(3, 3)), f"expected R0 {FLOAT}"),
    Case("lowdin", "R0-dtype", lambda: (rn(3, 3), 0, rn(3, 3).double()), "expected P and R0 to have the same dtype"),
    Case("lowdin", "R0-mixed-device", lambda: (rn(3, 3), 0, meta(3, 3)), "expected P and R0 on the same device",
         NOT_META),
    # cayley(S [..., d, d])
    Case("cayley", "1d", lambda: (rn(4),), f"expected S {DIMS}"),
    Case("cayley", "0d", lambda: (torch.tensor(0.5),), f"expected S {DIMS}"),
    Case("cayley", "non-square", lambda: (rn(3, 4),), r"expected S to be square \[\.\.\., d, d\]"),
    Case("cayley", "batch-non-square", lambda: (rn(2, 3, 4),), r"expected S to be square \[\.\.\., d, d\]"),
    Case("cayley", "int64", lambda: (i64(3, 3),), f"expected S {FLOAT}"),
    Case("cayley", "float16", lambda: (f16(3, 3),), f"expected S {FLOAT}"),
    Case("cayley", "I-S-singular", lambda: (torch.eye(3),), "I - S is singular", NOT_META),
]


def _to_meta(args):
    return tuple(a.to("meta") if isinstance(a, torch.Tensor) else a for a in args)


def _call(op, path, args):
    if path == "ref":
        return getattr(reference, op + "_ref")(*args)
    if path == "meta":
        args = _to_meta(args)
    return getattr(ops, op)(*args)


def _params():
    for c in CASES:
        for path in c.paths:
            yield pytest.param(c, path, id=f"{c.op}-{c.id}-{path}")


@pytest.mark.parametrize("case,path", list(_params()))
def test_bad_input_raises(case, path):
    """A RuntimeError starting "opt_fast.<op>: expected ..." (the C++ kernel serves cayley on CPU)."""
    args = case.make()
    with pytest.raises(RuntimeError, match=rf"opt_fast\.{case.op}: {case.match}") as info:
        _call(case.op, path, args)
    assert str(info.value).startswith(f"opt_fast.{case.op}: ")


def test_cayley_ops_path_is_the_cpp_kernel_when_built():
    """The "ops" cases of cayley above exercise the C++ kernel whenever the extension is loaded."""
    expected = "C++" if opt_fast.has_kernel("cayley", "CPU") else "reference"
    assert opt_fast.kernel_for("cayley", "cpu") == expected
    if opt_fast._backends.ext_error is None and not opt_fast._backends.env_flag("OPT_FAST_DISABLE_EXT"):
        assert expected == "C++"


# ---- backward ops: grad of the wrong shape ---------------------------------------------------------

def _backward_cases():
    V, tau = torch.randn(5, 3), torch.rand(3)
    W, X = torch.randn(4, 2), torch.randn(4, 3)
    P = torch.randn(4, 4) + 3 * torch.eye(4)
    S = torch.randn(4, 4)
    S = S - S.mT
    return {
        "householder_product_backward": ((rn(5, 2), V, tau), r"\[5, 3\]"),
        "householder_orthogonal_backward": ((rn(4, 2), W), r"\[4, 4\]"),
        "householder_apply_backward": ((rn(4, 2), W, X), r"\[4, 3\]"),
        "gram_schmidt_backward": ((rn(4, 3), P, ops.gram_schmidt(P, 0)), r"\[4, 4\]"),
        "lowdin_backward": ((rn(4, 3), P, ops.lowdin(P, 0, None)), r"\[4, 4\]"),
        "cayley_backward": ((rn(3, 3), ops.cayley(S)), r"\[4, 4\]"),
    }


BACKWARD_OPS = ["householder_product_backward", "householder_orthogonal_backward", "householder_apply_backward",
                "gram_schmidt_backward", "lowdin_backward", "cayley_backward"]


@pytest.mark.parametrize("path", ["ops", "ref"])
@pytest.mark.parametrize("op", BACKWARD_OPS)
def test_backward_bad_grad_shape(op, path):
    """<op>_backward with a grad whose shape is not the forward output's says which shape it expected."""
    args, shape = _backward_cases()[op]
    fn = getattr(reference, op + "_ref") if path == "ref" else getattr(ops, op)
    with pytest.raises(RuntimeError, match=rf"opt_fast\.{op}: expected grad of shape {shape}") as info:
        fn(*args)
    assert str(info.value).startswith(f"opt_fast.{op}: ")
