"""What users do with the ops' results and inputs beyond the formulas: modify an output in place under
autograd, pass an overflowed (infinite) parameter, catch a singular input as torch's LinAlgError, take
gradients of a fixed number of lowdin steps, hand functional.lowdin a bad warm start."""
import pytest
import torch

import opt_fast.functional as F
from opt_fast._ops import FORWARD_OPS
from test_ops_forward_ad import _first, op_args

ops = torch.ops.opt_fast


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("op", FORWARD_OPS + ("lowdin_svd", "cayley_neumann_powers"))
def test_outputs_can_be_modified_in_place_under_autograd(op, dtype):
    args, diff = op_args(op)
    args = [a.to(dtype).requires_grad_(i in diff) if isinstance(a, torch.Tensor) and a.is_floating_point() else a
            for i, a in enumerate(args)]
    out = _first(getattr(ops, op)(*args))
    assert not out._is_view()
    out.mul_(2)   # as after a matmul; a backward that saved the output would then refuse to run, as torch's do
    if op in ("householder_product", "householder_orthogonal", "householder_apply", "cayley_neumann",
              "block_apply", "cayley_neumann_powers"):
        out.sum().backward()
        assert all(args[i].grad is not None for i in diff)


@pytest.mark.parametrize("d", [3, 27, 100])   # the small-matrix kernel, the batched and the looped LU
def test_cayley_of_an_infinite_entry_is_nan_like_torchs_solve(d):
    S = 0.1 * torch.randn(3, d, d, generator=torch.Generator().manual_seed(d))
    S = S - S.mT
    S[1, d - 1, 0] = float("inf")
    Q = ops.cayley(S)
    eye = torch.eye(d)
    assert torch.linalg.solve(eye - S[1], eye + S[1]).isnan().any()
    assert Q[1].isnan().all()
    torch.testing.assert_close(Q[[0, 2]], ops.cayley(S[[0, 2]]))


@pytest.mark.parametrize("d", [3, 27, 100])
def test_cayley_of_a_singular_input_raises_linalg_error(d):
    S = torch.zeros(2, d, d)
    S[1] = torch.eye(d)   # I - S = 0
    with pytest.raises(torch.linalg.LinAlgError, match=r"opt_fast\.cayley: I - S is singular"):
        ops.cayley(S)


@pytest.mark.parametrize("iters", [1, 3, 10])
def test_lowdin_gradient_of_a_fixed_number_of_steps(iters):
    """lowdin(P, iters>0) is those steps, not the polar factor yet: its gradient is theirs."""
    P = (torch.eye(4, dtype=torch.float64) + 0.5 * torch.randn(2, 4, 4, dtype=torch.float64,
                                                             generator=torch.Generator().manual_seed(iters)))
    P.requires_grad_()
    assert torch.autograd.gradcheck(lambda P: ops.lowdin(P, iters), (P,))
    assert torch.autograd.gradgradcheck(lambda P: ops.lowdin(P, iters), (P,))
    stale = ops.lowdin(P.detach() + 0.1)   # a warm start the op refuses: the cold steps as above
    assert torch.autograd.gradcheck(lambda P: ops.lowdin(P, iters, stale), (P,))
    # an accepted warm start: the result is the polar factor, and so is its gradient
    G = torch.randn_like(P)
    R0 = ops.lowdin(P.detach())
    torch.testing.assert_close(torch.autograd.grad(ops.lowdin(P, iters, R0), P, G)[0],
                               torch.autograd.grad(ops.lowdin(P), P, G)[0])
    T = torch.randn_like(P)   # forward mode agrees with reverse: <G, J T> = <Jᵀ G, T>
    tan = torch.func.jvp(lambda P: ops.lowdin(P, iters), (P.detach(),), (T,))[1]
    vjp = torch.autograd.grad(ops.lowdin(P, iters), P, G)[0]
    torch.testing.assert_close((G * tan).sum(), (vjp * T).sum(), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("R0", [torch.randn(3, 3), torch.eye(4, dtype=torch.int64)], ids=["wrong-shape", "int64"])
def test_functional_lowdin_checks_r0_also_when_p_needs_a_gradient(R0):
    """On the CPU a P that needs a gradient takes the SVD route, which has no use for R0: still checked."""
    with pytest.raises(RuntimeError, match=r"opt_fast\.lowdin: expected R0"):
        F.lowdin(torch.randn(4, 4, requires_grad=True), 0, R0)


@pytest.mark.parametrize("call", ["op", "functional", "lowdin_svd"])
@pytest.mark.parametrize("P", [torch.zeros(3, 3), torch.diag(torch.tensor([1.0, 1.0, 0.0]))], ids=["zero", "rank-2"])
def test_lowdin_gradient_at_a_singular_p_raises_like_gram_schmidt(call, P):
    f = {"op": ops.lowdin, "functional": F.lowdin, "lowdin_svd": lambda P: ops.lowdin_svd(P)[0]}[call]
    P = P.clone().requires_grad_()
    R = f(P)
    assert torch.isfinite(R).all()   # the forward is defined (one of the polar factors)
    with pytest.raises(RuntimeError, match=r"opt_fast\.lowdin(_svd)?: P is singular"):
        R.sum().backward()
