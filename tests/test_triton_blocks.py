"""Triton launchers of the block ops (triton_kernels/cayley_neumann*.py, block_apply.py) against the float64
references.

``interp`` tests run on CPU tensors under TRITON_INTERPRET=1 (scripts/run_tests.sh stage 2, its own process)
or on CUDA when TRITON_INTERPRET is unset: small shapes, because the interpreter runs every program in
numpy (the resident cayley_neumann kernels' rank-1 loops make b = 33 take seconds). Module-level knobs
(RESIDENT_MAX, PROGRAMS, matmul.BLOCK_OVERRIDE, block_apply.BLOCK_OVERRIDE / SPLIT_OVERRIDE) put the tiled
path, the program loop, chunked R tiles and several row splits within reach of those small shapes.
``gpu`` tests check the ops as registered on CUDA (torch.ops.opt_fast, opcheck, gradcheck) at real sizes.
Over 400 lines: both block ops' launchers share the fixtures, helpers and knobs above.
"""
import pytest
import torch
from _refs import INTERPRET
from _refs import triton_device as _device

from opt_fast.reference.block_apply import block_apply_backward_ref, block_apply_ref
from opt_fast.reference.cayley_neumann import (cayley_neumann_backward_ref, cayley_neumann_powers_ref,
                                               cayley_neumann_ref)

pytestmark = [
    pytest.mark.interp,
    # Triton 3.6's interpreter indexes with 1-element numpy arrays (NumPy's deprecation, not ours)
    pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning"),
]

triton = pytest.importorskip("triton", reason="Triton is not installed")
F32, F64 = torch.float32, torch.float64


@pytest.fixture
def dev():
    return _device()


@pytest.fixture
def CN():
    _device()
    from opt_fast.triton_kernels import cayley_neumann as mod
    return mod


@pytest.fixture
def BA():
    _device()
    from opt_fast.triton_kernels import block_apply as mod
    return mod


@pytest.fixture
def tiled(CN, monkeypatch):
    """Every block on the tiled path, in 16 × 16 tiles (several tiles, off-diagonal triangle tiles)."""
    from opt_fast.triton_kernels import matmul
    monkeypatch.setattr(CN, "RESIDENT_MAX", {F32: 0, F64: 0})
    monkeypatch.setattr(matmul, "BLOCK_OVERRIDE", (16, 16))


def err(a, b):
    return 0.0 if a.numel() == 0 else (a.detach().double().cpu() - b.detach().double().cpu()).abs().max().item()


def close(out, ref64, torch32=None, tol64=1e-12):
    """float64: to tol64 relative to max |ref|; float32: the accuracy rule, 2 × torch's float32 error."""
    assert out.shape == ref64.shape
    scale = max(1.0, ref64.abs().max().item()) if ref64.numel() else 1.0
    if out.dtype == F64:
        assert err(out, ref64) <= tol64 * scale, err(out, ref64)
    else:
        e, e_t = err(out, ref64), err(torch32, ref64)
        assert e <= 2 * e_t + 1e-6 * scale, f"err {e:.3e} > 2 x torch {e_t:.3e}"


def same_errors(launcher, reference, bad_args):
    """Each bad input raises the reference's RuntimeError, word for word."""
    for args in bad_args:
        with pytest.raises(RuntimeError) as ref:
            reference(*args)
        with pytest.raises(RuntimeError) as got:
            launcher(*args)
        assert str(got.value) == str(ref.value)


def skew_input(b, batch=(), dtype=F64, dev="cpu", scale=0.3):
    """A general (not skew) S: the ops read only its skew part, which the test must exercise."""
    return (scale * torch.randn(*batch, b, b, dtype=F64) / max(1, b) ** 0.5).to(dtype=dtype, device=dev)


# ---- cayley_neumann: forward -------------------------------------------------------------------------

@pytest.mark.parametrize("terms", range(7))
def test_cn_every_terms_value(CN, dev, terms):
    S = skew_input(5, (2,), dev=dev)
    R = CN.cayley_neumann(S, terms)
    R2, P = CN.cayley_neumann_powers(S, terms)
    Rr, Pr = cayley_neumann_powers_ref(S, terms)
    close(R, Rr)
    close(R2, Rr)
    assert P.shape == Pr.shape == (2, terms // 2, 5, 5)
    close(P, Pr)
    assert R.is_contiguous() and P.is_contiguous()


@pytest.mark.parametrize("b,batch,terms,dtype", [(1, (3,), 5, F64), (1, (2,), 4, F32), (2, (2, 2), 4, F64),
                                                 (2, (2,), 5, F32), (27, (2,), 5, F64), (27, (1,), 6, F32),
                                                 (33, (1,), 6, F64), (33, (1,), 3, F32)])
def test_cn_odd_sizes(CN, dev, b, batch, terms, dtype):
    S = skew_input(b, batch, dev=dev, scale=1.0)
    R, P = CN.cayley_neumann_powers(S.to(dtype), terms)
    close(R, cayley_neumann_ref(S, terms), cayley_neumann_ref(S.float(), terms))
    if terms >= 2:
        close(P, cayley_neumann_powers_ref(S, terms)[1], cayley_neumann_powers_ref(S.float(), terms)[1])


def test_cn_noncontiguous_and_program_loop(CN, dev, monkeypatch):
    base = skew_input(6, (2, 4), dev=dev)
    S = base.mT[:, ::2]                    # transposed blocks, strided batch: shape [2, 2, 6, 6]
    monkeypatch.setattr(CN, "PROGRAMS", 3)   # 4 blocks on 3 programs: the first takes two
    close(CN.cayley_neumann(S, 6), cayley_neumann_ref(S, 6))
    G = torch.randn_like(S).mT
    close(CN.cayley_neumann_backward(G, S, 6), cayley_neumann_backward_ref(G, S, 6))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cn_half_in_float32(CN, dev, dtype):
    S = skew_input(9, (2,), dtype=dtype, dev=dev, scale=1.0)
    R, P = CN.cayley_neumann_powers(S, 4)
    Rr, Pr = cayley_neumann_powers_ref(S, 4)   # float32 inside, rounded to S's dtype
    assert R.dtype == P.dtype == dtype
    ulp = torch.finfo(dtype).eps
    assert err(R, Rr) <= 2 * ulp * max(1.0, Rr.abs().max().item())
    assert err(P, Pr) <= 2 * ulp * max(1.0, Pr.abs().max().item())
    G = torch.randn_like(S)
    ref = cayley_neumann_backward_ref(G.float(), S.float(), 4)
    g = CN.cayley_neumann_powers_backward(G, S, P, 4)
    assert g.dtype == dtype
    assert err(g, ref) <= 8 * ulp * max(1.0, ref.abs().max().item())   # from the rounded powers


def test_cn_empty_and_checks(CN, dev):
    S = torch.randn(0, 4, 4, device=dev)
    assert CN.cayley_neumann(S, 5).shape == (0, 4, 4)
    assert CN.cayley_neumann_powers(S, 5)[1].shape == (0, 2, 4, 4)
    assert CN.cayley_neumann_backward(S, S, 5).shape == (0, 4, 4)
    bad = [(torch.randn(3, 4, device=dev), 5), (torch.randn(4, 4, device=dev), -1),
           (torch.ones(4, 4, dtype=torch.int32, device=dev), 5)]
    same_errors(CN.cayley_neumann, cayley_neumann_ref, bad)
    S = torch.randn(2, 4, 4, device=dev)
    with pytest.raises(RuntimeError, match="cayley_neumann_backward: expected grad of shape"):
        CN.cayley_neumann_backward(S[0], S, 5)
    with pytest.raises(RuntimeError, match=r"cayley_neumann_powers_backward: expected powers of shape \[2, 2, 4, 4\]"):
        CN.cayley_neumann_powers_backward(S, S, S[:, None], 5)


# ---- cayley_neumann: backward ------------------------------------------------------------------------

@pytest.mark.parametrize("terms", range(8))
def test_cn_backward_every_terms_value(CN, dev, terms):
    S = skew_input(5, (2,), dev=dev, scale=1.0)
    G = torch.randn_like(S)
    ref = cayley_neumann_backward_ref(G, S, terms)
    close(CN.cayley_neumann_backward(G, S, terms), ref)
    _, P = CN.cayley_neumann_powers(S, terms)
    close(CN.cayley_neumann_powers_backward(G, S, P, terms), ref)


@pytest.mark.parametrize("b,terms,dtype", [(1, 5, F64), (2, 4, F32), (27, 2, F32), (27, 5, F64), (33, 5, F32)])
def test_cn_backward_odd_sizes(CN, dev, b, terms, dtype):
    S = skew_input(b, (1,), dev=dev, scale=1.0)
    G = torch.randn_like(S)
    ref = cayley_neumann_backward_ref(G, S, terms)
    t32 = cayley_neumann_backward_ref(G.float(), S.float(), terms)
    _, P = CN.cayley_neumann_powers(S.to(dtype), terms)
    close(CN.cayley_neumann_powers_backward(G.to(dtype), S.to(dtype), P, terms), ref, t32)


def launcher_function(forward, backward):
    """An autograd.Function from launchers: forward(*inputs) -> (output, *saved for backward),
    backward(grad, *saved) -> the inputs' gradients."""
    class F(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *inputs):
            out, *saved = forward(*inputs)
            ctx.save_for_backward(*saved)
            return out

        @staticmethod
        def backward(ctx, g):
            return backward(g, *ctx.saved_tensors)

    return F.apply


def test_cn_gradcheck_float64(CN, dev):
    def forward(S):
        R, P = CN.cayley_neumann_powers(S, 4)
        return R, S, P

    f = launcher_function(forward, lambda g, S, P: CN.cayley_neumann_powers_backward(g, S, P, 4))
    S = torch.randn(1, 2, 2, dtype=F64, device=dev, requires_grad=True)
    assert torch.autograd.gradcheck(f, (S,), fast_mode=True)


# ---- cayley_neumann: tiled path ------------------------------------------------------------------------

@pytest.mark.parametrize("terms", [1, 4, 5, 6])
def test_cn_tiled(CN, tiled, dev, terms):
    S = skew_input(20, (1,), dev=dev, scale=1.0)   # 2 × 2 tiles of 16
    G = torch.randn_like(S)
    R, P = CN.cayley_neumann_powers(S, terms)
    Rr, Pr = cayley_neumann_powers_ref(S, terms)
    close(R, Rr)
    close(P, Pr)
    ref = cayley_neumann_backward_ref(G, S, terms)
    close(CN.cayley_neumann_powers_backward(G, S, P, terms), ref)
    close(CN.cayley_neumann_backward(G, S, terms), ref)


def test_cn_above_128_tiled_by_default(CN, dev):
    S = skew_input(130, (1,), dev=dev, scale=1.0)
    assert CN.forward_launch(130, F64, 5, True) is None   # b > 128: the tiled path
    R, P = CN.cayley_neumann_powers(S, 5)
    close(R, cayley_neumann_ref(S, 5))
    G = torch.randn_like(S)
    close(CN.cayley_neumann_powers_backward(G, S, P, 5), cayley_neumann_backward_ref(G, S, 5))


# ---- block_apply ---------------------------------------------------------------------------------------

def block_inputs(nb, b, n, batch, dtype=F64, rdtype=None, perm=True, dev="cpu"):
    R = torch.randn(nb, b, b, dtype=F64).to(dtype=rdtype or dtype, device=dev)
    X = torch.randn(*batch, n, dtype=F64).to(dtype=dtype, device=dev)
    p = torch.randperm(n).to(dev) if perm else None
    return R, X, p


def check_block_apply(BA, R, X, p, G=None):
    """Forward and backward against the float64 reference (float32: the accuracy rule)."""
    R64, X64 = R.double(), X.double()
    Y = BA.block_apply(R, X, p)
    assert Y.dtype == X.dtype and Y.shape == X.shape and Y.is_contiguous()
    close(Y, block_apply_ref(R64, X64, p), block_apply_ref(R64.float(), X64.float(), p))
    G = torch.randn(X.shape, dtype=F64).to(X) if G is None else G
    gR, gX = BA.block_apply_backward(G, R, X, p)
    rR, rX = block_apply_backward_ref(G.double(), R64, X64, p)
    tR, tX = block_apply_backward_ref(G.double().float(), R64.float(), X64.float(), p)
    assert gR.dtype == R.dtype and gX.dtype == X.dtype and gR.is_contiguous() and gX.is_contiguous()
    close(gR, rR, tR)
    close(gX, rX, tX)


@pytest.mark.parametrize("nb,b,n,batch", [(4, 1, 5, (3,)), (3, 2, 7, (2, 2)), (3, 5, 17, (4,)), (2, 27, 60, (3,)),
                                          (2, 33, 66, (5,)), (1, 33, 70, ())])
@pytest.mark.parametrize("perm", [True, False], ids=["perm", "noperm"])
@pytest.mark.parametrize("dtype", [F64, F32])
def test_block_apply_odd_sizes(BA, dev, nb, b, n, batch, perm, dtype):
    check_block_apply(BA, *block_inputs(nb, b, n, batch, dtype, perm=perm, dev=dev))


def test_block_apply_above_128(BA, dev):
    check_block_apply(BA, *block_inputs(1, 130, 133, (3,), dev=dev))


def test_block_apply_chunked_tiles_and_splits(BA, dev, monkeypatch):
    """R in 16 × 16 chunks (output chunks and the k loop), rows in tiles of 16 over 3 row splits."""
    monkeypatch.setattr(BA, "BLOCK_OVERRIDE", (16, 16, 16))
    monkeypatch.setattr(BA, "SPLIT_OVERRIDE", 3)
    check_block_apply(BA, *block_inputs(2, 33, 70, (45,), dev=dev))


def test_block_apply_remainder_edges(BA, dev):
    check_block_apply(BA, *block_inputs(0, 4, 6, (3,), dev=dev))   # nb = 0: all remainder
    check_block_apply(BA, *block_inputs(3, 4, 12, (3,), dev=dev))  # no remainder
    R, X, p = block_inputs(2, 3, 7, (0,), dev=dev)                  # no rows
    assert BA.block_apply(R, X, p).shape == (0, 7)
    gR, gX = BA.block_apply_backward(X, R, X, p)
    assert gX.shape == (0, 7) and torch.equal(gR, torch.zeros_like(R))


def test_block_apply_noncontiguous(BA, dev):
    R, X, p = block_inputs(3, 5, 17, (6, 4), dev=dev)
    Xn = X.mT.contiguous().mT[::2]          # column-major rows, every other batch entry: [3, 4, 17]
    Rn = R.mT.contiguous().mT               # column-major blocks
    G = torch.ones(1, 1, 17, dtype=F64, device=dev).expand(3, 4, 17)   # stride-0 grad
    check_block_apply(BA, Rn, Xn, p, G)
    Xs = torch.randn(4, 34, dtype=F64, device=dev)[:, ::2]   # strided last dim
    check_block_apply(BA, R, Xs, p)
    ps = torch.stack([p, p.flip(0)], 1)[:, 0]                 # perm with stride 2
    assert not ps.is_contiguous()
    check_block_apply(BA, R, Xs, ps)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_block_apply_half_activations(BA, dev, dtype):
    R, X, p = block_inputs(2, 27, 60, (3,), dtype=dtype, rdtype=F32, dev=dev)
    Y = BA.block_apply(R, X, p)
    ref = block_apply_ref(R, X, p)          # float32 products, rounded to X's dtype
    assert Y.dtype == dtype
    ulp = torch.finfo(dtype).eps
    assert err(Y, ref) <= ulp * ref.abs().max().item()
    G = torch.randn_like(X)
    gR, gX = BA.block_apply_backward(G, R, X, p)
    rR, rX = block_apply_backward_ref(G, R, X, p)
    assert gR.dtype == F32 and gX.dtype == dtype
    assert err(gR, rR) <= 1e-5 * rR.abs().max().item()
    assert err(gX, rX) <= ulp * rX.abs().max().item()


def test_block_apply_checks_match_reference(BA, dev):
    R, X, p = block_inputs(2, 3, 7, (2,), dev=dev)
    bad = [(R[0], X, p), (R, X.float(), p), (R, X, p[:-1]), (R, X, p.int()), (R, X[..., :5], None),
           (R.int(), X, p), (R, X, torch.zeros_like(p))]
    same_errors(BA.block_apply, block_apply_ref, bad)
    with pytest.raises(RuntimeError, match="block_apply_backward: expected grad of shape"):
        BA.block_apply_backward(X[0], R, X, p)
    with pytest.raises(RuntimeError, match="block_apply_backward: expected grad of dtype torch.float64"):
        BA.block_apply_backward(X.float(), R, X, p)
    with pytest.raises(RuntimeError, match="block_apply: expected perm to be a permutation"):
        BA.block_apply_backward(X, R, X, torch.zeros_like(p))


def test_block_apply_gradcheck_float64(BA, dev):
    f = launcher_function(lambda R, X, p: (BA.block_apply(R, X, p), R, X, p),
                          lambda g, R, X, p: (*BA.block_apply_backward(g, R, X, p), None))
    R, X, p = block_inputs(2, 3, 8, (2,), dev=dev)
    assert torch.autograd.gradcheck(f, (R.requires_grad_(), X.requires_grad_(), p), fast_mode=True)


# ---- launch configs as data ----------------------------------------------------------------------------

def test_launch_configs(CN, BA):
    # the variants the launchers pick (the compile stage, triton_kernels/aot_cases.py, compiles them all)
    assert CN.forward_launch(27, torch.bfloat16, 5, True).constexprs["BB"] == 32
    assert CN.forward_launch(27, torch.bfloat16, 1, True).constexprs["POWERS"] is False   # no powers at k < 2
    assert BA.apply_launch(27, F32, True).constexprs["HAS_PERM"]
    assert BA.apply_launch(27, F64, False).constexprs["PREC"] == "ieee"


# ---- the ops on CUDA (CI deselects these) --------------------------------------------------------------

def _cuda():
    if not torch.cuda.is_available() or INTERPRET:
        pytest.skip("needs CUDA (and TRITON_INTERPRET unset)")
    import opt_fast  # noqa: F401  (registers the ops)
    return torch.ops.opt_fast


@pytest.mark.gpu
def test_gpu_smoke_block_kernels():
    """Every block kernel once at a small size (what scripts/gpu_run.sh runs under compute-sanitizer):
    the resident and tiled cayley_neumann paths forward and backward, block_apply with a permutation, an
    identity remainder and half activations."""
    ops = _cuda()
    for b in (27, 200):   # resident, tiled
        S = skew_input(b, (2,), dev="cpu", scale=1.0)
        R, P = ops.cayley_neumann_powers(S.cuda(), 6)
        close(R, cayley_neumann_ref(S, 6), cayley_neumann_ref(S.float(), 6), tol64=1e-11)
        G = torch.randn_like(S)
        close(ops.cayley_neumann_powers_backward(G.cuda(), S.cuda(), P, 6), cayley_neumann_backward_ref(G, S, 6),
              cayley_neumann_backward_ref(G.float(), S.float(), 6), tol64=1e-11)
    R, X, p = block_inputs(3, 27, 100, (5,), F32)
    G = torch.randn_like(X)
    Rd, Xd, pd = R.cuda(), X.cuda(), p.cuda()
    ref = block_apply_ref(R.double(), X.double(), p)
    close(ops.block_apply(Rd, Xd, pd), ref, block_apply_ref(R, X, p))
    gR, gX = ops.block_apply_backward(G.cuda(), Rd, Xd, pd)
    assert torch.isfinite(gR).all() and torch.isfinite(gX).all()
    assert ops.block_apply(Rd, Xd.to(torch.bfloat16), pd).dtype == torch.bfloat16


@pytest.mark.gpu
@pytest.mark.parametrize("b", [1, 27, 64, 128, 256])
@pytest.mark.parametrize("dtype", [F32, F64])
def test_gpu_cayley_neumann_ops(b, dtype):
    ops = _cuda()
    S = skew_input(b, (3, 2), dev="cpu", scale=1.0)
    G = torch.randn_like(S)
    for terms in (3, 5, 6):
        R, P = ops.cayley_neumann_powers(S.to("cuda", dtype), terms)
        close(R, cayley_neumann_ref(S, terms), cayley_neumann_ref(S.float(), terms), tol64=1e-11)
        close(ops.cayley_neumann(S.to("cuda", dtype), terms), cayley_neumann_ref(S, terms),
              cayley_neumann_ref(S.float(), terms), tol64=1e-11)
        ref = cayley_neumann_backward_ref(G, S, terms)
        t32 = cayley_neumann_backward_ref(G.float(), S.float(), terms)
        Sd, Gd = S.to("cuda", dtype), G.to("cuda", dtype)
        close(ops.cayley_neumann_powers_backward(Gd, Sd, P, terms), ref, t32, tol64=1e-11)
        close(ops.cayley_neumann_backward(Gd, Sd, terms), ref, t32, tol64=1e-11)
    Sb = S.to("cuda", torch.bfloat16)
    assert ops.cayley_neumann(Sb, 5).dtype == torch.bfloat16


@pytest.mark.gpu
@pytest.mark.parametrize("b,n", [(1, 7), (27, 100), (32, 2048), (128, 1000), (256, 2048)])
@pytest.mark.parametrize("dtype", [F32, F64])
def test_gpu_block_apply_ops(b, n, dtype):
    ops = _cuda()
    nb = n // b
    R, X, p = block_inputs(nb, b, n, (4, 33), dtype)
    G = torch.randn_like(X)
    Rd, Xd, pd, Gd = R.cuda(), X.cuda(), p.cuda(), G.cuda()
    Y = ops.block_apply(Rd, Xd, pd)
    close(Y, block_apply_ref(R.double(), X.double(), p), block_apply_ref(R.float(), X.float(), p), tol64=1e-11)
    gR, gX = ops.block_apply_backward(Gd, Rd, Xd, pd)
    rR, rX = block_apply_backward_ref(G.double(), R.double(), X.double(), p)
    tR, tX = block_apply_backward_ref(G.float(), R.float(), X.float(), p)
    close(gR, rR, tR, tol64=1e-11)
    close(gX, rX, tX, tol64=1e-11)
    if dtype == F32:
        Xb = Xd.bfloat16()
        Yb = ops.block_apply(Rd, Xb, pd)
        assert Yb.dtype == torch.bfloat16
        assert err(Yb, block_apply_ref(R, X.bfloat16(), p)) <= 2 ** -7 * Yb.abs().max().item()


@pytest.mark.gpu
def test_gpu_opcheck_and_gradcheck():
    ops = _cuda()
    S = torch.randn(2, 5, 5, dtype=F64, device="cuda", requires_grad=True)
    torch.library.opcheck(ops.cayley_neumann, (S, 5))
    torch.library.opcheck(ops.cayley_neumann_powers, (S, 6))
    assert torch.autograd.gradcheck(lambda s: ops.cayley_neumann(s, 5), (S,))
    R = torch.randn(2, 3, 3, dtype=F64, device="cuda", requires_grad=True)
    X = torch.randn(4, 8, dtype=F64, device="cuda", requires_grad=True)
    p = torch.randperm(8, device="cuda")
    torch.library.opcheck(ops.block_apply, (R, X, p))
    torch.library.opcheck(ops.block_apply, (R, X, None))
    assert torch.autograd.gradcheck(lambda r, x: ops.block_apply(r, x, p), (R, X))
    from opt_fast import _backends
    for op in ("cayley_neumann", "cayley_neumann_powers", "block_apply", "block_apply_backward"):
        assert _backends.kernel_for(op, "cuda") == "Triton", op


@pytest.mark.gpu
def test_gpu_second_device_guard():
    ops = _cuda()
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA devices")
    S = torch.randn(3, 8, 8, device="cuda:1")
    with torch.cuda.device(0):
        R = ops.cayley_neumann(S, 5)
        Y = ops.block_apply(R, torch.randn(2, 24, device="cuda:1"), None)
    assert R.device == Y.device == torch.device("cuda:1")
    close(R, cayley_neumann_ref(S.double().cpu(), 5), cayley_neumann_ref(S.cpu(), 5))
