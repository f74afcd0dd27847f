"""The report's timing loop over ``bench.cases`` (no pytest): one record (a dict) per case.

Cases sharing inputs (op, shape, dtype) run together: inputs are made once, the implementations of each
mode are timed against each other (interleaved rounds: a change of load on a shared machine hits them
alike), and afterwards every record of the group gets ``t_bmm_s``, ``ratio_bmm``, the best torch built-in and
the best peer that meet the accuracy gate (``cases.meets_gate``) and the speed-ups over them. Cases measured
earlier in the run (the headline's, ``done``) are not timed again: their records join their groups.
"""
import math
import time
from typing import Callable, Dict, List, Optional

import torch

from . import cases as C
from .timers import Budget, flushed_l2_time, measure_interleaved, peak_memory_bytes


def _err(e: BaseException) -> str:
    msg = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
    return f"{type(e).__name__}: {msg}" if msg else type(e).__name__


def _finite(v: Optional[float]):
    return v if v is None or math.isfinite(v) else str(v)   # JSON-safe: "nan" / "inf" as strings


def _prepare(case: C.Case, x, device):
    """The case's Prepared, or the status saying why it cannot run."""
    try:
        return C.prepare(case, x, device)
    except C.Unavailable as e:
        return "not installed" if str(e) == "not installed" else f"n/a: {e}"
    except Exception as e:
        return f"error: {_err(e)}"


def _record(case: C.Case, prepared: C.Prepared, t, x, device, ref: Callable[[], Optional[torch.Tensor]]) -> Dict:
    """The measured record (time, accuracy, error against the float64 reference), or its failure."""
    if isinstance(t, NotImplementedError):
        return {"status": f"not implemented: {_err(t)}"}
    if isinstance(t, Exception):
        if torch.device(device).type == "cuda":
            torch.cuda.empty_cache()
        return {"status": f"error: {_err(t)}"}
    rec = {"status": "ok", "t_s": t.median_s, "t_p20_s": t.p20_s, "t_p80_s": t.p80_s, "t_min_s": t.min_s,
           "rounds": t.rounds, "iters": t.iters, "first_call_s": t.first_call_s}
    out = prepared.output
    if case.impl.kind != "yardstick" and out is not None:
        rec["accuracy"] = _finite(C.accuracy(case.op, out, x))
        r = ref() if case.impl.same_map else None
        if r is not None and out.shape == r.shape:
            rec["err_ref"] = _finite(C.ref_error(out, r))
    if torch.device(device).type == "cuda" and t.median_s < 0.5:
        rec["t_flushed_s"] = flushed_l2_time(prepared.run, device)
        rec["peak_mem_bytes"] = peak_memory_bytes(prepared.run, device)
    return rec


def run_group_mode(cases: List[C.Case], recs: List[Dict], x, device, budget: Budget, ref) -> None:
    """The cases of one input group and mode, timed against each other (``measure_interleaved``)."""
    ready = []
    for case, rec in zip(cases, recs):
        p = _prepare(case, x, device)
        if isinstance(p, str):
            rec["status"] = p
        else:
            ready.append((case, rec, p))
    timings = measure_interleaved([p.run for _, _, p in ready], device, budget)
    for (case, rec, p), t in zip(ready, timings):
        rec.update(_record(case, p, t, x, device, ref))


def best_of(recs: List[Dict]):
    """(the fastest record meeting the accuracy gate, or the fastest that ran; note): the note says "no X ran"
    (with each one's status) or "fails the accuracy gate"."""
    ran = [r for r in recs if r.get("status") == "ok"]
    if not ran:
        why = "; ".join(f"{r['impl']}: {str(r.get('status', '?')).removeprefix('n/a: ')}" for r in recs)
        return None, why or "none for this op"
    ok = [r for r in ran if C.meets_gate(r)]
    return min(ok or ran, key=lambda r: r["t_s"]), (None if ok else "fails the accuracy gate")


# the record fields each comparison fills: (name, its time, note, speed-up over it)
ALTERNATIVES = {"builtin": ("best_builtin", "best_builtin_t_s", "best_builtin_note", "speedup"),
                "peer": ("best_peer", "best_peer_t_s", "best_peer_note", "speedup_peer")}


def _derive(group: List[Dict]) -> None:
    """Fill t_bmm / ratio_bmm / best built-in / best peer / speed-ups for the records of one input group."""
    for mode in C.MODES:
        recs = [r for r in group if r["mode"] == mode]
        yard = [r for r in recs if r["kind"] == "yardstick" and r.get("status") == "ok"]
        t_bmm = yard[0]["t_s"] if yard else None
        best = {"builtin": best_of([r for r in recs if r["baseline"]]),
                "peer": best_of([r for r in recs if r["kind"] == "peer"])}
        for r in recs:
            r["t_bmm_s"] = t_bmm
            for which, (name, t, note, speedup) in ALTERNATIVES.items():
                rec, why = best[which]
                r[note] = why
                if rec is not None:
                    r[name], r[t], r[name + "_package"] = rec["impl"], rec["t_s"], rec.get("package")
                    r[name + "_accuracy"] = rec.get(C.gate(rec["op"], getattr(torch, rec["dtype"]))[0])
            if r.get("status") != "ok":
                continue
            r["gflops"] = r["flops"] / r["t_s"] / 1e9
            if t_bmm:
                r["ratio_bmm"] = r["t_s"] / t_bmm
            for which, (name, t, note, speedup) in ALTERNATIVES.items():
                if best[which][0] is not None:
                    r[speedup] = r[t] / r["t_s"]


def run_cases(case_list: List[C.Case], device, budget: Budget, progress=None,
              deadline: Optional[float] = None, done: Optional[Dict[str, Dict]] = None) -> List[Dict]:
    """Run every case; once ``deadline`` (a perf_counter value) passes, the rest are marked skipped. Cases
    whose id is in ``done`` keep that record (measured earlier) and are not run again."""
    records: List[Dict] = []
    done = done or {}
    for (op, _, dtype), group in C.iter_groups(case_list):
        recs = [dict(done[c.id]) if c.id in done else C.describe(c, device) for c in group]
        pending = [c for c in group if c.id not in done]
        over = not pending or (deadline is not None and time.perf_counter() > deadline)
        x = None
        if not over:
            try:
                x = C.make_inputs(op, group[0].shape, dtype, device)
            except Exception as e:
                for c, r in zip(group, recs):
                    if c.id not in done:
                        r["status"] = f"error: inputs: {_err(e)}"
        cache: Dict[str, Optional[torch.Tensor]] = {}

        def ref(op=op, shape=group[0].shape, x=x, cache=cache):
            if "r" not in cache:
                try:
                    cache["r"] = C.reference64(op, shape, x)
                except Exception:
                    cache["r"] = None
            return cache["r"]

        for mode in C.MODES:
            mine = [(c, r) for c, r in zip(group, recs) if c.mode == mode and c.id not in done]
            todo = [(c, r) for c, r in mine if "status" not in r]
            if x is None or (deadline is not None and time.perf_counter() > deadline):
                for _, r in todo:
                    r["status"] = "skipped: time budget"
            elif todo:
                run_group_mode([c for c, _ in todo], [r for _, r in todo], x, device, budget, ref)
            if progress is not None and mine:
                progress.step(f"{op} {mode} {group[0].shape.label}", n=len(mine))
        _derive(recs)
        records.extend(recs)
        del x, cache, ref
        if torch.device(device).type == "cuda":
            torch.cuda.empty_cache()
    return records
