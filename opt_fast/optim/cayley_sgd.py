"""Cayley SGD with momentum (Li, Fuxin & Todorovic, ICLR 2020, Alg. 1 with q = 0.5, s = 2): the optimiser
of OPT's ``ogd`` method, exactly as the released code runs it (docs/methods.md#ogd)."""
import torch
from torch.optim import Optimizer


class CayleySGD(Optimizer):
    """Keeps square matrices X (e.g. the ``R`` of ``method="ogd"`` layers; leading batch dims allowed)
    on the orthogonal group. Per step, with G = dL/dX and the momentum buffer M (starts at 0):

        M <- momentum·M − G
        A = M Xᵀ − ½ X (Xᵀ M Xᵀ),  Ω = A − Aᵀ,  M <- Ω X
        α = min(lr, 2q / (‖Ω‖_F + eps))
        Y <- X + α M, then s times  Y <- X + (α/2) Ω (X + Y)   (fixed-point Cayley retraction)
        X <- Y

    q is the paper's: the step bound 2q/‖Ω‖ makes (α/2)‖Ω‖ <= q the contraction factor of the fixed-point
    iteration, so q in (0, 1); the α/2 of the iteration itself is the Cayley transform's, not q.

    No weight decay (the released code has none on R). ``reorth_every=N`` re-orthonormalises X by QR
    every N steps (0, the default, never does, as released: X then drifts slowly off orthogonality).
    """

    def __init__(self, params, lr: float = 0.02, momentum: float = 0.9, q: float = 0.5, s: int = 2,
                 eps: float = 1e-8, reorth_every: int = 0):
        if lr <= 0:
            raise ValueError(f"CayleySGD: lr must be > 0, got {lr}")
        if not 0 <= momentum < 1:
            raise ValueError(f"CayleySGD: momentum must be in [0, 1), got {momentum}")
        if not 0 < q < 1:
            raise ValueError(f"CayleySGD: q must be in (0, 1) (the retraction's contraction factor), got {q}")
        if s < 0 or reorth_every < 0:
            raise ValueError(f"CayleySGD: s and reorth_every must be >= 0, got s={s}, reorth_every={reorth_every}")
        super().__init__(params, dict(lr=lr, momentum=momentum, q=q, s=s, eps=eps, reorth_every=reorth_every))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for X in group["params"]:
                if X.grad is None:
                    continue
                if X.dim() < 2 or X.shape[-1] != X.shape[-2]:
                    raise ValueError(f"CayleySGD: parameters must be square matrices [..., d, d], got {list(X.shape)}")
                state = self.state[X]
                if not state:
                    state["step"] = 0
                    state["momentum_buffer"] = torch.zeros_like(X)
                M = state["momentum_buffer"].mul_(group["momentum"]).sub_(X.grad)
                A = M @ X.mT - 0.5 * X @ (X.mT @ M @ X.mT)
                Omega = A - A.mT
                M = Omega @ X
                state["momentum_buffer"] = M
                norm = torch.linalg.matrix_norm(Omega)
                alpha = torch.clamp(2.0 * group["q"] / (norm + group["eps"]), max=group["lr"])[..., None, None]
                Y = X + alpha * M
                for _ in range(group["s"]):
                    Y = X + (0.5 * alpha) * (Omega @ (X + Y))
                X.copy_(Y)
                state["step"] += 1
                if group["reorth_every"] and state["step"] % group["reorth_every"] == 0:
                    Q, Rr = torch.linalg.qr(X)
                    sign = Rr.diagonal(dim1=-2, dim2=-1).sign()
                    X.copy_(Q * torch.where(sign == 0, torch.ones_like(sign), sign).unsqueeze(-2))
        return loss
