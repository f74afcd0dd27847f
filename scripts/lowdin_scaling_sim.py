"""Float64 simulation of the Löwdin schedule length under two scalings (triton_kernels/lowdin.py cites it).

The converge loop of opt_fast.reference.lowdin acts on the singular values only (x -> a x + b x³), and its
decisions depend on the measured ||XᵀX - I||_F = sqrt(Σ (x²-1)²); so the number of steps for a matrix
follows from its float64 singular values. Compared: s = ||PᵀP||_F^(1/2) (the reference, free) against
s = σ_max estimated by `pi` power iterations on PᵀP times a safety factor (an underestimate would put
singular values above the designed interval), and against the exact σ_max (the best any estimate can do).

    .venv/bin/python scripts/lowdin_scaling_sim.py
"""
import math
import sys

import torch

sys.path.insert(0, ".")
from opt_fast.reference import lowdin as L  # noqa: E402


def steps(x: torch.Tensor, dtype) -> int:
    """Polynomial steps (each = 1 Gram + 1 product, the last one without its Gram) of the converge loop
    with the stopping tolerance of ``dtype``."""
    d = x.numel()
    tol = L._tolerance(dtype)
    lo, hi, k = L._ELL0, 1.0, 0
    while True:
        err = float(torch.sqrt(((x * x - 1) ** 2).sum())) / math.sqrt(d)
        if err <= tol or k >= len(L._SCHEDULE) + L._TAIL_STEPS:
            return k
        if L._last_step_suffices(err, d, tol):
            return k + 1
        lo, hi = L._tighten(lo, hi, math.sqrt(d) * err)
        a, b, lo, hi = L._design_step(lo, hi)
        x = a * x + b * x ** 3
        k += 1


def power_sigma(P: torch.Tensor, its: int, gen) -> float:
    A = P.mT @ P
    v = torch.randn(P.shape[-1], dtype=P.dtype, generator=gen)
    for _ in range(its):
        v = A @ v
        v = v / v.norm()
    return math.sqrt(float(v @ (A @ v)))


def main():
    gen = torch.Generator().manual_seed(0)
    print("steps (min-max over seeds) for tol(float32) / tol(float64); 'k under' = seeds whose estimate")
    print("fell below σ_max (unsafe: singular values above the designed interval)")
    print("d     seeds  ||PᵀP||_F^½     exact σ_max     power(5)×1.05  power(10)×1.02")
    for d, seeds in ((27, 20), (144, 20), (576, 10), (1024, 6), (2304, 2)):
        cols = [[], [], [], []]
        cols32 = [[], [], [], []]
        for _ in range(seeds):
            P = torch.randn(d, d, dtype=torch.float64, generator=gen)
            sig = torch.linalg.svdvals(P)
            s_f = float((sig ** 4).sum() ** 0.25)
            for c, s in enumerate((s_f, float(sig[0]), 1.05 * power_sigma(P, 5, gen),
                                   1.02 * power_sigma(P, 10, gen))):
                ok = s >= float(sig[0])
                cols[c].append(steps(sig / s, torch.float64) if ok else -1)   # -1: estimate below σ_max
                cols32[c].append(steps(sig / s, torch.float32) if ok else -1)

        def fmt(c):
            v, w = [x for x in cols[c] if x >= 0], [x for x in cols32[c] if x >= 0]
            under = cols[c].count(-1)
            txt = f"{min(w)}-{max(w)} / {min(v)}-{max(v)}" if v else "-"
            return txt + (f" ({under} under)" if under else "")
        print(f"{d:<5} {seeds:<6} " + "  ".join(f"{fmt(c):<15}" for c in range(4)))


if __name__ == "__main__":
    main()
