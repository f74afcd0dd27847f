"""The PEP 517 build backend of opt_fast: setuptools, plus a check before pip installs any build
requirement. With build isolation (pip's default) and a torch already installed here, it stops at once
with a message naming --no-build-isolation, instead of downloading a second torch to build an extension
that would not load with the installed one (tools/build_checks.py). Without an installed torch it asks
for torch as a build requirement, and pip installs the same torch as the runtime dependency."""
import os
import site
import sys

from setuptools import build_meta as _setuptools
from setuptools.build_meta import (build_editable, build_sdist, build_wheel,  # noqa: F401 (the PEP 517 hooks)
                                   get_requires_for_build_sdist, prepare_metadata_for_build_editable,
                                   prepare_metadata_for_build_wheel)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import build_checks  # noqa: E402


def _torch_requirement():
    if os.environ.get("OPT_FAST_NO_EXT", "").strip().lower() in ("1", "true", "yes", "on"):
        return []
    try:
        import torch
        build_torch = (torch.__version__, torch.__file__)
    except ImportError:
        build_torch = None
    if build_torch is not None:
        return []  # setup.py checks it against the installed one
    installed = build_checks.installed_torch(site.getsitepackages())
    if installed is not None:
        raise SystemExit(build_checks.isolation_problem(None, installed))
    return ["torch"]


# Not setuptools' own hooks: those run setup.py, which imports torch, before torch is a requirement.
def get_requires_for_build_wheel(config_settings=None):
    return _torch_requirement()


def get_requires_for_build_editable(config_settings=None):
    return _torch_requirement()


__all__ = [h for h in _setuptools.__all__ if h not in ("SetupRequirementsError", "__legacy__")]
