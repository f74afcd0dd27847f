"""Gradients of every op through torch.ops.opt_fast: gradcheck in float64, and agreement with autograd
through the plain-PyTorch equivalent (tests/_refs.py)."""
import pytest
import torch

import opt_fast  # noqa: F401  (registers torch.ops.opt_fast)

from _refs import TORCH_EQUIV, skew

ops = torch.ops.opt_fast
F64 = torch.float64


def _randn(*shape):
    return torch.randn(*shape, dtype=F64)


def grad_case(op, case, d):
    """(tensors that get gradients, trailing non-differentiable args) for one op and case, float64.

    case: "square" (size d), "batch" (batch (2,) at a small size) or "tall" (m > n, k < n / k < d)."""
    eye = lambda n: torch.eye(n, dtype=F64)  # noqa: E731
    if op == "householder_product":
        m, n, k, b = {"square": (d, d, d, ()), "batch": (4, 3, 2, (2,)), "tall": (6, 4, 3, ())}[case]
        return [_randn(*b, m, n), 0.5 + torch.rand(*b, k, dtype=F64)], []
    if op == "householder_orthogonal":
        shape = {"square": (d, d), "batch": (2, 3, 3), "tall": (5, 3)}[case]
        return [_randn(*shape)], []
    if op == "householder_apply":
        sv, sx = {"square": ((d, d), (d, d)), "batch": ((2, 4, 2), (2, 4, 3)), "tall": ((5, 2), (5, 3))}[case]
        return [_randn(*sv), _randn(*sx)], []
    if op == "gram_schmidt":
        if case == "tall":
            return [_randn(6, 3)], [0]  # N(0,1) tall: full column rank
        b, n = ((2,), 3) if case == "batch" else ((), d)
        return [3 * eye(n) + _randn(*b, n, n)], [0]
    if op == "lowdin":
        if case == "tall":
            return [_randn(7, 3)], [0, None]  # N(0,1) tall: full column rank, orthonormal-column R
        b, n = ((2,), 3) if case == "batch" else ((), d)
        return [3 * eye(n) + _randn(*b, n, n)], [0, None]
    if op == "cayley":
        b, n = ((2,), 3) if case == "batch" else ((), d)
        return [0.3 * _randn(*b, n, n)], []  # general S: the op's gradient is the full one w.r.t. S
    raise ValueError(op)


GRADCHECK_CASES = [
    (op, case, d)
    for op in ("householder_product", "householder_orthogonal", "householder_apply", "gram_schmidt", "lowdin", "cayley")
    for case, d in [("square", 1), ("square", 3), ("square", 5), ("batch", 0), ("tall", 0)]
    if not (case == "tall" and op == "cayley")
]


def _param(op, case, d):
    # d = 1 cayley is the regression case of a C++ cayley_backward that wrote I + Q into Q itself.
    return pytest.param(op, case, d, id=f"{op}-{case}" + (f"-d{d}" if case == "square" else ""))


@pytest.mark.parametrize("op,case,d", [_param(*c) for c in GRADCHECK_CASES])
def test_gradcheck(op, case, d):
    """torch.autograd.gradcheck of the op's registered backward, float64."""
    tensors, extra = grad_case(op, case, d)
    tensors = [t.requires_grad_() for t in tensors]
    fn = getattr(ops, op)
    assert torch.autograd.gradcheck(lambda *ts: fn(*ts, *extra), tensors, eps=1e-6, atol=1e-6, rtol=1e-4)


def test_gradcheck_cayley_skew_param():
    """cayley through OPT-CP's parametrisation S = triu(P) − triu(P)ᵀ."""
    P = _randn(4, 4).requires_grad_()
    assert torch.autograd.gradcheck(lambda P: ops.cayley(skew(P)), [P])


def test_gradcheck_lowdin_warm_start():
    """R0 is a starting guess only: the gradient w.r.t. P is unchanged, and R0 gets none."""
    P = (3 * torch.eye(4, dtype=F64) + _randn(4, 4)).requires_grad_()
    R0 = TORCH_EQUIV["lowdin"](P.detach() + 0.05 * _randn(4, 4)).requires_grad_()
    assert torch.autograd.gradcheck(lambda P: ops.lowdin(P, 0, R0.detach()), [P])
    out = ops.lowdin(P, 0, R0)
    gP, gR0 = torch.autograd.grad(out.sum(), [P, R0], allow_unused=True)
    assert gR0 is None or not gR0.any()


@pytest.mark.parametrize("case,d", [("square", 5), ("batch", 0), ("tall", 0)], ids=["d5", "batch", "tall"])
@pytest.mark.parametrize("op", ["householder_product", "householder_orthogonal", "householder_apply",
                                "gram_schmidt", "lowdin", "cayley"])
def test_grad_matches_torch(op, case, d):
    """Input gradients equal those of autograd through the plain-PyTorch equivalent (householder_product,
    reflector loop, qr + sign, svd polar, solve), float64, for a random upstream gradient."""
    if case == "tall" and op == "cayley":
        case, d = "square", 8
    tensors, extra = grad_case(op, case, d)
    tensors = [t.requires_grad_() for t in tensors]
    out = getattr(ops, op)(*tensors, *extra)
    G = torch.randn_like(out)
    got = torch.autograd.grad(out, tensors, G)
    want = torch.autograd.grad(TORCH_EQUIV[op](*tensors, *extra), tensors, G)
    for name, g, w in zip("abc", got, want):
        assert g.shape == w.shape
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-10, msg=lambda m: f"{op} grad #{name}: {m}")


def _backward_args(op, layout):
    """Arguments of <op>_backward for d = 1 ("d1") or with every tensor transposed in storage ("mT")."""
    d = 1 if layout == "d1" else 4
    tensors, extra = grad_case(op, "square", d)
    out = getattr(ops, op)(*tensors, *extra)
    saved = {"gram_schmidt": [tensors[0], out], "lowdin": [tensors[0], out], "cayley": [out]}.get(op, tensors)
    args = [torch.randn_like(out), *saved]
    if layout == "mT":
        args = [a.mT.contiguous().mT if a.dim() >= 2 else a for a in args]
    return args


def _mutation_param(op, layout):
    return pytest.param(op, layout, id=f"{op}-{layout}")


@pytest.mark.parametrize(
    "op,layout",
    [_mutation_param(op, layout) for op in ("householder_product", "householder_orthogonal", "householder_apply",
                                             "gram_schmidt", "lowdin", "cayley") for layout in ("d1", "mT")],
)
def test_backward_op_leaves_inputs_alone(op, layout):
    """<op>_backward (schema: no mutation) leaves grad and the saved tensors unchanged, also for d = 1 and
    for inputs whose transpose is contiguous."""
    args = _backward_args(op, layout)
    before = [a.clone() for a in args]
    getattr(ops, op + "_backward")(*args)
    for i, (a, b) in enumerate(zip(args, before)):
        assert torch.equal(a, b), f"{op}_backward modified its input #{i}"
