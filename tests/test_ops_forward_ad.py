"""Forward-mode AD through every torch.ops.opt_fast op (torch.func.jvp, torch.autograd.forward_ad):
tangents equal torch.func.jvp of the float64 reference and central differences, agree with the op's reverse
mode (<G, J t> = <Jᵀ G, t>), the primal output is the op's own, and forward-over-reverse (Hessian-vector
products) works; an op without a differentiable stand-in raises instead of returning a zero tangent."""
import pytest
import torch
import torch.autograd.forward_ad as fwAD

import opt_fast
from _refs import lapack_reflectors, skew
from opt_fast import _forward_ad
from opt_fast._ops import ALL_OPS
from opt_fast.reference import REFERENCE_KERNELS

ops = torch.ops.opt_fast
F64 = torch.float64


def _rn(*shape, seed):
    return torch.randn(*shape, dtype=F64, generator=torch.Generator().manual_seed(seed))


def _forward_args(op):
    """float64 arguments of a forward op and the indices of its differentiable tensors."""
    eye = lambda n: torch.eye(n, dtype=F64)  # noqa: E731
    if op == "householder_product":
        V, tau = lapack_reflectors(6, 4, 3, (2,))
        return (V, tau), (0, 1)
    if op == "householder_orthogonal":
        return (_rn(5, 3, seed=1),), (0,)
    if op == "householder_apply":
        return (_rn(2, 5, 3, seed=2), _rn(2, 5, 4, seed=3)), (0, 1)
    if op == "gram_schmidt":
        return (3 * eye(4) + _rn(2, 4, 4, seed=4), 0), (0,)
    if op in ("lowdin", "lowdin_svd"):
        P = 3 * eye(4) + _rn(2, 4, 4, seed=5)
        return ((P, 0, None) if op == "lowdin" else (P,)), (0,)
    if op == "cayley":
        return (0.3 * _rn(2, 4, 4, seed=6),), (0,)  # a general S: the op's derivative is the full one
    if op in ("cayley_neumann", "cayley_neumann_powers"):
        return (0.3 * _rn(2, 4, 4, seed=8), 4 if op == "cayley_neumann_powers" else 3), (0,)
    if op == "block_apply":
        perm = torch.tensor([3, 0, 6, 1, 5, 2, 4])
        return (_rn(2, 3, 3, seed=9), _rn(2, 7, seed=10), perm), (0, 1)
    raise KeyError(op)


def _saved(fwd, args):
    """What the autograd formula of forward op ``fwd`` hands its backward op, and the output's shape."""
    out = getattr(ops, fwd)(*args)
    if fwd == "lowdin_svd":
        return out[1:], out[0].shape
    if fwd == "cayley_neumann_powers":
        return (args[0], out[1], args[1]), out[0].shape
    if fwd == "cayley_neumann":
        return (args[0], args[1]), out.shape
    tensors = tuple(a for a in args if isinstance(a, torch.Tensor))
    return {"gram_schmidt": (args[0], out), "lowdin": (args[0], out), "cayley": (out,)}.get(fwd, tensors), out.shape


def _backward_args(op):
    saved, shape = _saved(op.removesuffix("_backward"), _forward_args(op.removesuffix("_backward"))[0])
    full = (_rn(*shape, seed=7), *saved)
    return full, tuple(i for i, a in enumerate(full) if isinstance(a, torch.Tensor) and a.is_floating_point())


def _on_manifold(op):
    """(fn, args, diff) for the op as its callers use it: a backward op fed by its forward op, so that the
    saved tensors move with the forward inputs (gram_schmidt_backward's kernel, e.g., is only the derivative's
    formula for a Q that is P's). lowdin_svd's factors are non-differentiable: its backward is taken as is."""
    if not op.endswith("_backward") or op == "lowdin_svd_backward":
        return (getattr(ops, op), *op_args(op))
    fwd = op.removesuffix("_backward")
    fargs, fdiff = _forward_args(fwd)
    G = _rn(*_saved(fwd, fargs)[1], seed=7)

    def fn(G, *fargs):
        return getattr(ops, op)(G, *_saved(fwd, fargs)[0])
    return fn, (G, *fargs), (0, *(i + 1 for i in fdiff))


def op_args(op):
    return _backward_args(op) if op.endswith("_backward") else _forward_args(op)


def _tangents(args, diff, seed=11):
    return tuple(_rn(*a.shape, seed=seed + i) if i in diff else None for i, a in enumerate(args))


def _jvp(fn, args, diff, tangents):
    """torch.func.jvp over the differentiable args only."""
    def f(*xs):
        full = list(args)
        for i, x in zip(diff, xs):
            full[i] = x
        return fn(*full)
    return torch.func.jvp(f, tuple(args[i] for i in diff), tuple(tangents[i] for i in diff))


def _first(out):
    return out[0] if isinstance(out, tuple) else out  # lowdin_svd: only R carries a tangent


def _central_difference(fn, args, diff, tangents, h=1e-6):
    plus = [a + h * tangents[i] if i in diff else a for i, a in enumerate(args)]
    minus = [a - h * tangents[i] if i in diff else a for i, a in enumerate(args)]
    return (_first(fn(*plus)) - _first(fn(*minus))) / (2 * h)


def _close(got, want, rtol):
    scale = want.abs().max().item()
    assert scale > 0, "a zero reference tangent tests nothing"
    err = (got.double() - want).abs().max().item()
    assert err <= rtol * scale, f"max err {err:.2e} > {rtol:.0e} x {scale:.2e}"


def test_every_op_has_a_forward_ad_sample_and_a_stand_in():
    for op in ALL_OPS:
        try:
            op_args(op)
        except KeyError:
            pytest.fail(f"opt_fast.{op}: add its sample to tests/test_forward_ad.py::_forward_args")
        assert _forward_ad._stand_in(op) is not None, f"opt_fast.{op}: no reference to take derivatives from"


@pytest.mark.parametrize("op", ALL_OPS)
def test_jvp_matches_the_float64_reference(op):
    args, diff = op_args(op)
    tangents = _tangents(args, diff)
    out, tan = _jvp(getattr(ops, op), args, diff, tangents)
    want_out = getattr(ops, op)(*args)
    for o, w in zip(*(x if isinstance(x, tuple) else (x,) for x in (out, want_out))):
        assert torch.equal(o, w), "the primal output is the op's own result"
    tan = _first(tan)
    ref = REFERENCE_KERNELS["lowdin"] if op == "lowdin_svd" else REFERENCE_KERNELS[op]
    ref_args = args[:1] if op == "lowdin_svd" else args
    _, want = _jvp(ref, ref_args, diff, tangents)
    _close(tan, _first(want), 1e-10)
    # independent of torch's derivative formulas: central differences of the reference and of the op
    _close(tan, _central_difference(ref, ref_args, diff, tangents), 1e-6)
    fn, args, diff = _on_manifold(op)
    tangents = _tangents(args, diff)
    _close(_first(_jvp(fn, args, diff, tangents)[1]), _central_difference(fn, args, diff, tangents), 1e-6)


@pytest.mark.parametrize("op", ALL_OPS)
def test_forward_ad_api_and_float32(op):
    """torch.autograd.forward_ad gives the same tangent; float32 inputs get a float32 tangent within
    float32 rounding of the float64 one."""
    args, diff = op_args(op)
    tangents = _tangents(args, diff)
    _, want = _jvp(getattr(ops, op), args, diff, tangents)
    want = _first(want)
    for dtype, rtol in ((F64, 1e-12), (torch.float32, 1e-4)):
        with fwAD.dual_level():
            duals = [fwAD.make_dual(a.to(dtype), tangents[i].to(dtype)) if i in diff
                     else (a.to(dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() else a)
                     for i, a in enumerate(args)]
            out = _first(getattr(ops, op)(*duals))
            primal, tan = fwAD.unpack_dual(out)
        assert tan is not None and tan.dtype == dtype and primal.dtype == dtype
        _close(tan, want, rtol)


@pytest.mark.parametrize("op", ALL_OPS)
def test_jvp_agrees_with_the_ops_reverse_mode(op):
    """<G, J t> = <Jᵀ G, t>: forward mode and the registered backward (double backward for *_backward ops)
    describe the same derivative."""
    args, diff = op_args(op)
    tangents = _tangents(args, diff)
    _, tan = _jvp(getattr(ops, op), args, diff, tangents)
    tan = _first(tan)
    G = _rn(*tan.shape, seed=21)
    leaves = [a.clone().requires_grad_() if i in diff else a for i, a in enumerate(args)]
    grads = torch.autograd.grad(_first(getattr(ops, op)(*leaves)), [leaves[i] for i in diff], G)
    lhs = (G * tan).sum().item()
    rhs = sum((g * tangents[i]).sum().item() for g, i in zip(grads, diff))
    assert abs(lhs - rhs) <= 1e-9 * max(1.0, abs(lhs)), (lhs, rhs)


def test_op_without_a_stand_in_raises(monkeypatch):
    monkeypatch.setitem(_forward_ad._STAND_INS, "cayley", None)
    S = skew(_rn(3, 3, seed=30))
    with pytest.raises(RuntimeError, match=r"opt_fast\.cayley: forward-mode AD .* is not supported"):
        torch.func.jvp(ops.cayley, (S,), (S,))
    ops.cayley(S)  # without a tangent nothing changes


# ---- lowdin specifics ---------------------------------------------------------------------------------------

def _polar_jvp(P, T):
    """The polar factor's derivative from the thin SVD (orthonormal-column R for tall P)."""
    U, S, Vh = torch.linalg.svd(P, full_matrices=False)
    K = U.mT @ T @ Vh.mT
    out = U @ ((K - K.mT) / (S[..., :, None] + S[..., None, :])) @ Vh
    return out + (T - U @ (U.mT @ T)) @ (Vh.mT / S[..., None, :]) @ Vh


@pytest.mark.parametrize("shape", [(5, 5), (2, 27, 27), (27, 5), (2, 100, 33)], ids=["5", "2x27", "27x5", "2x100x33"])
@pytest.mark.parametrize("fn", ["lowdin", "lowdin-iters", "lowdin-R0", "lowdin_svd", "functional"])
def test_lowdin_tangent_is_the_polar_factors(fn, shape):
    """Whatever route computes R (iterations, a warm start that makes R independent of P, the SVD route),
    its tangent is the polar factor's, as its backward is."""
    P, T = _rn(*shape, seed=40), _rn(*shape, seed=41)
    R_exact = _polar_jvp(P, T)
    call = {"lowdin": lambda P: ops.lowdin(P), "lowdin-iters": lambda P: ops.lowdin(P, 30),
            "lowdin-R0": lambda P: ops.lowdin(P, 0, ops.lowdin(P.detach())),
            "lowdin_svd": lambda P: ops.lowdin_svd(P)[0], "functional": lambda P: opt_fast.functional.lowdin(P)}[fn]
    if fn == "lowdin-R0":
        with fwAD.dual_level():
            tan = fwAD.unpack_dual(call(fwAD.make_dual(P, T))).tangent
    else:
        _, tan = torch.func.jvp(call, (P,), (T,))
    _close(tan, R_exact, 1e-10)


def test_lowdin_float32_tangent_at_the_identity():
    """OPT's identity init: dR = (T - Tᵀ) / 2. (The float32 iteration's own tangent is off by 7e-3 here.)"""
    T = _rn(6, 6, seed=42).float()
    _, tan = torch.func.jvp(ops.lowdin, (torch.eye(6),), (T,))
    _close(tan, ((T - T.mT) / 2).double(), 1e-6)


def test_lowdin_svd_factors_carry_no_tangent():
    """U, S, Vh are marked non-differentiable (they get no gradient either); R does."""
    P, T = _rn(4, 4, seed=43), _rn(4, 4, seed=44)
    with fwAD.dual_level():
        R, U, S, Vh = ops.lowdin_svd(fwAD.make_dual(P, T))
        assert fwAD.unpack_dual(R).tangent is not None
        assert all(fwAD.unpack_dual(t).tangent is None for t in (U, S, Vh))


# ---- forward-over-reverse ----------------------------------------------------------------------------------------

def _hvp_cases():
    W = _rn(4, 4, seed=50)
    lowdin_ref = REFERENCE_KERNELS["lowdin"]
    return {
        "lowdin": (lambda P: ops.lowdin(P), lowdin_ref, 3 * torch.eye(4, dtype=F64) + _rn(4, 4, seed=51)),
        "lowdin-svd-route": (opt_fast.functional.lowdin, lowdin_ref, 3 * torch.eye(4, dtype=F64) + _rn(4, 4, seed=51)),
        "cayley": (ops.cayley, REFERENCE_KERNELS["cayley"], 0.3 * _rn(4, 4, seed=52)),
        "gram_schmidt": (lambda P: ops.gram_schmidt(P, 0), REFERENCE_KERNELS["gram_schmidt"],
                         3 * torch.eye(4, dtype=F64) + _rn(4, 4, seed=53)),
        "householder_orthogonal": (ops.householder_orthogonal, REFERENCE_KERNELS["householder_orthogonal"],
                                   _rn(4, 4, seed=54)),
    }, W


@pytest.mark.parametrize("create_graph", [False, True])
@pytest.mark.parametrize("case", list(_hvp_cases()[0]))
def test_hessian_vector_product_forward_over_reverse(case, create_graph):
    """The tangent of a gradient (forward AD through the backward ops) equals torch.func's
    jvp(grad(f)) of the float64 reference."""
    cases, W = _hvp_cases()
    fn, ref, X = cases[case]
    T = _rn(4, 4, seed=55)
    want = torch.func.jvp(torch.func.grad(lambda Z: (ref(Z) * W).sum()), (X,), (T,))[1]
    with fwAD.dual_level():
        Xd = fwAD.make_dual(X.clone().requires_grad_(), T)
        g, = torch.autograd.grad((fn(Xd) * W).sum(), Xd, create_graph=create_graph)
        tan = fwAD.unpack_dual(g).tangent
    _close(tan, want, 1e-9)


def test_jacfwd():
    P = 3 * torch.eye(3, dtype=F64) + _rn(3, 3, seed=60)
    J = torch.func.jacfwd(lambda P: ops.gram_schmidt(P, 0))(P)
    want = torch.autograd.functional.jacobian(lambda P: ops.gram_schmidt(P, 0), P)
    torch.testing.assert_close(J, want, rtol=1e-10, atol=1e-10)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("op", ["householder_product", "householder_orthogonal", "householder_apply", "gram_schmidt",
                                "lowdin", "cayley"])
def test_jvp_on_cuda(op):
    """The CUDA kernels (C++ / Triton) give the value, the float64 reference on the GPU the tangent."""
    args, diff = op_args(op)
    tangents = _tangents(args, diff)
    _, want = _jvp(getattr(ops, op), args, diff, tangents)
    cuda = lambda xs: tuple(x.cuda().float() if isinstance(x, torch.Tensor) else x for x in xs)  # noqa: E731
    out, tan = _jvp(getattr(ops, op), cuda(args), diff, cuda(tangents))
    assert tan.is_cuda and tan.dtype == torch.float32
    torch.testing.assert_close(out.cpu(), getattr(ops, op)(*cuda(args)).cpu(), rtol=0, atol=0)
    _close(tan.cpu(), want, 1e-4)
