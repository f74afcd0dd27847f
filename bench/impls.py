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
* ``peer``       packages a user would use instead of opt_fast (bench/peers.py): geotorch, torch's
                 parametrizations and Muon, PEFT's OFT, torch-householder; "not installed" when absent.
                 The "best peer" column is taken over them (the fastest that meets the accuracy gate).
* ``context``    a different map of similar use (e.g. ``matrix_exp`` for Cayley), for orientation only.

Two rows are not opt_fast ops of their own: ``orthogonalize_approx`` (opt_fast.functional's Muon-style
quintic, against torch.optim.Muon's) and ``cayley_neumann`` (the truncated Cayley series of the block layers,
against PEFT's; its opt_fast impl says "not in this build" where the op is missing).
"""
import logging
import warnings
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import torch

import opt_fast.functional as F
from opt_fast.reference import REFERENCE_KERNELS

from . import peers as PE
from .compositions import (cayley_inv, cayley_lu, cayley_solve, cholqr2, cholqr2_fp64, eigh64_polar, eigh_polar,
                           geqrf_orgqr, linalg_polar, muon_ns5, neumann_series, qr_sign, quintic_ns, reflector_loop,
                           svd_polar)

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
    package: str = ""            # a peer's package (a key of bench.peers.PACKAGES): "not installed" without it
    note: str = ""
    applies: Optional[Callable] = None   # (shape, device_type, mode) -> reason it does not apply, or None

    def unavailable(self, shape, device_type: str, mode: str) -> Optional[str]:
        """None if this impl can run the case, else why not ("not installed", "no backward", ...)."""
        if self.package and not PE.module_found(PE.PACKAGES[self.package][1]):
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


own_leaf = PE.own_leaf


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


def _op_in_build(op: str):
    def applies(shape, device_type, mode):
        return None if hasattr(_ops, op) else f"torch.ops.opt_fast.{op} is not in this build"
    return applies


def _call_op(op: str):
    return lambda *args, **kwargs: getattr(_ops, op)(*args, **kwargs)


def _common(op: str, *names: str, **kwargs) -> List[Impl]:
    present = _op_in_build(op)
    return [
        Impl("opt_fast", "opt_fast", fn_setup(_call_op(op), *names, **kwargs), applies=present,
             note="torch.ops.opt_fast op; fwd+bwd via its registered backward op"),
        Impl("reference", "reference", fn_setup(lambda *a, **k: REF[op](*a, **k), *names, **kwargs),
             applies=lambda *_: None if op in REFERENCE_KERNELS else "no opt_fast reference in this build",
             note="opt_fast.reference, called directly; fwd+bwd = autograd through its torch ops"),
        Impl("reference+compile", "compiled", compiled_setup(lambda *a, **k: REF[op](*a, **k), *names, **kwargs),
             applies=lambda *_: None if op in REFERENCE_KERNELS else "no opt_fast reference in this build",
             note="torch.compile(reference, dynamic=False)"),
    ]


# ---- householder_product (LAPACK convention) --------------------------------------------------------

HOUSEHOLDER_PRODUCT = _common("householder_product", "V", "tau") + [
    Impl("torch.linalg.householder_product", "torch", fn_setup(torch.linalg.householder_product, "V", "tau"),
         baseline=True, applies=_cpu_max_d(1152, "O(k) rank-1 backward: too slow on CPU")),
    Impl("parametrizations.orthogonal(householder)", "peer", PE.parametrization_setup("householder", "V", True),
         package="torch parametrizations", note="ships with torch; use_trivialization=False",
         applies=_and(_only_square_k, _cpu_max_d(1152, "O(k) rank-1 backward: too slow on CPU"))),
    Impl("torch-householder", "peer", PE.torch_householder_product_setup, package="torch-householder",
         note="torch_householder_orgqr(tril(V,-1)+I, tau)", applies=_only_square_k),
]


# ---- householder_orthogonal (dense reflectors) ------------------------------------------------------

HOUSEHOLDER_ORTHOGONAL = _common("householder_orthogonal", "V") + [
    Impl("torch reflector loop", "torch", fn_setup(reflector_loop, "V"), baseline=True,
         note="k sequential rank-1 updates (no torch built-in takes dense reflectors)", applies=_loop_guard),
    Impl("torch-householder", "peer", PE.torch_householder_dense_setup, package="torch-householder",
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

GRAM_SCHMIDT = _common("gram_schmidt", "P") + [
    Impl("torch.linalg.qr + sign fix", "torch", fn_setup(qr_sign, "P"), baseline=True),
    Impl("torch.geqrf + householder_product", "torch", fn_setup(geqrf_orgqr, "P"), baseline=True,
         backward=False, note="geqrf has no autograd"),
    Impl("CholQR2 (torch)", "torch", fn_setup(cholqr2, "P"), baseline=True,
         note="unstable for κ(P)² u ≳ 1 (docs/performance.md); judged by the accuracy gate"),
    Impl("CholQR2, fp64 Gram/Cholesky (torch)", "torch", fn_setup(cholqr2_fp64, "P"), baseline=True),
]


# ---- lowdin -----------------------------------------------------------------------------------------

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
    return F.lowdin(P)


MUON = Impl("torch.optim.Muon Newton–Schulz", "peer", PE.muon_setup, package="torch.optim.Muon", approx=True,
            backward=False, note="torch.optim._muon._zeropower_via_newtonschulz, its defaults (5 quintic steps, "
                                 "bfloat16 on every device), one matrix a call; an optimizer update: no backward")


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
    MUON,
]

# Muon-style approximate orthogonalisation (an optimizer update: forward only). Its accuracy gate is the error
# against the same quintic in float64 (cases.GATE_METRIC), not orthogonality, which it does not reach.
ORTHOGONALIZE_APPROX = [
    Impl("opt_fast", "opt_fast", fn_setup(F.orthogonalize_approx, "P", steps=5), backward=False,
         note="opt_fast.functional.orthogonalize_approx(P, 5): Triton bf16 products on CUDA, torch elsewhere"),
    Impl("quintic NS in torch ops", "torch", fn_setup(muon_ns5, "P"), baseline=True,
         note="the same 5 quintic steps written in torch ops (bf16 on CUDA, input dtype on CPU)"),
    MUON,
    Impl("opt_fast lowdin (exact polar)", "opt_fast", fn_setup(_lowdin_functional, "P"), same_map=False,
         note="what the approximation stands in for: the exact polar factor"),
]


# ---- cayley -----------------------------------------------------------------------------------------

def _neumann_functional(S, terms):
    f = getattr(F, "cayley_neumann", None) or getattr(_ops, "cayley_neumann")
    return f(S, terms)


CAYLEY = _common("cayley", "S") + [
    Impl("torch.linalg.solve(I−S, I+S)", "torch", fn_setup(cayley_solve, "S"), baseline=True),
    Impl("torch.linalg.inv + matmul", "torch", fn_setup(cayley_inv, "S"), baseline=True,
         note="what OPT-CP does"),
    Impl("torch.linalg.lu_factor + lu_solve", "torch", fn_setup(cayley_lu, "S"), baseline=True),
    Impl("torch.matrix_exp (context)", "context", fn_setup(torch.matrix_exp, "S"), same_map=False,
         note="exp(S): a different map, for orientation"),
    Impl("geotorch.orthogonal (cayley)", "peer", PE.geotorch_setup("cayley"), package="geotorch", same_map=False,
         note="base @ cayley(skew(X)): its own skew and a fixed random base"),
    Impl("parametrizations.orthogonal (cayley)", "peer", PE.parametrization_setup("cayley"),
         package="torch parametrizations", same_map=False,
         note="ships with torch; its map: solve(I − A/2, I + A/2), A = tril(P) − tril(P)ᵀ"),
    Impl("parametrizations.orthogonal (matrix_exp)", "peer", PE.parametrization_setup("matrix_exp"),
         package="torch parametrizations", same_map=False,
         note="ships with torch; exp(A), A = tril(P) − tril(P)ᵀ: the other skew → orthogonal map"),
    Impl("peft OFT Cayley (exact)", "peer", PE.peft_cayley_setup(False), package="peft", same_map=False,
         note="solve(I + Q, I − Q, left=False) = (I − S)(I + S)⁻¹: our map's transpose"),
    Impl("peft OFT Cayley–Neumann", "peer", PE.peft_cayley_setup(True), package="peft", same_map=False,
         approx=True, note=f"num_cayley_neumann_terms={PE.PEFT_NEUMANN_TERMS}: a truncated series, orthogonal "
                           "only for small ‖S‖ (see the cayley_neumann rows)"),
]

# The truncated Cayley series of the block layers (POET, PEFT's OFT), at PEFT's default length
CAYLEY_NEUMANN = [
    Impl("opt_fast", "opt_fast", fn_setup(_neumann_functional, "S", terms=PE.NEUMANN_TERMS),
         applies=_op_in_build("cayley_neumann"),
         note=f"opt_fast.functional.cayley_neumann(S, {PE.NEUMANN_TERMS}) (PEFT's n = {PE.PEFT_NEUMANN_TERMS})"),
] + _common("cayley_neumann", "S", terms=PE.NEUMANN_TERMS)[1:] + [
    Impl("Neumann series in torch ops", "torch", fn_setup(neumann_series, "S"), baseline=True,
         note=f"(I + S)·Σ_(i≤{PE.NEUMANN_TERMS}) Sⁱ with matmuls"),
    Impl("opt_fast cayley (exact)", "opt_fast", fn_setup(_call_op("cayley"), "S"), same_map=False,
         note="the exact map the series truncates"),
    Impl("peft OFT Cayley–Neumann", "peer", PE.peft_cayley_setup(True), package="peft",
         note=f"num_cayley_neumann_terms={PE.PEFT_NEUMANN_TERMS}: the same map"),
]


IMPLS: Dict[str, List[Impl]] = {
    "householder_product": HOUSEHOLDER_PRODUCT,
    "householder_orthogonal": HOUSEHOLDER_ORTHOGONAL,
    "householder_apply": HOUSEHOLDER_APPLY,
    "gram_schmidt": GRAM_SCHMIDT,
    "lowdin": LOWDIN,
    "orthogonalize_approx": ORTHOGONALIZE_APPROX,
    "cayley": CAYLEY,
    "cayley_neumann": CAYLEY_NEUMANN,
}
# the references the bench calls: opt_fast's, plus the two rows that are not opt_fast ops of their own here
REF = dict(REFERENCE_KERNELS)
REF.setdefault("cayley_neumann", neumann_series)
REF["orthogonalize_approx"] = quintic_ns


def _bmm_setup(x, grad):
    A, B = x["_bmm_A"], x["_bmm_B"]
    return (lambda: torch.bmm(A, B)), []


YARDSTICK = Impl("torch.bmm (yardstick)", "yardstick", _bmm_setup, same_map=False, backward=True,
                 note="one b×d×d @ b×d×d bmm, same dtype and device; forward only in both modes")
