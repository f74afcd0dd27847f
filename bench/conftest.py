"""pytest-benchmark glue for the opt_fast suites (``bench/bench_*.py``).

* Collects ``bench_*.py`` files (pytest's default pattern is ``test_*.py``) when bench/ is on the command
  line (``pytest bench``, ``pytest bench/bench_cayley.py``), not on a bare ``pytest`` at the root.
* Size of the shape sets (``bench/shapes.py``): ``--bench-size`` or ``OPT_FAST_BENCH_SIZE``; otherwise
  ``smoke`` under ``--benchmark-disable`` (the CI smoke test) and ``default`` when timing.
* Device: ``--bench-device`` or ``OPT_FAST_BENCH_DEVICE``; otherwise CUDA when available (decided in a
  fixture, never at import).
* Timer: ``bench.timers.synced_perf_counter`` unless ``--benchmark-timer`` is given.
* Threads: ``OPT_FAST_BENCH_THREADS=N``; the smoke size uses 1 thread unless told otherwise.
* ``machine_info`` gets torch / triton / python versions, CPU and GPU names, threads, git sha, and the kernel
  serving each op (``pytest_benchmark_update_machine_info``).
"""
import functools
import os
from pathlib import Path

import pytest
import torch

from bench import cases as C
from bench import machine
from bench.shapes import SIZES


def pytest_addoption(parser):
    group = parser.getgroup("opt_fast benchmarks")
    group.addoption("--bench-size", choices=SIZES, default=None,
                    help="shape set: smoke (tiny), default (small), full (docs/performance.md's whole sweep)")
    group.addoption("--bench-device", choices=("cpu", "cuda"), default=None,
                    help="device to benchmark on (default: cuda if available)")


def bench_size(config) -> str:
    size = config.getoption("--bench-size", default=None) or os.environ.get("OPT_FAST_BENCH_SIZE")
    if size:
        return size
    disabled = config.getoption("benchmark_disable", default=False) and \
        not config.getoption("benchmark_enable", default=False)
    return "smoke" if disabled else "default"


def pytest_configure(config):
    # OPT_FAST_BENCH_THREADS=N sets torch's threads; the smoke test uses 1 (on a loaded machine OpenMP
    # regions otherwise wait a scheduler tick for preempted threads: see bench/README.md)
    threads = os.environ.get("OPT_FAST_BENCH_THREADS")
    if threads:
        torch.set_num_threads(int(threads))
    elif bench_size(config) == "smoke":
        torch.set_num_threads(1)
    args = " ".join(map(str, config.invocation_params.args))
    if "--benchmark-timer" not in args and hasattr(config.option, "benchmark_timer"):
        config.option.benchmark_timer = "bench.timers.synced_perf_counter"


BENCH_DIR = Path(__file__).resolve().parent


def _bench_requested(config) -> bool:
    """True if the command line names bench/ (or something in it): a bare ``pytest`` at the repository root
    does not run the benchmarks."""
    root = Path(config.invocation_params.dir)
    for arg in config.args:
        p = (root / str(arg).split("::")[0]).resolve()
        if p == BENCH_DIR or BENCH_DIR in p.parents:
            return True
    return False


def pytest_collect_file(file_path, parent):
    if file_path.suffix == ".py" and file_path.name.startswith("bench_") and \
            not parent.session.isinitpath(file_path) and _bench_requested(parent.config):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


def pytest_generate_tests(metafunc):
    if "case" in metafunc.fixturenames:
        ops = getattr(metafunc.module, "OPS", C.OPS)
        case_list = C.cases(bench_size(metafunc.config), ops)
        metafunc.parametrize("case", case_list, ids=[c.id for c in case_list])


def pytest_report_header(config):
    return f"opt_fast bench: size={bench_size(config)}"


@pytest.fixture(scope="session")
def bench_device(pytestconfig) -> str:
    dev = pytestconfig.getoption("--bench-device", default=None) or os.environ.get("OPT_FAST_BENCH_DEVICE")
    if dev == "cuda" and not torch.cuda.is_available():
        pytest.skip("--bench-device cuda, but CUDA is not available")
    return dev or ("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(scope="session")
def bench_size_name(pytestconfig) -> str:
    return bench_size(pytestconfig)


def pytest_benchmark_update_machine_info(config, machine_info):
    dev = config.getoption("--bench-device", default=None) or os.environ.get("OPT_FAST_BENCH_DEVICE") or \
        ("cuda" if torch.cuda.is_available() else "cpu")
    machine_info["opt_fast"] = machine.info(dev)
    machine_info["opt_fast"]["bench_size"] = bench_size(config)


@functools.lru_cache(maxsize=4)
def _inputs(op, shape, dtype, device):
    return C.make_inputs(op, shape, dtype, device)


@pytest.fixture
def run_case(benchmark, bench_device):
    """``run_case(case)``: prepare, warm up, record extra_info, then ``benchmark`` the case."""
    def run(case: C.Case):
        x = _inputs(case.op, case.shape, case.dtype, bench_device)
        try:
            prepared = C.prepare(case, x, bench_device)
        except C.Unavailable as e:
            pytest.skip(f"{case.impl.name}: {e}")
        try:
            out = prepared.run()   # warm-up outside the timing: torch.compile, Triton JIT, allocator
        except NotImplementedError as e:
            pytest.xfail(f"{case.impl.name}: not implemented yet ({e})")
        info = C.describe(case, bench_device)
        if case.impl.kind != "yardstick":
            info["accuracy"] = C.accuracy(case.op, out, x)
            info["accuracy_metric"] = C.ACCURACY_LABEL.get(case.op, C.DEFAULT_ACCURACY_LABEL)
        info["t_bmm_s"] = C.bmm_time(case.shape.b, case.shape.d, case.dtype, bench_device)
        benchmark.group = case.group
        benchmark.extra_info.update(info)
        benchmark(prepared.run)
    return run
