"""opt_fast: fused orthogonalisation kernels and Orthogonal Over-Parameterized Training for PyTorch.

``import opt_fast`` registers ``torch.ops.opt_fast.*`` (see ``backend_report()`` for which kernel
serves each op), and exposes typed wrappers in ``opt_fast.functional``.
"""
from . import _ops, _register  # noqa: F401  (schemas, then kernels)
from . import functional, nn, optim
from ._backends import backend_report, has_kernel, kernel_for
from .energy import hyperspherical_energy
from .nn import orth_reg_loss

__version__ = "0.1.0"

__all__ = ["functional", "nn", "optim", "backend_report", "has_kernel", "kernel_for",
           "hyperspherical_energy", "orth_reg_loss", "__version__"]
