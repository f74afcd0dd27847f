"""The C++ CPU Löwdin kernel (csrc/cpu/lowdin.cpp): the SVD route for the converged polar factor, the
reference's certified R0 reuse and fixed schedule for iters > 0, NaN isolation, and its backward.

Accuracy against float64 and the 2x rule over plain PyTorch are in test_ops_numerics.py (the op there is
served by this kernel whenever the extension is built); this file checks what is specific to the route.
"""
import math

import pytest
import torch

import opt_fast
from _refs import OpCounter
from opt_fast.reference.lowdin import lowdin_backward_ref, lowdin_ref

pytestmark = pytest.mark.skipif(not opt_fast.has_kernel("lowdin", "CPU"), reason="C++ CPU lowdin kernel not built")

ops = torch.ops.opt_fast
F64 = torch.float64


def randn(*shape, dtype=F64, seed=0):
    return torch.randn(*shape, dtype=dtype, generator=torch.Generator().manual_seed(seed))


def polar64(P):
    U, _, Vh = torch.linalg.svd(P.double(), full_matrices=False)
    return U @ Vh


def orth_err(R):
    d = R.shape[-1]
    return (torch.linalg.matrix_norm(R.mT @ R - torch.eye(d, dtype=R.dtype)) / math.sqrt(d)).max().item()


class AtenCalls:
    """The aten ops run inside the block, C++ kernels' own calls included (the profiler sees them all)."""

    def __enter__(self):
        self._prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
        self._prof.__enter__()
        return self

    def __exit__(self, *exc):
        self._prof.__exit__(*exc)
        self.names = [e.name.removeprefix("aten::") for e in self._prof.events()]


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("shape", [(1, 1), (2, 2), (3, 27, 27), (2, 2, 33, 33), (100, 100), (27, 5), (2, 100, 33)])
def test_converged_output_is_the_polar_factor(shape, dtype):
    P = randn(*shape, dtype=dtype, seed=1)
    R = ops.lowdin(P)
    tol = 2e-5 if dtype == torch.float32 else 1e-11
    torch.testing.assert_close(R.double(), polar64(P), rtol=0, atol=tol)
    assert R.dtype == dtype and R.is_contiguous()


def test_converged_route_is_one_svd():
    with AtenCalls() as calls:
        ops.lowdin(randn(2, 40, 40, dtype=torch.float32))
    assert calls.names.count("linalg_svd") == 1
    assert "baddbmm" not in calls.names  # no polynomial step


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("k", [1, 3, 17, 20])
def test_iters_matches_the_reference_schedule(k, dtype):
    P = randn(3, 30, 30, dtype=dtype, seed=2)
    got, want = ops.lowdin(P, k), lowdin_ref(P, k)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(got, want, rtol=0, atol=tol)
    with AtenCalls() as calls:
        ops.lowdin(P, k)
    assert calls.names.count("baddbmm") == k


def test_current_R0_is_reused_without_svd():
    P = randn(2, 50, 50, dtype=torch.float32, seed=3)
    R0 = polar64(P).float()
    with AtenCalls() as calls:
        R = ops.lowdin(P, 0, R0)
    assert "linalg_svd" not in calls.names
    torch.testing.assert_close(R.double(), polar64(P), rtol=0, atol=2e-5)
    assert R.data_ptr() != R0.data_ptr()


@pytest.mark.parametrize("rel", [1e-3, 1e-1])
def test_stale_R0_falls_back_to_the_svd_route(rel):
    P = randn(2, 50, 50, dtype=torch.float32, seed=4)
    R0 = polar64(P + rel * randn(2, 50, 50, dtype=torch.float32, seed=5)).float()
    with AtenCalls() as calls:
        R = ops.lowdin(P, 0, R0)
    assert calls.names.count("linalg_svd") == 1
    torch.testing.assert_close(R.double(), polar64(P), rtol=0, atol=2e-5)


@pytest.mark.parametrize("op", ["lowdin", "lowdin_svd"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_matrix_is_nan_and_isolated(bad, op):
    def outputs(P):  # every output of the op, as a tuple
        out = getattr(ops, op)(P)
        return out if isinstance(out, tuple) else (out,)

    P = randn(3, 20, 20, dtype=torch.float32, seed=6)
    clean = outputs(P)
    P[1, 4, 7] = bad
    for t, c in zip(outputs(P), clean):
        assert t[1].isnan().all()
        torch.testing.assert_close(t[[0, 2]], c[[0, 2]], rtol=0, atol=0)


def test_singular_input_gives_an_orthogonal_factor():
    P = randn(2, 30, 30, dtype=F64, seed=7)
    P[:, :, 0] = P[:, :, 1]  # rank 29: the polar factor is not unique, any orthogonal one satisfies P = R H
    R = ops.lowdin(P)
    assert orth_err(R) < 1e-13
    H = R.mT @ P
    torch.testing.assert_close(H, H.mT, rtol=0, atol=1e-11)


@pytest.mark.parametrize("path", ["ops", "ref"])
@pytest.mark.parametrize("P", [torch.ones(3, 3), torch.tensor([[1.0, 2.0], [2.0, 4.0]]),
                               torch.outer(torch.arange(1.0, 6.0), torch.arange(2.0, 7.0))],
                         ids=["ones", "rank1-2x2", "outer-5x5"])
def test_backward_at_an_exactly_singular_input_raises(path, P):
    # the eigh/SVD of a rank-deficient P gives its zero singular values as ±1e-8·σ_max: the C++ backward
    # returned a finite gradient of ~5e6 there while the reference raised; both raise now
    R = ops.lowdin(P) if path == "ops" else lowdin_ref(P)
    backward = ops.lowdin_backward if path == "ops" else lowdin_backward_ref
    dP = backward(torch.ones_like(P), P, R)
    assert not dP.isfinite().all()
    X = P.clone().requires_grad_()
    with pytest.raises(RuntimeError, match="P is singular"):
        torch.ops.opt_fast.lowdin(X).sum().backward()


def test_noncontiguous_and_batched_input():
    base = randn(4, 2, 27, 27, dtype=torch.float32, seed=8)
    P = base.transpose(0, 1).mT
    assert not P.is_contiguous()
    torch.testing.assert_close(ops.lowdin(P), ops.lowdin(P.contiguous()), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_backward_matches_the_reference(dtype):
    P = randn(2, 33, 33, dtype=dtype, seed=9)
    R = ops.lowdin(P)
    g = randn(2, 33, 33, dtype=dtype, seed=10)
    tol = 1e-4 if dtype == torch.float32 else 1e-10
    torch.testing.assert_close(ops.lowdin_backward(g, P, R), lowdin_backward_ref(g, P, R), rtol=tol, atol=tol)


def test_gradcheck_through_the_svd_route():
    P = randn(2, 5, 5, seed=11).requires_grad_()
    assert torch.autograd.gradcheck(lambda P: ops.lowdin(P), [P])


# ---- lowdin_svd: the SVD route with its factors, so that the backward is four matmuls ------------------

@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("shape", [(1, 1), (2, 2), (3, 27, 27), (2, 2, 33, 33), (100, 100), (2, 1), (3, 27, 5)])
def test_lowdin_svd_factors_and_backward(shape, dtype):
    P = randn(*shape, dtype=dtype, seed=12)
    R, U, S, Vh = ops.lowdin_svd(P)
    n = shape[-1]
    assert R.shape == U.shape == P.shape and S.shape == P.shape[:-2] + (n,) and Vh.shape == P.shape[:-2] + (n, n)
    assert all(t.dtype == dtype and t.is_contiguous() for t in (R, U, S, Vh))
    tol = 2e-5 if dtype == torch.float32 else 1e-11
    torch.testing.assert_close(R.double(), polar64(P), rtol=0, atol=tol)
    torch.testing.assert_close(U @ torch.diag_embed(S) @ Vh, P, rtol=tol, atol=tol * P.abs().max().item())
    torch.testing.assert_close(R, U @ Vh, rtol=0, atol=0)
    g = randn(*shape, dtype=dtype, seed=13)
    # the same VJP as lowdin_backward (an eigh of H = RᵀP) and as the reference formula on the factors
    torch.testing.assert_close(ops.lowdin_svd_backward(g, U, S, Vh), lowdin_backward_ref(g, P, R), rtol=tol, atol=tol)
    from opt_fast.reference.lowdin import lowdin_svd_backward_ref
    torch.testing.assert_close(ops.lowdin_svd_backward(g, U, S, Vh), lowdin_svd_backward_ref(g, U, S, Vh),
                               rtol=tol, atol=tol)


def test_lowdin_svd_gradcheck_and_gradgradcheck():
    P = randn(2, 6, 6, seed=14).requires_grad_()
    assert torch.autograd.gradcheck(lambda P: ops.lowdin_svd(P)[0], [P])
    # create_graph takes lowdin_backward (differentiable); the factors carry no graph back to P
    assert torch.autograd.gradgradcheck(lambda P: ops.lowdin_svd(P)[0], [P])


def test_lowdin_svd_factors_are_not_differentiable():
    P = randn(3, 3, seed=15).requires_grad_()
    R, U, S, Vh = ops.lowdin_svd(P)
    assert R.requires_grad and not (U.requires_grad or S.requires_grad or Vh.requires_grad)


def test_lowdin_svd_bad_input_names_the_op():
    with pytest.raises(RuntimeError, match=r"opt_fast.lowdin_svd: expected P \[\.\.\., m, n\] with m >= n"):
        ops.lowdin_svd(torch.randn(3, 4))
    with pytest.raises(RuntimeError, match=r"opt_fast.lowdin_svd_backward: expected grad of shape"):
        _, U, S, Vh = ops.lowdin_svd(torch.randn(3, 3))
        ops.lowdin_svd_backward(torch.randn(4, 4), U, S, Vh)


def test_lowdin_svd_empty_batch():
    R, U, S, Vh = ops.lowdin_svd(torch.randn(0, 5, 5))
    assert R.shape == U.shape == Vh.shape == (0, 5, 5) and S.shape == (0, 5)


@pytest.mark.parametrize("op", ["lowdin_svd", "lowdin_svd_backward"])
def test_lowdin_svd_opcheck(op):
    P = randn(2, 5, 5, dtype=torch.float32, seed=17)
    if op == "lowdin_svd":
        for args in [(P,), (P.clone().requires_grad_(),)]:
            torch.library.opcheck(ops.lowdin_svd.default, args)
    else:
        _, U, S, Vh = ops.lowdin_svd(P)
        torch.library.opcheck(ops.lowdin_svd_backward.default, (torch.randn_like(P), U, S, Vh))


def test_functional_lowdin_takes_lowdin_svd_only_on_cpu_with_grad():
    P = randn(2, 9, 9, seed=18)
    Pg = P.clone().requires_grad_()
    with OpCounter() as c:
        R = opt_fast.functional.lowdin(Pg)
        R.sum().backward()
    assert dict(c.calls) == {"lowdin_svd": 1, "lowdin_svd_backward": 1}
    torch.testing.assert_close(Pg.grad, lowdin_backward_ref(torch.ones_like(P), P, ops.lowdin(P)), rtol=1e-10, atol=1e-10)
    for args, kwargs in [((P,), {}), ((Pg,), {"iters": 3})]:  # no grad needed / an explicit iteration count
        with OpCounter() as c:
            opt_fast.functional.lowdin(*args, **kwargs)
        assert dict(c.calls) == {"lowdin": 1}
    with torch.no_grad(), OpCounter() as c:
        opt_fast.functional.lowdin(Pg)
    assert dict(c.calls) == {"lowdin": 1}


def test_huge_finite_entries_are_not_taken_for_non_finite():
    # the kernel's fast finiteness check is a sum, which overflows here: the exact per-matrix check must decide
    P = randn(2, 6, 6, dtype=torch.float32, seed=19) * 3e37
    for out in (ops.lowdin(P), ops.lowdin_svd(P)[0]):
        assert torch.isfinite(out).all()
        torch.testing.assert_close(out.double(), polar64(P), rtol=0, atol=2e-5)
