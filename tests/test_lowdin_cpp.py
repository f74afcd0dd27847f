"""The C++ CPU Löwdin kernel (csrc/cpu/lowdin.cpp): the SVD route for the converged polar factor, the
reference's certified R0 reuse and fixed schedule for iters > 0, NaN isolation, and its backward.

Accuracy against float64 and the 2x rule over plain PyTorch are in test_ops_numerics.py (the op there is
served by this kernel whenever the extension is built); this file checks what is specific to the route.
"""
import math

import pytest
import torch

import opt_fast
from opt_fast.reference.lowdin import lowdin_backward_ref, lowdin_ref

pytestmark = pytest.mark.skipif(not opt_fast.has_kernel("lowdin", "CPU"), reason="C++ CPU lowdin kernel not built")

ops = torch.ops.opt_fast
F64 = torch.float64


def randn(*shape, dtype=F64, seed=0):
    return torch.randn(*shape, dtype=dtype, generator=torch.Generator().manual_seed(seed))


def polar64(P):
    U, _, Vh = torch.linalg.svd(P.double())
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
@pytest.mark.parametrize("shape", [(1, 1), (2, 2), (3, 27, 27), (2, 2, 33, 33), (100, 100)])
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


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_matrix_is_nan_and_isolated(bad):
    P = randn(3, 20, 20, dtype=torch.float32, seed=6)
    clean = ops.lowdin(P)
    P[1, 4, 7] = bad
    R = ops.lowdin(P)
    assert R[1].isnan().all()
    torch.testing.assert_close(R[[0, 2]], clean[[0, 2]], rtol=0, atol=0)


def test_singular_input_gives_an_orthogonal_factor():
    P = randn(2, 30, 30, dtype=F64, seed=7)
    P[:, :, 0] = P[:, :, 1]  # rank 29: the polar factor is not unique, any orthogonal one satisfies P = R H
    R = ops.lowdin(P)
    assert orth_err(R) < 1e-13
    H = R.mT @ P
    torch.testing.assert_close(H, H.mT, rtol=0, atol=1e-11)


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
