"""What the CPU can check of the GPU paths: the Triton launchers' device guard (mocked), their launch
configuration against the GPUs' shared memory, the exact float64 coefficient split, the launch grid of a
batch beyond 65535 matrices (compiled for sm_90 by the stub driver of the compile stage), and the warning
when the C++ extension does not load. (The whole compile stage is scripts/check_gpu_compile.sh.)"""
import random
import struct
import sys

import pytest
import torch

import opt_fast
from opt_fast import _backends, _register

triton = pytest.importorskip("triton", reason="Triton is not installed")

from opt_fast.triton_kernels import _device  # noqa: E402
from opt_fast.triton_kernels import matmul as MM  # noqa: E402


# ---- device guard ----------------------------------------------------------------------------------------

class _OnCuda1(torch.Tensor):
    """A CPU tensor that reports cuda:1 (no GPU needed to see where a launcher would run)."""
    @property
    def device(self):
        return torch.device("cuda", 1)


def test_launcher_runs_on_its_inputs_device(monkeypatch):
    current = ["cuda:0"]

    class FakeDeviceGuard:
        def __init__(self, device):
            self.device, self.prev = str(device), None

        def __enter__(self):
            self.prev, current[0] = current[0], self.device

        def __exit__(self, *exc):
            current[0] = self.prev

    monkeypatch.setattr(torch.cuda, "device", FakeDeviceGuard)
    seen = []

    @_device.on_input_device
    def launcher(x, y=None):
        seen.append(current[0])
        return y

    x = torch.zeros(2, 2).as_subclass(_OnCuda1)
    assert launcher(x, y=3) == 3
    assert seen == ["cuda:1"] and current[0] == "cuda:0"   # inside: the input's device; restored after
    launcher(torch.zeros(2))                                # CPU tensors (the interpreter): no guard
    assert seen[-1] == "cuda:0"


def test_every_launcher_is_guarded():
    from opt_fast.triton_kernels import LAUNCHERS
    from opt_fast.triton_kernels import lowdin as L
    guard = _device.on_input_device(lambda x: x).__code__   # the code of every wrapper it makes
    for fn in [*LAUNCHERS.values(), L.orthogonalize_approx]:
        assert fn.__code__ is guard, fn.__name__


# ---- launch configuration --------------------------------------------------------------------------------

# A100 (sm_80), H100 (sm_90), RTX 30xx/40xx, A10, L4 (sm_86/89), and a 48 KB device
LIMITS = (166_912, 232_448, 101_376, 49_152)


@pytest.mark.parametrize("limit", LIMITS)
@pytest.mark.parametrize("itemsize", [4, 8])
@pytest.mark.parametrize("nprod", [1, 2, 3])
@pytest.mark.parametrize("size", [1, 32, 33, 1024])
def test_config_fits_shared_memory(limit, itemsize, nprod, size):
    cfg = MM.pick_config(size, nprod, itemsize, limit)
    assert MM.smem_estimate(cfg, nprod, itemsize) <= limit
    if limit >= 166_912:   # what the compile stage checked spill-free: the first candidate on A100 and H100
        first = MM.candidates(size, nprod, itemsize)[0]
        assert cfg == first


def test_float64_three_products_fit_an_a100():
    """The float64 backward's three-product step asked for 212,992 B (3 stages of 64 × 32 tiles)."""
    cfg = MM.pick_config(64, 3, 8, 166_912)
    assert MM.smem_estimate(cfg, 3, 8) <= 166_912


def test_split3_is_exact():
    rng = random.Random(0)
    values = [rng.uniform(-10, 10) for _ in range(1000)] + [1 / 3, -4.775, 3.4445, 1e-30, 0.0, 123456.789]
    for v in values:
        parts = MM._split3(v)
        for p in parts:
            assert struct.unpack("f", struct.pack("f", p))[0] == p   # each part is a float32 value
        assert parts[0] + parts[1] + parts[2] == v


# ---- the compile stage's stub driver: a batch beyond one grid axis's 65535 --------------------------------

def test_big_batch_grid_compiled_for_sm90():
    from opt_fast.triton_kernels import aot, aot_cases  # noqa: F401  (registers the kernel's outputs)
    X = torch.randn(70000, 2, 2)
    out = torch.empty_like(X)
    with aot.stub_gpu(aot.TARGETS[90]) as rec:
        MM.mm(out, [(X.mT, X, 1.0)], sym=1, err=True)
    assert not rec.failures, rec.failures
    assert rec.compiled and not any(c.problems for c in rec.compiled), [c.line() for c in rec.compiled]


# ---- a failed extension load is visible ----------------------------------------------------------------

def _break_extension(monkeypatch):
    """Make `from . import _C` in opt_fast raise ImportError, as a missing or broken build does."""
    monkeypatch.setitem(sys.modules, "opt_fast._C", None)
    monkeypatch.delattr(opt_fast, "_C", raising=False)


def test_failed_extension_load_warns(monkeypatch):
    _break_extension(monkeypatch)
    monkeypatch.setattr(_backends, "ext_error", _backends.ext_error)
    monkeypatch.delenv("OPT_FAST_REQUIRE_EXT", raising=False)
    monkeypatch.delenv("OPT_FAST_DISABLE_EXT", raising=False)
    with pytest.warns(RuntimeWarning, match=r"opt_fast\._C did not load .*OPT_FAST_DISABLE_EXT=1"):
        _register._load_extension()
    assert _backends.ext_error is not None
    monkeypatch.setenv("OPT_FAST_REQUIRE_EXT", "1")
    with pytest.raises(ImportError, match="OPT_FAST_REQUIRE_EXT=1"):
        _register._load_extension()


def test_disabled_extension_does_not_warn(monkeypatch, recwarn):
    _break_extension(monkeypatch)
    monkeypatch.setenv("OPT_FAST_DISABLE_EXT", "1")
    _register._load_extension()
    assert not [w for w in recwarn if "opt_fast._C" in str(w.message)]
