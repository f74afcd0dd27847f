"""The soft orthogonality penalty of the ``orth_reg`` baseline (opt_spec.md §2.6)."""
import torch
from torch import Tensor, nn

from .layers import OPTLayer


def orth_reg_loss(model: nn.Module, weight: float = 0.1) -> Tensor:
    """weight · Σ over the model's ``orth_reg`` layers of ‖R Rᵀ − I‖_F (the norm itself, not its square,
    as released). Add it to the task loss. A model without such layers gives a zero tensor."""
    terms = []
    for layer in model.modules():
        if isinstance(layer, OPTLayer) and layer.method.name == "orth_reg":
            R = layer.learnable
            eye = torch.eye(R.shape[-1], dtype=R.dtype, device=R.device)
            terms.append(torch.linalg.matrix_norm(R @ R.mT - eye))
    if not terms:
        return torch.zeros(())
    return weight * torch.stack(terms).sum()
