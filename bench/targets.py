"""The issues' acceptance ratios, measured at their exact shapes in one run.

Each ``Target`` is a ratio of two timed callables (or one absolute time) at the shape an issue names, with
the bound it must meet. Both sides are timed interleaved (one call of each per round, after a warm-up
call) and the ratio is taken of the medians, so a load change on a shared machine hits both alike.
Accuracy (‖RᵀR − I‖_F/√d in float64) is stored beside the ratio where the issue states one.
"""
import math
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch

import opt_fast

from . import impls as I
from .timers import sync

ops = torch.ops.opt_fast
Fn = Callable[[], object]
# builder(device) -> (numerator, denominator or None, output for the accuracy column or None)
Builder = Callable[[torch.device], Tuple[Fn, Optional[Fn], Optional[torch.Tensor]]]


@dataclass
class Target:
    issue: int
    device: str           # "cpu" or "cuda": the machine the issue states it for
    what: str             # the ratio in words: "numerator / denominator"
    shape: str
    bound: float
    better: str           # "le": ratio <= bound is met; "ge": ratio >= bound is met
    build: Builder
    unit: str = "×"       # "µs" for an absolute time (denominator None); "" for an accuracy
    metric: str = "time"  # "time": build -> (numerator, denominator, output); "accuracy": build -> (value, detail)


def _randn(*shape, device, seed=0, dtype=torch.float32):
    g = torch.Generator(device=device).manual_seed(seed)
    return torch.randn(*shape, generator=g, device=device, dtype=dtype)


def _fwd_bwd(f: Callable[[torch.Tensor], torch.Tensor], *inputs: torch.Tensor) -> Fn:
    leaves = [x.detach().clone().requires_grad_() for x in inputs]
    with torch.no_grad():
        g = torch.randn_like(f(*inputs))

    def run():
        out = f(*leaves)
        return torch.autograd.grad(out, leaves, g)
    return run


def _no_grad(f: Callable, *args) -> Fn:
    def run():
        with torch.no_grad():
            return f(*args)
    return run


def _tau(V):
    return 2.0 / (1.0 + (V.tril(-1) ** 2).sum(-2))   # exactly orthogonal reflectors


def _orth_err(R: torch.Tensor) -> float:
    R = R.detach().double()
    d = R.shape[-1]
    eye = torch.eye(d, dtype=R.dtype, device=R.device)
    return float((torch.linalg.matrix_norm(R.mT @ R - eye) / math.sqrt(d)).max())


# ---- issue 4: Householder ----------------------------------------------------------------------------

def _hh_product_fwd(dev, d=512, b=None):
    V = _randn(*((b,) if b else ()), d, d, device=dev)
    tau = _tau(V)
    return _no_grad(ops.householder_product, V, tau), _no_grad(torch.linalg.householder_product, V, tau), None


def _hh_torch_over_ours(dev, d=1024):
    ours, theirs, _ = _hh_product_fwd(dev, d)
    return theirs, ours, None


def _hh_product_fwd_bwd(dev, d=512):
    V = _randn(d, d, device=dev)
    tau = _tau(V)
    return (_fwd_bwd(torch.linalg.householder_product, V, tau), _fwd_bwd(ops.householder_product, V, tau), None)


def _hh_orthogonal_vs_mm(dev, d=512):
    V, A, B = _randn(d, d, device=dev), _randn(d, d, device=dev, seed=1), _randn(d, d, device=dev, seed=2)
    return _no_grad(ops.householder_orthogonal, V), _no_grad(torch.mm, A, B), None


def _hh_product_vs_bmm(dev, d=1024, b=1):
    V = _randn(b, d, d, device=dev)
    tau = _tau(V)
    A, B = _randn(b, d, d, device=dev, seed=1), _randn(b, d, d, device=dev, seed=2)
    return _no_grad(ops.householder_product, V, tau), _no_grad(torch.bmm, A, B), None


def _hh_small_batch(dev, d=27, b=64):
    V = _randn(b, d, d, device=dev)
    return _no_grad(ops.householder_product, V, _tau(V)), None, None


# ---- issue 5: Gram-Schmidt ---------------------------------------------------------------------------

def _gs_fwd(dev, d=576, b=5):
    P = _randn(b, d, d, device=dev)
    return _no_grad(ops.gram_schmidt, P), _no_grad(torch.linalg.qr, P), ops.gram_schmidt(P)


def _gs_fwd_bwd(dev, d=576, b=5):
    P = _randn(b, d, d, device=dev)
    return _fwd_bwd(I.qr_sign, P), _fwd_bwd(ops.gram_schmidt, P), None


def _gs_qr_over_ours(dev, d=576, b=5):
    P = _randn(b, d, d, device=dev)
    return _no_grad(torch.linalg.qr, P), _no_grad(ops.gram_schmidt, P), ops.gram_schmidt(P)


def _gs_vs_bmm(dev, d=1024, b=1):
    P, A, B = (_randn(b, d, d, device=dev, seed=s) for s in range(3))
    return _no_grad(ops.gram_schmidt, P), _no_grad(torch.bmm, A, B), ops.gram_schmidt(P)


# ---- issue 6: Löwdin ---------------------------------------------------------------------------------

def _previous_step(dev, d, b, rel=1e-3):
    """P, and R0 = the polar factor of the previous step's P (P moved by `rel`, relative Frobenius)."""
    prev = _randn(b, d, d, device=dev)
    N = _randn(b, d, d, device=dev, seed=1)
    P = prev + rel * N * (torch.linalg.matrix_norm(prev) / torch.linalg.matrix_norm(N))[..., None, None]
    return P, I.svd_polar(prev.double()).to(prev.dtype)


def _lowdin_warm_vs_svd(dev, d=576, b=5):
    P, R0 = _previous_step(dev, d, b)
    return _no_grad(I.svd_polar, P), _no_grad(ops.lowdin, P, 0, R0), ops.lowdin(P, 0, R0)


def _lowdin_svd_over_cold(dev, d=1024, b=5):
    P = _randn(b, d, d, device=dev)
    return _no_grad(I.svd_polar, P), _no_grad(ops.lowdin, P), ops.lowdin(P)


def _lowdin_cold_vs_bmm(dev, d=1024, b=5):
    P, A, B = (_randn(b, d, d, device=dev, seed=s) for s in range(3))
    return _no_grad(ops.lowdin, P), _no_grad(torch.bmm, A, B), ops.lowdin(P)


def _lowdin_warm_vs_bmm(dev, d=1024, b=5):
    P, R0 = _previous_step(dev, d, b)
    A, B = _randn(b, d, d, device=dev, seed=5), _randn(b, d, d, device=dev, seed=6)
    return _no_grad(ops.lowdin, P, 0, R0), _no_grad(torch.bmm, A, B), ops.lowdin(P, 0, R0)


def _lowdin_eager_over_ours(dev, d=1024, b=5):
    from opt_fast.reference.lowdin import lowdin_ref
    P = _randn(b, d, d, device=dev)
    return _no_grad(lowdin_ref, P), _no_grad(ops.lowdin, P), ops.lowdin(P)


# ---- accuracy (issues 5 and 6): one N(0,1) matrix per size, float32 ---------------------------------------

def _accuracy(op: Callable, torch_map: Callable, dev, d):
    """Orthogonality of op(P) for one N(0,1) P, and its error against torch_map in float64 relative to
    torch_map's own float32 error (the accuracy rule)."""
    P = _randn(1, d, d, device=dev, seed=7)
    out = op(P)
    exact = torch_map(P.double())
    err, err_torch = ((x.double() - exact).norm().item() for x in (out, torch_map(P)))
    return _orth_err(out), {"err_vs_f64": err, "torch_err_vs_f64": err_torch, "err_ratio": err / err_torch}


def _gs_accuracy(dev, d):
    return _accuracy(ops.gram_schmidt, I.qr_sign, dev, d)


def _lowdin_accuracy(dev, d):
    return _accuracy(ops.lowdin, I.svd_polar, dev, d)


def _accuracy_targets(device: str) -> List[Target]:
    # met: orthogonality within the bound and the error vs float64 at most 2x torch's own (the accuracy rule)
    out = [Target(5, device, "gram_schmidt ‖QᵀQ − I‖_F/√d (err vs float64 / torch.linalg.qr's in the last column)",
                  f"d = {d}, batch 1, float32", 1e-5, "le", (lambda dev, d=d: _gs_accuracy(dev, d)), unit="",
                  metric="accuracy") for d in (576, 1024, 2304)]
    out += [Target(6, device, "lowdin ‖RᵀR − I‖_F/√d (err vs float64 SVD polar / float32 SVD's in the last column)",
                   f"d = {d}, batch 1, float32", 1e-5, "le", (lambda dev, d=d: _lowdin_accuracy(dev, d)), unit="",
                   metric="accuracy") for d in (576, 1024)]
    return out


TARGETS: List[Target] = [
    Target(4, "cpu", "householder_product fwd / torch.linalg.householder_product (LAPACK orgqr)",
           "d = k = 512, batch 1, float32", 1.0, "le", _hh_product_fwd),
    Target(4, "cpu", "torch.linalg.householder_product fwd+bwd (autograd) / householder_product fwd+bwd",
           "d = k = 512, batch 1, float32", 10.0, "ge", _hh_product_fwd_bwd),
    Target(4, "cpu", "householder_orthogonal fwd / torch.mm", "d = 512, batch 1, float32", 3.0, "le",
           _hh_orthogonal_vs_mm),
    Target(5, "cpu", "gram_schmidt fwd / torch.linalg.qr", "d = 576, batch 5, float32", 1.5, "le", _gs_fwd),
    Target(5, "cpu", "torch.linalg.qr + sign fix fwd+bwd (autograd) / gram_schmidt fwd+bwd",
           "d = 576, batch 5, float32", 1.0, "ge", _gs_fwd_bwd),
    Target(6, "cpu", "SVD polar / lowdin warm start (R0 = previous step's R, P moved 1e-3)",
           "d = 576, batch 5, float32", 3.0, "ge", _lowdin_warm_vs_svd),
    Target(4, "cuda", "householder_product fwd / torch.bmm", "d = k = 1024, batch 1, float32", 2.0, "le",
           _hh_product_vs_bmm),
    Target(4, "cuda", "torch.linalg.householder_product fwd / householder_product fwd",
           "d = k = 1024, batch 1, float32", 10.0, "ge",
           _hh_torch_over_ours),
    Target(4, "cuda", "torch.linalg.householder_product fwd+bwd / householder_product fwd+bwd",
           "d = k = 1024, batch 1, float32", 100.0, "ge", lambda dev: _hh_product_fwd_bwd(dev, 1024)),
    Target(4, "cuda", "householder_product fwd time", "d = 27, batch 64, float32", 10.0, "le", _hh_small_batch,
           unit="µs"),
    Target(5, "cuda", "batched torch.linalg.qr / gram_schmidt fwd", "d = 576, batch 5, float32", 10.0, "ge",
           _gs_qr_over_ours),
    Target(5, "cuda", "gram_schmidt fwd / torch.bmm", "d = 1024, batch 1, float32", 4.0, "le", _gs_vs_bmm),
    Target(6, "cuda", "SVD polar / lowdin cold start", "d = 1024, batch 5, float32", 20.0, "ge",
           _lowdin_svd_over_cold),
    Target(6, "cuda", "lowdin cold start / torch.bmm", "d = 1024, batch 5, float32", 25.0, "le",
           _lowdin_cold_vs_bmm),
    Target(6, "cuda", "lowdin warm start / torch.bmm", "d = 1024, batch 5, float32", 8.0, "le",
           _lowdin_warm_vs_bmm),
    Target(6, "cuda", "reference iteration in torch eager / lowdin (Triton)", "d = 1024, batch 5, float32", 1.3,
           "ge", _lowdin_eager_over_ours),
] + _accuracy_targets("cpu") + _accuracy_targets("cuda")


def _time_once(fn: Fn, device) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def measure(target: Target, device, seconds: float = 6.0, min_rounds: int = 3, max_rounds: int = 30) -> dict:
    """Interleaved medians of both sides; at least ``min_rounds`` rounds, then until ``seconds`` pass.
    Accuracy targets are computed once."""
    if target.metric == "accuracy":
        value, detail = target.build(device)
        return {"issue": target.issue, "device": target.device, "what": target.what, "shape": target.shape,
                "bound": target.bound, "better": target.better, "unit": target.unit, "metric": "accuracy",
                "value": value, "met": bool(value <= target.bound and detail["err_ratio"] <= 2.0), **detail}
    num, den, out = target.build(device)
    _time_once(num, device)                          # warm-up (JIT, allocator, LAPACK workspace)
    if den is not None:
        _time_once(den, device)
    tn: List[float] = []
    td: List[float] = []
    start = time.perf_counter()
    while len(tn) < max_rounds and (len(tn) < min_rounds or time.perf_counter() - start < seconds):
        tn.append(_time_once(num, device))
        if den is not None:
            td.append(_time_once(den, device))
    n_med = statistics.median(tn)
    if den is None:
        value = n_med * 1e6
        d_med = None
    else:
        d_med = statistics.median(td)
        value = n_med / d_med
    met = value <= target.bound if target.better == "le" else value >= target.bound
    rec = {"issue": target.issue, "device": target.device, "what": target.what, "shape": target.shape,
           "bound": target.bound, "better": target.better, "unit": target.unit, "value": value, "met": bool(met),
           "numerator_s": n_med, "denominator_s": d_med, "rounds": len(tn),
           "kernels": {op: opt_fast.kernel_for(op, torch.device(device).type)
                       for op in ("householder_product", "householder_orthogonal", "gram_schmidt", "lowdin")}}
    if out is not None:
        rec["orth_err"] = _orth_err(out)
    return rec


def run_targets(device, progress: Optional[Callable[[str], None]] = None, seconds: float = 6.0,
                deadline: Optional[float] = None) -> List[dict]:
    """Every target stated for this device type; those not started by ``deadline`` are marked skipped."""
    dev = torch.device(device)
    out = []
    for t in TARGETS:
        if t.device != dev.type:
            continue
        if progress:
            progress(f"target #{t.issue}: {t.what[:40]}")
        if deadline is not None and time.perf_counter() > deadline:
            out.append({"issue": t.issue, "device": t.device, "what": t.what, "shape": t.shape, "bound": t.bound,
                        "better": t.better, "unit": t.unit, "status": "skipped: time budget"})
            continue
        try:
            rec = measure(t, dev, seconds=seconds)
            rec["status"] = "ok"
        except Exception as e:   # a missing kernel or an out-of-memory is reported, not fatal
            rec = {"issue": t.issue, "device": t.device, "what": t.what, "shape": t.shape, "bound": t.bound,
                   "better": t.better, "unit": t.unit, "status": f"error: {type(e).__name__}: {e}"}
        out.append(rec)
    return out


def count(device) -> int:
    return sum(t.device == torch.device(device).type for t in TARGETS)


def rows(records: List[dict]) -> List[List[str]]:
    """Table rows: issue, ratio, shape, measured, target, met, accuracy, kernel times."""
    out = []
    for r in records:
        sign = "≤" if r["better"] == "le" else "≥"
        bound = f"{sign} {r['bound']:g}{ {'µs': ' µs', '': ''}.get(r['unit'], '×')}"
        if r.get("status") != "ok":
            out.append([f"#{r['issue']}", r["what"], r["shape"], "–", bound, r.get("status", "?"), "–", "–"])
            continue
        if r.get("metric") == "accuracy":
            out.append([f"#{r['issue']}", r["what"], r["shape"], f"{r['value']:.1e}", bound,
                        "met" if r["met"] else "NOT met", f"{r['value']:.1e}",
                        f"err ratio {r['err_ratio']:.2f} (≤ 2)"])
            continue
        value = f"{r['value']:.1f} µs" if r["unit"] == "µs" else f"{r['value']:.2f}×"
        times = f"{r['numerator_s'] * 1e3:.2f} ms" + (
            "" if r["denominator_s"] is None else f" / {r['denominator_s'] * 1e3:.2f} ms")
        acc = f"{r['orth_err']:.1e}" if "orth_err" in r else "–"
        out.append([f"#{r['issue']}", r["what"], r["shape"], value, bound, "met" if r["met"] else "NOT met", acc,
                    times])
    return out


HEADER = ["issue", "ratio", "shape", "measured", "target", "status", "‖RᵀR−I‖_F/√d", "times (median) / accuracy rule"]
