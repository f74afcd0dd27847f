"""THE schema list: every op of the ``opt_fast`` namespace is defined here, once.

Kernels attach to these schemas elsewhere: the pure-PyTorch references (every device), the C++ CPU/CUDA
kernels in ``opt_fast._C`` and the Triton launchers in ``opt_fast.triton_kernels``. Because the schemas
live in Python, ``torch.ops.opt_fast.<op>`` exists whether or not the extension was built.
"""
import torch

# Keep a module-level reference: registrations live as long as this object.
lib = torch.library.Library("opt_fast", "DEF")

FORWARD_OPS = (
    "householder_product",
    "householder_orthogonal",
    "householder_apply",
    "gram_schmidt",
    "lowdin",
    "cayley",
    "cayley_neumann",
    "block_apply",
)

SCHEMAS = {
    "householder_product": "householder_product(Tensor V, Tensor tau) -> Tensor",
    "householder_product_backward":
        "householder_product_backward(Tensor grad, Tensor V, Tensor tau) -> (Tensor, Tensor)",
    "householder_orthogonal": "householder_orthogonal(Tensor V) -> Tensor",
    "householder_orthogonal_backward": "householder_orthogonal_backward(Tensor grad, Tensor V) -> Tensor",
    "householder_apply": "householder_apply(Tensor V, Tensor X) -> Tensor",
    "householder_apply_backward":
        "householder_apply_backward(Tensor grad, Tensor V, Tensor X) -> (Tensor, Tensor)",
    "gram_schmidt": "gram_schmidt(Tensor P, int block_size=0) -> Tensor",
    "gram_schmidt_backward": "gram_schmidt_backward(Tensor grad, Tensor P, Tensor Q) -> Tensor",
    "lowdin": "lowdin(Tensor P, int iters=0, Tensor? R0=None) -> Tensor",
    "lowdin_backward": "lowdin_backward(Tensor grad, Tensor P, Tensor R) -> Tensor",
    # lowdin's SVD route keeping its factors (R, U, S, Vh), so that its backward is four matmuls; what
    # opt_fast.functional.lowdin and the OPT layers use on the CPU when a gradient is needed
    "lowdin_svd": "lowdin_svd(Tensor P) -> (Tensor, Tensor, Tensor, Tensor)",
    "lowdin_svd_backward": "lowdin_svd_backward(Tensor grad, Tensor U, Tensor S, Tensor Vh) -> Tensor",
    "cayley": "cayley(Tensor S) -> Tensor",
    "cayley_backward": "cayley_backward(Tensor grad, Tensor Q) -> Tensor",
    # block-orthogonal layers (POET / OFT family): the truncated Cayley series of a batch of skew blocks, and
    # the permuted block-diagonal product on the last dim of activations
    "cayley_neumann": "cayley_neumann(Tensor S, int terms=5) -> Tensor",
    "cayley_neumann_backward": "cayley_neumann_backward(Tensor grad, Tensor S, int terms) -> Tensor",
    # the same map keeping the powers (A·A)^j, j = 1..terms//2, so that its backward reuses them; what
    # opt_fast.functional.cayley_neumann and the block layers use when a gradient is needed
    "cayley_neumann_powers": "cayley_neumann_powers(Tensor S, int terms=5) -> (Tensor, Tensor)",
    "cayley_neumann_powers_backward":
        "cayley_neumann_powers_backward(Tensor grad, Tensor S, Tensor powers, int terms) -> Tensor",
    "block_apply": "block_apply(Tensor R, Tensor X, Tensor? perm=None) -> Tensor",
    "block_apply_backward":
        "block_apply_backward(Tensor grad, Tensor R, Tensor X, Tensor? perm) -> (Tensor, Tensor)",
}

ALL_OPS = tuple(SCHEMAS)

for _schema in SCHEMAS.values():
    lib.define(_schema)
