"""Compile the Triton launchers for a CUDA target ahead of time, on a machine without a GPU.

A stub Triton driver stands in for the CUDA one: it reports the target (``GPUTarget("cuda", arch, 32)``)
and that GPU's limits, and its launcher runs nothing. The launchers are called on CPU tensors exactly as
they are on CUDA, so every kernel they launch goes through Triton's real JIT path (specialisation on
dtypes, strides and alignment; the block sizes, warps and stages the launcher picks for the target's
shared memory; ``ptxas`` from Triton's bundle) and is compiled for the target. At each new kernel's first
launch the check reads

* shared memory: ``metadata.shared`` against the target's opt-in limit per block (Triton itself refuses
  the launch above it, as it would on the GPU);
* registers and local memory: ``cuobjdump -res-usage`` (Triton's bundle) on the cubin, i.e. the REG and
  STACK/LOCAL numbers the CUDA driver reports on a GPU as Triton's ``n_regs`` / ``n_spills``; any local
  memory is a failure (register spills);
* registers × threads within the 64 K register file of one block;
* the launch grid: x < 2^31, y and z <= 65535.

No kernel runs, so a launcher's outputs would hold garbage: the stub zero-fills the arguments that
``register_kernel`` names as outputs at every launch, which makes the launchers' data-dependent control
flow (convergence loops, warm-start certificates) deterministic (see aot_cases.py).

The cases live in aot_cases.py (the one place a new kernel registers its calls; the registry itself is
aot_registry.py). Entry point:
``python -m opt_fast.triton_kernels.aot`` (scripts/check_gpu_compile.sh). Not under TRITON_INTERPRET=1.
"""
import argparse
import contextlib
import dataclasses
import os
import re
import subprocess
import sys
import tempfile
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.runtime import driver

from . import INTERPRET
from . import aot_cases  # noqa: F401  (fills the registry: the cases and the kernels' outputs)
from .aot_registry import _OUTPUTS, CASES, Case


@dataclasses.dataclass(frozen=True)
class Target:
    arch: int
    gpu: str
    max_shared: int      # bytes per block with the opt-in (what Triton's driver reports as max_shared_mem)
    sms: int
    regs_per_block: int = 65536
    max_threads: int = 1024

    @property
    def name(self) -> str:
        return f"sm_{self.arch}"


TARGETS = {80: Target(80, "A100", 166_912, 108), 90: Target(90, "H100", 232_448, 132)}
MAX_GRID = (2 ** 31 - 1, 65535, 65535)


# ---- the stub driver --------------------------------------------------------------------------------------

@dataclasses.dataclass
class Compiled:
    """One compiled kernel (a specialisation) on one target, and what the check found."""
    kernel: str
    target: Target
    config: str
    shared: int
    num_warps: int
    origin: str                  # the case that compiled it first
    regs: int = -1
    local: int = -1              # stack + local bytes per thread (Triton's n_spills on a GPU)
    problems: List[str] = dataclasses.field(default_factory=list)

    def check(self) -> None:
        t = self.target
        if self.shared > t.max_shared:
            self.problems.append(f"shared memory {self.shared} B > {t.max_shared} B")
        if self.local > 0:
            self.problems.append(f"{self.local} B of local memory per thread (register spills)")
        threads = self.num_warps * 32
        if threads > t.max_threads or self.regs * threads > t.regs_per_block:
            self.problems.append(f"{self.regs} registers x {threads} threads > {t.regs_per_block}")

    def line(self) -> str:
        status = "FAIL" if self.problems else "ok"
        text = (f"{status:4} {self.target.name} {self.kernel} {self.config} smem={self.shared}/"
                f"{self.target.max_shared} regs={self.regs} spill={self.local} [{self.origin}]")
        return text + ("  <- " + "; ".join(self.problems) if self.problems else "")


class _Recorder:
    def __init__(self, target: Target):
        self.target = target
        self.compiled: List[Compiled] = []
        self.failures: List[str] = []
        self.origin = ""


def res_usage(cubin: bytes) -> Tuple[int, int]:
    """(REG, STACK + LOCAL) of a cubin's kernel, read by Triton's bundled cuobjdump."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([knobs.nvidia.cuobjdump.path, "-res-usage", f.name], capture_output=True,
                             text=True, check=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:\d+ LOCAL:(\d+)", out)
    if m is None:
        raise RuntimeError(f"cannot read `cuobjdump -res-usage`:\n{out}")
    return int(m.group(1)), int(m.group(2)) + int(m.group(3))


def _describe(src, metadata) -> str:
    """One specialisation: the kernel's constexprs, pointer dtypes, warps, stages, and how many arguments
    Triton specialised (16-byte alignment / divisibility, and the integers equal to 1, by name)."""
    params = src.fn.params
    consts, ones = [], []
    for path, v in sorted(src.constants.items()):
        p = params[path[0]]
        (consts if p.is_constexpr else ones).append(f"{p.name}={v}" if p.is_constexpr else p.name)
    ptrs = sorted({str(t)[1:] for t in src.signature.values() if str(t).startswith("*")})
    return (f"{' '.join(consts)} {'/'.join(ptrs)} warps={metadata.num_warps} stages={metadata.num_stages} "
            f"div16={len(src.attrs)} one={','.join(ones) or '-'}")


class _Utils:
    def __init__(self, rec: _Recorder):
        self.rec = rec

    def get_device_properties(self, device):
        t = self.rec.target
        return {"max_shared_mem": t.max_shared, "max_num_regs": t.regs_per_block, "multiprocessor_count": t.sms,
                "warpSize": 32, "sm_clock_rate": 0, "mem_clock_rate": 0, "mem_bus_width": 0}

    def load_binary(self, name, cubin, shared, device):
        c = self.rec.compiled[-1]   # Triton loads a kernel right after creating its launcher
        c.regs, c.local = res_usage(cubin)
        c.check()
        # a non-None module: Triton initialises a kernel again at every launch while its module is None
        return c, None, c.regs, c.local, self.rec.target.max_threads


def _launcher_cls(rec: _Recorder):
    class Launcher:
        def __init__(self, src, metadata):   # once per compiled kernel, at its first launch
            self.name = src.fn.__name__
            self.outputs = [src.fn.arg_names.index(n) for n in _OUTPUTS.get(self.name, ())]
            c = Compiled(self.name, rec.target, _describe(src, metadata), metadata.shared, metadata.num_warps,
                         rec.origin)
            if c.shared > rec.target.max_shared:
                c.check()   # Triton raises OutOfResources before loading: no register count
            rec.compiled.append(c)

        def __call__(self, gx, gy, gz, stream, function, packed, launch_md, enter, exit_, *args):
            if any(g > lim for g, lim in zip((gx, gy, gz), MAX_GRID)):
                rec.failures.append(f"{rec.target.name} {self.name}: grid {(gx, gy, gz)} over CUDA's "
                                    f"{MAX_GRID} [{rec.origin}]")
            for i in self.outputs:
                args[i].zero_()
    return Launcher


class StubDriver:
    """Enough of Triton's CUDA driver for JIT compilation and no-op launches on CPU tensors."""

    def __init__(self, rec: _Recorder):
        from triton.backends.nvidia.driver import ty_to_cpp
        self.map_python_to_cpp_type = ty_to_cpp
        self.rec = rec
        self.utils = _Utils(rec)
        self.launcher_cls = _launcher_cls(rec)

    def get_current_target(self):
        return GPUTarget("cuda", self.rec.target.arch, 32)

    def get_current_device(self):
        return 1000 + self.rec.target.arch   # a JIT cache of its own per target

    def get_current_stream(self, device=None):
        return 0

    def set_current_device(self, device):
        pass

    def get_active_torch_device(self):
        return torch.device("cpu")

    def get_benchmarker(self):
        raise RuntimeError("the stub driver runs no kernels")


@contextlib.contextmanager
def stub_gpu(target: Target) -> Iterator[_Recorder]:
    """Install the stub driver for ``target`` while the block runs; yields the record of compiled kernels."""
    if INTERPRET:
        raise RuntimeError("opt_fast.triton_kernels.aot needs TRITON_INTERPRET unset (kernels are interpreted)")
    rec = _Recorder(target)
    previous = driver._active
    driver.set_active(StubDriver(rec))
    try:
        yield rec
    finally:
        driver._active = previous


def compile_target(arch: int, cases: Optional[Sequence[Case]] = None) -> Tuple[List[Compiled], List[str]]:
    """Run the cases (every size × dtype) for one target: the compiled kernels and the failures."""
    target = TARGETS[arch]
    with stub_gpu(target) as rec:
        for c in (CASES if cases is None else cases):
            for dtype in c.dtypes:
                for size in c.sizes:
                    rec.origin = f"{c.name} d={size} {str(dtype).replace('torch.', '')}"
                    try:
                        c.fn(size, dtype)
                    except Exception as e:   # a compile error, or Triton's OutOfResources at launch
                        first = (str(e).strip().splitlines() or [""])[0]
                        rec.failures.append(f"{target.name} {rec.origin}: {type(e).__name__}: {first}")
    failures = rec.failures + [c.line() for c in rec.compiled if c.problems]
    return rec.compiled, failures


def _run_one(arch: int) -> Tuple[List[str], List[str]]:
    compiled, failures = compile_target(arch)
    return [c.line() for c in compiled], failures


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m opt_fast.triton_kernels.aot",
                                description="Compile every registered Triton kernel config for CUDA targets.")
    p.add_argument("--arch", type=int, action="append", choices=sorted(TARGETS),
                   help=f"compute capability, repeatable (default: all of {sorted(TARGETS)})")
    p.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="targets compiled in parallel")
    args = p.parse_args(argv)
    archs = args.arch or sorted(TARGETS)
    if args.jobs > 1 and len(archs) > 1:
        import multiprocessing as mp
        with mp.get_context("spawn").Pool(min(args.jobs, len(archs))) as pool:
            results = pool.map(_run_one, archs)
    else:
        results = [_run_one(a) for a in archs]
    lines = [line for r in results for line in r[0]]
    failures = [f for r in results for f in r[1]]
    print("\n".join(lines))
    print(f"{len(lines)} kernel configs compiled for {', '.join(TARGETS[a].name for a in archs)}: "
          f"{len(failures)} failure(s)")
    for f in failures:
        print("FAILED:", f)
    return 1 if failures or not lines else 0


if __name__ == "__main__":
    sys.exit(main())
