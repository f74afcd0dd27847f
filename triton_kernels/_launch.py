"""Launch configs as data, shared by the block-op launchers.

A ``Launch`` is one compile variant of a kernel: its compile-time arguments plus ``num_warps`` /
``num_stages``. Each kernel module exposes the function that returns the ``Launch`` its launcher picks for
a problem (tests read them; the ahead-of-time compile check, aot_cases.py, reaches every variant through
the launchers themselves).
"""
from typing import Dict, NamedTuple, Optional

import torch


class Launch(NamedTuple):
    constexprs: Dict[str, object]
    num_warps: int
    num_stages: int = 1
    # ptxas register cap (Triton's ``maxnreg``). Set where ptxas's own choice spills: with .reqntid and no
    # cap it aims at a register count for occupancy and spills a few words rather than exceed it.
    maxnreg: Optional[int] = None

    def options(self) -> Dict[str, int]:
        """The launch / compile options: kernel[grid](..., **constexprs, **options())."""
        opts = dict(num_warps=self.num_warps, num_stages=self.num_stages)
        if self.maxnreg is not None:
            opts["maxnreg"] = self.maxnreg
        return opts


def f32_precision(dtype: torch.dtype) -> str:
    """tl.dot input precision: the package's float32 choice (matmul.F32_PRECISION, "ieee" unless the
    environment says otherwise), "ieee" for float64."""
    from .matmul import F32_PRECISION

    return F32_PRECISION if dtype == torch.float32 else "ieee"
