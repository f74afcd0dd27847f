"""The install's build decisions (tools/build_checks.py, tools/build_backend.py, setup.py) on mocked
environments: an isolated build never reaches torch's CUDA arch helper (whose IndexError it used to end
in), and every refusal names what to run instead."""
import importlib
import os
import sys
import tomllib

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))
import build_checks as bc  # noqa: E402


def _site(tmp_path, version):
    site = tmp_path / "site-packages"
    (site / "torch").mkdir(parents=True)
    (site / "torch" / "version.py").write_text(
        f"from typing import Optional\n__version__ = '{version}'\ncuda: Optional[str] = None\n")
    return str(site)


def test_installed_torch_is_read_without_importing(tmp_path):
    assert bc.installed_torch([str(tmp_path / "nowhere"), _site(tmp_path, "2.13.0+cpu")]) == "2.13.0+cpu"
    assert bc.installed_torch([str(tmp_path / "nowhere")]) is None


def test_isolation_problem_names_the_flag():
    isolated = bc.isolation_problem(None, "2.13.0+cpu")  # the isolated env hides the installed torch
    assert "--no-build-isolation" in isolated and "2.13.0+cpu" in isolated and "OPT_FAST_NO_EXT=1" in isolated
    other = bc.isolation_problem(("2.9.1+cu128", "/tmp/pip-build-env-x/overlay/torch/__init__.py"), "2.13.0+cpu")
    assert "--no-build-isolation" in other and "2.9.1+cu128" in other and "2.13.0+cpu" in other
    assert "install torch first" in bc.isolation_problem(None, None)
    assert bc.isolation_problem(("2.13.0+cpu", "/venv/torch/__init__.py"), "2.13.0+cpu") is None
    assert bc.isolation_problem(("2.13.0", "/x/torch/__init__.py"), None) is None  # fresh env: pip installs torch


def test_cuda_plan_without_gpu_or_arch_list_builds_cpu_only():
    use, note = bc.cuda_plan("12.8", "/usr/local/cuda", True, "", 0, skip=False, force=False)
    assert not use and "TORCH_CUDA_ARCH_LIST" in note and "CPU kernels only" in note
    with pytest.raises(RuntimeError, match="TORCH_CUDA_ARCH_LIST"):
        bc.cuda_plan("12.8", "/usr/local/cuda", True, "", 0, skip=False, force=True)
    assert bc.cuda_plan("12.8", "/usr/local/cuda", True, "9.0", 0, skip=False, force=False) == (True, None)
    assert bc.cuda_plan("12.8", "/usr/local/cuda", True, "", 1, skip=False, force=False) == (True, None)
    assert bc.cuda_plan("12.8", "/usr/local/cuda", True, "9.0", 1, skip=True, force=False) == (False, None)
    assert bc.cuda_plan(None, "/usr/local/cuda", True, "9.0", 1, skip=False, force=False) == (False, None)
    with pytest.raises(RuntimeError, match="OPT_FAST_FORCE_CUDA=1"):
        bc.cuda_plan(None, None, False, "", 0, skip=False, force=True)


def _backend(monkeypatch, tmp_path, torch_importable, installed):
    """tools/build_backend.py's requirement hook with torch hidden or not and a mocked target env."""
    backend = importlib.import_module("build_backend")
    if not torch_importable:
        monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` raises ImportError
    sites = [_site(tmp_path, installed)] if installed else [str(tmp_path / "empty")]
    monkeypatch.setattr(backend.site, "getsitepackages", lambda: sites)
    monkeypatch.delenv("OPT_FAST_NO_EXT", raising=False)
    return backend


def test_backend_stops_an_isolated_build_at_once(monkeypatch, tmp_path):
    backend = _backend(monkeypatch, tmp_path, torch_importable=False, installed="2.13.0+cpu")
    for hook in (backend.get_requires_for_build_wheel, backend.get_requires_for_build_editable):
        with pytest.raises(SystemExit, match="--no-build-isolation"):
            hook()
    monkeypatch.setenv("OPT_FAST_NO_EXT", "1")  # a pure-Python install needs no torch to build
    assert backend.get_requires_for_build_wheel() == []


def test_backend_requests_torch_only_where_none_is_installed(monkeypatch, tmp_path):
    assert _backend(monkeypatch, tmp_path, False, None).get_requires_for_build_wheel() == ["torch"]
    monkeypatch.undo()
    assert _backend(monkeypatch, tmp_path, True, None).get_requires_for_build_wheel() == []  # no isolation


def test_pyproject_pins_and_backend():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        meta = tomllib.load(f)
    build = meta["build-system"]
    assert build["build-backend"] == "build_backend" and build["backend-path"] == ["tools"]
    assert not any(r.startswith("torch") for r in build["requires"])  # the backend asks for it (see above)
    deps = meta["project"]["dependencies"]
    with open(os.path.join(ROOT, "requirements-dev.txt")) as f:
        dev_numpy = [line.strip() for line in f if line.startswith("numpy")]
    assert dev_numpy and [d for d in deps if d.startswith("numpy")] == dev_numpy  # same pin as the dev env
    assert set(meta["project"]["optional-dependencies"]["train"]) == {"scikit-learn", "matplotlib"}


def test_extension_parallelises_with_torchs_openmp():
    """at::parallel_for runs its body in parallel only when the extension itself is compiled with OpenMP
    (ATen/ParallelOpenMP.h is guarded by _OPENMP): where torch's ATen uses OpenMP (Linux wheels) the build
    must pass -fopenmp, else every C++ kernel runs on one thread whatever torch.get_num_threads() says; and
    the OpenMP runtime must be torch's own (one libgomp in the process, so set_num_threads governs ours)."""
    import torch
    from opt_fast import _backends
    if _backends.ext_error is not None:
        pytest.skip(f"opt_fast._C not built: {_backends.ext_error}")
    import opt_fast._C as ext
    if not (sys.platform.startswith("linux") and torch.backends.openmp.is_available()):
        pytest.skip("torch's ATen does not parallelise with OpenMP here")
    assert ext.openmp == 1, "opt_fast._C was compiled without -fopenmp: at::parallel_for runs serially"
    with open("/proc/self/maps") as f:
        gomps = {line.split()[-1] for line in f if "libgomp" in line}
    assert len(gomps) <= 1, f"two OpenMP runtimes loaded: {sorted(gomps)}"
