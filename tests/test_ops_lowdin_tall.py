"""lowdin / lowdin_svd on tall P [..., m, n] (m > n): the polar factor with orthonormal columns, U Vᴴ of the
thin SVD, forward and backward on every path (the op's kernel, the reference, the SVD route with factors, the
CUDA glue in front of the square-only Triton kernels), and the warm start's positivity check.

The accuracy rule on all sizes, batches and layouts is in test_ops_numerics.py (case "lowdin-tall")."""
import pytest
import torch

import opt_fast
from _refs import ATOL, lowdin_torch, max_err, noncontiguous
from opt_fast import _triton_glue
from opt_fast.reference.lowdin import (_warm_start, lowdin_backward_ref, lowdin_ref, lowdin_svd_backward_ref,
                                       lowdin_svd_ref)

ops = torch.ops.opt_fast
F64 = torch.float64

SHAPES = [(27, 5), (100, 33), (2, 1), (3, 1), (2, 3, 7, 4), (5, 2, 2)]


def randn(*shape, dtype=F64, seed=0):
    return torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _paths():
    return {
        "op": lambda P: ops.lowdin(P),
        "op-iters": lambda P: ops.lowdin(P, 30),  # the fixed schedule (17 steps) and Newton–Schulz after it
        "ref": lambda P: lowdin_ref(P),
        "svd": lambda P: ops.lowdin_svd(P)[0],
        "svd-ref": lambda P: lowdin_svd_ref(P)[0],
        "functional": lambda P: opt_fast.functional.lowdin(P),
    }


@pytest.mark.parametrize("layout", ["contig", "mT", "slice"])
@pytest.mark.parametrize("dtype", [torch.float32, F64], ids=["f32", "f64"])
@pytest.mark.parametrize("shape", SHAPES, ids=["x".join(map(str, s)) for s in SHAPES])
@pytest.mark.parametrize("path", list(_paths()))
def test_tall_forward_is_the_thin_svd_polar_factor(path, shape, dtype, layout):
    P = randn(*shape, dtype=dtype, seed=sum(shape))
    if layout != "contig":
        P = noncontiguous(P, layout)
    R = _paths()[path](P)
    assert R.shape == P.shape and R.dtype == dtype
    ref64 = lowdin_torch(P.double())
    err, err_torch = max_err(R, ref64), max_err(lowdin_torch(P), ref64)
    assert err <= 2 * err_torch + ATOL[dtype], f"{path}: {err:.2e} vs torch {err_torch:.2e}"
    RtR = R.double().mT @ R.double()
    torch.testing.assert_close(RtR, torch.eye(shape[-1], dtype=F64).expand_as(RtR), rtol=0, atol=10 * ATOL[dtype])


def test_one_column_is_the_normalised_vector():
    p = torch.tensor([[3.0], [-4.0]], dtype=F64)
    for path, fn in _paths().items():
        torch.testing.assert_close(fn(p), p / 5, rtol=0, atol=1e-14, msg=path)


# ---- backward ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(7, 3), (2, 9, 4), (2, 1)], ids=["7x3", "2x9x4", "2x1"])
@pytest.mark.parametrize("path", ["op", "functional"])
def test_tall_gradcheck_and_gradgradcheck(path, shape):
    P = randn(*shape, seed=3).requires_grad_()
    fn = ops.lowdin if path == "op" else opt_fast.functional.lowdin  # functional: lowdin_svd on the CPU
    assert torch.autograd.gradcheck(fn, [P])
    assert torch.autograd.gradgradcheck(fn, [P])


@pytest.mark.parametrize("layout", ["contig", "mT"])
@pytest.mark.parametrize("shape", [(27, 5), (100, 33), (2, 3, 7, 4)], ids=["27x5", "100x33", "2x3x7x4"])
def test_tall_backward_ops_match_autograd_through_svd(shape, layout):
    """lowdin_backward (kernel and reference) and lowdin_svd_backward (kernel and reference) against
    autograd through torch's thin-SVD U Vh, float64."""
    P = randn(*shape, seed=5)
    G = randn(*shape, seed=6)
    if layout == "mT":
        P, G = P.mT.contiguous().mT, G.mT.contiguous().mT
    Pg = P.clone().requires_grad_()
    want, = torch.autograd.grad(lowdin_torch(Pg), Pg, G)
    R, U, S, Vh = ops.lowdin_svd(P)
    got = {"lowdin_backward": ops.lowdin_backward(G, P, R), "lowdin_backward_ref": lowdin_backward_ref(G, P, R),
           "lowdin_svd_backward": ops.lowdin_svd_backward(G, U, S, Vh),
           "lowdin_svd_backward_ref": lowdin_svd_backward_ref(G, U, S, Vh)}
    for name, g in got.items():
        assert g.shape == P.shape
        torch.testing.assert_close(g, want, rtol=1e-9, atol=1e-10, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("requires_grad", [False, True], ids=["nograd", "grad"])
def test_tall_opcheck(requires_grad):
    P = randn(2, 6, 3, seed=7).requires_grad_(requires_grad)
    torch.library.opcheck(ops.lowdin, (P, 0, None))
    torch.library.opcheck(ops.lowdin, (P.detach().float().requires_grad_(requires_grad), 4, None))
    torch.library.opcheck(ops.lowdin_svd, (P,))
    R, U, S, Vh = ops.lowdin_svd(P.detach())
    G = randn(2, 6, 3, seed=8)
    torch.library.opcheck(ops.lowdin_backward, (G, P.detach(), R))
    torch.library.opcheck(ops.lowdin_svd_backward, (G, U, S, Vh))


def test_tall_fake_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        P = torch.empty(4, 9, 5)
        R, U, S, Vh = ops.lowdin_svd(P)
        assert ops.lowdin(P).shape == R.shape == U.shape == (4, 9, 5)
        assert S.shape == (4, 5) and Vh.shape == (4, 5, 5)


def test_tall_empty():
    for shape in [(0, 5, 3), (4, 0)]:
        P = torch.empty(shape)
        assert ops.lowdin(P).shape == lowdin_ref(P).shape == shape
        R, U, S, Vh = ops.lowdin_svd(P)
        assert R.shape == shape and S.shape == shape[:-2] + (shape[-1],) and Vh.shape == shape[:-2] + (shape[-1],) * 2


def test_tall_nan_matrix_stays_alone():
    P = randn(3, 8, 3, seed=9)
    P[1, 2, 0] = float("nan")
    for path, fn in _paths().items():
        R = fn(P)
        assert R[1].isnan().all(), path
        torch.testing.assert_close(R[[0, 2]], lowdin_torch(P[[0, 2]]), rtol=0, atol=1e-12, msg=path)


@pytest.mark.parametrize("path", ["op", "ref", "svd", "meta"])
def test_wide_is_refused_with_a_hint(path):
    P = torch.randn(3, 5, device="meta" if path == "meta" else "cpu")
    fn = {"op": ops.lowdin, "meta": ops.lowdin, "ref": lowdin_ref, "svd": ops.lowdin_svd}[path]
    name = "lowdin_svd" if path == "svd" else "lowdin"
    with pytest.raises(RuntimeError, match=rf"^opt_fast\.{name}: expected P \[\.\.\., m, n\] with m >= n "
                                           r"\(for wide P take the polar factor of P\.mT"):
        fn(P)


# ---- the warm start R0 ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("path", ["op", "ref"])
def test_tall_ignores_r0(path):
    """R0's certificate (a symmetric positive R0ᵀP) does not pin down the column space of a tall P: a
    tall R0 is checked for shape, then not used."""
    fn = ops.lowdin if path == "op" else lowdin_ref
    P = randn(2, 6, 3, seed=10)
    R = lowdin_torch(P)
    other = torch.cat([R[..., 3:, :], R[..., :3, :]], dim=-2)  # orthonormal columns, RᵀP-symmetric-looking junk
    for R0 in (R, -R, other):
        torch.testing.assert_close(fn(P, 0, R0), R, rtol=0, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, F64], ids=["f32", "f64"])
@pytest.mark.parametrize("path", ["op", "ref"])
def test_warm_start_with_a_sign_flipped_polar_factor_is_refused(path, dtype):
    """Regression: R0 = -R (or R with some columns' signs flipped in H's eigenbasis) makes R0ᵀP symmetric
    but not positive definite; it used to be returned as the answer."""
    fn = ops.lowdin if path == "op" else lowdin_ref
    P = randn(3, 6, 6, seed=11, dtype=dtype)
    R64 = lowdin_torch(P.double())
    _, _, Vh = torch.linalg.svd(P.double())
    flip = torch.ones(6, dtype=F64)
    flip[::2] = -1
    R_flip = R64 @ Vh.mT @ torch.diag(flip) @ Vh  # R Q, Q = V diag(±1) Vᵀ: symmetric, orthogonal, commutes with H
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    # The exact answer is still reused in float32, so the flipped ones (same residual ||skew(R0ᵀP)||) are
    # refused for their sign alone; in float64 the residual bound refuses even the exact one at times.
    for R0, reused in ((-R64, False), (R_flip, False), (R64, True if dtype == torch.float32 else None)):
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            out = fn(P, 0, R0.to(dtype))
        assert max_err(out, R64) <= tol
        if path == "op" and opt_fast.kernel_for("lowdin", "cpu") == "C++":
            cold = any("svd" in e.name for e in prof.events())  # the C++ cold route is an SVD
        else:
            cold = _warm_start(P, R0.to(dtype)) is None  # the reference's is iterative
        assert reused is None or cold != reused


# ---- CUDA: tall P never reaches the square-only Triton launchers --------------------------------------------------

def test_cuda_glue_routes_tall_input_to_the_reference():
    """The CUDA kernel registered for lowdin / lowdin_backward sends tall P to the reference (checked here on
    the CPU with a stand-in launcher that only accepts square input)."""
    seen = []

    def square_launcher(P, iters, R0):
        seen.append(tuple(P.shape))
        return torch.zeros(())

    fwd = _triton_glue.cuda_kernel("lowdin", square_launcher)
    P = randn(7, 3, seed=12)
    torch.testing.assert_close(fwd(P, 0, None), lowdin_ref(P), rtol=0, atol=0)
    assert fwd(randn(3, 3), 0, None).shape == () and seen == [(3, 3)]

    bwd = _triton_glue.cuda_kernel("lowdin_backward", lambda g, P, R: "launcher")
    G, R = randn(7, 3, seed=13), lowdin_ref(P)
    torch.testing.assert_close(bwd(G, P, R), lowdin_backward_ref(G, P, R), rtol=0, atol=0)
    assert bwd(randn(3, 3), randn(3, 3), randn(3, 3)) == "launcher"
    assert _triton_glue.cuda_kernel("gram_schmidt", square_launcher) is square_launcher


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, F64], ids=["f32", "f64"])
def test_tall_on_cuda(dtype):
    P = randn(2, 100, 33, seed=14, dtype=dtype).cuda().requires_grad_()
    R = ops.lowdin(P)
    ref64 = lowdin_torch(P.detach().double())
    assert max_err(R, ref64) <= 2 * max_err(lowdin_torch(P.detach()), ref64) + ATOL[dtype]
    G = torch.randn_like(R)
    got, = torch.autograd.grad(R, P, G)
    Pg = P.detach().double().requires_grad_()
    want, = torch.autograd.grad(lowdin_torch(Pg), Pg, G.double())
    torch.testing.assert_close(got.double(), want, rtol=1e-3 if dtype == torch.float32 else 1e-9,
                               atol=1e-3 if dtype == torch.float32 else 1e-10)
    R_sq = ops.lowdin(torch.randn(2, 33, 33, device="cuda", dtype=dtype))  # square still served as before
    assert R_sq.shape == (2, 33, 33)
