"""Which kernel serves each op on each device, and the environment policy for loading them.

Dispatch: CPU -> C++ kernel if built, else reference. CUDA -> C++ CUDA kernel, else Triton, else
reference. ``OPT_FAST_DISABLE_EXT=1`` forces the references; ``OPT_FAST_REQUIRE_EXT=1`` (CI) turns a
missing or broken extension into an import error instead of a warning.
"""
import os
from typing import Callable, Dict, Optional, Set

import torch

from ._ops import ALL_OPS

ext_error: Optional[BaseException] = None   # why opt_fast._C did not load, if it did not
triton_ops: Set[str] = set()                # ops whose CUDA kernel is a Triton launcher
# functional.orthogonalize_approx's CUDA kernel when Triton is available (set by _register, so that
# functional never imports opt_fast.triton_kernels, which imports functional)
triton_approx: Optional[Callable[[torch.Tensor, int], torch.Tensor]] = None


def env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def has_kernel(op: str, key: str) -> bool:
    """True if ``opt_fast::<op>`` has a kernel of its own for dispatch key ``key`` ("CPU", "CUDA")."""
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"opt_fast::{op}", key)


def kernel_for(op: str, device: str) -> str:
    """A short name of the kernel that serves ``op`` on ``device`` ("cpu" or "cuda")."""
    if device == "cpu":
        return "C++" if has_kernel(op, "CPU") else "reference"
    if device == "cuda":
        if op in triton_ops:
            return "Triton"
        return "CUDA C++" if has_kernel(op, "CUDA") else "reference"
    raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")


def backend_table() -> Dict[str, Dict[str, str]]:
    return {op: {dev: kernel_for(op, dev) for dev in ("cpu", "cuda")} for op in ALL_OPS}


def backend_report(file=None) -> str:
    """Print (and return) which kernel serves each op on CPU and on CUDA."""
    rows = backend_table()
    width = max(len(op) for op in rows)
    lines = [f"{'op':<{width}}  {'cpu':<10} cuda", f"{'-' * width}  {'-' * 10} {'-' * 10}"]
    lines += [f"{op:<{width}}  {k['cpu']:<10} {k['cuda']}" for op, k in rows.items()]
    if ext_error is not None:
        lines.append(f"(opt_fast._C not loaded: {ext_error})")
    elif env_flag("OPT_FAST_DISABLE_EXT"):
        lines.append("(OPT_FAST_DISABLE_EXT=1: references only)")
    text = "\n".join(lines)
    print(text, file=file)
    return text
