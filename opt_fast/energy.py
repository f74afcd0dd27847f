"""Hyperspherical energy (Liu et al., MHE, NeurIPS 2018; docs/methods.md): what OPT keeps fixed."""
import torch
from torch import Tensor, nn


def hyperspherical_energy(W, s: float = 1, reduction: str = "sum", eps: float = 1e-12) -> Tensor:
    """Energy of the neurons of W: the rows of W in PyTorch weight layout [n, ...], each flattened.

    With ŵ_i = w_i/‖w_i‖ and z_ij = ‖ŵ_i − ŵ_j‖, f_s(z) = z^(−s) for s > 0 and log(1/z) for s = 0:
      "sum"  = Σ over ordered pairs i ≠ j of f_s(z_ij)  (the paper's E_s; each pair counts twice)
      "mean" = that sum / (n(n−1))                       (= the mean over unordered pairs)
    eps floors the norms and the distances (coincident neurons give a large finite value, not inf).
    Unlike the MHE code, s = 0 uses log(1/z), not log(1/z²). An OPT layer (or any module with
    ``effective_weight()`` or ``weight``; transformers' Conv1D's [in, out] weight is transposed) may be
    passed for W.
    """
    if isinstance(W, nn.Module):
        if not hasattr(W, "effective_weight") and not isinstance(getattr(W, "weight", None), Tensor):
            raise TypeError(f"hyperspherical_energy: a module needs a weight tensor (or effective_weight()); "
                            f"{type(W).__name__} has none: pass one of its weights")
        from .nn.convert import _as_linear   # lazy: opt_fast.nn is heavier than this module
        W = W.effective_weight() if hasattr(W, "effective_weight") else _as_linear(W)[2]   # GPT-2 Conv1D: Wᵀ
    if not isinstance(W, Tensor):
        raise TypeError(f"hyperspherical_energy: W must be a tensor [n, ...] or a module, got {type(W).__name__}")
    if reduction not in ("sum", "mean"):
        raise ValueError(f"hyperspherical_energy: reduction must be 'sum' or 'mean', got {reduction!r}")
    if s < 0:
        raise ValueError(f"hyperspherical_energy: s must be >= 0, got {s}")
    if W.dim() < 2 or W.shape[0] < 2:
        raise ValueError(f"hyperspherical_energy: W needs at least 2 neurons (rows) [n, ...], got {list(W.shape)}")
    V = W.reshape(W.shape[0], -1)
    if V.dtype in (torch.float16, torch.bfloat16) or not (V.is_floating_point() or V.is_complex()):
        V = V.float()  # a half-precision (or integer) layer's weight: cdist has no half kernel on the CPU
    V = V / V.norm(dim=1, keepdim=True).clamp_min(eps)
    n = V.shape[0]
    # Distances from the differences, not from 2 − 2cos, which loses digits for close neurons.
    D = torch.cdist(V.unsqueeze(0), V.unsqueeze(0), compute_mode="donot_use_mm_for_euclid_dist")[0]
    i, j = torch.triu_indices(n, n, offset=1, device=V.device)
    z = D[i, j].clamp_min(eps)
    f = -torch.log(z) if s == 0 else z.pow(-s)
    total = 2.0 * f.sum()
    return total / (n * (n - 1)) if reduction == "mean" else total
