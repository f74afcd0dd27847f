"""Shared fixtures for the opt_fast tests: per-test seeding, device parameters, and the backend table in
the pytest header. Nothing here touches CUDA at import: whether CUDA exists is decided when a test runs."""
import io
import os

import pytest
import torch


def devices():
    """The devices to test on: always "cpu", plus "cuda" when a CUDA device is visible (call at run time)."""
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


# Parametrize device tests with this; the "cuda" case carries the gpu marker and is skipped without CUDA.
DEVICE_PARAMS = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu, id="cuda")]


def pytest_configure(config):
    # LAPACK/BLAS on the small matrices of these tests gains nothing from threads, and on a loaded 2-core
    # machine OpenMP threads that spin-wait for a preempted peer make it 10-20x slower (measured: a
    # [2, 576, 576] SVD 4.3 s with 2 threads vs 0.18 s with 1). OPT_FAST_TEST_THREADS=N overrides.
    torch.set_num_threads(int(os.environ.get("OPT_FAST_TEST_THREADS", "1")))


def pytest_report_header(config):
    import opt_fast

    return [
        f"torch {torch.__version__}, {torch.get_num_threads()} intra-op thread(s); opt_fast backends:",
        *opt_fast.backend_report(file=io.StringIO()).splitlines(),
    ]


def pytest_runtest_setup(item):
    if item.get_closest_marker("gpu") is not None and "cuda" not in devices():
        pytest.skip("needs a CUDA device")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
