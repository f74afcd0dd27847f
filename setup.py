"""Build opt_fast: a Python package plus the C++ extension opt_fast._C.

    pip install --no-build-isolation .        # CPU kernels always; CUDA kernels when torch has CUDA and nvcc exists

--no-build-isolation: the extension must be compiled against the torch installed here; with isolation pip
would build against a torch of its own (tools/build_backend.py stops such a build at once and says so).

Environment flags:
  OPT_FAST_NO_EXT=1            pure-Python package (every op served by the reference kernels)
  OPT_FAST_SKIP_CUDA_BUILD=1   do not compile csrc/cuda even where it could be
  OPT_FAST_FORCE_CUDA=1        fail unless the CUDA kernels are built
  MAX_JOBS, NVCC_THREADS       build parallelism; TORCH_CUDA_ARCH_LIST picks the GPU archs (e.g. "8.0;9.0"),
                               needed for the CUDA kernels where no GPU is visible (else CPU kernels only)
  DEBUG=1                      -O0 -g
"""
import glob
import os
import shutil
import site
import sys

from setuptools import find_packages, setup

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "tools"))
import build_checks  # noqa: E402

PACKAGES = ["opt_fast"] + [f"opt_fast.{p}" for p in find_packages("opt_fast")] + ["opt_fast.triton_kernels"]
# Triton kernels live in the top-level triton_kernels/ folder but install as opt_fast.triton_kernels: a
# top-level `triton_kernels` would clash with Triton's own package of that name.
PACKAGE_DIR = {"opt_fast": "opt_fast", "opt_fast.triton_kernels": "triton_kernels"}


def flag(name):
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def cuda_wanted(torch, cuda_home):
    nvcc = cuda_home is not None and shutil.which(
        "nvcc", path=os.path.join(cuda_home, "bin") + os.pathsep + os.environ.get("PATH", "")) is not None
    gpus = torch.cuda.device_count() if torch.version.cuda is not None else 0
    use, note = build_checks.cuda_plan(torch.version.cuda, cuda_home, nvcc, os.environ.get("TORCH_CUDA_ARCH_LIST", ""),
                                       gpus, flag("OPT_FAST_SKIP_CUDA_BUILD"), flag("OPT_FAST_FORCE_CUDA"))
    if note:
        print(note, file=sys.stderr)
    return use


def openmp_flags(torch):
    """-fopenmp where torch's ATen parallelises with OpenMP (Linux wheels). at::parallel_for is a header
    template whose OpenMP body is compiled only when _OPENMP is defined: without the flag every C++ kernel of
    ours ran its batch on one thread whatever torch.get_num_threads() said. The runtime is torch's own
    libgomp.so.1 (loaded first, same soname), so torch.set_num_threads governs our regions too."""
    if sys.platform.startswith("linux") and torch.backends.openmp.is_available():
        return ["-fopenmp"]
    return []


# Commands that only write metadata or a source archive: they need neither torch nor a compiler, so that
# `python -m build --sdist` (isolated: no torch there) and `python setup.py sdist` work anywhere.
NO_BUILD_COMMANDS = {"sdist", "egg_info", "dist_info"}
BUILD_COMMANDS = {"build", "build_ext", "build_py", "bdist", "bdist_wheel", "bdist_egg", "install", "develop",
                  "editable_wheel"}


def source_only(argv):
    args = set(argv[1:])
    return bool(args & NO_BUILD_COMMANDS) and not args & BUILD_COMMANDS


def extensions():
    if flag("OPT_FAST_NO_EXT") or source_only(sys.argv):
        return [], {}
    try:
        import torch
        build_torch = (torch.__version__, torch.__file__)
    except ImportError:
        build_torch = None
    problem = build_checks.isolation_problem(build_torch, build_checks.installed_torch(site.getsitepackages()))
    if problem:
        raise SystemExit(problem)
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    class BuildExt(BuildExtension):
        def build_extensions(self):
            try:
                super().build_extensions()
            except IndexError as e:  # torch's _get_cuda_arch_flags with no GPU and no TORCH_CUDA_ARCH_LIST
                raise SystemExit(f"opt_fast: the CUDA build found no GPU architecture to compile for ({e!r}); "
                                 f"set TORCH_CUDA_ARCH_LIST (e.g. \"8.0;9.0\"), or OPT_FAST_SKIP_CUDA_BUILD=1 "
                                 f"for the CPU kernels only") from e

    debug = flag("DEBUG")
    opt = ["-O0", "-g"] if debug else ["-O3"]
    # -g0 for the host compiler: Python's default CFLAGS carry -g, and debug info for ATen's templates makes
    # the build ~1.5x slower (79 s -> 52 s on 2 cores)
    no_g = [] if debug else ["-g0"]
    sources = ["csrc/module.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
    omp = openmp_flags(torch)
    cxx = opt + no_g + omp + ["-std=c++17", "-DPy_LIMITED_API=0x030A0000"]
    kwargs = {"extra_link_args": omp}
    use_cuda = cuda_wanted(torch, CUDA_HOME)
    if use_cuda:
        sources += sorted(glob.glob("csrc/cuda/*.cu") + glob.glob("csrc/cuda/*.cpp"))
        nvcc = opt + [f for g in no_g for f in ("-Xcompiler", g)] + ["-std=c++17", "--threads", os.environ.get("NVCC_THREADS", "4")]
        kwargs["extra_compile_args"] = {"cxx": cxx + ["-DOPT_FAST_WITH_CUDA"], "nvcc": nvcc + ["-DOPT_FAST_WITH_CUDA"]}
        ext_cls = CUDAExtension
    else:
        kwargs["extra_compile_args"] = {"cxx": cxx}
        ext_cls = CppExtension
    ext = ext_cls("opt_fast._C", sources, py_limited_api=True, **kwargs)
    return [ext], {"build_ext": BuildExt}


ext_modules, cmdclass = extensions()

setup(
    packages=PACKAGES,
    package_dir=PACKAGE_DIR,
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    options={"bdist_wheel": {"py_limited_api": "cp310"}} if ext_modules else {},
)
