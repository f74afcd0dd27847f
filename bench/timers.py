"""Timers that are honest on CUDA: every measurement drains the GPU before reading the clock.

* ``synced_perf_counter``: a pytest-benchmark timer (``--benchmark-timer=bench.timers.synced_perf_counter``,
  the default in ``bench/conftest.py``). It synchronises CUDA only if CUDA is already initialised, so it
  never creates a CUDA context on a CPU-only run.
* ``measure(fn, device)``: the report runner's loop. One warm-up call (JIT / compile / autotune), one timed
  call to size the rounds, then rounds of ``iters`` calls each; the per-call time of a round is the round
  time / iters, and the median over rounds is reported (with the 20th and 80th percentiles). CUDA rounds are
  timed with CUDA events; calls within a round stay pipelined, as in a training step.
"""
import math
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Optional

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

    def as_dict(self):
        return dict(self.__dict__)


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


def measure(fn: Callable, device="cpu", budget: Optional[Budget] = None) -> Timing:
    """The warm-up call (compile, JIT, lazy inits) is never the measurement."""
    budget = budget or Budget()
    clock = _Clock(device)
    sync(device)
    first = clock.time(fn, 1)                          # warm-up: compile, JIT, allocator, lazy inits
    one = clock.time(fn, 1)                            # never the warm-up: it can be 100x slower in a fresh process
    if one >= budget.slow_call_s:
        return Timing(one, one, one, one, 1, 1, first)
    if one < 0.05:   # size the rounds from the fastest of three calls: one call may have been preempted
        one = min(one, clock.time(fn, 1), clock.time(fn, 1))
    iters = max(1, math.ceil(budget.min_round_s / max(one, 1e-9)))
    rounds = int(budget.case_s / max(one * iters, 1e-9))
    rounds = max(budget.min_rounds, min(budget.max_rounds, rounds))
    rounds = max(1, min(rounds, int(budget.max_case_s / max(one * iters, 1e-9))))
    per_call = [clock.time(fn, iters) / iters for _ in range(rounds)]
    return Timing(statistics.median(per_call), _quantile(per_call, 0.2), _quantile(per_call, 0.8),
                  min(per_call), rounds, iters, first)


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
