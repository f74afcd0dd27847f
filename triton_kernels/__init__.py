"""Triton kernels, installed as ``opt_fast.triton_kernels``.

``LAUNCHERS`` maps an op name to a launcher with the op's signature; ``opt_fast._register`` attaches each
one as the CUDA kernel of ``torch.ops.opt_fast.<op>`` when no C++ CUDA kernel exists. ``AVAILABLE`` is
True when Triton imports and can run (a CUDA device, or the interpreter with ``TRITON_INTERPRET=1``).
"""
import os

try:
    import triton  # noqa: F401
    HAS_TRITON = True
except ImportError:  # Triton is optional: CPU-only installs may not have it
    HAS_TRITON = False

INTERPRET = os.environ.get("TRITON_INTERPRET", "") == "1"

LAUNCHERS = {}

if HAS_TRITON:
    from . import lowdin as _lowdin  # noqa: E402  (the submodule stays reachable as .lowdin)

    LAUNCHERS["lowdin"] = _lowdin.lowdin
    LAUNCHERS["lowdin_backward"] = _lowdin.lowdin_backward

    from . import block_apply as _block_apply  # noqa: E402
    from . import cayley_neumann as _cayley_neumann  # noqa: E402

    for _op in ("cayley_neumann", "cayley_neumann_backward", "cayley_neumann_powers",
                "cayley_neumann_powers_backward"):
        LAUNCHERS[_op] = getattr(_cayley_neumann, _op)
    LAUNCHERS["block_apply"] = _block_apply.block_apply
    LAUNCHERS["block_apply_backward"] = _block_apply.block_apply_backward
