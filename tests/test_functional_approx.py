"""opt_fast.functional.orthogonalize_approx: the Muon-style approximate mode (CPU path: plain torch)."""
import pytest
import torch

from opt_fast.functional import orthogonalize_approx


def _with_singular_values(m, n, s, seed=0):
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(m, len(s), generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n, len(s), generator=g, dtype=torch.float64))
    return U @ torch.diag(torch.tensor(s, dtype=torch.float64)) @ V.mT


@pytest.mark.parametrize("m,n", [(40, 40), (60, 30), (30, 60)])
def test_singular_values_land_near_one_when_not_tiny(m, n):
    k = min(m, n)
    s = torch.linspace(0.05, 1.0, k).tolist()   # σ / ||G||_F >= 0.05/||s|| > 3e-3: the documented regime
    G = _with_singular_values(m, n, s)
    X = orthogonalize_approx(G)
    assert X.shape == G.shape and X.dtype == G.dtype
    sv = torch.linalg.svdvals(X)
    assert sv.min() > 0.65 and sv.max() < 1.25
    # same singular vectors: X = U f(Σ) Vᵀ, so XᵀG is symmetric positive semi-definite
    H = X.mT @ G
    torch.testing.assert_close(H, H.mT, rtol=0, atol=1e-8)


def test_batched_and_float32():
    G = torch.randn(3, 2, 20, 12)
    X = orthogonalize_approx(G)
    assert X.shape == G.shape and X.dtype == torch.float32
    torch.testing.assert_close(X[1, 0], orthogonalize_approx(G[1, 0]), rtol=1e-5, atol=1e-6)


def test_is_approximate_for_ill_conditioned_square_input():
    # OPT's N(0,1) square P: the small singular values stay small; lowdin is the exact map
    P = torch.randn(200, 200, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    assert torch.linalg.svdvals(orthogonalize_approx(P)).min() < 0.5


def test_no_gradient_flows():
    G = torch.randn(8, 8, requires_grad=True)
    assert not orthogonalize_approx(G).requires_grad


def test_cuda_route_is_the_triton_kernel_when_triton_loads():
    # functional reaches the Triton kernel through _backends (it must not import opt_fast.triton_kernels,
    # which imports functional): registered exactly when Triton is available
    from opt_fast import _backends
    from opt_fast.triton_kernels import HAS_TRITON

    assert (_backends.triton_approx is not None) == HAS_TRITON
    if HAS_TRITON:
        from opt_fast.triton_kernels.lowdin import orthogonalize_approx as triton_approx

        assert _backends.triton_approx is triton_approx
