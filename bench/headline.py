"""The report's headline: one line per (op, shape that OPT or POET uses) with opt_fast, the best torch
built-in and the best peer, both speed-ups and the accuracy of each.

Each op is timed in the mode it is used in: forward + backward for the maps OPT and the block layers train
through, forward for ``orthogonalize_approx`` (an optimizer's update). "Best" is the fastest that meets the
accuracy gate (``cases.gate``: ‖RᵀR − I‖_F/√d ≤ 1e-5 in float32 for the exact maps, the error against the
same map in float64 ≤ 1e-4 for the approximate ones); if none does, the fastest that ran, marked ✗. The headline's
cases run first in a report, with no time cap (``HEADLINE_BUDGET`` keeps their repeat counts small), so that
none of them is ever "skipped"; a cell that cannot be measured says why in words.
"""
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch

from . import cases as C
from . import impls as I
from .shapes import HEADLINE_SHAPES, Shape
from .tables import fmt_err
from .timers import Budget

# per impl: up to 30 rounds and 0.3 s of timed calls, interleaved with the row's other impls; a call slower
# than 0.5 s is timed once (the call after its warm-up). Rounds last ≥ 20 ms: on a loaded machine a round of
# 1 ms is either preempted or not, and the median of such a bimodal sample can land on either mode (measured:
# lowdin d=27 at 2.55 ms against 0.6 ms at its 20th percentile); a 20 ms round averages the preemption.
HEADLINE_BUDGET = Budget(case_s=0.3, min_rounds=3, max_rounds=30, min_round_s=0.02, max_case_s=1.0,
                         slow_call_s=0.5)
# a row's peer cell when no peer package offers the map at all
NO_PEER = {"gram_schmidt": "no peer package offers a QR / Gram–Schmidt map",
           "householder_apply": "no peer applies reflectors without forming the matrix"}


@dataclass(frozen=True)
class Row:
    op: str
    shape: Shape
    mode: str
    dtype: torch.dtype = torch.float32

    @property
    def group(self) -> str:
        return f"{self.op} {self.mode} {self.shape.label} {C.dtype_name(self.dtype)}"

    @property
    def label(self) -> str:
        """The shape and who uses it, e.g. "d=576 b=5 (CNN-6 3×3 convs, one call)"."""
        return f"{self.shape.label} ({self.shape.tag})" if self.shape.tag else self.shape.label


def rows(size: str, ops=C.OPS) -> List[Row]:
    h = HEADLINE_SHAPES[size]
    out: List[Row] = []
    for op in ops:
        if op == "householder_apply":
            shapes = [h["apply_first"], h["apply_group"]]
        elif op == "cayley":
            shapes = [h["first"], h["group"], *h["blocks"]]
        elif op == "cayley_neumann":
            shapes = list(h["blocks"])
        else:
            shapes = [h["first"], h["group"]]
        mode = "fwd" if op == "orthogonalize_approx" else "fwd+bwd"
        out += [Row(op, s, mode) for s in shapes]
    return out


def in_headline(impl: I.Impl) -> bool:
    """opt_fast's own entry point, the torch built-ins that are baselines, and the peers."""
    return impl.name == "opt_fast" or impl.kind == "peer" or (impl.kind == "torch" and impl.baseline)


def cases(size: str, ops=C.OPS) -> List[C.Case]:
    return [C.Case(r.op, impl, r.shape, r.dtype, r.mode)
            for r in rows(size, ops) for impl in I.IMPLS[r.op] if in_headline(impl)]


# ---- the table ----------------------------------------------------------------------------------------

def fmt_time(t_s: Optional[float]) -> str:
    if t_s is None:
        return "–"
    if t_s < 1e-3:
        return f"{t_s * 1e6:.3g} µs"
    if t_s < 1.0:
        return f"{t_s * 1e3:.3g} ms"
    return f"{t_s:.3g} s"


def fmt_speedup(v: Optional[float]) -> str:
    return "–" if v is None else (f"**{v:.2f}×**" if v >= 1 else f"{v:.2f}×")


def _alternative(r: Dict, which: str) -> str:
    name, note = r.get(f"best_{which}"), r.get(f"best_{which}_note")
    if name is None:
        return f"– ({note})" if note else "–"
    flag = " ✗" if note == "fails the accuracy gate" else ""
    return f"{name}{flag}: {fmt_time(r.get(f'best_{which}_t_s'))}"


def _ours(r: Dict) -> str:
    if r.get("status") == "ok":
        return fmt_time(r["t_s"])
    return f"not measured ({str(r.get('status', '?')).removeprefix('n/a: ')})"


HEADER = ["op", "shape", "mode", "opt_fast", "best torch built-in", "best peer", "speed-up vs built-in",
          "speed-up vs peer", "accuracy: opt_fast / built-in / peer"]


def table_rows(records: List[Dict], size: str, ops=C.OPS) -> List[List[str]]:
    ours = {r["group"]: r for r in records if r["impl"] == "opt_fast"}
    has_peer = {op: any(i.kind == "peer" for i in I.IMPLS[op]) for op in ops}
    out = []
    for row in rows(size, ops):
        r = ours.get(row.group)
        if r is None:
            continue
        peer = _alternative(r, "peer") if has_peer[row.op] else f"– ({NO_PEER.get(row.op, 'none')})"
        field = C.gate(row.op, row.dtype)[0]
        acc = " / ".join(fmt_err(v) for v in (r.get(field), r.get("best_builtin_accuracy"),
                                              r.get("best_peer_accuracy")))
        if field == "err_ref":
            acc += " (vs fp64 map)"
        out.append([row.op, row.label, row.mode, _ours(r), _alternative(r, "builtin"), peer,
                    fmt_speedup(r.get("speedup")), fmt_speedup(r.get("speedup_peer")), acc])
    return out


def unmeasured(records: List[Dict], size: str, ops=C.OPS) -> List[str]:
    """Headline cells that carry no time, with why: a report checks this list (and a test)."""
    bad = []
    heads = {(c.group, c.impl.name) for c in cases(size, ops)}
    for r in records:
        if (r["group"], r["impl"]) in heads and str(r.get("status", "")).startswith("skipped"):
            bad.append(f"{r['group']} {r['impl']}: {r['status']}")
    return bad


NOTE = ("Speed-up = the alternative's time / opt_fast's (> 1: opt_fast is faster). Each alternative is the "
        "fastest of its kind that meets the accuracy gate (‖RᵀR − I‖_F/√d ≤ 1e-5 in float32; for the "
        "approximate maps orthogonalize_approx and cayley_neumann, the error against the same map in float64 "
        "≤ 1e-4); ✗ marks one that fails it (then the fastest that ran). Peers: geotorch, torch's "
        "parametrizations.orthogonal, PEFT's OFT, torch.optim.Muon's Newton–Schulz, torch-householder "
        f"(bench/peers.py). cayley_neumann: {I.PE.NEUMANN_TERMS} terms in our count = PEFT's "
        f"num_cayley_neumann_terms={I.PE.PEFT_NEUMANN_TERMS}.")


def speedup_points(records: List[Dict], size: str, ops=C.OPS) -> List[Dict]:
    """Per headline row: the speed-up over the best alternative (the faster of the best built-in and the best
    peer, preferring one that meets the gate) and who it is: what the headline plot draws."""
    ours = {r["group"]: r for r in records if r["impl"] == "opt_fast"}
    pts = []
    for row in rows(size, ops):
        r = ours.get(row.group)
        if r is None:
            continue
        label = f"{row.op} {row.shape.label} {row.mode}"   # the plot's y labels: short
        alts = []
        for which in ("builtin", "peer"):
            if r.get(f"best_{which}_t_s") is not None:
                gated = r.get(f"best_{which}_note") is None
                who = "torch built-in" if which == "builtin" else (r.get("best_peer_package") or "peer")
                alts.append((not gated, r[f"best_{which}_t_s"], who, r[f"best_{which}"]))
        if r.get("status") != "ok" or not alts:
            pts.append({"label": label, "speedup": None,
                        "why": r.get("status") if r.get("status") != "ok" else "no alternative ran"})
            continue
        failed, t, who, name = min(alts)
        pts.append({"label": label, "speedup": t / r["t_s"], "who": who, "name": name, "gated": not failed})
    return pts
