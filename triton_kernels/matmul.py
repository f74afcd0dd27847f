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

Tiles are square (BM = BN) so a tile and its mirror have the same shape. Grid: one axis of batch × tiles
(grid axes y and z hold only 65535 programs), sliced into several launches only beyond 2^31 - 1 programs.
The coefficients alpha and beta are kernel arguments (float64 ones split into three float32 values), so a
launch needs no host-to-device copy, and no launch synchronises with the host.

Launch configuration (``pick_config``): square BM × BM tiles, BK, warps and pipelining stages from a short
candidate list per number of products, the first whose shared memory (``smem_estimate``) fits the current
device's opt-in limit, read from Triton's driver at run time (A100: 166,912 B per block, H100: 232,448 B,
RTX 30xx/40xx, A10, L4: 101,376 B). The compile stage
(scripts/check_gpu_compile.sh: opt_fast.triton_kernels.aot) compiles every config the launchers pick for
sm_80 and sm_90 and fails on shared memory over the limit or on register spills.

``ieee`` float32 products are plain FMA on the CUDA cores, no tensor cores (H100 SXM datasheet: 67 TFLOP/s
float32 FMA against 495 dense TF32 on the tensor cores); ``tf32x3`` runs three TF32 tensor-core passes.
"""
import functools
import os
import struct
from typing import NamedTuple, Optional, Sequence, Tuple, Union

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
# A Config, or (BM, BK), forced for every launch (tests use it to get several tiles at small d); None = picked.
BLOCK_OVERRIDE: Optional[Union["Config", Tuple[int, int]]] = None
MAX_PROGRAMS = 2 ** 31 - 1   # CUDA's limit on grid axis x (a variable so that tests can lower it)


@triton.jit
def opt_fast_mm_kernel(
    OUT, so_b, so_r, so_c,
    XIN, sx_b, sx_r, sx_c,
    L0, l0_b, l0_r, l0_c, R0, r0_b, r0_r, r0_c,
    L1, l1_b, l1_r, l1_c, R1, r1_b, r1_r, r1_c,
    L2, l2_b, l2_r, l2_c, R2, r2_b, r2_r, r2_c,
    PART, TI, TJ,
    M, N, K, TN, TILES, w1, w2, a0, a1, a2, b0, b1, b2,
    NPROD: tl.constexpr, HAS_XIN: tl.constexpr, SYM: tl.constexpr, ERR: tl.constexpr,
    LOWP: tl.constexpr, F64: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr,
):
    # one grid axis, batch-major: x allows 2^31 - 1 programs (y and z only 65535), and consecutive programs
    # are tiles of one matrix (operand reuse in L2)
    pid = tl.program_id(0)
    pb = (pid // TILES).to(tl.int64)
    t = pid % TILES
    if F64:   # float32 kernel arguments carrying float64 coefficients exactly (host: _split3)
        alpha = tl.cast(a0, tl.float64) + tl.cast(a1, tl.float64) + tl.cast(a2, tl.float64)
        beta = tl.cast(b0, tl.float64) + tl.cast(b1, tl.float64) + tl.cast(b2, tl.float64)
    else:
        alpha = a0
        beta = b0
    if SYM != 0:
        ti = tl.load(TI + t)   # upper-triangle tile list, ti <= tj
        tj = tl.load(TJ + t)
    else:
        ti = t // TN
        tj = t % TN
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
        tl.store(PART + pb * TILES + t, part)


@functools.lru_cache(maxsize=None)
def _triangle(t: int, device: str) -> Tuple[torch.Tensor, torch.Tensor]:
    idx = torch.triu_indices(t, t)
    return (idx[0].to(torch.int32).to(device), idx[1].to(torch.int32).to(device))


# ---- launch configuration --------------------------------------------------------------------------------

class Config(NamedTuple):
    bm: int       # square output tiles BM × BM
    bk: int       # K step
    warps: int
    stages: int   # software-pipelining depth of the K loop (Triton's num_stages)


def smem_estimate(cfg: Config, nprod: int, itemsize: int) -> int:
    """An upper bound of the shared memory (bytes) Triton allocates for a config: per pipelining stage and
    product the two BM × BK operand tiles, plus two tiles (layout conversions; the operands are staged in
    their loaded dtype, float32 for the bfloat16 mode), at least the epilogue's BM × BM float32 tile.
    It held for every kernel the compile stage saw; the stage fails if a picked config's compiled size
    exceeds its target's limit."""
    return max((cfg.stages * nprod * 2 + 2) * cfg.bm * cfg.bk * itemsize, cfg.bm * cfg.bm * 4)


# Candidates best first; the first that fits the device's shared memory is taken (the first ones fit an
# A100 and an H100, the later ones serve GPUs with 99 KB or 48 KB per block). Chosen from the compile
# stage's register counts, not from timings (no GPU has run them): 64 × 64 float32 FMA tiles take 255
# registers with 4 warps and spill; with 8 warps and BK = 16 one or two products compile without spills on
# sm_80 and sm_90 in every dtype (BK = 32 spills a few bytes in some), while three products (the backward's
# E step) and small matrices only compile spill-free as 32 × 32 tiles at BK = 16 with 4 warps (ptxas even
# spills 32 × 32 float64 tiles at BK = 32 on sm_90, at 80 registers). Two float64 products with an input
# term or a triangle (cayley_neumann's tiled path) spilled 8-16 B at 64 × 64: float64 takes the 32 × 32 list
# from two products on.
_LAST = Config(32, 16, 4, 1)   # fits 48 KB whatever the dtype
_SMALL = (Config(32, 16, 4, 3), Config(32, 16, 4, 2), _LAST)
_LARGE = {1: (Config(64, 16, 8, 3), Config(64, 16, 8, 2), Config(32, 16, 4, 2), _LAST),
          3: (Config(32, 16, 4, 3), Config(32, 16, 4, 2), _LAST)}
_LARGE[2] = _LARGE[1]


@functools.lru_cache(maxsize=None)
def _device_smem(device: int) -> int:
    from triton.runtime import driver
    return driver.active.utils.get_device_properties(device)["max_shared_mem"]


def smem_limit() -> int:
    """The current device's opt-in shared memory per block, from Triton's driver (the launchers make the
    input's device current first)."""
    from triton.runtime import driver
    return _device_smem(driver.active.get_current_device())


def candidates(size: int, nprod: int, itemsize: int) -> Tuple[Config, ...]:
    """The configs for max(m, n) = size, ``nprod`` products of ``itemsize``-byte operands, best first."""
    return _SMALL if size <= 32 else _LARGE[3 if itemsize == 8 and nprod >= 2 else nprod]


def pick_config(size: int, nprod: int, itemsize: int, limit: int) -> Config:
    """The launch configuration for max(m, n) = size, ``nprod`` products of operands of ``itemsize`` bytes
    on a device with ``limit`` bytes of shared memory per block: the first candidate that fits."""
    candidates_ = candidates(size, nprod, itemsize)
    for cfg in candidates_:
        if smem_estimate(cfg, nprod, itemsize) <= limit:
            return cfg
    return candidates_[-1]


def _config(m: int, n: int, k: int, nprod: int, itemsize: int) -> Config:
    if BLOCK_OVERRIDE is not None:
        return BLOCK_OVERRIDE if isinstance(BLOCK_OVERRIDE, Config) else Config(*BLOCK_OVERRIDE, 4, 2)
    if INTERPRET:   # the interpreter pays per program and per loop trip, not per FLOP: few large tiles
        bm = min(64, max(16, triton.next_power_of_2(max(m, n))))
        return Config(bm, min(64, max(16, triton.next_power_of_2(k))), 4, 1)
    return pick_config(max(m, n), nprod, itemsize, smem_limit())


def _split3(v: float) -> Tuple[float, float, float]:
    """v = hi + mid + lo exactly with each part a float32 value: Triton passes Python floats as float32, so a
    float64 coefficient travels as three kernel arguments (53 <= 3 × 24 bits) instead of through memory."""
    hi = _f32(v)
    mid = _f32(v - hi)
    return hi, mid, _f32(v - hi - mid)


def _f32(v: float) -> float:
    return struct.unpack("f", struct.pack("f", v))[0]


def _s3(t: torch.Tensor):
    return (t, t.stride(0), t.stride(1), t.stride(2))


def mm(out: torch.Tensor, prods: Sequence[Tuple[torch.Tensor, torch.Tensor, float]], *,
       xin: Optional[torch.Tensor] = None, alpha: float = 0.0, beta: float = 1.0, sym: int = 0,
       err: bool = False, lowp: bool = False) -> Optional[torch.Tensor]:
    """out = alpha * xin + beta * Σ w_p L_p @ R_p over 3-d tensors (up to three products; w_0 must be 1).

    Returns the per-matrix ||out - I||_F² (float, [b]) when ``err``, else None. ``out`` must not alias
    any input. No host synchronisation and no host-to-device copy (beyond the first call's tile list).
    """
    assert 1 <= len(prods) <= 3 and prods[0][2] == 1.0
    bsz, m, n = out.shape
    k = prods[0][0].shape[-1]
    if bsz == 0 or m == 0:
        return out.new_zeros(bsz) if err else None
    assert sym == 0 or m == n
    assert not err or sym == 1
    cfg = _config(m, n, k, len(prods), out.element_size())
    tm, tn = triton.cdiv(m, cfg.bm), triton.cdiv(n, cfg.bm)
    tiles = tm * (tm + 1) // 2 if sym else tm * tn
    chunk = max(1, MAX_PROGRAMS // tiles)
    if bsz > chunk:   # more programs than one grid axis holds: launch the batch in slices
        parts = [mm(out[i:i + chunk], [(L[i:i + chunk], R[i:i + chunk], w) for L, R, w in prods],
                    xin=None if xin is None else xin[i:i + chunk], alpha=alpha, beta=beta, sym=sym, err=err,
                    lowp=lowp) for i in range(0, bsz, chunk)]
        return torch.cat(parts) if err else None
    ti, tj = _triangle(tm, str(out.device)) if sym else (out, out)   # (unused without sym)
    part = out.new_empty((bsz, tiles)) if err else out
    ops = []
    for p in range(3):
        L, R, _ = prods[min(p, len(prods) - 1)]
        ops += [*_s3(L), *_s3(R)]
    w = [float(prods[p][2]) if p < len(prods) else 0.0 for p in range(3)]
    x = _s3(xin) if xin is not None else _s3(out)
    prec = F32_PRECISION if out.dtype == torch.float32 else "ieee"
    opt_fast_mm_kernel[(bsz * tiles,)](
        *_s3(out), *x, *ops, part, ti, tj, m, n, k, tn, tiles, w[1], w[2], *_split3(alpha), *_split3(beta),
        NPROD=len(prods), HAS_XIN=xin is not None, SYM=sym, ERR=err, LOWP=lowp,
        F64=out.dtype == torch.float64, BM=cfg.bm, BK=cfg.bk, PREC=prec,
        num_warps=cfg.warps, num_stages=cfg.stages,
    )
    return part.sum(dim=1) if err else None
