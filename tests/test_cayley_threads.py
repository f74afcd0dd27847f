"""opt_fast.cayley after torch.set_num_threads(2) (own process: the thread count is global state).

With torch 2.13.0+cpu and MKL 2024.2 on the CI machine, batched LU after set_num_threads(n > 1) returned
invalid pivots for d >= 160, so a batched inverse raised; the C++ kernel inverts one matrix at a time there
and validates the pivots of its batched path (d <= 144) (csrc/cpu/cayley.cpp).
"""
import subprocess
import sys

import pytest

import opt_fast

CODE = """
import torch, opt_fast
torch.set_num_threads(2)
g = torch.Generator().manual_seed(0)
# per-matrix LAPACK (d > 144), batched LAPACK (64 < d <= 144), float32 and float64
for b, d, dtype in [(5, 576, torch.float32), (6, 144, torch.float32), (6, 144, torch.float64), (64, 100, torch.float32)]:
    S = torch.randn(b, d, d, generator=g, dtype=dtype)
    S = (S - S.mT) / 2
    Q = torch.ops.opt_fast.cayley(S)
    ref = torch.stack([torch.linalg.solve(torch.eye(d, dtype=torch.float64) - s, torch.eye(d, dtype=torch.float64) + s)
                       for s in S.double()])
    err = float((Q.double() - ref).abs().max())
    assert err < (1e-3 if dtype == torch.float32 else 1e-10), (b, d, dtype, err)
print("ok")
"""


@pytest.mark.skipif(not opt_fast.has_kernel("cayley", "CPU"), reason="C++ CPU cayley kernel not built")
def test_batched_cayley_after_set_num_threads():
    out = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]
