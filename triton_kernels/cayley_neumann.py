"""Triton launchers for ``opt_fast::cayley_neumann`` (+ ``_powers``) and their backward ops (CUDA kernels).

The spec is opt_fast/reference/cayley_neumann.py; the scheme is the C++ CPU kernel's
(csrc/cpu/cayley_neumann.cpp has the derivation): A = (S − Sᵀ)/2, Y = A², powers P_j = Yʲ (j = 1..h,
h = ⌊k/2⌋), E = I + Σ P_j, Am = I + 2A + Y, and
    k odd:  R = Am·E;      k even ≥ 2:  R = Am·E − C − C·A,  C = A·P_h;      k = 1: Am;      k = 0: I + A.
Backward: grad_S = W − Wᵀ with W = G·E (+ the even-k terms) − sym-cotangent(Y)·A, the adjoint of the
power chain seeded by D = sym(Amᵀ G); at k = 5 that is 4 products.

Two paths:
* resident (b <= ``RESIDENT_MAX[dtype]``): one program per block matrix (cayley_neumann_resident.py):
  S (and G, and the saved powers) read once, the whole product sequence run on the block in the
  program's workspace (L1/L2), R / the powers / grad_S written once; one launch per op. The backward
  reads the saved powers, or recomputes them in the same program for h <= 2 (terms <= 5); for h >= 3
  without saved powers the launcher computes them first with the forward kernel.
* tiled (larger b): the same sequence of products as batched tiled GEMMs (``matmul.mm``, symmetric /
  skew results on the upper-triangle tiles only: Y, P_j, D, the k = 5 adjoint and the final
  skew projection), the identity and axpy terms as elementwise torch ops.

float32 products are exact float32 FMA products in both paths (the tiled one through matmul.mm's
``input_precision``, "ieee" unless OPT_FAST_TRITON_F32_PRECISION says otherwise); float64 is computed in
float64; float16/bfloat16 S is computed in float32 and returned in S's dtype (like the C++
kernel), the saved powers too.
"""
import functools
from typing import List, Optional, Tuple

import torch
import triton
from torch import Tensor

from opt_fast import _checks

from ._device import on_input_device
from ._launch import Launch
from .cayley_neumann_resident import opt_fast_cn_backward_kernel, opt_fast_cn_forward_kernel
from .matmul import mm

__all__ = ["cayley_neumann", "cayley_neumann_powers", "cayley_neumann_backward", "cayley_neumann_powers_backward",
           "forward_launch", "backward_launch", "RESIDENT_MAX"]

HALF = (torch.float16, torch.bfloat16)
# Largest block size served by the one-program-per-block kernels, per compute dtype. Their registers do
# not grow with the block (row strips; every variant compiles for sm_80 / sm_90 without spills,
# scripts/check_gpu_compile.sh), but one program a block leaves a GPU idle when blocks are few and
# large, and the workspace grows as BB²: above 128 the tiled path. Tests lower it to reach that path.
RESIDENT_MAX = {torch.float32: 128, torch.float64: 128}


# ---- launch configs (data: the launchers and the ahead-of-time compile check both read them) ---------

FWD_SLOTS, BWD_SLOTS = 5, 11   # workspace matrices per program (cayley_neumann_resident.py)
# Programs of the resident kernels: up to PROGRAMS_PER_SM per SM and WORKSPACE_BYTES of workspace in all
# (each program loops over blocks pid, pid + nprog, ...; BB = 128, float32: 320 / 704 KiB a program).
# Under the interpreter one program per block; tests set PROGRAMS to cover the loop.
PROGRAMS_PER_SM = 2
WORKSPACE_BYTES = 64 << 20
PROGRAMS: Optional[int] = None


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in HALF else dtype


def _block(b: int) -> int:
    return max(16, triton.next_power_of_2(b))


def _strips(bb: int):
    """(RB, num_warps): strips of RB rows, 2-4 accumulator entries a thread. Larger strips (8-16 entries)
    leave each product fewer passes over its right factor but took 250+ registers in the float64
    backward (scripts/check_gpu_compile.sh), where every variant here stays under ~150."""
    return {16: (16, 4), 32: (16, 4), 64: (8, 4)}.get(bb, (8, 8))


def _launch(b: int, dtype: torch.dtype, terms: int, flag_name: str, flag: bool) -> Optional[Launch]:
    ct = _compute_dtype(dtype)
    if b > RESIDENT_MAX[ct]:
        return None
    bb = _block(b)
    rb, warps = _strips(bb)
    return Launch({"TERMS": terms, flag_name: flag and terms >= 2, "RB": rb, "BB": bb, "F64": ct == torch.float64},
                  warps, maxnreg=255)


def forward_launch(b: int, dtype: torch.dtype, terms: int, powers: bool) -> Optional[Launch]:
    """The resident forward kernel's variant for blocks of size b in S's dtype; None: the tiled path."""
    return _launch(b, dtype, terms, "POWERS", powers)


def backward_launch(b: int, dtype: torch.dtype, terms: int, has_powers: bool) -> Optional[Launch]:
    return _launch(b, dtype, terms, "HAS_POWERS", has_powers)


def _programs(nblocks: int, slots: int, launch: Launch, device: torch.device) -> int:
    if PROGRAMS is not None:
        return max(1, min(PROGRAMS, nblocks))
    if device.type != "cuda":
        return nblocks
    bb = launch.constexprs["BB"]
    per_program = slots * bb * bb * (8 if launch.constexprs["F64"] else 4)
    sms = _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return max(1, min(nblocks, PROGRAMS_PER_SM * sms, WORKSPACE_BYTES // per_program))


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _workspace(nprog: int, slots: int, launch: Launch, like: Tensor) -> Tensor:
    bb = launch.constexprs["BB"]
    return torch.empty(nprog * slots * bb * bb, dtype=_compute_dtype(like.dtype), device=like.device)


# ---- tiled path (b above RESIDENT_MAX) -----------------------------------------------------------------

def _plus_eye(M: Tensor, c: float = 1.0) -> Tensor:
    M.diagonal(dim1=-2, dim2=-1).add_(c)
    return M


def _tiled_powers(A: Tensor, h: int) -> List[Tensor]:
    """P_j = Yʲ, j = 1..h (symmetric: upper-triangle tiles)."""
    P = [torch.empty_like(A)]
    mm(P[0], [(A, A, 1.0)], sym=1)
    for _ in range(1, h):
        P.append(torch.empty_like(A))
        mm(P[-1], [(P[-2], P[0], 1.0)], sym=1)
    return P


def _tiled_forward(A: Tensor, P: List[Tensor], terms: int) -> Tensor:
    if terms == 0:
        return _plus_eye(A.clone())
    h = terms // 2
    Am = _plus_eye(P[0] + 2.0 * A)
    if h == 0:
        return Am
    E = _plus_eye(torch.stack(P).sum(0) if h > 1 else P[0].clone())
    R = torch.empty_like(A)
    if terms % 2 == 1:
        mm(R, [(Am, E, 1.0)])
        return R
    C = torch.empty_like(A)
    mm(C, [(A, P[h - 1], 1.0)], sym=-1)                       # A^(k+1): skew
    mm(R, [(Am, E, 1.0), (C, A, -1.0)], xin=C, alpha=-1.0)    # Am·E − C − C·A
    return R


def _tiled_adjoint(P: List[Tensor], seeds: List[Tensor], h: int, terms: int) -> Tensor:
    """Cotangent of Y from the seeds on Y¹..Yʰ through the chain Yʲ = Yʲ⁻¹·Y (the kernel's L)."""
    if h == 1:
        return seeds[0]
    D = seeds[0]
    if h == 2 and terms % 2 == 1:   # D + YD + DY
        L = torch.empty_like(D)
        mm(L, [(P[0], D, 1.0), (D, P[0], 1.0)], xin=D, alpha=1.0, sym=1)
        return L
    Cc, L = seeds[h - 1], torch.zeros_like(D)
    for j in range(h, 1, -1):
        Ln, Cn = torch.empty_like(D), torch.empty_like(D)
        mm(Ln, [(P[j - 2], Cc, 1.0)], xin=L, alpha=1.0)
        mm(Cn, [(Cc, P[0], 1.0)], xin=seeds[j - 2], alpha=1.0)
        L, Cc = Ln, Cn
    return L + Cc


def _tiled_backward(G: Tensor, A: Tensor, P: List[Tensor], terms: int) -> Tensor:
    if terms == 0:
        return 0.5 * (G - G.mT)
    h = terms // 2
    out = torch.empty_like(A)
    if h == 0:
        W, dY = G, 0.5 * (G + G.mT)
    else:
        E = _plus_eye(torch.stack(P).sum(0) if h > 1 else P[0].clone())
        AmT = _plus_eye(P[0] - 2.0 * A)
        W, D = torch.empty_like(A), torch.empty_like(A)
        mm(W, [(G, E, 1.0)])
        mm(D, [(AmT, G, 1.0), (G.mT, AmT.mT, 1.0)], beta=0.5, sym=1)   # sym(Amᵀ G)
        seeds = [D] * h
        if terms % 2 == 0:
            C, dC, Sd = torch.empty_like(A), torch.empty_like(A), torch.empty_like(A)
            mm(C, [(A, P[h - 1], 1.0)], sym=-1)
            mm(dC, [(G, A, 1.0)], xin=G, alpha=-1.0)
            mm(Sd, [(A, dC, 1.0), (dC.mT, A.mT, 1.0)], xin=D, alpha=1.0, beta=-0.5, sym=1)   # D − sym(A dC)
            seeds[h - 1] = Sd
        L = _tiled_adjoint(P, seeds, h, terms)
        dY = 0.5 * (W + W.mT) + L
        if terms % 2 == 0:   # W += ½ (dC·P_h − Cᵀ·G), after dY
            Wn = torch.empty_like(A)
            mm(Wn, [(dC, P[h - 1], 1.0), (C.mT, G, -1.0)], xin=W, alpha=1.0, beta=0.5)
            W = Wn
    # grad = (W − Wᵀ) − (dY·A + A·dY): dY symmetric, A skew, so dY·A − (dY·A)ᵀ = dY·A + A·dY
    mm(out, [(dY, A, 1.0), (A, dY, 1.0)], xin=(W - W.mT).contiguous(), alpha=1.0, beta=-1.0, sym=-1)
    return out


# ---- launchers -----------------------------------------------------------------------------------------

def _blocks3(S: Tensor) -> Tensor:
    b = S.shape[-1]
    return S.reshape(-1, b, b)


def _skew(S3: Tensor) -> Tensor:
    A = S3.to(_compute_dtype(S3.dtype))
    return (0.5 * (A - A.mT)).contiguous()


def _forward(S: Tensor, terms: int, want_powers: bool, op: str) -> Tuple[Tensor, Optional[Tensor]]:
    _checks.cayley_neumann(S, terms, op=op)
    b, h = S.shape[-1], terms // 2
    R = torch.empty(S.shape, dtype=S.dtype, device=S.device)
    pw = torch.empty(S.shape[:-2] + (h,) + S.shape[-2:], dtype=S.dtype, device=S.device) if want_powers else None
    if S.numel() == 0:
        return R, pw
    S3 = _blocks3(S)
    launch = forward_launch(b, S.dtype, terms, want_powers)
    if launch is not None:
        nprog = _programs(S3.shape[0], FWD_SLOTS, launch, S.device)
        opt_fast_cn_forward_kernel[(nprog,)](
            S3, *S3.stride(), R, pw if pw is not None else R, _workspace(nprog, FWD_SLOTS, launch, S),
            S3.shape[0], b, **launch.constexprs, **launch.options())
        return R, pw
    A = _skew(S3)
    P = _tiled_powers(A, h) if terms > 0 else []
    R.copy_(_tiled_forward(A, P, terms).view(S.shape))
    if pw is not None and h > 0:
        pw.copy_(torch.stack(P, dim=1).view(pw.shape))
    return R, pw


@on_input_device
def cayley_neumann(S: Tensor, terms: int = 5) -> Tensor:
    """``opt_fast::cayley_neumann`` on CUDA (or under TRITON_INTERPRET=1)."""
    return _forward(S, terms, False, "cayley_neumann")[0]


@on_input_device
def cayley_neumann_powers(S: Tensor, terms: int = 5) -> Tuple[Tensor, Tensor]:
    """``opt_fast::cayley_neumann_powers``: R and the powers Yʲ, j = 1..⌊k/2⌋, stacked on dim -3."""
    return _forward(S, terms, True, "cayley_neumann_powers")


def _backward(grad: Tensor, S: Tensor, powers: Optional[Tensor], terms: int) -> Tensor:
    b, h = S.shape[-1], terms // 2
    out = torch.empty(S.shape, dtype=S.dtype, device=S.device)
    if S.numel() == 0:
        return out
    S3, G3 = _blocks3(S), _blocks3(grad)
    launch = backward_launch(b, S.dtype, terms, powers is not None)
    if launch is not None:
        if h >= 3 and powers is None:   # the adjoint loop reads P_j back: compute them once
            powers = _forward(S, terms, True, "cayley_neumann_powers")[1]
            launch = backward_launch(b, S.dtype, terms, True)
        pw = powers.reshape(-1, h, b, b).contiguous() if powers is not None else out
        nprog = _programs(S3.shape[0], BWD_SLOTS, launch, S.device)
        opt_fast_cn_backward_kernel[(nprog,)](
            G3, *G3.stride(), S3, *S3.stride(), pw, out, _workspace(nprog, BWD_SLOTS, launch, S),
            S3.shape[0], b, **launch.constexprs, **launch.options())
        return out
    A = _skew(S3)
    if powers is not None and h > 0:
        P = list(powers.reshape(-1, h, b, b).to(A.dtype).unbind(1))
        P = [p.contiguous() for p in P]
    else:
        P = _tiled_powers(A, h) if h > 0 else []
    out.copy_(_tiled_backward(G3.to(A.dtype), A, P, terms).view(S.shape))
    return out


@on_input_device
def cayley_neumann_backward(grad: Tensor, S: Tensor, terms: int) -> Tensor:
    """``opt_fast::cayley_neumann_backward``: grad_S, the powers recomputed."""
    _checks.cayley_neumann_backward(grad, S, terms)
    return _backward(grad, S, None, terms)


@on_input_device
def cayley_neumann_powers_backward(grad: Tensor, S: Tensor, powers: Tensor, terms: int) -> Tensor:
    """``opt_fast::cayley_neumann_powers_backward``: grad_S from the saved powers."""
    _checks.cayley_neumann_backward(grad, S, terms, powers)
    h = terms // 2
    return _backward(grad, S, powers if h > 0 else None, terms)
