"""Numerics of the block-orthogonal ops (cayley_neumann, cayley_neumann_powers, block_apply and their
backward ops) through torch.ops.opt_fast (the C++ kernel when built) and the references called directly,
against float64 plain-PyTorch equivalents (tests/_refs.py).

Accuracy rule: max|out − ref64| <= 2 · max|torch_same_dtype − ref64| + atol, where torch_same_dtype is the
same math written in torch ops (the plain series; X times the dense permuted block matrix) in the op's
dtype. float16/bfloat16 inputs are compared with the float32 path rounded to their dtype.
"""
import pytest
import torch

import opt_fast
import opt_fast.reference as reference

from _refs import (
    ATOL,
    DTYPES,
    block_apply_torch,
    cayley_neumann_torch,
    max_err,
    noncontiguous,
    orth_err,
    peft_neumann_torch,
    threads,
)

ops = torch.ops.opt_fast
F64 = torch.float64
BLOCKS = [1, 2, 5, 27, 33, 100]
BATCHES = [(), (3,), (2, 3)]
HALF = [torch.bfloat16, torch.float16]
# unit roundoff of the half dtypes: rounding the float32 result costs at most this, relatively
UNIT = {torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}
NEW_OPS = ("cayley_neumann", "cayley_neumann_backward", "cayley_neumann_powers", "cayley_neumann_powers_backward",
           "block_apply", "block_apply_backward")


def assert_rule(what, out, ref64, same, dtype):
    """The accuracy rule; atol is relative to the largest entry when that exceeds 1 (a series far outside
    its convergence region reaches entries of 2^(k+1), where 2e-6 is below one float32 ulp)."""
    err, err_torch = max_err(out, ref64), max_err(same, ref64)
    atol = ATOL[dtype] * max(1.0, ref64.abs().max().item() if ref64.numel() else 0.0)
    bound = 2 * err_torch + atol
    assert err <= bound, f"{what}: max err {err:.3e} > 2 x torch {err_torch:.3e} + atol {atol:.1e}"


def assert_rounded_from(out, want32, dtype):
    """out (half) is want32 rounded to dtype, up to one rounding of the float32 accumulation order."""
    assert out.dtype == dtype
    diff = (out.float() - want32).abs()
    bound = UNIT[dtype] * want32.abs() + 1e-6
    assert (diff <= bound).all(), f"max excess {(diff - bound).max().item():.3e}"


def make_skew_input(batch, b, kind="skew", dtype=F64, norm=0.5):
    """S [..., b, b] whose skew part A has ‖A‖₂ about ``norm``: skew (U − Uᵀ, what the layers pass) or
    a general matrix (the op reads only its skew part)."""
    if kind == "skew":
        U = torch.randn(*batch, b, b, dtype=F64).triu(1)
        S = (U - U.mT) * (norm / (2 * b ** 0.5))
    else:
        S = torch.randn(*batch, b, b, dtype=F64) * (norm * 2 ** 0.5 / (2 * b ** 0.5))
    return S.to(dtype)


def layout(t, how):
    """t with the same values and other strides: "mT" transposed storage, "slice" every other column."""
    return t if how == "contig" else noncontiguous(t, how)


def test_block_ops_are_the_cpp_kernels_when_built():
    """The "ops" paths below exercise the C++ kernels whenever the extension is loaded."""
    for op in NEW_OPS:
        kind = opt_fast.kernel_for(op, "cpu")
        if opt_fast._backends.ext_error is None and not opt_fast._backends.env_flag("OPT_FAST_DISABLE_EXT"):
            assert kind == "C++", op
        else:
            assert kind == "reference", op


# ---- cayley_neumann forward ------------------------------------------------------------------------

def _check_cayley_neumann(S, terms, dtype):
    ref64 = cayley_neumann_torch(S.double(), terms)
    same = cayley_neumann_torch(S, terms)
    R = ops.cayley_neumann(S, terms)
    assert R.shape == S.shape and R.dtype == dtype and R.is_contiguous()  # as the fake kernel says
    assert_rule(f"cayley_neumann terms={terms}", R, ref64, same, dtype)
    assert_rule(f"cayley_neumann_ref terms={terms}", reference.cayley_neumann_ref(S, terms), ref64, same, dtype)
    R2, P = ops.cayley_neumann_powers(S, terms)
    assert_rule(f"cayley_neumann_powers terms={terms}", R2, ref64, same, dtype)
    h = terms // 2
    assert P.shape == S.shape[:-2] + (h,) + S.shape[-2:] and P.dtype == dtype
    A, A64 = 0.5 * (S - S.mT), 0.5 * (S.double() - S.double().mT)
    Pref = reference.cayley_neumann_powers_ref(S, terms)[1]
    for j in range(1, h + 1):
        want, same_j = torch.linalg.matrix_power(A64 @ A64, j), torch.linalg.matrix_power(A @ A, j)
        assert_rule(f"cayley_neumann_powers power {j}", P[..., j - 1, :, :], want, same_j, dtype)
        assert_rule(f"cayley_neumann_powers_ref power {j}", Pref[..., j - 1, :, :], want, same_j, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("terms", [0, 3, 5])
@pytest.mark.parametrize("batch", BATCHES, ids=["nobatch", "b3", "b2x3"])
@pytest.mark.parametrize("b", BLOCKS, ids=[f"b{b}" for b in BLOCKS])
def test_cayley_neumann_forward(b, batch, terms, dtype):
    """Every block size (odd ones included), batch shape, layout (contiguous, transposed storage, every
    other column) and dtype obeys the accuracy rule, for R and for the powers cayley_neumann_powers keeps."""
    S0 = make_skew_input(batch, b, dtype=dtype)
    for how in ("contig", "mT", "slice"):
        S = layout(S0, how)
        if how != "contig" and b > 1:
            assert not S.is_contiguous()
        _check_cayley_neumann(S, terms, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("kind,norm", [("skew", 0.5), ("general", 0.5), ("skew", 2.0)],
                         ids=["skew", "general", "skew-large"])
@pytest.mark.parametrize("b", [2, 5, 33])
@pytest.mark.parametrize("terms", range(9))
def test_cayley_neumann_terms(terms, b, kind, norm, dtype):
    """terms 0..8, each path of the kernel's even/odd split; a general S (only its skew part is read) and
    a skew S outside the series' convergence region (still the same polynomial)."""
    _check_cayley_neumann(make_skew_input((4,), b, kind, dtype, norm), terms, dtype)


@pytest.mark.parametrize("b", [0, 3])
def test_cayley_neumann_empty(b):
    """An empty batch (or 0 × 0 blocks) gives an empty result of the right shape, and [..., 0, b, b] powers."""
    for S in (torch.randn(0, b, b), torch.randn(2, 0, b, b)):
        assert ops.cayley_neumann(S, 5).shape == S.shape
        R, P = ops.cayley_neumann_powers(S, 5)
        assert R.shape == S.shape and P.shape == S.shape[:-2] + (2, b, b)


@pytest.mark.parametrize("dtype", HALF, ids=["bf16", "f16"])
@pytest.mark.parametrize("terms", [0, 2, 5])
def test_cayley_neumann_half_input(terms, dtype):
    """float16/bfloat16 S is computed in float32 and returned in its dtype: the float32 result, rounded."""
    S = make_skew_input((3,), 27, dtype=torch.float32).to(dtype)
    want = ops.cayley_neumann(S.float(), terms)
    assert_rounded_from(ops.cayley_neumann(S, terms), want, dtype)
    assert_rounded_from(reference.cayley_neumann_ref(S, terms), want, dtype)
    R, P = ops.cayley_neumann_powers(S, terms)
    assert_rounded_from(R, want, dtype)
    assert P.dtype == dtype and P.shape[-3] == terms // 2


def test_cayley_neumann_is_the_skew_series():
    """For skew S the op is (I + S) Σ Sⁱ, the expanded polynomial I + 2S + … + 2Sᵏ + Sᵏ⁺¹ (float64)."""
    S = make_skew_input((2,), 6)
    eye = torch.eye(6, dtype=F64)
    for k in range(6):
        poly = eye + sum(2 * torch.linalg.matrix_power(S, i) for i in range(1, k + 1)) \
            + torch.linalg.matrix_power(S, k + 1)
        torch.testing.assert_close(ops.cayley_neumann(S, k), poly, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("num_terms", [3, 4, 5, 6, 8])
def test_peft_convention_maps_to_terms_minus_two(num_terms):
    """PEFT OFT's num_cayley_neumann_terms = n is this op's terms = n − 2 (n = 3 computes what n = 4 does,
    as PEFT's loop does: its series always ends at Q^(n−1) with the 2Q² term present)."""
    Q = make_skew_input((3,), 8)
    want = peft_neumann_torch(Q, max(num_terms, 4))
    torch.testing.assert_close(ops.cayley_neumann(Q, max(num_terms - 2, 2)), want, rtol=1e-13, atol=1e-13)


# ---- against the exact Cayley transform --------------------------------------------------------------

@pytest.mark.parametrize("terms", range(9))
def test_cayley_neumann_vs_exact_cayley(terms):
    """R_k − cayley(A) = −(I + A) A^(k+1) (I − A)⁻¹ is normal with eigenvalue moduli |λ|^(k+1), so
    ‖R_k − cayley(A)‖₂ = ‖A‖₂^(k+1) exactly; and RᵀR − I has eigenvalues |1 − (iλ)^(k+1)|² − 1: about
    2‖A‖^(k+1) for odd k and ‖A‖^(2k+2) for even k (float64, ‖A‖₂ = 0.1 and 0.3)."""
    eye = torch.eye(12, dtype=F64)
    for norm in (0.1, 0.3):
        S = make_skew_input((3,), 12)
        S = S * (norm / torch.linalg.matrix_norm(S, 2).amax())
        R = ops.cayley_neumann(S, terms)
        exact = torch.linalg.solve(eye - S, eye + S)
        err = torch.linalg.matrix_norm(R - exact, 2)
        want = torch.linalg.matrix_norm(S, 2) ** (terms + 1)
        torch.testing.assert_close(err, want, rtol=1e-5, atol=1e-15)
        lam = torch.linalg.eigvals(S)  # iλ
        orth_want = ((1 - lam ** (terms + 1)).abs() ** 2 - 1).abs().amax(-1)
        orth = torch.linalg.matrix_norm(R.mT @ R - eye, 2)
        torch.testing.assert_close(orth, orth_want, rtol=1e-6, atol=1e-14)


def test_report_orthogonality_error(record_property):
    """The orthogonality error ‖RᵀR − I‖_F/√b of the series at b = 32 (float32, the C++ kernel) for the
    PEFT / POET default terms, reported as test properties; bounded by the float64 closed form above."""
    rows = []
    for norm in (0.05, 0.2, 0.5):
        S = make_skew_input((8,), 32, dtype=torch.float32, norm=norm)
        for terms in (1, 3, 5):
            err = orth_err(ops.cayley_neumann(S, terms))
            rows.append(f"norm={norm} terms={terms}: {err:.2e}")
            assert err <= 3 * norm ** (terms + 1) + 1e-6, rows[-1]
    record_property("cayley_neumann_orth_err", "; ".join(rows))
    print("\n".join(rows))


# ---- cayley_neumann backward ops ----------------------------------------------------------------------

def _series_grad(S, G, terms):
    S = S.detach().clone().requires_grad_()
    (g,) = torch.autograd.grad(cayley_neumann_torch(S, terms), S, G)
    return g


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("kind", ["skew", "general"])
@pytest.mark.parametrize("batch", [(), (2, 3)], ids=["nobatch", "b2x3"])
@pytest.mark.parametrize("b", BLOCKS, ids=[f"b{b}" for b in BLOCKS])
@pytest.mark.parametrize("terms", [0, 1, 2, 3, 4, 5, 8])
def test_cayley_neumann_backward_ops(terms, b, batch, kind, dtype):
    """cayley_neumann_backward and cayley_neumann_powers_backward (with the saved powers) obey the accuracy
    rule against autograd through the float64 series, also for grad and S transposed in storage."""
    S0 = make_skew_input(batch, b, kind, dtype)
    G0 = torch.randn(S0.shape, dtype=F64).to(dtype)
    want64, same = _series_grad(S0.double(), G0.double(), terms), _series_grad(S0, G0, terms)
    _, P = ops.cayley_neumann_powers(S0, terms)
    for how in ("contig", "mT"):
        S, G = layout(S0, how), layout(G0, how)
        for name, got in [("cayley_neumann_backward", ops.cayley_neumann_backward(G, S, terms)),
                          ("cayley_neumann_powers_backward", ops.cayley_neumann_powers_backward(G, S, P, terms)),
                          ("cayley_neumann_backward_ref", reference.cayley_neumann_backward_ref(G, S, terms))]:
            assert got.shape == S.shape and got.dtype == dtype
            assert got.is_contiguous() or name.endswith("_ref"), f"{name}: the fake kernel promises contiguous"
            assert_rule(f"{name} terms={terms} {how}", got, want64, same, dtype)


@pytest.mark.parametrize("dtype", HALF, ids=["bf16", "f16"])
def test_cayley_neumann_backward_half(dtype):
    """Half S and grad: the gradient is the float32 one rounded (within the half dtype's precision, as the
    saved powers are kept in S's dtype)."""
    S = make_skew_input((2,), 16, dtype=torch.float32).to(dtype)
    G = torch.randn(S.shape).to(dtype)
    want = ops.cayley_neumann_backward(G.float(), S.float(), 5)
    _, P = ops.cayley_neumann_powers(S, 5)
    for got in (ops.cayley_neumann_backward(G, S, 5), ops.cayley_neumann_powers_backward(G, S, P, 5)):
        assert got.dtype == dtype
        torch.testing.assert_close(got.float(), want, rtol=8 * UNIT[dtype], atol=8 * UNIT[dtype])


def test_cayley_neumann_backward_ops_leave_inputs_alone():
    S = make_skew_input((2,), 7)
    G = torch.randn_like(S)
    _, P = ops.cayley_neumann_powers(S, 5)
    args = [G, S, P]
    before = [a.clone() for a in args]
    ops.cayley_neumann_backward(G, S, 5)
    ops.cayley_neumann_powers_backward(G, S, P, 5)
    for a, b in zip(args, before):
        assert torch.equal(a, b)


# ---- block_apply forward and backward -------------------------------------------------------------------

def make_block_input(b, n_case, lead, dtype, permute):
    """(R [nb, b, b], X [*lead, n], perm or None). n_case: "exact" n = nb·b, "remainder" n = nb·b + r
    (an identity remainder), "nb0" no block at all."""
    nb = {"exact": 3 if b < 100 else 2, "remainder": 2, "nb0": 0}[n_case]
    n = nb * b + {"exact": 0, "remainder": 1 + b // 3, "nb0": 7}[n_case]
    R = (torch.randn(nb, b, b, dtype=F64) / b ** 0.5).to(dtype)
    X = torch.randn(*lead, n, dtype=F64).to(dtype)
    return R, X, (torch.randperm(n) if permute else None)


def strided(R, X, perm):
    """The same values with other strides: R's blocks transposed in storage, X every other column (or a
    transposed 2-D view), perm every other entry of a larger tensor."""
    R = R.mT.contiguous().mT
    X = X.mT.contiguous().mT if X.dim() == 2 else noncontiguous(X, "slice")
    if perm is not None:
        perm = torch.stack([perm, torch.full_like(perm, -1)], -1).flatten()[::2]
        assert not perm.is_contiguous() or perm.numel() <= 1
    return R, X, perm


def _block_grads(R, X, perm, G):
    R, X = R.detach().clone().requires_grad_(), X.detach().clone().requires_grad_()
    return torch.autograd.grad(block_apply_torch(R, X, perm), (R, X), G, materialize_grads=True)


LEADS = [(), (4,), (2, 3)]


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("permute", [False, True], ids=["noperm", "perm"])
@pytest.mark.parametrize("lead", LEADS, ids=["X1d", "X2d", "X3d"])
@pytest.mark.parametrize("n_case", ["exact", "remainder", "nb0"])
@pytest.mark.parametrize("b", BLOCKS, ids=[f"b{b}" for b in BLOCKS])
def test_block_apply(b, n_case, lead, permute, dtype):
    """Forward and backward op (and the references) against the dense permuted block matrix in float64,
    accuracy rule, for contiguous and strided R, X, perm; the identity remainder passes through exactly."""
    args = make_block_input(b, n_case, lead, dtype, permute)
    R, X, perm = args
    G = torch.randn(X.shape, dtype=F64).to(dtype)
    want64, same = block_apply_torch(R.double(), X.double(), perm), block_apply_torch(R, X, perm)
    gR64, gX64 = _block_grads(R.double(), X.double(), perm, G.double())
    gR_same, gX_same = _block_grads(R, X, perm, G)
    for R, X, perm in (args, strided(*args)):
        _check_block_apply(b, R, X, perm, G, dtype, want64, same, (gR64, gX64), (gR_same, gX_same))


def _check_block_apply(b, R, X, perm, G, dtype, want64, same, grads64, grads_same):
    for name, Y in [("block_apply", ops.block_apply(R, X, perm)),
                    ("block_apply_ref", reference.block_apply_ref(R, X, perm))]:
        assert Y.shape == X.shape and Y.dtype == dtype and (Y.is_contiguous() or name.endswith("_ref"))
        assert_rule(name, Y, want64, same, dtype)
        rest = (torch.arange(X.shape[-1]) if perm is None else perm)[R.shape[0] * b:]
        assert torch.equal(Y[..., rest], X[..., rest]), f"{name}: the remainder is not left as it is"
    for name, (gR, gX) in [("block_apply_backward", ops.block_apply_backward(G, R, X, perm)),
                           ("block_apply_backward_ref", reference.block_apply_backward_ref(G, R, X, perm))]:
        assert gR.shape == R.shape and gX.shape == X.shape and gR.dtype == gX.dtype == dtype
        assert name.endswith("_ref") or (gR.is_contiguous() and gX.is_contiguous())
        assert_rule(f"{name} grad_R", gR, grads64[0], grads_same[0], dtype)
        assert_rule(f"{name} grad_X", gX, grads64[1], grads_same[1], dtype)


@pytest.mark.parametrize("layout", ["contig", "row_strided"])
@pytest.mark.parametrize("nthreads", [1, 2])
@pytest.mark.parametrize("permute", [False, True], ids=["noperm", "perm"])
def test_block_apply_many_rows(permute, nthreads, layout):
    """Rows beyond one chunk of the kernel (the last chunk partial), split over threads: grad_R sums every
    chunk's contribution exactly once (float64, tight). "row_strided": X and G are the first n columns of
    wider matrices (unit column stride, row stride > n: the rows the kernel's prefetch runs ahead on)."""
    R, X, perm = make_block_input(5, "remainder", (1037,), F64, permute)
    G = torch.randn_like(X)
    if layout == "row_strided":
        X, G = (torch.cat([t, torch.full_like(t, float("inf"))], -1)[:, :t.shape[-1]] for t in (X, G))
        assert X.stride() == (2 * X.shape[-1], 1)
    with threads(nthreads):
        Y = ops.block_apply(R, X, perm)
        gR, gX = ops.block_apply_backward(G, R, X, perm)
    torch.testing.assert_close(Y, block_apply_torch(R, X, perm), rtol=1e-12, atol=1e-12)
    wR, wX = _block_grads(R, X, perm, G)
    torch.testing.assert_close(gR, wR, rtol=1e-11, atol=1e-11)
    torch.testing.assert_close(gX, wX, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("grad_enabled", [True, False], ids=["grad", "no_grad"])
def test_block_apply_parallel_chunks_with_autograd_inputs(grad_enabled):
    """Chunks on 2 threads with R and X requiring grad: the kernel's own GEMMs in the worker threads stay
    below autograd (a worker does not inherit the caller's dispatch state: bmm_out on R raised there), and
    under no_grad no graph is recorded."""
    R, X, perm = make_block_input(5, "remainder", (1037,), F64, True)
    R, X = R.requires_grad_(), X.requires_grad_()
    with threads(2), torch.set_grad_enabled(grad_enabled):
        Y = opt_fast.functional.block_apply(R, X, perm)
    assert Y.requires_grad == grad_enabled
    torch.testing.assert_close(Y, block_apply_torch(R.detach(), X.detach(), perm), rtol=1e-12, atol=1e-12)
    if grad_enabled:
        G = torch.randn_like(Y)
        with threads(2):
            gR, gX = torch.autograd.grad(Y, (R, X), G)
        wR, wX = _block_grads(R, X, perm, G)
        torch.testing.assert_close(gR, wR, rtol=1e-11, atol=1e-11)
        torch.testing.assert_close(gX, wX, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("lead", [(0,), (3, 0)], ids=["0rows", "3x0rows"])
def test_block_apply_no_rows(lead):
    R, X, perm = make_block_input(4, "remainder", lead, torch.float32, True)
    assert ops.block_apply(R, X, perm).shape == X.shape
    gR, gX = ops.block_apply_backward(X, R, X, perm)
    assert gX.shape == X.shape and torch.equal(gR, torch.zeros_like(R))


@pytest.mark.parametrize("dtype", HALF, ids=["bf16", "f16"])
@pytest.mark.parametrize("permute", [False, True], ids=["noperm", "perm"])
@pytest.mark.parametrize("n_case", ["exact", "remainder"])
def test_block_apply_half_activations(n_case, permute, dtype):
    """Half X with float32 R: products in float32, Y in X's dtype (the float32 path's result rounded);
    backward: grad_X in X's dtype, grad_R float32 from the float32 products."""
    R, X32, perm = make_block_input(33, n_case, (2, 40), torch.float32, permute)
    X = X32.to(dtype)
    G = torch.randn(X.shape).to(dtype)
    want = ops.block_apply(R, X.float(), perm)
    assert_rounded_from(ops.block_apply(R, X, perm), want, dtype)
    assert_rounded_from(reference.block_apply_ref(R, X, perm), want, dtype)
    wR, wX = ops.block_apply_backward(G.float(), R, X.float(), perm)
    for gR, gX in (ops.block_apply_backward(G, R, X, perm), reference.block_apply_backward_ref(G, R, X, perm)):
        assert gR.dtype == torch.float32
        torch.testing.assert_close(gR, wR, rtol=1e-5, atol=1e-4)
        assert_rounded_from(gX, wX, dtype)


def test_block_apply_is_orthogonal_for_orthogonal_blocks():
    """Orthogonal blocks give an orthogonal transform of every row: norms kept, and the backward op with
    grad = Y gives back X (Rᵀ undoes R), with and without a permutation and remainder."""
    R = torch.linalg.qr(torch.randn(4, 9, 9, dtype=F64))[0]
    X = torch.randn(5, 40, dtype=F64)
    for perm in (None, torch.randperm(40)):
        Y = ops.block_apply(R, X, perm)
        torch.testing.assert_close(Y.norm(dim=-1), X.norm(dim=-1), rtol=1e-13, atol=0)
        torch.testing.assert_close(ops.block_apply_backward(Y, R, X, perm)[1], X, rtol=1e-13, atol=1e-13)
