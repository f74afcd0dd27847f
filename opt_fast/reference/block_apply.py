"""Reference permuted block-diagonal product: the rotation a block-orthogonal layer applies to activations.

    block_apply(R, X, perm):   Y[..., perm] = blockdiag(R_1, …, R_nb) · X[..., perm]

R: [nb, b, b], X: [..., n] (each row of X is one column vector of length n), perm: int64 [n] or None
(identity). Chunk j of the permuted vector, coordinates perm[j·b : (j+1)·b], is multiplied by R_j. With
Π the permutation matrix of perm ((Π x)_i = x[perm[i]]) this is Y = Πᵀ B Π X for B = blockdiag(R), so
an orthogonal R gives an orthogonal transform of every row.

Remainder: nb·b may be smaller than n. The coordinates perm[nb·b:] are left as they are (an identity
block), so a width that is not a multiple of the block size still works, and with a fresh random
permutation after every merge every coordinate is rotated over time.

Dtypes: R is float32 or float64. X has R's dtype, or is float16/bfloat16 with float32 R: products are
then accumulated in float32 and Y is returned in X's dtype (activations of bfloat16 training).
"""
from typing import Optional, Tuple

import torch
from torch import Tensor

from .. import _checks


def _split(X: Tensor, perm: Optional[Tensor], nb: int, b: int):
    Xp = X if perm is None else X.index_select(-1, perm)
    return Xp[..., : nb * b].unflatten(-1, (nb, b)), Xp[..., nb * b:]


def _unpermute(Yp: Tensor, perm: Optional[Tensor]) -> Tensor:
    if perm is None:
        return Yp
    return torch.empty_like(Yp).index_copy_(-1, perm, Yp)


def block_apply_ref(R: Tensor, X: Tensor, perm: Optional[Tensor] = None) -> Tensor:
    _checks.block_apply(R, X, perm)
    nb, b = R.shape[0], R.shape[-1]
    blocks, rest = _split(X.to(R.dtype), perm, nb, b)
    Yb = torch.einsum("jkl,...jl->...jk", R, blocks)   # y_j = R_j x_j for every row
    return _unpermute(torch.cat([Yb.flatten(-2), rest], dim=-1), perm).to(X.dtype)


def block_apply_backward_ref(grad: Tensor, R: Tensor, X: Tensor,
                             perm: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """grad_X = Πᵀ Bᵀ Π grad (the same product with every block transposed), grad_R_j = Σ_rows g_j x_jᵀ."""
    _checks.grad_like("block_apply_backward", grad, X.shape)
    nb, b = R.shape[0], R.shape[-1]
    g_blocks, g_rest = _split(grad.to(R.dtype), perm, nb, b)
    x_blocks, _ = _split(X.to(R.dtype), perm, nb, b)
    grad_R = torch.einsum("...jk,...jl->jkl", g_blocks, x_blocks)
    gx = torch.einsum("jkl,...jk->...jl", R, g_blocks)
    grad_X = _unpermute(torch.cat([gx.flatten(-2), g_rest], dim=-1), perm).to(X.dtype)
    return grad_R, grad_X
