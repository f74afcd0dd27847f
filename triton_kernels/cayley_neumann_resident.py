"""The one-program-per-block Triton kernels of ``cayley_neumann`` (b <= 128); launchers in cayley_neumann.py.

A program owns a workspace of padded BB × BB matrices ("slots", row-major, leading dim BB) and takes
blocks pid, pid + nprog, ...: it loads S (and G) once, runs the whole product sequence of the fused
scheme (cayley_neumann.py's docstring) on its block, and writes R / the powers / grad_S once. Every
product is computed in row strips of RB rows (acc [RB, BB]) by rank-1 updates over k, the operands
streamed from the slots (L1/L2 resident: BB = 128, float32 is 64 KiB a slot):

* a thread holds about 8 accumulator entries and one slice of a column / row per k. ``tl.dot`` with
  float32 "ieee" precision is an FMA loop too, but holds each thread's operand rows and columns for all
  of K (and needs K >= 16): the whole-block version of these kernels spilled from BB = 64 on (sm_80:
  15 KB of spill stores in the BB = 64 backward), see scripts/check_gpu_compile.sh;
* whole-block values never live in registers, so the register use does not grow with BB;
* a step writes its result strips to a slot and ends with a barrier, so the next step reads them from
  any thread (and a slot is only rewritten after the step that read it has ended).

A matrix is a (pointer, leading dim) pair: a slot (ld = BB) or one of the saved powers (ld = b). Every
load is masked to the b × b part, so nothing outside it is ever read and padding is never written.
"""
import triton
import triton.language as tl


@triton.jit
def _strip(P, ld, r0, b, RB: tl.constexpr, BB: tl.constexpr, T: tl.constexpr):
    """Rows r0 .. r0 + RB of the b × b matrix at P (of its transpose when T), zero-padded to BB columns."""
    r = (r0 + tl.arange(0, RB)).to(tl.int64)
    c = tl.arange(0, BB).to(tl.int64)
    m = (r[:, None] < b) & (c[None, :] < b)
    if T:
        return tl.load(P + c[None, :] * ld + r[:, None], mask=m, other=0.0)
    return tl.load(P + r[:, None] * ld + c[None, :], mask=m, other=0.0)


@triton.jit
def _pair(P, s_r, s_c, r0, b, RB: tl.constexpr, BB: tl.constexpr, F64: tl.constexpr):
    """Rows r0 .. of a strided input block and of its transpose, in the compute dtype."""
    r = (r0 + tl.arange(0, RB)).to(tl.int64)
    c = tl.arange(0, BB).to(tl.int64)
    m = (r[:, None] < b) & (c[None, :] < b)
    x = tl.load(P + r[:, None] * s_r + c[None, :] * s_c, mask=m, other=0.0)
    xt = tl.load(P + c[None, :] * s_r + r[:, None] * s_c, mask=m, other=0.0)
    ct: tl.constexpr = tl.float64 if F64 else tl.float32
    return x.to(ct), xt.to(ct)


@triton.jit
def _put(P, ld, r0, x, b):
    """Rows r0 .. of x into the matrix at P (masked to b × b, converted to P's dtype)."""
    r = (r0 + tl.arange(0, x.shape[0])).to(tl.int64)
    c = tl.arange(0, x.shape[1]).to(tl.int64)
    tl.store(P + r[:, None] * ld + c[None, :], x.to(P.dtype.element_ty), mask=(r[:, None] < b) & (c[None, :] < b))


@triton.jit
def _eye(r0, RB: tl.constexpr, BB: tl.constexpr):
    r = r0 + tl.arange(0, RB)
    c = tl.arange(0, BB)
    return tl.where(r[:, None] == c[None, :], 1.0, 0.0)


@triton.jit
def _mm(acc, r0, X, ldx, TX: tl.constexpr, cx, Y, ldy, cy, cI, Z, ldz, TZ: tl.constexpr, zI, b):
    """acc + rows r0 .. of (cI·I + cx·op(X) + cy·Y) · (zI·I + op(Z)); op = transpose where T; cy = 0:
    Y unused. Rank-1 updates: column k of the left factor (the strip's rows) times row k of the right."""
    r = r0 + tl.arange(0, acc.shape[0])
    c = tl.arange(0, acc.shape[1])
    rm = r < b
    cm = c < b
    for k in range(0, b):
        if TX:
            a = tl.load(X + (k * ldx + r), mask=rm, other=0.0)
        else:
            a = tl.load(X + (r * ldx + k), mask=rm, other=0.0)
        a = cx * a.to(acc.dtype)
        if cy != 0:
            a += cy * tl.load(Y + (r * ldy + k), mask=rm, other=0.0).to(acc.dtype)
        if cI != 0:
            a += tl.where(r == k, cI, 0.0).to(acc.dtype)
        if TZ:
            z = tl.load(Z + (c * ldz + k), mask=cm, other=0.0)
        else:
            z = tl.load(Z + (k * ldz + c), mask=cm, other=0.0)
        z = z.to(acc.dtype)
        if zI != 0:
            z += tl.where(c == k, zI, 0.0).to(acc.dtype)
        acc += a[:, None] * z[None, :]
    return acc


@triton.jit
def _product(DST, X, ldx, TX: tl.constexpr, cx, Y, ldy, cy, cI, Z, ldz, TZ: tl.constexpr, zI, C0, c0, b,
             RB: tl.constexpr, BB: tl.constexpr):
    """Step: slot DST = c0·C0 + (cI·I + cx·op(X) + cy·Y) · (zI·I + op(Z)) (c0 = 0: C0 unused)."""
    for r0 in range(0, b, RB):
        acc = tl.zeros((RB, BB), dtype=DST.dtype.element_ty)
        if c0 != 0:
            acc += c0 * _strip(C0, BB, r0, b, RB, BB, False)
        acc = _mm(acc, r0, X, ldx, TX, cx, Y, ldy, cy, cI, Z, ldz, TZ, zI, b)
        _put(DST, BB, r0, acc, b)
    tl.debug_barrier()


@triton.jit
def _comb_step(DST, X, cx, cxt, C0, c0, b, RB: tl.constexpr, BB: tl.constexpr):
    """Step: slot DST = cx·X + cxt·Xᵀ + c0·C0 (a zero coefficient: that term is not read)."""
    for r0 in range(0, b, RB):
        v = tl.zeros((RB, BB), dtype=DST.dtype.element_ty)
        if cx != 0:
            v += cx * _strip(X, BB, r0, b, RB, BB, False)
        if cxt != 0:
            v += cxt * _strip(X, BB, r0, b, RB, BB, True)
        if c0 != 0:
            v += c0 * _strip(C0, BB, r0, b, RB, BB, False)
        _put(DST, BB, r0, v, b)
    tl.debug_barrier()


@triton.jit
def opt_fast_cn_forward_kernel(S, s_b, s_r, s_c, R, POW, WS, nblocks, b,
                      TERMS: tl.constexpr, POWERS: tl.constexpr, RB: tl.constexpr, BB: tl.constexpr,
                      F64: tl.constexpr):
    """R (and the powers P_1..P_h when POWERS) of blocks pid, pid + nprog, ...; 5 workspace slots:
    A, Y, Σ_j P_j, and two for P_j (j >= 2) / C = A·P_h."""
    H: tl.constexpr = TERMS // 2
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    sz: tl.constexpr = BB * BB
    ws = WS + pid.to(tl.int64) * 5 * sz
    SA, SY, SE = ws, ws + sz, ws + 2 * sz
    for it in range(0, tl.cdiv(nblocks - pid, nprog)):
        g = pid.to(tl.int64) + it * nprog   # the block
        Sg, Rg = S + g * s_b, R + g * b * b
        if TERMS <= 1:   # R = I + A (k = 0) or I + 2A + A² (k = 1)
            if TERMS == 1:
                for r0 in range(0, b, RB):
                    s, st = _pair(Sg, s_r, s_c, r0, b, RB, BB, F64)
                    _put(SA, BB, r0, 0.5 * (s - st), b)
                tl.debug_barrier()
            for r0 in range(0, b, RB):
                s, st = _pair(Sg, s_r, s_c, r0, b, RB, BB, F64)
                out = _eye(r0, RB, BB) + (TERMS + 1) * 0.5 * (s - st)
                if TERMS == 1:
                    out = _mm(out, r0, SA, BB, False, 1.0, SA, BB, 0.0, 0.0, SA, BB, False, 0.0, b)
                _put(Rg, b, r0, out, b)
        else:
            for r0 in range(0, b, RB):
                s, st = _pair(Sg, s_r, s_c, r0, b, RB, BB, F64)
                _put(SA, BB, r0, 0.5 * (s - st), b)
            tl.debug_barrier()
            _product(SY, SA, BB, False, 1.0, SA, BB, 0.0, 0.0, SA, BB, False, 0.0, SA, 0.0, b, RB, BB)
            if POWERS:
                for r0 in range(0, b, RB):
                    _put(POW + g * H * b * b, b, r0, _strip(SY, BB, r0, b, RB, BB, False), b)
            prev = SY
            SEp = SY   # Σ_j P_j so far (Y for h = 1)
            for j in tl.static_range(2, H + 1):
                slot = ws + (3 + j % 2) * sz
                _product(slot, prev, BB, False, 1.0, SA, BB, 0.0, 0.0, SY, BB, False, 0.0, SA, 0.0, b, RB, BB)
                for r0 in range(0, b, RB):   # Σ P_j += P_j (from j = 3 each thread rewrites what it read)
                    p = _strip(slot, BB, r0, b, RB, BB, False)
                    _put(SE, BB, r0, _strip(SEp, BB, r0, b, RB, BB, False) + p, b)
                    if POWERS:
                        _put(POW + (g * H + j - 1) * b * b, b, r0, p, b)
                tl.debug_barrier()
                prev = slot
                SEp = SE
            if TERMS % 2 == 0:   # C = A·P_h = A^(k+1), into the free power slot
                SC = ws + (3 + (H + 1) % 2) * sz
                _product(SC, SA, BB, False, 1.0, SA, BB, 0.0, 0.0, prev, BB, False, 0.0, SA, 0.0, b, RB, BB)
            for r0 in range(0, b, RB):
                acc = tl.zeros((RB, BB), dtype=SA.dtype.element_ty)
                if TERMS % 2 == 0:   # − C − C·A
                    acc = _mm(-_strip(SC, BB, r0, b, RB, BB, False), r0, SC, BB, False, -1.0, SA, BB, 0.0, 0.0,
                              SA, BB, False, 0.0, b)
                # + Am·E = (I + 2A + Y)(I + Σ P_j)
                acc = _mm(acc, r0, SA, BB, False, 2.0, SY, BB, 1.0, 1.0, SEp, BB, False, 1.0, b)
                _put(Rg, b, r0, acc, b)
        tl.debug_barrier()   # the next block's first writes must not overtake this block's last reads


@triton.jit
def opt_fast_cn_backward_kernel(G, g_b, g_r, g_c, S, s_b, s_r, s_c, POW, OUT, WS, nblocks, b,
                       TERMS: tl.constexpr, HAS_POWERS: tl.constexpr, RB: tl.constexpr, BB: tl.constexpr,
                       F64: tl.constexpr):
    """grad_S = W − Wᵀ of blocks pid, pid + nprog, ... (csrc/cpu/cayley_neumann.cpp, backward_impl);
    11 workspace slots: A, G, Y, Σ P_j / seed, P_2 / adjoint chain, W, D / dY, temp, C, dC, L."""
    H: tl.constexpr = TERMS // 2
    EVEN: tl.constexpr = TERMS % 2 == 0
    tl.static_assert(HAS_POWERS or H < 3, "the adjoint loop for h >= 3 reads the saved powers")
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    sz: tl.constexpr = BB * BB
    ws = WS + pid.to(tl.int64) * 11 * sz
    SA, SG, SE, S4, SW, SD, ST = ws, ws + sz, ws + 3 * sz, ws + 4 * sz, ws + 5 * sz, ws + 6 * sz, ws + 7 * sz
    SC, SDC, SL = ws + 8 * sz, ws + 9 * sz, ws + 10 * sz
    for it in range(0, tl.cdiv(nblocks - pid, nprog)):
        g = pid.to(tl.int64) + it * nprog
        Gg, Sg, Og = G + g * g_b, S + g * s_b, OUT + g * b * b
        if TERMS == 0:   # grad_S = skew(G)
            for r0 in range(0, b, RB):
                gm, gt = _pair(Gg, g_r, g_c, r0, b, RB, BB, F64)
                _put(Og, b, r0, 0.5 * (gm - gt), b)
        else:
            for r0 in range(0, b, RB):
                s, st = _pair(Sg, s_r, s_c, r0, b, RB, BB, F64)
                _put(SA, BB, r0, 0.5 * (s - st), b)
                gm, gt = _pair(Gg, g_r, g_c, r0, b, RB, BB, F64)
                _put(SG, BB, r0, gm, b)
            tl.debug_barrier()
            SWp = SG   # W = dAm: G itself for k = 1
            if H > 0:
                # Y, P_h and Σ_j P_j: from the saved powers, or recomputed (h <= 2) into slots 2 and 4
                if HAS_POWERS:
                    PY, ldy = POW + g * H * b * b, b
                    PH, ldh = POW + (g * H + H - 1) * b * b, b
                    for r0 in range(0, b, RB):
                        e = tl.zeros((RB, BB), dtype=SA.dtype.element_ty)
                        for j in tl.static_range(0, H):
                            e += _strip(POW + (g * H + j) * b * b, b, r0, b, RB, BB, False).to(e.dtype)
                        _put(SE, BB, r0, e, b)
                    tl.debug_barrier()
                else:
                    PY, ldy = ws + 2 * sz, BB
                    _product(PY, SA, BB, False, 1.0, SA, BB, 0.0, 0.0, SA, BB, False, 0.0, SA, 0.0, b, RB, BB)
                    PH, ldh = PY, BB
                    if H == 2:
                        PH = S4
                        _product(PH, PY, BB, False, 1.0, SA, BB, 0.0, 0.0, PY, BB, False, 0.0, SA, 0.0, b, RB, BB)
                        _comb_step(SE, PY, 1.0, 0.0, PH, 1.0, b, RB, BB)
                    else:
                        _comb_step(SE, PY, 1.0, 0.0, PY, 0.0, b, RB, BB)
                _product(SW, SG, BB, False, 1.0, SA, BB, 0.0, 0.0, SE, BB, False, 1.0, SA, 0.0, b, RB, BB)  # G·E
                _product(ST, SA, BB, False, -2.0, PY, ldy, 1.0, 1.0, SG, BB, False, 0.0, SA, 0.0, b, RB, BB)  # Amᵀ·G
                _comb_step(SD, ST, 0.5, 0.5, ST, 0.0, b, RB, BB)                                # D = sym(Amᵀ·G)
                seed = SD
                if EVEN:   # R −= C + C·A, C = A·P_h
                    _product(SC, SA, BB, False, 1.0, SA, BB, 0.0, 0.0, PH, ldh, False, 0.0, SA, 0.0, b, RB, BB)
                    _product(SDC, SG, BB, False, 1.0, SA, BB, 0.0, 0.0, SA, BB, False, 0.0, SG, -1.0, b, RB, BB)
                    _product(ST, SA, BB, False, 1.0, SA, BB, 0.0, 0.0, SDC, BB, False, 0.0, SA, 0.0, b, RB, BB)
                    _comb_step(SE, ST, -0.5, -0.5, SD, 1.0, b, RB, BB)   # seed = D − sym(A·dC) (Σ P_j is spent)
                    seed = SE
                # L = cotangent of Y: the adjoint of E = I + Σ Yʲ through Yʲ = Yʲ⁻¹·Y
                if H == 1:
                    SLp = seed
                elif H == 2 and not EVEN:   # D + YD + DY: one product (k = 5)
                    SLp = SL
                    _product(ST, PY, ldy, False, 1.0, SA, BB, 0.0, 0.0, SD, BB, False, 0.0, SA, 0.0, b, RB, BB)
                    _comb_step(SL, ST, 1.0, 1.0, SD, 1.0, b, RB, BB)
                else:
                    SLp = SL
                    Cc = seed
                    for jj in tl.static_range(0, H - 2):   # j = H .. 3: P_{j−1} from the saved powers
                        Pj = POW + (g * H + H - 2 - jj) * b * b
                        if jj == 0:
                            _product(SL, Pj, b, False, 1.0, SA, BB, 0.0, 0.0, Cc, BB, False, 0.0, SL, 0.0, b, RB, BB)
                        else:   # L += P_{j−1}·Cc
                            _product(SL, Pj, b, False, 1.0, SA, BB, 0.0, 0.0, Cc, BB, False, 0.0, SL, 1.0, b, RB, BB)
                        nxt = ws + (2 + 2 * (jj % 2)) * sz   # slots 2 / 4: free (Y, P_h come from POW)
                        _product(nxt, Cc, BB, False, 1.0, SA, BB, 0.0, 0.0, PY, ldy, False, 0.0, SD, 1.0, b, RB, BB)
                        Cc = nxt
                    # j = 2 (P_1 = Y): L += Y·Cc + D + Cc·Y
                    for r0 in range(0, b, RB):
                        acc = _strip(SD, BB, r0, b, RB, BB, False)
                        if H > 2:
                            acc += _strip(SL, BB, r0, b, RB, BB, False)
                        acc = _mm(acc, r0, PY, ldy, False, 1.0, SA, BB, 0.0, 0.0, Cc, BB, False, 0.0, b)
                        acc = _mm(acc, r0, Cc, BB, False, 1.0, SA, BB, 0.0, 0.0, PY, ldy, False, 0.0, b)
                        _put(SL, BB, r0, acc, b)
                    tl.debug_barrier()
                SWp = SW
                _comb_step(SD, SWp, 0.5, 0.5, SLp, 1.0, b, RB, BB)   # dY = sym(W) + L
            else:   # k = 1: dY = sym(G)
                _comb_step(SD, SG, 0.5, 0.5, SG, 0.0, b, RB, BB)
            # F = W (+ ½ (dC·P_h − Cᵀ·G), after dY: only dAm's part is symmetrised) − dY·A
            for r0 in range(0, b, RB):
                acc = _strip(SWp, BB, r0, b, RB, BB, False)
                if EVEN and H > 0:
                    acc = _mm(acc, r0, SDC, BB, False, 0.5, SA, BB, 0.0, 0.0, PH, ldh, False, 0.0, b)
                    acc = _mm(acc, r0, SC, BB, True, -0.5, SA, BB, 0.0, 0.0, SG, BB, False, 0.0, b)
                acc = _mm(acc, r0, SD, BB, False, -1.0, SA, BB, 0.0, 0.0, SA, BB, False, 0.0, b)
                _put(ST, BB, r0, acc, b)
            tl.debug_barrier()
            for r0 in range(0, b, RB):   # grad_S = F − Fᵀ
                _put(Og, b, r0, _strip(ST, BB, r0, b, RB, BB, False) - _strip(ST, BB, r0, b, RB, BB, True), b)
        tl.debug_barrier()
