"""householder_orthogonal / householder_apply do not depend on the length of a reflector (H(v) = H(cv), c > 0),
and neither may the kernels, over the whole floating-point range: vᵀv overflows or underflows long before v
does (float32 from |v| ~ 1e±19, float64 ~ 1e±154), which gave all NaN (tiny v) or the identity (huge v).

Run on the CPU by whichever kernel serves the op: the C++ kernels (every path: small d, the UT form for
batches, apply's panels), and the references in the references-only stage (OPT_FAST_DISABLE_EXT=1). The CUDA
kernels have the same tests, per path, in test_cuda_kernels.py. Gradients scale like 1/|v|: checked against
the unscaled gradient and by gradcheck through V = s·U.
"""
import pytest
import torch

import opt_fast  # noqa: F401  (registers torch.ops.opt_fast)

ops = torch.ops.opt_fast
F32, F64 = torch.float32, torch.float64
SCALES = {F32: [1e-30, 1e-20, 1e-10, 1e10, 1e20, 1e30],
          F64: [1e-300, 1e-200, 1e-100, 1e-20, 1e20, 1e100, 1e200, 1e300]}
EPS = {F32: torch.finfo(F32).eps, F64: torch.finfo(F64).eps}
# (d, k, n, batch): the CPU paths: small d (batch <= 8), the UT form (batch 16, d = 100), apply in several
# panels of 64 reflectors (k = 130), and d = 1
CASES = [(27, 27, 5, ()), (27, 27, 5, (16,)), (100, 60, 7, ()), (150, 130, 3, ()), (1, 1, 1, ())]
IDS = ["d27", "d27-b16", "d100", "d150-k130", "d1"]


def inputs(d, k, n, batch, dtype):
    V = torch.randn(*batch, d, k, dtype=F64).to(dtype)
    X = torch.randn(*batch, d, n, dtype=F64).to(dtype)
    return V, X


def assert_close_scaled(out, ref, dtype, what):
    """|out - ref| <= 100 eps max(1, |ref|): the rounding of V·s perturbs the result by a few eps."""
    assert not out.isnan().any(), f"{what}: NaN"
    bound = 100 * EPS[dtype] * max(1.0, ref.abs().max().item())
    err = (out - ref).abs().max().item()
    assert err <= bound, f"{what}: err {err:.3e} > {bound:.3e}"


@pytest.mark.parametrize("dtype", [F32, F64], ids=["f32", "f64"])
@pytest.mark.parametrize("d,k,n,batch", CASES, ids=IDS)
def test_forward_is_scale_invariant(d, k, n, batch, dtype):
    V, X = inputs(d, k, n, batch, dtype)
    Q0, Y0 = ops.householder_orthogonal(V), ops.householder_apply(V, X)
    for s in SCALES[dtype]:
        assert_close_scaled(ops.householder_orthogonal(V * s), Q0, dtype, f"householder_orthogonal, scale {s:g}")
        assert_close_scaled(ops.householder_apply(V * s, X), Y0, dtype, f"householder_apply, scale {s:g}")


@pytest.mark.parametrize("dtype", [F32, F64], ids=["f32", "f64"])
@pytest.mark.parametrize("d,k,n,batch", CASES, ids=IDS)
def test_power_of_two_scales_give_the_same_bits(d, k, n, batch, dtype):
    # rescaling is by powers of two, which is exact: V·2^e and V are the same problem in every bit
    V, X = inputs(d, k, n, batch, dtype)
    Q0, Y0 = ops.householder_orthogonal(V), ops.householder_apply(V, X)
    for e in ([-100, -70, -30, 30, 70, 100] if dtype == F32 else [-900, -300, 300, 900]):
        Vs = V * 2.0 ** e
        assert torch.equal(ops.householder_orthogonal(Vs), Q0), e
        assert torch.equal(ops.householder_apply(Vs, X), Y0), e


@pytest.mark.parametrize("dtype", [F32, F64], ids=["f32", "f64"])
@pytest.mark.parametrize("d,k,n,batch", CASES[:4], ids=IDS[:4])
def test_mixed_column_scales_and_zero_columns(d, k, n, batch, dtype):
    # every reflector at its own scale, across the whole range; a zero column stays the identity reflector
    V, X = inputs(d, k, n, batch, dtype)
    V[..., 1] = 0
    top = 30 if dtype == F32 else 300
    s = 10.0 ** (torch.rand(k, dtype=F64) * 2 * top - top)
    Vs = (V.double() * s).to(dtype)
    Q0 = ops.householder_orthogonal(V)
    assert_close_scaled(ops.householder_orthogonal(Vs), Q0, dtype, "householder_orthogonal")
    assert_close_scaled(ops.householder_apply(Vs, X), ops.householder_apply(V, X), dtype, "householder_apply")
    # the zero reflector is the identity: dropping it changes nothing
    keep = [j for j in range(k) if j != 1]
    assert_close_scaled(ops.householder_orthogonal(Vs[..., keep]), Q0, dtype, "without the zero column")


@pytest.mark.parametrize("dtype", [F32, F64], ids=["f32", "f64"])
@pytest.mark.parametrize("d,k,n,batch", CASES, ids=IDS)
def test_backward_scales_like_one_over_the_scale(d, k, n, batch, dtype):
    # f(sV) = f(V), so s ∇f(sV) = ∇f(V); the gradient w.r.t. X does not depend on s
    V, X = inputs(d, k, n, batch, dtype)
    G, GX = torch.randn(*batch, d, d, dtype=dtype), torch.randn(*batch, d, n, dtype=dtype)
    dV0 = ops.householder_orthogonal_backward(G, V)
    aV0, aX0 = ops.householder_apply_backward(GX, V, X)
    for s in (SCALES[dtype][1], SCALES[dtype][-2]) if dtype == F32 else SCALES[dtype]:
        assert_close_scaled(ops.householder_orthogonal_backward(G, V * s) * s, dV0, dtype, f"orthogonal dV, {s:g}")
        aV, aX = ops.householder_apply_backward(GX, V * s, X)
        assert_close_scaled(aV * s, aV0, dtype, f"apply dV, scale {s:g}")
        assert_close_scaled(aX, aX0, dtype, f"apply dX, scale {s:g}")


@pytest.mark.parametrize("scale", [1e-20, 1e20, "mixed"])
@pytest.mark.parametrize("d,k,n", [(5, 3, 2), (6, 6, 3)])
def test_gradcheck_at_scale(d, k, n, scale):
    # gradcheck of U -> op(s·U) (float64): the op's backward runs at V = s·U, and its gradient, ~1/s, comes
    # back to U's scale through the product with s
    s = torch.tensor([1e-20, 1.0, 1e20] * k, dtype=F64)[:k] if scale == "mixed" else scale
    U = torch.randn(d, k, dtype=F64, requires_grad=True)
    X = torch.randn(d, n, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda U: ops.householder_orthogonal(U * s), (U,))
    assert torch.autograd.gradcheck(lambda U, X: ops.householder_apply(U * s, X), (U, X))
