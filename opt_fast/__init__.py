"""opt_fast: fused orthogonalisation kernels and Orthogonal Over-Parameterized Training for PyTorch.

``import opt_fast`` registers ``torch.ops.opt_fast.*`` (see ``backend_report()`` for which kernel
serves each op), and exposes typed wrappers in ``opt_fast.functional``.
"""
from . import _ops, _register  # noqa: F401  (schemas, then kernels)
from . import functional
from ._backends import backend_report, has_kernel, kernel_for

__version__ = "0.1.0"

__all__ = ["functional", "backend_report", "has_kernel", "kernel_for", "__version__"]
