"""Who measured what: versions, hardware and a device slug for result file names."""
import os
import platform
import re
import subprocess
import sys
from typing import Optional

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown cpu"


def gpu_name(device) -> Optional[str]:
    if torch.device(device).type != "cuda":
        return None
    return torch.cuda.get_device_name(torch.device(device))


def slug(text: str, max_words: int = 4) -> str:
    words = re.sub(r"\((r|tm|c)\)|cpu|processor|\d+-core|@.*$", " ", text.lower()).split()
    return re.sub(r"[^a-z0-9]+", "-", "-".join(words[:max_words])).strip("-") or "unknown"


def device_slug(device) -> str:
    """e.g. "cpu-amd-epyc" or "nvidia-h100-80gb-hbm3"."""
    if torch.device(device).type == "cuda":
        return slug(gpu_name(device), 6)
    return "cpu-" + slug(cpu_name(), 3)


def git(*args) -> Optional[str]:
    try:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10,
                              check=True).stdout.strip()
    except Exception:
        return None


def triton_version() -> Optional[str]:
    try:
        import triton
        return triton.__version__
    except Exception:
        return None


def info(device) -> dict:
    import opt_fast
    dev = torch.device(device)
    status = git("status", "--porcelain")
    return {
        "device": str(dev),
        "device_slug": device_slug(dev),
        "cpu": cpu_name(),
        "gpu": gpu_name(dev),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": triton_version(),
        "opt_fast": getattr(opt_fast, "__version__", None),
        "git_sha": git("rev-parse", "HEAD"),
        "git_dirty": bool(status) if status is not None else None,
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "triton_f32_precision": triton_f32_precision(),
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "kernels": {dev.type: {op: opt_fast.kernel_for(op, dev.type) for op in _ops()}},
    }


def triton_f32_precision():
    """The Triton kernels' float32 tl.dot precision (OPT_FAST_TRITON_F32_PRECISION), None without Triton."""
    try:
        from opt_fast.triton_kernels import matmul
    except Exception:   # Triton not installed, or no Triton kernels in this build
        return None
    return matmul.F32_PRECISION


def _ops():
    from opt_fast._ops import ALL_OPS
    return ALL_OPS
