"""Clearing a parameter's optimizer state when OPT resets it (merge_and_reset, stochastic resample)."""
import torch
from torch import Tensor


def clear_state(optimizer, P: Tensor) -> None:
    """Drop ``P``'s state in ``optimizer`` (None: nothing to do): its next step is its first, as for a new
    parameter (the momentum of the old rotation means nothing for the new one).

    torch's fused SGD steps a group only when all or none of its parameters have a momentum buffer, and
    the layer's bias keeps its own: there the buffer is zeroed instead of dropped, which gives the same
    next step (buf = grad) unless ``dampening`` is set (then (1 − dampening)·grad)."""
    if optimizer is None:
        return
    state = optimizer.state.pop(P, None)
    buf = state.get("momentum_buffer") if state else None
    if isinstance(optimizer, torch.optim.SGD) and isinstance(buf, Tensor) and _group_of(optimizer, P).get("fused"):
        buf.zero_()
        optimizer.state[P] = {"momentum_buffer": buf}


def _group_of(optimizer, P: Tensor) -> dict:
    return next((g for g in optimizer.param_groups if any(p is P for p in g["params"])), {})
