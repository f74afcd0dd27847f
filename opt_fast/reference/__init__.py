"""Pure-PyTorch reference kernels: the executable spec every fast kernel is tested against, and the
fallback that serves any device without a faster kernel. Each forward op ``<op>`` has ``<op>_ref`` and
``<op>_backward_ref`` with the signatures of the ``torch.ops.opt_fast`` schemas."""
from .block_apply import block_apply_backward_ref, block_apply_ref
from .cayley import cayley_backward_ref, cayley_ref
from .cayley_neumann import (
    cayley_neumann_backward_ref,
    cayley_neumann_powers_backward_ref,
    cayley_neumann_powers_ref,
    cayley_neumann_ref,
)
from .gram_schmidt import gram_schmidt_backward_ref, gram_schmidt_ref
from .householder import (
    householder_apply_backward_ref,
    householder_apply_ref,
    householder_orthogonal_backward_ref,
    householder_orthogonal_ref,
    householder_product_backward_ref,
    householder_product_ref,
)
from .lowdin import lowdin_backward_ref, lowdin_ref, lowdin_svd_backward_ref, lowdin_svd_ref

REFERENCE_KERNELS = {
    "householder_product": householder_product_ref,
    "householder_product_backward": householder_product_backward_ref,
    "householder_orthogonal": householder_orthogonal_ref,
    "householder_orthogonal_backward": householder_orthogonal_backward_ref,
    "householder_apply": householder_apply_ref,
    "householder_apply_backward": householder_apply_backward_ref,
    "gram_schmidt": gram_schmidt_ref,
    "gram_schmidt_backward": gram_schmidt_backward_ref,
    "lowdin": lowdin_ref,
    "lowdin_backward": lowdin_backward_ref,
    "lowdin_svd": lowdin_svd_ref,
    "lowdin_svd_backward": lowdin_svd_backward_ref,
    "cayley": cayley_ref,
    "cayley_backward": cayley_backward_ref,
    "cayley_neumann": cayley_neumann_ref,
    "cayley_neumann_backward": cayley_neumann_backward_ref,
    "cayley_neumann_powers": cayley_neumann_powers_ref,
    "cayley_neumann_powers_backward": cayley_neumann_powers_backward_ref,
    "block_apply": block_apply_ref,
    "block_apply_backward": block_apply_backward_ref,
}

__all__ = sorted(REFERENCE_KERNELS) + ["REFERENCE_KERNELS"]
