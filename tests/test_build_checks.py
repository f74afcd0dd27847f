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
    if _backends.env_flag("OPT_FAST_DISABLE_EXT"):   # importing it here would register its kernels after all
        pytest.skip("OPT_FAST_DISABLE_EXT=1: opt_fast._C not loaded")
    import opt_fast._C as ext
    if not (sys.platform.startswith("linux") and torch.backends.openmp.is_available()):
        pytest.skip("torch's ATen does not parallelise with OpenMP here")
    assert ext.openmp == 1, "opt_fast._C was compiled without -fopenmp: at::parallel_for runs serially"
    with open("/proc/self/maps") as f:
        gomps = {line.split()[-1] for line in f if "libgomp" in line}
    assert len(gomps) <= 1, f"two OpenMP runtimes loaded: {sorted(gomps)}"


def test_sdist_needs_no_torch_and_ships_the_sources(tmp_path):
    """`python -m build --sdist` runs setup.py in an isolated environment without torch: the source archive
    must build there (setup.py skips the extension for sdist / egg_info) and hold everything a build from it
    needs: the in-tree backend, every C++/CUDA source and header, the Triton kernels; and no partial test
    suite (setuptools adds tests/test*.py by default, without their helpers)."""
    import subprocess
    import tarfile
    hide_torch = ("import sys; sys.modules['torch'] = None; sys.argv = ['setup.py', 'egg_info', '--egg-base', "
                  f"{str(tmp_path)!r}, 'sdist', '--dist-dir', {str(tmp_path)!r}]; import runpy; "
                  "runpy.run_path('setup.py', run_name='__main__')")
    run = subprocess.run([sys.executable, "-c", hide_torch], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    (archive,) = tmp_path.glob("*.tar.gz")
    with tarfile.open(archive) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    for folder in ("csrc", "triton_kernels", "tools"):
        tracked = {os.path.relpath(os.path.join(d, f), ROOT) for d, _, fs in os.walk(os.path.join(ROOT, folder))
                   for f in fs if f.endswith((".cpp", ".cu", ".h", ".cuh", ".py"))}
        assert tracked and tracked <= names, sorted(tracked - names)
    assert {"setup.py", "pyproject.toml", "README.md", "opt_fast/__init__.py"} <= names
    assert not any(n.startswith("tests/") for n in names)


@pytest.mark.parametrize("checkout", [False, True])
def test_a_copy_without_the_extension_is_quiet_when_installed_and_warns_in_a_checkout(tmp_path, checkout):
    """A pure-Python install (OPT_FAST_NO_EXT=1) chose the references: no warning at import, backend_report
    says so. An unbuilt checkout (setup.py beside the package) warns: a build was forgotten. Neither gives
    Python's misleading "circular import" message."""
    import shutil
    import subprocess
    shutil.copytree(os.path.join(ROOT, "opt_fast"), tmp_path / "opt_fast",
                    ignore=shutil.ignore_patterns("_C*.so", "__pycache__"))
    if checkout:
        (tmp_path / "setup.py").write_text("")
    code = ("import sys, warnings; warnings.simplefilter('always')\n"
            "sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in repr(f)]  # an editable opt_fast\n"
            f"sys.path.insert(0, {str(tmp_path)!r})\n"
            "import opt_fast, torch\n"
            "assert opt_fast.__file__.startswith(sys.path[0]), opt_fast.__file__\n"
            "print(opt_fast.backend_report().splitlines()[-1])\n"
            "print(torch.ops.opt_fast.cayley(torch.zeros(1, 2, 2)).tolist())\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPT_FAST_")}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "[[[1.0, 0.0], [0.0, 1.0]]]" in run.stdout and "circular" not in run.stdout + run.stderr
    assert ("did not load" in run.stderr) == checkout, run.stderr[-2000:]
    assert ("installed without the C++ extension" in run.stdout) != checkout, run.stdout
