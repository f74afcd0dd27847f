"""Independent plain-PyTorch equivalents of the opt_fast ops, and input builders (and helpers for thread counts
and for counting opt_fast op calls) shared by the tests.

None of these call opt_fast: they are what the ops are judged against. Each ``*_torch`` function runs in
the dtype of its inputs, so it serves both as the float64 reference (on upcast inputs) and as the
same-dtype PyTorch yardstick of the accuracy rule.
"""
import contextlib
from collections import Counter

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

OPS = (
    "householder_product",
    "householder_orthogonal",
    "householder_apply",
    "gram_schmidt",
    "lowdin",
    "cayley",
)

DTYPES = [torch.float32, torch.float64]

# atol of the accuracy rule err(op) <= 2 err(torch same dtype) + atol
ATOL = {torch.float32: 2e-6, torch.float64: 1e-11}


# ---- plain-PyTorch equivalents ---------------------------------------------------------------------

def householder_product_torch(V: Tensor, tau: Tensor) -> Tensor:
    return torch.linalg.householder_product(V, tau)


def _reflect_left(v: Tensor, X: Tensor) -> Tensor:
    """H(v) X with H(v) = I - 2vvᵀ/vᵀv (identity for v = 0); v: [..., d, 1]."""
    sq = (v * v).sum(-2, keepdim=True)
    coef = torch.where(sq > 0, 2.0 / torch.where(sq > 0, sq, torch.ones_like(sq)), torch.zeros_like(sq))
    return X - v @ (coef * (v.mT @ X))


def householder_apply_torch(V: Tensor, X: Tensor) -> Tensor:
    """H(v_1)…H(v_k) X by a loop of rank-1 updates, last reflector first."""
    out = X
    for i in reversed(range(V.shape[-1])):
        out = _reflect_left(V[..., i : i + 1], out)
    return out


def householder_orthogonal_torch(V: Tensor) -> Tensor:
    d = V.shape[-2]
    eye = torch.eye(d, dtype=V.dtype, device=V.device).expand(*V.shape[:-2], d, d)
    return householder_apply_torch(V, eye)


def _qr_sign(P: Tensor) -> Tensor:
    Q, R = torch.linalg.qr(P)
    sign = torch.sign(R.diagonal(dim1=-2, dim2=-1))
    sign = torch.where(sign == 0, torch.ones_like(sign), sign)
    return Q * sign.unsqueeze(-2)


def gram_schmidt_torch(P: Tensor) -> Tensor:
    """Q of P = QR with diag(R) > 0: torch.linalg.qr plus the sign fix, one call per matrix. MKL's rounding
    depends on where a matrix sits in a batched buffer (33×33 float32: batched and single calls on the same
    matrix differ by up to 5.6x in max-abs error against float64), and the C++ kernel factors each matrix in
    its own buffer: per-matrix calls keep the 2x accuracy rule from comparing two roundings of one algorithm."""
    if P.dim() == 2:
        return _qr_sign(P)
    flat = P.reshape(-1, *P.shape[-2:])
    return torch.stack([_qr_sign(flat[i].clone()) for i in range(flat.shape[0])]).view(P.shape)


def lowdin_torch(P: Tensor) -> Tensor:
    """The polar factor U Vᴴ of the thin SVD (orthogonal for square P, orthonormal columns for tall P)."""
    U, _, Vh = torch.linalg.svd(P, full_matrices=False)
    return U @ Vh


def cayley_torch(S: Tensor) -> Tensor:
    """(I - S)⁻¹ (I + S), which equals (I + S)(I - S)⁻¹."""
    eye = torch.eye(S.shape[-1], dtype=S.dtype, device=S.device)
    return torch.linalg.solve(eye - S, eye + S)


TORCH_EQUIV = {
    "householder_product": lambda V, tau: householder_product_torch(V, tau),
    "householder_orthogonal": lambda V: householder_orthogonal_torch(V),
    "householder_apply": lambda V, X: householder_apply_torch(V, X),
    "gram_schmidt": lambda P, block_size=0: gram_schmidt_torch(P),
    "lowdin": lambda P, iters=0, R0=None: lowdin_torch(P),
    "cayley": lambda S: cayley_torch(S),
}


# ---- inputs ----------------------------------------------------------------------------------------

def skew(A: Tensor) -> Tensor:
    U = A.triu()
    return U - U.mT


def lapack_reflectors(m: int, n: int, k: int, batch=(), dtype=torch.float64):
    """(V [..., m, n], tau [..., k]) from geqrf of an N(0,1) matrix: what householder_product is fed."""
    V, tau = torch.geqrf(torch.randn(*batch, m, n, dtype=torch.float64))
    return V.to(dtype), tau[..., :k].contiguous().to(dtype)


def noncontiguous(x: Tensor, how: str) -> Tensor:
    """A copy of x with the same values but non-contiguous strides: "mT" (transposed storage) or "slice"
    (every other column of a larger tensor)."""
    if how == "mT":
        return x.mT.contiguous().mT
    if how == "slice":
        big = torch.full((*x.shape[:-1], 2 * x.shape[-1]), float("inf"), dtype=x.dtype, device=x.device)
        big[..., ::2] = x
        return big[..., ::2]
    raise ValueError(how)


def max_err(a: Tensor, b: Tensor) -> float:
    if a.numel() == 0:
        return 0.0
    return (a.double() - b.double()).abs().max().item()


def orth_err(Q: Tensor) -> float:
    """max over the batch of ‖QᵀQ − I‖_F / √n, in float64."""
    Q = Q.double()
    n = Q.shape[-1]
    E = Q.mT @ Q - torch.eye(n, dtype=Q.dtype, device=Q.device)
    return (torch.linalg.matrix_norm(E) / n ** 0.5).max().item()


@contextlib.contextmanager
def threads(n: int):
    """torch's intra-op thread count set to n inside the block (the suite runs on one, see conftest.py)."""
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


class OpCounter(TorchDispatchMode):
    """Counts the real invocations of torch.ops.opt_fast.* below autograd (each dispatch = one call)."""

    def __init__(self):
        super().__init__()
        self.calls = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "opt_fast":
            self.calls[func._opname] += 1
        return func(*args, **(kwargs or {}))

    @property
    def forward_calls(self):
        return sum(n for op, n in self.calls.items() if not op.endswith("_backward"))
