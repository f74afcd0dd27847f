"""Triton lowdin launchers (triton_kernels/lowdin.py, matmul.py), called directly.

``interp`` tests run on CPU tensors under TRITON_INTERPRET=1 (scripts/run_tests.sh stage 2, its own process)
or on CUDA: small d, because the interpreter runs every program in numpy (a forward call ~1-3 s). The
interpreter computes float32 products exactly, so these tests check logic (tiling, masks, the triangle
mirror, the schedule, NaN isolation, the backward's algebra), not TF32/bf16 effects. ``gpu`` tests repeat the
accuracy checks at d = 576 / 1024 on CUDA.
"""
import math

import pytest
import torch
from _refs import INTERPRET
from _refs import triton_device as _device

from opt_fast.reference.lowdin import lowdin_backward_ref, lowdin_ref

pytestmark = [
    pytest.mark.interp,
    # Triton 3.6's interpreter indexes with 1-element numpy arrays (NumPy's deprecation, not ours)
    pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning"),
]

triton = pytest.importorskip("triton", reason="Triton is not installed")


@pytest.fixture
def dev():
    return _device()


@pytest.fixture
def T():
    _device()
    from opt_fast.triton_kernels import lowdin as mod
    return mod


@pytest.fixture
def MM():
    _device()
    from opt_fast.triton_kernels import matmul as mod
    return mod


@pytest.fixture
def small_tiles(MM):
    """16×16 tiles: several tiles (and off-diagonal triangle tiles) already at d = 33."""
    old = MM.BLOCK_OVERRIDE
    MM.BLOCK_OVERRIDE = (16, 16)
    yield
    MM.BLOCK_OVERRIDE = old


def polar64(P):
    U, _, Vh = torch.linalg.svd(P.detach().double())
    return U @ Vh


def fro(x):
    return torch.linalg.matrix_norm(x.double())


def orth(R):
    d = R.shape[-1]
    eye = torch.eye(d, dtype=torch.float64, device=R.device)
    return (fro(R.double().mT @ R.double() - eye) / math.sqrt(d)).max().item()


def check_polar(R, P, atol):
    """The accuracy rule: ||R - polar64|| <= 2 ||svd_polar(P) - polar64|| + atol, per matrix."""
    exact = polar64(P)
    U, _, Vh = torch.linalg.svd(P)
    err = fro(R - exact)
    err_svd = fro(U @ Vh - exact)
    assert (err <= 2 * err_svd + atol).all(), (err, err_svd)


ATOL = {torch.float32: 5e-6, torch.float64: 1e-12}


# ---- the kernel ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("d", [5, 33])
def test_symmetric_gram_triangle(MM, small_tiles, dev, dtype, d):
    X = torch.randn(3, d, d, dtype=dtype, device=dev)
    A = torch.full_like(X, float("nan"))   # every entry must be written (the mirror included)
    err2 = MM.mm(A, [(X.mT, X, 1.0)], sym=1, err=True)
    ref = X.double().mT @ X.double()
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    assert ((A.double() - ref).abs().max() / ref.abs().max()).item() < tol
    assert torch.equal(A, A.mT)
    eye = torch.eye(d, dtype=torch.float64, device=dev)
    torch.testing.assert_close(err2.double(), fro(ref - eye) ** 2, rtol=tol, atol=0)


def test_general_and_skew_products(MM, small_tiles, dev):
    d = 37
    X, Y, Z = (torch.randn(2, d, d, dtype=torch.float64, device=dev) for _ in range(3))
    out = torch.empty_like(X)
    MM.mm(out, [(X, Y.mT, 1.0), (Y.mT, Z, -1.0), (Z, X, 0.5)], xin=Z[:, :, :].mT, alpha=0.25, beta=-2.0)
    torch.testing.assert_close(out, 0.25 * Z.mT - 2.0 * (X @ Y.mT - Y.mT @ Z + 0.5 * Z @ X))
    MM.mm(out, [(X.mT, Y, 1.0), (Y.mT, X, -1.0)], sym=-1)   # XᵀY - YᵀX, upper tiles only
    torch.testing.assert_close(out, X.mT @ Y - Y.mT @ X)
    assert torch.equal(out, -out.mT)
    R = torch.randn(2, 12, 20, dtype=torch.float64, device=dev)   # rectangular
    out = torch.empty(2, 12, 12, dtype=torch.float64, device=dev)
    MM.mm(out, [(R, R.mT, 1.0)], sym=1)
    torch.testing.assert_close(out, R @ R.mT)


# ---- forward ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype,d,b", [
    (torch.float32, 1, 2), (torch.float32, 2, 3), (torch.float32, 5, 2), (torch.float32, 17, 1),
    (torch.float32, 64, 2), (torch.float64, 5, 2), (torch.float64, 33, 1),
])
def test_converge_vs_svd_polar(T, dev, dtype, d, b):
    P = torch.randn(b, d, d, dtype=dtype, device=dev)
    R = T.lowdin(P)
    assert R.shape == P.shape and R.dtype == dtype
    check_polar(R, P, ATOL[dtype])
    assert orth(R) <= (2e-6 if dtype == torch.float32 else 1e-13)


def test_converge_multitile_matches_reference(T, small_tiles, dev):
    P = torch.randn(1, 20, 20, dtype=torch.float64, device=dev)   # 2×2 tiles, 3 of them computed
    R = T.lowdin(P)
    torch.testing.assert_close(R, lowdin_ref(P), rtol=0, atol=1e-13)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("iters", [1, 4, 18])
def test_fixed_iters_equal_reference(T, dev, dtype, iters):
    P = torch.randn(2, 9, 9, dtype=dtype, device=dev)
    tol = 2e-6 if dtype == torch.float32 else 1e-14
    torch.testing.assert_close(T.lowdin(P, iters), lowdin_ref(P, iters), rtol=0, atol=tol)


def test_batch_dims_transposed_input(T, dev):
    base = torch.randn(2, 2, 7, 7, dtype=torch.float64, device=dev)
    P = base.mT   # non-contiguous
    R = T.lowdin(P)
    assert R.shape == (2, 2, 7, 7)
    torch.testing.assert_close(R, polar64(P), rtol=0, atol=1e-13)


def test_empty_batch(T, dev):
    P = torch.randn(0, 4, 4, device=dev)
    assert T.lowdin(P).shape == (0, 4, 4)
    assert T.lowdin_backward(P, P, P).shape == (0, 4, 4)


def test_checks(T, dev):
    with pytest.raises(RuntimeError, match="lowdin"):
        T.lowdin(torch.randn(2, 3, 4, device=dev))
    with pytest.raises(RuntimeError, match="iters"):
        T.lowdin(torch.randn(3, 3, device=dev), -1)


def test_nan_isolated(T, dev):
    P = torch.randn(3, 6, 6, device=dev)
    P[1, 2, 3] = float("nan")
    R = T.lowdin(P)
    assert torch.isnan(R[1]).all()
    check_polar(R[[0, 2]], P[[0, 2]], ATOL[torch.float32])


def test_tall_matches_reference(T, dev):
    # m > n: the polar factor of a tall matrix (the kernels are square; the launcher serves it by the
    # reference, never by reshaping it into square blocks)
    P = torch.randn(3, 12, 4, dtype=torch.float64, device=dev)
    R = T.lowdin(P)
    torch.testing.assert_close(R, lowdin_ref(P), rtol=0, atol=1e-12)
    G = torch.randn_like(P)
    torch.testing.assert_close(T.lowdin_backward(G, P, R), lowdin_backward_ref(G, P, R), rtol=0, atol=1e-12)


def test_r0_certified_reuse(T, dev):
    P = torch.randn(2, 12, 12, dtype=torch.float64, device=dev)
    R0 = polar64(P)                                  # exact: accepted, polished at most
    R = T.lowdin(P, 0, R0)
    torch.testing.assert_close(R, R0, rtol=0, atol=1e-14)
    assert R.data_ptr() != R0.data_ptr()
    stale = polar64(P + 1e-3 * torch.randn_like(P))  # stale: cold start, same result as without R0
    torch.testing.assert_close(T.lowdin(P, 0, stale), lowdin_ref(P, 0, stale), rtol=0, atol=1e-13)
    bad = R0.clone()
    bad[0, 0, 0] = float("nan")                      # non-finite R0: cold start
    torch.testing.assert_close(T.lowdin(P, 0, bad), polar64(P), rtol=0, atol=1e-13)
    # -R0 is orthogonal and -R0ᵀP symmetric (negative definite): not the polar factor, a cold start
    torch.testing.assert_close(T.lowdin(P, 0, -R0), polar64(P), rtol=0, atol=1e-13)


# ---- backward --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype,d,b", [(torch.float32, 17, 2), (torch.float64, 6, 2), (torch.float64, 1, 2)])
def test_backward_vs_reference(T, dev, dtype, d, b):
    P = torch.randn(b, d, d, dtype=dtype, device=dev)
    G = torch.randn_like(P)
    R = T.lowdin(P)
    dP = T.lowdin_backward(G, P, R)
    ref = lowdin_backward_ref(G.double(), P.double(), polar64(P))
    rel = (fro(dP - ref) / fro(ref).clamp_min(1e-300)).max().item()
    assert rel < (2e-5 if dtype == torch.float32 else 1e-12), rel


def test_backward_multitile_expanded_grad(T, small_tiles, dev):
    P = torch.randn(1, 18, 18, dtype=torch.float64, device=dev)
    G = torch.ones(1, 1, 1, dtype=torch.float64, device=dev).expand(1, 18, 18)   # stride-0 grad
    R = polar64(P)
    torch.testing.assert_close(T.lowdin_backward(G, P, R), lowdin_backward_ref(G, P, R), rtol=1e-10, atol=1e-12)


def test_gradcheck_float64(T, dev):
    class F(torch.autograd.Function):
        @staticmethod
        def forward(ctx, P):
            R = T.lowdin(P)
            ctx.save_for_backward(P, R)
            return R

        @staticmethod
        def backward(ctx, g):
            P, R = ctx.saved_tensors
            return T.lowdin_backward(g, P, R)

    P = torch.randn(1, 3, 3, dtype=torch.float64, device=dev, requires_grad=True)
    assert torch.autograd.gradcheck(F.apply, (P,), fast_mode=True, eps=1e-6, atol=1e-7)


# ---- approximate mode ------------------------------------------------------------------------------------

def test_orthogonalize_approx_matches_torch(T, dev):
    """lowp=False: float32 products, torch's float32 result. (The default on a GPU, bfloat16 products,
    differs from it by up to ~4e-2: test_gpu_orthogonalize_approx_bf16 compares it with an emulation.)"""
    from opt_fast.functional import _orthogonalize_approx_torch
    G = torch.randn(2, 12, 20, device=dev)
    torch.testing.assert_close(T.orthogonalize_approx(G, lowp=False), _orthogonalize_approx_torch(G, 5),
                               rtol=1e-4, atol=1e-5)
    Gt = G.mT   # tall: the iteration runs on the transpose
    torch.testing.assert_close(T.orthogonalize_approx(Gt, lowp=False), _orthogonalize_approx_torch(Gt, 5),
                               rtol=1e-4, atol=1e-5)


def test_bf16_emulation_is_not_float32():
    """The emulation the GPU test compares the bfloat16 mode with is far from float32 (what made the old
    float32 comparison at rtol 1e-4 fail on CUDA) and close to float32 with its roundings removed."""
    from _refs import orthogonalize_approx_bf16_torch
    from opt_fast.functional import _orthogonalize_approx_torch
    G = torch.randn(2, 12, 20)
    f32 = _orthogonalize_approx_torch(G, 5)
    emul = orthogonalize_approx_bf16_torch(G, 5)
    rel = (fro(emul - f32) / fro(f32)).max().item()
    assert 1e-3 < rel < 1e-1, rel


# ---- launch grid and configuration -----------------------------------------------------------------------

def test_batch_sliced_when_grid_is_full(MM, small_tiles, dev, monkeypatch):
    """More programs than one grid axis holds: the batch goes in slices (here 2 matrices of 3 tiles per
    launch), with the per-matrix error measurement stitched back in order."""
    monkeypatch.setattr(MM, "MAX_PROGRAMS", 6)
    X = torch.randn(5, 20, 20, dtype=torch.float64, device=dev)
    A = torch.full_like(X, float("nan"))
    err2 = MM.mm(A, [(X.mT, X, 1.0)], sym=1, err=True)
    ref = X.mT @ X
    torch.testing.assert_close(A, ref)
    eye = torch.eye(20, dtype=torch.float64, device=dev)
    torch.testing.assert_close(err2, fro(ref - eye) ** 2)
    Y = torch.empty_like(X)
    MM.mm(Y, [(X, A, 1.0)], xin=X, alpha=1.5, beta=-0.5)
    torch.testing.assert_close(Y, 1.5 * X - 0.5 * X @ ref)


def test_float64_coefficients_exact(MM, dev):
    """alpha and beta reach the kernel as float32 arguments, three per float64 coefficient: exact."""
    X = torch.eye(3, dtype=torch.float64, device=dev)[None]
    out = torch.empty_like(X)
    a, b = 1.0 / 3.0, -math.pi
    MM.mm(out, [(X, X, 1.0)], xin=X, alpha=a, beta=b)
    assert out[0, 0, 0].item() == a + b and out[0, 0, 1].item() == 0.0


# ---- on a GPU (CI deselects these) -----------------------------------------------------------------------

@pytest.mark.gpu
def test_gpu_orthogonalize_approx_bf16():
    if not torch.cuda.is_available() or INTERPRET:
        pytest.skip("needs CUDA (and TRITON_INTERPRET unset)")
    from _refs import orthogonalize_approx_bf16_torch
    from opt_fast.triton_kernels import lowdin as T
    for shape in ((2, 12, 20), (3, 200, 90)):
        G = torch.randn(*shape, device="cuda")
        X = T.orthogonalize_approx(G)   # bfloat16 products: as the emulation, up to float32 summation order
        rel = (fro(X - orthogonalize_approx_bf16_torch(G, 5)) / fro(X)).max().item()
        assert rel < 1e-2, (shape, rel)


@pytest.mark.gpu
def test_gpu_smoke_triton_kernels():
    """Every Triton kernel variant once at small sizes (scripts/gpu_run.sh runs this under compute-sanitizer)."""
    if not torch.cuda.is_available() or INTERPRET:
        pytest.skip("needs CUDA (and TRITON_INTERPRET unset)")
    from opt_fast.triton_kernels import lowdin as T
    for dtype in (torch.float32, torch.float64):
        for d in (5, 40, 70):
            P = torch.randn(2, d, d, dtype=dtype, device="cuda")
            R = T.lowdin(P)
            T.lowdin(P, 0, R)
            T.lowdin(P, 3)
            dP = T.lowdin_backward(torch.randn_like(P), P, R)
            assert torch.isfinite(R).all() and torch.isfinite(dP).all()
    T.orthogonalize_approx(torch.randn(2, 40, 70, device="cuda"))
    torch.cuda.synchronize()


@pytest.mark.gpu
def test_gpu_fixed_iters_no_host_sync():
    """A fixed number of steps neither synchronises nor copies host-to-device (coefficients are arguments)."""
    if not torch.cuda.is_available() or INTERPRET:
        pytest.skip("needs CUDA (and TRITON_INTERPRET unset)")
    from opt_fast.triton_kernels import lowdin as T
    P = torch.randn(4, 80, 80, device="cuda")
    T.lowdin(P, 6)   # compiles, caches the tile lists
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        T.lowdin(P, 6)
    finally:
        torch.cuda.set_sync_debug_mode("default")


# ---- on a GPU (CI deselects these) -----------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("d,b", [(576, 2), (1024, 1)])
def test_gpu_large(d, b):
    if not torch.cuda.is_available() or INTERPRET:
        pytest.skip("needs CUDA (and TRITON_INTERPRET unset)")
    from opt_fast.triton_kernels import lowdin as T
    P = torch.randn(b, d, d, device="cuda")
    R = T.lowdin(P)
    assert orth(R) <= 1e-5
    check_polar(R, P, 1e-6)
    torch.testing.assert_close(torch.ops.opt_fast.lowdin(P), R)   # the op is served by the launcher
    G = torch.randn_like(P)
    ref = lowdin_backward_ref(G.double(), P.double(), polar64(P))
    rel = (fro(T.lowdin_backward(G, P, R) - ref) / fro(ref)).max().item()
    assert rel < 1e-4, rel
    R0 = polar64(P).float()
    assert orth(T.lowdin(P, 0, R0)) <= 1e-5
    Pm = P + 1e-3 * torch.randn_like(P)
    check_polar(T.lowdin(Pm, 0, R), Pm, 1e-6)
    X = T.orthogonalize_approx(P)
    sv = torch.linalg.svdvals(X.double())
    assert sv.max() < 1.3
