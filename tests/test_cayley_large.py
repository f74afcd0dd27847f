"""cayley at OPT's large fan-ins in float32, the CPU kernel (csrc/cpu/cayley.cpp, polish_orthogonality) and
the reference (what CUDA runs): from d = 769 one Newton–Schulz step keeps R orthogonal to the 1e-5 OPT needs,
where the inverse alone drifts past it (1.8e-5 at d = 2048 for an N(0, 1) P), without moving it away from
the float64 map."""
import math

import pytest
import torch

import opt_fast
from opt_fast.reference.cayley import cayley_ref

KERNELS = [pytest.param(lambda S: torch.ops.opt_fast.cayley(S), id="op",
                         marks=pytest.mark.skipif(not opt_fast.has_kernel("cayley", "CPU"),
                                                  reason="C++ CPU kernels not built")),
           pytest.param(cayley_ref, id="reference")]


def _opt_skew(*shape):
    """S = triu(P) - triu(P)ᵀ of an N(0, 1) P: the cayley method's released init, its worst-conditioned."""
    U = torch.triu(torch.randn(*shape, dtype=torch.float64))
    return U - U.mT


def _orth(Q):
    Q = Q.double()
    eye = torch.eye(Q.shape[-1], dtype=Q.dtype)
    return float((torch.linalg.matrix_norm(Q.mT @ Q - eye) / math.sqrt(Q.shape[-1])).max())


@pytest.mark.parametrize("cayley", KERNELS)
@pytest.mark.parametrize("shape", [(1152, 1152), (2, 800, 800)])
def test_float32_stays_orthogonal_and_close_to_the_float64_map(shape, cayley):
    torch.manual_seed(0)
    S = _opt_skew(*shape)
    Q = cayley(S.float())
    exact = cayley_ref(S)
    plain = torch.linalg.solve(torch.eye(shape[-1], dtype=torch.float32) - S.float(),
                               torch.eye(shape[-1], dtype=torch.float32) + S.float())
    assert _orth(Q) <= 1e-6, _orth(Q)    # the LU inverse alone: ~1e-5 here, torch.linalg.solve ~5e-5
    assert (Q.double() - exact).abs().max() <= 2 * (plain.double() - exact).abs().max()


@pytest.mark.parametrize("cayley", KERNELS)
def test_non_finite_and_batches_after_the_polish(cayley):
    torch.manual_seed(1)
    S = _opt_skew(3, 780, 780).float()
    S[1, 4, 7] = float("inf")
    Q = cayley(S)
    assert torch.isnan(Q[1]).all() and torch.isfinite(Q[[0, 2]]).all()
    torch.testing.assert_close(Q[2], cayley(S[2]))   # batched = one at a time


def test_the_reference_skips_the_step_where_products_may_run_in_tf32():
    torch.manual_seed(2)
    S = _opt_skew(1024, 1024).float()
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        polished = _orth(cayley_ref(S))
        torch.set_float32_matmul_precision("high")
        plain = _orth(cayley_ref(S))
    finally:
        torch.set_float32_matmul_precision(before)
    assert polished <= 1e-6 < plain
