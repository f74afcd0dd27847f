"""Tests of the reference Löwdin kernel (opt_fast/reference/lowdin.py): the polar factor by a
Newton–Schulz-type iteration, its warm start, and the Lyapunov-equation backward."""
import importlib.util
import math
import pathlib
import sys

import pytest
import torch


def _load_module():
    try:
        from opt_fast.reference.lowdin import lowdin_backward_ref, lowdin_ref  # noqa: F401

        return sys.modules["opt_fast.reference.lowdin"]
    except Exception:  # opt_fast/__init__.py may import parts that are not there yet: load by path
        path = pathlib.Path(__file__).resolve().parents[1] / "opt_fast" / "reference" / "lowdin.py"
        spec = importlib.util.spec_from_file_location("_lowdin_under_test", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module


LW = _load_module()
lowdin_ref, lowdin_backward_ref = LW.lowdin_ref, LW.lowdin_backward_ref
F64 = torch.float64


def randn(*shape, dtype=F64, seed=0):
    return torch.randn(*shape, dtype=dtype, generator=torch.Generator().manual_seed(seed))


def polar_svd(P):
    U, _, Vh = torch.linalg.svd(P)
    return U @ Vh


def orth_err(R):
    d = R.shape[-1]
    return torch.linalg.matrix_norm(R.mT @ R - torch.eye(d, dtype=R.dtype)) / math.sqrt(d)


def perturb(P, rel, seed):
    N = randn(*P.shape, dtype=P.dtype, seed=seed)
    return P + rel * N * (torch.linalg.matrix_norm(P) / torch.linalg.matrix_norm(N))[..., None, None]


@pytest.fixture
def steps(monkeypatch):
    """Counts the polynomial steps of the next lowdin_ref calls."""
    count = [0]
    step = LW._cubic_step

    def counting(*args):
        count[0] += 1
        return step(*args)

    monkeypatch.setattr(LW, "_cubic_step", counting)
    return count


# --- forward, float64 --------------------------------------------------------------------------------

@pytest.mark.parametrize("d", [1, 2, 27, 33, 100])
def test_float64_matches_svd_polar(d):
    P = randn(2, 3, d, d, seed=d)
    R = lowdin_ref(P)
    assert R.shape == P.shape and R.dtype == F64
    torch.testing.assert_close(R, polar_svd(P), rtol=0, atol=1e-9)
    assert orth_err(R).max() <= 1e-12


@pytest.mark.parametrize("view", ["transpose", "slice", "batch_stride"])
def test_noncontiguous_input(view):
    base = randn(4, 40, 40, seed=1)
    P = {"transpose": base.mT, "slice": base[:, 3:33, 5:35], "batch_stride": base[::2]}[view]
    assert not P.is_contiguous()
    torch.testing.assert_close(lowdin_ref(P), polar_svd(P.contiguous()), rtol=0, atol=1e-10)


def test_d1_is_sign():
    p = torch.tensor([-2.5, 3.0, 1e-30, -7e20], dtype=F64).reshape(2, 2, 1, 1)
    assert torch.equal(lowdin_ref(p), torch.sign(p))
    assert torch.equal(lowdin_ref(p.float()), torch.sign(p.float()))


@pytest.mark.parametrize("shape", [(0, 5, 5), (2, 0, 3, 3)])
def test_empty_batch(shape):
    R = lowdin_ref(torch.randn(shape))
    assert R.shape == shape and R.dtype == torch.float32


# --- forward, float32 at OPT's size ------------------------------------------------------------------

@pytest.fixture(scope="module")
def opt_case():
    """Two N(0,1) 576 x 576 matrices, their float64 polar factors, and float32 SVD's error."""
    P64 = randn(2, 576, 576, seed=576)
    R64 = polar_svd(P64)
    P32 = P64.float()
    svd_err = torch.linalg.matrix_norm(polar_svd(P32).double() - R64)
    return P64, R64, P32, svd_err, lowdin_ref(P32)


def test_float32_d576_orthogonal_and_accurate(opt_case):
    P64, R64, P32, svd_err, R = opt_case
    assert R.dtype == torch.float32
    assert orth_err(R).max() <= 1e-5
    err = torch.linalg.matrix_norm(R.double() - R64)
    assert (err <= 2 * svd_err + 1e-6).all(), (err, svd_err)


def test_warm_start_after_a_training_step(opt_case):
    """P moved by 1e-3 (relative): R0 is stale, the result must be as good as a cold start's."""
    P64, _, _, _, R0 = opt_case
    P1_64 = perturb(P64, 1e-3, seed=7)
    R1_64 = polar_svd(P1_64)
    P1 = P1_64.float()
    svd_err = torch.linalg.matrix_norm(polar_svd(P1).double() - R1_64)
    R = lowdin_ref(P1, R0=R0)
    assert orth_err(R).max() <= 1e-5
    err = torch.linalg.matrix_norm(R.double() - R1_64)
    assert (err <= 2 * svd_err + 1e-6).all(), (err, svd_err)


def test_warm_start_reuses_a_current_R0(steps):
    """Unchanged P (e.g. evaluation): the previous output is certified and returned without steps."""
    P = randn(3, 128, 128, dtype=torch.float32, seed=3)
    R0 = lowdin_ref(P)
    steps[0] = 0
    R = lowdin_ref(P, R0=R0)
    assert steps[0] == 0 and torch.equal(R, R0)


@pytest.mark.parametrize("kind", ["random", "nan", "unrelated_orthogonal", "far_moved"])
def test_warm_start_useless_R0_falls_back_to_cold(kind):
    P = randn(2, 48, 48, seed=5)
    R0 = {
        "random": randn(2, 48, 48, seed=6),
        "nan": torch.full((2, 48, 48), float("nan"), dtype=F64),
        "unrelated_orthogonal": polar_svd(randn(2, 48, 48, seed=8)),
        "far_moved": polar_svd(perturb(P, 0.3, seed=9)),
    }[kind]
    R = lowdin_ref(P, R0=R0)
    assert torch.equal(R, lowdin_ref(P))
    torch.testing.assert_close(R, polar_svd(P), rtol=0, atol=1e-9)


# --- iteration control --------------------------------------------------------------------------------

@pytest.mark.parametrize("k", [1, 3, len(LW._SCHEDULE) + 4])
def test_iters_runs_exactly_k_steps(k, steps):
    P = randn(64, 64, dtype=torch.float32, seed=2)
    R = lowdin_ref(P, iters=k)
    assert steps[0] == k
    if k == 1:
        assert orth_err(R) > 0.1  # one step of an N(0,1) matrix is far from orthogonal
    if k > len(LW._SCHEDULE):
        assert orth_err(R) <= 1e-5


def test_nan_input_gives_nan_quickly(steps):
    P = randn(3, 64, 64, dtype=torch.float32, seed=4)
    P[1, 10, 20] = float("nan")
    R = lowdin_ref(P)
    assert R[1].isnan().all()
    assert orth_err(R[[0, 2]]).max() <= 1e-5  # the NaN matrix does not hold the others back
    assert steps[0] <= len(LW._SCHEDULE)
    steps[0] = 0
    assert lowdin_ref(torch.full((2, 8, 8), float("nan"))).isnan().all()
    assert steps[0] == 0


def test_singular_input_terminates(steps):
    P = randn(16, 16, seed=10)
    P[:, 0] = P[:, 1]
    R = lowdin_ref(P)
    assert R.isfinite().all()
    assert steps[0] == len(LW._SCHEDULE) + LW._TAIL_STEPS
    assert orth_err(R) <= 1e-5   # finished by the SVD of the iterate: any orthogonal factor is a polar factor


@pytest.mark.parametrize("d, decades", [(8, 12), (50, 11)])
def test_ill_conditioned_input_past_the_step_cap_is_still_the_polar_factor(d, decades):
    # κ = 1e11-1e12 in float64: the schedule runs out before the smallest singular values reach 1; those
    # matrices were returned non-orthogonal (‖RᵀR − I‖ ≈ 0.4-1); now finished by an SVD of the iterate
    g = torch.Generator().manual_seed(d)
    U = torch.linalg.qr(torch.randn(d, d, dtype=torch.float64, generator=g))[0]
    V = torch.linalg.qr(torch.randn(d, d, dtype=torch.float64, generator=g))[0]
    bad = U @ torch.diag(torch.logspace(0, -decades, d, dtype=torch.float64)) @ V.T
    P = torch.stack([bad, randn(d, d, dtype=torch.float64, seed=1)])
    R = lowdin_ref(P)
    assert orth_err(R).max() <= 1e-13
    torch.testing.assert_close(R[0], U @ V.T, rtol=0, atol=1e-5)   # torch's SVD route: 1e-6 here
    torch.testing.assert_close(R[1], torch.linalg.svd(P[1])[0] @ torch.linalg.svd(P[1])[2], rtol=0, atol=1e-12)


# --- backward ------------------------------------------------------------------------------------------

class _Lowdin(torch.autograd.Function):
    @staticmethod
    def forward(ctx, P):
        R = lowdin_ref(P)
        ctx.save_for_backward(P, R)
        return R

    @staticmethod
    def backward(ctx, grad):
        P, R = ctx.saved_tensors
        return lowdin_backward_ref(grad, P, R)


@pytest.mark.parametrize("shape", [(1, 1), (3, 3), (5, 5), (2, 3, 3)], ids=["d1", "d3", "d5", "batch"])
def test_gradcheck(shape):
    d = shape[-1]
    P = (3 * torch.eye(d, dtype=F64) + randn(*shape, seed=11)).requires_grad_()
    assert torch.autograd.gradcheck(_Lowdin.apply, (P,), eps=1e-6, atol=1e-6, rtol=1e-4)


def test_backward_matches_autograd_through_svd():
    P = randn(2, 7, 7, seed=12).requires_grad_()
    G = randn(2, 7, 7, seed=13)
    (expected,) = torch.autograd.grad(polar_svd(P), P, G)
    P = P.detach()
    torch.testing.assert_close(lowdin_backward_ref(G, P, polar_svd(P)), expected, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(lowdin_backward_ref(G, P, lowdin_ref(P)), expected, rtol=1e-9, atol=1e-10)


def test_backward_float32_and_empty():
    P = randn(2, 5, 5, seed=14)
    G = randn(2, 5, 5, seed=15)
    expected = lowdin_backward_ref(G, P, lowdin_ref(P))
    got = lowdin_backward_ref(G.float(), P.float(), lowdin_ref(P.float()))
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), expected, rtol=1e-3, atol=1e-4)
    empty = torch.zeros(0, 4, 4)
    assert lowdin_backward_ref(empty, empty, empty).shape == (0, 4, 4)


# ---- lowdin_svd_ref: the SVD route with its factors ----------------------------------------------------

@pytest.mark.parametrize("shape", [(1, 1), (3, 27, 27), (2, 2, 33, 33)])
def test_lowdin_svd_ref_factors_and_backward(shape):
    P = randn(*shape, seed=30)
    R, U, S, Vh = LW.lowdin_svd_ref(P)
    torch.testing.assert_close(R, lowdin_ref(P), rtol=0, atol=1e-11)
    torch.testing.assert_close(U @ torch.diag_embed(S) @ Vh, P, rtol=1e-12, atol=1e-12)
    g = randn(*shape, seed=31)
    torch.testing.assert_close(LW.lowdin_svd_backward_ref(g, U, S, Vh), lowdin_backward_ref(g, P, R),
                               rtol=1e-9, atol=1e-9)


def test_lowdin_svd_ref_non_finite_matrix_is_nan_and_isolated():
    P = randn(3, 8, 8, seed=32)
    clean = LW.lowdin_svd_ref(P)
    P[2, 0, 0] = float("nan")
    for t, c in zip(LW.lowdin_svd_ref(P), clean):
        assert t[2].isnan().all()
        torch.testing.assert_close(t[:2], c[:2], rtol=0, atol=0)
