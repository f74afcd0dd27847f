"""Build-time decisions of setup.py and tools/build_backend.py, as pure functions of what they are told
about the environment (so tests can run them on a mocked one: tests/test_build_checks.py).

The C++ extension links against libtorch, so it must be compiled against the very torch it will run
with. pip's default build isolation builds in a temporary environment with a torch of its own (on Linux
the latest CUDA wheel from PyPI): that extension would not load with the torch installed here, and
without a GPU torch's CUDA build helper stops with a bare IndexError. These checks turn both into one
message that says what to do.
"""
import os
import re
from typing import Iterable, Optional, Tuple

NO_ISOLATION = "pip install --no-build-isolation ."
PURE_PYTHON = "OPT_FAST_NO_EXT=1 pip install . for a pure-Python install (every op runs its PyTorch reference)"


def installed_torch(site_dirs: Iterable[str]) -> Optional[str]:
    """The version of the torch installed in ``site_dirs`` (read from torch/version.py, not imported:
    an isolated build cannot import it), or None."""
    for d in site_dirs:
        path = os.path.join(d, "torch", "version.py")
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                m = re.search(r"^__version__\s*=\s*['\"]([^'\"]+)['\"]", f.read(), re.M)
            if m:
                return m.group(1)
    return None


def isolation_problem(build_torch: Optional[Tuple[str, str]], installed: Optional[str]) -> Optional[str]:
    """Why the extension cannot be built here, or None. ``build_torch``: (version, file) of the torch the
    build can import (None: none); ``installed``: the version installed in the target environment."""
    if build_torch is None:
        if installed is not None:
            return (f"opt_fast: the build cannot see the torch {installed} installed in this environment (pip "
                    f"builds in an isolated environment by default), and the C++ extension must be compiled "
                    f"against that torch. Run: {NO_ISOLATION}   (or {PURE_PYTHON})")
        return (f"opt_fast: torch is needed to build the C++ extension: install torch first (e.g. pip install "
                f"torch), then run: {NO_ISOLATION}   (or, without the extension: {PURE_PYTHON})")
    version, where = build_torch
    if installed is not None and installed != version:
        return (f"opt_fast: the build uses torch {version} ({os.path.dirname(where)}), but this environment has "
                f"torch {installed}: an extension compiled against one does not load with the other (pip builds "
                f"in an isolated environment with a torch of its own by default). Run: {NO_ISOLATION}")
    return None


def cuda_plan(torch_cuda: Optional[str], cuda_home: Optional[str], nvcc_found: bool, arch_list: str,
              gpu_count: int, skip: bool, force: bool) -> Tuple[bool, Optional[str]]:
    """(build the CUDA kernels?, a note for the build log). Raises RuntimeError when OPT_FAST_FORCE_CUDA
    asks for what cannot be built."""
    if skip:
        return False, None
    if torch_cuda is None or cuda_home is None or not nvcc_found:
        if force:
            raise RuntimeError("OPT_FAST_FORCE_CUDA=1, but the CUDA kernels cannot be built: "
                               f"torch.version.cuda={torch_cuda!r}, CUDA_HOME={cuda_home!r} (nvcc needed)")
        return False, None
    if not arch_list.strip() and gpu_count == 0:
        note = (f"opt_fast: torch has CUDA {torch_cuda} and nvcc is present, but no GPU is visible and "
                f"TORCH_CUDA_ARCH_LIST is not set, so there is no GPU architecture to compile for. Set "
                f"TORCH_CUDA_ARCH_LIST (e.g. \"8.0;9.0\") to build the CUDA kernels on this machine.")
        if force:
            raise RuntimeError(note)
        return False, note + " Building the CPU kernels only."
    return True, None
