"""What the Triton launchers of ``opt_fast.triton_kernels`` cannot serve goes to the reference.

The Triton lowdin kernels work on square [..., d, d] batches only; the ops accept tall P [..., m, n] (m > n)
since the polar factor of a tall matrix exists. A tall call on CUDA therefore runs the pure-PyTorch
reference (matmuls on the GPU) instead of reaching a launcher that would reshape it into d×d blocks.
"""
from typing import Callable

from .reference import REFERENCE_KERNELS

# op -> index of the argument whose shape decides (P of lowdin(P, ...), lowdin_backward(grad, P, R))
_SQUARE_ONLY = {"lowdin": 0, "lowdin_backward": 1}


def cuda_kernel(op: str, launcher: Callable) -> Callable:
    """The kernel to register for ``op`` on CUDA: ``launcher``, or a router in front of it."""
    if op not in _SQUARE_ONLY:
        return launcher
    where, ref = _SQUARE_ONLY[op], REFERENCE_KERNELS[op]

    def kernel(*args):
        P = args[where]
        if P.dim() >= 2 and P.shape[-2] != P.shape[-1]:
            return ref(*args).contiguous()
        return launcher(*args)

    kernel.__name__ = kernel.__qualname__ = f"{op}_cuda"
    return kernel
