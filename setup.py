"""Build opt_fast: a Python package plus the C++ extension opt_fast._C.

    pip install --no-build-isolation .        # CPU kernels always; CUDA kernels when torch has CUDA and nvcc exists

Environment flags:
  OPT_FAST_NO_EXT=1            pure-Python package (every op served by the reference kernels)
  OPT_FAST_SKIP_CUDA_BUILD=1   do not compile csrc/cuda even where it could be
  OPT_FAST_FORCE_CUDA=1        fail unless the CUDA kernels are built
  MAX_JOBS, NVCC_THREADS       build parallelism; TORCH_CUDA_ARCH_LIST picks the GPU archs (e.g. "8.0;9.0")
  DEBUG=1                      -O0 -g
"""
import glob
import os
import shutil

from setuptools import find_packages, setup

PACKAGES = ["opt_fast"] + [f"opt_fast.{p}" for p in find_packages("opt_fast")] + ["opt_fast.triton_kernels"]
# Triton kernels live in the top-level triton_kernels/ folder but install as opt_fast.triton_kernels: a
# top-level `triton_kernels` would clash with Triton's own package of that name.
PACKAGE_DIR = {"opt_fast": "opt_fast", "opt_fast.triton_kernels": "triton_kernels"}


def flag(name):
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def cuda_wanted(torch_cuda_version, cuda_home):
    if flag("OPT_FAST_SKIP_CUDA_BUILD"):
        return False
    found = torch_cuda_version is not None and cuda_home is not None and shutil.which(
        "nvcc", path=os.path.join(cuda_home, "bin") + os.pathsep + os.environ.get("PATH", "")) is not None
    if flag("OPT_FAST_FORCE_CUDA") and not found:
        raise RuntimeError(
            "OPT_FAST_FORCE_CUDA=1, but the CUDA kernels cannot be built: "
            f"torch.version.cuda={torch_cuda_version!r}, CUDA_HOME={cuda_home!r} (nvcc needed)")
    return found


def extensions():
    if flag("OPT_FAST_NO_EXT"):
        return [], {}
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    debug = flag("DEBUG")
    opt = ["-O0", "-g"] if debug else ["-O3"]
    # -g0 for the host compiler: Python's default CFLAGS carry -g, and debug info for ATen's templates makes
    # the build ~1.5x slower (79 s -> 52 s on 2 cores)
    no_g = [] if debug else ["-g0"]
    sources = ["csrc/module.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
    cxx = opt + no_g + ["-std=c++17", "-DPy_LIMITED_API=0x030A0000"]
    kwargs = {}
    use_cuda = cuda_wanted(torch.version.cuda, CUDA_HOME)
    if use_cuda:
        sources += sorted(glob.glob("csrc/cuda/*.cu") + glob.glob("csrc/cuda/*.cpp"))
        nvcc = opt + [f for g in no_g for f in ("-Xcompiler", g)] + ["-std=c++17", "--threads", os.environ.get("NVCC_THREADS", "4")]
        kwargs["extra_compile_args"] = {"cxx": cxx + ["-DOPT_FAST_WITH_CUDA"], "nvcc": nvcc + ["-DOPT_FAST_WITH_CUDA"]}
        ext_cls = CUDAExtension
    else:
        kwargs["extra_compile_args"] = {"cxx": cxx}
        ext_cls = CppExtension
    ext = ext_cls("opt_fast._C", sources, py_limited_api=True, **kwargs)
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = extensions()

setup(
    packages=PACKAGES,
    package_dir=PACKAGE_DIR,
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    options={"bdist_wheel": {"py_limited_api": "cp310"}} if ext_modules else {},
)
