"""opt_fast.cayley after torch.set_num_threads(2) (own process: the thread count is global state).

With torch 2.13.0+cpu and MKL 2024.2 on the CI machine, batched LU after set_num_threads(n > 1) returned
invalid pivots, so a batched inverse raised; the C++ kernel inverts one matrix at a time (csrc/cpu/cayley.cpp).
"""
import subprocess
import sys

import pytest

import opt_fast

CODE = """
import torch, opt_fast
torch.set_num_threads(2)
S = torch.randn(5, 576, 576, generator=torch.Generator().manual_seed(0))
S = (S - S.mT) / 2
Q = torch.ops.opt_fast.cayley(S)
err = float((Q.mT @ Q - torch.eye(576)).abs().max())
assert err < 1e-4, err
print("ok")
"""


@pytest.mark.skipif(not opt_fast.has_kernel("cayley", "CPU"), reason="C++ CPU cayley kernel not built")
def test_batched_cayley_after_set_num_threads():
    out = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]
