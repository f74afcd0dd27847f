"""Reverse mode under torch.func's transforms (grad, vjp, jacrev, hessian, vmap of grad) through every
torch.ops.opt_fast op and through converted models (functional_call): the same gradients as
torch.autograd on the same inputs."""
import pytest
import torch
from torch.func import functional_call, grad, hessian, jacfwd, jacrev, jvp, vjp, vmap

import opt_fast.nn as onn
from opt_fast._ops import ALL_OPS
from test_ops_forward_ad import _first, _rn, op_args

ops = torch.ops.opt_fast
F64 = torch.float64


def _with(args, diff, xs):
    full = list(args)
    for i, x in zip(diff, xs):
        full[i] = x
    return full


@pytest.mark.parametrize("op", ALL_OPS)
def test_vjp_equals_autograd(op):
    args, diff = op_args(op)
    fn = getattr(ops, op)
    out, pullback = vjp(lambda *xs: _first(fn(*_with(args, diff, xs))), *(args[i] for i in diff))
    G = _rn(*out.shape, seed=3)
    got = pullback(G)
    leaves = [a.clone().requires_grad_() if i in diff else a for i, a in enumerate(args)]
    want = torch.autograd.grad(_first(fn(*leaves)), [leaves[i] for i in diff], G, allow_unused=True)
    assert torch.equal(out, _first(fn(*args)))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, torch.zeros_like(g) if w is None else w, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("op", ["cayley", "gram_schmidt", "lowdin", "householder_orthogonal", "cayley_neumann"])
def test_jacrev_and_hessian_equal_autograd(op):
    args, diff = op_args(op)
    x = args[diff[0]]
    x = x[:1] if x.dim() > 2 else x  # one matrix of the batch: a small Jacobian
    f = lambda x: _first(getattr(ops, op)(*_with(args, diff[:1], (x,))))  # noqa: E731
    torch.testing.assert_close(jacrev(f)(x), torch.autograd.functional.jacobian(f, x), rtol=1e-10, atol=1e-10)
    W = _rn(*f(x).shape, seed=5)
    s = lambda x: (f(x) * W).sum()  # noqa: E731
    H = torch.autograd.functional.hessian(s, x)
    torch.testing.assert_close(hessian(s)(x), H, rtol=1e-9, atol=1e-9)  # forward over reverse
    torch.testing.assert_close(jacrev(jacrev(s))(x), H, rtol=1e-9, atol=1e-9)  # reverse over reverse
    # grad of a function of a grad: nested grad levels both record the op
    xr = x.clone().requires_grad_()
    g, = torch.autograd.grad(s(xr), xr, create_graph=True)
    want, = torch.autograd.grad(g.square().sum(), xr)
    torch.testing.assert_close(grad(lambda x: grad(s)(x).square().sum())(x), want, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("op", ["cayley", "lowdin", "lowdin_svd", "cayley_neumann", "gram_schmidt"])
def test_vmap_of_forward_mode_equals_reverse_mode(op):
    # vmap(jacfwd) / vmap(jvp): the forward-mode stand-in may not branch on values under vmap (lowdin's and
    # cayley's references did: "vmap ... .item()"); the batch of Jacobians equals jacrev's, matrix by matrix
    args, diff = op_args(op)
    X = args[diff[0]]
    X = X if X.dim() > 2 else X.expand(2, *X.shape).clone()
    f = lambda x: _first(getattr(ops, op)(*_with(args, diff[:1], (x,))))  # noqa: E731
    J = vmap(jacfwd(f))(X)
    torch.testing.assert_close(J, torch.stack([jacrev(f)(x) for x in X]), rtol=1e-10, atol=1e-10)
    T = _rn(*X.shape, seed=7)
    _, tangent = vmap(lambda x, t: jvp(f, (x,), (t,)))(X, T)
    torch.testing.assert_close(tangent, torch.einsum("b...ij,bij->b...", J, T), rtol=1e-10, atol=1e-10)


def test_vmap_of_a_function_with_trainable_inputs_then_backward():
    """vmap outside any grad transform, with inputs that require grad: plain autograd through the ops."""
    S = _rn(3, 4, 4, seed=9).requires_grad_()
    X = _rn(5, 8, seed=10)
    Y = vmap(lambda x: ops.block_apply(ops.cayley(S[:2] - S[:2].mT), x))(X)
    g, = torch.autograd.grad(Y.square().sum() + (Y[:, :4] * X[:, 4:]).sum(), S)
    S2 = S.detach().clone().requires_grad_()
    Y2 = ops.block_apply(ops.cayley(S2[:2] - S2[:2].mT), X)
    g2, = torch.autograd.grad(Y2.square().sum() + (Y2[:, :4] * X[:, 4:]).sum(), S2)
    torch.testing.assert_close(Y, Y2.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g, g2, rtol=1e-12, atol=1e-12)


def test_per_sample_gradients_with_vmap_of_grad():
    S = _rn(4, 5, 5, seed=7).requires_grad_()
    X = _rn(6, 5, seed=8)

    def loss(S, x):
        return ops.block_apply(ops.cayley_neumann(S, 3), x).square().sum()
    got = vmap(grad(loss), in_dims=(None, 0))(S.detach(), X.repeat(1, 4))
    for k in range(X.shape[0]):
        want, = torch.autograd.grad(loss(S, X[k].repeat(4)), S)
        torch.testing.assert_close(got[k], want, rtol=1e-12, atol=1e-12)


_CONVERSIONS = {
    "block-both": dict(method="cayley_neumann", block_size=4, sides="both"),
    "block-in-cayley": dict(method="cayley", block_size=5, sides="in"),
    "dense-cayley": dict(method="cayley"),
    "dense-householder": dict(method="householder"),
    "dense-gram_schmidt": dict(method="gram_schmidt"),
    "dense-lowdin": dict(method="lowdin"),
}


@pytest.mark.parametrize("kind", list(_CONVERSIONS))
def test_functional_call_grad_of_a_converted_model(kind):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(12, 10), torch.nn.Tanh(), torch.nn.Linear(10, 3)).double()
    model = onn.convert(model, **_CONVERSIONS[kind])
    with torch.no_grad():  # away from the identity
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    x = torch.randn(7, 12, dtype=F64)
    params = {k: v.detach() for k, v in model.named_parameters()}
    got = grad(lambda p: functional_call(model, p, (x,)).square().sum())(params)
    want = torch.autograd.grad(model(x).square().sum(), list(model.parameters()))
    for (name, g), w in zip(got.items(), want):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12, msg=name)
    # per-sample gradients: vmap over the batch of grad of one sample's loss
    per = vmap(grad(lambda p, xi: functional_call(model, p, (xi[None],)).square().sum()),
               in_dims=(None, 0))(params, x[:3])
    for k in range(3):
        one = torch.autograd.grad(model(x[k:k + 1]).square().sum(), list(model.parameters()))
        for (name, g), w in zip(per.items(), one):
            torch.testing.assert_close(g[k], w, rtol=1e-10, atol=1e-12, msg=name)


def _as_tuple(x):
    return x if isinstance(x, tuple) else (x,)


@pytest.mark.parametrize("op", ALL_OPS)
def test_vmap_equals_the_op_per_sample(op, recwarn):
    """vmap over a new dim (dim 1 of each batched tensor: not the front), with only the first tensor or
    every tensor batched: the stacked per-sample results, and no warning of torch's per-sample fallback."""
    args, diff = op_args(op)
    tensors = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor)]
    samples = [[a + 0.01 * k if i in diff else a for i, a in enumerate(args)] for k in range(3)]
    for batched in ([tensors[0]], tensors):
        vargs = [torch.stack([s[i] for s in samples], dim=1) if i in batched else a for i, a in enumerate(args)]
        in_dims = tuple(1 if i in batched else None for i in range(len(args)))
        got = _as_tuple(vmap(getattr(ops, op), in_dims=in_dims)(*vargs))
        want = [_as_tuple(getattr(ops, op)(*[s[i] if i in batched else a for i, a in enumerate(args)]))
                for s in samples]
        for j, g in enumerate(got):
            torch.testing.assert_close(g, torch.stack([w[j] for w in want]), rtol=1e-12, atol=1e-12)
    assert not [w for w in recwarn if "batching rule" in str(w.message)]


def test_lowdin_with_steps_and_a_warm_start_says_why_it_cannot_be_traced():
    # its gradient depends on whether R0 was accepted (a decision on values): a clear error under vmap and
    # torch.compile instead of "vmap ... .item()" / GuardOnDataDependentSymNode; eager and iters=0 work
    P = _rn(3, 4, 4, seed=11)
    R0 = ops.lowdin(P)
    msg = r"opt_fast\.lowdin: the gradient of lowdin\(P, iters > 0, R0\) depends on whether R0"
    with pytest.raises(RuntimeError, match=msg):
        vmap(grad(lambda p, r: ops.lowdin(p, 3, r).sum()))(P, R0)
    f = torch.compile(lambda p, r: ops.lowdin(p, 3, r), fullgraph=True)
    with pytest.raises(Exception, match=msg):
        f(P.clone().requires_grad_(), R0).sum().backward()
    vmap(grad(lambda p, r: ops.lowdin(p, 0, r).sum()))(P, R0)
    X = P.clone().requires_grad_()
    ops.lowdin(X, 3, R0).sum().backward()
    assert X.grad.isfinite().all()
