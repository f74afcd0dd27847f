"""Stochastic OPT (S-OPT, docs/methods.md): rotate only a random subset I of the fan-in coordinates.

A stochastic layer learns an m×m P_s (identity init) and uses R_s = map(P_s) on the columns I of V0
(rows of the TF layout's W0); the full R is R_s on I and the identity elsewhere, so it is still an
orthogonal transform of every neuron. At the end of an episode ``resample`` merges R_s into W0
(W0[I] <- R_s W0[I]), resets P_s to I (so R = I and the function is unchanged) and draws a new I.

Fixed against the released code: P_s is sized from the number of sampled indices (the code built
P_s of k·k·10 but sampled k·k·16 indices, a shape error). Kept optional: the released code's reset
of the following BatchNorm's gamma/beta (``reset_bn``, off by default), and its stale momentum
(pass ``optimizer`` to clear P_s's optimizer state instead).
"""
from typing import Optional

import torch
from torch import Tensor, nn

SAMPLES = ("coordinate", "channel")


def sample_indices(d: int, in_channels: int, fraction: float, sample: str = "coordinate",
                   generator: Optional[torch.Generator] = None, device=None) -> Tensor:
    """Sorted fan-in indices (PyTorch flattening order: in_channel, then kernel position).

    ``coordinate``: round(fraction·d) coordinates uniformly without replacement (the released code).
    ``channel``: round(fraction·C_in) whole input channels, each with all its kernel positions.
    """
    if not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
        raise ValueError(f"opt_fast.nn: stochastic must be a fraction in (0, 1], got {fraction!r}")
    if sample == "coordinate":
        m = max(1, round(fraction * d))
        idx = torch.randperm(d, generator=generator)[:m]
    elif sample == "channel":
        kk = d // in_channels
        ch = torch.randperm(in_channels, generator=generator)[:max(1, round(fraction * in_channels))]
        idx = (ch[:, None] * kk + torch.arange(kk)).flatten()
    else:
        raise ValueError(f"opt_fast.nn: unknown sample {sample!r}; valid: {', '.join(SAMPLES)}")
    return idx.sort().values.to(device)


@torch.no_grad()
def resample_layer(layer, optimizer=None, generator: Optional[torch.Generator] = None) -> None:
    if layer.stochastic is None:
        raise ValueError(f"opt_fast.nn: resample needs a stochastic OPT layer, got {type(layer).__name__} "
                         f"with stochastic=None")
    # Merge: W0 <- the effective weight (only the columns I change).
    layer.W0.copy_(layer.effective_weight())
    P = layer.learnable
    P.copy_(layer.method.init(P.shape, "identity", P.dtype, P.device))
    layer.idx.copy_(sample_indices(layer.fan_in, layer.in_channels, layer.stochastic, layer.sample,
                                   generator=generator, device=layer.idx.device))
    if optimizer is not None:  # momentum of the old subset means nothing for the new one
        optimizer.state.pop(P, None)
    layer._refresh_warm_start()


@torch.no_grad()
def resample(model: nn.Module, optimizer=None, reset_bn: bool = False,
             generator: Optional[torch.Generator] = None) -> int:
    """End an S-OPT episode for every stochastic layer of ``model``; returns how many were resampled.

    optimizer: if given, the optimizer state (momentum) of each P_s is dropped; the released code keeps it.
    reset_bn: reproduce the released code's side effect (gamma=1, beta=0 of the first BatchNorm that
    follows each stochastic layer in module order, before the next OPT layer). Running stats are kept.
    """
    from .layers import OPTLayer

    count, pending_bn = 0, False
    for module in model.modules():
        if isinstance(module, OPTLayer):
            pending_bn = False
            if module.stochastic is not None:
                resample_layer(module, optimizer=optimizer, generator=generator)
                count, pending_bn = count + 1, reset_bn
        elif pending_bn and isinstance(module, nn.modules.batchnorm._BatchNorm) and module.affine:
            module.weight.fill_(1.0)
            module.bias.zero_()
            pending_bn = False
    return count
