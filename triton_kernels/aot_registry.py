"""The registry of the ahead-of-time compile check (aot.py): the launcher calls to compile (``case``) and the
arguments each kernel writes (``register_kernel``), filled by aot_cases.py. A module of its own so that
aot_cases.py and aot.py both import it without importing each other."""
import dataclasses
from typing import Callable, Dict, List, Sequence, Tuple

import torch


@dataclasses.dataclass
class Case:
    name: str
    fn: Callable[[int, torch.dtype], None]   # fn(size, dtype): call the launchers on CPU tensors
    sizes: Tuple[int, ...]
    dtypes: Tuple[torch.dtype, ...]


CASES: List[Case] = []
_OUTPUTS: Dict[str, Tuple[str, ...]] = {}


def case(name: str, *, sizes: Sequence[int], dtypes: Sequence[torch.dtype]):
    """Register ``fn(size, dtype)`` as a compile case, called once per size × dtype × target."""
    def deco(fn):
        CASES.append(Case(name, fn, tuple(sizes), tuple(dtypes)))
        return fn
    return deco


def register_kernel(jit_fn, *outputs: str) -> None:
    """Name the arguments a @triton.jit kernel writes: the stub zero-fills them at every launch. The kernel's
    name must contain "opt_fast": scripts/gpu_run.sh instruments only such kernels under compute-sanitizer."""
    name = jit_fn.fn.__name__
    if "opt_fast" not in name:
        raise ValueError(f"Triton kernel {name!r}: name it with 'opt_fast' in it (the sanitizer's kernel filter)")
    _OUTPUTS[name] = outputs
