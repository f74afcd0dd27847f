"""Stochastic OPT (S-OPT, docs/methods.md): which random subset I of the fan-in coordinates a layer rotates.

A stochastic layer learns an m×m P_s (identity init) and uses R_s = map(P_s) on the columns I of V0
(rows of the TF layout's W0); the full R is R_s on I and the identity elsewhere, so it is still an
orthogonal transform of every neuron. At the end of an episode ``resample`` (layers.py: the model-level
function and ``OPTLayer.resample``) merges R_s into W0 (W0[I] <- R_s W0[I]), resets P_s to I (so R = I and
the function is unchanged) and draws a new I with ``sample_indices``. This module only draws indices: it
knows nothing of the layer class, so layers.py imports it and not the other way round.

Fixed against the released code: P_s is sized from the number of sampled indices (the code built
P_s of k·k·10 but sampled k·k·16 indices, a shape error). Kept optional: the released code's reset
of the following BatchNorm's gamma/beta (``reset_bn``, off by default), and its stale momentum
(pass ``optimizer`` to clear P_s's optimizer state instead).
"""
from typing import Optional

import torch
from torch import Tensor

SAMPLES = ("coordinate", "channel")


def subset_size(d: int, in_channels: int, fraction: float, sample: str = "coordinate") -> int:
    """How many fan-in indices ``sample_indices`` draws (it checks the arguments)."""
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:  # True: 1
        raise ValueError(f"opt_fast.nn: stochastic must be a fraction in (0, 1], got {fraction!r}")
    if sample == "coordinate":
        return max(1, round(fraction * d))
    if sample == "channel":
        return max(1, round(fraction * in_channels)) * (d // in_channels)
    raise ValueError(f"opt_fast.nn: unknown sample {sample!r}; valid: {', '.join(SAMPLES)}")


def sample_indices(d: int, in_channels: int, fraction: float, sample: str = "coordinate",
                   generator: Optional[torch.Generator] = None, device=None) -> Tensor:
    """Sorted fan-in indices (PyTorch flattening order: in_channel, then kernel position).

    ``coordinate``: round(fraction·d) coordinates uniformly without replacement (the released code).
    ``channel``: round(fraction·C_in) whole input channels, each with all its kernel positions.
    """
    m = subset_size(d, in_channels, fraction, sample)
    # drawn on the CPU (the CPU generator's stream), whatever torch's default device
    if sample == "coordinate":
        idx = torch.randperm(d, generator=generator, device="cpu")[:m]
    else:
        kk = d // in_channels
        ch = torch.randperm(in_channels, generator=generator, device="cpu")[:m // kk]
        idx = (ch[:, None] * kk + torch.arange(kk, device="cpu")).flatten()
    return idx.sort().values.to(device)
