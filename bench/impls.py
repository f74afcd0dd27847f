"""The implementations each op is timed against (docs/performance.md), one list per op.

An ``Impl.setup(x, grad)`` gets the case's inputs ``x`` (a dict of tensors; the op's differentiable inputs
already have ``requires_grad=grad``) and returns ``(forward, leaves)``: a zero-argument callable returning the
output, and the tensors to differentiate with respect to in forward+backward mode. Work done in ``setup`` is
not timed. What is timed, by kind:

* ``opt_fast``   ``torch.ops.opt_fast.<op>``, served by whatever kernel the device has (``kernel_for``);
                 forward+backward goes through the op's registered ``<op>_backward`` op.
* ``reference``  ``opt_fast.reference.<op>_ref`` called directly; forward+backward is torch autograd through
                 the reference's own torch ops (not the op's registered backward).
* ``compiled``   the same reference under ``torch.compile(dynamic=False)`` (AOTAutograd for the backward).
* ``torch``      torch built-ins / compositions of them. ``baseline=True`` marks the ones the
                 "speed-up over the best torch built-in" column is taken against (the fastest that meets the
                 accuracy gate).
* ``peer``       third-party packages; reported as "not installed" when absent.
* ``context``    a different map of similar use (e.g. ``matrix_exp`` for Cayley), for orientation only.
"""
import importlib.util
import inspect
import logging
import warnings
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import torch

from opt_fast.reference import REFERENCE_KERNELS as REF

_ops = torch.ops.opt_fast


@dataclass(frozen=True)
class Impl:
    name: str
    kind: str
    setup: Callable
    baseline: bool = False       # candidate for "the best torch built-in"
    same_map: bool = True        # computes the op's map (error vs the float64 reference is meaningful)
    approx: bool = False         # approximate by design (reported, never a baseline)
    backward: bool = True        # has a backward
    requires: str = ""           # python module a peer needs
    note: str = ""
    applies: Optional[Callable] = None   # (shape, device_type, mode) -> reason it does not apply, or None

    def unavailable(self, shape, device_type: str, mode: str) -> Optional[str]:
        """None if this impl can run the case, else why not ("not installed", "no backward", ...)."""
        if self.requires and importlib.util.find_spec(self.requires) is None:
            return "not installed"
        if mode == "fwd+bwd" and not self.backward:
            return "no backward"
        if self.applies is not None:
            return self.applies(shape, device_type, mode)
        return None


# ---- helpers ----------------------------------------------------------------------------------------

def fn_setup(f: Callable, *names: str, **kwargs):
    """Setup for a plain function of some inputs."""
    def setup(x, grad):
        args = [x[n] for n in names]
        return (lambda: f(*args, **kwargs)), [a for a in args if a.requires_grad]
    return setup


_compile_configured = False


def _configure_compile():
    global _compile_configured
    if _compile_configured:
        return
    import torch._dynamo
    cfg = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit",
                 "accumulated_cache_size_limit"):
        if hasattr(cfg, name):   # many shapes × dtypes × grad modes: never fall back to eager silently
            setattr(cfg, name, max(getattr(cfg, name), 4096))
    logging.getLogger("torch._dynamo").setLevel(logging.ERROR)
    logging.getLogger("torch._inductor").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\._inductor.*")
    _compile_configured = True


def compiled_setup(f: Callable, *names: str, **kwargs):
    def setup(x, grad):
        _configure_compile()
        cf = torch.compile(f, dynamic=False)
        args = [x[n] for n in names]
        return (lambda: cf(*args, **kwargs)), [a for a in args if a.requires_grad]
    return setup


def own_leaf(t: torch.Tensor, grad: bool) -> torch.Tensor:
    return t.detach().clone().requires_grad_(grad)


def _eye(d, like):
    return torch.eye(d, dtype=like.dtype, device=like.device)


def _sign_fix(Q, diag):
    s = torch.sign(diag)
    s = torch.where(s == 0, torch.ones_like(s), s)
    return Q * s.unsqueeze(-2)


def _only_square_k(shape, device_type, mode):
    return None if shape.k in (None, shape.d) else "needs k = d"


def _loop_guard(shape, device_type, mode):
    """The reflector loop keeps one d×d matrix per reflector on the autograd tape, and is slow on CPU."""
    if mode == "fwd+bwd" and shape.b * shape.kk * shape.d * shape.d * 8 > 2e9:
        return "autograd tape > 2 GB"
    if device_type == "cpu" and shape.d > 1152:
        return "k sequential rank-1 updates: too slow on CPU"
    return None


def _and(*checks):
    def applies(shape, device_type, mode):
        for c in checks:
            r = c(shape, device_type, mode)
            if r:
                return r
        return None
    return applies


def _cpu_max_d(d_max: int, why: str):
    def applies(shape, device_type, mode):
        if device_type == "cpu" and mode == "fwd+bwd" and shape.d > d_max:
            return why
        return None
    return applies


def _common(op: str, *names: str, **kwargs) -> List[Impl]:
    return [
        Impl("opt_fast", "opt_fast", fn_setup(getattr(_ops, op), *names, **kwargs),
             note="torch.ops.opt_fast op; fwd+bwd via its registered backward op"),
        Impl("reference", "reference", fn_setup(REF[op], *names, **kwargs),
             note="opt_fast.reference, called directly; fwd+bwd = autograd through its torch ops"),
        Impl("reference+compile", "compiled", compiled_setup(REF[op], *names, **kwargs),
             note="torch.compile(reference, dynamic=False)"),
    ]


def _parametrization_setup(orth_map: str, source: str, diag_one: bool):
    """torch.nn.utils.parametrizations.orthogonal on a [b, d, d] parameter; times ``module.weight``."""
    def setup(x, grad):
        from torch.nn.utils import parametrizations
        X = x[source].detach().clone()
        if diag_one:   # the householder map multiplies by diag(X).int(): ±1 there gives an orthogonal Q
            X.diagonal(dim1=-2, dim2=-1).fill_(1.0)
        mod = torch.nn.Module()
        mod.weight = torch.nn.Parameter(X.clone())
        parametrizations.orthogonal(mod, "weight", orthogonal_map=orth_map, use_trivialization=False)
        orig = mod.parametrizations.weight.original
        with torch.no_grad():
            orig.copy_(X)
        orig.requires_grad_(grad)
        return (lambda: mod.weight), ([orig] if grad else [])
    return setup


# ---- householder_product (LAPACK convention) --------------------------------------------------------

def _torch_householder_product_setup(x, grad):
    from torch_householder import torch_householder_orgqr
    V, tau = x["V"], x["tau"]
    k = tau.shape[-1]
    eye = torch.eye(V.shape[-2], k, dtype=V.dtype, device=V.device)
    return (lambda: torch_householder_orgqr(V[..., :k].tril(-1) + eye, tau)), [t for t in (V, tau) if t.requires_grad]


HOUSEHOLDER_PRODUCT = _common("householder_product", "V", "tau") + [
    Impl("torch.linalg.householder_product", "torch", fn_setup(torch.linalg.householder_product, "V", "tau"),
         baseline=True, applies=_cpu_max_d(1152, "O(k) rank-1 backward: too slow on CPU")),
    Impl("parametrizations.orthogonal(householder)", "torch", _parametrization_setup("householder", "V", True),
         baseline=True, note="torch.nn.utils.parametrizations, use_trivialization=False",
         applies=_and(_only_square_k, _cpu_max_d(1152, "O(k) rank-1 backward: too slow on CPU"))),
    Impl("torch_householder", "peer", _torch_householder_product_setup, requires="torch_householder",
         note="torch_householder_orgqr(tril(V,-1)+I, tau)", applies=_only_square_k),
]


# ---- householder_orthogonal (dense reflectors) ------------------------------------------------------

def reflector_loop(V: torch.Tensor, X: Optional[torch.Tensor] = None) -> torch.Tensor:
    """H(v_1)…H(v_k) X (X = I if None) by k sequential rank-1 updates: the naive torch baseline."""
    d, k = V.shape[-2], V.shape[-1]
    M = _eye(d, V).expand(V.shape[:-2] + (d, d)) if X is None else X
    for j in reversed(range(k)):
        v = V[..., :, j:j + 1]
        vv = (v * v).sum(-2, keepdim=True)
        tau = torch.where(vv > 0, 2.0 / torch.where(vv > 0, vv, torch.ones_like(vv)), torch.zeros_like(vv))
        M = M - (tau * v) @ (v.mT @ M)
    return M


def _torch_householder_dense_setup(x, grad):
    from torch_householder import torch_householder_orgqr
    V = x["V"]
    return (lambda: torch_householder_orgqr(V)), [V] if V.requires_grad else []


HOUSEHOLDER_ORTHOGONAL = _common("householder_orthogonal", "V") + [
    Impl("torch reflector loop", "torch", fn_setup(reflector_loop, "V"), baseline=True,
         note="k sequential rank-1 updates (no torch built-in takes dense reflectors)", applies=_loop_guard),
    Impl("torch_householder", "peer", _torch_householder_dense_setup, requires="torch_householder",
         note="torch_householder_orgqr(V): normalised dense columns", applies=_only_square_k),
]


# ---- householder_apply ------------------------------------------------------------------------------

def _ormqr_setup(x, grad):
    V, X = x["V"], x["X"]
    Y = own_leaf(V.tril(-1), grad)   # LAPACK reflectors: same count and length, unit-lower convention
    tau = own_leaf(2.0 / (1.0 + (V.detach().tril(-1) ** 2).sum(-2)), grad)
    leaves = [Y, tau] + ([X] if X.requires_grad else [])
    return (lambda: torch.ormqr(Y, tau, X)), (leaves if grad else [])


def _form_then_matmul(V, X):
    return _ops.householder_orthogonal(V) @ X


HOUSEHOLDER_APPLY = _common("householder_apply", "V", "X") + [
    Impl("opt_fast form+matmul", "opt_fast", fn_setup(_form_then_matmul, "V", "X"),
         note="householder_orthogonal(V) @ X: forms the d×d product first"),
    Impl("torch.ormqr", "torch", _ormqr_setup, baseline=True, same_map=False,
         note="LAPACK unit-lower reflectors (same count and size; not the same reflectors)"),
    Impl("torch reflector loop", "torch", fn_setup(reflector_loop, "V", "X"), baseline=True,
         note="k sequential rank-1 updates of X"),
]


# ---- gram_schmidt -----------------------------------------------------------------------------------

def qr_sign(P):
    Q, R = torch.linalg.qr(P)
    return _sign_fix(Q, R.diagonal(dim1=-2, dim2=-1))


def geqrf_orgqr(P):
    a, tau = torch.geqrf(P)
    return _sign_fix(torch.linalg.householder_product(a, tau), a.diagonal(dim1=-2, dim2=-1))


def _cholqr(P, gram_dtype):
    Pg = P.to(gram_dtype)
    L, _ = torch.linalg.cholesky_ex(Pg.mT @ Pg)   # a failed Cholesky shows up as NaN in the accuracy
    return torch.linalg.solve_triangular(L.mT, Pg, upper=True, left=False).to(P.dtype)


def cholqr2(P):
    return _cholqr(_cholqr(P, P.dtype), P.dtype)


def cholqr2_fp64(P):
    return _cholqr(_cholqr(P, torch.float64), torch.float64)


GRAM_SCHMIDT = _common("gram_schmidt", "P") + [
    Impl("torch.linalg.qr + sign fix", "torch", fn_setup(qr_sign, "P"), baseline=True),
    Impl("torch.geqrf + householder_product", "torch", fn_setup(geqrf_orgqr, "P"), baseline=True,
         backward=False, note="geqrf has no autograd"),
    Impl("CholQR2 (torch)", "torch", fn_setup(cholqr2, "P"), baseline=True,
         note="unstable for κ(P)² u ≳ 1 (docs/performance.md); judged by the accuracy gate"),
    Impl("CholQR2, fp64 Gram/Cholesky (torch)", "torch", fn_setup(cholqr2_fp64, "P"), baseline=True),
]


# ---- lowdin -----------------------------------------------------------------------------------------

def svd_polar(P):
    U, _, Vh = torch.linalg.svd(P)
    return U @ Vh


def eigh_polar(P):
    L, V = torch.linalg.eigh(P.mT @ P)
    return P @ (V * L.clamp_min(torch.finfo(P.dtype).tiny).rsqrt().unsqueeze(-2)) @ V.mT


def eigh64_polar(P):
    """The eigh route with the Gram matrix and eigh in float64 (accurate for κ(P)² u64 ≪ 1), result cast back."""
    P64 = P.double()
    L, V = torch.linalg.eigh(P64.mT @ P64)
    return (P64 @ (V * L.clamp_min(torch.finfo(torch.float64).tiny).rsqrt().unsqueeze(-2)) @ V.mT).to(P.dtype)


def orthogonalize_approx(P):
    import opt_fast.functional as F
    return F.orthogonalize_approx(P, 5)


def muon_ns5(P, steps: int = 5):
    """Muon's quintic Newton–Schulz (zeropower_via_newtonschulz5): bf16 on CUDA, the input dtype on CPU.
    Approximate by design (singular values end up in ~[0.5, 1.5])."""
    a, b, c = 3.4445, -4.7750, 2.0315
    X = P.to(torch.bfloat16) if P.is_cuda else P
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    for _ in range(steps):
        A = X @ X.mT
        X = a * X + (b * A + c * (A @ A)) @ X
    return X.to(P.dtype)


def linalg_polar(P):
    out = torch.linalg.polar(P)   # only in some torch builds; may return (U, H)
    return out[0] if isinstance(out, (tuple, list)) else out


def _lowdin_warm_setup(x, grad):
    P, R0 = x["P"], x["R0"]
    return (lambda: _ops.lowdin(P, 0, R0)), [P] if P.requires_grad else []


def _lowdin_reuse_setup(x, grad):
    """R0 = the exact polar factor of P itself (P unchanged, e.g. evaluation): the certified reuse path."""
    P = x["P"]
    R0 = svd_polar(P.detach().double()).to(P.dtype)
    return (lambda: _ops.lowdin(P, 0, R0)), [P] if P.requires_grad else []


def _has_polar(shape, device_type, mode):
    return None if hasattr(torch.linalg, "polar") else "not in this torch"


def _lowdin_functional(P):
    import opt_fast.functional as F
    return F.lowdin(P)


# The opt_fast row is opt_fast.functional.lowdin, what users and the OPT layers call: the op itself, except
# on the CPU with a gradient, where the same SVD route comes from lowdin_svd with its factors kept.
LOWDIN = [
    Impl("opt_fast", "opt_fast", fn_setup(_lowdin_functional, "P"),
         note="opt_fast.functional.lowdin: torch.ops.opt_fast.lowdin; on the CPU with a gradient lowdin_svd "
              "(the SVD route keeping its factors: backward four matmuls)"),
] + _common("lowdin", "P")[1:] + [
    Impl("opt_fast (warm start R0)", "opt_fast", _lowdin_warm_setup,
         note="R0 = polar factor of a 1e-3 perturbation of P (a training step's warm start): stale, so the "
              "certified-reuse check fails and the cold iteration runs (reference docstring)"),
    Impl("opt_fast (R0 = polar(P), reuse)", "opt_fast", _lowdin_reuse_setup,
         note="P unchanged since R0 (evaluation): R0 passes the certified-reuse check"),
    Impl("SVD polar U@Vh", "torch", fn_setup(svd_polar, "P"), baseline=True),
    Impl("eigh route", "torch", fn_setup(eigh_polar, "P"), baseline=True,
         note="P V diag(λ^-1/2) Vᵀ with (λ, V) = eigh(PᵀP)"),
    Impl("eigh route, float64 Gram", "torch", fn_setup(eigh64_polar, "P"), baseline=True,
         note="PᵀP and eigh in float64, cast back"),
    Impl("torch.linalg.polar", "torch", fn_setup(linalg_polar, "P"), baseline=True, applies=_has_polar),
    Impl("opt_fast.functional.orthogonalize_approx (approx.)", "approx", fn_setup(orthogonalize_approx, "P"),
         approx=True, backward=False,
         note="Muon quintic, 5 steps: Triton bf16 products on CUDA, torch elsewhere; NOT orthogonal for "
              "ill-conditioned P (see its docstring)"),
    Impl("Muon NS5 (approx.)", "torch", fn_setup(muon_ns5, "P"), approx=True,
         note="5 quintic NS steps (bf16 on CUDA, input dtype on CPU); approximate by design"),
]


# ---- cayley -----------------------------------------------------------------------------------------

def cayley_solve(S):
    eye = _eye(S.shape[-1], S)
    return torch.linalg.solve(eye - S, eye + S)


def cayley_inv(S):
    eye = _eye(S.shape[-1], S)
    return (eye + S) @ torch.linalg.inv(eye - S)


def cayley_lu(S):
    eye = _eye(S.shape[-1], S)
    LU, piv = torch.linalg.lu_factor(eye - S)
    return torch.linalg.lu_solve(LU, piv, eye + S)


def cayley_neumann5(S):
    """PEFT's Cayley–Neumann with 5 terms: I + 2S + 2S² + 2S³ + S⁴ (valid only for ‖S‖ < 1)."""
    S2 = S @ S
    S3 = S2 @ S
    return _eye(S.shape[-1], S) + 2 * S + 2 * S2 + 2 * S3 + S3 @ S


def _geotorch_setup(x, grad):
    import geotorch
    P = own_leaf(x["P"], grad)
    M = geotorch.SO(tuple(P.shape), triv="cayley").to(device=P.device, dtype=P.dtype)
    return (lambda: M(P)), ([P] if grad else [])


def _peft_setup(neumann: bool):
    """peft OFT's ``OFTRotationModule._cayley_batch`` (its signature differs between peft versions)."""
    def setup(x, grad):
        from peft.tuners.oft.layer import OFTRotationModule
        P = x["P"]
        b, d = P.shape[0], P.shape[-1]
        rows, cols = torch.triu_indices(d, d, 1, device=P.device)
        q = own_leaf(P[:, rows, cols], grad)          # PEFT's packed upper-triangle parameters
        known = dict(r=b, n_elements=d * (d - 1) // 2, block_size=d, in_features=b * d, coft=False, eps=6e-5,
                     block_share=False, use_cayley_neumann=neumann, num_cayley_neumann_terms=5,
                     dropout_probability=0.0, kernel_size=(0, 0))
        params = inspect.signature(OFTRotationModule.__init__).parameters
        mod = OFTRotationModule(**{k: v for k, v in known.items() if k in params}).to(P.device)
        mod.use_cayley_neumann, mod.num_cayley_neumann_terms = neumann, 5
        cb = inspect.signature(mod._cayley_batch).parameters
        if "block_size" in cb:
            f = lambda: mod._cayley_batch(q, d, use_cayley_neumann=neumann, num_neumann_terms=5)  # noqa: E731
        else:
            f = lambda: mod._cayley_batch(q)  # noqa: E731
        return f, ([q] if grad else [])
    return setup


CAYLEY = _common("cayley", "S") + [
    Impl("torch.linalg.solve(I−S, I+S)", "torch", fn_setup(cayley_solve, "S"), baseline=True),
    Impl("torch.linalg.inv + matmul", "torch", fn_setup(cayley_inv, "S"), baseline=True,
         note="what OPT-CP does"),
    Impl("torch.linalg.lu_factor + lu_solve", "torch", fn_setup(cayley_lu, "S"), baseline=True),
    Impl("parametrizations.orthogonal(cayley)", "torch", _parametrization_setup("cayley", "P", False),
         same_map=False, note="its map: solve(I − A/2, I + A/2), A = tril(P) − tril(P)ᵀ"),
    Impl("Cayley–Neumann 5 terms (PEFT formula)", "torch", fn_setup(cayley_neumann5, "S"), approx=True,
         note="3 bmm; diverges for ‖S‖ ≥ 1 (OPT-CP init has ‖S‖ ~ 2√d)"),
    Impl("torch.matrix_exp (context)", "context", fn_setup(torch.matrix_exp, "S"), same_map=False,
         note="exp(S): a different map, for orientation"),
    Impl("geotorch SO(cayley)", "peer", _geotorch_setup, requires="geotorch", same_map=False,
         note="base @ cayley(skew(X)); its own skew and base"),
    Impl("peft OFT Cayley (exact)", "peer", _peft_setup(False), requires="peft", same_map=False),
    Impl("peft OFT Cayley–Neumann", "peer", _peft_setup(True), requires="peft", same_map=False, approx=True),
]


IMPLS: Dict[str, List[Impl]] = {
    "householder_product": HOUSEHOLDER_PRODUCT,
    "householder_orthogonal": HOUSEHOLDER_ORTHOGONAL,
    "householder_apply": HOUSEHOLDER_APPLY,
    "gram_schmidt": GRAM_SCHMIDT,
    "lowdin": LOWDIN,
    "cayley": CAYLEY,
}


def _bmm_setup(x, grad):
    A, B = x["_bmm_A"], x["_bmm_B"]
    return (lambda: torch.bmm(A, B)), []


YARDSTICK = Impl("torch.bmm (yardstick)", "yardstick", _bmm_setup, same_map=False, backward=True,
                 note="one b×d×d @ b×d×d bmm, same dtype and device; forward only in both modes")
