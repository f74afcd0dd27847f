"""Optimisers for OPT: CayleySGD keeps the ``ogd`` layers' R orthogonal."""
from .cayley_sgd import CayleySGD

__all__ = ["CayleySGD"]
