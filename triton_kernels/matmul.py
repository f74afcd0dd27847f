"""Batched matmul with a fused epilogue, the one Triton kernel the Löwdin iterations are built from.

    OUT = alpha * XIN + beta * (L0 @ R0 + w1 * L1 @ R1 + w2 * L2 @ R2)        per batch entry

Operands are [b, m, k] / [b, k, n] tensors of any strides, so a transpose is a free ``.mT`` view (XᵀX reads
X column-wise). Options, all compile-time:

* ``sym = 1 / -1``: the result is known to be symmetric / skew (XᵀX, polynomials of one symmetric matrix,
  commutator-type sums): only the tiles of the upper triangle are computed, each off-diagonal tile is
  stored twice (the transposed copy with the sign), diagonal tiles are (skew-)symmetrised. Half the FLOPs,
  and the result is exactly (skew-)symmetric, which the iterations rely on.
* ``err = True`` (with sym = 1): each program also writes its tile's share of ||OUT - I||_F², so the
  Newton–Schulz stopping measurement costs no extra pass over the matrix.
* ``lowp = True``: operands are rounded to bfloat16 before ``tl.dot`` (fp32 accumulation); only for the
  approximate (Muon-style) mode. Otherwise float32 uses ``input_precision="ieee"``: TF32's 10-bit
  mantissa would perturb the small singular directions of X that decide the polar factor (see lowdin.py).

Tiles are square (BM = BN) so a tile and its mirror have the same shape. Grid: (tiles, batch); no host
loop over the batch.
"""
import functools
import os
from typing import Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl

from . import INTERPRET

# float32 tl.dot precision for the exact path: "ieee" (FMA, exact float32 products), or "tf32x3" (three TF32
# tensor-core passes, about float32 accuracy): the candidate for the GPU targets, chosen by the environment
# variable OPT_FAST_TRITON_F32_PRECISION so that one GPU run can time both (not validated on hardware yet;
# the benchmark's accuracy gate decides). TF32 alone is not offered: see the module docstring.
F32_PRECISIONS = ("ieee", "tf32x3")
F32_PRECISION = os.environ.get("OPT_FAST_TRITON_F32_PRECISION", "ieee")
if F32_PRECISION not in F32_PRECISIONS:
    raise ValueError(f"opt_fast: OPT_FAST_TRITON_F32_PRECISION must be one of {F32_PRECISIONS}, "
                     f"got {F32_PRECISION!r}")
# (BM, BK) forced for every launch (tests use it to get several tiles at small d); None = by size.
BLOCK_OVERRIDE: Optional[Tuple[int, int]] = None


@triton.jit
def _mm_kernel(
    OUT, so_b, so_r, so_c,
    XIN, sx_b, sx_r, sx_c,
    L0, l0_b, l0_r, l0_c, R0, r0_b, r0_r, r0_c,
    L1, l1_b, l1_r, l1_c, R1, r1_b, r1_r, r1_c,
    L2, l2_b, l2_r, l2_c, R2, r2_b, r2_r, r2_c,
    PART, TI, TJ, COEF,
    M, N, K, TN, w1, w2,
    NPROD: tl.constexpr, HAS_XIN: tl.constexpr, SYM: tl.constexpr, ERR: tl.constexpr,
    LOWP: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr,
):
    pid = tl.program_id(0)
    pb = tl.program_id(1).to(tl.int64)
    alpha = tl.load(COEF)       # from memory, in the output dtype: a Python float argument would be
    beta = tl.load(COEF + 1)    # passed as float32, and float64 runs need the schedule's exact coefficients
    if SYM != 0:
        ti = tl.load(TI + pid)   # upper-triangle tile list, ti <= tj
        tj = tl.load(TJ + pid)
    else:
        ti = pid // TN
        tj = pid % TN
    # int64 offsets: no overflow for big batches, and the interpreter skips its (slow) int32 overflow checks
    rows = (ti * BM + tl.arange(0, BM)).to(tl.int64)
    cols = (tj * BM + tl.arange(0, BM)).to(tl.int64)
    ks = tl.arange(0, BK).to(tl.int64)
    rmask = rows < M
    cmask = cols < N
    acc = tl.zeros((BM, BM), dtype=OUT.dtype.element_ty)
    for k0 in range(0, K, BK):
        kk = k0 + ks
        kmask = kk < K
        for p in tl.static_range(NPROD):
            if p == 0:
                Lp, lb, lr, lc, Rp, rb, rr, rc, w = L0, l0_b, l0_r, l0_c, R0, r0_b, r0_r, r0_c, 1.0
            elif p == 1:
                Lp, lb, lr, lc, Rp, rb, rr, rc, w = L1, l1_b, l1_r, l1_c, R1, r1_b, r1_r, r1_c, w1
            else:
                Lp, lb, lr, lc, Rp, rb, rr, rc, w = L2, l2_b, l2_r, l2_c, R2, r2_b, r2_r, r2_c, w2
            a = tl.load(Lp + pb * lb + rows[:, None] * lr + kk[None, :] * lc,
                        mask=rmask[:, None] & kmask[None, :], other=0.0)
            b = tl.load(Rp + pb * rb + kk[:, None] * rr + cols[None, :] * rc,
                        mask=kmask[:, None] & cmask[None, :], other=0.0)
            if p > 0:
                a = a * w   # weights are +-1 or 1/2 in practice: exact
            if LOWP:
                acc = tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16), acc, out_dtype=tl.float32)
            else:
                acc = tl.dot(a, b, acc, input_precision=PREC, out_dtype=acc.dtype)
    out = beta * acc
    omask = rmask[:, None] & cmask[None, :]
    if HAS_XIN:
        x = tl.load(XIN + pb * sx_b + rows[:, None] * sx_r + cols[None, :] * sx_c, mask=omask, other=0.0)
        out = alpha * x + out
    if SYM != 0:
        if ti == tj:   # the diagonal tile holds both triangles: make it exactly (skew-)symmetric
            out = 0.5 * (out + SYM * tl.trans(out))
    out = out.to(OUT.dtype.element_ty)
    tl.store(OUT + pb * so_b + rows[:, None] * so_r + cols[None, :] * so_c, out, mask=omask)
    if SYM != 0:
        if ti != tj:
            tl.store(OUT + pb * so_b + cols[:, None] * so_r + rows[None, :] * so_c, SYM * tl.trans(out),
                     mask=cmask[:, None] & rmask[None, :])
    if ERR:
        dev = out - tl.where(rows[:, None] == cols[None, :], 1.0, 0.0).to(out.dtype)
        dev = tl.where(omask, dev, 0.0)
        part = tl.sum(tl.sum(dev * dev, axis=1), axis=0)
        if ti != tj:
            part = 2.0 * part   # the mirrored tile counts too
        tl.store(PART + pb * tl.num_programs(0) + pid, part)


@functools.lru_cache(maxsize=None)
def _triangle(t: int, device: str) -> Tuple[torch.Tensor, torch.Tensor]:
    idx = torch.triu_indices(t, t)
    return (idx[0].to(torch.int32).to(device), idx[1].to(torch.int32).to(device))


def _blocks(m: int, n: int, k: int) -> Tuple[int, int, int]:
    """(BM, BK, num_warps) from the size. Untuned: no GPU was available when this was written."""
    if BLOCK_OVERRIDE is not None:
        return BLOCK_OVERRIDE[0], BLOCK_OVERRIDE[1], 4
    size = max(m, n)
    if INTERPRET:   # the interpreter pays per program and per loop trip, not per FLOP: few large tiles
        bm = min(64, max(16, triton.next_power_of_2(size)))
        return bm, min(64, max(16, triton.next_power_of_2(k))), 4
    if size <= 32:
        return 32, 32, 4
    return 64, 32, 4


def _s3(t: torch.Tensor):
    return (t, t.stride(0), t.stride(1), t.stride(2))


def mm(out: torch.Tensor, prods: Sequence[Tuple[torch.Tensor, torch.Tensor, float]], *,
       xin: Optional[torch.Tensor] = None, alpha=0.0, beta: float = 1.0, sym: int = 0,
       err: bool = False, lowp: bool = False) -> Optional[torch.Tensor]:
    """out = alpha * xin + beta * Σ w_p L_p @ R_p over 3-d tensors (up to three products; w_0 must be 1).

    ``alpha`` may instead be a 2-element tensor [alpha, beta] of out's dtype and device (beta is then ignored).

    Returns the per-matrix ||out - I||_F² (float, [b]) when ``err``, else None. ``out`` must not alias
    any input.
    """
    assert 1 <= len(prods) <= 3 and prods[0][2] == 1.0
    bsz, m, n = out.shape
    k = prods[0][0].shape[-1]
    if bsz == 0 or m == 0:
        return out.new_zeros(bsz) if err else None
    assert sym == 0 or m == n
    assert not err or sym == 1
    bm, bk, warps = _blocks(m, n, k)
    tm, tn = triton.cdiv(m, bm), triton.cdiv(n, bm)
    if sym:
        ti, tj = _triangle(tm, str(out.device))
        tiles = ti.numel()
    else:
        ti = tj = out   # unused
        tiles = tm * tn
    part = out.new_empty((bsz, tiles)) if err else out
    ops = []
    for p in range(3):
        L, R, _ = prods[min(p, len(prods) - 1)]
        ops += [*_s3(L), *_s3(R)]
    w = [float(prods[p][2]) if p < len(prods) else 0.0 for p in range(3)]
    x = _s3(xin) if xin is not None else _s3(out)
    if not torch.is_tensor(alpha):
        coef = torch.tensor([alpha, beta], dtype=out.dtype).to(out.device, non_blocking=True)
    else:   # a precomputed [alpha, beta] row (the fixed schedule uploads all its steps at once)
        coef = alpha
    prec = F32_PRECISION if out.dtype == torch.float32 else "ieee"
    _mm_kernel[(tiles, bsz)](
        *_s3(out), *x, *ops, part, ti, tj, coef, m, n, k, tn, w[1], w[2],
        NPROD=len(prods), HAS_XIN=xin is not None, SYM=sym, ERR=err, LOWP=lowp, BM=bm, BK=bk, PREC=prec,
        num_warps=warps,
    )
    return part.sum(dim=1) if err else None
