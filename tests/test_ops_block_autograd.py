"""Gradients and registration of the block-orthogonal ops: gradcheck and gradgradcheck in float64,
torch.library.opcheck (every test_util) on the forward and backward ops, the fake kernels on meta tensors
and under torch.compile(fullgraph=True)."""
import pytest
import torch

import opt_fast  # noqa: F401  (registers torch.ops.opt_fast)

from _refs import skew

ops = torch.ops.opt_fast
F64 = torch.float64


def _general(*shape, scale=0.3):
    return (scale * torch.randn(*shape, dtype=F64)).requires_grad_()


# ---- gradcheck / gradgradcheck ----------------------------------------------------------------------

CN_GRAD_CASES = [(t, b) for t in (0, 1, 2, 3, 4, 5, 8) for b in (1, 3, 5)]


@pytest.mark.parametrize("op", ["cayley_neumann", "cayley_neumann_powers"])
@pytest.mark.parametrize("terms,b", CN_GRAD_CASES, ids=[f"t{t}-b{b}" for t, b in CN_GRAD_CASES])
def test_cayley_neumann_gradcheck(terms, b, op):
    """float64 gradcheck for a general S (the op's gradient is the full one w.r.t. S, whose skew part it
    reads), batched; through the powers op its R output."""
    S = _general(2, b, b)
    fn = ops.cayley_neumann if op == "cayley_neumann" else lambda S, t: ops.cayley_neumann_powers(S, t)[0]
    assert torch.autograd.gradcheck(lambda S: fn(S, terms), [S], eps=1e-6, atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("op", ["cayley_neumann", "cayley_neumann_powers"])
@pytest.mark.parametrize("terms", [0, 1, 2, 5])
def test_cayley_neumann_gradgradcheck(terms, op):
    S = _general(2, 4, 4)
    fn = ops.cayley_neumann if op == "cayley_neumann" else lambda S, t: ops.cayley_neumann_powers(S, t)[0]
    assert torch.autograd.gradgradcheck(lambda S: fn(S, terms), [S], eps=1e-6, atol=1e-7, rtol=1e-5)


def test_cayley_neumann_gradcheck_packed_skew():
    """Through the block layers' parametrisation S = U − Uᵀ (U strictly upper)."""
    P = _general(3, 5, 5)
    assert torch.autograd.gradcheck(lambda P: ops.cayley_neumann_powers(skew(P), 5)[0], [P])


BA_GRAD_CASES = [  # (nb, b, n, leading dims of X, permute)
    (2, 3, 6, (4,), False), (2, 3, 8, (4,), True), (1, 1, 3, (), True), (0, 2, 3, (2,), True),
    (2, 2, 5, (2, 3), True), (1, 5, 5, (3,), False)]


@pytest.mark.parametrize("nb,b,n,lead,permute", BA_GRAD_CASES,
                         ids=[f"nb{c[0]}-b{c[1]}-n{c[2]}-X{len(c[3]) + 1}d-{'perm' if c[4] else 'noperm'}"
                              for c in BA_GRAD_CASES])
def test_block_apply_gradcheck(nb, b, n, lead, permute):
    """float64 gradcheck and gradgradcheck w.r.t. R and X (remainder and nb = 0 included)."""
    R, X = _general(nb, b, b, scale=1.0), _general(*lead, n, scale=1.0)
    perm = torch.randperm(n) if permute else None
    fn = lambda R, X: ops.block_apply(R, X, perm)  # noqa: E731
    assert torch.autograd.gradcheck(fn, [R, X])
    assert torch.autograd.gradgradcheck(fn, [R, X])


# ---- opcheck ----------------------------------------------------------------------------------------

def _cn_samples():
    f32 = torch.float32
    return [(skew(torch.randn(3, 4, 4)), 5), (0.3 * torch.randn(2, 3, 5, 5, dtype=F64), 2),
            (skew(torch.randn(4, 4)).mT.contiguous().mT, 0), (skew(torch.randn(2, 6, 6, dtype=f32)), 1),
            (0.1 * torch.randn(2, 4, 4).to(torch.bfloat16), 3)]


def _ba_samples():
    return [(torch.randn(3, 4, 4), torch.randn(5, 14), torch.randperm(14)),
            (torch.randn(2, 5, 5, dtype=F64), torch.randn(2, 3, 10, dtype=F64), None),
            (torch.randn(2, 3, 3), torch.randn(4, 7).to(torch.bfloat16), torch.randperm(7)),
            (torch.randn(0, 3, 3), torch.randn(2, 4), torch.randperm(4)),
            (torch.randn(2, 3, 3).mT, torch.randn(8, 4).mT, torch.randperm(8).repeat_interleave(2)[::2])]


def forward_samples(op):
    """(args, differentiable-arg indices) per forward op."""
    if op in ("cayley_neumann", "cayley_neumann_powers"):
        return [(args, (0,)) for args in _cn_samples()]
    return [(args, (0, 1)) for args in _ba_samples()]


def backward_samples(op):
    fwd = op[: -len("_backward")]
    out = []
    for args, _ in forward_samples(fwd):
        y = getattr(ops, fwd)(*args)
        if fwd == "cayley_neumann":
            out.append((torch.randn_like(y), args[0], args[1]))
        elif fwd == "cayley_neumann_powers":
            out.append((torch.randn_like(y[0]), args[0], y[1], args[1]))
        else:
            out.append((torch.randn_like(y), *args))
    return out


FORWARD = ("cayley_neumann", "cayley_neumann_powers", "block_apply")
BACKWARD = tuple(op + "_backward" for op in FORWARD)


def _with_grad(args, idx):
    return tuple(a.detach().clone().requires_grad_() if i in idx else a for i, a in enumerate(args))


def _opcheck_params():
    for op in FORWARD + BACKWARD:
        for grad in (False, True):
            # the double backward of a backward op, traced by AOT dispatch: ~10 s each
            marks = [pytest.mark.slow] if grad and op in BACKWARD else []
            yield pytest.param(op, grad, id=f"{op}-{'grad' if grad else 'nograd'}", marks=marks)


@pytest.mark.parametrize("op,requires_grad", list(_opcheck_params()))
def test_opcheck(op, requires_grad):
    """torch.library.opcheck with every test_util (schema, autograd registration, fake tensor, AOT dispatch)
    on each forward op and each backward op (these are differentiable too: double backward), for float32,
    float64, half activations, empty blocks and non-contiguous inputs."""
    if op in FORWARD:
        samples = [(_with_grad(a, d) if requires_grad else a) for a, d in forward_samples(op)]
    else:
        samples = backward_samples(op)
        if requires_grad:  # double backward through the references' VJP, slow to trace: f64 and f32 samples
            pick = (1, 3) if op.startswith("cayley") else (0, 1)  # with few terms
            samples = [_with_grad(a, [i for i, t in enumerate(a) if isinstance(t, torch.Tensor)
                                      and t.is_floating_point()]) for a in (samples[i] for i in pick)]
    for args in samples:
        torch.library.opcheck(getattr(ops, op), args)


@pytest.mark.parametrize("op", FORWARD + BACKWARD)
def test_fake_kernels_on_meta(op):
    """Each op on meta tensors gives outputs of the shapes and dtypes of the real ones."""
    samples = [a for a, _ in forward_samples(op)] if op in FORWARD else backward_samples(op)
    for args in samples:
        real = getattr(ops, op)(*args)
        fake = getattr(ops, op)(*[a.to("meta") if isinstance(a, torch.Tensor) else a for a in args])
        real, fake = (real, fake) if isinstance(real, tuple) else ((real,), (fake,))
        for r, f in zip(real, fake):
            assert f.device.type == "meta" and f.shape == r.shape and f.dtype == r.dtype


# ---- torch.compile ----------------------------------------------------------------------------------

def _rotate(U_in, U_out, X, perm_in, perm_out):
    R_in = ops.cayley_neumann_powers(skew(U_in), 5)[0]
    R_out = ops.cayley_neumann(skew(U_out), 2)
    Y = ops.block_apply(R_in.mT, X, perm_in)
    return ops.block_apply(R_out, torch.tanh(Y), perm_out)


def test_compile_fullgraph_matches_eager():
    """torch.compile(fullgraph=True) of a function using every block op (the fake kernels trace it): the
    same output and input gradients as eager (float64), with a remainder and permutations."""
    inputs = [0.2 * torch.randn(3, 5, 5, dtype=F64), 0.2 * torch.randn(2, 4, 4, dtype=F64),
              torch.randn(2, 6, 17, dtype=F64)]
    perms = (torch.randperm(17), torch.randperm(17))
    G = torch.randn(2, 6, 17, dtype=F64)

    def run(fn):
        xs = [x.clone().requires_grad_() for x in inputs]
        out = fn(*xs, *perms)
        return out.detach(), torch.autograd.grad(out, xs, G)

    torch._dynamo.reset()
    with torch._inductor.config.patch(compile_threads=1):
        got_out, got_grad = run(torch.compile(_rotate, fullgraph=True))
    want_out, want_grad = run(_rotate)
    torch._dynamo.reset()
    torch.testing.assert_close(got_out, want_out, rtol=1e-10, atol=1e-10)
    for i, (g, w) in enumerate(zip(got_grad, want_grad)):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10, msg=lambda m: f"grad of input {i}: {m}")
