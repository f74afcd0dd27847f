"""The soft orthogonality penalty of the ``orth_reg`` baseline (docs/methods.md, "orth_reg")."""
import torch
from torch import Tensor, nn

from .layers import OPTLayer

# λ of the default penalty λ·Σ‖RRᵀ − I‖²_F, sized against the task loss: R = (1 + ε)Q costs ≈ 4ε²d per layer,
# so at λ = 0.1 a 1 % scale drift of one d = 576 layer costs ≈ 0.02, a fifth of the cross-entropy at the end
# of a digits run; R stays within ‖RRᵀ − I‖_F ≈ 0.1–0.3 per layer there (0.01 lets it drift ~10× further).
DEFAULT_WEIGHT = 0.1
# The released code: 0.1·Σ‖RRᵀ − I‖_F (the norm itself, not squared), with R ~ N(0, 1).
REFERENCE_WEIGHT = 0.1


def orth_reg_loss(model: nn.Module, weight: float = DEFAULT_WEIGHT, squared: bool = True) -> Tensor:
    """weight · Σ over the model's ``orth_reg`` layers of ‖R Rᵀ − I‖²_F (``squared=False``: of the norm
    itself, as released; use it with ``weight=0.1``). Add it to the task loss. A model without such
    layers gives a zero tensor."""
    terms = []
    for layer in model.modules():
        if isinstance(layer, OPTLayer) and layer.method.name == "orth_reg":
            R = layer.learnable
            eye = torch.eye(R.shape[-1], dtype=R.dtype, device=R.device)
            gap = R @ R.mT - eye
            terms.append(gap.square().sum() if squared else torch.linalg.matrix_norm(gap))
    if not terms:
        return torch.zeros(())
    return weight * torch.stack(terms).sum()
