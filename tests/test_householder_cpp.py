"""The C++ CPU Householder kernels (csrc/cpu/householder_{product,orthogonal,apply}.cpp) against the reference
(the spec). One file for the three ops (~450 lines): they share the cases, the helpers and most tests.

Every forward and backward op is called directly through torch.ops.opt_fast (CPU tensors reach the C++
kernel) and compared with opt_fast.reference.householder_*_ref / *_backward_ref:
  * float64: tight tolerance;
  * float32: max|op - ref64| <= 2 max|torch32 - ref64| + atol, where torch32 is plain PyTorch in float32
    (torch.linalg.householder_product and its autograd for the product; a loop of rank-1 reflections and
    its autograd for the dense ops).
"""
import re

import pytest
import torch

import opt_fast
from _refs import householder_apply_torch as reflect_loop  # H(v_1)…H(v_k) X by rank-1 reflections
from _refs import householder_orthogonal_torch as orth_loop
from _refs import noncontiguous as strided  # same values, non-contiguous: "mT" or "slice"
from opt_fast.reference import householder as R

pytestmark = pytest.mark.skipif(
    not opt_fast.has_kernel("householder_product", "CPU"), reason="C++ CPU householder kernels not built"
)

ops = torch.ops.opt_fast
F64 = torch.float64
ATOL32 = 1e-5


# ---- helpers ---------------------------------------------------------------------------------------

def err(a, b):
    return 0.0 if a.numel() == 0 else (a.double() - b.double()).abs().max().item()


def close64(a, b, scale=1.0):
    assert a.shape == b.shape and a.dtype == b.dtype
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-11 * scale)


def lapack_reflectors(m, n, k, batch=(), dtype=F64):
    V, tau = torch.geqrf(torch.randn(*batch, m, n, dtype=F64))
    return V.to(dtype), tau[..., :k].contiguous().to(dtype)


def torch_grads(fn, args, grad):
    """Gradients of <fn(*args), grad> by autograd on plain PyTorch."""
    args = [a.detach().clone().requires_grad_(True) for a in args]
    out = fn(*args)
    return torch.autograd.grad(out, args, grad)


def rule32(out32, ref64, torch32, what):
    e, e_t = err(out32, ref64), err(torch32, ref64)
    assert e <= 2 * e_t + ATOL32, f"{what}: err {e:.3e} > 2 x torch {e_t:.3e} + {ATOL32:.0e}"


# ---- cases -----------------------------------------------------------------------------------------

# (m, n, k) for householder_product: square, tall, k < n < m, and sizes past the 128/256 panels and past a
# power-of-two number of T leaves (k = 130, 300: padded T).
PRODUCT_SHAPES = [(1, 1, 1), (2, 2, 2), (27, 27, 27), (33, 33, 33), (100, 100, 100), (2, 1, 1),
                  (33, 27, 27), (100, 33, 27), (100, 100, 33), (33, 27, 2), (9, 5, 0)]
PRODUCT_BIG = [(300, 260, 130), (300, 300, 300)]
# (d, k, n) for the dense ops (n only for apply)
DENSE_SHAPES = [(1, 1, 1), (2, 2, 2), (27, 27, 27), (33, 33, 5), (100, 100, 100), (2, 1, 3), (33, 27, 1),
                (100, 33, 100), (27, 2, 27), (5, 0, 3)]
DENSE_BIG = [(300, 300, 300), (260, 130, 7)]
BATCHES = [(), (2, 3)]


def product_inputs(m, n, k, batch, dtype=F64):
    return lapack_reflectors(m, n, k, batch, dtype)


def dense_inputs(d, k, n, batch, dtype=F64):
    return torch.randn(*batch, d, k, dtype=F64).to(dtype), torch.randn(*batch, d, n, dtype=F64).to(dtype)


# ---- float64: forward and backward against the reference ------------------------------------------

@pytest.mark.parametrize("batch", BATCHES, ids=["nobatch", "b2x3"])
@pytest.mark.parametrize("m,n,k", PRODUCT_SHAPES + PRODUCT_BIG)
def test_product_f64(m, n, k, batch):
    if (m, n, k) in PRODUCT_BIG and batch:
        batch = (2, 3) if m < 300 else (5,)  # keeps the test fast; still a batched panel width
    V, tau = product_inputs(m, n, k, batch)
    Q = ops.householder_product(V, tau)
    assert Q.is_contiguous()
    close64(Q, R.householder_product_ref(V, tau))
    G = torch.randn_like(Q)
    dV, dtau = ops.householder_product_backward(G, V, tau)
    dV_ref, dtau_ref = R.householder_product_backward_ref(G, V, tau)
    assert dV.is_contiguous() and dtau.is_contiguous()
    close64(dV, dV_ref, scale=max(m, 1))
    close64(dtau, dtau_ref, scale=max(m, 1))


@pytest.mark.parametrize("batch", BATCHES, ids=["nobatch", "b2x3"])
@pytest.mark.parametrize("d,k,n", DENSE_SHAPES + DENSE_BIG)
def test_dense_f64(d, k, n, batch):
    if (d, k, n) in DENSE_BIG and batch:
        batch = (5,)
    V, X = dense_inputs(d, k, n, batch)
    Q = ops.householder_orthogonal(V)
    assert Q.is_contiguous()
    close64(Q, R.householder_orthogonal_ref(V))
    G = torch.randn_like(Q)
    dV = ops.householder_orthogonal_backward(G, V)
    assert dV.is_contiguous()
    close64(dV, R.householder_orthogonal_backward_ref(G, V), scale=d)

    Y = ops.householder_apply(V, X)
    assert Y.is_contiguous()
    close64(Y, R.householder_apply_ref(V, X), scale=d)
    G = torch.randn_like(Y)
    dV, dX = ops.householder_apply_backward(G, V, X)
    dV_ref, dX_ref = R.householder_apply_backward_ref(G, V, X)
    close64(dV, dV_ref, scale=d * d)
    close64(dX, dX_ref, scale=d)


@pytest.mark.parametrize("m,n,k", [(512, 512, 512), (600, 520, 512)])
def test_product_level3_forward(m, n, k):
    """householder_product's forward takes the level-3 UT form only for one matrix with k >= 512 (LAPACK's
    orgqr elsewhere): float64 against the reference, float32 within 2x of torch's error."""
    V, tau = product_inputs(m, n, k, ())
    Q = ops.householder_product(V, tau)
    assert Q.is_contiguous()
    close64(Q, R.householder_product_ref(V, tau))
    V32, tau32 = V.float(), tau.float()
    rule32(ops.householder_product(V32, tau32), R.householder_product_ref(V, tau),
           torch.linalg.householder_product(V32, tau32), "householder_product")


# ---- float32: 2x torch's own error against a float64 reference --------------------------------------

# (300, 300, 300) only unbatched: torch's float32 autograd baseline is slow
@pytest.mark.parametrize("m,n,k,batch", [(m, n, k, b) for m, n, k in [(27, 27, 27), (33, 33, 33), (100, 100, 100),
                                                                    (100, 33, 27)] for b in BATCHES]
                         + [(300, 300, 300, BATCHES[0])])
def test_product_f32(m, n, k, batch):
    V64, tau64 = product_inputs(m, n, k, batch)
    V, tau = V64.float(), tau64.float()
    rule32(ops.householder_product(V, tau), R.householder_product_ref(V64, tau64),
           torch.linalg.householder_product(V, tau), "householder_product")
    G = torch.randn(*V.shape, dtype=F64)
    dV, dtau = ops.householder_product_backward(G.float(), V, tau)
    dV64, dtau64 = R.householder_product_backward_ref(G, V64, tau64)
    tV, ttau = torch_grads(torch.linalg.householder_product, [V, tau], G.float())
    rule32(dV, dV64, tV.tril(-1), "householder_product_backward dV")  # torch also fills V's unread part
    rule32(dtau, dtau64, ttau, "householder_product_backward dtau")


@pytest.mark.parametrize("batch", BATCHES, ids=["nobatch", "b2x3"])
@pytest.mark.parametrize("d,k,n", [(27, 27, 27), (33, 33, 5), (100, 100, 100), (100, 33, 100)])
def test_dense_f32(d, k, n, batch):
    V64, X64 = dense_inputs(d, k, n, batch)
    V, X = V64.float(), X64.float()
    rule32(ops.householder_orthogonal(V), R.householder_orthogonal_ref(V64), orth_loop(V), "householder_orthogonal")
    G = torch.randn(*V.shape[:-1], d, dtype=F64)
    (tV,) = torch_grads(orth_loop, [V], G.float())
    rule32(ops.householder_orthogonal_backward(G.float(), V), R.householder_orthogonal_backward_ref(G, V64), tV,
           "householder_orthogonal_backward")

    rule32(ops.householder_apply(V, X), R.householder_apply_ref(V64, X64), reflect_loop(V, X), "householder_apply")
    G = torch.randn_like(X64)
    dV, dX = ops.householder_apply_backward(G.float(), V, X)
    dV64, dX64 = R.householder_apply_backward_ref(G, V64, X64)
    tV, tX = torch_grads(reflect_loop, [V, X], G.float())
    rule32(dV, dV64, tV, "householder_apply_backward dV")
    rule32(dX, dX64, tX, "householder_apply_backward dX")


# householder_apply runs in panels of 64 reflectors (kApplyPanel): one short of, exactly at and one past a panel
# boundary, two full panels, a column-major V (LAPACK layout), and n from 1 to more than d.
@pytest.mark.parametrize("d,k,n", [(130, 63, 1), (130, 64, 64), (130, 65, 7), (200, 128, 64), (200, 193, 250)])
def test_apply_panels(d, k, n):
    V, X = dense_inputs(d, k, n, (2,))
    G = torch.randn_like(X)
    for Vin in (V, V.mT.contiguous().mT):
        close64(ops.householder_apply(Vin, X), R.householder_apply_ref(V, X), scale=d)
        dV, dX = ops.householder_apply_backward(G, Vin, X)
        dV_ref, dX_ref = R.householder_apply_backward_ref(G, V, X)
        close64(dV, dV_ref, scale=d * d)
        close64(dX, dX_ref, scale=d)
    V32, X32 = V.float(), X.float()
    rule32(ops.householder_apply(V32, X32), R.householder_apply_ref(V, X), reflect_loop(V32, X32), "householder_apply")
    dV, dX = ops.householder_apply_backward(G.float(), V32, X32)
    tV, tX = torch_grads(reflect_loop, [V32, X32], G.float())
    rule32(dV, dV_ref, tV, "householder_apply_backward dV")
    rule32(dX, dX_ref, tX, "householder_apply_backward dX")


# ---- layouts: non-contiguous inputs, expanded grad ------------------------------------------------

@pytest.mark.parametrize("how", ["mT", "slice"])
@pytest.mark.parametrize("batch", BATCHES, ids=["nobatch", "b2x3"])
def test_noncontiguous(batch, how):
    V, tau = product_inputs(33, 27, 20, batch)
    G = torch.randn_like(V)
    Vs, taus, Gs = strided(V, how), strided(tau.unsqueeze(-1), "slice").squeeze(-1), strided(G, how)
    assert not Vs.is_contiguous() and not taus.is_contiguous()
    close64(ops.householder_product(Vs, taus), R.householder_product_ref(V, tau))
    for a, b in zip(ops.householder_product_backward(Gs, Vs, taus), R.householder_product_backward_ref(G, V, tau)):
        close64(a, b, scale=33)

    V, X = dense_inputs(33, 27, 9, batch)
    G, GX = torch.randn(*batch, 33, 33, dtype=F64), torch.randn_like(X)
    Vs, Xs, Gs, GXs = (strided(t, how) for t in (V, X, G, GX))
    close64(ops.householder_orthogonal(Vs), R.householder_orthogonal_ref(V))
    close64(ops.householder_orthogonal_backward(Gs, Vs), R.householder_orthogonal_backward_ref(G, V), scale=33)
    close64(ops.householder_apply(Vs, Xs), R.householder_apply_ref(V, X), scale=33)
    for a, b in zip(ops.householder_apply_backward(GXs, Vs, Xs), R.householder_apply_backward_ref(GX, V, X)):
        close64(a, b, scale=33 * 33)


def test_expanded_inputs_and_grad():
    """Stride-0 (expanded) grad, as autograd hands out for out.sum(), and expanded batched inputs."""
    V, tau = product_inputs(27, 20, 15, ())
    Vb, taub = V.expand(2, 3, 27, 20), tau.expand(2, 3, 15)
    G = torch.ones(1, 1, 1, 1, dtype=F64).expand(2, 3, 27, 20)
    close64(ops.householder_product(Vb, taub), R.householder_product_ref(Vb, taub))
    for a, b in zip(ops.householder_product_backward(G, Vb, taub), R.householder_product_backward_ref(G, Vb, taub)):
        close64(a, b, scale=27)

    V, X = dense_inputs(27, 20, 4, ())
    Vb, Xb = V.expand(4, 27, 20), X.expand(4, 27, 4)
    G = torch.ones((), dtype=F64).expand(4, 27, 27)
    GX = torch.randn(27, 1, dtype=F64).expand(4, 27, 4)
    close64(ops.householder_orthogonal(Vb), R.householder_orthogonal_ref(Vb))
    close64(ops.householder_orthogonal_backward(G, Vb), R.householder_orthogonal_backward_ref(G, Vb), scale=27)
    close64(ops.householder_apply(Vb, Xb), R.householder_apply_ref(Vb, Xb), scale=27)
    for a, b in zip(ops.householder_apply_backward(GX, Vb, Xb), R.householder_apply_backward_ref(GX, Vb, Xb)):
        close64(a, b, scale=27 * 27)


def test_autograd_sum_uses_expanded_grad():
    """End to end: out.sum().backward() (an expanded grad) through the registered autograd formula."""
    V, tau = product_inputs(40, 40, 40, ())
    V.requires_grad_(True), tau.requires_grad_(True)
    ops.householder_product(V, tau).sum().backward()
    dV, dtau = R.householder_product_backward_ref(torch.ones(40, 40, dtype=F64), V.detach(), tau.detach())
    close64(V.grad, dV, scale=40)
    close64(tau.grad, dtau, scale=40)


# ---- special values --------------------------------------------------------------------------------

@pytest.mark.parametrize("batch", BATCHES, ids=["nobatch", "b2x3"])
@pytest.mark.parametrize("m,n,k", [(33, 33, 33), (100, 60, 50), (200, 200, 200)])
def test_product_tau_zeros(m, n, k, batch):
    """tau_i = 0 (identity reflectors, allowed by LAPACK), also non-orthogonal (V, tau): as torch and the ref."""
    V = torch.randn(*batch, m, n, dtype=F64) / m ** 0.5
    tau = 2 * torch.rand(*batch, k, dtype=F64)
    tau[..., ::3] = 0
    tau[..., -1] = 0
    Q = ops.householder_product(V, tau)
    close64(Q, R.householder_product_ref(V, tau))
    close64(Q, torch.linalg.householder_product(V, tau))
    G = torch.randn_like(Q)
    for a, b in zip(ops.householder_product_backward(G, V, tau), R.householder_product_backward_ref(G, V, tau)):
        close64(a, b, scale=m)
    Q0 = ops.householder_product(V, torch.zeros_like(tau))
    close64(Q0, torch.eye(m, n, dtype=F64).expand_as(Q0))


@pytest.mark.parametrize("batch", BATCHES, ids=["nobatch", "b2x3"])
def test_dense_zero_columns(batch):
    """A zero reflector vector is the identity reflector (tau = 0): forward and gradients as the reference."""
    V, X = dense_inputs(40, 30, 6, batch)
    V[..., [0, 7, 29]] = 0
    close64(ops.householder_orthogonal(V), R.householder_orthogonal_ref(V))
    G = torch.randn(*batch, 40, 40, dtype=F64)
    close64(ops.householder_orthogonal_backward(G, V), R.householder_orthogonal_backward_ref(G, V), scale=40)
    close64(ops.householder_apply(V, X), R.householder_apply_ref(V, X), scale=40)
    GX = torch.randn_like(X)
    for a, b in zip(ops.householder_apply_backward(GX, V, X), R.householder_apply_backward_ref(GX, V, X)):
        close64(a, b, scale=40 * 40)
    Vz = torch.zeros_like(V)
    close64(ops.householder_orthogonal(Vz), torch.eye(40, dtype=F64).expand(*batch, 40, 40))
    close64(ops.householder_apply(Vz, X), X)


def test_product_ignores_unread_part_of_V():
    """Only V[..., :k] below the diagonal is read: inf/NaN on and above the diagonal and in columns >= k
    change nothing (as in LAPACK), and their gradient is zero."""
    V, tau = product_inputs(30, 20, 12, ())
    Vd = torch.where(torch.ones_like(V).tril(-1).bool(), V, torch.full_like(V, float("nan")))
    Vd[:, 12:] = float("inf")
    close64(ops.householder_product(Vd, tau), ops.householder_product(V, tau))
    G = torch.randn(30, 20, dtype=F64)
    dV, dtau = ops.householder_product_backward(G, Vd, tau)
    dV_ref, dtau_ref = R.householder_product_backward_ref(G, V, tau)
    close64(dV, dV_ref, scale=30)
    close64(dtau, dtau_ref, scale=30)
    assert (dV.triu() == 0).all() and (dV[:, 12:] == 0).all()


@pytest.mark.parametrize("op", ["product", "orthogonal", "apply"])
def test_nan_propagates(op):
    if op == "product":
        V, tau = product_inputs(20, 20, 20, ())
        tau2 = tau.clone()
        tau2[5] = float("nan")
        assert ops.householder_product(V, tau2).isnan().any()
        V[10, 3] = float("nan")
        out = ops.householder_product(V, tau)
        grads = ops.householder_product_backward(torch.ones(20, 20, dtype=F64), V, tau)
    else:
        V, X = dense_inputs(20, 20, 5, ())
        V[10, 3] = float("nan")
        if op == "orthogonal":
            out = ops.householder_orthogonal(V)
            grads = (ops.householder_orthogonal_backward(torch.ones(20, 20, dtype=F64), V),)
        else:
            out = ops.householder_apply(V, X)
            grads = ops.householder_apply_backward(torch.ones(20, 5, dtype=F64), V, X)
            X2 = X.clone()
            X2[0, 0] = float("nan")
            assert ops.householder_apply(V.nan_to_num(), X2).isnan().any()
    assert out.isnan().any()
    assert grads[0].isnan().any()


@pytest.mark.parametrize("op", ["product", "orthogonal", "apply"])
def test_empty_batch(op):
    if op == "product":
        V, tau = torch.randn(0, 3, 7, 5, dtype=F64), torch.randn(0, 3, 4, dtype=F64)
        out = ops.householder_product(V, tau)
        assert out.shape == V.shape
        dV, dtau = ops.householder_product_backward(torch.randn_like(V), V, tau)
        assert dV.shape == V.shape and dtau.shape == tau.shape
    else:
        V, X = torch.randn(2, 0, 7, 5, dtype=F64), torch.randn(2, 0, 7, 3, dtype=F64)
        if op == "orthogonal":
            out = ops.householder_orthogonal(V)
            assert out.shape == (2, 0, 7, 7)
            assert ops.householder_orthogonal_backward(torch.randn(2, 0, 7, 7, dtype=F64), V).shape == V.shape
        else:
            out = ops.householder_apply(V, X)
            assert out.shape == X.shape
            dV, dX = ops.householder_apply_backward(torch.randn_like(X), V, X)
            assert dV.shape == V.shape and dX.shape == X.shape


# ---- gradcheck through torch.ops.opt_fast (autograd -> the C++ backward ops) --------------------------

@pytest.mark.parametrize("batch", [(), (2,)], ids=["nobatch", "b2"])
@pytest.mark.parametrize("m,n,k", [(5, 5, 5), (7, 5, 3), (6, 4, 4)])
def test_gradcheck_product(m, n, k, batch):
    V, tau = product_inputs(m, n, k, batch)
    V.requires_grad_(True), tau.requires_grad_(True)
    assert torch.autograd.gradcheck(ops.householder_product, (V, tau))


@pytest.mark.parametrize("batch", [(), (2,)], ids=["nobatch", "b2"])
@pytest.mark.parametrize("d,k,n", [(5, 5, 2), (7, 3, 4)])
def test_gradcheck_dense(d, k, n, batch):
    V, X = dense_inputs(d, k, n, batch)
    V.requires_grad_(True), X.requires_grad_(True)
    assert torch.autograd.gradcheck(ops.householder_orthogonal, (V,))
    assert torch.autograd.gradcheck(ops.householder_apply, (V, X))


# ---- bad inputs: the reference's messages ----------------------------------------------------------

_DTYPE_NAMES = {"torch.float32": "Float", "torch.float64": "Double", "torch.int64": "Long", "torch.int32": "Int",
                "torch.float16": "Half", "torch.bfloat16": "BFloat16"}


def _message(fn, *args):
    with pytest.raises(RuntimeError) as info:
        fn(*args)
    msg = str(info.value).splitlines()[0]
    for py, cpp in _DTYPE_NAMES.items():
        msg = msg.replace(py, cpp)
    return msg


def _r(*shape, dtype=F64):
    return torch.randn(*shape, dtype=F64).to(dtype)


BAD = [
    ("householder_product", (_r(5, 4, dtype=torch.float16), _r(4, dtype=torch.float16))),  # dtype
    ("householder_product", (_r(5, dtype=torch.float32), _r(4, dtype=torch.float32))),      # 1-D V
    ("householder_product", (_r(5, 4), torch.tensor(1.0, dtype=F64))),                       # 0-d tau
    ("householder_product", (_r(5, 4), _r(4, dtype=torch.float32))),                        # dtype mismatch
    ("householder_product", (_r(4, 5), _r(4))),                                              # m < n
    ("householder_product", (_r(5, 4), _r(5))),                                              # k > n
    ("householder_product", (_r(2, 5, 4), _r(3, 4))),                                        # batch
    ("householder_product", (_r(2, 5, 4), _r(4))),                                           # batch dims
    ("householder_product", (torch.ones(5, 4, dtype=torch.int64), torch.ones(4, dtype=torch.int64))),
    ("householder_orthogonal", (_r(3, 5),)),                                                 # k > d
    ("householder_orthogonal", (_r(5),)),
    ("householder_orthogonal", (torch.ones(5, 5, dtype=torch.int32),)),
    ("householder_apply", (_r(5, 3), _r(4, 2))),                                             # X rows
    ("householder_apply", (_r(3, 5), _r(3, 2))),                                             # k > d
    ("householder_apply", (_r(5, 3), _r(5, 2, dtype=torch.float32))),                        # dtype mismatch
    ("householder_apply", (_r(2, 5, 3), _r(3, 5, 2))),                                       # batch
    ("householder_apply", (_r(5, 3), _r(5))),                                                # 1-D X
    ("householder_apply", (_r(5, 3, dtype=torch.float16), _r(5, 2, dtype=torch.float16))),
]


@pytest.mark.parametrize("op,args", BAD, ids=[f"{o}-{i}" for i, (o, _) in enumerate(BAD)])
def test_bad_inputs_same_message(op, args):
    got = _message(getattr(ops, op), *args)
    want = _message(getattr(R, op + "_ref"), *args)
    assert re.match(rf"opt_fast\.{op}: expected", got), got
    assert got == want


@pytest.mark.parametrize("op", ["product", "orthogonal", "apply"])
def test_bad_grad_shape_same_message(op):
    if op == "product":
        V, tau = product_inputs(6, 5, 4, ())
        args = (torch.randn(6, 4, dtype=F64), V, tau)
    elif op == "orthogonal":
        args = (torch.randn(6, 5, dtype=F64), torch.randn(6, 5, dtype=F64))
    else:
        args = (torch.randn(6, 3, dtype=F64), torch.randn(6, 5, dtype=F64), torch.randn(6, 2, dtype=F64))
    name = f"householder_{op}_backward"
    got = _message(getattr(ops, name), *args)
    want = _message(getattr(R, name + "_ref"), *args)
    assert re.match(rf"opt_fast\.{name}: expected grad of shape", got), got
    assert got == want


# ---- the direct small-d paths (householder_small.h) and the UT form on either side of the switch -----

@pytest.mark.parametrize("batch", [(1,), (3,), (16,)], ids=["b1", "b3", "b16"])
@pytest.mark.parametrize("d", [27, 64, 65])
def test_small_d_switch(d, batch):
    # product: direct for m <= 64 at any batch; dense ops: direct only for batch <= 8 (b16 takes the UT form)
    V, tau = product_inputs(d, d, d - 3, batch)
    close64(ops.householder_product(V, tau), R.householder_product_ref(V, tau))
    Vd, X = dense_inputs(d, d, 40, batch)
    close64(ops.householder_orthogonal(Vd), R.householder_orthogonal_ref(Vd))
    close64(ops.householder_apply(Vd, X), R.householder_apply_ref(Vd, X), scale=d)
    f32 = [t.float() for t in (V, tau, Vd, X)]
    rule32(ops.householder_product(f32[0], f32[1]), R.householder_product_ref(V, tau),
           torch.linalg.householder_product(f32[0], f32[1]), "householder_product")
    rule32(ops.householder_orthogonal(f32[2]), R.householder_orthogonal_ref(Vd), orth_loop(f32[2]),
           "householder_orthogonal")


def test_small_d_zero_tau_and_zero_reflector_are_identities():
    V, tau = product_inputs(20, 20, 20, (2,))
    tau[:, 5] = 0
    close64(ops.householder_product(V, tau), R.householder_product_ref(V, tau))
    Vd = torch.randn(2, 20, 6, dtype=F64)
    Vd[:, :, 2] = 0
    close64(ops.householder_orthogonal(Vd), R.householder_orthogonal_ref(Vd))
