"""The direct small-matrix CPU paths of cayley and gram_schmidt (csrc/cpu/cayley_small.h,
csrc/cpu/gram_schmidt_small.h), on both sides of their thresholds, against the float64 references. Just
over 400 lines: both paths share the threshold cases and the one-ulp checks below.

Which path runs is decided in C++ by size (the constants below mirror the headers). The small paths work in
double whatever the input dtype, which makes them observable from here: a float32 result of a small path is
the float64 result on the same float32 inputs rounded once (error within an ulp), while LAPACK's float32
factorisations just above the thresholds are 1.5-20x further off than that. test_*_float32_is_rounded_float64
use this to check that the small path ran up to the threshold; everything else compares each path with the
reference (the spec), and the path on one side of the threshold with the path on the other.
"""
import math

import pytest
import torch

import opt_fast
from opt_fast.reference.cayley import cayley_ref
from opt_fast.reference.gram_schmidt import gram_schmidt_backward_ref, gram_schmidt_ref

from _refs import ATOL, cayley_torch, gram_schmidt_torch, max_err, noncontiguous, orth_err, skew, threads

pytestmark = pytest.mark.skipif(
    not (opt_fast.has_kernel("cayley", "CPU") and opt_fast.has_kernel("gram_schmidt", "CPU")),
    reason="C++ CPU kernels not built")

ops = torch.ops.opt_fast
F32, F64 = torch.float32, torch.float64

# The thresholds of the headers: cayley d <= 64; gram_schmidt (forward and backward) m·n <= 64².
CAYLEY_D = 64

SINGULAR = r"opt_fast\.cayley: I - S is singular"
DEFICIENT = r"opt_fast\.gram_schmidt_backward: P is rank deficient"


def randn(*shape, dtype=F64):
    return torch.randn(*shape, dtype=F64).to(dtype)


def assert_rest_of_batch_unaffected(part_of_batch, alone):
    """The matrices of a batch next to a NaN/inf one give what they give alone. To rounding, not bit for bit:
    the batched LAPACK paths may round a matrix differently by its place in the batch (MKL's kernels depend
    on alignment); a contaminated result would be NaN or off by O(1)."""
    torch.testing.assert_close(part_of_batch, alone)


def skew_input(*shape, dtype=F64):
    return skew(torch.randn(*shape, dtype=F64)).to(dtype)


def close64(a, b, scale=1.0):
    assert a.dtype == b.dtype == F64 and a.shape == b.shape
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-11 * scale)


def ulp_bound(ref):
    """One float32 ulp of the largest entry: what rounding a float64 result once may cost, with room for the
    ~1e-15 difference between two float64 computations."""
    return 2.0 ** -23 * max(1.0, ref.abs().max().item())


def gs_grad_torch(P, G):
    """The same-dtype PyTorch yardstick of the backward: autograd through torch.linalg.qr + sign fix."""
    x = P.detach().clone().requires_grad_(True)
    return torch.autograd.grad(gram_schmidt_torch(x), x, G)[0]


def check_cayley(S):
    """float64: tight against the reference; float32: the 2x accuracy rule against float64."""
    Q = ops.cayley(S)
    assert Q.shape == S.shape and Q.dtype == S.dtype and Q.is_contiguous()
    ref = cayley_ref(S.double())
    if S.dtype == F64:
        close64(Q, ref)
    else:
        e, e_t = max_err(Q, ref), max_err(cayley_torch(S), ref)
        assert e <= 2 * e_t + ATOL[F32], f"err {e:.3e} > 2 x torch {e_t:.3e}"
    return Q


def check_gs(P, G=None):
    """Forward and backward against the reference, as check_cayley."""
    Q = ops.gram_schmidt(P, 0)
    assert Q.shape == P.shape and Q.dtype == P.dtype and Q.is_contiguous()
    G = randn(*P.shape, dtype=P.dtype) if G is None else G
    dP = ops.gram_schmidt_backward(G, P, Q)
    assert dP.shape == P.shape and dP.dtype == P.dtype and dP.is_contiguous()
    P64, G64 = P.double(), G.double()
    ref = gram_schmidt_ref(P64)
    gref = gram_schmidt_backward_ref(G64, P64, ref)
    if P.dtype == F64:
        close64(Q, ref)
        close64(dP, gref, scale=P.shape[-2])
    else:
        e, e_t = max_err(Q, ref), max_err(gram_schmidt_torch(P), ref)
        assert e <= 2 * e_t + ATOL[F32], f"forward: err {e:.3e} > 2 x torch {e_t:.3e}"
        e, e_t = max_err(dP, gref), max_err(gs_grad_torch(P, G), gref)
        scale = gref.abs().max().item()
        assert e <= 2 * e_t + ATOL[F32] * scale, f"backward: err {e:.3e} > 2 x torch {e_t:.3e}"
    return Q, dP


# ---- the threshold boundary: both paths, each against the reference -----------------------------------

@pytest.mark.parametrize("dtype", [F32, F64], ids=["f32", "f64"])
@pytest.mark.parametrize("batch", [(), (3,)], ids=["nobatch", "b3"])
@pytest.mark.parametrize("d", [1, 2, 27, CAYLEY_D - 1, CAYLEY_D, CAYLEY_D + 1])
def test_cayley_threshold(d, batch, dtype):
    check_cayley(skew_input(*batch, d, d, dtype=dtype))


@pytest.mark.parametrize("dtype", [F32, F64], ids=["f32", "f64"])
@pytest.mark.parametrize("m,n", [
    (1, 1), (2, 1), (5, 1), (27, 27), (100, 16), (400, 8),
    (64, 64), (65, 64), (65, 65), (128, 32), (129, 32),     # m·n = 4096: small; above it: LAPACK
])
def test_gram_schmidt_threshold(m, n, dtype):
    check_gs(randn(2, m, n, dtype=dtype))



# ---- the small path is the one that ran: float32 = float64 rounded once ---------------------------------

@pytest.mark.parametrize("d", [1, 5, 27, CAYLEY_D])
def test_cayley_float32_is_rounded_float64(d):
    S = skew_input(4, d, d, dtype=F32)
    ref = cayley_ref(S.double())
    assert max_err(ops.cayley(S), ref) <= ulp_bound(ref)


@pytest.mark.parametrize("m,n", [(5, 5), (27, 27), (33, 27), (64, 64), (128, 32), (256, 8)])
def test_gram_schmidt_float32_is_rounded_float64(m, n):
    P = randn(3, m, n, dtype=F32)
    ref = gram_schmidt_ref(P.double())
    assert max_err(ops.gram_schmidt(P, 0), ref) <= ulp_bound(ref)


@pytest.mark.parametrize("m,n,batch", [(5, 5, 3), (27, 27, 3), (48, 48, 1), (33, 27, 3), (128, 32, 1)])
def test_gram_schmidt_backward_float32_is_rounded_float64(m, n, batch):
    """The backward on float32 (G, P, Q) equals the float64 backward on the same values, rounded once. (The
    op's float64 run, not the reference: for square P the kernel uses Q Qᵀ = I, and a float32 Q is orthogonal
    only to ~1e-7, so the reference's formula differs by that much on these inputs. The float64 op is checked
    against the reference elsewhere.) Shapes and batches where the small backward runs: batch·m·n² <= 2e5;
    larger batches take batched float32 BLAS calls (faster there, held to the 2x rule in test_gram_schmidt_cpp)."""
    P = randn(batch, m, n, dtype=F32)
    Q = ops.gram_schmidt(P, 0)
    G = randn(batch, m, n, dtype=F32)
    gref = ops.gram_schmidt_backward(G.double(), P.double(), Q.double())
    assert max_err(ops.gram_schmidt_backward(G, P, Q), gref) <= ulp_bound(gref)


# ---- the same matrix through both paths ------------------------------------------------------------------
# Padding with an identity block moves a matrix across the threshold without changing its answer:
# cayley(diag(S, 0)) = diag(cayley(S), 1), and the QR of diag(P, 1) is diag(Q, 1), diag(R, 1).

def pad(x, corner):
    """diag(x, corner) for each matrix of x [..., m, n]: one more row and column."""
    *batch, m, n = x.shape
    out = torch.zeros(*batch, m + 1, n + 1, dtype=x.dtype)
    out[..., :m, :n] = x
    out[..., m, n] = corner
    return out


def test_cayley_small_and_lapack_paths_agree():
    S = skew_input(2, CAYLEY_D, CAYLEY_D)
    small, big = ops.cayley(S), ops.cayley(pad(S, 0.0))
    close64(big[..., :CAYLEY_D, :CAYLEY_D], small)
    close64(big[..., CAYLEY_D:, CAYLEY_D:], torch.ones(2, 1, 1, dtype=F64))


@pytest.mark.parametrize("m,n", [(64, 64), (128, 32)])
def test_gram_schmidt_small_and_lapack_paths_agree(m, n):
    P = randn(2, m, n)
    G = randn(2, m, n)
    Pp, Gp = pad(P, 1.0), pad(G, 0.0)
    Q, Qp = ops.gram_schmidt(P, 0), ops.gram_schmidt(Pp, 0)
    close64(Qp, pad(Q, 1.0))
    dP, dPp = ops.gram_schmidt_backward(G, P, Q), ops.gram_schmidt_backward(Gp, Pp, Qp)
    close64(dPp[..., :m, :n], dP, scale=m)


# ---- stochastic-OPT batch: 128 matrices of d = 32, one and two threads ------------------------------------

@pytest.mark.parametrize("dtype", [F32, F64], ids=["f32", "f64"])
def test_cayley_batch128_d32(dtype):
    S = skew_input(128, 32, 32, dtype=dtype)
    Q = check_cayley(S)
    with threads(2):
        Q2 = ops.cayley(S)
    assert torch.equal(Q, Q2), "a matrix's result must not depend on how the batch is split over threads"


@pytest.mark.parametrize("dtype", [F32, F64], ids=["f32", "f64"])
def test_gram_schmidt_batch128_d32(dtype):
    P = randn(128, 32, 32, dtype=dtype)
    G = randn(128, 32, 32, dtype=dtype)
    Q, dP = check_gs(P, G)
    with threads(2):
        Q2 = ops.gram_schmidt(P, 0)
        dP2 = ops.gram_schmidt_backward(G, P, Q)
    assert torch.equal(Q, Q2) and torch.equal(dP, dP2)


def test_gram_schmidt_autograd_two_threads():
    """Through autograd with two threads (the batch split inside the small kernels)."""
    P = randn(16, 20, 12).requires_grad_(True)
    G = randn(16, 20, 12)
    with threads(2):
        Q = ops.gram_schmidt(P, 0)
        (dP,) = torch.autograd.grad(Q, P, G)
    close64(Q.detach(), gram_schmidt_ref(P.detach()))
    close64(dP, gram_schmidt_backward_ref(G, P.detach(), Q.detach()), scale=20)


# ---- float64 gradcheck of the small paths ----------------------------------------------------------------

@pytest.mark.parametrize("shape", [(1, 1), (3, 3), (12, 12), (2, 6, 6), (20, 8), (9, 1)])
def test_gram_schmidt_gradcheck_small_path(shape):
    P = torch.randn(*shape, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: ops.gram_schmidt(x, 0), (P,))


@pytest.mark.parametrize("shape", [(1, 1), (4, 4), (12, 12), (2, 5, 5)])
@pytest.mark.parametrize("kind", ["skew", "general"])
def test_cayley_gradcheck_small_path(shape, kind):
    A = torch.randn(*shape, dtype=F64)
    S = (skew(A) if kind == "skew" else 0.3 * A / shape[-1] ** 0.5).requires_grad_(True)
    assert torch.autograd.gradcheck(ops.cayley, (S,))


# ---- layouts: transposed, sliced, permuted batch dims, expanded grads ----------------------------------

def layouts(x):
    """x in several non-contiguous layouts (same values): transposed, every other column (inf in between:
    a read of the wrong entry shows), and batch dims permuted (when x has two)."""
    out = {"mT": noncontiguous(x, "mT"), "slice": noncontiguous(x, "slice")}
    if x.dim() == 4:
        out["batch-permuted"] = x.permute(1, 0, 2, 3).contiguous().permute(1, 0, 2, 3)
    return out


@pytest.mark.parametrize("dtype", [F32, F64], ids=["f32", "f64"])
@pytest.mark.parametrize("d", [5, 27])
def test_cayley_noncontiguous(d, dtype):
    S = skew_input(2, 3, d, d, dtype=dtype)
    Q = ops.cayley(S)
    for name, Sx in layouts(S).items():
        assert not Sx.is_contiguous()
        assert torch.equal(ops.cayley(Sx), Q), name


@pytest.mark.parametrize("dtype", [F32, F64], ids=["f32", "f64"])
@pytest.mark.parametrize("m,n", [(5, 5), (27, 27), (33, 27)])
def test_gram_schmidt_noncontiguous(m, n, dtype):
    P = randn(2, 3, m, n, dtype=dtype)
    G = randn(2, 3, m, n, dtype=dtype)
    Q = ops.gram_schmidt(P, 0)
    dP = ops.gram_schmidt_backward(G, P, Q)
    Ls_P, Ls_G, Ls_Q = layouts(P), layouts(G), layouts(Q)
    for name in Ls_P:
        assert torch.equal(ops.gram_schmidt(Ls_P[name], 0), Q), name
        assert torch.equal(ops.gram_schmidt_backward(Ls_G[name], Ls_P[name], Ls_Q[name]), dP), name


def test_gram_schmidt_backward_expanded_grad():
    """sum().backward() hands the backward a stride-0 grad."""
    P = randn(3, 10, 7).requires_grad_(True)
    ops.gram_schmidt(P, 0).sum().backward()
    Q = gram_schmidt_ref(P.detach())
    close64(P.grad, gram_schmidt_backward_ref(torch.ones_like(Q), P.detach(), Q), scale=10)


def test_cayley_and_gram_schmidt_empty_shapes():
    for shape in [(0, 5, 5), (3, 0, 0), (2, 0, 4, 3), (4, 0)]:
        P = torch.randn(*shape)
        Q = ops.gram_schmidt(P, 0)
        assert Q.shape == P.shape
        assert ops.gram_schmidt_backward(torch.randn(*shape), P, Q).shape == P.shape
    for shape in [(0, 5, 5), (3, 0, 0)]:
        assert ops.cayley(torch.randn(*shape)).shape == shape


# ---- singular, rank-deficient, NaN and inf ---------------------------------------------------------------

@pytest.mark.parametrize("d", [3, 27, CAYLEY_D, CAYLEY_D + 1])
def test_cayley_singular_in_a_batch_raises(d):
    """One exactly singular I - S (an eigenvalue 1: S = diag(1, 0, ...)) among regular ones: the error."""
    S = skew_input(4, d, d, dtype=F32)
    S[2] = 0
    S[2, 0, 0] = 1
    with pytest.raises(RuntimeError, match=SINGULAR):
        ops.cayley(S)
    with pytest.raises(RuntimeError, match=SINGULAR):
        cayley_ref(S)


def test_cayley_singular_after_pivoting_raises():
    """A zero pivot met only after elimination (rows 0 and 1 of I - S equal): still the error."""
    S = torch.zeros(5, 5, dtype=F64)
    S[1, 0], S[1, 1] = -1.0, 1.0  # I - S: rows 0 and 1 both [1, 0, 0, 0, 0], column 1 zero
    with pytest.raises(RuntimeError, match=SINGULAR):
        ops.cayley(S)


@pytest.mark.parametrize("d", [4, CAYLEY_D])
def test_cayley_nan_below_a_zero_pivot(d):
    """Column 0 of I - S is (0, NaN, 0, ...): the pivot search must pick the NaN (giving NaN), not report the
    zero as a singular matrix. (torch.linalg.inv_ex does the latter at d = 4, the former at d = 64.)"""
    S = torch.zeros(d, d)
    S[0, 0], S[1, 0] = 1.0, float("nan")
    Q = ops.cayley(S)
    assert Q.isnan().all()


@pytest.mark.parametrize("d", [4, CAYLEY_D, CAYLEY_D + 1])
@pytest.mark.parametrize("case", ["nan-one", "nan-all", "inf-offdiag", "inf-diag"])
def test_cayley_nonfinite(case, d):
    """NaN and inf: no error, no hang, NaN propagates. An inf in S gives that matrix's Q as NaN, as
    torch.linalg.solve(I - S, I + S) does (the LU would otherwise absorb it into a finite Q that hides an
    overflowed parameter). The other matrices of the batch are unaffected."""
    S = skew_input(3, d, d)
    x = S[1]
    if case == "nan-one":
        x[d - 1, 0] = float("nan")
    elif case == "nan-all":
        x.fill_(float("nan"))
    elif case == "inf-offdiag":
        x[0, 1] = float("inf")
    else:
        x.zero_()
        x[0, 0] = float("inf")
    Q = ops.cayley(S)
    if case.startswith("nan"):
        assert Q[1].isnan().any()
    else:
        assert Q[1].isnan().all() and cayley_ref(S[1]).isnan().all()
    assert_rest_of_batch_unaffected(Q[[0, 2]], ops.cayley(S[[0, 2]]))


def rank_deficient(m, n, col):
    P = randn(2, m, n)
    P[1, :, col] = 0
    return P


@pytest.mark.parametrize("m,n,col", [(6, 6, 0), (6, 6, 2), (6, 6, 5), (64, 64, 63), (65, 65, 64), (9, 4, 0),
                                     (9, 4, 3), (128, 32, 31), (129, 32, 31)])
def test_gram_schmidt_rank_deficient(m, n, col):
    """A zero column: finite orthonormal forward equal to the reference (R_jj = 0 takes sign +1); the
    backward raises. The last column (R_nn = 0) included: the square formula never divides by R_nn."""
    P = rank_deficient(m, n, col)
    Q = ops.gram_schmidt(P, 0)
    assert torch.isfinite(Q).all() and orth_err(Q) <= 1e-13
    close64(Q, gram_schmidt_ref(P))
    with pytest.raises(RuntimeError, match=DEFICIENT):
        ops.gram_schmidt_backward(randn(m, n).expand(2, m, n), P, Q)


@pytest.mark.parametrize("m,n", [(5, 5), (27, 27), (64, 64), (65, 65), (33, 27)])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("where", ["first", "mid", "last", "below"])
def test_gram_schmidt_nonfinite_pattern(where, value, m, n):
    """A NaN/inf in column j of P: NaN in column j of Q, also where only R_jj sees it ("last": the sign fix
    must not turn NaN into +1), and the other matrices of the batch unaffected. A NaN gives exactly the
    reference's (LAPACK's) NaN entries: the columns from j on. An inf gives NaN at least where the reference
    has it: at the first pivot LAPACK's result depends on the size (5×5 and 64×64: all NaN; 27×27: column 0
    only, its reflector skipping zero entries), the small path gives all NaN."""
    P = randn(3, m, n, dtype=F32)
    j = {"first": 0, "mid": n // 2, "last": n - 1, "below": n // 2}[where]
    i = m - 1 if where == "below" else j
    P[1, i, j] = value
    nan = ops.gram_schmidt(P, 0)[1].isnan()
    ref_nan = gram_schmidt_ref(P[1].double()).isnan()
    assert nan[:, j].all()
    if math.isnan(value):
        assert torch.equal(nan, ref_nan)
    else:
        assert not (ref_nan & ~nan).any()
    assert_rest_of_batch_unaffected(ops.gram_schmidt(P, 0)[[0, 2]], ops.gram_schmidt(P[[0, 2]], 0))


@pytest.mark.parametrize("which", ["grad", "P", "Q"])
@pytest.mark.parametrize("m,n", [(6, 6), (9, 4)])
def test_gram_schmidt_backward_nonfinite_propagates(which, m, n):
    """NaN in a backward input: NaN out, not the rank-deficiency error, even with a rank-deficient matrix
    elsewhere in the batch (the test is over the whole batch, as the reference's)."""
    P = rank_deficient(m, n, 1)
    Q = ops.gram_schmidt(P, 0)
    args = {"grad": randn(2, m, n), "P": P.clone(), "Q": Q.clone()}
    args[which][0, 2, 1] = float("nan")
    out = ops.gram_schmidt_backward(args["grad"], args["P"], args["Q"])
    assert out[0].isnan().any()


@pytest.mark.parametrize("scale", [1e200, 1e-200, 1e-300])
def test_gram_schmidt_float64_extreme_scales(scale):
    """Q is scale-invariant: float64 P scaled near overflow / underflow of the squares gives the same Q (the
    column norms are computed safely, as LAPACK's dnrm2 does)."""
    P = randn(2, 7, 5)
    Q = ops.gram_schmidt(P * scale, 0)
    close64(Q, gram_schmidt_ref(P))
    close64(Q, gram_schmidt_ref(P * scale))


def test_gram_schmidt_tiny_column_is_not_zero():
    """A first column (0, 1e-170, ...): its squares underflow to 0, but it is nonzero and must be reflected
    (R_00 = ‖x‖ > 0), not taken for a zero column, as the reference does."""
    P = randn(2, 6, 6)
    P[:, 0, 0] = 0.0
    P[:, 1:, 0] = 1e-170
    Q = ops.gram_schmidt(P, 0)
    close64(Q, gram_schmidt_ref(P))
    assert (Q.mT @ P)[:, 0, 0].min() > 0
