"""Probe the limits a CPU cannot check, on a CUDA GPU (a stage of scripts/gpu_run.sh).

One line per probe, ``PROBE <name>: ok|FAIL|skip <details>``; exit status 1 if any probe failed.

* batch_65536: lowdin / lowdin_backward on 70,000 matrices (grid axis y holds 65,535 programs)
* lowdin_bwd_f64_d64: the float64 backward's three-product step at d = 64 and 100 (shared memory on A100)
* householder_boundary: the CUDA Householder forwards around the small path's limits (160 rows, 512 columns,
  shared memory), small path on and off, against a float64 rank-1 reflection loop
* tf32x3_vs_ieee: lowdin forward and backward at d = 1024, float32 products in ieee and tf32x3: time and
  error against float64 SVD
* converge_vs_fixed: the converging mode (one host read per step) against the same number of fixed steps
  (no synchronisation), d = 64 × 512 and 1024 × 1: what the per-step read costs
* no_sync: gram_schmidt forward/backward and a fixed-step lowdin under torch.cuda.set_sync_debug_mode("error")
* bf16_approx: orthogonalize_approx's bfloat16 products against a bfloat16 emulation and float32
* triton_resources: registers and spills the CUDA driver reports for the Triton kernels compiled so far,
  and the launch configuration picked for this GPU's shared memory

``--dry-run``: list the probes and check that everything they import exists (no GPU needed).
"""
import argparse
import os
import sys
import time
import traceback

import torch

PROBES = []


def probe(fn):
    PROBES.append(fn)
    return fn


def rel(a, b):
    return (torch.linalg.matrix_norm(a.double().cpu() - b.double().cpu()) /
            torch.linalg.matrix_norm(b.double().cpu()).clamp_min(1e-300)).max().item()


def polar64(P):
    U, _, Vh = torch.linalg.svd(P.detach().double().cpu())
    return U @ Vh


def timed(fn, reps=10):
    """Median wall time (ms) of fn() with CUDA events, after a warm-up call."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return sorted(times)[len(times) // 2]


@probe
def batch_65536():
    from opt_fast.reference.lowdin import lowdin_backward_ref
    P = torch.randn(70000, 2, 2, device="cuda")
    R = torch.ops.opt_fast.lowdin(P)
    G = torch.randn_like(P)
    dP = torch.ops.opt_fast.lowdin_backward(G, P, R)
    torch.cuda.synchronize()
    e_fwd = rel(R, polar64(P))
    e_bwd = rel(dP, lowdin_backward_ref(G.double().cpu(), P.double().cpu(), polar64(P)))
    ok = e_fwd < 1e-4 and e_bwd < 1e-3
    return ok, f"70000 x 2x2 float32: forward rel err {e_fwd:.1e}, backward {e_bwd:.1e}"


@probe
def lowdin_bwd_f64_d64():
    from opt_fast.reference.lowdin import lowdin_backward_ref
    out, ok = [], True
    for d in (64, 100):
        P = torch.randn(2, d, d, dtype=torch.float64, device="cuda")
        G = torch.randn_like(P)
        R = torch.ops.opt_fast.lowdin(P)
        dP = torch.ops.opt_fast.lowdin_backward(G, P, R)
        e = rel(dP, lowdin_backward_ref(G.cpu(), P.cpu(), polar64(P)))
        ok &= e < 1e-10
        out.append(f"d={d} rel err {e:.1e}")
    return ok, ", ".join(out)


@probe
def householder_boundary():
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
    from _refs import householder_apply_torch, householder_orthogonal_torch
    ops, out, ok = torch.ops.opt_fast, [], True
    cases = [("orthogonal", d, d, None) for d in (159, 160, 161)] + [("apply", 160, 8, n) for n in (511, 512, 513)]
    for dtype, tol in ((torch.float32, 1e-4), (torch.float64, 1e-11)):
        for kind, d, k, n in cases:
            V = torch.randn(2, d, k, dtype=torch.float64)
            X = torch.randn(2, d, n, dtype=torch.float64) if n else None
            ref = householder_orthogonal_torch(V) if X is None else householder_apply_torch(V, X)
            errs = []
            for small in ("1", "0"):
                os.environ["OPT_FAST_CUDA_SMALL"] = small
                Vd = V.to("cuda", dtype)
                got = ops.householder_orthogonal(Vd) if X is None else ops.householder_apply(Vd, X.to("cuda", dtype))
                errs.append(rel(got, ref))
            os.environ.pop("OPT_FAST_CUDA_SMALL")
            ok &= max(errs) < tol
            out.append(f"{kind} d={d} n={n or d} {str(dtype)[6:]}: {errs[0]:.0e}/{errs[1]:.0e}")
    return ok, "small/level3 rel err: " + "; ".join(out)


@probe
def tf32x3_vs_ieee():
    from opt_fast.reference.lowdin import lowdin_backward_ref
    from opt_fast.triton_kernels import lowdin as L
    from opt_fast.triton_kernels import matmul as MM
    P = torch.randn(1, 1024, 1024, device="cuda")
    G = torch.randn_like(P)
    exact = polar64(P)
    dref = lowdin_backward_ref(G.double().cpu(), P.double().cpu(), exact)
    out, old = [], MM.F32_PRECISION
    try:
        for prec in MM.F32_PRECISIONS:
            MM.F32_PRECISION = prec
            R = L.lowdin(P)
            t_f = timed(lambda: L.lowdin(P), 5)
            t_b = timed(lambda: L.lowdin_backward(G, P, R), 5)
            out.append(f"{prec}: fwd {t_f:.2f} ms err {rel(R, exact):.1e}, bwd {t_b:.2f} ms err "
                       f"{rel(L.lowdin_backward(G, P, R), dref):.1e}")
    finally:
        MM.F32_PRECISION = old
    t_svd = timed(lambda: torch.linalg.svd(P), 3)
    return True, "; ".join(out) + f" (torch.linalg.svd {t_svd:.2f} ms)"


@probe
def converge_vs_fixed():
    from opt_fast.triton_kernels import lowdin as L
    out = []
    for b, d in ((512, 64), (1, 1024)):
        P = torch.randn(b, d, d, device="cuda")
        steps = []
        real = L._drive

        def counting(step, *a):
            def counted(coef, measure):
                steps.append(1)
                return step(coef, measure)
            return real(counted, *a)
        L._drive = counting
        try:
            L.lowdin(P)
        finally:
            L._drive = real
        n = len(steps)
        t_c = timed(lambda: L.lowdin(P))
        t_f = timed(lambda: L.lowdin(P, n))
        out.append(f"{b}x{d}: converge {t_c:.2f} ms vs {n} fixed steps {t_f:.2f} ms")
    return True, "; ".join(out)


@probe
def no_sync():
    from opt_fast.triton_kernels import lowdin as L
    ops, out, ok = torch.ops.opt_fast, [], True
    P = torch.randn(4, 64, 48, device="cuda")
    X = torch.randn(4, 64, 64, device="cuda")
    calls = {"gram_schmidt": lambda: ops.gram_schmidt(P, 0),
             "gram_schmidt_backward": lambda: ops.gram_schmidt_backward(torch.ones_like(P), P, ops.gram_schmidt(P, 0)),
             "lowdin(iters=8) [Triton]": lambda: L.lowdin(X, 8)}
    for name, fn in calls.items():
        fn()   # warm-up: compiles, caches the tile lists
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            fn()
            out.append(f"{name} ok")
        except RuntimeError as e:
            ok = False
            out.append(f"{name} SYNCS ({str(e).splitlines()[0][:80]})")
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return ok, "; ".join(out)


@probe
def bf16_approx():
    from opt_fast.functional import _orthogonalize_approx_torch
    from opt_fast.triton_kernels import lowdin as L
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
    from _refs import orthogonalize_approx_bf16_torch
    G = torch.randn(8, 256, 512, device="cuda")
    f32 = _orthogonalize_approx_torch(G, 5)
    got = L.orthogonalize_approx(G)
    e_emul = rel(got, orthogonalize_approx_bf16_torch(G, 5))
    e_f32 = rel(got, f32)
    e_exact = rel(L.orthogonalize_approx(G, lowp=False), f32)
    return e_emul < 1e-2 and e_exact < 1e-4, (f"bf16 vs emulation {e_emul:.1e}, bf16 vs float32 {e_f32:.1e}, "
                                              f"lowp=False vs float32 {e_exact:.1e}")


@probe
def triton_resources():
    from triton.runtime import driver
    from opt_fast.triton_kernels import matmul as MM
    dev = driver.active.get_current_device()
    props = driver.active.utils.get_device_properties(dev)
    cache = MM.opt_fast_mm_kernel.device_caches[dev][0]
    worst = max((k for k in cache.values() if getattr(k, "n_regs", None) is not None),
                key=lambda k: (k.n_spills, k.n_regs), default=None)
    spills = sum(1 for k in cache.values() if getattr(k, "n_spills", 0))
    picks = {f"{n}p f{8 * s}": tuple(MM.pick_config(1024, n, s, props["max_shared_mem"]))
             for n in (1, 3) for s in (4, 8)}
    detail = (f"max_shared_mem={props['max_shared_mem']}; {len(cache)} kernels compiled, {spills} with spills"
              + (f", most registers {worst.n_regs} (spill {worst.n_spills})" if worst else "") + f"; picks {picks}")
    return spills == 0, detail


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dry-run", action="store_true", help="list the probes and check imports; no GPU")
    p.add_argument("probes", nargs="*", help="probe names (default: all)")
    args = p.parse_args(argv)
    chosen = [f for f in PROBES if not args.probes or f.__name__ in args.probes]
    if args.dry_run:
        import opt_fast  # noqa: F401
        from opt_fast.reference.lowdin import lowdin_backward_ref  # noqa: F401
        sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
        from _refs import householder_apply_torch, orthogonalize_approx_bf16_torch  # noqa: F401
        for f in chosen:
            print(f"PROBE {f.__name__}: would run")
        return 0 if chosen else 1
    if not torch.cuda.is_available():
        print("PROBE *: skip no CUDA device")
        return 1
    import opt_fast  # noqa: F401
    failed = 0
    for f in chosen:
        t0 = time.perf_counter()
        try:
            ok, detail = f()
        except Exception as e:   # a probe that crashes is a failed probe; the others still run
            ok, detail = False, f"{type(e).__name__}: {e}".splitlines()[0]
            traceback.print_exc()
        failed += not ok
        print(f"PROBE {f.__name__}: {'ok' if ok else 'FAIL'} {detail} ({time.perf_counter() - t0:.1f} s)", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
