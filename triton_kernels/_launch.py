"""What every launcher of this package shares: the launch device, dtype codes, and launch configs as data.

A ``Launch`` is one compile variant of a kernel: its compile-time arguments plus ``num_warps`` /
``num_stages``. Each kernel module exposes a function returning the ``Launch`` its launcher picks for a
given problem, and ``aot_cases()`` listing the variants to compile ahead of time (scripts/
check_triton_compile.py compiles them for sm_80 / sm_90 and reports registers, spills, shared memory).
"""
import contextlib
from typing import Dict, NamedTuple, Optional

import torch

# Triton signature type of each tensor dtype (ahead-of-time compilation needs them spelled out).
TRITON_TYPE = {torch.float32: "fp32", torch.float64: "fp64", torch.float16: "fp16", torch.bfloat16: "bf16",
               torch.int64: "i64"}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


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


def device_guard(t: torch.Tensor):
    """Launch on the input's device (Triton launches on the current device and its current stream): the
    same rule as torch's own CUDA ops. A no-op for CPU tensors (the interpreter)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def f32_precision(dtype: torch.dtype) -> str:
    """tl.dot input precision: the package's float32 choice (matmul.F32_PRECISION, "ieee" unless the
    environment says otherwise), "ieee" for float64."""
    from .matmul import F32_PRECISION

    return F32_PRECISION if dtype == torch.float32 else "ieee"
