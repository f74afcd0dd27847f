"""Forward numerics of every torch.ops.opt_fast op against independent float64 references.

Accuracy rule (docs/performance.md): max|out - ref64| <= 2 * max|torch_same_dtype - ref64| + atol, where
torch_same_dtype is the plain-PyTorch equivalent (tests/_refs.py) run in the op's dtype.
"""
import contextlib
import signal

import pytest
import torch

import opt_fast  # noqa: F401  (registers torch.ops.opt_fast)

from _refs import (
    ATOL,
    DTYPES,
    OPS,
    TORCH_EQUIV,
    gram_schmidt_torch,
    householder_product_torch,
    lapack_reflectors,
    lowdin_torch,
    max_err,
    noncontiguous,
    orth_err,
    skew,
)
from conftest import DEVICE_PARAMS

ops = torch.ops.opt_fast

SIZES = [1, 2, 27, 33, 100]
BATCHES = [(), (2, 3)]

# (op, case): the input shapes each op allows, tall / fewer-reflector cases included.
OP_CASES = [
    ("householder_product", "square"),
    ("householder_product", "tall"),        # m > n
    ("householder_product", "tall_k<n"),    # m > n and k < n
    ("householder_orthogonal", "square"),
    ("householder_orthogonal", "k<d"),
    ("householder_apply", "square"),
    ("householder_apply", "k<d"),
    ("gram_schmidt", "square"),
    ("gram_schmidt", "tall"),               # m > n
    ("lowdin", "square"),
    ("lowdin", "tall"),                     # m > n: orthonormal columns
    ("cayley", "skew"),
    ("cayley", "general"),                  # not skew, but I - S invertible
]


def make_inputs(op, case, d, batch, dtype):
    """The op's arguments (contiguous, CPU, in dtype) for one (op, case) at size d."""
    b = tuple(batch)
    randn = lambda *s: torch.randn(*b, *s, dtype=torch.float64).to(dtype)  # noqa: E731
    if op == "householder_product":
        m, n, k = {"square": (d, d, d), "tall": (d + 5, d, d), "tall_k<n": (d + 5, d, d // 2)}[case]
        return lapack_reflectors(m, n, k, b, dtype)
    if op == "householder_orthogonal":
        return (randn(d, d if case == "square" else d // 2),)
    if op == "householder_apply":
        k, n = (d, d) if case == "square" else (d // 2, 3)
        return randn(d, k), randn(d, n)
    if op == "gram_schmidt":
        return randn(d if case == "square" else 2 * d + 1, d), 0
    if op == "lowdin":
        return randn(d if case == "square" else 2 * d + 1, d), 0, None
    if op == "cayley":
        A = torch.randn(*b, d, d, dtype=torch.float64)
        S = skew(A) if case == "skew" else 0.5 * A / d ** 0.5
        return (S.to(dtype),)
    raise ValueError(op)


def to_layout(args, layout, device):
    """Move tensor args to device; "strided" makes each one non-contiguous (transposed storage when
    unbatched, every other column of a larger tensor when batched)."""
    out = []
    for a in args:
        if isinstance(a, torch.Tensor):
            a = a.to(device)
            if layout != "contig":
                how = "mT" if a.dim() == 2 else "slice"
                a = noncontiguous(a, how)
                if a.shape[-1] > 1 and (how == "slice" or a.shape[-2] > 1):
                    assert not a.is_contiguous()
        out.append(a)
    return tuple(out)


def upcast(args):
    return tuple(a.double() if isinstance(a, torch.Tensor) else a for a in args)


def expected_shape(op, args):
    V = args[0]
    if op == "householder_orthogonal":
        return V.shape[:-1] + (V.shape[-2],)
    if op == "householder_apply":
        return args[1].shape
    return V.shape


def check_accuracy(op, out, args, dtype):
    """The accuracy rule, with the numbers in the failure message."""
    ref64 = TORCH_EQUIV[op](*upcast(args))
    same = TORCH_EQUIV[op](*args)
    err, err_torch = max_err(out, ref64), max_err(same, ref64)
    bound = 2 * err_torch + ATOL[dtype]
    assert err <= bound, f"{op}: max err {err:.3e} > 2 x torch {err_torch:.3e} + atol {ATOL[dtype]:.0e}"


# ---- forward vs float64 ----------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICE_PARAMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("layout", ["contig", "strided"])
@pytest.mark.parametrize("batch", BATCHES, ids=["nobatch", "b2x3"])
@pytest.mark.parametrize("d", SIZES, ids=[f"d{d}" for d in SIZES])
@pytest.mark.parametrize("op,case", OP_CASES, ids=[f"{o}-{c}" for o, c in OP_CASES])
def test_forward_vs_float64(op, case, d, batch, layout, dtype, device):
    """Every op, size, batch, layout, dtype and device obeys the accuracy rule against float64."""
    args = to_layout(make_inputs(op, case, d, batch, dtype), layout, device)
    out = getattr(ops, op)(*args)
    assert out.shape == expected_shape(op, args)
    assert out.dtype == dtype and out.device.type == device
    check_accuracy(op, out, args, dtype)


@pytest.mark.parametrize("block_size", [0, 1, 8, 64])
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("shape", [(33, 33), (2, 70, 33)], ids=["33x33", "2x70x33"])
def test_gram_schmidt_block_size(shape, dtype, block_size):
    """block_size only changes how Q is computed, never what it is."""
    P = torch.randn(*shape, dtype=dtype)
    check_accuracy("gram_schmidt", ops.gram_schmidt(P, block_size), (P, block_size), dtype)


@pytest.mark.parametrize("warm", ["exact", "near", "far"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("shape", [(27, 27), (2, 3, 33, 33)], ids=["27", "2x3x33"])
def test_lowdin_warm_start(shape, dtype, warm):
    """R0 is only a starting guess: a warm start at, near or far from the answer (the polar factor of P,
    of P + 1e-2 noise, of an unrelated matrix) gives the same polar factor."""
    P = torch.randn(*shape, dtype=dtype)
    noise = {"exact": 0.0, "near": 1e-2, "far": 10.0}[warm] * torch.randn_like(P)
    R0 = lowdin_torch((P + noise).double()).to(dtype)
    out = ops.lowdin(P, 0, R0)
    check_accuracy("lowdin", out, (P, 0, None), dtype)


# ---- householder_product is a drop-in for torch.linalg.householder_product --------------------------

@pytest.mark.parametrize(
    "m,n,k,batch",
    [(1, 1, 1, ()), (4, 4, 4, ()), (7, 4, 4, ()), (7, 4, 2, ()), (9, 5, 0, ()), (6, 5, 3, (2, 3))],
    ids=["1x1", "4x4", "7x4", "7x4-k2", "9x5-k0", "b2x3-6x5-k3"],
)
@pytest.mark.parametrize("tau_kind", ["random", "with_zeros", "all_zero"])
def test_householder_product_matches_torch(m, n, k, batch, tau_kind):
    """Same result as torch.linalg.householder_product on arbitrary (V, tau), float64, tight tolerance."""
    V = torch.randn(*batch, m, n, dtype=torch.float64)
    tau = 2 * torch.rand(*batch, k, dtype=torch.float64)
    if tau_kind == "with_zeros":
        tau[..., ::2] = 0
    elif tau_kind == "all_zero":
        tau.zero_()
    out = ops.householder_product(V, tau)
    torch.testing.assert_close(out, householder_product_torch(V, tau), rtol=1e-12, atol=1e-12)


# ---- orthogonality at OPT's size -------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICE_PARAMS)
@pytest.mark.parametrize("op", ["gram_schmidt", "lowdin", "cayley"])
def test_orthogonality_float32_d576(op, device):
    """float32 outputs are orthogonal to ‖QᵀQ − I‖_F/√d ≤ 1e-5 on N(0,1) (cayley: skew) inputs, d = 576."""
    A = torch.randn(2, 576, 576, device=device)
    if op == "cayley":
        A = skew(A)
    Q = getattr(ops, op)(A)
    assert Q.dtype == torch.float32
    err = orth_err(Q)
    assert err <= 1e-5, f"{op}: ‖QᵀQ − I‖_F/√d = {err:.2e}"


def test_orthogonality_measure_can_fail():
    """The orthogonality measure sees a float32-grade defect (guards the test above)."""
    Q = gram_schmidt_torch(torch.randn(576, 576, dtype=torch.float64))
    Q[:, 0] *= 1 + 1e-3
    assert orth_err(Q) > 1e-5


# ---- empty batch, NaN ------------------------------------------------------------------------------

DEFAULT_CASE = {
    "householder_product": "square",
    "householder_orthogonal": "square",
    "householder_apply": "k<d",
    "gram_schmidt": "square",
    "lowdin": "square",
    "cayley": "skew",
}


def _op_args(op, batch, d, dtype, device, fill=None):
    """The op's arguments on device; fill replaces every tensor entry (e.g. NaN)."""
    args = make_inputs(op, DEFAULT_CASE[op], d, batch, dtype)
    if fill is not None:
        args = tuple(torch.full_like(a, fill) if isinstance(a, torch.Tensor) else a for a in args)
    return tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in args)


@pytest.mark.parametrize("device", DEVICE_PARAMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("op", OPS)
def test_empty_batch(op, dtype, device):
    """A batch of zero matrices gives an empty result of the right shape, dtype and device."""
    args = _op_args(op, (0,), 4, dtype, device)
    out = getattr(ops, op)(*args)
    assert out.shape == expected_shape(op, args) and out.shape[0] == 0
    assert out.dtype == dtype and out.device.type == device


@contextlib.contextmanager
def _deadline(seconds):
    """Fail (instead of hanging) if the block runs longer than `seconds`."""
    def on_alarm(signum, frame):
        raise TimeoutError(f"no result within {seconds} s")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


# gram_schmidt "one"/d4 and "all"/d1 are regression cases: a NaN that only the sign of R_nn sees (the
# sign fix once mapped torch.sign(NaN) == 0 to +1).
NAN_CASES = [(op, kind, d) for op in OPS for kind, d in (("all", 1), ("all", 4), ("one", 4))]


def _nan_param(op, kind, d):
    return pytest.param(op, kind, d, id=f"{op}-{kind}-d{d}")


@pytest.mark.parametrize("device", DEVICE_PARAMS)
@pytest.mark.parametrize("op,kind,d", [_nan_param(*c) for c in NAN_CASES])
def test_nan_propagates(op, kind, d, device):
    """A NaN input gives NaN in the output: no exception, no hang. "all": every input entry is NaN;
    "one": a single NaN in an entry the op reads (the last row of the first input's last column;
    for householder_product, below the diagonal of V)."""
    if kind == "all":
        args = _op_args(op, (), d, torch.float32, device, fill=float("nan"))
    else:
        args = list(_op_args(op, (), d, torch.float32, device))
        A = args[0].clone()
        A[(-1, 0) if op == "householder_product" else (-1, -1)] = float("nan")
        args[0] = A
    with _deadline(60):
        out = getattr(ops, op)(*args)
    assert out.shape == expected_shape(op, args)
    assert out.isnan().any(), f"{op}: NaN input gave a NaN-free output"


@pytest.mark.parametrize("path", ["ops", "ref"])
@pytest.mark.parametrize("where", ["diag0", "col0", "skew-pair"])
def test_cayley_nan_is_not_reported_singular(where, path):
    """A NaN where LU pivoting could skip it (I - S otherwise the identity) still gives NaN, not the
    "I - S is singular" error."""
    from opt_fast.reference import cayley_ref

    S = torch.zeros(4, 4)
    if where == "diag0":
        S[0, 0] = float("nan")
    elif where == "col0":
        S[:, 0] = float("nan")
    else:
        S[0, 1] = S[1, 0] = float("nan")
    out = ops.cayley(S) if path == "ops" else cayley_ref(S)
    assert out.isnan().any()
