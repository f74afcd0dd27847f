"""Triton launchers for ``opt_fast::block_apply`` and ``opt_fast::block_apply_backward`` (CUDA kernels).

The spec is opt_fast/reference/block_apply.py: Y[..., perm] = blockdiag(R_1..R_nb) X[..., perm], each row
of X a column vector, the coordinates perm[nb·b:] passed through unchanged. In row form y_j = x_j R_jᵀ.

* ``opt_fast_block_apply_kernel`` (forward, and grad_X = the same product with every R_j transposed: a stride swap):
  one program per (row tile, block j, output column chunk). The permutation is fused into the loads and
  the stores: the program reads the b indices perm[j·b : (j+1)·b] and loads X[rows, perm[j·b + k]]
  directly, multiplies by R_jᵀ (loaded in BK × BO chunks, all of R_j at once for b <= 64), and stores to
  Y[rows, perm[j·b + o]]. No permuted copy of X or Y is made. Programs past the nb blocks copy the
  remainder columns perm[nb·b:] (the same gather/scatter, no product). Program order: the blocks of a
  row tile are consecutive, so the row tile's cache lines, which a random permutation spreads over all
  blocks, are reused from L2.
* ``opt_fast_block_grad_r_kernel``: grad_R_j = Σ_rows g_jᵀ x_j (rows as the reduction dimension), split-K over the rows:
  one program per (row split, block, b × b output tile); with several splits each writes its partial
  sum to a [splits, nb, b, b] buffer that one ``sum(0)`` reduces: deterministic (no atomics), at the cost
  of splits × nb·b² floats, small next to X.

Dtypes: R float32 with X float32 / bfloat16 / float16 (X loaded in its dtype, products accumulated in
float32, Y stored in X's dtype), or R and X float64. float32 products use ``input_precision="ieee"``
(the package's float32 choice, matmul.F32_PRECISION). Indices outside 0..n-1 (an invalid perm; it is
validated on CPU only, a check on CUDA would synchronise) are masked: wrong values, never a memory fault.
"""
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from opt_fast import _checks

from . import INTERPRET
from ._device import on_input_device
from ._launch import Launch, f32_precision

__all__ = ["block_apply", "block_apply_backward", "apply_launch", "grad_r_launch"]

# (BR, BO, BK) forced for every launch (tests use it to cover chunked R at small b); None = by size.
BLOCK_OVERRIDE: Optional[Tuple[int, int, int]] = None
# Row splits of the grad_R reduction forced (tests); None = by size.
SPLIT_OVERRIDE: Optional[int] = None


@triton.jit
def _columns(PERM, idx, valid, n, HAS_PERM: tl.constexpr):
    """Columns of X for the permuted coordinates idx (masked where not valid or out of range)."""
    if HAS_PERM:
        col = tl.load(PERM + idx, mask=valid, other=0)
    else:
        col = idx.to(tl.int64)
    return col, valid & (col >= 0) & (col < n)


@triton.jit
def opt_fast_block_apply_kernel(X, x_r, x_c, Y, R, r_j, r_o, r_k, PERM, rows, n, nb, b, chunks, per_row,
                  HAS_PERM: tl.constexpr, BR: tl.constexpr, BO: tl.constexpr, BK: tl.constexpr,
                  F64: tl.constexpr, PREC: tl.constexpr):
    """Y[r, perm[j·b + o]] = Σ_k X[r, perm[j·b + k]] · Rv[j, o, k] (Rv = R, or Rᵀ per block for grad_X);
    Y is contiguous [rows, n]. Grid: row tiles × per_row (nb·chunks products, then the remainder's copy
    programs), the blocks of a row tile consecutive."""
    pid = tl.program_id(0)
    pr = (pid // per_row).to(tl.int64)
    q = pid % per_row
    r = (pr * BR + tl.arange(0, BR)).to(tl.int64)
    rmask = r < rows
    if q < nb * chunks:
        j = (q // chunks).to(tl.int64)
        o = (q % chunks) * BO + tl.arange(0, BO)
        omask = o < b
        acc = tl.zeros((BR, BO), dtype=tl.float64 if F64 else tl.float32)
        for k0 in range(0, b, BK):
            k = k0 + tl.arange(0, BK)
            kmask = k < b
            col, cmask = _columns(PERM, j * b + k, kmask, n, HAS_PERM)
            x = tl.load(X + r[:, None] * x_r + col[None, :] * x_c, mask=rmask[:, None] & cmask[None, :], other=0.0)
            rt = tl.load(R + j * r_j + k[:, None] * r_k + o[None, :] * r_o, mask=kmask[:, None] & omask[None, :],
                         other=0.0)
            acc = tl.dot(x.to(acc.dtype), rt, acc, input_precision=PREC, out_dtype=acc.dtype)
        col, cmask = _columns(PERM, j * b + o, omask, n, HAS_PERM)
        tl.store(Y + r[:, None] * n + col[None, :], acc.to(Y.dtype.element_ty), mask=rmask[:, None] & cmask[None, :])
    else:   # identity remainder: coordinates perm[nb·b:]
        c = (q - nb * chunks) * BO + tl.arange(0, BO)
        col, cmask = _columns(PERM, nb * b + c, nb * b + c < n, n, HAS_PERM)
        m = rmask[:, None] & cmask[None, :]
        v = tl.load(X + r[:, None] * x_r + col[None, :] * x_c, mask=m)
        tl.store(Y + r[:, None] * n + col[None, :], v.to(Y.dtype.element_ty), mask=m)


@triton.jit
def opt_fast_block_grad_r_kernel(G, g_r, g_c, X, x_r, x_c, OUT, PERM, rows, n, nb, b, tiles, rows_per_split,
                   HAS_PERM: tl.constexpr, BR: tl.constexpr, BI: tl.constexpr, F64: tl.constexpr,
                   PREC: tl.constexpr):
    """OUT[s, j, i, l] = Σ_{r in split s} G[r, perm[j·b + i]] · X[r, perm[j·b + l]] for the BI × BI tile
    (ti, tl) of block j; grid tiles² × nb × splits (one axis: no 65535 limit on nb), split slowest."""
    pid = tl.program_id(0)
    t = pid % (tiles * tiles)
    j = ((pid // (tiles * tiles)) % nb).to(tl.int64)
    s = (pid // (tiles * tiles * nb)).to(tl.int64)
    i = (t // tiles) * BI + tl.arange(0, BI)
    l = (t % tiles) * BI + tl.arange(0, BI)
    ci, imask = _columns(PERM, j * b + i, i < b, n, HAS_PERM)
    cl, lmask = _columns(PERM, j * b + l, l < b, n, HAS_PERM)
    acc = tl.zeros((BI, BI), dtype=tl.float64 if F64 else tl.float32)
    r0 = s * rows_per_split
    r1 = tl.minimum(r0 + rows_per_split, rows)
    for rs in range(r0, r1, BR):
        r = rs + tl.arange(0, BR).to(tl.int64)
        rmask = r < r1
        gt = tl.load(G + r[None, :] * g_r + ci[:, None] * g_c, mask=imask[:, None] & rmask[None, :], other=0.0)
        x = tl.load(X + r[:, None] * x_r + cl[None, :] * x_c, mask=rmask[:, None] & lmask[None, :], other=0.0)
        acc = tl.dot(gt.to(acc.dtype), x.to(acc.dtype), acc, input_precision=PREC, out_dtype=acc.dtype)
    i64 = i.to(tl.int64)
    tl.store(OUT + ((s * nb + j) * b + i64[:, None]) * b + l[None, :], acc.to(OUT.dtype.element_ty),
             mask=(i < b)[:, None] & (l < b)[None, :])


# ---- launch configs (data: the launchers and the ahead-of-time compile check both read them) ---------

def _block(b: int) -> int:
    return max(16, triton.next_power_of_2(b))


def _tiles(b: int, f64: bool) -> Tuple[int, int, int]:
    """(BR, BO, BK) for blocks of size b. Untuned: no GPU was available when this was written."""
    if BLOCK_OVERRIDE is not None:
        return BLOCK_OVERRIDE
    bb = _block(b)
    if INTERPRET:   # the interpreter pays per program and per loop trip, not per FLOP: few large tiles
        return 64, min(bb, 128), min(bb, 128)
    if f64:   # 32 × 64 float64 tiles spilled a word on sm_80 (scripts/check_gpu_compile.sh)
        return 32, min(bb, 32), min(bb, 32)
    return 64, min(bb, 64), min(bb, 32)


# Register cap: with none, ptxas aimed at an occupancy target (72-96 registers) and spilled 8-24 B in some
# stride specialisations, float32 and float64 (scripts/check_gpu_compile.sh); capped at the maximum it
# spends what the tile needs.
_MAXNREG = 255


def apply_launch(b: int, r_dtype: torch.dtype, has_perm: bool) -> Launch:
    f64, prec = r_dtype == torch.float64, f32_precision(r_dtype)
    br, bo, bk = _tiles(b, f64)
    if prec == "tf32x3" and BLOCK_OVERRIDE is None:   # three passes: 64 × 64 spilled 32-48 B at 255 on sm_80
        bo = min(bo, 32)
    return Launch(dict(HAS_PERM=has_perm, BR=br, BO=bo, BK=bk, F64=f64, PREC=prec), 4, maxnreg=_MAXNREG)


def grad_r_launch(b: int, r_dtype: torch.dtype, has_perm: bool) -> Launch:
    """BI × BI output tiles of grad_R_j, BR rows (the reduction dimension) a step."""
    f64 = r_dtype == torch.float64
    br, bo, bk = _tiles(b, f64)
    if BLOCK_OVERRIDE is None and not INTERPRET:   # 64 × 64 tiles took 241-255 registers (sm_80 / sm_90)
        br, bo = bk, min(bo, 32)
    return Launch(dict(HAS_PERM=has_perm, BR=br, BI=bo, F64=f64, PREC=f32_precision(r_dtype)), 4,
                  maxnreg=_MAXNREG)


def _splits(rows: int, programs: int, br: int) -> int:
    """Row splits of the grad_R reduction: enough programs to fill a GPU (~512), each split >= 4 row tiles."""
    if SPLIT_OVERRIDE is not None:
        return max(1, min(SPLIT_OVERRIDE, triton.cdiv(rows, br)))
    if INTERPRET:
        return 1
    return max(1, min(triton.cdiv(512, programs), triton.cdiv(rows, 4 * br)))


# ---- launchers -----------------------------------------------------------------------------------------

def _perm_or(perm: Optional[Tensor], X2: Tensor) -> Tensor:
    """The perm pointer argument: perm with unit stride (the kernels index it as PERM + i), or any tensor
    when there is none (HAS_PERM is then False and it is never read)."""
    return X2 if perm is None else perm.contiguous()


def _rows(X: Tensor) -> Tensor:
    return X.reshape(-1, X.shape[-1])


def _apply(X: Tensor, Rv: Tensor, perm: Optional[Tensor], nb: int, b: int) -> Tensor:
    """Y (contiguous, X's shape and dtype) = the permuted block product of the rows of X with Rv[j]ᵀ."""
    Y = torch.empty(X.shape, dtype=X.dtype, device=X.device)
    n = X.shape[-1]
    if X.numel() == 0:
        return Y
    X2 = _rows(X)
    rows = X2.shape[0]
    launch = apply_launch(b, Rv.dtype, perm is not None)
    br, bo = launch.constexprs["BR"], launch.constexprs["BO"]
    chunks = triton.cdiv(b, bo) if nb else 0
    per_row = nb * chunks + triton.cdiv(n - nb * b, bo)
    grid = (triton.cdiv(rows, br) * per_row,)
    opt_fast_block_apply_kernel[grid](X2, *X2.stride(), Y, Rv, *Rv.stride(), _perm_or(perm, X2), rows, n, nb, b,
                        chunks, per_row, **launch.constexprs, **launch.options())
    return Y


@on_input_device
def block_apply(R: Tensor, X: Tensor, perm: Optional[Tensor] = None) -> Tensor:
    """``opt_fast::block_apply`` on CUDA (or under TRITON_INTERPRET=1)."""
    _checks.block_apply(R, X, perm)
    return _apply(X, R, perm, R.shape[0], R.shape[-1])


def _grad_r(G2: Tensor, X2: Tensor, R: Tensor, perm: Optional[Tensor]) -> Tensor:
    nb, b = R.shape[0], R.shape[-1]
    rows, n = X2.shape
    launch = grad_r_launch(b, R.dtype, perm is not None)
    br, bi = launch.constexprs["BR"], launch.constexprs["BI"]
    tiles = triton.cdiv(b, bi)
    splits = _splits(rows, tiles * tiles * nb, br)
    per_split = triton.cdiv(triton.cdiv(rows, splits), br) * br
    splits = triton.cdiv(rows, per_split)
    out = torch.empty((splits, nb, b, b), dtype=R.dtype, device=R.device)
    opt_fast_block_grad_r_kernel[(tiles * tiles * nb * splits,)](
        G2, *G2.stride(), X2, *X2.stride(), out, _perm_or(perm, X2), rows, n, nb, b, tiles, per_split,
        **launch.constexprs, **launch.options())
    return out[0] if splits == 1 else out.sum(0)


@on_input_device
def block_apply_backward(grad: Tensor, R: Tensor, X: Tensor, perm: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """``opt_fast::block_apply_backward``: (grad_R = Σ_rows g_j x_jᵀ, grad_X = the product with every R_jᵀ).
    The forward's checks and grad in X's dtype, as the C++ backward makes them."""
    op = "block_apply_backward"
    _checks.grad_like(op, grad, X.shape)
    _checks.block_apply(R, X, perm)
    if grad.dtype != X.dtype:
        _checks.fail(op, f"expected grad of dtype {X.dtype}, got {grad.dtype}")
    nb, b = R.shape[0], R.shape[-1]
    grad_X = _apply(grad, R.mT, perm, nb, b)
    if X.numel() == 0 or nb == 0:
        return torch.zeros(R.shape, dtype=R.dtype, device=R.device), grad_X
    return _grad_r(_rows(grad), _rows(X), R, perm), grad_X
