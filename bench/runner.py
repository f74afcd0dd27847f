"""The report's timing loop over ``bench.cases`` (no pytest): one record (a dict) per case.

Cases sharing inputs (op, shape, dtype) run together: inputs are made once, the torch.bmm yardstick runs
first, and afterwards every record of the group gets ``t_bmm_s``, ``ratio_bmm``, the best torch built-in
that meets the accuracy gate and the speed-up over it.
"""
import math
import time
from typing import Callable, Dict, List, Optional

import torch

from . import cases as C
from .timers import Budget, flushed_l2_time, measure, peak_memory_bytes


def _err(e: BaseException) -> str:
    msg = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
    return f"{type(e).__name__}: {msg}" if msg else type(e).__name__


def _finite(v: Optional[float]):
    return v if v is None or math.isfinite(v) else str(v)   # JSON-safe: "nan" / "inf" as strings


def run_case(case: C.Case, x, device, budget: Budget, ref: Callable[[], Optional[torch.Tensor]]) -> Dict:
    try:
        prepared = C.prepare(case, x, device)
    except C.Unavailable as e:
        return {"status": "not installed" if str(e) == "not installed" else f"n/a: {e}"}
    except Exception as e:
        return {"status": f"error: {_err(e)}"}
    try:
        t = measure(prepared.run, device, budget, compiled=case.impl.kind == "compiled")
    except NotImplementedError as e:
        return {"status": f"not implemented: {_err(e)}"}
    except Exception as e:
        if torch.device(device).type == "cuda":
            torch.cuda.empty_cache()
        return {"status": f"error: {_err(e)}"}
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


def _derive(group: List[Dict], dtype) -> None:
    """Fill t_bmm / ratio_bmm / best built-in / speed-up for the records of one input group."""
    for mode in C.MODES:
        recs = [r for r in group if r["mode"] == mode]
        yard = [r for r in recs if r["kind"] == "yardstick" and r.get("status") == "ok"]
        t_bmm = yard[0]["t_s"] if yard else None
        gate = C.GATE.get(dtype, 1e-5)
        ran = [r for r in recs if r["baseline"] and r.get("status") == "ok"]
        ok_base = [r for r in ran if isinstance(r.get("accuracy"), float) and r["accuracy"] <= gate]
        # the fastest built-in meeting the gate; if none does, the fastest that ran, flagged
        best = min(ok_base or ran, key=lambda r: r["t_s"]) if ran else None
        for r in recs:
            r["t_bmm_s"] = t_bmm
            if best is None:
                r["best_builtin_note"] = "no built-in ran"
            elif not ok_base:
                r["best_builtin_note"] = "fails the accuracy gate"
            if r.get("status") != "ok":
                continue
            r["gflops"] = r["flops"] / r["t_s"] / 1e9
            if t_bmm:
                r["ratio_bmm"] = r["t_s"] / t_bmm
            if best is not None:
                r["best_builtin"] = best["impl"]
                r["best_builtin_t_s"] = best["t_s"]
                r["speedup"] = best["t_s"] / r["t_s"]


def run_cases(case_list: List[C.Case], device, budget: Budget, progress=None,
              deadline: Optional[float] = None) -> List[Dict]:
    """Run every case; once ``deadline`` (a perf_counter value) passes, the rest are marked skipped."""
    records: List[Dict] = []
    for (op, _, dtype), group in C.iter_groups(case_list):
        recs = [C.describe(c, device) for c in group]
        over = deadline is not None and time.perf_counter() > deadline
        x = None
        if not over:
            try:
                x = C.make_inputs(op, group[0].shape, dtype, device)
            except Exception as e:
                for r in recs:
                    r["status"] = f"error: inputs: {_err(e)}"
        cache: Dict[str, Optional[torch.Tensor]] = {}

        def ref(op=op, shape=group[0].shape, x=x, cache=cache):
            if "r" not in cache:
                try:
                    cache["r"] = C.reference64(op, shape, x)
                except Exception:
                    cache["r"] = None
            return cache["r"]

        for case, rec in zip(group, recs):
            if progress is not None:
                progress.step(f"{case.op} {case.mode} {case.shape.label} {case.impl.name}")
            if "status" in rec:
                continue
            if x is None or (deadline is not None and time.perf_counter() > deadline):
                rec["status"] = "skipped: time budget"
                continue
            rec.update(run_case(case, x, device, budget, ref))
        _derive(recs, dtype)
        records.extend(recs)
        del x, cache, ref
        if torch.device(device).type == "cuda":
            torch.cuda.empty_cache()
    return records
