"""The C++ CPU gram_schmidt kernels (csrc/cpu/gram_schmidt.cpp) against the reference (the spec).

torch.ops.opt_fast.gram_schmidt / gram_schmidt_backward on CPU tensors reach the C++ kernel; they are compared
with opt_fast.reference.gram_schmidt_ref / gram_schmidt_backward_ref:
  * float64: tight tolerance (forward and backward);
  * float32: max|op - ref64| <= 2 max|torch32 - ref64| + atol, torch32 = torch.linalg.qr + sign fix in float32
    (and its autograd for the backward);
  * orthogonality ‖QᵀQ − I‖_F/√d <= 1e-5 in float32 on N(0,1) square P (κ ~ d);
  * rank-deficient P: finite forward, a clear error from the backward (same as the reference); NaN/inf
    inputs propagate NaN.
The suite runs torch on one thread; the batch-parallel path of the kernel (whole matrices per thread) is
exercised by the tests that set two threads.
"""
import math

import pytest
import torch

import opt_fast
from opt_fast.reference.gram_schmidt import gram_schmidt_backward_ref, gram_schmidt_ref

from _refs import noncontiguous as strided  # same values, non-contiguous: "mT" or "slice"
from _refs import threads

pytestmark = pytest.mark.skipif(not opt_fast.has_kernel("gram_schmidt", "CPU"),
                                reason="C++ CPU gram_schmidt kernel not built")

ops = torch.ops.opt_fast
F32, F64 = torch.float32, torch.float64
ATOL32 = 2e-6


# ---- helpers ---------------------------------------------------------------------------------------

def err(a, b):
    return 0.0 if a.numel() == 0 else (a.double() - b.double()).abs().max().item()


def orth_err(Q):
    Q = Q.double()
    n = Q.shape[-1]
    E = Q.mT @ Q - torch.eye(n, dtype=F64)
    return (torch.linalg.matrix_norm(E) / math.sqrt(n)).max().item()


def _qr_sign(P):
    Q, R = torch.linalg.qr(P)
    s = torch.sign(R.diagonal(dim1=-2, dim2=-1))
    s = torch.where(s == 0, torch.ones_like(s), s)
    return Q * s.unsqueeze(-2)


def qr_sign(P):
    """torch.linalg.qr + sign fix, one call per matrix: the same-precision torch yardstick (differentiable).
    Per matrix because MKL's rounding depends on where a matrix sits in a batched buffer: for 33×33 float32
    matrices, batched and single calls on the same matrix differed by up to 5.6x in max-abs error against
    float64 (over 40 seeds), which would make a 2x rule a coin toss."""
    flat = P.reshape(-1, *P.shape[-2:])
    return torch.stack([_qr_sign(flat[i].clone()) for i in range(flat.shape[0])]).view(P.shape)


def torch_grad(P, G):
    x = P.detach().clone().requires_grad_(True)
    return torch.autograd.grad(qr_sign(x), x, G)[0]


def close64(a, b, scale=1.0):
    assert a.shape == b.shape and a.dtype == b.dtype
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-11 * scale)


def rand(*shape, dtype=F64):
    return torch.randn(*shape, dtype=F64).to(dtype)


# (m, n): square at the sizes, and tall; 256 / 257 columns: the backward's batched / per-matrix paths
SHAPES = [(1, 1), (2, 2), (27, 27), (33, 33), (100, 100), (2, 1), (33, 27), (100, 5), (201, 100), (256, 256),
          (257, 257), (300, 257), (300, 300)]
BATCHES = [(), (2, 3)]


def test_cpu_kernel_is_the_cpp_one():
    """These tests exercise the C++ kernel, not the reference, whenever the extension loaded."""
    assert opt_fast.kernel_for("gram_schmidt", "cpu") == "C++"
    assert opt_fast.kernel_for("gram_schmidt_backward", "cpu") == "C++"


# ---- float64 against the reference -----------------------------------------------------------------

@pytest.mark.parametrize("batch", BATCHES, ids=["nobatch", "b2x3"])
@pytest.mark.parametrize("m,n", SHAPES)
def test_f64(m, n, batch):
    if m >= 256 and batch:
        batch = (3,)
    P = rand(*batch, m, n)
    Q = ops.gram_schmidt(P, 0)
    assert Q.is_contiguous() and Q.shape == P.shape
    close64(Q, gram_schmidt_ref(P))
    G = torch.randn_like(Q)
    dP = ops.gram_schmidt_backward(G, P, Q)
    assert dP.is_contiguous() and dP.shape == P.shape
    close64(dP, gram_schmidt_backward_ref(G, P, Q), scale=m)


@pytest.mark.parametrize("block_size", [0, 1, 8, 64, 1000])
def test_block_size_does_not_change_the_result(block_size):
    P = rand(2, 70, 70)
    close64(ops.gram_schmidt(P, block_size), gram_schmidt_ref(P))


@pytest.mark.parametrize("how", ["mT", "slice"])
@pytest.mark.parametrize("m,n,batch", [(27, 27, ()), (33, 27, (2, 3)), (100, 100, (2,))])
def test_noncontiguous(m, n, batch, how):
    """Transposed and sliced storage, for P, Q and grad alike, give the contiguous results."""
    P = rand(*batch, m, n)
    Q = ops.gram_schmidt(P, 0)
    G = torch.randn_like(Q)
    Ps = strided(P, how)
    assert not Ps.is_contiguous()
    close64(ops.gram_schmidt(Ps, 0), Q)
    close64(ops.gram_schmidt_backward(strided(G, how), Ps, strided(Q, how)),
            ops.gram_schmidt_backward(G, P, Q), scale=m)


def test_inputs_left_alone():
    P = rand(3, 20, 20)
    Q = ops.gram_schmidt(P, 0)
    G = torch.randn_like(Q)
    copies = [t.clone() for t in (P, Q, G)]
    ops.gram_schmidt(P, 0)
    ops.gram_schmidt_backward(G, P, Q)
    for t, c in zip((P, Q, G), copies):
        assert torch.equal(t, c)


# ---- the batch-parallel path (whole matrices per thread) ---------------------------------------------

@pytest.mark.parametrize("batch", [(2,), (5,), (3, 3)])
def test_two_threads_batch_parallel(batch):
    """With 2 threads and a batch, matrices are shared out to threads (plus a remainder on all threads):
    same results as the reference, also through autograd (the worker threads must stay below autograd)."""
    P = rand(*batch, 40, 33).requires_grad_(True)
    G = torch.randn(*batch, 40, 33, dtype=F64)
    with threads(2):
        Q = ops.gram_schmidt(P, 0)
        (dP,) = torch.autograd.grad(Q, P, G)
    close64(Q.detach(), gram_schmidt_ref(P.detach()))
    close64(dP, gram_schmidt_backward_ref(G, P.detach(), Q.detach()), scale=40)


# ---- float32: 2x torch's own error against float64 ----------------------------------------------------

@pytest.mark.parametrize("batch", BATCHES, ids=["nobatch", "b2x3"])
@pytest.mark.parametrize("m,n", [(27, 27), (33, 33), (100, 100), (33, 27), (201, 100), (300, 300)])
def test_f32_accuracy(m, n, batch):
    if m >= 201 and batch:
        batch = (2,)
    P64 = rand(*batch, m, n)
    P = P64.float()
    ref = gram_schmidt_ref(P.double())
    Q = ops.gram_schmidt(P, 0)
    assert Q.dtype == F32
    e, e_t = err(Q, ref), err(qr_sign(P), ref)
    assert e <= 2 * e_t + ATOL32, f"forward: err {e:.3e} > 2 x torch {e_t:.3e}"
    G = torch.randn(P.shape, dtype=F64)
    gref = gram_schmidt_backward_ref(G, P.double(), ref)
    g = ops.gram_schmidt_backward(G.float(), P, Q)
    e, e_t = err(g, gref), err(torch_grad(P, G.float()), gref)
    scale = gref.abs().max().item()
    assert e <= 2 * e_t + ATOL32 * scale, f"backward: err {e:.3e} > 2 x torch {e_t:.3e}"


@pytest.mark.parametrize("d", [576, 1024, pytest.param(2304, marks=pytest.mark.slow)])
def test_f32_orthogonality_opt_size(d):
    """‖QᵀQ − I‖_F/√d <= 1e-5 in float32 for N(0,1) square P (κ ~ d) at OPT's sizes."""
    P = torch.randn(d, d)
    Q = ops.gram_schmidt(P, 0)
    e = orth_err(Q)
    assert e <= 1e-5, f"d={d}: ‖QᵀQ − I‖_F/√d = {e:.2e}"


# ---- ill-conditioned and rank-deficient P -------------------------------------------------------------

def conditioned(n, kappa, batch=(), dtype=F64):
    U = torch.linalg.qr(torch.randn(*batch, n, n, dtype=F64))[0]
    V = torch.linalg.qr(torch.randn(*batch, n, n, dtype=F64))[0]
    s = torch.logspace(0, -math.log10(kappa), n, dtype=F64)
    return ((U * s.unsqueeze(-2)) @ V.mT).to(dtype)


@pytest.mark.parametrize("kappa", [1e4, 1e7])
@pytest.mark.parametrize("dtype", [F32, F64], ids=["f32", "f64"])
def test_ill_conditioned(kappa, dtype):
    """κ up to 1e7 (≫ 1/√u in float32): Q stays orthogonal to working precision and no worse than torch's."""
    P = conditioned(80, kappa, (2,), dtype)
    Q = ops.gram_schmidt(P, 0)
    tol = 1e-5 if dtype == F32 else 1e-13
    assert orth_err(Q) <= tol
    ref = gram_schmidt_ref(P.double())
    e, e_t = err(Q, ref), err(qr_sign(P), ref)
    assert e <= 2 * e_t + (ATOL32 if dtype == F32 else 1e-11)


def rank_deficient(kind):
    P = torch.randn(2, 6, 6, dtype=F64)
    if kind == "zero-column":
        P[1, :, 2] = 0
    elif kind == "zero":
        P.zero_()
    elif kind == "tall-zero-column":
        P = torch.randn(9, 4, dtype=F64)
        P[:, 0] = 0
    return P


@pytest.mark.parametrize("kind", ["zero-column", "zero", "tall-zero-column"])
def test_rank_deficient(kind):
    """Forward: finite, orthonormal columns, P = Q triu(QᵀP), the same Q as the reference. Backward: the
    documented error on both the C++ kernel and the reference, not inf/NaN."""
    P = rank_deficient(kind)
    Q = ops.gram_schmidt(P, 0)
    assert torch.isfinite(Q).all()
    assert orth_err(Q) <= 1e-13
    torch.testing.assert_close(Q @ (Q.mT @ P).triu(), P, rtol=0, atol=1e-12)
    close64(Q, gram_schmidt_ref(P))
    G = torch.randn_like(Q)
    msg = r"opt_fast\.gram_schmidt_backward: P is rank deficient"
    with pytest.raises(RuntimeError, match=msg):
        ops.gram_schmidt_backward(G, P, Q)
    with pytest.raises(RuntimeError, match=msg):
        gram_schmidt_backward_ref(G, P, Q)
    Pg = P.clone().requires_grad_(True)
    with pytest.raises(RuntimeError, match=msg):
        ops.gram_schmidt(Pg, 0).sum().backward()


def test_nearly_rank_deficient_backward_is_finite():
    """A tiny but nonzero R_jj is differentiable: a large finite gradient, no error, close to the reference."""
    P = conditioned(20, 1e10)
    Q = ops.gram_schmidt(P, 0)
    G = torch.randn_like(Q)
    g = ops.gram_schmidt_backward(G, P, Q)
    assert torch.isfinite(g).all()
    ref = gram_schmidt_backward_ref(G, P, Q)
    assert err(g, ref) <= 1e-4 * ref.abs().max().item()


# ---- NaN / inf ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize("where", ["last", "first", "all"])
def test_nonfinite_forward_propagates(where, value):
    """A NaN or inf in P gives NaN in Q (no exception), like the reference; other batch entries unaffected."""
    P = torch.randn(3, 5, 5)
    if where == "all":
        P[1] = value
    else:
        P[1, (-1 if where == "last" else 0), (-1 if where == "last" else 0)] = value
    Q = ops.gram_schmidt(P, 0)
    assert Q[1].isnan().any()
    assert torch.equal(Q[1].isnan(), gram_schmidt_ref(P)[1].isnan())
    assert torch.equal(Q[[0, 2]], ops.gram_schmidt(P[[0, 2]], 0))


@pytest.mark.parametrize("which", ["grad", "P", "Q"])
def test_nonfinite_backward_propagates(which):
    """NaN in any backward input gives NaN, not the rank-deficiency error (C++ and reference alike)."""
    P = torch.randn(4, 4, dtype=F64)
    Q = ops.gram_schmidt(P, 0)
    args = {"grad": torch.randn(4, 4, dtype=F64), "P": P.clone(), "Q": Q.clone()}
    args[which][2, 1] = float("nan")
    for fn in (ops.gram_schmidt_backward, gram_schmidt_backward_ref):
        out = fn(args["grad"], args["P"], args["Q"])
        assert out.isnan().any()


# ---- gradcheck, opcheck ------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(5, 5), (7, 4), (2, 6, 6), (1, 1)])
def test_gradcheck(shape):
    P = torch.randn(*shape, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: ops.gram_schmidt(x, 0), (P,))


def test_gradgradcheck():
    P = torch.randn(4, 4, dtype=F64, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda x: ops.gram_schmidt(x, 0), (P,))


@pytest.mark.parametrize("dtype", [F32, F64], ids=["f32", "f64"])
def test_opcheck(dtype):
    P = torch.randn(2, 9, 7, dtype=dtype)
    torch.library.opcheck(ops.gram_schmidt, (P, 0))
    torch.library.opcheck(ops.gram_schmidt, (P.clone().requires_grad_(True), 4))
    Q = ops.gram_schmidt(P, 0)
    torch.library.opcheck(ops.gram_schmidt_backward, (torch.randn_like(Q), P, Q))


# ---- bad input: the same error as the reference -------------------------------------------------------

def _norm(msg):
    """The C++ kernels spell dtypes as ATen does (Float, Long); the reference as torch (torch.float32)."""
    for a, b in (("torch.float32", "Float"), ("torch.float64", "Double"), ("torch.int64", "Long"),
                 ("torch.float16", "Half")):
        msg = msg.replace(a, b)
    return msg.splitlines()[0]


def _raise(fn, *args):
    with pytest.raises(RuntimeError) as info:
        fn(*args)
    return _norm(str(info.value))


P4 = torch.randn(4, 4)
BAD_FORWARD = {
    "1d": (torch.randn(4), 0),
    "wide": (torch.randn(3, 5), 0),
    "int64": (torch.randint(0, 5, (4, 4)), 0),
    "float16": (torch.randn(4, 4).half(), 0),
    "block_size<0": (torch.randn(4, 4), -1),
}
BAD_BACKWARD = {
    "grad-shape": lambda Q: (torch.randn(4, 3), P4, Q),
    "P-shape": lambda Q: (torch.randn(4, 4), torch.randn(5, 4), Q),
    "grad-dtype": lambda Q: (torch.randn(4, 4, dtype=F64), P4, Q),
    "P-dtype": lambda Q: (torch.randn(4, 4), P4.double(), Q),
    "int-all": lambda Q: (torch.ones(4, 4, dtype=torch.long), P4.long(), Q.long()),
}


@pytest.mark.parametrize("case", list(BAD_FORWARD))
def test_bad_forward_same_error_as_reference(case):
    args = BAD_FORWARD[case]
    msg = _raise(ops.gram_schmidt, *args)
    assert msg.startswith("opt_fast.gram_schmidt: expected")
    assert msg == _raise(gram_schmidt_ref, *args)


@pytest.mark.parametrize("case", list(BAD_BACKWARD))
def test_bad_backward_same_error_as_reference(case):
    args = BAD_BACKWARD[case](ops.gram_schmidt(P4, 0))
    msg = _raise(ops.gram_schmidt_backward, *args)
    assert msg.startswith("opt_fast.gram_schmidt_backward: expected")
    assert msg == _raise(gram_schmidt_backward_ref, *args)
