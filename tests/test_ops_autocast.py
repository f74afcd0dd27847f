"""Under torch.autocast every op runs as called (autocast off inside): the same results and gradients as
outside, in the inputs' dtypes; converted models train under autocast (float32 rotations, half GEMMs)."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from _refs import lapack_reflectors, skew
from opt_fast.nn import convert

ops = torch.ops.opt_fast
F32 = torch.float32


def _samples():
    g = torch.Generator().manual_seed(0)
    rn = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    perm = torch.randperm(10, generator=g)
    R = torch.linalg.qr(rn(3, 3, 3))[0]
    return {
        "householder_product": (lapack_reflectors(5, 3, 3, (), F32), (0, 1)),
        "householder_orthogonal": ((rn(2, 5, 5),), (0,)),
        "householder_apply": ((rn(5, 2), rn(5, 3)), (0, 1)),
        "gram_schmidt": ((rn(2, 6, 4), 0), (0,)),
        "lowdin": ((3 * torch.eye(4) + rn(2, 4, 4), 0, None), (0,)),
        "cayley": ((skew(0.3 * rn(2, 4, 4)),), (0,)),
        "cayley_neumann": ((skew(0.3 * rn(3, 5, 5)), 5), (0,)),
        "block_apply": ((R, rn(4, 10), perm), (0, 1)),
        "block_apply (bfloat16 X)": ((R, rn(4, 10).bfloat16(), perm), (0, 1)),
    }


def _run(name, args, idx):
    args = tuple(a.detach().clone().requires_grad_() if i in idx else a for i, a in enumerate(args))
    out = getattr(ops, name.split(" ")[0])(*args)
    out = out[0] if isinstance(out, tuple) else out
    out.float().square().sum().backward()
    return out.detach(), [args[i].grad for i in idx]


@pytest.mark.parametrize("name", list(_samples()))
def test_op_under_autocast_is_the_op(name):
    args, idx = _samples()[name]
    want, want_grads = _run(name, args, idx)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, got_grads = _run(name, args, idx)
    assert got.dtype == want.dtype
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    for a, b in zip(got_grads, want_grads):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("method,kw", [("cayley_neumann", {"block_size": 4, "sides": "both"}),
                                       ("cayley", {"block_size": 4, "sides": "in"}),
                                       ("gram_schmidt", {}), ("householder", {})],
                         ids=["block-cayley_neumann", "block-cayley", "dense-gram_schmidt", "dense-householder"])
def test_converted_model_trains_under_autocast(method, kw):
    torch.manual_seed(0)
    model = convert(nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 8)), method=method, **kw)
    x, y = torch.randn(6, 12), torch.randn(6, 8)
    want = model(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
        loss = F.mse_loss(out.float(), y)
    loss.backward()
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), want, rtol=0.05, atol=0.05)
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.dtype == F32 and torch.isfinite(p.grad).all(), n


@pytest.mark.slow
@pytest.mark.parametrize("autocast", [False, True], ids=["float32", "autocast"])
def test_compiled_block_model_called_before_any_eager_call(autocast):
    """torch.compile(fullgraph=True) of a fresh converted model, its first call compiled (no index cached by
    an eager call yet), also under autocast: the eager model's output."""
    import contextlib
    import warnings

    from opt_fast.nn import block_methods
    block_methods._TRIU_CACHE.clear()
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = convert(nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 8)), method="cayley_neumann",
                    block_size=4, sides="both")
    x = torch.randn(6, 12)
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    with torch._inductor.config.patch(compile_threads=1), warnings.catch_warnings(), ctx:
        warnings.simplefilter("ignore")
        out = torch.compile(model, fullgraph=True)(x)
        ref = model(x)
    torch._dynamo.reset()
    tol = 1e-2 if autocast else 1e-5
    torch.testing.assert_close(out.float(), ref.float(), rtol=tol, atol=tol)
