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

# cayley_neumann(S [..., b, b], terms) and cayley_neumann_powers (the same checks, under its own name)
HALF_OK = "to be float32, float64, float16 or bfloat16"


def _dt(name):
    """A dtype as the Python checks (torch.float32) or the C++ kernels (Float) print it."""
    cpp = {"float32": "Float", "float64": "Double", "float16": "Half", "int64": "Long"}[name]
    return rf"(torch\.{name}|{cpp})"


for _op in ("cayley_neumann", "cayley_neumann_powers"):
    CASES += [
        Case(_op, "1d", lambda: (rn(4), 5), r"expected S to be square \[\.\.\., b, b\]"),
        Case(_op, "0d", lambda: (torch.tensor(0.5), 5), r"expected S to be square \[\.\.\., b, b\]"),
        Case(_op, "non-square", lambda: (rn(3, 4), 5), r"expected S to be square \[\.\.\., b, b\], got shape \[3, 4\]"),
        Case(_op, "batch-non-square", lambda: (rn(2, 3, 4), 5), r"expected S to be square .*\[2, 3, 4\]"),
        Case(_op, "int64", lambda: (i64(3, 3), 5), f"expected S {HALF_OK}, got {_dt('int64')}"),
        Case(_op, "complex", lambda: (rn(3, 3).to(torch.complex64), 5), f"expected S {HALF_OK}"),
        Case(_op, "terms<0", lambda: (rn(3, 3), -1), r"expected terms >= 0 .*got -1"),
    ]

# block_apply(R [nb, b, b], X [..., n], perm [n] int64 or None)
_PERM = r"expected perm to be an int64 tensor of shape \[6\]"
_NOT_PERM = r"expected perm to be a permutation of 0\.\.5 \(every index exactly once\)"
CASES += [
    Case("block_apply", "R-int64", lambda: (i64(2, 3, 3), rn(6), None), f"expected R {FLOAT}, got {_dt('int64')}"),
    Case("block_apply", "R-float16", lambda: (f16(2, 3, 3), f16(6), None), f"expected R {FLOAT}"),
    Case("block_apply", "R-2d", lambda: (rn(3, 3), rn(6), None), r"expected R of shape \[nb, b, b\].*got \[3, 3\]"),
    Case("block_apply", "R-4d", lambda: (rn(1, 2, 3, 3), rn(6), None), r"expected R of shape \[nb, b, b\]"),
    Case("block_apply", "R-non-square", lambda: (rn(2, 3, 2), rn(6), None),
         r"expected R of shape \[nb, b, b\] \(nb square blocks\), got \[2, 3, 2\]"),
    Case("block_apply", "X-0d", lambda: (rn(1, 1, 1), torch.tensor(1.0), None), "expected X with at least 1 dimension"),
    Case("block_apply", "X-dtype", lambda: (rn(2, 3, 3), rn(6).double(), None),
         rf"expected X to have R's dtype {_dt('float32')} \(or float16/bfloat16 with float32 R\), got {_dt('float64')}"),
    Case("block_apply", "X-half-R-f64", lambda: (rn(2, 3, 3).double(), f16(6), None),
         rf"expected X to have R's dtype {_dt('float64')}"),
    Case("block_apply", "X-int64", lambda: (rn(2, 3, 3), i64(6), None), "expected X to have R's dtype"),
    Case("block_apply", "nb*b>n", lambda: (rn(3, 3, 3), rn(4, 8), None),
         r"expected nb·b <= n, got R \[3, 3, 3\] \(9 coordinates\) for X of shape \[4, 8\]"),
    Case("block_apply", "perm-int32", lambda: (rn(2, 3, 3), rn(6), torch.randperm(6).int()), _PERM),
    Case("block_apply", "perm-float", lambda: (rn(2, 3, 3), rn(6), torch.randperm(6).float()), _PERM),
    Case("block_apply", "perm-2d", lambda: (rn(2, 3, 3), rn(6), torch.randperm(6).view(2, 3)), _PERM),
    Case("block_apply", "perm-length", lambda: (rn(2, 3, 3), rn(6), torch.randperm(7)), _PERM),
    Case("block_apply", "mixed-device", lambda: (rn(2, 3, 3), meta(6), None), "expected R and X on the same device",
         NOT_META),
    Case("block_apply", "perm-device", lambda: (rn(2, 3, 3), rn(6), torch.randperm(6, device="meta")),
         "expected perm on X's device cpu, got meta", NOT_META),
    Case("block_apply", "perm-duplicate", lambda: (rn(2, 3, 3), rn(6), torch.tensor([0, 1, 2, 3, 4, 4])),
         _NOT_PERM, NOT_META),
    Case("block_apply", "perm-out-of-range", lambda: (rn(2, 3, 3), rn(6), torch.tensor([0, 1, 2, 3, 4, 6])),
         _NOT_PERM, NOT_META),
    Case("block_apply", "perm-negative", lambda: (rn(2, 3, 3), rn(6), torch.tensor([-1, 1, 2, 3, 4, 5])),
         _NOT_PERM, NOT_META),
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

@pytest.mark.parametrize("path", ["ops", "ref"])
def test_block_backward_ops_bad_saved_inputs(path):
    """The backward ops check what they are handed besides grad: the powers' shape, grad's dtype, perm."""
    S = torch.randn(2, 4, 4)
    R, X = torch.randn(2, 3, 3), torch.randn(5, 6)
    get = (lambda op: getattr(reference, op + "_ref")) if path == "ref" else (lambda op: getattr(ops, op))
    with pytest.raises(RuntimeError, match=r"^opt_fast\.cayley_neumann_powers_backward: expected powers of shape "
                                           r"\[2, 2, 4, 4\], got \[2, 1, 4, 4\]"):
        get("cayley_neumann_powers_backward")(S, S, S.unsqueeze(1), 5)
    with pytest.raises(RuntimeError, match=rf"^opt_fast\.block_apply_backward: expected grad of dtype "
                                           rf"{_dt('float32')}, got {_dt('float64')}"):
        get("block_apply_backward")(X.double(), R, X, None)
    with pytest.raises(RuntimeError, match=r"^opt_fast\.block_apply: expected perm to be a permutation"):
        get("block_apply_backward")(X, R, X, torch.zeros(6, dtype=torch.int64))


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
        "cayley_neumann_backward": ((rn(2, 4, 4), S, 5), r"\[4, 4\]"),
        "cayley_neumann_powers_backward": ((rn(4, 3), S, ops.cayley_neumann_powers(S, 5)[1], 5), r"\[4, 4\]"),
        "block_apply_backward": ((rn(5, 6), rn(1, 3, 3), X.mT, None), r"\[3, 4\]"),
    }


BACKWARD_OPS = ["householder_product_backward", "householder_orthogonal_backward", "householder_apply_backward",
                "gram_schmidt_backward", "lowdin_backward", "cayley_backward", "cayley_neumann_backward",
                "cayley_neumann_powers_backward", "block_apply_backward"]


@pytest.mark.parametrize("path", ["ops", "ref"])
@pytest.mark.parametrize("op", BACKWARD_OPS)
def test_backward_bad_grad_shape(op, path):
    """<op>_backward with a grad whose shape is not the forward output's says which shape it expected."""
    args, shape = _backward_cases()[op]
    fn = getattr(reference, op + "_ref") if path == "ref" else getattr(ops, op)
    with pytest.raises(RuntimeError, match=rf"opt_fast\.{op}: expected grad of shape {shape}") as info:
        fn(*args)
    assert str(info.value).startswith(f"opt_fast.{op}: ")


# ---- backward ops: what they are handed besides grad (audit: a short powers tensor was read past its end) --

def _path_op(path, op):
    if path == "ref":
        return getattr(reference, op + "_ref")
    if path == "meta":
        return lambda *a: getattr(ops, op)(*(t.to("meta") if isinstance(t, torch.Tensor) else t for t in a))
    return getattr(ops, op)


def _saved_input_cases():
    S, G = 0.1 * torch.randn(6, 4, 4), torch.randn(6, 4, 4)
    P, R = torch.randn(5, 3), torch.randn(5, 3)
    U, sv, Vh = torch.randn(5, 3), torch.rand(3), torch.randn(3, 3)
    sq = torch.randn(3, 3)
    return [
        ("cayley_neumann_powers_backward", (G, S, torch.randn(1, 2, 4, 4), 5),
         r"expected powers of shape \[6, 2, 4, 4\], got \[1, 2, 4, 4\]"),
        ("cayley_neumann_powers_backward", (G, S, torch.randn(6, 2, 3, 3), 5), r"expected powers of shape"),
        ("cayley_neumann_powers_backward", (G, S, torch.randn(6, 2, 4, 4).double(), 5),
         "expected powers and S to have the same dtype"),
        ("cayley_neumann_powers_backward", (G, S, torch.randn(6, 0, 4, 4), -1), r"expected terms >= 0"),
        ("cayley_neumann_backward", (G, S, -1), r"expected terms >= 0 .*got -1"),
        ("cayley_neumann_backward", (G, S, 5000), r"expected terms >= 0 .* at most 1000, got 5000"),
        ("cayley_neumann_backward", (G.long(), S.long(), 5), "expected S to be float32, float64, float16 or bfloat16"),
        ("cayley_neumann_backward", (G.double(), S, 5), "expected grad and S to have the same dtype"),
        ("cayley_neumann_backward", (G[..., :3], S[..., :3], 5), r"expected S to be square"),
        ("cayley_backward", (sq.long(), sq.long()), "expected Q to be float32 or float64"),
        ("cayley_backward", (torch.randn(3, 4), torch.randn(3, 4)), r"expected Q to be square"),
        ("cayley_backward", (sq.double(), sq), "expected grad and Q to have the same dtype"),
        ("lowdin_backward", (R, P, torch.randn(3, 3)), r"expected R .*shape"),
        ("lowdin_backward", (R.long(), P, R), "expected grad and P to have the same dtype"),
        ("lowdin_svd_backward", (U, U, torch.rand(2), Vh), r"expected S of shape \[3\]"),
        ("lowdin_svd_backward", (U, U, sv, torch.randn(2, 3)), r"expected Vh of shape \[3, 3\]"),
    ]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("case", range(len(_saved_input_cases())))
def test_backward_ops_check_their_saved_inputs(path, case):
    op, args, match = _saved_input_cases()[case]
    if path == "meta" and any(isinstance(a, torch.Tensor) and not a.is_floating_point() for a in args):
        pytest.skip("integer inputs: the same check as the float ones (the meta path is about shapes)")
    with pytest.raises(RuntimeError, match=rf"^opt_fast\.{op}: {match}"):
        _path_op(path, op)(*args)


@pytest.mark.parametrize("path", ["ops", "ref", "functional"])
def test_count_arguments_take_numpy_ints_and_stop_at_their_caps(path):
    np = pytest.importorskip("numpy")
    S = 0.1 * torch.randn(2, 4, 4)
    fn = {"ops": ops.cayley_neumann, "ref": reference.cayley_neumann_ref,
          "functional": opt_fast.functional.cayley_neumann}[path]
    torch.testing.assert_close(fn(S, np.int64(3)), fn(S, 3))
    for bad, match in ((2**62, r"at most 1000, got 4611686018427387904"), (True, "got True")):
        if path == "ops" and bad is True:
            continue   # torch.ops takes a bool for an int argument itself (True == 1)
        with pytest.raises(RuntimeError, match=rf"^opt_fast\.cayley_neumann: expected terms >= 0 .*{match}"):
            fn(S, bad)
    lowdin = {"ops": ops.lowdin, "ref": reference.lowdin_ref, "functional": opt_fast.functional.lowdin}[path]
    with pytest.raises(RuntimeError, match=r"^opt_fast\.lowdin: expected iters >= 0 .*at most 1000, got 1001"):
        lowdin(torch.randn(3, 3), 1001)
