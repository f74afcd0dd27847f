"""The CUDA kernels (csrc/cuda) against the float64 references: numerics, gradients, registration, errors.

Every test carries the ``gpu`` marker: CI deselects them (-m "not gpu") and conftest skips them, with a
reason, where no CUDA device is visible. Nothing here touches CUDA at import or collection.

Accuracy: float64 against the reference (computed on CPU in float64) to a tight tolerance; float32 by the
project's rule max|op - ref64| <= 2 max|torch32 - ref64| + atol, where torch32 is torch's own float32
result on the same GPU (torch.linalg.householder_product / a rank-1 reflection loop / torch.linalg.qr, and
their autograd for the backwards). OPT_FAST_CUDA_SMALL=0 forces the level-3 path where the one-launch
small-d path would serve, so both are covered.
"""
import re

import pytest
import torch

import opt_fast
from _refs import householder_apply_torch as reflect_loop  # H(v_1)…H(v_k) X by rank-1 reflections
from _refs import householder_orthogonal_torch as orth_loop
from opt_fast.reference import gram_schmidt as RG
from opt_fast.reference import householder as RH

pytestmark = pytest.mark.gpu

ops = torch.ops.opt_fast
F64, F32 = torch.float64, torch.float32
DEV = "cuda"
ATOL32 = 1e-5
CUDA_OPS = ("householder_product", "householder_orthogonal", "householder_apply", "gram_schmidt")
PATHS = ["small", "level3"]


@pytest.fixture
def path(request, monkeypatch):
    if request.param == "level3":
        monkeypatch.setenv("OPT_FAST_CUDA_SMALL", "0")
    else:
        monkeypatch.delenv("OPT_FAST_CUDA_SMALL", raising=False)
    return request.param


def with_paths(fn):
    return pytest.mark.parametrize("path", PATHS, indirect=True)(fn)


# ---- helpers -----------------------------------------------------------------------------------------

def err(a, b):
    return 0.0 if a.numel() == 0 else (a.detach().double().cpu() - b.detach().double().cpu()).abs().max().item()


def close64(a, b, scale=1.0):
    assert a.dtype == F64 and a.shape == b.shape, (a.dtype, a.shape, b.shape)
    torch.testing.assert_close(a.detach().cpu(), b.detach().cpu(), rtol=1e-9, atol=1e-10 * scale)


def close_rel(a, b, tol):
    assert a.shape == b.shape
    e = err(a, b)
    bound = tol * max(1.0, b.abs().max().item() if b.numel() else 0.0)
    assert e <= bound, f"err {e:.3e} > {bound:.3e}"


def rule32(out32, ref64, torch32, what):
    assert out32.dtype == F32
    e, e_t = err(out32, ref64), err(torch32, ref64)
    assert e <= 2 * e_t + ATOL32, f"{what}: err {e:.3e} > 2 x torch {e_t:.3e} + {ATOL32:.0e}"


def lapack_reflectors(m, n, k, batch=()):
    """(V, tau) from geqrf of a N(0,1) matrix, float64 on CPU."""
    V, tau = torch.geqrf(torch.randn(*batch, m, n, dtype=F64))
    return V, tau[..., :k].contiguous()


def to(x, dtype):
    return x.to(device=DEV, dtype=dtype)


def torch_grads(fn, args, grad):
    args = [a.detach().clone().requires_grad_(True) for a in args]
    return torch.autograd.grad(fn(*args), args, grad)


def strided(x, how):
    """Same values, non-contiguous storage: "mT" (transposed) or "slice" (every other column)."""
    if how == "mT":
        return x.mT.contiguous().mT
    big = torch.full((*x.shape[:-1], 2 * x.shape[-1]), float("nan"), dtype=x.dtype, device=x.device)
    big[..., ::2] = x
    return big[..., ::2]


# ---- registration ------------------------------------------------------------------------------------

def test_backend_report_names_cuda_kernels():
    for op in CUDA_OPS:
        for name in (op, op + "_backward"):
            assert opt_fast.has_kernel(name, "CUDA"), f"{name}: no C++ CUDA kernel registered (CPU-only build?)"
        assert opt_fast._backends.kernel_for(op, "cuda") == "CUDA C++", op
    report = opt_fast.backend_report()
    for op in CUDA_OPS:
        assert re.search(rf"^{op}\s+\S+\s+CUDA C\+\+$", report, re.M), report


# ---- householder_product ------------------------------------------------------------------------------

# (m, n, k): the odd sizes, k < n, tall, k = 0, and sizes past the small-d limit (160) and past padded T.
PRODUCT_SHAPES = [(1, 1, 1), (2, 2, 2), (2, 1, 1), (27, 27, 27), (33, 33, 16), (64, 64, 64), (100, 60, 50),
                  (160, 160, 160), (161, 100, 70), (513, 513, 513), (513, 300, 200), (9, 5, 0)]
BATCHES = [(), (2, 3)]


@with_paths
@pytest.mark.parametrize("batch", BATCHES, ids=["nobatch", "b2x3"])
@pytest.mark.parametrize("m,n,k", PRODUCT_SHAPES)
def test_product_f64(m, n, k, batch, path):
    V, tau = lapack_reflectors(m, n, k, batch)
    Q = ops.householder_product(to(V, F64), to(tau, F64))
    assert Q.is_cuda and Q.is_contiguous() and Q.shape == V.shape
    close64(Q, RH.householder_product_ref(V, tau))
    if k > 0:
        close64(Q, torch.linalg.householder_product(to(V, F64), to(tau, F64)))
    G = torch.randn_like(V)
    dV, dtau = ops.householder_product_backward(to(G, F64), to(V, F64), to(tau, F64))
    dV_ref, dtau_ref = RH.householder_product_backward_ref(G, V, tau)
    assert dV.is_contiguous() and dtau.shape == tau.shape
    close64(dV, dV_ref, scale=max(m, 1))
    close64(dtau, dtau_ref, scale=max(m, 1))


@with_paths
@pytest.mark.parametrize("batch", BATCHES, ids=["nobatch", "b2x3"])
@pytest.mark.parametrize("m,n,k", [(27, 27, 27), (33, 33, 16), (100, 60, 50), (160, 160, 160), (513, 513, 513)])
def test_product_f32(m, n, k, batch, path):
    V64, tau64 = lapack_reflectors(m, n, k, batch)
    V, tau = to(V64, F32), to(tau64, F32)
    rule32(ops.householder_product(V, tau), RH.householder_product_ref(V64, tau64),
           torch.linalg.householder_product(V, tau), "householder_product")
    if path == "level3" and m == 513 and batch:
        return  # the backward has one path; torch's float32 autograd baseline is slow at this size
    G = torch.randn(*V.shape, dtype=F64)
    dV, dtau = ops.householder_product_backward(to(G, F32), V, tau)
    dV64, dtau64 = RH.householder_product_backward_ref(G, V64, tau64)
    tV, ttau = torch_grads(torch.linalg.householder_product, [V, tau], to(G, F32))
    rule32(dV, dV64, tV.tril(-1), "householder_product_backward dV")  # torch also fills V's unread part
    rule32(dtau, dtau64, ttau, "householder_product_backward dtau")


# ---- householder_orthogonal / householder_apply --------------------------------------------------------

# (d, k, n): n only for apply
DENSE_SHAPES = [(1, 1, 1), (2, 2, 2), (2, 1, 3), (27, 27, 27), (33, 33, 5), (64, 64, 64), (100, 33, 100),
                (160, 160, 160), (100, 100, 600), (161, 80, 7), (513, 513, 513), (513, 100, 60), (5, 0, 3)]


@with_paths
@pytest.mark.parametrize("batch", BATCHES, ids=["nobatch", "b2x3"])
@pytest.mark.parametrize("d,k,n", DENSE_SHAPES)
def test_dense_f64(d, k, n, batch, path):
    V, X = torch.randn(*batch, d, k, dtype=F64), torch.randn(*batch, d, n, dtype=F64)
    Vc, Xc = to(V, F64), to(X, F64)
    Q = ops.householder_orthogonal(Vc)
    assert Q.is_cuda and Q.is_contiguous()
    close64(Q, RH.householder_orthogonal_ref(V), scale=d)
    G = torch.randn(*batch, d, d, dtype=F64)
    close64(ops.householder_orthogonal_backward(to(G, F64), Vc), RH.householder_orthogonal_backward_ref(G, V),
            scale=d * d)
    Y = ops.householder_apply(Vc, Xc)
    assert Y.is_contiguous()
    close64(Y, RH.householder_apply_ref(V, X), scale=d)
    G = torch.randn(*batch, d, n, dtype=F64)
    dV, dX = ops.householder_apply_backward(to(G, F64), Vc, Xc)
    dV_ref, dX_ref = RH.householder_apply_backward_ref(G, V, X)
    close64(dV, dV_ref, scale=d * d)
    close64(dX, dX_ref, scale=d)


@with_paths
@pytest.mark.parametrize("batch", BATCHES, ids=["nobatch", "b2x3"])
@pytest.mark.parametrize("d,k,n", [(27, 27, 27), (33, 33, 5), (100, 33, 100), (160, 160, 160), (513, 513, 64)])
def test_dense_f32(d, k, n, batch, path):
    V64, X64 = torch.randn(*batch, d, k, dtype=F64), torch.randn(*batch, d, n, dtype=F64)
    V, X = to(V64, F32), to(X64, F32)
    rule32(ops.householder_orthogonal(V), RH.householder_orthogonal_ref(V64), orth_loop(V), "householder_orthogonal")
    rule32(ops.householder_apply(V, X), RH.householder_apply_ref(V64, X64), reflect_loop(V, X), "householder_apply")
    G = torch.randn(*batch, d, d, dtype=F64)
    (tV,) = torch_grads(orth_loop, [V], to(G, F32))
    rule32(ops.householder_orthogonal_backward(to(G, F32), V), RH.householder_orthogonal_backward_ref(G, V64), tV,
           "householder_orthogonal_backward")
    G = torch.randn_like(X64)
    dV, dX = ops.householder_apply_backward(to(G, F32), V, X)
    dV64, dX64 = RH.householder_apply_backward_ref(G, V64, X64)
    tV, tX = torch_grads(reflect_loop, [V, X], to(G, F32))
    rule32(dV, dV64, tV, "householder_apply_backward dV")
    rule32(dX, dX64, tX, "householder_apply_backward dX")


@with_paths
@pytest.mark.parametrize("dtype", [F32, F64], ids=["f32", "f64"])
def test_batch64_d27(dtype, path):
    """The first OPT layer's shape, batched as the layers group it: 64 matrices of d = 27."""
    V64, tau64 = lapack_reflectors(27, 27, 27, (64,))
    D64, X64 = torch.randn(64, 27, 27, dtype=F64), torch.randn(64, 27, 64, dtype=F64)
    outs = [ops.householder_product(to(V64, dtype), to(tau64, dtype)), ops.householder_orthogonal(to(D64, dtype)),
            ops.householder_apply(to(D64, dtype), to(X64, dtype))]
    refs = [RH.householder_product_ref(V64, tau64), RH.householder_orthogonal_ref(D64), RH.householder_apply_ref(D64, X64)]
    if dtype == F64:
        for o, r in zip(outs, refs):
            close64(o, r, scale=27)
    else:
        yard = [torch.linalg.householder_product(to(V64, F32), to(tau64, F32)), orth_loop(to(D64, F32)),
                reflect_loop(to(D64, F32), to(X64, F32))]
        for o, r, t in zip(outs, refs, yard):
            rule32(o, r, t, "batch 64, d = 27")
    Q = outs[1].double()
    assert (Q.mT @ Q - torch.eye(27, dtype=F64, device=DEV)).norm(dim=(-2, -1)).max().item() / 27 ** 0.5 < 1e-5


# ---- layouts ------------------------------------------------------------------------------------------

@with_paths
@pytest.mark.parametrize("how", ["mT", "slice"])
@pytest.mark.parametrize("batch", BATCHES, ids=["nobatch", "b2x3"])
def test_noncontiguous(batch, how, path):
    V, tau = lapack_reflectors(33, 27, 20, batch)
    G = torch.randn_like(V)
    Vs, Gs = strided(to(V, F64), how), strided(to(G, F64), how)
    taus = strided(to(tau, F64).unsqueeze(-1), "slice").squeeze(-1)
    assert not Vs.is_contiguous() and not taus.is_contiguous()
    close64(ops.householder_product(Vs, taus), RH.householder_product_ref(V, tau))
    for a, b in zip(ops.householder_product_backward(Gs, Vs, taus), RH.householder_product_backward_ref(G, V, tau)):
        close64(a, b, scale=33)

    V, X = torch.randn(*batch, 33, 27, dtype=F64), torch.randn(*batch, 33, 9, dtype=F64)
    G, GX = torch.randn(*batch, 33, 33, dtype=F64), torch.randn_like(X)
    Vs, Xs, Gs, GXs = (strided(to(t, F64), how) for t in (V, X, G, GX))
    close64(ops.householder_orthogonal(Vs), RH.householder_orthogonal_ref(V), scale=33)
    close64(ops.householder_orthogonal_backward(Gs, Vs), RH.householder_orthogonal_backward_ref(G, V), scale=33 * 33)
    close64(ops.householder_apply(Vs, Xs), RH.householder_apply_ref(V, X), scale=33)
    for a, b in zip(ops.householder_apply_backward(GXs, Vs, Xs), RH.householder_apply_backward_ref(GX, V, X)):
        close64(a, b, scale=33 * 33)

    P = torch.randn(*batch, 40, 30, dtype=F64)
    Ps = strided(to(P, F64), how)
    Q = ops.gram_schmidt(Ps, 0)
    close_rel(Q, RG.gram_schmidt_ref(P), 1e-10)
    G = torch.randn_like(P)
    close_rel(ops.gram_schmidt_backward(strided(to(G, F64), how), Ps, strided(Q, how)),
              RG.gram_schmidt_backward_ref(G, P, RG.gram_schmidt_ref(P)), 1e-8)


@with_paths
def test_expanded_inputs_and_autograd_sum(path):
    """Stride-0 (expanded) inputs and the expanded grad that out.sum().backward() hands the backward ops."""
    V, tau = lapack_reflectors(27, 20, 15)
    Vb, taub = to(V, F64).expand(2, 3, 27, 20), to(tau, F64).expand(2, 3, 15)
    close64(ops.householder_product(Vb, taub), RH.householder_product_ref(V.expand(2, 3, 27, 20), tau.expand(2, 3, 15)))
    Vg, taug = to(V, F64).requires_grad_(True), to(tau, F64).requires_grad_(True)
    ops.householder_product(Vg, taug).sum().backward()
    dV, dtau = RH.householder_product_backward_ref(torch.ones(27, 20, dtype=F64), V, tau)
    close64(Vg.grad, dV, scale=27)
    close64(taug.grad, dtau, scale=27)

    D = torch.randn(30, 30, dtype=F64)
    Dg = to(D, F64).requires_grad_(True)
    ops.householder_orthogonal(Dg).sum().backward()
    close64(Dg.grad, RH.householder_orthogonal_backward_ref(torch.ones(30, 30, dtype=F64), D), scale=900)

    P = torch.randn(30, 30, dtype=F64)
    Pg = to(P, F64).requires_grad_(True)
    ops.gram_schmidt(Pg, 0).sum().backward()
    close_rel(Pg.grad, RG.gram_schmidt_backward_ref(torch.ones(30, 30, dtype=F64), P, RG.gram_schmidt_ref(P)), 1e-8)


# ---- special values -------------------------------------------------------------------------------------

@with_paths
@pytest.mark.parametrize("m,n,k", [(33, 33, 33), (200, 200, 200)])
def test_product_tau_zeros_and_general_tau(m, n, k, path):
    """tau_i = 0 (identity reflectors) and tau not making orthogonal reflectors: as torch and the reference."""
    V = torch.randn(2, m, n, dtype=F64) / m ** 0.5
    tau = 2 * torch.rand(2, k, dtype=F64)
    tau[..., ::3] = 0
    Q = ops.householder_product(to(V, F64), to(tau, F64))
    close64(Q, RH.householder_product_ref(V, tau), scale=m)
    close64(Q, torch.linalg.householder_product(to(V, F64), to(tau, F64)), scale=m)
    G = torch.randn_like(V)
    for a, b in zip(ops.householder_product_backward(to(G, F64), to(V, F64), to(tau, F64)),
                    RH.householder_product_backward_ref(G, V, tau)):
        close64(a, b, scale=m * m)


@with_paths
def test_dense_zero_columns_and_nan(path):
    V, X = torch.randn(40, 30, dtype=F64), torch.randn(40, 6, dtype=F64)
    V[:, [0, 7, 29]] = 0
    close64(ops.householder_orthogonal(to(V, F64)), RH.householder_orthogonal_ref(V), scale=40)
    close64(ops.householder_apply(to(V, F64), to(X, F64)), RH.householder_apply_ref(V, X), scale=40)
    V[10, 3] = float("nan")
    assert ops.householder_orthogonal(to(V, F64)).isnan().any()
    assert ops.householder_apply(to(V, F64), to(X, F64)).isnan().any()


def test_product_ignores_unread_part_of_V():
    V, tau = lapack_reflectors(30, 20, 12)
    Vd = torch.where(torch.ones_like(V).tril(-1).bool(), V, torch.full_like(V, float("nan")))
    Vd[:, 12:] = float("inf")
    for small in ("1", "0"):
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("OPT_FAST_CUDA_SMALL", small)
            close64(ops.householder_product(to(Vd, F64), to(tau, F64)), RH.householder_product_ref(V, tau))
    dV, _ = ops.householder_product_backward(to(torch.randn(30, 20, dtype=F64), F64), to(Vd, F64), to(tau, F64))
    assert (dV.triu() == 0).all() and (dV[:, 12:] == 0).all()


# ---- gram_schmidt ---------------------------------------------------------------------------------------

GS_SHAPES = [(1, 1), (2, 2), (2, 1), (27, 27), (33, 33), (64, 64), (100, 100), (160, 160), (513, 513),
             (100, 33), (513, 200)]


def gs_torch32(P):
    """torch's own float32 result: Householder QR with the sign flipped to diag(R) > 0."""
    Q, R = torch.linalg.qr(P)
    return Q * torch.where(R.diagonal(dim1=-2, dim2=-1) < 0, -1.0, 1.0).unsqueeze(-2)


def orth_err(Q):
    Q = Q.double()
    n = Q.shape[-1]
    return ((Q.mT @ Q - torch.eye(n, dtype=F64, device=Q.device)).norm(dim=(-2, -1)) / n ** 0.5).max().item()


@pytest.mark.parametrize("batch", BATCHES, ids=["nobatch", "b2x3"])
@pytest.mark.parametrize("m,n", GS_SHAPES)
def test_gram_schmidt_f64(m, n, batch):
    P = torch.randn(*batch, m, n, dtype=F64)
    Q = ops.gram_schmidt(to(P, F64), 0)
    assert Q.is_cuda and Q.is_contiguous() and Q.shape == P.shape
    Qref = RG.gram_schmidt_ref(P)
    close_rel(Q, Qref, 1e-10)
    assert (torch.linalg.diagonal(Q.mT @ to(P, F64)) > 0).all()  # positive diag(R)
    G = torch.randn_like(P)
    close_rel(ops.gram_schmidt_backward(to(G, F64), to(P, F64), Q), RG.gram_schmidt_backward_ref(G, P, Qref), 1e-8)


@pytest.mark.parametrize("batch", BATCHES, ids=["nobatch", "b2x3"])
@pytest.mark.parametrize("m,n", [(27, 27), (33, 33), (64, 64), (100, 100), (160, 160), (513, 513), (513, 200)])
def test_gram_schmidt_f32(m, n, batch):
    P64 = torch.randn(*batch, m, n, dtype=F64)
    P = to(P64, F32)
    Q = ops.gram_schmidt(P, 0)
    rule32(Q, RG.gram_schmidt_ref(P64), gs_torch32(P), "gram_schmidt")
    assert orth_err(Q) <= 1e-5, orth_err(Q)  # the orthogonality gate of docs/performance.md
    G = torch.randn_like(P64)
    (tP,) = torch_grads(lambda x: gs_torch32(x), [P], to(G, F32))
    rule32(ops.gram_schmidt_backward(to(G, F32), P, Q), RG.gram_schmidt_backward_ref(G, P64, RG.gram_schmidt_ref(P64)),
           tP, "gram_schmidt_backward")


@pytest.mark.parametrize("dtype", [F32, F64], ids=["f32", "f64"])
@pytest.mark.parametrize("block_size", [0, 1, 7, 32, 64, 200])
@pytest.mark.parametrize("m,n", [(100, 100), (513, 513), (300, 130)])
def test_gram_schmidt_block_sizes(m, n, block_size, dtype):
    P64 = torch.randn(2, m, n, dtype=F64)
    Q = ops.gram_schmidt(to(P64, dtype), block_size)
    if dtype == F64:
        close_rel(Q, RG.gram_schmidt_ref(P64), 1e-10)
    else:
        rule32(Q, RG.gram_schmidt_ref(P64), gs_torch32(to(P64, F32)), f"gram_schmidt block_size={block_size}")
        assert orth_err(Q) <= 1e-5


def test_gram_schmidt_batch64_and_nan():
    P64 = torch.randn(64, 27, 27, dtype=F64)
    Q = ops.gram_schmidt(to(P64, F32), 0)
    rule32(Q, RG.gram_schmidt_ref(P64), gs_torch32(to(P64, F32)), "gram_schmidt batch 64")
    P = torch.randn(2, 40, 40, dtype=F64)
    P[1, 5, 10] = float("nan")
    Q = ops.gram_schmidt(to(P, F64), 8)
    assert not Q[0].isnan().any() and Q[1].isnan().any()
    assert not Q[1, :, :10].isnan().any()  # columns before the NaN one do not see it


@pytest.mark.parametrize("dtype", [F32, F64])
def test_gram_schmidt_rank_deficient(dtype):
    # forward: finite and orthonormal like the reference (Householder fallback); backward: the CPU's error
    P = torch.randn(2, 30, 30, dtype=F64)
    P[0, :, 7] = 0            # a zero column: Gram-Schmidt would divide 0 by 0
    P[1, :, 12] = P[1, :, 3]  # an exactly repeated column
    Pd = to(P, dtype)
    Q = ops.gram_schmidt(Pd, 0)
    assert torch.isfinite(Q).all()
    assert orth_err(Q) <= (1e-5 if dtype == F32 else 1e-12)
    R = torch.triu(Q.mT @ Pd)
    torch.testing.assert_close(Q @ R, Pd, rtol=0, atol=1e-4 if dtype == F32 else 1e-11)
    with pytest.raises(RuntimeError, match=r"opt_fast.gram_schmidt_backward: P is rank deficient"):
        ops.gram_schmidt_backward(torch.ones_like(Q), Pd[:1], Q[:1])


# ---- gradcheck (float64, small sizes): autograd -> the CUDA backward ops ---------------------------------

@with_paths
@pytest.mark.parametrize("batch", [(), (2,)], ids=["nobatch", "b2"])
def test_gradcheck(batch, path):
    for m, n, k in [(5, 5, 5), (7, 5, 3)]:
        V, tau = lapack_reflectors(m, n, k, batch)
        args = (to(V, F64).requires_grad_(True), to(tau, F64).requires_grad_(True))
        assert torch.autograd.gradcheck(ops.householder_product, args)
    for d, k, n in [(5, 5, 2), (7, 3, 4)]:
        V = to(torch.randn(*batch, d, k, dtype=F64), F64).requires_grad_(True)
        X = to(torch.randn(*batch, d, n, dtype=F64), F64).requires_grad_(True)
        assert torch.autograd.gradcheck(ops.householder_orthogonal, (V,))
        assert torch.autograd.gradcheck(ops.householder_apply, (V, X))
    for m, n in [(5, 5), (7, 4)]:
        P = to(torch.randn(*batch, m, n, dtype=F64), F64).requires_grad_(True)
        assert torch.autograd.gradcheck(lambda p: ops.gram_schmidt(p, 0), (P,))
        assert torch.autograd.gradcheck(lambda p: ops.gram_schmidt(p, 2), (P,))


# ---- opcheck -----------------------------------------------------------------------------------------------

def _opcheck_cases(requires_grad):
    V, tau = lapack_reflectors(9, 7, 5, (2,))
    D, X = torch.randn(2, 9, 6, dtype=F64), torch.randn(2, 9, 4, dtype=F64)
    P = torch.randn(2, 9, 7, dtype=F64)
    c = lambda t: to(t, F32).requires_grad_(requires_grad)  # noqa: E731
    Pc = to(P, F32)
    Q = ops.gram_schmidt(Pc, 0)
    return [
        (ops.householder_product.default, (c(V), c(tau))),
        (ops.householder_orthogonal.default, (c(D),)),
        (ops.householder_apply.default, (c(D), c(X))),
        (ops.gram_schmidt.default, (c(P), 3)),
        (ops.householder_product_backward.default, (to(torch.randn_like(V), F32), to(V, F32), to(tau, F32))),
        (ops.householder_orthogonal_backward.default, (to(torch.randn(2, 9, 9), F32), to(D, F32))),
        (ops.householder_apply_backward.default, (to(torch.randn_like(X), F32), to(D, F32), to(X, F32))),
        (ops.gram_schmidt_backward.default, (to(torch.randn_like(P), F32), Pc, Q)),
    ]


@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck(requires_grad):
    for op, args in _opcheck_cases(requires_grad):
        if "backward" in str(op) and requires_grad:
            continue
        torch.library.opcheck(op, args)


# ---- streams and CUDA graphs --------------------------------------------------------------------------------

def test_side_stream_and_cuda_graph():
    V = to(torch.randn(4, 27, 27, dtype=F64), F32)
    P = to(torch.randn(4, 100, 100, dtype=F64), F32)
    want = (ops.householder_orthogonal(V), ops.gram_schmidt(P, 0))
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        got = (ops.householder_orthogonal(V), ops.gram_schmidt(P, 0))
    torch.cuda.current_stream().wait_stream(s)
    for a, b in zip(got, want):  # cuBLAS may pick another algorithm per stream: not bitwise
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = (ops.householder_orthogonal(V), ops.gram_schmidt(P, 0))
    V.copy_(V.flip(0))
    P.copy_(P.flip(0))
    g.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out[0], want[0].flip(0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out[1], want[1].flip(0), rtol=1e-5, atol=1e-6)


# ---- bad inputs: errors name the op, also for tensors on different devices ---------------------------------

def _r(*shape, dtype=F64, device=DEV):
    return torch.randn(*shape, dtype=F64).to(device=device, dtype=dtype)


BAD = [
    ("householder_product", lambda: (_r(5, 4, dtype=torch.float16), _r(4, dtype=torch.float16)), "float32 or float64"),
    ("householder_product", lambda: (_r(5, 4), _r(4, device="cpu")), "same device"),
    ("householder_product", lambda: (_r(5, 4), _r(4, dtype=F32)), "same dtype"),
    ("householder_product", lambda: (_r(4, 5), _r(4)), "m >= n"),
    ("householder_product", lambda: (_r(5, 4), _r(5)), "k = tau.shape"),
    ("householder_product", lambda: (_r(2, 5, 4), _r(3, 4)), "batch dimensions"),
    ("householder_orthogonal", lambda: (_r(3, 5),), "k <= d"),
    ("householder_orthogonal", lambda: (_r(5),), "at least 2 dimensions"),
    ("householder_apply", lambda: (_r(5, 3), _r(5, 2, device="cpu")), "same device"),
    ("householder_apply", lambda: (_r(5, 3), _r(4, 2)), "X [..., d, n]"),
    ("householder_apply", lambda: (_r(2, 5, 3), _r(3, 5, 2)), "batch dimensions"),
    ("gram_schmidt", lambda: (_r(3, 5), 0), "m >= n"),
    ("gram_schmidt", lambda: (_r(5, 3), -1), "block_size >= 0"),
    ("gram_schmidt", lambda: (_r(5, 3, dtype=torch.float16), 0), "float32 or float64"),
    ("householder_orthogonal_backward", lambda: (_r(5, 4), _r(5, 3)), "grad of shape"),
    ("householder_apply_backward", lambda: (_r(5, 2, device="cpu"), _r(5, 3), _r(5, 2)), "same device"),
    ("gram_schmidt_backward", lambda: (_r(5, 4), _r(5, 3), _r(5, 3)), "grad of shape"),
    ("gram_schmidt_backward", lambda: (_r(5, 3, device="cpu"), _r(5, 3), _r(5, 3)), "same device"),
]


@pytest.mark.parametrize("op,make,needle", BAD, ids=[f"{o}-{i}" for i, (o, _, _) in enumerate(BAD)])
def test_bad_inputs(op, make, needle):
    with pytest.raises(RuntimeError) as info:
        getattr(ops, op)(*make())
    msg = str(info.value)
    assert re.search(rf"opt_fast\.{op}: expected", msg), msg
    assert needle in msg, msg


# ---- smoke: every kernel once (scripts/gpu_run.sh runs this under compute-sanitizer) ------------------------

@pytest.mark.parametrize("dtype", [F32, F64], ids=["f32", "f64"])
def test_smoke_all_kernels(dtype):
    V, tau = lapack_reflectors(40, 33, 30, (3,))
    D, X = torch.randn(3, 40, 30, dtype=F64), torch.randn(3, 40, 5, dtype=F64)
    P = torch.randn(3, 70, 70, dtype=F64)
    for small in ("1", "0"):
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("OPT_FAST_CUDA_SMALL", small)
            Q = ops.householder_product(to(V, dtype), to(tau, dtype))
            ops.householder_product_backward(torch.randn_like(Q), to(V, dtype), to(tau, dtype))
            H = ops.householder_orthogonal(to(D, dtype))
            ops.householder_orthogonal_backward(torch.randn_like(H), to(D, dtype))
            Y = ops.householder_apply(to(D, dtype), to(X, dtype))
            ops.householder_apply_backward(torch.randn_like(Y), to(D, dtype), to(X, dtype))
    for b in (0, 16):
        Q = ops.gram_schmidt(to(P, dtype), b)
        ops.gram_schmidt_backward(torch.randn_like(Q), to(P, dtype), Q)
    torch.cuda.synchronize()
