"""What is benchmarked, defined once for the pytest suites and the report runner.

A ``Case`` is (op, impl, shape, dtype, mode) with mode "fwd" (under ``torch.no_grad``) or "fwd+bwd" (the
forward plus ``torch.autograd.grad`` of it against a fixed random cotangent). ``prepare`` turns a case into
the callable that is timed; ``describe`` gives the numbers stored beside each time: algorithmic FLOPs
(docs/performance.md, the same count for every implementation of an op), accuracy in float64, the kernel name.
"Ops" here are the benchmark's rows: the opt_fast ops, plus ``orthogonalize_approx`` (a functional) and
``cayley_neumann`` (the block layers' map).
"""
import functools
import math
import re
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import torch

import opt_fast

from . import impls as I
from .shapes import Shape, shape_sets

MODES = ("fwd", "fwd+bwd")
OPS = ("householder_product", "householder_orthogonal", "householder_apply", "gram_schmidt", "lowdin",
       "orthogonalize_approx", "cayley", "cayley_neumann")
# Accuracy gate for "the best torch built-in / peer": ‖RᵀR − I‖_F/√d (docs/performance.md, the orthogonality gate) for the exact
# maps; for the approximate ones (GATE_METRIC "err_ref") the error against the same map in float64.
GATE = {torch.float32: 1e-5, torch.float64: 1e-12}
GATE_REF = {torch.float32: 1e-4, torch.float64: 1e-10}
GATE_METRIC = {"orthogonalize_approx": "err_ref", "cayley_neumann": "err_ref"}


def gate(op: str, dtype) -> Tuple[str, float]:
    """(record field, bound) of the op's accuracy gate."""
    if GATE_METRIC.get(op) == "err_ref":
        return "err_ref", GATE_REF.get(dtype, 1e-4)
    return "accuracy", GATE.get(dtype, 1e-5)


def meets_gate(rec: Dict) -> bool:
    field, bound = gate(rec["op"], getattr(torch, rec["dtype"]))
    v = rec.get(field)
    return isinstance(v, float) and v <= bound


class Unavailable(Exception):
    """The impl cannot run this case (peer not installed, no backward, shape not supported...)."""


def dtype_name(dtype) -> str:
    return str(dtype).replace("torch.", "")


# ---- inputs -----------------------------------------------------------------------------------------

def _randn(shape, dtype, device, gen, scale=1.0):
    return torch.randn(shape, generator=gen, dtype=dtype, device=device) * scale


def _hh_tau(V, k):
    """tau = 2/(1 + ‖below-diagonal part‖²): the reflectors I - tau y yᵀ are then exactly orthogonal."""
    return 2.0 / (1.0 + (V[..., :k].tril(-1) ** 2).sum(-2))


def make_inputs(op: str, shape: Shape, dtype, device, seed: int = 0) -> Dict[str, torch.Tensor]:
    device = torch.device(device)
    gen = torch.Generator(device=device).manual_seed(seed)
    b, d, k = shape.b, shape.d, shape.kk
    x: Dict[str, torch.Tensor] = {}
    if op == "householder_product":
        x["V"] = _randn((b, d, d), dtype, device, gen)
        x["tau"] = _hh_tau(x["V"], k)
    elif op == "householder_orthogonal":
        x["V"] = _randn((b, d, k), dtype, device, gen)
    elif op == "householder_apply":
        x["V"] = _randn((b, d, k), dtype, device, gen)
        x["X"] = _randn((b, d, shape.n or d), dtype, device, gen)
    elif op in ("gram_schmidt", "lowdin", "orthogonalize_approx"):
        x["P"] = _randn((b, d, d), dtype, device, gen)
        if op == "lowdin":   # warm start: the polar factor of a nearby matrix (the previous training step)
            near = (x["P"] + _randn((b, d, d), dtype, device, gen, 1e-3)).double()
            x["R0"] = I.svd_polar(near).to(dtype)
    elif op in ("cayley", "cayley_neumann"):
        # OPT-CP init: P ~ N(0,1) (‖S‖ ~ 2√d); PEFT regime: entries scaled so that ‖S‖ ≈ shape.norm
        scale = 1.0 if shape.norm is None else shape.norm / (2.0 * math.sqrt(d))
        x["P"] = _randn((b, d, d), dtype, device, gen, scale)
        U = x["P"].triu()
        x["S"] = U - U.mT
    else:
        raise ValueError(op)
    x["_bmm_A"] = _randn((b, d, d), dtype, device, gen)
    x["_bmm_B"] = _randn((b, d, d), dtype, device, gen)
    return x


DIFF_INPUTS = {
    "householder_product": ("V", "tau"), "householder_orthogonal": ("V",), "householder_apply": ("V", "X"),
    "gram_schmidt": ("P",), "lowdin": ("P",), "orthogonalize_approx": ("P",), "cayley": ("S",),
    "cayley_neumann": ("S",),
}
SHAPE_SETS = {
    "householder_product": ("householder", "householder_k"), "householder_orthogonal": ("householder", "householder_k"),
    "householder_apply": ("apply",), "gram_schmidt": ("gram_schmidt",), "lowdin": ("lowdin",),
    "orthogonalize_approx": ("lowdin",), "cayley": ("square", "blocks"), "cayley_neumann": ("blocks",),
}


# ---- FLOPs (docs/performance.md: algorithmic counts, per matrix; fwd+bwd = fwd + bwd) ---------------------

def flops(op: str, shape: Shape) -> Tuple[float, float]:
    """(forward, backward) algorithmic FLOPs for the whole batch."""
    d, k, n, b = shape.d, shape.kk, shape.n or shape.d, shape.b
    hh_bwd = 5.0 / 2.17          # Householder backward ≈ 5 GEMM-eq against 2.17 forward (§2.1)
    if op == "householder_product":      # LAPACK orgqr count, m = n = d
        f = 4 * d * d * k - 4 * d * k * k + 4 / 3 * k ** 3
        fb = f * hh_bwd
    elif op == "householder_orthogonal":  # SYRK + triangular inverse + TRMM + GEMM
        f = 2 * d * d * k + 2 * d * k * k + k ** 3 / 3
        fb = f * hh_bwd
    elif op == "householder_apply":       # W0 - V (T (Vᵀ W0)) plus forming T
        f = 4 * d * k * n + k * k * n + d * k * k + k ** 3 / 3
        fb = f * hh_bwd
    elif op == "gram_schmidt":            # Householder QR floor; QR backward ≈ 3 GEMM-eq + TRSM
        f, fb = 8 / 3 * d ** 3, 7 * d ** 3
    elif op == "lowdin":                  # 8 Newton–Schulz-type iterations × 3 GEMMs; backward ≈ forward
        f = fb = 48 * d ** 3
    elif op == "orthogonalize_approx":    # 5 quintic steps × 3 GEMMs; no backward
        f, fb = 30 * d ** 3, 0.0
    elif op == "cayley":                  # one inverse; backward = 2 GEMMs
        f, fb = 2 * d ** 3, 4 * d ** 3
    elif op == "cayley_neumann":          # (I + S)·p(S), p of degree k: k products; backward ≈ 2×
        k = I.PE.NEUMANN_TERMS
        f, fb = 2 * k * d ** 3, 4 * k * d ** 3
    else:
        raise ValueError(op)
    return b * f, b * fb


def bmm_flops(shape: Shape) -> float:
    return 2.0 * shape.b * shape.d ** 3


# ---- accuracy (float64) -----------------------------------------------------------------------------

@torch.no_grad()
def orth_error(R: torch.Tensor) -> float:
    """max over the batch of ‖RᵀR − I‖_F / √n (n = columns), computed in float64."""
    R = R.detach().to(torch.float64)
    n = R.shape[-1]
    E = R.mT @ R - torch.eye(n, dtype=R.dtype, device=R.device)
    return (torch.linalg.matrix_norm(E) / math.sqrt(n)).max().item()


@torch.no_grad()
def apply_error(Y: torch.Tensor, X: torch.Tensor) -> float:
    """max over the batch of ‖YᵀY − XᵀX‖_F / ‖XᵀX‖_F: how far the applied map is from orthogonal."""
    Y, X = Y.detach().to(torch.float64), X.detach().to(torch.float64)
    G = X.mT @ X
    return (torch.linalg.matrix_norm(Y.mT @ Y - G) / torch.linalg.matrix_norm(G)).max().item()


@torch.no_grad()
def ref_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """max over the batch of ‖out − ref‖_F / ‖ref‖_F against the float64 reference."""
    out = out.detach().to(torch.float64)
    return (torch.linalg.matrix_norm(out - ref) / torch.linalg.matrix_norm(ref)).max().item()


def accuracy(op: str, out: torch.Tensor, x: Dict[str, torch.Tensor]) -> float:
    return apply_error(out, x["X"]) if op == "householder_apply" else orth_error(out)


ACCURACY_LABEL = {"householder_apply": "‖YᵀY−XᵀX‖/‖XᵀX‖"}
DEFAULT_ACCURACY_LABEL = "‖RᵀR−I‖/√d"
ERR_REF_LABEL = "‖R−R₆₄‖/‖R₆₄‖"


def gate_label(op: str) -> str:
    """The metric of the op's accuracy gate, as the tables name it."""
    if GATE_METRIC.get(op) == "err_ref":
        return ERR_REF_LABEL
    return ACCURACY_LABEL.get(op, DEFAULT_ACCURACY_LABEL)


REF_KWARGS = {"cayley_neumann": {"terms": I.PE.NEUMANN_TERMS}}


def reference64(op: str, shape: Shape, x: Dict[str, torch.Tensor], max_work: float = 2e10):
    """The op's reference kernel on float64 copies of the inputs (None when b·d³ > ``max_work``)."""
    if shape.b * shape.d ** 3 > max_work:
        return None
    with torch.no_grad():
        return I.REF[op](*[x[n].detach().to(torch.float64) for n in DIFF_INPUTS[op]], **REF_KWARGS.get(op, {}))


# ---- cases ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Case:
    op: str
    impl: I.Impl
    shape: Shape
    dtype: torch.dtype
    mode: str

    @property
    def group(self) -> str:
        return f"{self.op} {self.mode} {self.shape.label} {dtype_name(self.dtype)}"

    @property
    def id(self) -> str:
        s = f"{self.op}-{self.mode}-{self.shape.label}-{dtype_name(self.dtype)}-{self.impl.name}"
        return re.sub(r"[^A-Za-z0-9_.+=\-]+", "_", s)

    def input_key(self) -> Tuple:
        return (self.op, self.shape.key(), self.dtype)


def _compile_here(size: str, op: str, index: int, first_big: int, mode: str) -> bool:
    """torch.compile costs seconds per (shape, dtype, grad mode), so it runs on one shape per op: smoke:
    cayley and gram_schmidt on their first shape; default: fwd+bwd of householder_product and cayley on the
    S-OPT block shape (d=144, b=6, the third of their shapes); full: the first shape with d >= 576 (the CNN-6
    group), both modes."""
    if size == "full":
        return index == first_big
    if size == "smoke":
        return op in ("cayley", "gram_schmidt") and index == 0
    return op in ("householder_product", "cayley") and index == 2 and mode == "fwd+bwd"


def _work(shape: Shape) -> int:
    return shape.b * shape.d * shape.d * shape.kk


def cases(size: str, ops=OPS) -> List[Case]:
    """All cases of a size, ordered by shape priority, then size (b·d²·k), then op: a run cut short by its
    time budget has done the small shapes of every op. Cases sharing inputs stay together."""
    sets = shape_sets(size)
    out = []
    for op in ops:
        keys = [k for k in SHAPE_SETS[op] if k in sets] or ["square"]   # lowdin: own grid in full only
        entries = [e for key in keys for e in sets.get(key, [])]
        first_big = next((i for i, (s, _) in enumerate(entries) if s.d >= 576), -1)
        for i, (shape, dtypes) in enumerate(entries):
            for dtype in dtypes:
                for mode in MODES:
                    for impl in [I.YARDSTICK] + I.IMPLS[op]:
                        if impl.kind == "compiled" and not (_compile_here(size, op, i, first_big, mode)
                                                            and dtype == torch.float32):
                            continue
                        out.append(Case(op, impl, shape, dtype, mode))
    return ordered(out)


def ordered(case_list: List[Case]) -> List[Case]:
    """Sorted by shape priority, then size, then first appearance of the input group (kept together)."""
    first: Dict[Tuple, int] = {}
    for n, c in enumerate(case_list):
        first.setdefault(c.input_key(), n)
    return sorted(case_list, key=lambda c: (c.shape.prio, _work(c.shape), first[c.input_key()]))


# ---- preparing a case -------------------------------------------------------------------------------

@dataclass
class Prepared:
    run: Callable[[], torch.Tensor]     # the timed call; returns the forward output
    state: dict = field(default_factory=dict)

    @property
    def output(self) -> Optional[torch.Tensor]:
        return self.state.get("out")


def prepare(case: Case, x: Dict[str, torch.Tensor], device) -> Prepared:
    """Raises ``Unavailable`` when the impl cannot run this case; any other exception is a real failure."""
    device = torch.device(device)
    reason = case.impl.unavailable(case.shape, device.type, case.mode)
    if reason:
        raise Unavailable(reason)
    grad = case.mode == "fwd+bwd" and case.impl.kind != "yardstick"
    diff = DIFF_INPUTS[case.op]
    xx = {k: (v.detach().requires_grad_(grad) if k in diff else v) for k, v in x.items()}
    fwd, leaves = case.impl.setup(xx, grad)
    state: dict = {}
    if not grad:
        def run():
            with torch.no_grad():
                out = fwd()
            state["out"] = out
            return out
    else:
        def run():
            out = fwd()
            if "G" not in state:
                gen = torch.Generator(device=out.device).manual_seed(1)
                state["G"] = torch.randn(out.shape, generator=gen, dtype=out.dtype, device=out.device)
            torch.autograd.grad(out, leaves, state["G"], allow_unused=True)
            state["out"] = out.detach()
            return state["out"]
    return Prepared(run, state)


def kernel_name(case: Case, device) -> Optional[str]:
    if case.impl.kind != "opt_fast" or case.impl.name != "opt_fast":
        return None
    dev = torch.device(device).type
    if case.op == "orthogonalize_approx":
        return "Triton" if dev == "cuda" and opt_fast.kernel_for("lowdin", dev) == "Triton" else "torch"
    if not hasattr(torch.ops.opt_fast, case.op):
        return None
    name = opt_fast.kernel_for(case.op, dev)
    if case.mode == "fwd+bwd":
        name += " / bwd " + opt_fast.kernel_for(case.op + "_backward", dev)
    return name


def describe(case: Case, device) -> dict:
    """The case's static description (JSON-able)."""
    f, fb = flops(case.op, case.shape)
    yard = case.impl.kind == "yardstick"
    return {
        "id": case.id, "op": case.op, "impl": case.impl.name, "kind": case.impl.kind, "mode": case.mode,
        "dtype": dtype_name(case.dtype), "d": case.shape.d, "batch": case.shape.b, "k": case.shape.kk,
        "n": case.shape.n, "norm": case.shape.norm, "shape": case.shape.label, "tag": case.shape.tag,
        "group": case.group, "kernel": kernel_name(case, device),
        "flops": bmm_flops(case.shape) if yard else (f if case.mode == "fwd" else f + fb),
        "baseline": case.impl.baseline, "approx": case.impl.approx, "same_map": case.impl.same_map,
        "package": case.impl.package or None,
        "note": case.impl.note,
    }


# ---- the torch.bmm yardstick, measured in this process ----------------------------------------------

@functools.lru_cache(maxsize=None)
def bmm_time(b: int, d: int, dtype, device: str, case_s: float = 0.1) -> float:
    from .timers import Budget, measure
    gen = torch.Generator(device=device).manual_seed(0)
    A = torch.randn((b, d, d), generator=gen, dtype=dtype, device=device)
    B = torch.randn((b, d, d), generator=gen, dtype=dtype, device=device)
    return measure(lambda: torch.bmm(A, B), device, Budget(case_s=case_s)).median_s


def iter_groups(case_list: List[Case]) -> Iterator[Tuple[Tuple, List[Case]]]:
    """Consecutive cases sharing inputs (op, shape, dtype), in order."""
    group: List[Case] = []
    for c in case_list:
        if group and c.input_key() != group[0].input_key():
            yield group[0].input_key(), group
            group = []
        group.append(c)
    if group:
        yield group[0].input_key(), group
