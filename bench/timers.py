"""Timers that are honest on CUDA: every measurement drains the GPU before reading the clock.

* ``synced_perf_counter``: a pytest-benchmark timer (``--benchmark-timer=bench.timers.synced_perf_counter``,
  the default in ``bench/conftest.py``). It synchronises CUDA only if CUDA is already initialised, so it
  never creates a CUDA context on a CPU-only run.
* ``measure_interleaved(fns, device)``: the report runner's loop over the implementations of one case. Per
  callable one warm-up call (JIT / compile / autotune, never the measurement), one timed call to size the
  rounds, then rounds of ``iters`` calls each, the rounds of all callables interleaved; the per-call time of
  a round is the round time / iters, and the median over rounds is reported (with the 20th and 80th
  percentiles). ``measure(fn)``: one callable. CUDA rounds are timed with CUDA events; calls within a round
  stay pipelined, as in a training step.
"""
import math
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Union

import torch


def synced_perf_counter() -> float:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
    return time.perf_counter()


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Timing:
    median_s: float
    p20_s: float
    p80_s: float
    min_s: float
    rounds: int
    iters: int            # calls per round
    first_call_s: float   # the warm-up call (includes torch.compile / Triton JIT)
    samples_s: List[float] = field(default_factory=list, repr=False)   # per round, in pass order

    def as_dict(self):
        return {k: v for k, v in self.__dict__.items() if k != "samples_s"}


def paired_ratio(a: Timing, b: Timing) -> float:
    """a's time / b's from one ``measure_interleaved`` call: the median over passes of the ratio of their
    rounds in the same pass when both ran the same number of rounds (which then fall in the same passes,
    timed seconds apart, so that a slow spell of a shared machine hits both alike), else the ratio of
    their medians."""
    if a.samples_s and len(a.samples_s) == len(b.samples_s):
        return statistics.median(x / y for x, y in zip(a.samples_s, b.samples_s))
    return a.median_s / b.median_s


@dataclass
class Budget:
    """How long to spend on one case."""
    case_s: float = 0.2         # aim for this much timed work per case
    min_rounds: int = 3
    max_rounds: int = 50
    min_round_s: float = 1e-3   # calls per round are raised until a round takes at least this long
    max_case_s: float = 10.0    # cap on timed work per case: slow calls get fewer rounds (at least 1)
    slow_call_s: float = 5.0    # a call slower than this is timed once (after the warm-up call), not repeated


class _Clock:
    def __init__(self, device):
        self.cuda = torch.device(device).type == "cuda"

    def time(self, fn: Callable, iters: int) -> float:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(iters):
                fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        return time.perf_counter() - t0


def _quantile(xs, q):
    xs = sorted(xs)
    if len(xs) == 1:
        return xs[0]
    pos = q * (len(xs) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def _plan(fn: Callable, clock: "_Clock", budget: Budget) -> dict:
    """Warm-up and sizing calls: calls per round and rounds. The warm-up call (compile, JIT, allocator, lazy
    inits: in a fresh process a first call can be 100x slower) is never the measurement."""
    first = clock.time(fn, 1)
    one = clock.time(fn, 1)
    if one >= budget.slow_call_s:   # timed once (the call after the warm-up)
        return dict(fn=fn, first=first, one=one, iters=1, rounds=0, samples=[one])
    if one < 0.05:   # size the rounds from the fastest of three calls: one call may have been preempted
        one = min(one, clock.time(fn, 1), clock.time(fn, 1))
    iters = max(1, math.ceil(budget.min_round_s / max(one, 1e-9)))
    rounds = int(budget.case_s / max(one * iters, 1e-9))
    rounds = max(budget.min_rounds, min(budget.max_rounds, rounds))
    rounds = max(1, min(rounds, int(budget.max_case_s / max(one * iters, 1e-9))))
    return dict(fn=fn, first=first, one=one, iters=iters, rounds=rounds, samples=[])


def measure_interleaved(fns: List[Callable], device="cpu", budget: Optional[Budget] = None
                        ) -> List[Union[Timing, Exception]]:
    """Time callables against each other on a shared machine: warm-up and sizing calls for each, then their
    rounds spread evenly over one sequence of passes (a pass times one round of every callable that has one
    due), so that a change of load hits them alike. A call slower than ``budget.slow_call_s`` is timed once.
    Returns, per callable, its Timing or the exception it raised (the others go on)."""
    budget = budget or Budget()
    clock = _Clock(device)
    sync(device)
    plans: List[Union[dict, Exception]] = []
    for fn in fns:
        try:
            plans.append(_plan(fn, clock, budget))
        except Exception as e:
            plans.append(e)
    passes = max([p["rounds"] for p in plans if isinstance(p, dict)], default=0)
    for r in range(passes):
        for i, p in enumerate(plans):
            if isinstance(p, dict) and (r + 1) * p["rounds"] // passes > r * p["rounds"] // passes:
                try:
                    p["samples"].append(clock.time(p["fn"], p["iters"]) / p["iters"])
                except Exception as e:
                    plans[i] = e
    return [p if isinstance(p, Exception) else
            Timing(statistics.median(p["samples"]), _quantile(p["samples"], 0.2), _quantile(p["samples"], 0.8),
                   min(p["samples"]), max(p["rounds"], 1), p["iters"], p["first"], list(p["samples"]))
            for p in plans]


def measure(fn: Callable, device="cpu", budget: Optional[Budget] = None) -> Timing:
    """One callable on its own (see ``measure_interleaved``); raises what it raised."""
    t = measure_interleaved([fn], device, budget)[0]
    if isinstance(t, Exception):
        raise t
    return t


def flushed_l2_time(fn: Callable, device, rounds: int = 10, flush_bytes: int = 256 << 20) -> Optional[float]:
    """CUDA only: median time of single calls, each after overwriting a buffer larger than L2."""
    if torch.device(device).type != "cuda":
        return None
    buf = torch.empty(flush_bytes // 4, dtype=torch.float32, device=device)
    clock = _Clock(device)
    times = []
    for _ in range(rounds):
        buf.zero_()
        times.append(clock.time(fn, 1))
    return statistics.median(times)


def peak_memory_bytes(fn: Callable, device) -> Optional[int]:
    """CUDA only: peak allocated memory during one call, above what was allocated before it."""
    if torch.device(device).type != "cuda":
        return None
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - base
