"""The training CLIs' one-line refusals that both workflows (CNN and LM) share: the error itself, the thread,
seed and device checks, what a training step that raised inside an op ends with, and how --compare records
a run that failed."""
import os
import sys
from typing import Optional

import torch
from torch import nn


PREFIX = "opt_fast.train: error: "


def fail(msg: str):
    raise SystemExit(PREFIX + msg)


MAX_THREADS = 1024   # past any machine; torch's set_num_threads(100000) ends in a MemoryError


def check_threads(threads: Optional[int]) -> None:
    if threads is not None and not 0 <= threads <= MAX_THREADS:
        fail(f"--threads must be in 1..{MAX_THREADS} (0 or unset: the default), got {threads}")


def check_seed(seed: int) -> None:
    if not 0 <= seed < 2**32:   # numpy's (and torch's manual_seed's portable) range
        fail(f"--seed must be in 0..{2**32 - 1}, got {seed}")


def check_device(name: str) -> None:
    """--device must parse as a torch device and be available here (one-line error otherwise)."""
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError, TypeError):
        fail(f"--device {name!r} is not a torch device; use cpu, cuda or cuda:N")
    if dev.type == "cpu":
        return
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            fail(f"--device {name} requested but CUDA is not available; use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            fail(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s) (cuda:0.."
                 f"cuda:{torch.cuda.device_count() - 1})")
        return
    if dev.type == "mps" and getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return
    fail(f"--device {name}: not available here; use cpu, cuda or cuda:N")


def step_failed(phase: str, where: str, method: str, e: BaseException, model: nn.Module,
                checkpoint: Optional[str]):
    """One line for an op that raised inside a training step (LinAlgError, RuntimeError such as a rank-deficient
    P in gram_schmidt's backward): diverged (non-finite parameters) or the op failed on finite ones; the last
    checkpoint, if any, is left as it was."""
    finite = all(bool(torch.isfinite(p).all()) for p in model.parameters())
    first = (str(e).splitlines() or [type(e).__name__])[0]
    kept = (f"; the last checkpoint, {checkpoint}, is kept"
            if checkpoint and os.path.isfile(checkpoint) else "")
    fail(f"the {phase} failed at {where} (method {method}): {first} " + (
        "The parameters are finite: the op failed on them (training may be diverging); lower --lr, raise the "
        "warm-up, or another --seed / --init avoids that matrix" if finite else
        "Some parameters are no longer finite (training diverged): lower --lr or raise the warm-up") + kept)


def run_recorded(name: str, run, failed: dict):
    """``run()`` for one entry of a --compare; a run that fails (a refusal, e.g. a diverged loss, or an
    unexpected error) is recorded in ``failed[name]`` as one line and the comparison goes on: returns None."""
    try:
        return run()
    except SystemExit as e:
        print(e.code, file=sys.stderr)
        failed[name] = str(e.code).removeprefix(PREFIX)  # the table and the summary add their own context
    except Exception as e:
        failed[name] = f"{name} failed with {type(e).__name__}: {(str(e).splitlines() or [''])[0]}"
        print(PREFIX + failed[name], file=sys.stderr)
    return None
