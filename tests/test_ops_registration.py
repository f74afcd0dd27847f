"""Registration of the opt_fast op surface: opcheck on every forward and backward op, torch.compile,
the functional wrappers, backend_report and the OPT_FAST_DISABLE_EXT / OPT_FAST_REQUIRE_EXT policy."""
import importlib.util
import io
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import opt_fast
from opt_fast import functional as F

from _refs import OPS, TORCH_EQUIV, lapack_reflectors, skew

ops = torch.ops.opt_fast
BACKWARD_OPS = tuple(op + "_backward" for op in OPS)


def _env_flag(name):
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


# ---- samples ---------------------------------------------------------------------------------------

def forward_samples(op):
    """Two (args, differentiable-arg indices) samples per op: a small float32 one and a batched or tall
    float64 one."""
    f32, f64 = torch.float32, torch.float64
    rn = lambda *s, dtype: torch.randn(*s, dtype=dtype)  # noqa: E731
    if op == "householder_product":
        return [(lapack_reflectors(5, 3, 3, (), f32), (0, 1)), (lapack_reflectors(6, 4, 2, (2,), f64), (0, 1))]
    if op == "householder_orthogonal":
        return [((rn(4, 4, dtype=f32),), (0,)), ((rn(2, 5, 3, dtype=f64),), (0,))]
    if op == "householder_apply":
        return [((rn(4, 2, dtype=f32), rn(4, 3, dtype=f32)), (0, 1)),
                ((rn(2, 5, 5, dtype=f64), rn(2, 5, 2, dtype=f64)), (0, 1))]
    if op == "gram_schmidt":
        return [((rn(4, 4, dtype=f32), 0), (0,)), ((rn(2, 6, 3, dtype=f64), 2), (0,))]
    if op == "lowdin":
        P = 3 * torch.eye(3, dtype=f64) + rn(2, 3, 3, dtype=f64)
        return [((3 * torch.eye(4) + rn(4, 4, dtype=f32), 0, None), (0,)),
                ((P, 0, TORCH_EQUIV["lowdin"](P + 0.05 * torch.randn_like(P))), (0,))]
    if op == "cayley":
        return [((skew(rn(4, 4, dtype=f32)),), (0,)), ((0.3 * rn(2, 3, 3, dtype=f64),), (0,))]
    raise ValueError(op)


def backward_samples(op):
    """<op>_backward arguments (grad, saved tensors) built from the forward samples."""
    out = []
    for args, _ in forward_samples(op):
        y = getattr(ops, op)(*args)
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        saved = {"gram_schmidt": [args[0], y], "lowdin": [args[0], y], "cayley": [y]}.get(op, tensors)
        out.append((torch.randn_like(y), *saved))
    return out


def _with_grad(args, idx):
    return tuple(a.detach().clone().requires_grad_() if i in idx else a for i, a in enumerate(args))


# ---- opcheck ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("requires_grad", [False, True], ids=["nograd", "grad"])
@pytest.mark.parametrize("sample", [0, 1], ids=["f32", "f64"])
@pytest.mark.parametrize("op", OPS)
def test_opcheck_forward(op, sample, requires_grad):
    """torch.library.opcheck (schema, autograd registration, fake tensor, AOT dispatch) on forward ops."""
    args, diff = forward_samples(op)[sample]
    if requires_grad:
        args = _with_grad(args, diff)
    torch.library.opcheck(getattr(ops, op), args)


# With inputs that require grad, the backward ops fail opcheck's autograd checks: they have no autograd
# kernel (nor an explicit "not differentiable" registration), so double backward works in eager only
# through PyTorch's deprecated autograd fallback (with a warning) and disagrees with AOTAutograd.
_BACKWARD_AUTOGRAD_UTILS = ("test_autograd_registration", "test_aot_dispatch_dynamic")


@pytest.mark.parametrize("requires_grad", [False, True], ids=["nograd", "grad"])
@pytest.mark.parametrize("sample", [0, 1], ids=["f32", "f64"])
@pytest.mark.parametrize("op", BACKWARD_OPS)
def test_opcheck_backward(op, sample, requires_grad):
    """opcheck on the backward ops: all checks without grad; with grad, schema and fake tensor (the
    autograd checks are test_backward_ops_autograd_registration)."""
    args = backward_samples(op[: -len("_backward")])[sample]
    if requires_grad:
        args = _with_grad(args, range(len(args)))
        torch.library.opcheck(getattr(ops, op), args, test_utils=("test_schema", "test_faketensor"))
    else:
        torch.library.opcheck(getattr(ops, op), args)


@pytest.mark.parametrize("op", BACKWARD_OPS)
def test_backward_ops_autograd_registration(op):
    """opcheck's autograd checks on the backward ops with inputs that require grad."""
    args = _with_grad(backward_samples(op[: -len("_backward")])[1], range(3))
    torch.library.opcheck(getattr(ops, op), args, test_utils=_BACKWARD_AUTOGRAD_UTILS)


# ---- torch.compile ---------------------------------------------------------------------------------

def _all_ops(V, tau, W, X, P, S):
    a = ops.householder_product(V, tau)
    b = ops.householder_orthogonal(W)
    c = ops.householder_apply(W, X)
    g = ops.gram_schmidt(P, 0)
    lw = ops.lowdin(P, 0, None)
    q = ops.cayley(skew(S))
    return a, b, c, g, lw, q


def test_compile_fullgraph_matches_eager():
    """torch.compile(fullgraph=True) of a function calling all six ops: same outputs and same input
    gradients as eager."""
    f64 = torch.float64
    V, tau = lapack_reflectors(6, 4, 3, (2,), f64)
    inputs = [V, tau, torch.randn(2, 5, 3, dtype=f64), torch.randn(2, 5, 2, dtype=f64),
              3 * torch.eye(5, dtype=f64) + torch.randn(2, 5, 5, dtype=f64), torch.randn(2, 5, 5, dtype=f64)]
    weights = [torch.randn(o.shape, dtype=f64) for o in _all_ops(*inputs)]

    def run(fn):
        xs = [x.clone().requires_grad_() for x in inputs]
        outs = fn(*xs)
        loss = sum((o * w).sum() for o, w in zip(outs, weights))
        return [o.detach() for o in outs], torch.autograd.grad(loss, xs)

    torch._dynamo.reset()
    with torch._inductor.config.patch(compile_threads=1):  # no compile-worker processes
        got_out, got_grad = run(torch.compile(_all_ops, fullgraph=True))
    want_out, want_grad = run(_all_ops)
    torch._dynamo.reset()
    for i, (g, w) in enumerate(zip(got_out, want_out)):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10, msg=lambda m: f"output {OPS[i]}: {m}")
    for i, (g, w) in enumerate(zip(got_grad, want_grad)):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10, msg=lambda m: f"grad of input {i}: {m}")


# ---- the op surface --------------------------------------------------------------------------------

EXPECTED_OPS = ("householder_product", "householder_orthogonal", "householder_apply", "gram_schmidt",
                "lowdin", "cayley", "cayley_neumann", "block_apply")


def test_every_op_and_its_backward_exist():
    """torch.ops.opt_fast has exactly the forward ops of EXPECTED_OPS, each with <op>_backward."""
    assert set(opt_fast._ops.FORWARD_OPS) == set(EXPECTED_OPS)
    for op in EXPECTED_OPS:
        for name in (op, op + "_backward"):
            packet = getattr(ops, name)
            assert isinstance(packet, torch._ops.OpOverloadPacket), name
            assert packet.default._schema.name == f"opt_fast::{name}"


class _RecordOptFast(TorchDispatchMode):
    """Records every opt_fast op that is dispatched, with all its arguments (defaults filled in)."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "opt_fast":
            schema_args = func._schema.arguments
            full = [args[i] if i < len(args) else kwargs.get(a.name, a.default_value)
                    for i, a in enumerate(schema_args)]
            self.calls.append((func, tuple(full)))
        return func(*args, **kwargs)


def _wrapper_cases():
    V, tau = lapack_reflectors(5, 3, 2)
    W, X = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 4, dtype=torch.float64)
    P = 3 * torch.eye(4, dtype=torch.float64) + torch.randn(4, 4, dtype=torch.float64)
    R0 = TORCH_EQUIV["lowdin"](P)
    S = skew(torch.randn(4, 4, dtype=torch.float64))
    return [
        ("householder_product", lambda: F.householder_product(V, tau), (V, tau)),
        ("householder_orthogonal", lambda: F.householder_orthogonal(W), (W,)),
        ("householder_apply", lambda: F.householder_apply(W, X), (W, X)),
        ("gram_schmidt", lambda: F.gram_schmidt(P), (P, 0)),
        ("gram_schmidt", lambda: F.gram_schmidt(P, block_size=8), (P, 8)),
        ("lowdin", lambda: F.lowdin(P), (P, 0, None)),
        ("lowdin", lambda: F.lowdin(P, iters=3, R0=R0), (P, 3, R0)),
        ("cayley", lambda: F.cayley(S), (S,)),
    ]


@pytest.mark.parametrize("case", range(8), ids=[
    "householder_product", "householder_orthogonal", "householder_apply", "gram_schmidt",
    "gram_schmidt-block_size", "lowdin", "lowdin-iters-R0", "cayley"])
def test_functional_wrapper_calls_the_op(case):
    """Each opt_fast.functional wrapper dispatches exactly torch.ops.opt_fast.<op> with its arguments,
    and returns what the op returns."""
    op, call, expected_args = _wrapper_cases()[case]
    with _RecordOptFast() as rec:
        out = call()
    assert [f for f, _ in rec.calls] == [getattr(ops, op).default]
    args = rec.calls[0][1]
    assert len(args) == len(expected_args)
    for a, e in zip(args, expected_args):
        assert a is e if not isinstance(e, int) else a == e
    torch.testing.assert_close(out, getattr(ops, op)(*expected_args), rtol=0, atol=0)


def test_backend_report_lists_every_op():
    """backend_report() prints and returns one row per op (forward and backward) with its CPU kernel."""
    buf = io.StringIO()
    text = opt_fast.backend_report(file=buf)
    assert buf.getvalue().rstrip("\n") == text
    rows = {line.split()[0]: line.split() for line in text.splitlines() if line.strip()}
    for op in EXPECTED_OPS + tuple(o + "_backward" for o in EXPECTED_OPS):
        assert op in rows, f"{op} missing from backend_report()"
        assert rows[op][1] == opt_fast.kernel_for(op, "cpu")
        assert rows[op][1] in ("C++", "reference")


# ---- extension policy ------------------------------------------------------------------------------

def test_cpu_kernel_follows_env():
    """OPT_FAST_DISABLE_EXT=1: cayley is served by the reference; OPT_FAST_REQUIRE_EXT=1: by the C++
    kernel; neither: by C++ exactly when opt_fast._C loaded."""
    kind = opt_fast.kernel_for("cayley", "cpu")
    if _env_flag("OPT_FAST_DISABLE_EXT"):
        assert kind == "reference"
        assert not opt_fast.has_kernel("cayley", "CPU")
    elif _env_flag("OPT_FAST_REQUIRE_EXT"):
        assert opt_fast.has_kernel("cayley", "CPU")
        assert opt_fast.has_kernel("cayley_backward", "CPU")
        assert kind == "C++"
        assert opt_fast.kernel_for("cayley_backward", "cpu") == "C++"
    else:
        loaded = opt_fast._backends.ext_error is None
        assert kind == ("C++" if loaded else "reference")


_CHILD = textwrap.dedent("""
    import json, torch, opt_fast
    assert opt_fast.kernel_for("cayley", "cpu") == "reference", opt_fast.kernel_for("cayley", "cpu")
    assert opt_fast.kernel_for("cayley_backward", "cpu") == "reference"
    assert not opt_fast.has_kernel("cayley", "CPU")
    torch.manual_seed(0)
    S = torch.randn(2, 5, 5, dtype=torch.float64)
    S = (S - S.mT).requires_grad_()
    Q = torch.ops.opt_fast.cayley(S)
    (g,) = torch.autograd.grad((Q * Q.detach()).sum(), S)
    print(json.dumps([Q.detach().tolist(), g.tolist()]))
""")


def test_disable_ext_subprocess():
    """A fresh process with OPT_FAST_DISABLE_EXT=1 serves cayley by the reference, and its output and
    gradient match this process's (whichever kernel serves here) and torch.linalg.solve."""
    env = {k: v for k, v in os.environ.items() if k != "OPT_FAST_REQUIRE_EXT"}
    env.update(OPT_FAST_DISABLE_EXT="1", OMP_NUM_THREADS="1")
    res = subprocess.run([sys.executable, "-c", _CHILD], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    q_child, g_child = (torch.tensor(x, dtype=torch.float64) for x in json.loads(res.stdout.splitlines()[-1]))

    torch.manual_seed(0)
    S = torch.randn(2, 5, 5, dtype=torch.float64)
    S = (S - S.mT).requires_grad_()
    Q = ops.cayley(S)
    (g,) = torch.autograd.grad((Q * Q.detach()).sum(), S)
    torch.testing.assert_close(q_child, Q.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g_child, g, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(q_child, TORCH_EQUIV["cayley"](S.detach()), rtol=1e-12, atol=1e-12)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton not installed")
@pytest.mark.parametrize("value,ok", [("tf32x3", True), ("ieee", True), ("tf32", False), ("fast", False)])
def test_triton_f32_precision_env(value, ok):
    """OPT_FAST_TRITON_F32_PRECISION picks the Triton kernels' float32 dot precision; a value it does not
    offer (TF32 alone is too coarse for the polar factor) stops `import opt_fast` with a message naming the
    variable and the choices, instead of silently falling back to another kernel."""
    env = dict(os.environ, OPT_FAST_TRITON_F32_PRECISION=value)
    code = "import opt_fast; from opt_fast.triton_kernels import matmul; print(matmul.F32_PRECISION)"
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    if ok:
        assert res.returncode == 0 and res.stdout.split()[-1] == value, res.stderr[-2000:]
    else:
        assert res.returncode != 0
        assert "OPT_FAST_TRITON_F32_PRECISION must be one of ('ieee', 'tf32x3')" in res.stderr, res.stderr[-2000:]
