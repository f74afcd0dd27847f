"""Text and markdown tables for the report."""
from typing import Dict, List, Optional

import torch

from . import cases as C


def fmt_us(t_s: Optional[float]) -> str:
    if t_s is None:
        return "–"
    us = t_s * 1e6
    if us < 10:
        return f"{us:.2f}"
    if us < 1000:
        return f"{us:.1f}"
    return f"{us:,.0f}"


def fmt_x(v: Optional[float], digits: int = 2) -> str:
    return "–" if v is None else f"{v:.{digits}f}×"


def fmt_err(v) -> str:
    if v is None:
        return "–"
    if isinstance(v, str):
        return v
    return f"{v:.1e}"


def text_table(header: List[str], rows: List[List[str]], align: str = "") -> str:
    """Plain fixed-width table; ``align`` is a string of 'l'/'r' per column (default: first l, rest r)."""
    align = align or "l" + "r" * (len(header) - 1)
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]

    def line(cells):
        return "  ".join(str(c).ljust(w) if a == "l" else str(c).rjust(w)
                         for c, w, a in zip(cells, widths, align))
    return "\n".join([line(header), "  ".join("-" * w for w in widths)] + [line(r) for r in rows])


def md_table(header: List[str], rows: List[List[str]]) -> str:
    def esc(c):
        return str(c).replace("|", "\\|")
    out = ["| " + " | ".join(map(esc, header)) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(map(esc, r)) + " |" for r in rows]
    return "\n".join(out)


DETAIL_HEADER = ["impl", "kind", "µs (p20–p80)", "t/t_bmm", "speed-up", "GFLOP/s", "accuracy", "err vs fp64 ref",
                 "notes"]


def detail_rows(recs: List[Dict]) -> List[List[str]]:
    rows = []
    for r in recs:
        ok = r.get("status") == "ok"
        notes = []
        if r.get("kernel"):
            notes.append(f"kernel: {r['kernel']}")
        if r.get("approx"):
            notes.append("approximate")
        field, bound = C.gate(r["op"], getattr(torch, r["dtype"]))
        value = r.get(field)
        if ok and r.get("kind") != "yardstick" and isinstance(value, float) and value > bound:
            notes.append(f"**does not meet the accuracy bar** ({C.gate_label(r['op'])} ≤ {bound:g})")
        if r.get("baseline"):
            notes.append("built-in baseline")
        if r.get("note"):
            notes.append(r["note"])
        if ok and r.get("rounds") == 1:
            notes.append("timed once (slow)")
        if r.get("impl") == r.get("best_builtin"):
            notes.insert(0, "**best built-in**")
        if r.get("impl") == r.get("best_peer"):
            notes.insert(0, "**best peer**")
        t = (f"{fmt_us(r['t_s'])} ({fmt_us(r['t_p20_s'])}–{fmt_us(r['t_p80_s'])})" if ok
             else r.get("status", "?"))
        rows.append([r["impl"], r["kind"], t, fmt_x(r.get("ratio_bmm"), 1) if ok else "",
                     fmt_x(r.get("speedup")) if ok else "", f"{r['gflops']:.1f}" if ok else "",
                     fmt_err(r.get("accuracy")), fmt_err(r.get("err_ref")), "; ".join(notes)])
    return rows


def groups(records: List[Dict]):
    """Records grouped by benchmark group, in order."""
    out: Dict[str, List[Dict]] = {}
    for r in records:
        out.setdefault(r["group"], []).append(r)
    return out


def e2e_rows(e2e: Dict) -> List[List[str]]:
    rows = []
    for m, e in e2e.get("methods", {}).items():
        ok = e.get("status") == "ok"
        met = e.get("met")
        rows.append([m, f"{e['step_s'] * 1e3:,.0f}" if ok else e.get("status", "?"),
                     f"{e2e['plain_s'] * 1e3:,.0f}" if e2e.get("plain_s") else "–",
                     fmt_x(e.get("ratio")), f"≤ {e['target']}×" if e.get("target") else "–",
                     "–" if met is None else ("met" if met else "not met")])
    return rows


E2E_HEADER = ["method", "OPT step ms", "plain step ms", "OPT / plain", "target", "target met?"]


def layer_rows(ls: Dict) -> List[List[str]]:
    rows = []
    for m, e in ls.get("methods", {}).items():
        ok = e.get("status") == "ok"
        rows.append([m, f"{e['t_s'] * 1e3:,.1f}" if ok else e.get("status", "?"),
                     fmt_x(e.get("ratio_bmm"), 1) if ok else ""])
    return rows


LAYER_HEADER = ["method", "R fwd+bwd ms (whole set)", "t / Σ t_bmm"]
ACCURACY_NOTE = (f"accuracy = {C.DEFAULT_ACCURACY_LABEL} (max over the batch, float64); for householder_apply "
                 f"{C.ACCURACY_LABEL['householder_apply']}")
