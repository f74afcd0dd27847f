"""Independent plain-PyTorch equivalents of the opt_fast ops, and input builders (and helpers for thread counts
and for counting opt_fast op calls) shared by the tests.

None of these call opt_fast: they are what the ops are judged against. Each ``*_torch`` function runs in
the dtype of its inputs, so it serves both as the float64 reference (on upcast inputs) and as the
same-dtype PyTorch yardstick of the accuracy rule.
"""
import contextlib
import os
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


def orthogonalize_approx_bf16_torch(G: Tensor, steps: int) -> Tensor:
    """Muon's quintic Newton–Schulz as the Triton kernels compute it on a GPU (``lowp``): every product's
    operands rounded to bfloat16, products and sums in float32. Products of bfloat16 values are exact in
    float32, so this differs from the kernels only by the order of the float32 accumulation. (The loop is
    opt_fast's plain-torch fallback with this product.)"""
    from opt_fast.functional import _orthogonalize_approx_torch

    def bf16_matmul(x: Tensor, y: Tensor) -> Tensor:
        return x.to(torch.bfloat16).float() @ y.to(torch.bfloat16).float()

    return _orthogonalize_approx_torch(G.float(), steps, matmul=bf16_matmul)


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


def cayley_neumann_torch(S: Tensor, terms: int) -> Tensor:
    """(I + A) Σ_{i=0..terms} Aⁱ with A = (S − Sᵀ)/2: the plain series, one power at a time."""
    A = 0.5 * (S - S.mT)
    eye = torch.eye(S.shape[-1], dtype=S.dtype, device=S.device)
    total, power = eye.expand_as(A), eye.expand_as(A)
    for _ in range(terms):
        power = power @ A
        total = total + power
    return (eye + A) @ total


def peft_neumann_torch(Q: Tensor, num_terms: int) -> Tensor:
    """PEFT OFT's series as its docs state it: I + 2Q + 2Q² + … + 2Q^(n−2) + Q^(n−1) (n ≥ 3)."""
    eye = torch.eye(Q.shape[-1], dtype=Q.dtype, device=Q.device)
    out, power = eye.expand_as(Q), eye.expand_as(Q)
    for i in range(1, num_terms):
        power = power @ Q
        out = out + (1.0 if i == num_terms - 1 else 2.0) * power
    return out


def permuted_block_matrix(R: Tensor, n: int, perm=None) -> Tensor:
    """The dense n × n matrix Πᵀ blockdiag(R_1, …, R_nb, I) Π ((Π x)_i = x[perm[i]]): what block_apply
    multiplies each row of X by, with the coordinates beyond nb·b left as they are."""
    nb, b = R.shape[0], R.shape[-1]
    eye = torch.eye(n - nb * b, dtype=R.dtype, device=R.device)
    B = torch.block_diag(*R.unbind(0), eye) if nb else eye
    if perm is None:
        return B
    M = torch.zeros_like(B)
    M[perm[:, None], perm[None, :]] = B
    return M


def block_apply_torch(R: Tensor, X: Tensor, perm=None) -> Tensor:
    """X times the dense permuted block matrix, row-vector form: Y = X Mᵀ."""
    return X @ permuted_block_matrix(R, X.shape[-1], perm).mT


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


# ---- where the Triton launcher tests run -----------------------------------------------------------

INTERPRET = os.environ.get("TRITON_INTERPRET", "") == "1"


def triton_device() -> str:
    """"cuda" when a device is visible and TRITON_INTERPRET is unset, "cpu" under the interpreter (tensors
    on the CPU), else the test is skipped."""
    import pytest

    if torch.cuda.is_available() and not INTERPRET:
        return "cuda"
    if INTERPRET:
        return "cpu"
    pytest.skip("needs TRITON_INTERPRET=1 (set before import; scripts/run_tests.sh stage 2) or a CUDA device")


def block_llama(seed: int = 0):
    """llama-tiny (vocab 128, context 32) with two-sided cayley_neumann block layers (b = 16) on every
    projection, its rotations moved off the identity (needs transformers)."""
    from opt_fast.train.lm.model import build_llama, convert_projections
    model = convert_projections(build_llama("llama-tiny", 128, 32, seed=seed), "cayley_neumann", 16, "both",
                                keep_weights=False, seed=seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("_blocks"):
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(seed)) * 0.01)
    return model
