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


# ---- what the iteration is, exactly, and what it refuses ----------------------------------------------------

def _scalar_map_oracle(G, steps=5):
    """U diag(p^steps(σ / ||G||_F)) Vᴴ from the SVD in double precision: what the iteration computes in exact
    arithmetic, p(x) = a x + b x³ + c x⁵ with Muon's coefficients."""
    from opt_fast.functional import MUON_COEFS

    a, b, c = MUON_COEFS
    G = G.to(torch.complex128 if G.is_complex() else torch.float64)
    U, S, Vh = torch.linalg.svd(G, full_matrices=False)
    x = S / (torch.linalg.matrix_norm(G)[..., None] + 1e-7)
    for _ in range(steps):
        x = a * x + b * x ** 3 + c * x ** 5
    return U @ (x[..., :, None].to(U.dtype) * Vh)


@pytest.mark.parametrize("dtype", [torch.float64, torch.complex128, torch.complex64, torch.float32])
@pytest.mark.parametrize("shape", [(12, 12), (20, 7), (7, 20), (2, 3, 9, 5)], ids=["12x12", "20x7", "7x20", "2x3x9x5"])
def test_is_the_scalar_map_on_the_singular_values(shape, dtype):
    """Real and complex G (A = X Xᴴ: with Xᵀ a complex G's singular values blew up to ~1e200)."""
    G = torch.randn(*shape, dtype=dtype, generator=torch.Generator().manual_seed(3))
    X = orthogonalize_approx(G)
    assert X.shape == G.shape and X.dtype == G.dtype
    tol = 1e-10 if dtype in (torch.float64, torch.complex128) else 1e-4
    torch.testing.assert_close(X.to(_scalar_map_oracle(G).dtype), _scalar_map_oracle(G), rtol=0, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precisions_keep_their_dtype(dtype):
    G = torch.randn(2, 30, 20, generator=torch.Generator().manual_seed(4)).to(dtype)
    X = orthogonalize_approx(G)
    assert X.dtype == dtype and X.shape == G.shape
    torch.testing.assert_close(X.double(), _scalar_map_oracle(G.double()), rtol=0, atol=0.1)


@pytest.mark.parametrize("shape", [(0, 4, 3), (5, 0), (0, 0)])
def test_empty(shape):
    assert orthogonalize_approx(torch.empty(shape)).shape == shape


@pytest.mark.parametrize("G,steps,match", [
    (torch.tensor(1.0), 5, r"expected G to have at least 2 dimensions \[\.\.\., rows, cols\], got shape \[\]"),
    (torch.ones(4), 5, r"expected G to have at least 2 dimensions \[\.\.\., rows, cols\], got shape \[4\]"),
    (torch.ones(3, 3, dtype=torch.int64), 5, r"expected G to be float16, bfloat16, float32, float64, complex64 or "
                                              r"complex128, got torch\.int64"),
    (torch.ones(3, 3, dtype=torch.bool), 5, r"expected G to be float16, .*, got torch\.bool"),
    (torch.ones(3, 3), -1, r"expected steps to be an int >= 0, got -1"),
    (torch.ones(3, 3), 2.5, r"expected steps to be an int >= 0, got 2\.5"),
    (torch.ones(3, 3), True, r"expected steps to be an int >= 0, got True"),
    ([[1.0, 2.0]], 5, r"expected G to be a Tensor, got list"),
], ids=["0d", "1d", "int64", "bool", "steps<0", "steps-float", "steps-bool", "list"])
def test_bad_input_names_the_function(G, steps, match):
    with pytest.raises(RuntimeError, match=rf"^opt_fast\.functional\.orthogonalize_approx: {match}"):
        orthogonalize_approx(G, steps)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_entry_validates_and_complex_takes_the_torch_path():
    with pytest.raises(RuntimeError, match=r"^opt_fast\.functional\.orthogonalize_approx: expected G to have"):
        orthogonalize_approx(torch.ones(4, device="cuda"))
    G = torch.randn(20, 7, dtype=torch.complex64, device="cuda")
    torch.testing.assert_close(orthogonalize_approx(G).cpu().to(torch.complex128), _scalar_map_oracle(G.cpu()),
                               rtol=0, atol=1e-4)
    X = orthogonalize_approx(torch.randn(2, 40, 24, device="cuda"))  # the Triton kernels (bf16 products)
    assert X.dtype == torch.float32 and X.shape == (2, 40, 24)
